"""The large timescale: which layer to cut at, by sample average approximation (SAA).

The cut changes what every device computes and what crosses the link, and moving it
means moving weights, so it is chosen rarely and for the expected state rather than the
current one: draw S states (from the channel model, or the last rounds' observations),
solve the small timescale -- clustering and optimal shares -- for every candidate cut in
every state, and keep the cut with the lowest *time to accuracy*: mean round latency
times the rounds the cut needs relative to the others (:mod:`toolkit.planning.rounds`).
A late cut often has the shortest rounds and needs the most of them. ``objective=
"latency"`` keeps the lowest mean round latency instead (``cpsl-sim``, which models
latency and no convergence, scores it that way).

:class:`CutReselection` says when to choose again: every ``every_rounds`` rounds, or as
soon as the observed state has drifted: the fleet's geometric-mean uplink or downlink
capacity, or compute speed, moved by more than ``drift_threshold`` in log terms (0.3 is
about a 35% change) from what the last selection sampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from toolkit.planning.clustering import ClusterBounds, cluster_devices, round_latency
from toolkit.planning.costs import ModelCosts
from toolkit.planning.latency import FleetState, SplitProblem, TrainingSettings
from toolkit.planning.rounds import estimate_rounds


@dataclass(frozen=True)
class CutChoice:
    cut: int
    name: str
    mean_latency_s: dict[int, float]  # every candidate's SAA estimate
    objective: str = "latency"
    relative_rounds: dict[int, float] = field(default_factory=dict)  # R(c) / R_0, time-to-accuracy only
    skew: float | None = None

    def to_dict(self) -> dict:
        return {
            "cut": self.cut,
            "name": self.name,
            "objective": self.objective,
            "mean_latency_s": {str(k): v for k, v in self.mean_latency_s.items()},
            "relative_rounds": {str(k): v for k, v in self.relative_rounds.items()},
            "skew": self.skew,
        }


def select_cut(
    costs: ModelCosts,
    states: Sequence[FleetState],
    settings: TrainingSettings,
    bounds: ClusterBounds | None = None,
    seed: int = 0,
    objective: str = "time-to-accuracy",
    skew: float = 0.0,
) -> CutChoice:
    """The candidate cut with the lowest mean round latency over the sampled states, times
    (for ``time-to-accuracy``) its relative rounds at label skew ``skew``."""
    if not states:
        raise ValueError("SAA needs at least one sampled state")
    if objective not in ("latency", "time-to-accuracy"):
        raise ValueError(f"objective {objective!r}: latency or time-to-accuracy")
    means: dict[int, float] = {}
    for cut in costs.cuts:
        total = 0.0
        for state in states:
            problem = SplitProblem.build(cut, state, settings)
            total += round_latency(problem, cluster_devices(problem, bounds, seed=seed))
        means[cut.cut] = total / len(states)
    if objective == "latency":
        best = min(means, key=lambda c: (means[c], c))
        return CutChoice(best, costs.cut(best).name, means)
    rounds = {c: estimate_rounds(costs, c, skew).relative_rounds for c in means}
    best = min(means, key=lambda c: (means[c] * rounds[c], c))
    return CutChoice(best, costs.cut(best).name, means, objective, rounds, skew)


def state_summary(state: FleetState) -> np.ndarray:
    """log geometric means of uplink capacity, downlink capacity and compute speed."""
    devices = np.arange(state.size)
    return np.array(
        [
            float(np.mean(np.log(state.uplink.capacity_bps(devices)))),
            float(np.mean(np.log(state.downlink.capacity_bps(devices)))),
            float(np.mean(np.log(state.speed))),
        ]
    )


@dataclass
class CutReselection:
    every_rounds: int = 10
    drift_threshold: float = 0.3
    last_round: int | None = None
    reference: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.every_rounds < 1 or self.drift_threshold <= 0:
            raise ValueError("every_rounds must be >= 1 and drift_threshold > 0")

    def selected(self, round_: int, sampled: Sequence[FleetState]) -> None:
        """Record a selection made at ``round_`` from these sampled states."""
        self.last_round = round_
        self.reference = np.mean([state_summary(s) for s in sampled], axis=0)

    def drift(self, observed: FleetState) -> float:
        if self.reference is None:
            return math.inf
        return float(np.max(np.abs(state_summary(observed) - self.reference)))

    def due(self, round_: int, observed: FleetState) -> str | None:
        """Why the cut should be chosen again now, or None."""
        if self.last_round is None:
            return "first round"
        if round_ - self.last_round >= self.every_rounds:
            return f"{self.every_rounds} rounds since the last selection"
        drift = self.drift(observed)
        if drift > self.drift_threshold:
            return f"state drifted by {drift:.2f} (threshold {self.drift_threshold})"
        return None
