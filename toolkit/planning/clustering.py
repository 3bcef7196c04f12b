"""Partitioning the devices into clusters to minimise a round's latency.

A round costs the sum over clusters of their turns, each with the optimal shares inside
(:mod:`latency`). Good clusters *mix* devices: a slow-computing device with a fast link
sends while a fast-computing device with a slow link is still busy, so their phases
overlap; grouping similar devices wastes that. This is a partition problem, and it is
solved here by construction plus local search:

1. **Demand tables.** For each phase, the share device n needs to finish by time t,
   x_n(t), is tabulated once on a log-spaced grid of t. A cluster's phase time is where
   the sum of its members' rows falls to 1, so evaluating a candidate cluster costs one
   vector sum instead of a root-finding, and thousands of candidates are evaluated at
   once with numpy.
2. **Greedy construction.** Devices in order of their solo iteration time (slowest
   first), each into the cluster where it adds the least latency.
3. **Local search.** Moving one device, or swapping two, while any move shortens the
   round (swap partners sampled for large fleets), up to a time budget.
4. **Exact polish.** For tiny fleets (up to 6 devices) the same moves again, every
   cluster evaluated exactly (:func:`latency.cluster_latency`), so the result is a local
   optimum of the true objective, not of the tables. Without it the search is already
   within 0.04% of the optimum on the oracle's instances (tests/test_clustering.py).

:func:`optimal_partition` enumerates every admissible partition by dynamic programming
over subsets (3^N work): the test oracle for N <= 8, and usable up to N ~ 12.

The number of clusters: merging two clusters never lengthens a round in this latency
model (docs/latency-model.md, "Fewer clusters never lose"), so what bounds it from below
is the largest cluster the server and the access point can serve in parallel
(``max_cluster_size``) and, from the user, ``min_clusters`` -- the number of sequential
model hand-overs per round, which is a convergence knob rather than a latency one. Within
the bounds the search chooses the count by leaving cluster slots empty.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.errors import UserError
from toolkit.planning.latency import SplitProblem, cluster_latency
from toolkit.planning.rates import RateModel

GRID_POINTS = 32
HUGE_SHARE = 1e6
FULL_SWAP_LIMIT = 64  # up to this many devices every swap partner is tried
SAMPLED_SWAPS = 48
PASS_GAIN_TO_CONTINUE = 1e-3  # stop after a pass that shortened the round by less than 0.1%
EXACT_POLISH_LIMIT = 6  # exact evaluations cost ~1.4 ms per cluster: only for tiny fleets
MULTI_START_LIMIT = 16  # up to this many devices, two random starts besides the greedy one


@dataclass(frozen=True)
class ClusterBounds:
    """Admissible partitions: at most ``max_cluster_size`` devices per cluster and between
    ``min_clusters`` and ``max_clusters`` clusters."""

    max_cluster_size: int | None = None
    min_clusters: int = 1
    max_clusters: int | None = None

    def resolve(self, devices: int) -> tuple[int, int, int]:
        """(cap, fewest clusters, most clusters) for this many devices; UserError if empty."""
        cap = min(self.max_cluster_size or devices, devices)
        if cap < 1:
            raise UserError("max cluster size must be at least 1")
        low = max(self.min_clusters, math.ceil(devices / cap))
        high = min(self.max_clusters or devices, devices)
        if low > high:
            raise UserError(
                f"no partition of {devices} devices has between {self.min_clusters} and {self.max_clusters} clusters "
                f"of at most {cap} devices"
            )
        return cap, low, high

    @classmethod
    def exactly(cls, clusters: int) -> ClusterBounds:
        return cls(min_clusters=clusters, max_clusters=clusters)


@dataclass
class _Phase:
    grid: np.ndarray  # (G,) finish times, seconds
    demand: np.ndarray  # (N, G) share each device needs to finish by grid[g]
    weight: float  # how often the phase runs per turn


def _phase_table(rates: RateModel, bits: float, busy: np.ndarray, cap: int, weight: float) -> _Phase | None:
    if bits <= 0:
        return None
    devices = np.arange(len(busy))
    solo = busy + bits / rates.capacity_bps(devices)
    crowded = busy + bits / rates.rate_bps(np.full(len(busy), 1.0 / cap), devices)
    low, high = float(solo.min()), float(crowded.max())
    grid = np.geomspace(low * (1 - 1e-9), max(high, low * 1.0001) * (1 + 1e-9), GRID_POINTS)
    seconds = grid[None, :] - busy[:, None]
    bits_grid = np.full(seconds.shape, bits)
    demand = rates.share_for(bits_grid, seconds, np.broadcast_to(devices[:, None], seconds.shape))
    demand = np.minimum(np.nan_to_num(demand, nan=HUGE_SHARE, posinf=HUGE_SHARE), HUGE_SHARE)
    return _Phase(grid, demand, weight)


class _TableModel:
    """Approximate cluster latency from summed demand rows; vectorised over candidates.

    ``demand`` stacks the phases: (N, P, G). A candidate cluster is its summed rows
    (..., P, G); its phase times are where each row falls to 1.
    """

    def __init__(self, problem: SplitProblem, cap: int):
        zeros = np.zeros(problem.size)
        iterations = problem.iterations
        tables = [
            _phase_table(problem.uplink, problem.uplink_bits, problem.forward_s, cap, iterations),
            _phase_table(problem.downlink, problem.downlink_bits, problem.backward_s, cap, iterations),
            _phase_table(problem.downlink, problem.model_bits, zeros, cap, 1.0),
            _phase_table(problem.uplink, problem.model_bits, zeros, cap, 1.0),
        ]
        phases = [table for table in tables if table is not None]
        self.log_grid = np.log(np.stack([phase.grid for phase in phases]))  # (P, G)
        self.demand = np.stack([phase.demand for phase in phases], axis=1)  # (N, P, G)
        self.weights = np.array([phase.weight for phase in phases])
        self.phases = len(phases)
        server = problem.server
        self.server_fixed = iterations * server.fixed_s
        self.server_per_device = iterations * server.per_sample_s * problem.batch_size
        self._row_cache = np.arange(0)
        self._phase_cache = np.arange(0)

    def cost(self, sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Latency of each candidate cluster given its summed demand (..., P, G) and size."""
        points = sums.shape[-1]
        flat = sums.reshape(-1, points)
        rows = self._rows(len(flat))
        above = np.count_nonzero(flat > 1.0 + 1e-12, axis=1)  # rows decrease along the grid
        first = np.minimum(above, points - 1)
        before = np.maximum(first - 1, 0)
        s_hi, s_lo = flat[rows, before], flat[rows, first]
        gap = s_hi - s_lo
        fraction = (s_hi - 1.0) / np.where(gap > 0, gap, 1.0)
        fraction = np.minimum(np.maximum(fraction, 0.0), 1.0)
        fraction[(first == 0) | (gap <= 0)] = 1.0
        phase = self._phase_of(len(flat))
        low_t = self.log_grid[phase, before]
        times = np.exp(low_t + fraction * (self.log_grid[phase, first] - low_t)).reshape(sums.shape[:-1])
        total = times @ self.weights + self.server_fixed + self.server_per_device * sizes
        total[sizes <= 0] = 0.0
        return total

    def _rows(self, count: int) -> np.ndarray:
        if count > len(self._row_cache):
            self._row_cache = np.arange(max(count, 2 * len(self._row_cache)))
        return self._row_cache[:count]

    def _phase_of(self, count: int) -> np.ndarray:
        if count > len(self._phase_cache):
            self._phase_cache = np.tile(np.arange(self.phases), max(count, 2 * len(self._phase_cache)) // self.phases)
        return self._phase_cache[:count]


@dataclass
class _Search:
    model: _TableModel
    assignment: np.ndarray  # cluster slot of every device
    sums: np.ndarray  # (K, P, G)
    sizes: np.ndarray
    costs: np.ndarray
    cap: int
    fewest: int

    @classmethod
    def empty(cls, model: _TableModel, devices: int, slots: int, cap: int, fewest: int) -> _Search:
        sums = np.zeros((slots, *model.demand.shape[1:]))
        return cls(model, np.full(devices, -1), sums, np.zeros(slots, dtype=int), np.zeros(slots), cap, fewest)

    def add(self, device: int, slot: int, cost: float | None = None) -> None:
        """Put ``device`` into ``slot``; ``cost`` is the slot's new latency if already known."""
        self.sums[slot] += self.model.demand[device]
        self.sizes[slot] += 1
        self.assignment[device] = slot
        self._refresh(slot, cost)

    def remove(self, device: int, cost: float | None = None) -> None:
        slot = int(self.assignment[device])
        self.sums[slot] -= self.model.demand[device]
        self.sizes[slot] -= 1
        self.assignment[device] = -1
        if self.sizes[slot] == 0:
            self.sums[slot] = 0.0
        self._refresh(slot, 0.0 if self.sizes[slot] == 0 else cost)

    def _refresh(self, slot: int, cost: float | None = None) -> None:
        if cost is None:
            cost = self.model.cost(self.sums[slot : slot + 1], self.sizes[slot : slot + 1])[0]
        self.costs[slot] = cost

    def nonempty(self) -> int:
        return int((self.sizes > 0).sum())

    def clusters(self) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for device, slot in enumerate(self.assignment):
            groups.setdefault(int(slot), []).append(device)
        return [groups[slot] for slot in sorted(groups)]


def _solo_iteration(problem: SplitProblem) -> np.ndarray:
    devices = np.arange(problem.size)
    return (
        problem.forward_s
        + problem.uplink_bits / problem.uplink.capacity_bps(devices)
        + problem.downlink_bits / problem.downlink.capacity_bps(devices)
        + problem.backward_s
    )


def _greedy(search: _Search, order: np.ndarray) -> None:
    model = search.model
    remaining = len(order)
    for device in order:
        open_slots = search.sizes < search.cap
        empties_needed = search.fewest - search.nonempty()
        if empties_needed >= remaining:
            open_slots &= search.sizes == 0
        marginal = model.cost(search.sums + model.demand[device], search.sizes + 1) - search.costs
        marginal = np.where(open_slots, marginal, np.inf)
        search.add(int(device), int(np.argmin(marginal)))
        remaining -= 1


def _improve_once(search: _Search, device: int, rng: np.random.Generator) -> bool:
    """The best move or swap of ``device``, applied if it shortens the round.

    Every candidate -- the source cluster without the device, each target cluster with
    it, and both sides of each swap -- is evaluated in one vectorised cost call.
    """
    model, demand = search.model, search.model.demand
    source = int(search.assignment[device])
    without = search.sums[source] - demand[device]  # the source cluster without the device

    may_leave = search.sizes[source] > 1 or search.nonempty() > search.fewest
    targets = np.zeros(0, dtype=int)
    if may_leave:
        admissible = (search.sizes < search.cap) & (np.arange(len(search.sizes)) != source)
        empty = np.flatnonzero(search.sizes == 0)
        if len(empty) > 1:  # empty slots are all alike: try one
            admissible[empty[1:]] = False
        targets = np.flatnonzero(admissible)
    others = np.flatnonzero(search.assignment != source)
    if len(others) > FULL_SWAP_LIMIT:
        others = rng.choice(others, size=SAMPLED_SWAPS, replace=False)
    partner_slots = search.assignment[others]

    candidates = np.concatenate(
        [
            without[None],
            search.sums[targets] + demand[device],
            without[None] + demand[others],
            search.sums[partner_slots] - demand[others] + demand[device][None],
        ]
    )
    sizes = np.concatenate(
        [
            [search.sizes[source] - 1],
            search.sizes[targets] + 1,
            np.full(len(others), search.sizes[source]),
            search.sizes[partner_slots],
        ]
    )
    cost = model.cost(candidates, sizes)
    source_without = cost[0]
    move_target = cost[1 : 1 + len(targets)]
    swap_source = cost[1 + len(targets) : 1 + len(targets) + len(others)]
    swap_partner = cost[1 + len(targets) + len(others) :]

    threshold = -1e-9 * max(float(search.costs.sum()), 1e-12)
    best_delta, best_action = threshold, None
    if len(targets):
        delta = move_target - search.costs[targets] + source_without - search.costs[source]
        pick = int(np.argmin(delta))
        if delta[pick] < best_delta:
            best_delta, best_action = float(delta[pick]), ("move", pick)
    if len(others):
        delta = swap_source - search.costs[source] + swap_partner - search.costs[partner_slots]
        pick = int(np.argmin(delta))
        if delta[pick] < best_delta:
            best_delta, best_action = float(delta[pick]), ("swap", pick)
    if best_action is None:
        return False
    kind, pick = best_action
    if kind == "move":
        search.remove(device, float(source_without))
        search.add(device, int(targets[pick]), float(move_target[pick]))
    else:
        partner = int(others[pick])
        partner_slot = int(partner_slots[pick])
        search.remove(device)
        search.remove(partner)
        search.add(partner, source, float(swap_source[pick]))
        search.add(device, partner_slot, float(swap_partner[pick]))
    return True


def _local_search(search: _Search, rng: np.random.Generator, deadline: float, max_passes: int) -> None:
    devices = len(search.assignment)
    for _ in range(max_passes):
        before = float(search.costs.sum())
        improved = False
        for device in rng.permutation(devices):
            improved |= _improve_once(search, int(device), rng)
            if time.perf_counter() > deadline:
                return
        # another pass is worth its time only after a pass that still moved the round
        if not improved or float(search.costs.sum()) > before * (1 - PASS_GAIN_TO_CONTINUE):
            return


def _exact_polish(problem: SplitProblem, clusters: list[list[int]], cap: int, fewest: int) -> list[list[int]]:
    """Moves and swaps under the exact objective until none helps (small fleets only)."""
    cache: dict[frozenset[int], float] = {}

    def cost(members) -> float:
        key = frozenset(members)
        if key not in cache:
            cache[key] = cluster_latency(problem, sorted(key)) if key else 0.0
        return cache[key]

    groups = [set(group) for group in clusters]
    improved = True
    while improved:
        improved = False
        current = [cost(g) for g in groups]
        best = (-1e-12 * sum(current), None)
        for a, group_a in enumerate(groups):
            for device in group_a:
                for b in range(len(groups) + 1):
                    if b == a:
                        continue
                    group_b = groups[b] if b < len(groups) else set()
                    if b == len(groups) and len(groups) >= problem.size:
                        continue
                    # move
                    if len(group_b) < cap and (len(group_a) > 1 or len(groups) > fewest):
                        delta = cost(group_a - {device}) + cost(group_b | {device}) - current[a]
                        delta -= current[b] if b < len(groups) else 0.0
                        if delta < best[0]:
                            best = (delta, ("move", device, a, b))
                    # swap
                    for partner in group_b:
                        delta = (
                            cost(group_a - {device} | {partner})
                            + cost(group_b - {partner} | {device})
                            - current[a]
                            - current[b]
                        )
                        if delta < best[0]:
                            best = (delta, ("swap", device, a, b, partner))
        if best[1] is not None:
            improved = True
            action = best[1]
            if action[0] == "move":
                _, device, a, b = action
                if b == len(groups):
                    groups.append(set())
                groups[a].discard(device)
                groups[b].add(device)
            else:
                _, device, a, b, partner = action
                groups[a].discard(device)
                groups[a].add(partner)
                groups[b].discard(partner)
                groups[b].add(device)
            groups = [g for g in groups if g]
    return [sorted(g) for g in groups]


def round_latency(problem: SplitProblem, clusters: Sequence[Sequence[int]]) -> float:
    """Exact round latency of a partition with optimal shares in every cluster."""
    return float(sum(cluster_latency(problem, cluster) for cluster in clusters))


def cluster_devices(
    problem: SplitProblem,
    bounds: ClusterBounds | None = None,
    *,
    seed: int = 0,
    time_budget_s: float | None = None,
    max_passes: int = 2,
) -> list[list[int]]:
    """A partition of ``range(problem.size)`` that makes the round short (module docstring)."""
    bounds = bounds or ClusterBounds()
    devices = problem.size
    if devices == 0:
        return []
    cap, fewest, most = bounds.resolve(devices)
    slots = min(most, fewest + math.ceil(fewest / 4) + 1)
    model = _TableModel(problem, cap)
    rng = np.random.default_rng(seed)
    deadline = time.perf_counter() + (time_budget_s if time_budget_s is not None else math.inf)

    starts = [np.argsort(-_solo_iteration(problem), kind="stable")]
    if devices <= MULTI_START_LIMIT:
        starts += [rng.permutation(devices) for _ in range(2)]
    best: tuple[float, list[list[int]]] | None = None
    for order in starts:
        search = _Search.empty(model, devices, slots, cap, fewest)
        _greedy(search, order)
        _local_search(search, rng, deadline, max_passes)
        clusters = search.clusters()
        if devices <= EXACT_POLISH_LIMIT:
            clusters = _exact_polish(problem, clusters, cap, fewest)
            score = round_latency(problem, clusters)
        else:
            score = float(search.costs.sum())  # the tables' estimate, within ~0.1% of exact
        if best is None or score < best[0]:
            best = (score, clusters)
        if time.perf_counter() > deadline:
            break
    assert best is not None
    return best[1]


def optimal_partition(problem: SplitProblem, bounds: ClusterBounds | None = None) -> tuple[float, list[list[int]]]:
    """Every admissible partition, by DP over subsets: best[mask][k] = min over the cluster S
    holding mask's lowest device of cost(S) + best[mask - S][k - 1]. O(3^N); N <= 12."""
    devices = problem.size
    if devices > 12:
        raise ValueError("exhaustive partitioning is limited to 12 devices")
    cap, fewest, most = (bounds or ClusterBounds()).resolve(devices)
    full = (1 << devices) - 1
    members = [[i for i in range(devices) if mask >> i & 1] for mask in range(full + 1)]
    cost = [0.0] + [
        cluster_latency(problem, members[mask]) if len(members[mask]) <= cap else math.inf
        for mask in range(1, full + 1)
    ]
    best: dict[tuple[int, int], tuple[float, int]] = {(0, 0): (0.0, 0)}

    def solve(mask: int, count: int) -> float:
        if (mask, count) in best:
            return best[(mask, count)][0]
        if mask == 0 or count == 0:
            return math.inf
        low = mask & -mask
        rest = mask ^ low
        choice, value = 0, math.inf
        sub = rest
        while True:
            cluster = sub | low
            if cost[cluster] < math.inf:
                candidate = cost[cluster] + solve(mask ^ cluster, count - 1)
                if candidate < value:
                    value, choice = candidate, cluster
            if sub == 0:
                break
            sub = (sub - 1) & rest
        best[(mask, count)] = (value, choice)
        return value

    value, count = min((solve(full, k), k) for k in range(fewest, most + 1))
    clusters, mask = [], full
    while mask:
        cluster = best[(mask, count)][1]
        clusters.append(members[cluster])
        mask ^= cluster
        count -= 1
    return value, clusters
