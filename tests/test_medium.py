"""The planner's two media: rate laws, unscheduled phases, and telling them apart from probes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.planning.allocation import allocate_shares, concurrent_phase, slot_schedule
from toolkit.planning.medium import AIRTIME_MAX_UTILISATION, decide_medium, detect_medium, rate_model
from toolkit.planning.rates import LinearRates, SharedRates, max_min_fair

MBIT = 1e6
rates_st = st.lists(st.floats(0.5, 50.0), min_size=1, max_size=8)


# water-filling ----------------------------------------------------------------------------------


@given(rates_st, st.floats(0.5, 200.0))
def test_max_min_fair_fills_the_capacity_or_every_cap_and_nobody_below_the_level_is_capped_early(caps, capacity):
    caps = np.array(caps)
    rates = max_min_fair(caps, capacity)
    assert np.all(rates <= caps + 1e-9)
    assert rates.sum() <= capacity + 1e-9
    if caps.sum() <= capacity:
        np.testing.assert_allclose(rates, caps)
    else:
        assert rates.sum() == pytest.approx(capacity)
        level = rates.max()
        # max-min: whoever is below the common level is at its own cap
        assert np.all((rates >= level - 1e-9) | (np.abs(rates - caps) < 1e-9))


def fluid_oracle(rate_of, bits, lead, dt):
    """Independent time-stepped simulation: whoever is ready and unfinished sends at the
    medium's concurrent rates for one small step."""
    left = np.array(bits, dtype=float)
    done = np.full(len(bits), np.nan)
    clock = 0.0
    while np.isnan(done).any():
        sending = np.flatnonzero((left > 0) & (lead <= clock + 1e-12))
        if sending.size:
            left[sending] -= rate_of(sending) * dt
            finished = sending[left[sending] <= 0]
            done[finished] = clock + dt
        clock += dt
    return done


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda n: st.tuples(
            st.lists(st.floats(1.0, 20.0), min_size=n, max_size=n),  # caps, Mbit/s
            st.lists(st.floats(0.5, 4.0), min_size=n, max_size=n),  # Mbit to send
            st.lists(st.floats(0.0, 0.5), min_size=n, max_size=n),  # ready at, s
        )
    ),
    st.floats(2.0, 60.0),
)
@pytest.mark.slow
def test_concurrent_phase_on_a_shared_medium_matches_a_time_stepped_simulation(case, capacity):
    caps, bits, lead = (np.array(v) for v in case)
    rates = SharedRates(caps * MBIT, capacity * MBIT)
    devices = np.arange(len(caps))
    plan = concurrent_phase(rates, devices, bits * MBIT, lead=lead)
    oracle = fluid_oracle(lambda s: rates.concurrent_bps(devices[s]), bits * MBIT, lead, dt=1e-4)
    np.testing.assert_allclose(plan.device_finish_s, oracle, atol=2e-3)


def test_concurrent_phase_hand_worked_cases():
    # 1, 5 and 10 Mbit/s caps under 12 Mbit/s together, 8 Mbit each: water levels 1, 5, 6;
    # the fastest finishes at 8/6 s, the middle one at 1.6 s (its cap), the slow one at 8 s
    shared = SharedRates(np.array([1.0, 5.0, 10.0]) * MBIT, 12 * MBIT)
    plan = concurrent_phase(shared, np.arange(3), 8 * MBIT)
    np.testing.assert_allclose(plan.device_finish_s, [8.0, 1.6, 8 / 6])
    # the same devices on air time: equal throughput for all, so all end at sum(8/r) = 10.4 s
    air = LinearRates(np.array([1.0, 5.0, 10.0]) * MBIT)
    np.testing.assert_allclose(concurrent_phase(air, np.arange(3), 8 * MBIT).device_finish_s, [10.4] * 3)
    # with slots the same air time ends every transfer by 10.4 s too, most far earlier
    assert slot_schedule(air, np.arange(3), 8 * MBIT).finish_s == pytest.approx(10.4)
    # tails and idle devices: 5 Mbit each for the caps 5 and 10 with 12 together: 5 and 7 Mbit/s
    plan = concurrent_phase(shared, np.arange(3), np.array([0.0, 5.0, 5.0]) * MBIT, lead=0.5, tail=[0.1, 0.2, 0.3])
    np.testing.assert_allclose(plan.device_finish_s, [0.6, 0.5 + 1.0 + 0.2, 0.5 + 5 / 7 + 0.3])


def test_shared_rates_allocation_finishes_together_unless_a_cap_binds():
    shared = SharedRates(np.array([4.0, 4.0, 40.0]) * MBIT, 20 * MBIT)
    plan = allocate_shares(shared, np.arange(3), 8 * MBIT)
    # the two capped devices cannot finish before 2 s; the rest of the capacity lets the
    # third one finish by then as well, and the optimum is their common finish
    assert plan.finish_s == pytest.approx(2.0, rel=1e-6)
    # share_for inverts rate_bps below the cap and refuses above it
    share = shared.share_for(np.array([8e6, 8e6]), np.array([2.0, 1.0]), np.array([0, 0]))
    assert share[0] == pytest.approx(0.2) and share[1] == np.inf


