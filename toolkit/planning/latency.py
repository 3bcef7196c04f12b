"""The latency of an iteration, a cluster turn and a round (docs/latency-model.md).

For cut l, batch B and I local iterations per cluster turn:

- iteration of cluster m: ``tau_m = U_m + S(|m| B) + D_m`` where U_m is the uplink phase
  (every device computes its forward pass, then sends smashed data and labels), S the
  server step on the cluster's concatenated batch, and D_m the downlink phase (gradients
  down, then every device's backward pass and optimiser step);
- cluster turn: ``T_m = M^down_m + I tau_m + M^up_m`` (device-side model down at the
  start, up at the end);
- round: ``T = sum_m T_m`` (clusters take turns). SL is every device its own cluster,
  SFL one cluster of all, FL its own formula (:func:`plan_fl_round`).

Each phase's shares come from an *allocator*: :func:`allocation.allocate_shares` (the
optimum) or :func:`allocation.equal_shares` (the baseline without resource management).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.planning.allocation import PhasePlan, allocate_shares, allocate_shares_many
from toolkit.planning.costs import Affine, CutCost, ModelCosts
from toolkit.planning.rates import RateModel

Allocator = Callable[..., PhasePlan]


@dataclass(frozen=True)
class TrainingSettings:
    batch_size: int = 32
    local_iterations: int = 20  # I: iterations per cluster turn (and per FL round)
    server_speed: float = 1.0  # server compute speed relative to the server profile
    # what crosses the cut, encoded (toolkit.compression): bytes on the wire per fp32 byte,
    # smashed data with labels up, gradients down; 1.0 without compression
    uplink_ratio: float = 1.0
    downlink_ratio: float = 1.0
    # the edge server decoding the smashed data and encoding the gradients, per fp32 byte of smashed data
    server_codec_s_per_byte: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.local_iterations < 1 or self.server_speed <= 0:
            raise ValueError("batch_size and local_iterations must be >= 1 and server_speed > 0")
        if not (self.uplink_ratio > 0 and self.downlink_ratio > 0):
            raise ValueError("the wire ratios of the cut's data must be positive")


@dataclass(frozen=True)
class FleetState:
    """What the small timescale sees in one round: compute speeds and both links.

    ``speed[n]`` is device n's compute speed relative to the reference profile the costs
    came from (2.0 = twice as fast).
    """

    speed: np.ndarray
    uplink: RateModel
    downlink: RateModel
    # per device, seconds to encode its smashed data and decode its gradient, per fp32 byte of
    # smashed data (toolkit.compression's work is linear in the tensor); None: no compression
    codec_s_per_byte: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.speed)


def _with_codec(server: Affine, cut: CutCost, settings: TrainingSettings) -> Affine:
    """The server step plus its share of the codec: linear in the samples, like the step."""
    per_sample = settings.server_codec_s_per_byte * cut.downlink_bytes(1)
    return Affine(server.fixed_s, server.per_sample_s + per_sample) if per_sample > 0 else server


@dataclass(frozen=True)
class SplitProblem:
    """One cut under one state: everything a cluster's latency depends on, in seconds and bits."""

    forward_s: np.ndarray  # per device, one mini-batch
    backward_s: np.ndarray  # per device, backward + optimiser step of one mini-batch
    uplink_bits: float  # smashed data + labels of one mini-batch
    downlink_bits: float  # gradient of one mini-batch
    model_bits: float  # device-side model
    server: Affine  # server step for k samples (already scaled by the server speed)
    batch_size: int
    iterations: int
    uplink: RateModel
    downlink: RateModel

    @classmethod
    def build(cls, cut: CutCost, state: FleetState, settings: TrainingSettings) -> SplitProblem:
        batch = settings.batch_size
        codec_s = 0.0 if state.codec_s_per_byte is None else state.codec_s_per_byte * cut.downlink_bytes(batch)
        return cls(
            forward_s=cut.device_forward(batch) / state.speed + codec_s,
            backward_s=cut.device_backward(batch) / state.speed,
            uplink_bits=8.0 * settings.uplink_ratio * cut.uplink_bytes(batch),
            downlink_bits=8.0 * settings.downlink_ratio * cut.downlink_bytes(batch),
            model_bits=8.0 * cut.device_model_bytes,
            server=_with_codec(cut.server_step.scaled(1.0 / settings.server_speed), cut, settings),
            batch_size=batch,
            iterations=settings.local_iterations,
            uplink=state.uplink,
            downlink=state.downlink,
        )

    @property
    def size(self) -> int:
        return len(self.forward_s)

    def server_s(self, cluster_size: int) -> float:
        return self.server(cluster_size * self.batch_size)


