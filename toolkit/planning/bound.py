"""How short a split round could possibly be: a lower bound, and how close a round came to it.

A round of split learning at cut l moves fixed work whatever the plan: every device runs
I iterations (forward, smashed data up, the server's step, gradient down, backward) and
its device-side model goes down and back up once. No clustering, order or slot plan can
beat any of three limits (docs/latency-model.md, "The distance to the limit"):

- **the medium**: the round's bits must cross it. With the whole medium at their
  disposal for the whole round, each device's bits need a share of it; by concavity of
  every rate law in the share (Jensen), no schedule moves ``b_n`` bits in T seconds with a
  time-averaged share below what the min-max allocation of the round's totals gives, so
  that allocation's finish time is a bound. On Wi-Fi the uplink and the downlink are one
  air (the access point contends like a station), so their bounds add; on a wired link
  they are separate wires, and the longer one binds;
- **the slowest chain**: a device's own iterations are a chain nobody can overlap: its
  model down, I times (forward, its upload alone on the medium, the server's step on its
  batch alone, its gradient alone, backward), its model up;
- **the server**: its steps are sequential; with an affine step time ``a + c k``, all
  clusters' steps together take at least one step on every sample, ``I (a + c N B)``.

Those three hold for any schedule of the round's work. CPSL's own structure gives a fourth,
tighter one, **the clusters** (when the cluster bounds are given and the fleet is small
enough to try every partition): its clusters take turns, one after another (the next one
starts from the device-side model the last one returned), and within a turn every
iteration is synchronous (the server steps on the whole cluster's smashed data, and no
member's gradient can leave before the step, no next upload arrive after it). So a turn of
cluster C lasts at least its own transfers with the medium to themselves plus its I server
steps, during which neither the air nor its members' next work can move, and at least its
slowest member's chain with the cluster's step; a round at least the least sum of such
turns over every partition into clusters of at most ``cap`` (any number of them, so fewer
constraints than the user's bounds: still a bound), found exactly by
:func:`toolkit.planning.regrouping.least_cover_cost` for up to 14 devices. It knows nothing
of the plan: the partition, order and slots that meet it are left open.

``efficiency = bound / measured`` says what fraction of the round was unavoidable. It is
1 only where one limit is met exactly, so 0.8 is good; a scheme that leaves the medium idle
while devices compute (or the reverse) shows it as a lower figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from toolkit.planning.allocation import allocate_shares
from toolkit.planning.latency import SplitProblem
from toolkit.planning.regrouping import least_cover_cost


@dataclass(frozen=True)
class RoundBound:
    medium_s: float  # the round's transfers with the medium to themselves
    chain_s: float  # the slowest device's own chain of iterations
    server_s: float  # every server step back to back, as one cluster
    chain_device: int  # which device's chain is the slowest (index into the problem's devices)
    clusters_s: float | None = None  # CPSL's turns one after another, the best partition; None: not tried

    @property
    def any_schedule_s(self) -> float:
        """The bound that holds for any schedule of the round's work, clusters or none."""
        return max(self.medium_s, self.chain_s, self.server_s)

    @property
    def bound_s(self) -> float:
        return max(self.any_schedule_s, self.clusters_s or 0.0)

    @property
    def binding(self) -> str:
        """Which limit the bound is: ``medium``, ``chain``, ``server`` or ``clusters``."""
        terms = {"medium": self.medium_s, "chain": self.chain_s, "server": self.server_s}
        if self.clusters_s is not None:
            terms["clusters"] = self.clusters_s
        return max(terms, key=terms.__getitem__)

    def to_dict(self) -> dict:
        return {
            "bound_s": self.bound_s,
            "binding": self.binding,
            "medium_s": self.medium_s,
            "chain_s": self.chain_s,
            "server_s": self.server_s,
            "clusters_s": self.clusters_s,
            "any_schedule_s": self.any_schedule_s,
        }


def round_bound(problem: SplitProblem, one_air: bool, cap: int | None = None) -> RoundBound:
    """The lower bound of a split round over all of ``problem``'s devices.

    ``one_air``: uplink and downlink share one medium's time (Wi-Fi); otherwise they are
    separate directions of a wire and overlap. ``cap``: the most devices in one of CPSL's
    clusters, for the clusters' bound; None leaves it out.
    """
    count = problem.size
    if count == 0:
        return RoundBound(0.0, 0.0, 0.0, -1)
    devices = np.arange(count)
    medium_s = _air_s(problem, devices, one_air)
    chains = _chains(problem, devices, problem.server_s(1))
    slowest = int(np.argmax(chains))
    server_s = problem.iterations * problem.server_s(count)
    clusters_s = clusters_bound(problem, one_air, cap) if cap is not None else None
    return RoundBound(float(medium_s), float(chains[slowest]), float(server_s), slowest, clusters_s)


def _air_s(problem: SplitProblem, rows: np.ndarray, one_air: bool) -> float:
    """The medium's limit for ``rows``' transfers of a round (their I uploads and gradients
    and their model both ways): each direction's min-max allocation of its totals, added on
    one air, the longer of the two on a wire. On an air-time medium (linear rates) a
    direction's allocation finishes at ``sum(bits / capacity)``, the shares summing to 1."""
    iterations = problem.iterations
    finish = []
    for rates, bits in (
        (problem.uplink, iterations * problem.uplink_bits + problem.model_bits),
        (problem.downlink, iterations * problem.downlink_bits + problem.model_bits),
    ):
        if rates.is_linear():
            finish.append(float(np.sum(bits / rates.capacity_bps(rows))))
        else:
            finish.append(allocate_shares(rates, rows, bits).finish_s)
    return finish[0] + finish[1] if one_air else max(finish)


def _chains(problem: SplitProblem, rows: np.ndarray, step_s: float) -> np.ndarray:
    """Each of ``rows``' own chain (nothing overlaps it): its model down, I times (forward,
    its upload alone, a server step of ``step_s``, its gradient alone, backward), its model up."""
    solo_up = problem.uplink.capacity_bps(rows)
    solo_down = problem.downlink.capacity_bps(rows)
    per_iteration = (
        problem.forward_s[rows]
        + problem.uplink_bits / solo_up
        + step_s
        + problem.downlink_bits / solo_down
        + problem.backward_s[rows]
    )
    return problem.model_bits / solo_down + problem.iterations * per_iteration + problem.model_bits / solo_up


def turn_bound(problem: SplitProblem, group: tuple[int, ...], one_air: bool) -> float:
    """The shortest one cluster's turn could be (module docstring, "the clusters")."""
    rows = np.asarray(group)
    step_s = problem.server_s(len(rows))
    air_s = _air_s(problem, rows, one_air)
    return float(max(air_s + problem.iterations * step_s, _chains(problem, rows, step_s).max()))


def clusters_bound(problem: SplitProblem, one_air: bool, cap: int, budget_s: float = 1.0) -> float | None:
    """The least sum of :func:`turn_bound` over every partition into clusters of at most
    ``cap`` (any number of them: a superset of what the user's bounds admit, so still a
    bound); None for more than 14 devices or when ``budget_s`` runs out, since a bound from
    part of the partitions would not be one."""
    started = time.perf_counter()
    return least_cover_cost(
        problem.size,
        cap,
        lambda group: turn_bound(problem, group, one_air),
        lambda: time.perf_counter() - started > budget_s,
    )


def efficiency(bound_s: float | None, measured_s: float | None) -> float | None:
    """``bound / measured``, or None when either is missing or the round took no time."""
    if bound_s is None or not measured_s or measured_s <= 0:
        return None
    return bound_s / measured_s
