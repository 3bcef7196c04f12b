"""The regrouping's searches against brute force, on costs that are not sums over devices."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tests.partitions import every_partition
from toolkit.planning.regrouping import (
    EXACT_GROUP_LIMIT,
    exact_group_count,
    exact_partition,
    local_search,
    regroup,
    size_patterns,
)


def turn_like_cost(seed: int, devices: int):
    """A cluster's cost as a turn is: its slowest member's compute against the air its members
    share, with a fixed overhead; not separable, so a greedy order cannot be trusted."""
    rng = np.random.default_rng(seed)
    compute = rng.uniform(0.1, 2.0, devices)
    air = rng.uniform(0.02, 0.5, devices)
    scored: list[tuple[int, ...]] = []

    def cost(group: tuple[int, ...]) -> float:
        assert group == tuple(sorted(group)) and len(set(group)) == len(group)
        scored.append(group)
        rows = list(group)
        return 0.3 + max(compute[rows].max() + air[rows].min(), air[rows].sum()) * (1 + 0.05 * len(rows))

    return cost, scored


def partitions(items: list[int], count: int, cap: int):
    """Every partition of ``items`` into ``count`` nonempty groups of at most ``cap``."""
    if count == 0:
        if not items:
            yield []
        return
    if not items:
        return
    first, rest = items[0], items[1:]
    for size in range(0, min(cap, len(rest) + 1)):
        for others in itertools.combinations(rest, size):
            group = (first, *others)
            left = [x for x in rest if x not in others]
            for tail in partitions(left, count - 1, cap):
                yield [group, *tail]


def brute_force(cost, devices: int, count: int, cap: int) -> float:
    return min(sum(cost(g) for g in p) for p in partitions(list(range(devices)), count, cap))


@pytest.mark.parametrize(
    ("devices", "count", "cap", "seed"),
    [(8, 2, 4, 0), (8, 2, 7, 1), (7, 3, 3, 2), (9, 3, 4, 3), (6, 2, 5, 4), (5, 5, 1, 5)],
)
def test_the_exact_search_finds_the_best_partition_there_is(devices, count, cap, seed):
    cost, _ = turn_like_cost(seed, devices)
    found = exact_partition(devices, count, cap, cost, lambda: False)
    assert found is not None
    groups, total = found
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(devices))
    assert len(groups) == count and all(1 <= len(g) <= cap for g in groups)
    assert total == pytest.approx(sum(cost(tuple(g)) for g in groups), rel=1e-12)
    assert total == pytest.approx(brute_force(cost, devices, count, cap), rel=1e-12)


def test_the_exact_search_scores_each_group_at_most_once_through_a_cache():
    cost, scored = turn_like_cost(7, 8)
    cache: dict[tuple[int, ...], float] = {}

    def cached(group):
        if group not in cache:
            cache[group] = cost(group)
        return cache[group]

    exact_partition(8, 2, 7, cached, lambda: False)
    assert len(scored) == len(set(scored)) <= exact_group_count(8, 2, 7) == 254
    assert exact_group_count(8, 2, 4) == math.comb(8, 4)


def test_no_exact_answer_where_none_exists_or_it_is_too_large_or_time_runs_out():
    cost, _ = turn_like_cost(0, 20)
    assert exact_partition(8, 2, 3, cost, lambda: False) is None  # 2 clusters of 3 cannot hold 8
    assert exact_partition(3, 4, 3, cost, lambda: False) is None
    assert exact_group_count(20, 4, 5) > EXACT_GROUP_LIMIT
    assert exact_partition(20, 4, 5, cost, lambda: False) is None
    assert exact_partition(8, 2, 4, cost, lambda: True) is None


def test_the_local_search_never_ends_worse_than_it_started_and_keeps_the_bounds():
    cost, _ = turn_like_cost(11, 12)
    start = [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    groups, total, moves = local_search(start, 5, cost, lambda: False)
    assert total < sum(cost(tuple(g)) for g in start)
    assert total == pytest.approx(sum(cost(tuple(g)) for g in groups), rel=1e-9)
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(12))
    assert all(1 <= len(g) <= 5 for g in groups) and moves > 0


def test_regroup_is_exact_on_a_small_fleet_and_local_on_a_large_one():
    cost, _ = turn_like_cost(3, 8)
    start = [[0, 2, 4, 6], [1, 3, 5, 7]]
    groups, info = regroup(start, list(range(8)), 7, cost, budget_s=10.0)
    assert info["search"] == "exact"
    assert info["regrouped_s"] == pytest.approx(brute_force(cost, 8, 2, 7), rel=1e-12)
    assert info["regrouped_s"] <= info["clustering_s"]
    big, _ = turn_like_cost(3, 24)
    start = [list(range(k, 24, 4)) for k in range(4)]
    groups, info = regroup(start, list(range(24)), 8, big, budget_s=10.0)
    assert info["search"] == "local" and info["starts"] > 1
    assert info["regrouped_s"] <= info["clustering_s"]
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(24)) and len(groups) == 4


def test_an_exact_search_out_of_time_leaves_the_clustering_s_partition_or_better():
    cost, _ = turn_like_cost(5, 8)
    start = [[0, 1, 2, 3], [4, 5, 6, 7]]
    groups, info = regroup(start, list(range(8)), 4, cost, budget_s=0.0)
    assert info["search"] == "local"
    assert info["regrouped_s"] <= info["clustering_s"]
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(8))


def test_size_patterns_fit_the_cap_and_keep_the_balanced_one():
    assert size_patterns(8, 2, 4, 32) == [(4, 4)]
    assert size_patterns(8, 2, 7, 32) == [(1, 7), (2, 6), (3, 5), (4, 4), (5, 3), (6, 2), (7, 1)]
    sampled = size_patterns(30, 6, 6, 5)
    assert len(sampled) == 5 and (5, 5, 5, 5, 5, 5) in sampled
    assert all(sum(p) == 30 and len(p) == 6 and max(p) <= 6 and min(p) >= 1 for p in sampled)


@pytest.mark.parametrize(("devices", "cap", "seed"), [(7, 3, 0), (8, 8, 1), (6, 1, 2), (8, 4, 3)])
def test_the_least_cover_is_the_least_partition_into_any_number_of_capped_groups(devices, cap, seed):
    from toolkit.planning.regrouping import least_cover_cost

    cost, _ = turn_like_cost(seed, devices)
    least = least_cover_cost(devices, cap, cost, lambda: False)
    brute = min(
        sum(cost(tuple(sorted(g))) for g in p) for p in every_partition(list(range(devices))) if max(map(len, p)) <= cap
    )
    assert least == pytest.approx(brute, rel=1e-12)
    assert least_cover_cost(devices, cap, cost, lambda: True) is None
    assert least_cover_cost(15, 3, cost, lambda: False) is None  # past the device limit
    assert least_cover_cost(0, 3, cost, lambda: False) == 0.0
