"""Stopping a command's children: one shared grace period, then SIGKILL for the stubborn."""

from __future__ import annotations

import subprocess
import time

from toolkit.processes import stop_process_groups


def test_stubborn_and_polite_processes_all_stop_within_one_grace_period():
    stubborn = [
        subprocess.Popen(["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"], start_new_session=True)
        for _ in range(3)
    ]
    polite = subprocess.Popen(["sleep", "30"], start_new_session=True)
    finished = subprocess.Popen(["true"], start_new_session=True)
    finished.wait()
    time.sleep(0.2)  # the traps are set
    started = time.monotonic()
    stop_process_groups([*stubborn, polite, finished], grace_s=1.0)
    elapsed = time.monotonic() - started
    assert all(p.returncode is not None for p in [*stubborn, polite])
    assert polite.returncode == -15 and all(p.returncode == -9 for p in stubborn)
    assert elapsed < 2.0  # one grace period for all three, not one each
