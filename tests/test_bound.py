"""The lower bound of a split round (toolkit/planning/bound.py): below every plan, tight where it should be."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from tests.partitions import every_partition as partitions
from toolkit.planning.allocation import allocate_shares, equal_shares
from toolkit.planning.bound import efficiency, round_bound, turn_bound
from toolkit.planning.costs import model_costs
from toolkit.planning.latency import FleetState, SplitProblem, TrainingSettings, plan_split_round
from toolkit.planning.rates import LinearRates, SharedRates
from toolkit.profile_format import load_profile

PROFILES = Path(__file__).resolve().parents[1] / "profiles" / "epyc-vm-2vcpu"


@pytest.fixture(scope="module")
def lenet_costs():
    return model_costs(load_profile(PROFILES / "lenet5.json"))


def airtime(speed, up, down) -> FleetState:
    return FleetState(
        np.asarray(speed, float), LinearRates(np.asarray(up, float)), LinearRates(np.asarray(down, float))
    )


def test_a_lone_device_is_its_own_chain_and_the_optimal_plan_meets_it(lenet_costs) -> None:
    problem = SplitProblem.build(lenet_costs.cut(3), airtime([0.5], [4e6], [8e6]), TrainingSettings(32, 5))
    limit = round_bound(problem, one_air=True)
    planned = plan_split_round(problem, [[0]]).latency_s
    assert limit.binding == "chain" and limit.bound_s == pytest.approx(planned, rel=1e-9)
    assert efficiency(limit.bound_s, planned) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_no_clustering_and_no_allocation_beats_the_bound(lenet_costs, seed: int) -> None:
    """Every partition of 5 devices, with the optimal shares and with equal ones, on both media."""
    rng = np.random.default_rng(seed)
    n = 5
    speed = rng.uniform(0.05, 3.0, n)
    up, down = rng.uniform(1e6, 30e6, n), rng.uniform(2e6, 60e6, n)
    settings = TrainingSettings(32, 4)
    for cut in lenet_costs.cuts[::2]:
        for state, one_air in (
            (airtime(speed, up, down), True),
            (FleetState(speed, SharedRates(up, 1.5 * up.max()), SharedRates(down, 1.5 * down.max())), False),
        ):
            problem = SplitProblem.build(cut, state, settings)
            limit = round_bound(problem, one_air, cap=n)
            best = min(
                plan_split_round(problem, clusters, allocator).latency_s
                for clusters in partitions(list(range(n)))
                for allocator in (allocate_shares, equal_shares)
            )
            assert limit.any_schedule_s <= limit.bound_s <= best * (1 + 1e-9)
            # the clusters' bound is the least over every partition of each turn's own bound
            assert limit.clusters_s == pytest.approx(
                min(
                    sum(turn_bound(problem, tuple(group), one_air) for group in clusters)
                    for clusters in partitions(list(range(n)))
                ),
                rel=1e-12,
            )


def test_with_compute_free_the_medium_binds_and_one_air_adds_both_directions(lenet_costs) -> None:
    fast = [1e6] * 4
    up, down = np.array([2e6, 4e6, 8e6, 16e6]), np.array([4e6, 8e6, 16e6, 32e6])
    problem = SplitProblem.build(lenet_costs.cut(1), airtime(fast, up, down), TrainingSettings(32, 3, server_speed=1e6))
    wifi = round_bound(problem, one_air=True)
    uplink = (3 * problem.uplink_bits + problem.model_bits) / up
    downlink = (3 * problem.downlink_bits + problem.model_bits) / down
    assert wifi.binding == "medium" and wifi.medium_s == pytest.approx(uplink.sum() + downlink.sum())
    assert round_bound(problem, one_air=False).medium_s == pytest.approx(max(uplink.sum(), downlink.sum()))
    # one cluster with slots sends back to back: close to the bound when nothing else takes time
    planned = plan_split_round(problem, [list(range(4))]).latency_s
    assert 0.95 < wifi.bound_s / planned <= 1.0


def test_the_server_binds_when_it_is_the_slow_one(lenet_costs) -> None:
    problem = SplitProblem.build(
        lenet_costs.cut(1), airtime([1e6] * 3, [1e12] * 3, [1e12] * 3), TrainingSettings(32, 2, server_speed=1e-3)
    )
    limit = round_bound(problem, one_air=True)
    assert limit.binding == "server" and limit.server_s == pytest.approx(2 * problem.server_s(3))


def test_turns_one_after_another_bind_where_a_slow_cluster_leaves_the_air_idle(lenet_costs) -> None:
    """Two fast devices on slow links and two slow ones on fast links: any schedule could hide
    each pair's compute under the other's air, but CPSL's clusters take turns, and whichever
    cluster holds a slow device waits for it with the air of that cluster alone."""
    speed, up = [3.0, 3.0, 0.003, 0.003], [1.5e6, 1.5e6, 40e6, 40e6]
    problem = SplitProblem.build(
        lenet_costs.cut(3), airtime(speed, up, [3e6, 3e6, 80e6, 80e6]), TrainingSettings(32, 5)
    )
    limit = round_bound(problem, one_air=True, cap=2)
    assert limit.binding == "clusters" and limit.clusters_s > 1.2 * limit.any_schedule_s
    best = min(
        plan_split_round(problem, clusters).latency_s
        for clusters in partitions([0, 1, 2, 3])
        if max(map(len, clusters)) <= 2
    )
    assert limit.bound_s <= best * (1 + 1e-9)
    assert round_bound(problem, one_air=True).clusters_s is None  # no cap given: left out
    assert round_bound(problem, one_air=True).bound_s == limit.any_schedule_s


def test_efficiency_is_none_without_a_bound_or_a_round() -> None:
    assert efficiency(None, 3.0) is None and efficiency(2.0, 0.0) is None
    assert efficiency(2.0, 4.0) == 0.5
    assert len(list(itertools.islice(partitions([0, 1, 2]), 10))) == 5  # Bell(3): the oracle enumerates all
