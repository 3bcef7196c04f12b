"""Device clustering against exhaustive enumeration, bounds, and cut selection by SAA."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from tests.partitions import every_partition
from toolkit.errors import UserError
from toolkit.planning.channel import ChannelModel, RadioSettings
from toolkit.planning.clustering import ClusterBounds, cluster_devices, optimal_partition, round_latency
from toolkit.planning.costs import model_costs
from toolkit.planning.cut_selection import CutReselection, select_cut
from toolkit.planning.latency import FleetState, SplitProblem, TrainingSettings, cluster_latency
from toolkit.planning.rates import LinearRates
from toolkit.planning.simulate import random_clusters
from toolkit.profile_format import load_profile

PROFILES = Path(__file__).resolve().parents[1] / "profiles" / "epyc-vm-2vcpu"
CLASS_SPEEDS = [0.38, 0.76, 1.0, 4.1]


@pytest.fixture(scope="module")
def costs():
    return {name: model_costs(load_profile(PROFILES / f"{name}.json")) for name in ("lenet5", "vgg")}


def instance(costs, seed: int):
    """A random small fleet: model, cut, band, server speed and cluster bound all drawn."""
    rng = np.random.default_rng(seed)
    devices = int(rng.integers(3, 9))
    model = costs["lenet5" if seed % 2 else "vgg"]
    channel = ChannelModel(
        rng.choice(CLASS_SPEEDS, size=devices),
        RadioSettings(bandwidth_hz=float(rng.choice([1e6, 5e6, 10e6, 50e6]))),
        seed=seed,
    )
    cut = model.cuts[int(rng.integers(len(model.cuts)))]
    settings = TrainingSettings(local_iterations=int(rng.choice([5, 20])), server_speed=float(rng.choice([1, 8])))
    problem = SplitProblem.build(cut, channel.state(int(rng.integers(100))), settings)
    if seed % 3 == 0:
        bounds = ClusterBounds.exactly(int(rng.integers(1, devices + 1)))
    else:
        bounds = ClusterBounds(max_cluster_size=int(rng.integers(2, devices + 1)))
    return problem, bounds


@pytest.mark.parametrize("seed", range(4))
def test_dp_oracle_equals_plain_enumeration(costs, seed):
    problem, bounds = instance(costs, 1000 + seed)
    problem = SplitProblem(
        **{**problem.__dict__, "forward_s": problem.forward_s[:5], "backward_s": problem.backward_s[:5]}
    )
    cap, fewest, most = bounds.resolve(problem.size)
    best = min(
        round_latency(problem, p)
        for p in every_partition(list(range(problem.size)))
        if fewest <= len(p) <= most and max(map(len, p)) <= cap
    )
    value, partition = optimal_partition(problem, bounds)
    assert value == pytest.approx(best, rel=1e-12)
    assert round_latency(problem, partition) == pytest.approx(value, rel=1e-12)


@pytest.mark.slow
def test_clustering_is_within_target_of_exhaustive_enumeration(costs):
    """Issue #4: mean gap under 1%, worst under 5%, over >= 100 seeded instances of N <= 8."""
    gaps = []
    for seed in range(100):  # the count: the suite's budget has no room for more
        problem, bounds = instance(costs, seed)
        clusters = cluster_devices(problem, bounds, seed=seed)
        cap, fewest, most = bounds.resolve(problem.size)
        assert sorted(itertools.chain.from_iterable(clusters)) == list(range(problem.size))
        assert fewest <= len(clusters) <= most and max(map(len, clusters)) <= cap
        optimum, _ = optimal_partition(problem, bounds)
        gaps.append(round_latency(problem, clusters) / optimum - 1)
    gaps = np.array(gaps)
    print(
        f"\nclustering vs exhaustive enumeration, {len(gaps)} instances of 3-8 devices: "
        f"mean gap {100 * gaps.mean():.4f}%, worst {100 * gaps.max():.4f}%, optimal in {(gaps < 1e-9).sum()}"
    )
    assert gaps.min() > -1e-9, "the heuristic beat the exhaustive optimum: the oracle is wrong"
    assert gaps.mean() < 0.01
    assert gaps.max() < 0.05


def heterogeneous_problem(costs, devices: int, seed: int) -> SplitProblem:
    speeds = np.random.default_rng(seed).choice(CLASS_SPEEDS, size=devices)
    channel = ChannelModel(speeds, RadioSettings(bandwidth_hz=5e6), seed=seed)
    return SplitProblem.build(costs["vgg"].resolve("pool2"), channel.state(0), TrainingSettings(server_speed=8))


def test_clustering_beats_random_clusters_of_the_same_count(costs):
    wins = []
    for seed in range(5):
        problem = heterogeneous_problem(costs, 30, seed)
        ours = cluster_devices(problem, ClusterBounds(max_cluster_size=5), seed=seed)
        rng = np.random.default_rng(seed)
        randoms = [round_latency(problem, random_clusters(30, len(ours), rng)) for _ in range(5)]
        wins.append(round_latency(problem, ours) / float(np.median(randoms)))
    assert max(wins) < 1.0, wins


def test_clustering_respects_bounds_and_is_deterministic(costs):
    problem = heterogeneous_problem(costs, 23, 3)
    a = cluster_devices(problem, ClusterBounds(max_cluster_size=4), seed=1)
    b = cluster_devices(problem, ClusterBounds(max_cluster_size=4), seed=1)
    assert a == b
    assert max(map(len, a)) <= 4 and len(a) >= math.ceil(23 / 4)
    exact = cluster_devices(problem, ClusterBounds.exactly(9), seed=1)
    assert len(exact) == 9
    with pytest.raises(UserError, match="no partition"):
        cluster_devices(problem, ClusterBounds(max_cluster_size=2, max_clusters=3))


