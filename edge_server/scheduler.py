"""The scheduling decision of a round, behind one seam.

A :class:`Scheduler` turns the online devices into a :class:`RoundPlan`: the cut, the
clusters (trained one after another; devices inside a cluster in parallel) and each
device's transmission grant. :class:`FixedScheduler` takes them from flags;
:class:`edge_server.auto.AutoScheduler` decides them live (``--auto``), and also offers
``needs_probe``/``add_device`` (the server probes new devices for it) and ``observe``
(the server hands it every round's measurements).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from edge_server.registry import DeviceRecord
from toolkit.protocol import messages as m

SCHEMES = ("cpsl", "sl", "sfl", "fl")


@dataclass
class ClusterTiming:
    """What running a cluster's slots needs: when the first slots open after the weights
    go down, and when the next iteration's open after the gradients go out (seconds)."""

    model_down_s: float
    downlink_s: float
    predicted_turn_s: float
    predicted_iteration_s: float
    predicted_model_up_s: float = 0.0  # last gradient out until every device's weights are in
    # seconds after the turn starts / the server step ends when each device's weights /
    # gradient go out: one transfer at a time on the shared medium, as the plan assumed
    weights_down_offsets: dict[str, float] = field(default_factory=dict)
    gradient_offsets: dict[str, float] = field(default_factory=dict)

    @property
    def downlink_order(self) -> list[str]:
        """The order the gradients go out in (longest backward pass first)."""
        return sorted(self.gradient_offsets, key=self.gradient_offsets.__getitem__)

    def to_dict(self) -> dict:
        return {
            "predicted_turn_s": self.predicted_turn_s,
            "predicted_model_down_s": self.model_down_s,
            "predicted_iteration_s": self.predicted_iteration_s,
            "predicted_model_up_s": self.predicted_model_up_s,
        }


@dataclass
class RoundPlan:
    cut: int | None  # None: FL, the whole model trains on the devices
    clusters: list[list[str]]
    grants: dict[str, m.Grant] = field(default_factory=dict)
    timing: dict[int, ClusterTiming] = field(default_factory=dict)  # by cluster index; empty: no slots
    predicted_latency_s: float | None = None
    # the least any plan could take at this cut with these devices (toolkit.planning.bound)
    bound_s: float | None = None
    decision: dict = field(default_factory=dict)  # logged to metrics.jsonl as is


class Scheduler(Protocol):
    def plan(self, round_: int, devices: list[DeviceRecord]) -> RoundPlan: ...


@dataclass
class FixedScheduler:
    """cpsl: ``clusters`` groups dealt round-robin by device id (or, with
    ``random_clusters``, by a permutation drawn per round from ``seed``); sl: one device
    per cluster; sfl: one cluster of all; fl: all devices, whole model. No slots: every
    device sends as soon as its data is ready."""

    scheme: str
    cut: int | None
    clusters: int = 2
    random_clusters: bool = False
    seed: int = 0

    def plan(self, round_: int, devices: list[DeviceRecord]) -> RoundPlan:
        ids = sorted(device.id for device in devices)
        if self.scheme == "sl":
            groups = [[device] for device in ids]
        elif self.scheme in ("sfl", "fl"):
            groups = [ids]
        else:
            groups = dealt_clusters(ids, self.clusters, self.seed if self.random_clusters else None, round_)
        return RoundPlan(cut=None if self.scheme == "fl" else self.cut, clusters=[g for g in groups if g])


def dealt_clusters(ids: list[str], count: int, seed: int | None, round_: int) -> list[list[str]]:
    """``count`` clusters dealt round-robin from ``ids`` in sorted order, or, with a ``seed``, from
    a permutation drawn for the round: the same draw for every scheduler that asks for it."""
    ids = sorted(ids)
    if seed is not None:
        random.Random(f"{seed}/{round_}").shuffle(ids)
    count = max(1, min(count, len(ids)))
    return [group for group in (ids[start::count] for start in range(count)) if group]
