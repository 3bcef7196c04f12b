"""Turns the server owes devices that dropped out of a split turn after it began (issue #11).

A device whose agent dies mid-turn, or whose link stays down past a phase's deadline, loses
that turn's work: its device-side copy of the model is gone and its batches were never
trained. Without more, its data counts for less than in a run without faults, and a run's
final accuracy drifts from the fault-free one by a few points. So the server remembers
where in the device's batch stream the lost turn began and, the next time the device is
online in a split round, gives it a make-up turn on those same batches before the round's
planned clusters (edge_server.server). What the device then trains is the batches the run
without faults trained, one turn later.

One turn per device is owed at most: a device that keeps dropping out owes the first turn
it lost, not a backlog that would grow with its outage. The record is part of the run state
(edge_server.run_state), so a resumed run still pays what it owes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OwedTurn:
    position: int  # batches the device's stream had given when the lost turn began
    round: int  # the round whose turn was lost


@dataclass
class OwedTurns:
    turns: dict[str, OwedTurn] = field(default_factory=dict)

    def owe(self, device: str, position: int, round_: int) -> None:
        """``device`` lost the turn that began at ``position``; an older debt stands."""
        self.turns.setdefault(device, OwedTurn(position, round_))

    def due(self, online: Iterable[str]) -> dict[str, OwedTurn]:
        """What the online devices are owed, by device."""
        return {device: self.turns[device] for device in sorted(set(online)) if device in self.turns}

    def settle(self, devices: Iterable[str]) -> None:
        for device in devices:
            self.turns.pop(device, None)

    def state_dict(self) -> dict[str, list[int]]:
        return {device: [turn.position, turn.round] for device, turn in sorted(self.turns.items())}

    @classmethod
    def from_state(cls, state: object) -> OwedTurns:
        """From :meth:`state_dict`'s form; ValueError for anything else."""
        if not isinstance(state, dict):
            raise ValueError("its owed turns are not device -> [position, round]")
        turns = {}
        for device, value in state.items():
            if (
                not isinstance(device, str)
                or not isinstance(value, list)
                or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
            ):
                raise ValueError("its owed turns are not device -> [position, round]")
            turns[device] = OwedTurn(value[0], value[1])
        return cls(turns)