def test_unbounded_clustering_chooses_one_cluster_because_merging_never_loses(costs):
    problem = heterogeneous_problem(costs, 6, 0)
    assert cluster_devices(problem, ClusterBounds()) == [list(range(6))]


def state(speed: float, uplink_bps: float, devices: int = 4) -> FleetState:
    return FleetState(
        np.full(devices, speed), LinearRates(np.full(devices, uplink_bps)), LinearRates(np.full(devices, 100e6))
    )


def test_saa_moves_the_cut_to_smaller_smashed_data_when_the_uplink_is_slow(costs):
    lenet = costs["lenet5"]
    settings = TrainingSettings(server_speed=8)
    bounds = ClusterBounds(max_cluster_size=2)
    # slow devices on a fast link keep little on the device; the same devices on a slow
    # uplink must trade that compute for less traffic
    usual = select_cut(lenet, [state(0.05, 1e9)], settings, bounds, objective="latency")
    slow = select_cut(lenet, [state(0.05, 50e3)], settings, bounds, objective="latency")
    assert lenet.cut(slow.cut).smashed_bytes_per_sample < lenet.cut(usual.cut).smashed_bytes_per_sample
    assert slow.mean_latency_s[slow.cut] == min(slow.mean_latency_s.values())


def test_saa_moves_computation_to_the_server_when_devices_are_slow(costs):
    vgg = costs["vgg"]
    settings = TrainingSettings(server_speed=8)
    bounds = ClusterBounds(max_cluster_size=2)
    usual = select_cut(vgg, [state(1.0, 20e6)], settings, bounds, objective="latency")
    slow = select_cut(vgg, [state(0.01, 20e6)], settings, bounds, objective="latency")
    assert slow.cut < usual.cut
    assert vgg.cut(slow.cut).device_forward(32) < vgg.cut(usual.cut).device_forward(32)


@pytest.mark.slow
def test_saa_averages_over_sampled_states(costs):
    lenet = costs["lenet5"]
    channel = ChannelModel(np.array([0.38, 0.76, 4.1, 1.0]), seed=2)
    samples = channel.states(range(5))
    choice = select_cut(lenet, samples, TrainingSettings(), ClusterBounds(max_cluster_size=2))
    one = lenet.cut(choice.cut)
    expected = np.mean(
        [
            round_latency(problem, cluster_devices(problem, ClusterBounds(max_cluster_size=2)))
            for problem in (SplitProblem.build(one, s, TrainingSettings()) for s in samples)
        ]
    )
    assert choice.mean_latency_s[choice.cut] == pytest.approx(expected)


def test_reselection_every_k_rounds_and_on_drift():
    policy = CutReselection(every_rounds=5, drift_threshold=0.3)
    calm = state(1.0, 10e6)
    assert policy.due(0, calm) == "first round"
    policy.selected(0, [calm])
    assert policy.due(3, calm) is None
    assert "5 rounds" in policy.due(5, calm)
    assert "drifted" in policy.due(1, state(1.0, 2e6))  # uplink 5x slower
    assert "drifted" in policy.due(1, state(0.5, 10e6))  # devices 2x slower
    assert policy.due(1, state(1.1, 11e6)) is None  # 10%: within the threshold


def test_cluster_latency_of_empty_cluster_is_zero(costs):
    problem = heterogeneous_problem(costs, 3, 0)
    assert cluster_latency(problem, []) == 0.0


def test_time_to_accuracy_trades_a_slightly_longer_round_for_fewer_rounds(costs):
    """The testbed's Wi-Fi fleet on LeNet-5: fc2 has the shortest round, fc1's is 9% longer
    but leaves one layer fewer to averaging. With nearly IID labels averaging costs next to
    no rounds and both objectives pick fc2 (in hindsight fc2 was best there,
    bench/results/cut_hindsight); with disjoint labels on every device averaging costs
    enough rounds that time to accuracy moves to fc1."""
    from toolkit.planning.rounds import estimate_rounds

    lenet = costs["lenet5"]
    speed = np.array([1.0, 0.47, 0.25] * 3)[:8]
    up = np.array([14.4, 5.6, 2.4, 5.6, 2.4, 14.4, 2.4, 14.4]) * 1e6
    fleet = FleetState(speed, LinearRates(up), LinearRates(2 * up))
    bounds = ClusterBounds(4, 2)
    by_latency = select_cut(lenet, [fleet], TrainingSettings(), bounds, objective="latency")
    assert select_cut(lenet, [fleet], TrainingSettings(), bounds, skew=0.05).name == "fc2"
    by_time = select_cut(lenet, [fleet], TrainingSettings(), bounds, skew=1.0)
    assert by_latency.name == "fc2" and by_time.name == "fc1"
    assert by_time.objective == "time-to-accuracy" and by_time.skew == 1.0
    score = {
        c: by_time.mean_latency_s[c] * estimate_rounds(lenet, c, 1.0).relative_rounds for c in by_time.mean_latency_s
    }
    assert by_time.cut == min(score, key=score.get)
    assert by_time.relative_rounds[by_time.cut] < by_time.relative_rounds[by_latency.cut]
