"""Benchmark (issue #13, item 6): what an open dashboard costs the demo's rounds.

Runs ``edge_server demo`` in pairs, one run without the dashboard (``--no-dashboard``) and one
with it and a page open in chromium (Playwright) that stays connected and takes every update
as it comes, and reloads the whole page every ``--reload-s`` seconds (a person refreshing).
Pairs alternate which goes first, so drift of the machine falls on both. Reported: each run's
mean round latency (metrics.jsonl, round 0 left out: it carries the probing), and the median
over pairs of the relative change. Goal: under 3%.

The browser runs on the same machine as the demo here (2 vCPU): the worst case, where its
drawing competes with training for the cores; with the page on another machine only the
server's side remains.

    python bench/dashboard_cost.py [--pairs 5] [--rounds 15] [--viewer chromium|client] [--out DIR]

Writes OUT/dashboard_cost_VIEWER.json. ``--viewer client`` makes the page's requests and reads its
event stream without a browser: the server's side of the cost alone, as when the page is
open on another machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.brokers import free_port  # noqa: E402


def mean_round_latency(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.fmean(r["latency_s"] for r in records[1:])


def wait_until_up(url: str, stop: threading.Event, timeout_s: float = 120) -> None:
    """Until the demo's dashboard answers (it starts with the demo), or ``stop``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)


def watch(url: str, stop: threading.Event, reload_s: float, stats: dict) -> None:
    """A chromium page on the dashboard until ``stop``: live updates, a full reload every ``reload_s``."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    wait_until_up(url, stop)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1900})
        page.goto(url)
        last = time.monotonic()
        while not stop.wait(0.5):
            if time.monotonic() - last >= reload_s:
                stats["events"] += page.evaluate("() => window.cpslDashboard.events")
                try:
                    page.reload()
                except PlaywrightError:  # the demo ended between two looks
                    break
                stats["reloads"] += 1
                last = time.monotonic()
        with contextlib.suppress(PlaywrightError):
            stats["events"] += page.evaluate("() => window.cpslDashboard.events")
        browser.close()


def watch_as_client(url: str, stop: threading.Event, reload_s: float, stats: dict) -> None:
    """What a page asks of the server, without a browser's drawing on this machine: the page, its
    files and the view on every refresh, and the event stream read as it comes in between."""
    wait_until_up(url, stop)
    while not stop.is_set():
        try:
            for path in ("", "static/chart.umd.min.js", "static/dashboard.js", "static/dashboard.css", "api/view"):
                urllib.request.urlopen(url + path, timeout=10).read()
            stream = urllib.request.urlopen(url + "events", timeout=10)
        except OSError:
            return  # the demo ended
        stats["reloads"] += 1
        until = time.monotonic() + reload_s

        def read(stream=stream) -> None:
            with contextlib.suppress(OSError, ValueError, AttributeError):  # closed under it by the refresh
                for line in stream:
                    if line.startswith(b"event: "):
                        stats["events"] += 1

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        stop.wait(max(0.0, until - time.monotonic()))
        stream.close()
        reader.join(timeout=5)


def one_run(folder: Path, rounds: int, dashboard: bool, reload_s: float, viewer: str = "chromium") -> dict:
    run_dir = folder / ("with" if dashboard else "without")
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "edge_server", "demo", "--rounds", str(rounds), "--run-dir", str(run_dir)]
    stats = {"reloads": 0, "events": 0}
    stop = threading.Event()
    watcher = None
    if dashboard:
        port = free_port()
        command += ["--dashboard", f"127.0.0.1:{port}"]
        target = watch if viewer == "chromium" else watch_as_client
        watcher = threading.Thread(target=target, args=(f"http://127.0.0.1:{port}/", stop, reload_s, stats))
    else:
        command += ["--no-dashboard"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if watcher is not None:
        watcher.start()
    _, err = process.communicate(timeout=900)
    stop.set()
    if watcher is not None:
        watcher.join(timeout=60)
    if process.returncode != 0:
        raise SystemExit(f"demo failed: {err[-2000:]}")
    return {"dashboard": dashboard, "mean_round_s": mean_round_latency(run_dir), **(stats if dashboard else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reload-s", type=float, default=5.0, help="seconds between full page reloads")
    parser.add_argument(
        "--viewer",
        choices=("chromium", "client"),
        default="chromium",
        help="chromium: a real page on this machine (its drawing competes for the cores); client: the same "
        "requests and event stream without a browser, as when the page is on another machine",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dashboard")
    args = parser.parse_args()
    if args.viewer == "chromium" and shutil.which("chromium") is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.pairs):
            order = (False, True) if index % 2 == 0 else (True, False)
            runs = {on: one_run(Path(tmp), args.rounds, on, args.reload_s, args.viewer) for on in order}
            change = runs[True]["mean_round_s"] / runs[False]["mean_round_s"] - 1
            pairs.append({"without": runs[False], "with": runs[True], "change": change})
            print(
                f"pair {index + 1}/{args.pairs}: without {runs[False]['mean_round_s']:.3f} s, "
                f"with {runs[True]['mean_round_s']:.3f} s ({change:+.1%}; "
                f"{runs[True]['events']} events, {runs[True]['reloads']} reloads)",
                flush=True,
            )
    summary = {
        "median_without_s": statistics.median(p["without"]["mean_round_s"] for p in pairs),
        "median_with_s": statistics.median(p["with"]["mean_round_s"] for p in pairs),
        "median_change": statistics.median(p["change"] for p in pairs),
    }
    print(
        f"median mean round latency: without {summary['median_without_s']:.3f} s, "
        f"with the dashboard open {summary['median_with_s']:.3f} s; median change {summary['median_change']:+.2%}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/dashboard_cost.py " + " ".join(sys.argv[1:])
    document = {"command": command.strip(), "pairs": pairs, "summary": summary}
    (args.out / f"dashboard_cost_{args.viewer}.json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
