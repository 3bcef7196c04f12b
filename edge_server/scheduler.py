"""The scheduling decision of a round, behind one seam.

A :class:`Scheduler` turns the online devices into a :class:`RoundPlan`: the cut, the
clusters (trained one after another; devices inside a cluster in parallel) and each
device's transmission grant. It is everything the edge server asks of a scheduler --
planning, what it needs measured, the measurements themselves, the encodings, its state
for ``--resume`` -- and the server asks nothing else (no attribute is looked up by name).
:class:`FixedScheduler` takes its plan from flags and measures nothing;
:class:`edge_server.auto.AutoScheduler` decides live (``--auto``). Aggregation is not
here: it is a strategy of its own (edge_server.strategy), as in Flower.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edge_server.registry import DeviceRecord
from toolkit.protocol import messages as m

if TYPE_CHECKING:
    from edge_server.probe import LinkMeasurement, TogetherMeasurement
    from toolkit.compression import Trial

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


@dataclass
class RoundMeasurements:
    """What a split round measured, handed to the scheduler after it (server clock)."""

    cut: int
    timings: dict[str, m.Timings]  # each device's report of its turn
    server_steps: list[tuple[int, float]]  # (samples, seconds) of each server step
    arrivals: dict[str, dict[int, float]] = field(default_factory=dict)  # device -> iteration -> smashed data in
    turns: list[dict] = field(default_factory=list)  # per cluster: measured phases beside their predictions
    latency_s: float | None = None
    label_counts: dict[str, np.ndarray] = field(default_factory=dict)  # per device, the labels it trained on
    server_codec: tuple[float, int] | None = None  # seconds decoding and encoding at the cut, fp32 bytes covered


class Scheduler(ABC):
    """What the edge server asks of a scheduler. ``plan`` is the one a scheduler must
    implement; the defaults are a scheduler that measures nothing, learns nothing and keeps
    no state -- one that plans from measurements overrides the rest."""

    # planning
    @abstractmethod
    def plan(self, round_: int, devices: list[DeviceRecord]) -> RoundPlan:
        """The round's cut, clusters (in turn) and each device's transmission grant."""

    # what it needs measured: the server probes these devices' links, each alone, and then,
    # when asked, all of them together for the medium (edge_server.probe)
    def needs_probe(self, device: str) -> bool:
        return False

    def needs_medium_probe(self, devices: list[str]) -> bool:
        return False

    def known_links(self, devices: list[str]) -> dict[str, LinkMeasurement]:
        """The links measured so far of these devices (the simultaneous probe sizes its payloads by them)."""
        return {}

    # how it takes measurements
    def add_device(self, record: DeviceRecord, link: LinkMeasurement, devices: list[DeviceRecord]) -> None:
        """A device probed for the first time (or again after ``forget``)."""
        return None  # by default: nothing to keep

    def set_medium(self, together: TogetherMeasurement) -> None:
        """The simultaneous probe's result."""
        return None  # by default: nothing to keep

    def forget(self, device: str) -> None:
        """The device came back (offline, or a new agent life): what was measured of it may not hold."""
        return None  # by default: nothing to keep

    def observe(self, measured: RoundMeasurements) -> None:
        """A split round's measurements, after it."""
        return None  # by default: nothing to keep

    # what crosses the cut
    def encodings(self) -> tuple[str, str] | None:
        """This round's (smashed data, gradient) encodings, or None for the run's settings."""
        return None

    @property
    def wants_encoding_trials(self) -> bool:
        """True while it wants every candidate encoding tried on real batches (``choose_encodings``)."""
        return False

    def choose_encodings(self, trials: list[Trial]) -> dict:
        raise NotImplementedError(f"{type(self).__name__} asks for no encoding trials")

    # state for --resume (JSON)
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Put back what ``state_dict`` returned in an earlier life of the run."""
        return None  # by default: nothing to keep


@dataclass
class FixedScheduler(Scheduler):
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
