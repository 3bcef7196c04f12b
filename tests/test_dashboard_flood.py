"""2,000 half-open connections to the dashboard or the metrics endpoint at ``ulimit -n 1024``
leave the training process untouched: its file descriptors stay bounded, its own file I/O
never fails, and a visitor from another address is still served."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, tempfile, time
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    from edge_server.dashboard.web import DashboardServer

    class Feed:  # the page's data; what is measured here is the connections
        def view(self):
            return {"rounds": [], "fleet": [], "run": {}}

    if sys.argv[2] == "dashboard":
        dashboard = DashboardServer(Feed(), "0.0.0.0", 0)
        dashboard.start()
    else:
        from edge_server.prometheus import Exporter
        dashboard = Exporter()
        dashboard.serve("0.0.0.0", 0)
    print(dashboard.port, flush=True)
    failures, most_fds, deadline = 0, 0, time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline:  # the training's own files, as a run writes its records
        try:
            with tempfile.TemporaryFile() as handle:
                handle.write(b"round record")
        except OSError:
            failures += 1
        most_fds = max(most_fds, len(os.listdir("/proc/self/fd")))
        time.sleep(0.02)
    if sys.argv[2] == "dashboard":
        refused = dashboard.refused
    else:
        refused = {"too many connections": dashboard._http.budget.refused}
    dashboard.close()
    print(json.dumps({"failures": failures, "most_fds": most_fds, "refused": dict(refused)}), flush=True)
    """
)


@pytest.mark.parametrize(("endpoint", "path"), [("dashboard", "/static/dashboard.css"), ("metrics", "/metrics")])
def test_a_flood_of_half_open_connections_leaves_the_run_untouched(endpoint, path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip("this test opens 2,000 connections and needs a hard file limit of at least 4096")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    child = subprocess.Popen([sys.executable, "-c", CHILD, "12", endpoint], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    flood: list[socket.socket] = []
    try:
        port = int(child.stdout.readline())
        for _ in range(2000):
            connection = socket.socket()
            connection.setblocking(False)
            connection.connect_ex(("127.0.0.1", port))
            flood.append(connection)
        time.sleep(2.0)
        for connection in flood:  # headers that never end
            with contextlib.suppress(OSError):  # closed by the dashboard: refused
                connection.send(b"GET /api/view HTTP/1.1\r\nHost: dashboard\r\nX-Slow: ")
        visitor = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
        visitor.sendall(f"GET {path} HTTP/1.1\r\nHost: dashboard\r\nConnection: close\r\n\r\n".encode())
        answer = visitor.recv(64)
        visitor.close()
        report = json.loads(child.stdout.readline())
        child.wait(timeout=30)
    finally:
        for connection in flood:
            connection.close()
        if child.poll() is None:
            child.kill()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert answer.split(b" ")[1] == b"200", answer  # another address is still served
    assert report["failures"] == 0, report  # the run's own files were never refused a descriptor
    assert report["most_fds"] < 200, report  # at most 64 connections, whatever arrives
    assert report["refused"].get("too many connections", 0) > 1000, report
    assert child.returncode == 0
