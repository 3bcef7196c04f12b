"""The latency model: costs from profiles, the iteration/turn/round formulas, the schemes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolkit.planning.allocation import equal_shares
from toolkit.planning.channel import ChannelModel, RadioSettings, path_loss_db
from toolkit.planning.costs import Affine, candidate_cuts, fit_affine, model_costs
from toolkit.planning.latency import (
    FleetState,
    SplitProblem,
    TrainingSettings,
    cluster_latency,
    plan_cluster,
    plan_fl_round,
    plan_split_round,
)
from toolkit.planning.rates import LinearRates
from toolkit.profile_format import load_profile

PROFILES = Path(__file__).resolve().parents[1] / "profiles" / "epyc-vm-2vcpu"


@pytest.fixture(scope="module")
def lenet_costs():
    return model_costs(load_profile(PROFILES / "lenet5.json"))


def test_affine_fit_recovers_a_line_and_scales_a_single_point():
    line = fit_affine([(16, 0.001 + 16 * 1e-4), (64, 0.001 + 64 * 1e-4), (32, 0.001 + 32 * 1e-4)])
    assert line.fixed_s == pytest.approx(0.001)
    assert line.per_sample_s == pytest.approx(1e-4)
    assert fit_affine([(32, 0.064)])(16) == pytest.approx(0.032)
    # noise giving a negative intercept falls back to a line through the origin
    assert fit_affine([(16, 0.010), (64, 0.050)]).fixed_s == 0.0


def test_candidate_cuts_skip_parameter_free_layers_that_keep_the_size():
    profile = load_profile(PROFILES / "lenet5.json")
    names = {cut.cut: cut.after for cut in profile.cuts}
    kept = candidate_cuts(profile)
    assert [names[c] for c in kept] == ["conv1", "pool1", "conv2", "pool2", "fc1", "fc2"]


def test_server_time_shrinks_as_the_cut_moves_toward_the_output(lenet_costs):
    times = [cut.server_step(64) for cut in lenet_costs.cuts]
    assert times == sorted(times, reverse=True)
    forward = [cut.device_forward(64) for cut in lenet_costs.cuts]
    assert forward[-1] > forward[0]


def linear_state(speed, up, down) -> FleetState:
    return FleetState(
        np.asarray(speed, float), LinearRates(np.asarray(up, float)), LinearRates(np.asarray(down, float))
    )


def test_a_lone_device_follows_the_formula_term_by_term(lenet_costs):
    cut = lenet_costs.resolve("pool2")
    settings = TrainingSettings(batch_size=32, local_iterations=7, server_speed=2.0)
    state = linear_state([0.5], [4e6], [20e6])
    problem = SplitProblem.build(cut, state, settings)
    forward = cut.device_forward(32) / 0.5
    backward = cut.device_backward(32) / 0.5
    up = 8 * 32 * (cut.smashed_bytes_per_sample + 8) / 4e6
    down = 8 * 32 * cut.smashed_bytes_per_sample / 20e6
    server = cut.server_step(32) / 2.0
    model = 8 * cut.device_model_bytes
    expected = model / 20e6 + 7 * (forward + up + server + down + backward) + model / 4e6
    assert cluster_latency(problem, [0]) == pytest.approx(expected, rel=1e-12)


def test_sl_is_the_sum_of_single_device_turns_and_sfl_one_cluster(lenet_costs):
    state = linear_state([1, 0.4, 3], [5e6, 30e6, 1e6], [50e6, 50e6, 10e6])
    problem = SplitProblem.build(lenet_costs.middle_cut(), state, TrainingSettings())
    sl = plan_split_round(problem, [[0], [1], [2]])
    assert sl.latency_s == pytest.approx(sum(cluster_latency(problem, [n]) for n in range(3)))
    sfl = plan_split_round(problem, [[0, 1, 2]])
    assert len(sfl.clusters) == 1 and sfl.clusters[0].devices == (0, 1, 2)
    # iteration = uplink phase + server on the concatenated batch + downlink phase
    cluster = sfl.clusters[0]
    assert cluster.server_s == pytest.approx(problem.server(3 * 32))
    assert cluster.iteration_s == pytest.approx(cluster.uplink.finish_s + cluster.server_s + cluster.downlink.finish_s)


@pytest.mark.parametrize("seed", range(15))
def test_merging_two_clusters_never_lengthens_the_round(lenet_costs, seed):
    """The lemma docs/latency-model.md relies on to bound the number of clusters."""
    rng = np.random.default_rng(seed)
    speeds = rng.choice([0.38, 0.76, 4.1], size=6)
    channel = ChannelModel(speeds, RadioSettings(bandwidth_hz=float(rng.choice([1e6, 10e6]))), seed=seed)
    cut = lenet_costs.cuts[seed % len(lenet_costs.cuts)]
    problem = SplitProblem.build(cut, channel.state(0), TrainingSettings())
    order = rng.permutation(6)
    first, second = sorted(order[:3]), sorted(order[3:])
    apart = cluster_latency(problem, first) + cluster_latency(problem, second)
    assert cluster_latency(problem, sorted(order)) <= apart * (1 + 1e-9)


def test_fl_round_overlaps_uploads_with_slower_devices_training(lenet_costs):
    settings = TrainingSettings(batch_size=32, local_iterations=10)
    state = linear_state([1.0, 0.1], [10e6, 10e6], [10e6, 10e6])
    plan = plan_fl_round(lenet_costs, state, settings)
    compute = 10 * lenet_costs.full_step(32) / np.array([1.0, 0.1])
    bits = 8 * lenet_costs.full_model_bytes
    np.testing.assert_allclose(plan.compute_s, compute)
    assert plan.model_down.finish_s == pytest.approx(bits / 5e6)  # two devices share the band
    # the slow device computes 10x longer, so the fast one uploads first with most of the band
    assert plan.model_up.finish_s < compute[1] + bits / 5e6
    assert plan.latency_s == pytest.approx(plan.model_down.finish_s + plan.model_up.finish_s)
    baseline = plan_fl_round(lenet_costs, state, settings, equal_shares)
    assert plan.latency_s <= baseline.latency_s


def test_plan_exposes_every_phase_for_slot_translation(lenet_costs):
    state = linear_state([1, 2], [5e6, 20e6], [40e6, 40e6])
    plan = plan_cluster(SplitProblem.build(lenet_costs.middle_cut(), state, TrainingSettings()), [1, 0])
    assert plan.devices == (0, 1)
    for phase in (plan.model_down, plan.uplink, plan.downlink, plan.model_up):
        assert phase.shares.sum() == pytest.approx(1.0)


def test_path_loss_matches_the_3gpp_formula():
    assert path_loss_db(np.array([1000.0]))[0] == pytest.approx(128.1)
    assert path_loss_db(np.array([100.0]))[0] == pytest.approx(128.1 - 37.6)


def test_channel_is_reproducible_by_seed_and_round_and_fades_per_round():
    speeds = np.ones(200)
    a, b = ChannelModel(speeds, seed=7), ChannelModel(speeds, seed=7)
    np.testing.assert_array_equal(a.state(3).uplink.snr, b.state(3).uplink.snr)
    np.testing.assert_array_equal(a.state(3).speed, b.state(3).speed)
    assert not np.array_equal(a.state(3).uplink.snr, a.state(4).uplink.snr)
    assert not np.array_equal(a.distance_m, ChannelModel(speeds, seed=8).distance_m)
    radio = a.radio
    assert ((a.distance_m >= radio.min_distance_m) & (a.distance_m <= radio.cell_radius_m)).all()


def test_rayleigh_fading_has_unit_mean_power_and_exponential_spread():
    channel = ChannelModel(np.ones(1000), RadioSettings(speed_jitter=0.0), seed=1)
    # snr = p * path gain * fading / (N0 W): divide out everything but the fading
    fading = np.concatenate([channel.state(r).uplink.snr / (channel.mean_gain() * _scale(channel)) for r in range(20)])
    assert fading.mean() == pytest.approx(1.0, abs=0.03)
    assert np.median(fading) == pytest.approx(np.log(2), abs=0.03)  # median of Exp(1)
    assert (channel.state(0).speed == 1.0).all()  # no jitter asked for


def _scale(channel: ChannelModel) -> float:
    from toolkit.planning.channel import dbm_to_watt

    radio = channel.radio
    return dbm_to_watt(radio.device_power_dbm) / (dbm_to_watt(radio.noise_dbm_per_hz) * radio.bandwidth_hz)


def test_reference_affine_scaling():
    assert Affine(1.0, 2.0).scaled(0.5)(3) == pytest.approx(3.5)


def test_the_wifi_cell_is_air_time_with_contention_and_the_wired_one_a_switch():
    from toolkit.planning.allocation import concurrent_phase
    from toolkit.planning.rates import SharedRates

    speeds = np.ones(6)
    wifi = ChannelModel(speeds, RadioSettings(medium="wifi"), seed=1).state(0)
    assert isinstance(wifi.uplink, LinearRates) and wifi.uplink.contention
    assert isinstance(wifi.downlink, LinearRates) and not wifi.downlink.contention
    devices = np.arange(6)
    assert (wifi.uplink.capacity_bps(devices) < 0.6 * 54e6).all(), "54 Mbit/s PHY, less 802.11's per-frame costs"
    # at these rates six stations contending move less than the same bits sent one after another
    together = concurrent_phase(wifi.uplink, devices, 8e6).finish_s
    in_turn = float(np.sum(8e6 / wifi.uplink.capacity_bps(devices)))
    assert together > in_turn
    wired = ChannelModel(speeds, RadioSettings(medium="wired", wired_capacity_bps=5e6), seed=1)
    first, second = wired.state(0), wired.state(1)
    assert isinstance(first.uplink, SharedRates) and first.uplink.capacity == 5e6
    assert np.array_equal(first.uplink.caps, second.uplink.caps), "a cable does not fade"
    with pytest.raises(ValueError, match="medium"):
        RadioSettings(medium="carrier-pigeon")
