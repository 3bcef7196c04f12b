"""The README's and docs/dashboard.md's dashboard pictures, taken from a live demo in chromium.

    python bench/dashboard_screenshots.py [--at-round 12] [--out docs/figures]

Starts ``edge_server demo`` with the dashboard on a free loopback port, opens it in Debian's
chromium (Playwright), waits until ``--at-round`` rounds are done, and saves the whole page
(dashboard.png) and the timeline of the first turn's first three iterations
(dashboard-timeline.png). The demo then runs to its end.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.brokers import free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at-round", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "edge_server", "demo", "--run-dir", tmp, "--dashboard", f"127.0.0.1:{port}"]
        demo = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or demo.poll() is not None:
                        raise SystemExit("the demo's dashboard did not come up") from None
                    time.sleep(0.2)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 800}, device_scale_factor=1)
                page.goto(url)
                rounds = "Chart.getChart('accuracy').data.datasets[0].data.length"
                page.wait_for_function(f"() => {rounds} >= {args.at_round}", timeout=300_000)
                args.out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out / "dashboard.png"), full_page=True)
                page.select_option("#timeline-turn", "0")
                page.select_option("#timeline-iterations", "3")
                page.wait_for_timeout(200)
                page.locator("#timeline-box").screenshot(path=str(args.out / "dashboard-timeline.png"))
                browser.close()
            demo.wait(timeout=300)
        finally:
            if demo.poll() is None:
                demo.terminate()
                demo.wait(timeout=30)
    print(f"wrote {args.out / 'dashboard.png'} and {args.out / 'dashboard-timeline.png'}")


if __name__ == "__main__":
    main()
