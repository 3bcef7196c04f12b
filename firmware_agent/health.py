"""The agent's health, for a container's HEALTHCHECK or a supervisor: a small file, refreshed every heartbeat.

Healthy means: the agent process is alive (the file is fresh) and connected to its broker.
A file and not a port: nothing new listens on the board, and checking it needs no network.
The file is written only when asked for (``--health-file``), ideally on a tmpfs such as
/dev/shm: rewriting a file every two seconds on an SD card wears it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from toolkit.files import write_atomically

MAX_HEALTH_BYTES = 4096


def write_health(path: Path, device: str, connected: bool, state: str) -> None:
    record = {"device": device, "connected": connected, "state": state, "at": time.time()}
    write_atomically(path, json.dumps(record))


def check_health(path: Path, max_age_s: float, now: float | None = None) -> tuple[bool, str]:
    """(healthy, one line saying why or why not)."""
    try:
        with path.open("rb") as handle:
            record = json.loads(handle.read(MAX_HEALTH_BYTES))
        at, connected = float(record["at"]), bool(record["connected"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"no readable health file {path} ({exc.__class__.__name__}): the agent is not running"
    age = (time.time() if now is None else now) - at
    if age > max_age_s:
        return False, f"the agent's last heartbeat was {age:.0f} s ago (more than {max_age_s:g} s): it is stuck"
    if not connected:
        return False, f"{record.get('device')} is not connected to its broker (reconnecting)"
    return True, f"{record.get('device')} connected, {record.get('state')}, heartbeat {age:.1f} s ago"
