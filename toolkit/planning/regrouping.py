"""The partition of a fleet into a fixed number of clusters whose summed turn is least.

The live scheduler's clustering scores partitions with the latency model's barrier
iteration; the turn it then plans (flow plan, slots where they pay) is what runs, and it is
not a sum over devices, so the best partition under it is searched for with the turn
itself as the cost (docs/latency-model.md, "Regrouping by the turn plan"). Clusters run one
after another, so a partition's cost is the sum of its clusters' costs.

Two searches, both pure functions of a cost on groups (sorted tuples of device rows):

- :func:`exact_partition`: every admissible partition, by dynamic programming over the set
  of devices left (each group holds the lowest device left, so every partition is met once);
  for fleets whose admissible groups are few enough to score them all (8 devices in 2
  clusters: at most 254 groups), it returns the best partition there is.
- :func:`local_search`: moves of one device to another cluster and swaps of two while the sum
  shrinks, from several starts; for larger fleets, where it may end at a local minimum.

Both stop when ``out_of_time`` says so; an exact search out of time gives way to the local
one, with a budget of its own, which reuses the groups already scored (the caller's cost
caches them).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence

Group = tuple[int, ...]
Cost = Callable[[Group], float]

REGROUP_STARTS = 32  # the most sorted-by-compute partitions the local search starts from
EXACT_GROUP_LIMIT = 600  # the most distinct groups the exact search may score (~2 ms each)
EXACT_DEVICE_LIMIT = 16  # the dynamic programme's states are subsets of the devices


class _OutOfTimeError(Exception):
    pass


def size_patterns(devices: int, clusters: int, cap: int, limit: int) -> list[tuple[int, ...]]:
    """Cluster sizes (fastest cluster first) that fit the cap, each cluster at least one
    device: all of them when there are at most ``limit``, else ``limit`` of them spread evenly
    over the lexicographic order (the balanced pattern always among them)."""
    patterns: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...], left: int) -> None:
        if len(patterns) > 4096:  # enough to sample from
            return
        slots = clusters - len(prefix)
        if slots == 0:
            if left == 0:
                patterns.append(prefix)
            return
        for size in range(max(1, left - cap * (slots - 1)), min(cap, left - (slots - 1)) + 1):
            extend((*prefix, size), left - size)

    extend((), devices)
    base, extra = divmod(devices, clusters)
    balanced = tuple(base + (1 if k < extra else 0) for k in range(clusters))
    if len(patterns) > limit:
        step = len(patterns) / limit
        patterns = [patterns[int(k * step)] for k in range(limit)]
    if balanced not in patterns and max(balanced) <= cap:  # the sample's last gives way to it
        patterns = [*patterns[: limit - 1], balanced]
    return patterns


def _sizes(members: int, clusters: int, cap: int) -> range:
    """Sizes the next group may take so that ``clusters - 1`` groups of 1..cap hold the rest."""
    return range(max(1, members - cap * (clusters - 1)), min(cap, members - (clusters - 1)) + 1)


def exact_group_count(devices: int, clusters: int, cap: int) -> int:
    """How many distinct groups the exact search may score: every size some admissible
    partition uses, of every subset of the devices."""
    sizes = {s for s in range(1, cap + 1) if clusters - 1 <= devices - s <= cap * (clusters - 1)}
    return sum(math.comb(devices, s) for s in sizes)


def exact_partition(
    devices: int, clusters: int, cap: int, cost: Cost, out_of_time: Callable[[], bool]
) -> tuple[list[list[int]], float] | None:
    """The least-cost partition of ``range(devices)`` into exactly ``clusters`` nonempty groups
    of at most ``cap``; None when none exists, the fleet is too large to enumerate
    (:data:`EXACT_GROUP_LIMIT`, :data:`EXACT_DEVICE_LIMIT`), or time ran out."""
    if not 1 <= clusters <= devices or cap * clusters < devices or devices > EXACT_DEVICE_LIMIT:
        return None
    if exact_group_count(devices, clusters, cap) > EXACT_GROUP_LIMIT:
        return None
    memo: dict[tuple[int, int], tuple[float, tuple[Group, ...]]] = {}

    def best(left: tuple[int, ...], count: int) -> tuple[float, tuple[Group, ...]]:
        if count == 0:
            return (0.0, ()) if not left else (math.inf, ())
        key = (sum(1 << d for d in left), count)
        if key in memo:
            return memo[key]
        first, rest = left[0], left[1:]
        found: tuple[float, tuple[Group, ...]] = (math.inf, ())
        for size in _sizes(len(left), count, cap):
            for others in itertools.combinations(rest, size - 1):
                if out_of_time():
                    raise _OutOfTimeError
                group = (first, *others)
                taken = set(others)
                below, groups = best(tuple(d for d in rest if d not in taken), count - 1)
                total = cost(group) + below
                if total < found[0]:
                    found = (total, (group, *groups))
        memo[key] = found
        return found

    try:
        total, groups = best(tuple(range(devices)), clusters)
    except _OutOfTimeError:
        return None
    if not math.isfinite(total):
        return None
    return [list(g) for g in groups], total


def least_cover_cost(
    devices: int, cap: int, cost: Cost, out_of_time: Callable[[], bool], device_limit: int = 14
) -> float | None:
    """The least cost of a partition of ``range(devices)`` into any number of groups of at
    most ``cap``: a dynamic programme over every subset of the devices (the group holding a
    subset's lowest device is tried in every way), about 3^N / 2 steps; None beyond
    ``device_limit`` devices or when time runs out. Fewer constraints than
    :func:`exact_partition` (any number of clusters), so it is what a lower bound needs:
    the least over a superset of the admissible partitions is no more than theirs."""
    if devices == 0:
        return 0.0
    if devices > device_limit or cap < 1:
        return None
    least = [math.inf] * (1 << devices)
    least[0] = 0.0
    scored: dict[int, float] = {}
    for mask in range(1, 1 << devices):
        if mask & 0xFF == 1 and out_of_time():  # from the first set on, every 256
            return None
        low = mask & -mask
        rest = mask ^ low
        best, sub = math.inf, rest
        while True:
            group = sub | low
            if group.bit_count() <= cap:
                if group not in scored:
                    scored[group] = cost(tuple(d for d in range(devices) if group >> d & 1))
                best = min(best, scored[group] + least[mask ^ group])
            if sub == 0:
                break
            sub = (sub - 1) & rest
        least[mask] = best
    return least[-1]


def local_search(
    partition: Sequence[Sequence[int]], cap: int, cost: Cost, out_of_time: Callable[[], bool]
) -> tuple[list[list[int]], float, int]:
    """From ``partition``, the best move of one device between two clusters (or swap of two)
    while the sum shrinks: (the partition it ends at, its cost, the moves made)."""

    def score(group: Sequence[int]) -> float:
        return cost(tuple(sorted(group)))

    groups = [sorted(group) for group in partition]
    total, moves, improved = sum(score(g) for g in groups), 0, True
    while improved and not out_of_time():
        improved = False
        for a, b in itertools.permutations(range(len(groups)), 2):
            left_now, right_now = groups[a], groups[b]
            candidates = []
            if len(left_now) > 1 and len(right_now) < cap:  # one device from a to b
                candidates += [([x for x in left_now if x != d], [*right_now, d]) for d in left_now]
            if a < b:  # one device of a for one of b
                candidates += [
                    ([x for x in left_now if x != d] + [e], [x for x in right_now if x != e] + [d])
                    for d in left_now
                    for e in right_now
                ]
            if not candidates:
                continue
            left, right = min(candidates, key=lambda c: score(c[0]) + score(c[1]))
            gain = score(left_now) + score(right_now) - score(left) - score(right)
            if gain > 1e-9 * total:  # the best move between these two clusters
                groups[a], groups[b] = sorted(left), sorted(right)
                total, moves, improved = total - gain, moves + 1, True
            if out_of_time():
                break
    return groups, total, moves


def regroup(
    groups: Sequence[Sequence[int]],
    by_compute: Sequence[int],
    cap: int,
    cost: Cost,
    budget_s: float,
) -> tuple[list[list[int]], dict]:
    """The least-cost partition into as many clusters as ``groups`` has, at most ``cap`` each:
    exact where the fleet is small enough (:func:`exact_partition`), else a local search from
    ``groups`` and from ``by_compute`` (the devices, fastest first) cut into as many clusters
    in every admissible size pattern (up to :data:`REGROUP_STARTS`), the best end kept; never
    worse than ``groups``. Each search within ``budget_s`` seconds, so about twice that at most."""
    started = clock = time.perf_counter()

    def out_of_time() -> bool:
        return time.perf_counter() - clock > budget_s

    start = [sorted(g) for g in groups if g]
    count, devices = len(start), sum(len(g) for g in start)
    before = sum(cost(tuple(g)) for g in start)
    best, best_s, best_moves, tried, search = start, before, 0, 0, "local"
    exact = exact_partition(devices, count, cap, cost, out_of_time)
    if exact is not None:
        search = "exact"
        if exact[1] < best_s * (1 - 1e-12):
            best, best_s = exact
    else:
        clock = time.perf_counter()
        starts = [start]
        for sizes in size_patterns(devices, count, cap, REGROUP_STARTS):
            edges = list(itertools.accumulate(sizes, initial=0))
            starts.append([sorted(by_compute[edges[k] : edges[k + 1]]) for k in range(count)])
        for partition in starts:
            if out_of_time() and tried:
                break
            found, total, moves = local_search(partition, cap, cost, out_of_time)
            tried += 1
            if total < best_s * (1 - 1e-12):
                best, best_s, best_moves = found, total, moves
    return [sorted(group) for group in best if group], {
        "search": search,
        "clustering_s": before,
        "regrouped_s": best_s,
        "moves": best_moves,
        "starts": tried,
        "seconds": time.perf_counter() - started,
    }
