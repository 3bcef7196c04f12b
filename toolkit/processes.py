"""Stopping the processes a command started, each in its own process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def stop_process_groups(processes: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM to every process's group at once, SIGKILL to those still running after one
    shared grace period: stopping N processes takes at most ``grace_s``, not N times that.
    Each process must have been started with ``start_new_session=True``."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
