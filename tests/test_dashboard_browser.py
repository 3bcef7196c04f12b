"""The demo, watched in a real browser (issue #13): Debian's chromium driven by Playwright.

One ``edge_server demo`` runs for the whole module (15 rounds, four agent processes, the
embedded broker, the dashboard on a free loopback port). While it trains, the page must show
every device, gain accuracy points without being reloaded, and draw one timeline bar per
device per iteration phase, with no console error. When it is done, the demo's own checks
(it learned, it left no process behind), then its report opened with the network off.
Screenshots go to $CPSL_TEST_ARTIFACTS (default: test-artifacts/ in the checkout).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.brokers import free_port

ROOT = Path(__file__).resolve().parents[1]
DEVICES = [f"dev{i}" for i in range(4)]
ITERATIONS = 20  # the demo's --local-iterations default
ROUNDS = 15


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("CPSL_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo, started once, running in the background while the module's tests look at it."""
    folder = tmp_path_factory.mktemp("demo")
    port = free_port()
    before = {p.pid for p in psutil.process_iter()}
    log = (folder / "demo.log").open("w")
    command = [sys.executable, "-m", "edge_server", "demo", "--run-dir", str(folder / "run")]
    process = subprocess.Popen([*command, "--dashboard", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    yield {"process": process, "url": f"http://127.0.0.1:{port}/", "run_dir": folder / "run", "before": before}
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    if path is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's): the browser checks cannot run")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


def watch_console(page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


def wait_until_served(url: str, process, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the demo exited before its dashboard was up"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the dashboard at {url} did not answer in {timeout_s} s")


BARS_PER_ROW = """() => {
  const out = {};
  for (const dataset of Chart.getChart('timeline').data.datasets) {
    out[dataset.key] = {};
    for (const bar of dataset.data) out[dataset.key][bar.y] = (out[dataset.key][bar.y] || 0) + 1;
  }
  return out;
}"""
ACCURACY_POINTS = "Chart.getChart('accuracy').data.datasets[0].data.length"


def until(page, condition: str, timeout_ms: float = 30_000) -> None:
    """Wait for a JavaScript condition, as a function: the page's CSP forbids evaluating strings."""
    page.wait_for_function(f"() => {condition}", timeout=timeout_ms)


@pytest.mark.browser
def test_the_dashboard_shows_the_demo_live(demo, browser, artifacts):
    wait_until_served(demo["url"], demo["process"])
    page = browser.new_page(viewport={"width": 1400, "height": 1900})
    errors = watch_console(page)
    page.goto(demo["url"])
    until(page, f"document.querySelectorAll('#fleet tbody tr[data-device]').length === {len(DEVICES)}", 120_000)
    shown = page.eval_on_selector_all("#fleet tbody tr[data-device]", "rows => rows.map(r => r.dataset.device)")
    assert sorted(shown) == DEVICES
    until(page, f"{ACCURACY_POINTS} >= 1", 120_000)
    seen = page.evaluate(f"() => {ACCURACY_POINTS}")
    assert seen < ROUNDS, "the demo finished before the page saw it train: nothing live was checked"
    until(page, f"{ACCURACY_POINTS} > {seen}", 60_000)  # a round finished: no reload
    assert page.evaluate("() => window.cpslDashboard.events") >= 2  # it came over the event stream
    until(page, "window.cpslDashboard.view.timeline !== null")
    bars = page.evaluate(BARS_PER_ROW)
    rows = page.evaluate("() => Chart.getChart('timeline').data.labels")
    assert sorted(row.rpartition(" · ")[2] for row in rows) == DEVICES  # each device, in the turn it trained in
    for phase in ("forward", "upload", "slot", "server_step", "gradient"):
        assert bars[phase] == dict.fromkeys(rows, ITERATIONS), phase  # one bar per device per iteration
    for phase in ("weights_down", "weights_up"):
        assert bars[phase] == dict.fromkeys(rows, 1), phase  # one transfer each way per device and turn
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / "dashboard-live.png"), full_page=True)
    page.locator("#timeline-box").screenshot(path=str(artifacts / "dashboard-timeline.png"))
    page.close()
    assert errors == []


@pytest.mark.slow
def test_the_demo_learns_on_the_embedded_broker_and_leaves_no_process(demo):
    process = demo["process"]
    assert process.wait(timeout=300) == 0, (demo["run_dir"].parent / "demo.log").read_text()[-2000:]
    records = [json.loads(line) for line in (demo["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == ROUNDS and records[-1]["scheme"] == "cpsl" and len(records[-1]["clusters"]) == 2
    assert records[-1]["accuracy"] >= 0.90, [r["accuracy"] for r in records]
    # cpsl manages its resources by default: every round has its plan's prediction and grants
    assert all(r["predicted_latency_s"] > 0 and len(r["decision"]["grants"]) == len(DEVICES) for r in records)
    time.sleep(1)
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in demo["before"]
        and p.pid != os.getpid()
        and "firmware_agent" in " ".join(p.info["cmdline"] or [])
        and str(demo["run_dir"]) in " ".join(p.info["cmdline"] or [])  # this demo's agents (their --profile)
        and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert leftovers == []


@pytest.mark.browser
def test_the_report_of_the_demo_opens_with_the_network_off(demo, browser, artifacts, tmp_path):
    assert demo["process"].wait(timeout=300) == 0
    out = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "edge_server", "report", str(demo["run_dir"]), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1900})
    page = context.new_page()
    errors = watch_console(page)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(out.as_uri())
    until(page, f"{ACCURACY_POINTS} === {ROUNDS}")
    assert page.evaluate("() => Chart.getChart('latency').data.datasets[0].data.length") == ROUNDS
    assert page.evaluate("() => Chart.getChart('breakdown').data.labels.length") == ROUNDS
    assert page.eval_on_selector_all("#fleet tbody tr[data-device]", "rows => rows.length") == len(DEVICES)
    assert page.eval_on_selector_all("#decisions tbody tr", "rows => rows.length") == ROUNDS
    bars = page.evaluate(BARS_PER_ROW)
    assert all(count == ITERATIONS for count in bars["forward"].values()) and len(bars["forward"]) == len(DEVICES)
    assert page.text_content("#connection") == "report"
    page.screenshot(path=str(artifacts / "report.png"), full_page=True)
    context.close()
    assert requested == [out.as_uri()]  # the file itself, nothing else
    assert errors == []