# telling the media apart -------------------------------------------------------------------------


@given(rates_st.filter(lambda r: len(r) >= 2))
def test_an_airtime_medium_measures_one_air_time_whatever_the_rates(caps):
    alone = {f"d{i}": c * MBIT for i, c in enumerate(caps)}
    air = LinearRates(np.array(caps) * MBIT)
    together = dict(zip(alone, air.concurrent_bps(np.arange(len(caps))), strict=True))
    evidence = detect_medium(alone, together)
    assert evidence.kind == "airtime" and evidence.utilisation == pytest.approx(1.0)


@given(rates_st.filter(lambda r: len(r) >= 2), st.floats(1.5, 10.0))
def test_a_byte_shared_medium_with_room_for_overlap_is_shared_with_its_capacity(caps, headroom):
    caps = np.array(caps) * MBIT
    capacity = headroom * caps.max()  # 50% or more over the fastest device
    alone = {f"d{i}": c for i, c in enumerate(caps)}
    together = dict(zip(alone, SharedRates(caps, capacity).concurrent_bps(np.arange(len(caps))), strict=True))
    evidence = detect_medium(alone, together)
    assert evidence.kind == "shared" and evidence.utilisation > AIRTIME_MAX_UTILISATION
    assert evidence.capacity_bps == pytest.approx(min(capacity, caps.sum()))
    model = rate_model(evidence, caps)
    assert isinstance(model, SharedRates) and not model.is_linear()


def test_a_shared_medium_no_wider_than_one_device_is_called_airtime_and_both_laws_agree():
    caps = np.array([10.0, 10.0, 10.0]) * MBIT
    alone = {f"d{i}": c for i, c in enumerate(caps)}
    together = dict(zip(alone, SharedRates(caps, 10 * MBIT).concurrent_bps(np.arange(3)), strict=True))
    evidence = detect_medium(alone, together)
    assert evidence.kind == "airtime"
    bits = 4 * MBIT
    airtime = concurrent_phase(rate_model(evidence, caps), np.arange(3), bits).finish_s
    shared = concurrent_phase(SharedRates(caps, 10 * MBIT), np.arange(3), bits).finish_s
    assert airtime == pytest.approx(shared)


def test_one_device_gives_no_evidence_and_a_named_medium_overrides_the_probes():
    assert detect_medium({"a": 1e6}, {"a": 1e6}).utilisation is None
    alone = {"a": 10e6, "b": 10e6}
    together = {"a": 9.8e6, "b": 9.9e6}
    assert decide_medium("auto", alone, together).kind == "shared"
    forced = decide_medium("airtime", alone, together)
    assert forced.kind == "airtime" and "would say shared" in forced.reason and forced.capacity_bps is None
    forced = decide_medium("shared", alone)  # no simultaneous probe: the caps' sum
    assert forced.kind == "shared" and forced.capacity_bps == 20e6
    with pytest.raises(ValueError, match="not one of"):
        decide_medium("ether", alone)


def test_the_span_of_the_whole_exchange_outweighs_per_device_means_skewed_by_late_starters():
    alone = {"a": 16e6, "b": 6e6, "c": 2.5e6, "d": 6e6}
    payload = {d: rate * 1.0 for d, rate in alone.items()}  # one solo second each
    # on air time the exchange takes the sum of the solo seconds; two devices started late,
    # so their own mean rates look like solo rates and the means alone would say "shared"
    skewed = {"a": 15e6, "b": 5.5e6, "c": 1.0e6, "d": 2.0e6}
    assert detect_medium(alone, skewed).kind == "shared"
    evidence = detect_medium(alone, skewed, payload, span_s=4.0)
    assert evidence.kind == "airtime" and evidence.utilisation == pytest.approx(1.0)
    # all four overlapping without a bottleneck: one solo second for the lot
    evidence = detect_medium(alone, alone, payload, span_s=1.0)
    assert evidence.kind == "shared" and evidence.utilisation == pytest.approx(4.0)
    # caps very unlike each other do not blur it (the testbed's 16 and 6 Mbit/s on 20)
    pair = {"a": 16e6, "b": 6e6}
    span = max(1.0, (16e6 + 6e6) / 20e6)
    evidence = detect_medium(pair, pair, {d: r for d, r in pair.items()}, span)
    assert evidence.kind == "shared" and evidence.utilisation == pytest.approx(2 / span)
    # a 20 Mbit/s bottleneck under 30.5 Mbit/s of caps: 30.5 Mbit take 1.525 s
    evidence = detect_medium(alone, alone, payload, span_s=30.5e6 / 20e6)
    assert evidence.kind == "shared" and evidence.capacity_bps == pytest.approx(20e6)
    assert evidence.utilisation == pytest.approx(4 / 1.525)
