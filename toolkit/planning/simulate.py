"""Scheme against scheme on simulated rounds: what resource management buys.

Every scheme sees the same devices, the same model costs and the same per-round channel
and compute states (one :class:`ChannelModel`, seeded), so the differences are the
schemes' decisions alone:

- ``sl``: the middle candidate cut, devices one after another (each with the whole band);
- ``sfl``: the middle cut, all devices in one cluster, equal shares;
- ``fl``: the whole model on every device, equal shares for the model transfers;
- ``cpsl-random``: the middle cut, random clusters (as many as ``cpsl`` may use, sizes
  as equal as possible, redrawn every round), equal shares;
- ``cpsl``: the cut chosen by SAA (re-chosen every K rounds or on drift), clusters and
  shares optimised every round from that round's state;
- the ablation of ``cpsl``'s fast timescale, each at ``cpsl``'s cut of the round:
  ``cpsl-none`` (random clusters, no shares planned: the devices send when ready and the
  medium shares itself, :func:`allocation.concurrent_phase` - contention on ``wifi``,
  water-filling on ``wired``, equal shares of the band on ``cell``), ``cpsl-clusters``
  (planned clusters, unplanned medium), ``cpsl-slots`` (random clusters, planned shares).

``split_cut`` pins the cut of ``sl``, ``sfl`` and ``cpsl-random`` (default: the middle
candidate), so a baseline can be given its best cut by a sweep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from toolkit.errors import UserError
from toolkit.planning.allocation import allocate_shares, concurrent_phase, equal_shares
from toolkit.planning.channel import ChannelModel
from toolkit.planning.clustering import ClusterBounds, cluster_devices
from toolkit.planning.costs import ModelCosts
from toolkit.planning.cut_selection import CutReselection, select_cut
from toolkit.planning.latency import FleetState, SplitProblem, TrainingSettings, plan_fl_round, plan_split_round

SCHEMES = ("sl", "sfl", "fl", "cpsl-random", "cpsl-none", "cpsl-clusters", "cpsl-slots", "cpsl")
ABLATIONS = ("cpsl-none", "cpsl-clusters", "cpsl-slots")
DEFAULT_SCHEMES = ("sl", "sfl", "fl", "cpsl-random", "cpsl")
SAA_STREAM_OFFSET = 1_000_000  # SAA samples are rounds the run never plays


@dataclass(frozen=True)
class RoundRecord:
    round: int
    latency_s: float
    cut: int | None
    cut_name: str
    clusters: list[list[int]]
    decision_s: float = 0.0
    note: str = ""

    def to_dict(self) -> dict:
        record = {
            "round": self.round,
            "latency_s": self.latency_s,
            "cut": self.cut,
            "cut_name": self.cut_name,
            "clusters": self.clusters,
            "decision_s": self.decision_s,
        }
        if self.note:
            record["note"] = self.note
        return record


@dataclass
class SchemeResult:
    scheme: str
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def latencies(self) -> list[float]:
        return [r.latency_s for r in self.rounds]

    @property
    def mean_latency_s(self) -> float:
        return float(np.mean(self.latencies)) if self.rounds else 0.0

    def to_dict(self) -> dict:
        return {
            "mean_latency_s": self.mean_latency_s,
            "round_latency_s": self.latencies,
            "rounds": [r.to_dict() for r in self.rounds],
        }


@dataclass(frozen=True)
class SimulationConfig:
    rounds: int = 20
    seed: int = 0
    settings: TrainingSettings = field(default_factory=TrainingSettings)
    bounds: ClusterBounds = field(default_factory=lambda: ClusterBounds(max_cluster_size=5))
    saa_samples: int = 10
    reselect_every: int = 10
    drift_threshold: float = 0.3
    cpsl_cut: int | None = None  # pin cpsl's cut (no SAA): separates the cut's gain from clustering's
    split_cut: int | None = None  # pin sl's, sfl's and cpsl-random's cut (default: the middle one)


def random_clusters(devices: int, count: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(devices)
    return [sorted(int(d) for d in order[k::count]) for k in range(count) if len(order[k::count])]


class _Schemes:
    def __init__(self, costs: ModelCosts, channel: ChannelModel, config: SimulationConfig):
        self.costs, self.channel, self.config = costs, channel, config
        self.middle = costs.middle_cut() if config.split_cut is None else costs.cut(config.split_cut)
        self.cluster_count = config.bounds.resolve(channel.size)[1]
        self.reselection = CutReselection(config.reselect_every, config.drift_threshold)
        self.cpsl_cut = None
        self.cut_round: tuple[int, str] | None = None  # the round whose cut is chosen, and its note

    def sl(self, round_: int, state: FleetState) -> RoundRecord:
        problem = SplitProblem.build(self.middle, state, self.config.settings)
        clusters = [[n] for n in range(state.size)]
        plan = plan_split_round(problem, clusters, equal_shares)
        return RoundRecord(round_, plan.latency_s, self.middle.cut, self.middle.name, clusters)

    def sfl(self, round_: int, state: FleetState) -> RoundRecord:
        problem = SplitProblem.build(self.middle, state, self.config.settings)
        clusters = [list(range(state.size))]
        plan = plan_split_round(problem, clusters, equal_shares)
        return RoundRecord(round_, plan.latency_s, self.middle.cut, self.middle.name, clusters)

    def fl(self, round_: int, state: FleetState) -> RoundRecord:
        plan = plan_fl_round(self.costs, state, self.config.settings, equal_shares)
        return RoundRecord(round_, plan.latency_s, None, "full model", [list(range(state.size))])

    def cpsl_random(self, round_: int, state: FleetState) -> RoundRecord:
        rng = np.random.default_rng([self.config.seed, 0xA11, round_])
        clusters = random_clusters(state.size, self.cluster_count, rng)
        problem = SplitProblem.build(self.middle, state, self.config.settings)
        plan = plan_split_round(problem, clusters, equal_shares)
        return RoundRecord(round_, plan.latency_s, self.middle.cut, self.middle.name, clusters)

    def _cut_of(self, round_: int, state: FleetState) -> str:
        """cpsl's cut for this round, chosen once a round and shared by the ablations (the first
        scheme of the round pays for the choice in its decision time); the change's note."""
        if self.cut_round is not None and self.cut_round[0] == round_:
            return self.cut_round[1]
        note = ""
        reason = None if self.config.cpsl_cut is not None else self.reselection.due(round_, state)
        if self.cpsl_cut is None and self.config.cpsl_cut is not None:
            self.cpsl_cut = self.costs.cut(self.config.cpsl_cut)
        if reason is not None:
            base = SAA_STREAM_OFFSET + round_ * self.config.saa_samples
            samples = self.channel.states(range(base, base + self.config.saa_samples))
            # the simulator scores round latency and has no convergence model: it picks by latency
            choice = select_cut(
                self.costs, samples, self.config.settings, self.config.bounds, self.config.seed, objective="latency"
            )
            self.reselection.selected(round_, samples)
            if self.cpsl_cut is None or choice.cut != self.cpsl_cut.cut:
                note = f"cut {choice.cut}:{choice.name} ({reason})"
            self.cpsl_cut = self.costs.cut(choice.cut)
        self.cut_round = (round_, note)
        return note

    def _ablated(self, round_: int, state: FleetState, planned_clusters: bool, planned_shares: bool) -> RoundRecord:
        started = time.perf_counter()
        note = self._cut_of(round_, state)
        problem = SplitProblem.build(self.cpsl_cut, state, self.config.settings)
        if planned_clusters:
            clusters = cluster_devices(problem, self.config.bounds, seed=self.config.seed + round_)
        else:
            rng = np.random.default_rng([self.config.seed, 0xA11, round_])
            clusters = random_clusters(state.size, self.cluster_count, rng)
        plan = plan_split_round(problem, clusters, allocate_shares if planned_shares else concurrent_phase)
        elapsed = time.perf_counter() - started
        return RoundRecord(round_, plan.latency_s, self.cpsl_cut.cut, self.cpsl_cut.name, clusters, elapsed, note)

    def cpsl(self, round_: int, state: FleetState) -> RoundRecord:
        return self._ablated(round_, state, planned_clusters=True, planned_shares=True)

    def cpsl_none(self, round_: int, state: FleetState) -> RoundRecord:
        return self._ablated(round_, state, planned_clusters=False, planned_shares=False)

    def cpsl_clusters(self, round_: int, state: FleetState) -> RoundRecord:
        return self._ablated(round_, state, planned_clusters=True, planned_shares=False)

    def cpsl_slots(self, round_: int, state: FleetState) -> RoundRecord:
        return self._ablated(round_, state, planned_clusters=False, planned_shares=True)

    def runner(self, scheme: str) -> Callable[[int, FleetState], RoundRecord]:
        return {
            "sl": self.sl,
            "sfl": self.sfl,
            "fl": self.fl,
            "cpsl-random": self.cpsl_random,
            "cpsl-none": self.cpsl_none,
            "cpsl-clusters": self.cpsl_clusters,
            "cpsl-slots": self.cpsl_slots,
            "cpsl": self.cpsl,
        }[scheme]


def parse_schemes(text: str) -> list[str]:
    schemes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown or not schemes:
        raise UserError(f"unknown scheme(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SCHEMES)}")
    return list(dict.fromkeys(schemes))


def simulate(
    costs: ModelCosts,
    channel: ChannelModel,
    schemes: Sequence[str],
    config: SimulationConfig,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, SchemeResult]:
    """Every scheme over ``config.rounds`` rounds of the same channel."""
    runners = _Schemes(costs, channel, config)
    results = {scheme: SchemeResult(scheme) for scheme in schemes}
    for round_ in range(config.rounds):
        state = channel.state(round_)
        for scheme in schemes:
            results[scheme].rounds.append(runners.runner(scheme)(round_, state))
            if progress:
                progress(scheme, round_)
    return results
