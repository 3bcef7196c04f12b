"""The scheduling decision of a round, behind one seam.

A :class:`Scheduler` turns the online devices into a :class:`RoundPlan`: the cut, the
clusters (trained one after another; devices inside a cluster in parallel) and each
device's transmission grant. :class:`FixedScheduler` takes them from flags; the
resource-management issue adds an optimising scheduler behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from edge_server.registry import DeviceRecord
from toolkit.protocol import messages as m

SCHEMES = ("cpsl", "sl", "sfl", "fl")


@dataclass
class RoundPlan:
    cut: int | None  # None: FL, the whole model trains on the devices
    clusters: list[list[str]]
    grants: dict[str, m.Grant] = field(default_factory=dict)


class Scheduler(Protocol):
    def plan(self, round_: int, devices: list[DeviceRecord]) -> RoundPlan: ...


@dataclass
class FixedScheduler:
    """cpsl: ``clusters`` groups dealt round-robin by device id; sl: one device per cluster;
    sfl: one cluster of all; fl: all devices, whole model."""

    scheme: str
    cut: int | None
    clusters: int = 2

    def plan(self, round_: int, devices: list[DeviceRecord]) -> RoundPlan:
        ids = sorted(device.id for device in devices)
        if self.scheme == "sl":
            groups = [[device] for device in ids]
        elif self.scheme in ("sfl", "fl"):
            groups = [ids]
        else:
            count = max(1, min(self.clusters, len(ids)))
            groups = [ids[start::count] for start in range(count)]
        return RoundPlan(cut=None if self.scheme == "fl" else self.cut, clusters=[g for g in groups if g])
