"""How many connections a listener keeps open, all together and from one address: decided
when a connection is accepted, before a byte of it is read (the dashboard, the metrics
endpoint). Thread-safe: the metrics endpoint admits on one thread and releases on others."""

from __future__ import annotations

import threading
from collections import Counter


class ConnectionBudget:
    def __init__(self, total: int, per_address: int) -> None:
        self.total, self.per_address = total, per_address
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.refused = 0  # connections closed unread for want of room

    def admit(self, peer: str) -> bool:
        """Take a slot for a connection from ``peer``, or False (counted) when there is none."""
        with self._lock:
            if sum(self._open.values()) >= self.total or self._open[peer] >= self.per_address:
                self.refused += 1
                return False
            self._open[peer] += 1
            return True

    def release(self, peer: str) -> None:
        with self._lock:
            self._open[peer] -= 1
            if self._open[peer] <= 0:
                del self._open[peer]