@dataclass(frozen=True)
class ClusterPlan:
    devices: tuple[int, ...]
    model_down: PhasePlan
    uplink: PhasePlan
    server_s: float
    downlink: PhasePlan
    model_up: PhasePlan
    iterations: int

    @property
    def iteration_s(self) -> float:
        return self.uplink.finish_s + self.server_s + self.downlink.finish_s

    @property
    def latency_s(self) -> float:
        return self.model_down.finish_s + self.iterations * self.iteration_s + self.model_up.finish_s


def plan_cluster(problem: SplitProblem, devices: Sequence[int], allocator: Allocator = allocate_shares) -> ClusterPlan:
    """A cluster turn with the given allocator deciding every phase's shares."""
    index = np.asarray(sorted(devices), dtype=int)
    return ClusterPlan(
        devices=tuple(int(i) for i in index),
        model_down=allocator(problem.downlink, index, problem.model_bits),
        uplink=allocator(problem.uplink, index, problem.uplink_bits, lead=problem.forward_s[index]),
        server_s=problem.server_s(len(index)),
        downlink=allocator(problem.downlink, index, problem.downlink_bits, tail=problem.backward_s[index]),
        model_up=allocator(problem.uplink, index, problem.model_bits),
        iterations=problem.iterations,
    )


def cluster_latency(problem: SplitProblem, devices: Sequence[int], allocator: Allocator = allocate_shares) -> float:
    return plan_cluster(problem, devices, allocator).latency_s if len(devices) else 0.0


@dataclass(frozen=True)
class SplitRoundPlan:
    clusters: tuple[ClusterPlan, ...]

    @property
    def latency_s(self) -> float:
        return float(sum(cluster.latency_s for cluster in self.clusters))


def plan_split_round(
    problem: SplitProblem, clusters: Sequence[Sequence[int]], allocator: Allocator = allocate_shares
) -> SplitRoundPlan:
    """A CPSL round over the given clusters (SL: singletons; SFL: one cluster of all).

    With the optimal allocator every phase of every cluster is solved in one vectorised
    bisection (:func:`allocation.allocate_shares_many`): a 1000-device round in tens of
    milliseconds instead of a root-finding per cluster and phase.
    """
    groups = [np.asarray(sorted(c), dtype=int) for c in clusters if len(c)]
    if allocator is not allocate_shares:
        return SplitRoundPlan(tuple(plan_cluster(problem, group, allocator) for group in groups))
    model_down = allocate_shares_many(problem.downlink, groups, problem.model_bits)
    uplink = allocate_shares_many(problem.uplink, groups, problem.uplink_bits, lead=problem.forward_s)
    downlink = allocate_shares_many(problem.downlink, groups, problem.downlink_bits, tail=problem.backward_s)
    model_up = allocate_shares_many(problem.uplink, groups, problem.model_bits)
    return SplitRoundPlan(
        tuple(
            ClusterPlan(
                devices=tuple(int(i) for i in group),
                model_down=model_down[k],
                uplink=uplink[k],
                server_s=problem.server_s(len(group)),
                downlink=downlink[k],
                model_up=model_up[k],
                iterations=problem.iterations,
            )
            for k, group in enumerate(groups)
        )
    )


@dataclass(frozen=True)
class FlRoundPlan:
    model_down: PhasePlan
    compute_s: np.ndarray  # I whole-model steps, per device
    model_up: PhasePlan

    @property
    def latency_s(self) -> float:
        return self.model_down.finish_s + self.model_up.finish_s


def plan_fl_round(
    costs: ModelCosts, state: FleetState, settings: TrainingSettings, allocator: Allocator = allocate_shares
) -> FlRoundPlan:
    """FedAvg: the whole model down to every device, I local steps, the whole model up.

    The upload phase carries each device's compute as its lead, so a fast device's
    upload overlaps a slow device's training.
    """
    devices = np.arange(state.size)
    bits = 8.0 * costs.full_model_bytes
    compute = settings.local_iterations * costs.full_step(settings.batch_size) / state.speed
    down = allocator(state.downlink, devices, bits)
    up = allocator(state.uplink, devices, bits, lead=compute)
    return FlRoundPlan(down, compute, up)
