"""The live view of a running edge server, read on demand by the dashboard's web thread.

The server's training thread is never asked for anything: the feed reads what the server
keeps anyway (its round history, its registry, its endpoint's counters) when a browser asks,
and keeps nothing of its own but a cache of the round rows already made. With no browser
open the dashboard costs nothing per round.
"""

from __future__ import annotations

import threading

from edge_server.dashboard import view as v


class LiveFeed:
    def __init__(self, server, run: dict) -> None:
        self.server = server  # an edge_server.server.EdgeServer
        self.run = dict(run)
        self.state = "waiting"  # waiting (for devices) -> training -> finished | failed
        self._rows: list[dict] = []
        self._infos: dict[tuple[str, str], dict] = {}  # (device, agent life) -> facts: profiles parsed once
        self._lock = threading.Lock()

    def records(self) -> list[dict]:
        return list(self.server.history)  # one C-level copy: safe while the trainer appends

    def run_info(self) -> dict:
        rounds = len(self.server.history)
        state = "training" if self.state == "waiting" and rounds else self.state
        return {**self.run, "state": state, "rounds_done": rounds}

    def rows_since(self, start: int) -> list[dict]:
        """Round rows from index ``start`` on (made once per round, then cached)."""
        records = self.records()
        with self._lock:
            if len(self._rows) > len(records):  # a resumed run's history replaced the list
                self._rows = []
            for record in records[len(self._rows) :]:
                self._rows.append(v.round_row(record))
            return self._rows[start:]

    def timeline(self) -> dict | None:
        return v.last_timeline(self.records()[-3:])

    def fleet(self) -> list[dict]:
        registry = self.server.registry
        devices = list(registry.devices.values())
        known, self._infos = self._infos, {}  # only the current lives: restarts do not pile up
        for record in devices:
            key = (record.id, record.session)
            self._infos[key] = known[key] if key in known else v.device_info(record)
        infos = {device: info for (device, _), info in self._infos.items()}
        online = {record.id: registry.is_online(record.id) for record in devices}
        rejected = dict(self.server.endpoint.rejected_by_device)
        return v.fleet_rows(infos, self.records(), online, rejected)

    def view(self) -> dict:
        return {
            "run": self.run_info(),
            "rounds": self.rows_since(0),
            "timeline": self.timeline(),
            "fleet": self.fleet(),
        }
