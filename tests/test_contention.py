"""802.11 contention: Bianchi's fixed point (pure), and the relay's DCF scheduler against it."""

from __future__ import annotations

import itertools

import pytest

from toolkit.planning.contention import (
    DEFAULT_DCF,
    DcfTiming,
    collision_probability,
    contention_efficiency,
    contention_factor,
    phy_rate_of,
    saturated_throughput_dcf,
    saturated_throughput_turns,
)
from toolkit.testbed.airtime import DEFAULT_OVERHEAD_S, AirtimeScheduler, DcfScheduler, make_scheduler

RATES_MBIT = [54, 6, 24, 12, 36, 18, 48, 9, 54, 6, 24, 12, 36, 18, 48, 9]


def test_the_timings_are_802_11a_at_5_ghz_and_match_the_contention_free_overhead() -> None:
    assert DEFAULT_DCF.window == 16 and DEFAULT_DCF.max_stage == 6 and DEFAULT_DCF.window_at(9) == 1024
    assert DEFAULT_DCF.frame_fixed_s + DEFAULT_DCF.mean_first_backoff_s == pytest.approx(165.5e-6)
    assert pytest.approx(165.5e-6) == DEFAULT_OVERHEAD_S
    with pytest.raises(ValueError, match="2\\^k - 1"):
        DcfTiming(cw_min=10)


def test_bianchis_fixed_point_holds_and_collisions_grow_with_the_stations() -> None:
    tau, p = collision_probability(1)
    assert p == 0 and tau == pytest.approx(2 / 17)
    previous = 0.0
    for n in (2, 4, 8, 16, 32):
        tau, p = collision_probability(n)
        assert p == pytest.approx(1 - (1 - tau) ** (n - 1), abs=1e-9)  # both equations of the fixed point
        w, m = DEFAULT_DCF.window, DEFAULT_DCF.max_stage
        assert tau == pytest.approx(2 * (1 - 2 * p) / ((1 - 2 * p) * (w + 1) + p * w * (1 - (2 * p) ** m)))
        assert p > previous
        previous = p


def test_contention_costs_more_the_more_stations_send_at_once() -> None:
    efficiencies = [contention_efficiency(n) for n in (1, 2, 4, 8, 16)]
    assert efficiencies[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(efficiencies))
    assert 0.83 < efficiencies[3] < 0.9 and 0.76 < efficiencies[4] < 0.84
    # one station alone: the same as taking turns (its mean backoff is the overhead's)
    assert saturated_throughput_dcf([24e6]) == pytest.approx(saturated_throughput_turns([24e6]))


def _saturate(scheduler: AirtimeScheduler, rates_mbit: list[float], frames: int) -> tuple[list[float], int]:
    for i, rate in enumerate(rates_mbit):
        scheduler.add_flow(f"s{i}/up", f"s{i}", rate * 1e6)
        scheduler.enqueue(f"s{i}/up", 1 << 40)
    elapsed, sent = 0.0, [0] * len(rates_mbit)
    collisions = 0
    for _ in range(frames):
        frame = scheduler.next()
        elapsed += frame.airtime_s
        collisions += frame.collisions
        sent[int(frame.flow[1:].split("/")[0])] += frame.nbytes
    return [8 * b / elapsed for b in sent], collisions


@pytest.mark.parametrize("stations", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("mixed", [False, True], ids=["equal-rates", "mixed-rates"])
def test_the_dcf_scheduler_matches_bianchis_saturation_throughput(stations: int, mixed: bool) -> None:
    """Within 3% of the model in total (the issue asks 5% of the relay, which adds TCP on top)."""
    rates = RATES_MBIT[:stations] if mixed else [24.0] * stations
    measured, collisions = _saturate(DcfScheduler(seed=stations), rates, 30_000)
    predicted = saturated_throughput_dcf([r * 1e6 for r in rates])
    assert sum(measured) == pytest.approx(sum(predicted), rel=0.03)
    assert (collisions > 0) == (stations > 1)
    # equal opportunities in the long run (the anomaly stays), though DCF is unfair over short
    # spans: a station that collided a few times sits in a wide window for a while
    assert min(measured) > 0.6 * max(measured)


def test_dcf_loses_nothing_and_a_seed_replays_the_same_medium() -> None:
    def run(seed: int) -> list[tuple[str, int, float]]:
        scheduler = DcfScheduler(frame_bytes=1000, seed=seed)
        for name, size in (("a", 25_500), ("b", 10_000), ("c", 3)):
            scheduler.add_flow(name, name, 12e6)
            scheduler.enqueue(name, size)
        frames = []
        while (frame := scheduler.next()) is not None:
            frames.append((frame.flow, frame.nbytes, frame.airtime_s))
        assert not scheduler.backlogged()
        return frames

    frames = run(7)
    assert {f: sum(n for g, n, _ in frames if g == f) for f in "abc"} == {"a": 25_500, "b": 10_000, "c": 3}
    assert run(7) == frames and run(8) != frames


def test_a_blocked_contender_does_not_contend_and_the_ap_flows_take_turns() -> None:
    scheduler = DcfScheduler(frame_bytes=100, seed=1)
    scheduler.add_flow("a", "a", 1e6)
    scheduler.add_flow("x/down", "ap", 1e6)
    scheduler.add_flow("y/down", "ap", 1e6)
    for flow in ("a", "x/down", "y/down"):
        scheduler.enqueue(flow, 1000)
    assert {scheduler.next(blocked={"a"}).flow for _ in range(6)} == {"x/down", "y/down"}
    assert scheduler.queued["a"] == 1000 and scheduler.queued["x/down"] == scheduler.queued["y/down"] == 700
    assert scheduler.next(blocked={"x/down", "y/down"}).flow == "a"


def test_make_scheduler_names_the_modes() -> None:
    assert isinstance(make_scheduler("dcf"), DcfScheduler)
    assert type(make_scheduler("none")) is AirtimeScheduler
    with pytest.raises(ValueError, match="dcf, none"):
        make_scheduler("csma")


def test_the_planner_charges_contention_to_unscheduled_uplinks_only() -> None:
    import numpy as np

    from toolkit.planning.medium import decide_medium, rate_model
    from toolkit.planning.rates import LinearRates

    rates = np.array([15e6, 6e6, 2.5e6, 5e6])
    devices = np.arange(4)
    free = LinearRates(rates).concurrent_bps(devices)
    contended = LinearRates(rates, contention=True).concurrent_bps(devices)
    assert contended == pytest.approx(free * contention_factor(rates.tolist()))
    assert 0.8 < contention_factor(rates.tolist()) < 0.9
    # a slot plan is unaffected: one sender at a time at its own rate
    assert LinearRates(rates, contention=True).rate_bps(np.ones(4), devices) == pytest.approx(rates)
    airtime = decide_medium("airtime", dict(zip("abcd", rates, strict=True)))
    assert rate_model(airtime, rates, stations_send=True).contention
    assert not rate_model(airtime, rates).contention  # the access point sends alone


def test_rates_beyond_single_frame_wifi_are_not_charged_contention() -> None:
    assert phy_rate_of(saturated_throughput_turns([24e6])[0]) == pytest.approx(24e6)
    assert phy_rate_of(100e6) is None  # more than 8 F / 165.5 us: no 802.11 link without aggregation
    assert contention_factor([1e9, 1e9, 1e9]) == 1.0
