"""Share allocation inside a cluster: exactness, common finish, slots on a real link."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import minimize

from toolkit.planning.allocation import (
    allocate_shares,
    allocate_shares_many,
    boundary_schedule,
    equal_shares,
    slot_schedule,
)
from toolkit.planning.rates import LinearRates, PowerLimitedRates


def random_phase(seed: int, size: int, shannon: bool):
    rng = np.random.default_rng(seed)
    if shannon:
        rates = PowerLimitedRates(10e6, 10 ** rng.uniform(-0.5, 4, size))  # -5 dB .. 40 dB
    else:
        rates = LinearRates(rng.uniform(1e6, 100e6, size))
    bits = rng.uniform(1e5, 5e6, size)
    lead = rng.uniform(0.0, 0.2, size)
    return rates, np.arange(size), bits, lead


def brute_force_two(rates, devices, bits, lead) -> float:
    """Every split of the band between two devices on a grid of 200,001 points."""
    x = np.linspace(1e-6, 1 - 1e-6, 200_001)
    first = lead[0] + bits[0] / rates.rate_bps(x, np.full_like(x, devices[0], dtype=int))
    second = lead[1] + bits[1] / rates.rate_bps(1 - x, np.full_like(x, devices[1], dtype=int))
    return float(np.min(np.maximum(first, second)))


def convex_solution(rates, devices, bits, lead) -> float:
    """min t s.t. lead_n + bits_n / r_n(x_n) <= t, sum x <= 1, by SLSQP from several starts."""
    size = len(devices)

    def finish(x):
        return lead + bits / rates.rate_bps(np.maximum(x, 1e-9), devices)

    best = np.inf
    starts = [np.full(size, 1 / size), bits / bits.sum(), *np.random.default_rng(size).dirichlet(np.ones(size), 6)]
    for start in starts:
        z0 = np.append(start, finish(start).max())
        result = minimize(
            lambda z: z[-1],
            z0,
            method="SLSQP",
            bounds=[(1e-9, 1)] * size + [(0, None)],
            constraints=[
                {"type": "ineq", "fun": lambda z: 1 - z[:-1].sum()},
                {"type": "ineq", "fun": lambda z: z[-1] - finish(z[:-1])},
            ],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        if result.success:
            best = min(best, float(finish(result.x[:-1]).max()))
    return best


@pytest.mark.parametrize("shannon", [False, True])
@pytest.mark.parametrize("seed", range(25))
def test_shares_sum_to_one_and_senders_finish_together(seed, shannon):
    size = 2 + seed % 7
    rates, devices, bits, lead = random_phase(seed, size, shannon)
    plan = allocate_shares(rates, devices, bits, lead=lead)
    assert plan.shares.sum() == pytest.approx(1.0, abs=1e-12)
    assert (plan.shares > 0).all()
    np.testing.assert_allclose(plan.device_finish_s, plan.finish_s, rtol=1e-9)


@pytest.mark.parametrize("shannon", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_matches_brute_force_for_two_devices(seed, shannon):
    rates, devices, bits, lead = random_phase(100 + seed, 2, shannon)
    ours = allocate_shares(rates, devices, bits, lead=lead).finish_s
    brute = brute_force_two(rates, devices, bits, lead)
    assert ours <= brute * (1 + 1e-9)  # the grid can only be worse
    assert ours == pytest.approx(brute, rel=1e-3)


@pytest.mark.parametrize("shannon", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_matches_convex_solver(seed, shannon):
    rates, devices, bits, lead = random_phase(200 + seed, 3 + seed % 4, shannon)
    ours = allocate_shares(rates, devices, bits, lead=lead).finish_s
    solver = convex_solution(rates, devices, bits, lead)
    assert ours <= solver * (1 + 1e-6)
    assert ours == pytest.approx(solver, rel=1e-3)


def test_one_device_takes_the_whole_medium():
    rates = LinearRates(np.array([8e6]))
    plan = allocate_shares(rates, np.array([0]), 8e6, lead=0.5)
    assert plan.shares.tolist() == [1.0]
    assert plan.finish_s == pytest.approx(1.5)


def test_a_device_with_nothing_to_send_gets_no_share_but_bounds_the_phase():
    rates = LinearRates(np.array([1e6, 1e6]))
    plan = allocate_shares(rates, np.arange(2), np.array([1e6, 0.0]), lead=np.array([0.0, 3.0]))
    assert plan.shares.tolist() == [1.0, 0.0]
    assert plan.finish_s == pytest.approx(3.0)


@pytest.mark.parametrize("seed", range(10))
def test_optimal_never_loses_to_equal_shares(seed):
    rates, devices, bits, lead = random_phase(300 + seed, 5, seed % 2 == 0)
    assert allocate_shares(rates, devices, bits, lead=lead).finish_s <= equal_shares(
        rates, devices, bits, lead=lead
    ).finish_s * (1 + 1e-12)


def assert_valid_slots(schedule, lead, capacity, bits):
    end = 0.0
    for slot in schedule.slots:
        assert slot.start_s >= end - 1e-12, "slots overlap"
        assert slot.start_s >= lead[slot.device] - 1e-12, "a device sends before it is ready"
        assert slot.duration_s == pytest.approx(bits[slot.device] / capacity[slot.device])
        end = slot.start_s + slot.duration_s
    assert sorted(slot.device for slot in schedule.slots) == list(range(len(bits)))


@pytest.mark.parametrize("seed", range(20))
def test_uplink_slots_realise_the_share_plan_on_a_linear_link(seed):
    rates, devices, bits, lead = random_phase(400 + seed, 2 + seed % 6, shannon=False)
    plan = allocate_shares(rates, devices, bits, lead=lead)
    schedule = slot_schedule(rates, devices, bits, lead=lead)
    assert_valid_slots(schedule, lead, rates.capacity, bits)
    assert schedule.finish_s <= plan.finish_s * (1 + 1e-9)
    # earliest-ready first
    starts = [lead[s.device] for s in schedule.slots]
    assert starts == sorted(starts)


@pytest.mark.parametrize("seed", range(20))
def test_downlink_slots_longest_tail_first_end_by_the_share_finish(seed):
    rates, devices, bits, tail = random_phase(500 + seed, 2 + seed % 6, shannon=False)
    plan = allocate_shares(rates, devices, bits, tail=tail)
    schedule = slot_schedule(rates, devices, bits, tail=tail)
    assert_valid_slots(schedule, np.zeros(len(bits)), rates.capacity, bits)
    assert schedule.finish_s <= plan.finish_s * (1 + 1e-9)
    tails = [tail[s.device] for s in schedule.slots]
    assert tails == sorted(tails, reverse=True)


def test_shannon_inverse_round_trips_including_near_the_power_ceiling():
    snr = np.array([0.1, 1.0, 100.0, 1e4, 1e4])
    rates = PowerLimitedRates(1e6, snr)
    devices = np.arange(5)
    shares = np.array([0.3, 0.01, 0.5, 1e-4, 50.0])  # 50: far past the band, rate near its ceiling
    bits = rates.rate_bps(shares, devices) * 2.0
    recovered = rates.share_for(bits, np.full(5, 2.0), devices)
    np.testing.assert_allclose(recovered, shares, rtol=1e-7)


def test_shannon_asks_beyond_the_power_ceiling_get_infinity():
    rates = PowerLimitedRates(1e6, np.array([1.0]))
    ceiling = 1e6 * 1.0 / np.log(2)  # s W / ln 2
    assert np.isinf(rates.share_for(np.array([ceiling * 1.01]), np.array([1.0]), np.array([0]))[0])
    assert rates.share_for(np.array([0.0]), np.array([1.0]), np.array([0]))[0] == 0.0


@pytest.mark.parametrize("shannon", [False, True])
def test_batched_bisection_equals_the_one_cluster_solver(shannon):
    rates, _, _, lead = random_phase(600, 40, shannon)
    rng = np.random.default_rng(1)
    order = rng.permutation(40)
    groups = [np.sort(order[i : i + size]) for i, size in zip((0, 1, 4, 9, 16, 25), (1, 3, 5, 7, 9, 15), strict=True)]
    for bits_each in (2e6, 0.0):
        batched = allocate_shares_many(rates, groups, bits_each, lead=lead, tail=lead[::-1].copy())
        for group, plan in zip(groups, batched, strict=True):
            alone = allocate_shares(rates, group, bits_each, lead=lead[group], tail=lead[::-1][group])
            assert plan.finish_s == pytest.approx(alone.finish_s, rel=1e-10)
            np.testing.assert_allclose(plan.shares, alone.shares, rtol=1e-7, atol=1e-12)


def _coupled_optimum(down_s, up_s, compute) -> float:
    """Every sequence of the 2n transfers on one air (a device's upload after its gradient and
    its compute), interleaved or not: the exact optimum the flow plan is checked against."""
    n = len(down_s)
    best = float("inf")
    operations = [("down", i) for i in range(n)] + [("up", i) for i in range(n)]
    for sequence in itertools.permutations(operations):
        position = {op: k for k, op in enumerate(sequence)}
        if any(position[("up", i)] < position[("down", i)] for i in range(n)):
            continue
        clock, delivered = 0.0, {}
        for kind, i in sequence:
            if kind == "down":
                clock += down_s[i]
                delivered[i] = clock
            else:
                clock = max(clock, delivered[i] + compute[i]) + up_s[i]
        best = min(best, clock)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_flow_plan_of_gradients_and_uploads_is_feasible_and_beats_the_barrier(seed):
    """One air from the gradients out to the next uploads in: one sender at a time, each upload
    after its device's gradient and compute, never longer than two phases with a barrier, and
    (4 devices) equal to the optimum over every sequence of the 8 transfers."""
    rng = np.random.default_rng(seed)
    n = 4
    down_rates, up_rates = LinearRates(rng.uniform(2e6, 30e6, n)), LinearRates(rng.uniform(1e6, 16e6, n))
    devices = np.arange(n)
    forward, backward = rng.uniform(0.0, 0.2, n), rng.uniform(0.0, 0.2, n)
    down_bits, up_bits = 8 * 35e3, 8 * 36e3
    flow = boundary_schedule(down_rates, up_rates, devices, down_bits, up_bits, forward + backward)
    slots = sorted(
        [(s.start_s, s.start_s + s.duration_s) for s in flow.gradients.slots]
        + [(s.start_s, s.start_s + s.duration_s) for s in flow.uploads.slots]
    )
    assert all(end <= start + 1e-12 for (_, end), (start, _) in itertools.pairwise(slots))
    for device in range(n):
        gradient, upload = flow.gradients.slot_of(device), flow.uploads.slot_of(device)
        ready = gradient.start_s + gradient.duration_s + forward[device] + backward[device]
        assert upload.start_s >= ready - 1e-12
    barrier = (
        slot_schedule(down_rates, devices, down_bits, tail=backward).finish_s
        + slot_schedule(up_rates, devices, up_bits, lead=forward).finish_s
    )
    assert flow.finish_s <= barrier + 1e-12
    down_s, up_s = down_bits / down_rates.capacity, up_bits / up_rates.capacity
    assert flow.finish_s == pytest.approx(_coupled_optimum(down_s, up_s, forward + backward), rel=1e-9)


def test_the_flow_plan_of_a_large_cluster_searches_locally_and_stays_feasible():
    rng = np.random.default_rng(3)
    n = 9
    devices = np.arange(n)
    compute = rng.uniform(0, 0.3, n)
    rates = LinearRates(rng.uniform(2e6, 20e6, n))
    flow = boundary_schedule(rates, rates, devices, 8 * 30e3, 8 * 30e3, compute)
    air = float(np.sum(2 * 8 * 30e3 / rates.capacity))
    assert air <= flow.finish_s <= air + compute.max() + 1e-12
    assert sorted(s.device for s in flow.uploads.slots) == list(range(n))
