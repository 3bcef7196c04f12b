"""Live resource management: estimates, the automatic scheduler, and slots obeyed on the wire."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_server.auto import AutoScheduler
from edge_server.estimates import LiveEstimates
from edge_server.probe import LinkMeasurement
from edge_server.registry import DeviceRecord
from edge_server.scheduler import FixedScheduler, RoundMeasurements
from edge_server.server import EdgeServer
from tests.agents import start_agents
from tests.servers import server_config
from toolkit.data import load_dataset
from toolkit.errors import UserError
from toolkit.models import load_model
from toolkit.planning.clustering import ClusterBounds
from toolkit.planning.costs import model_costs
from toolkit.profile_format import load_profile
from toolkit.protocol import messages as m

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "epyc-vm-2vcpu" / "lenet5.json"
FINGERPRINT = load_model("lenet5", seed=0).fingerprint()


def record(device: str, profile: bool = True) -> DeviceRecord:
    return DeviceRecord(device, 500, m.Capabilities(), "0/1", PROFILE.read_bytes() if profile else None, True, 0.0)


def link(up_mbit: float, down_mbit: float | None = None, rtt: float = 0.002) -> LinkMeasurement:
    return LinkMeasurement(rtt_s=rtt, clock_offset_s=0.0, up_bps=up_mbit * 1e6, down_bps=(down_mbit or up_mbit) * 1e6)


def timings(forward: float, backward: float, upload: float, up_bytes: int, transit: float, down_bytes: int):
    row = m.IterationTiming(
        iteration=0,
        forward_s=forward,
        backward_s=backward,
        upload_s=upload,
        wait_gradient_s=0.0,
        up_bytes=up_bytes,
        down_bytes=down_bytes,
        gradient_transit_s=transit,
    )
    return m.Timings(iterations=[row] * 5, weights_down_bytes=0, weights_up_bytes=0, turn_s=1.0)


def test_estimates_follow_a_slower_device_and_a_slower_link():
    costs = model_costs(load_profile(PROFILE))
    cut = costs.resolve("pool2")
    estimates = LiveEstimates(smoothing=0.5)
    estimates.add("d", 1.0, link(10))
    predicted = cut.device_forward(32) + cut.device_backward(32)
    # the device computes 4x slower than its profile, and its uplink gives 2.5 Mbit/s
    up_bytes = 200_000
    report = timings(4 * predicted / 2, 4 * predicted / 2, 8 * up_bytes / 2.5e6 + 0.002, up_bytes, 0.05, 50_000)
    for _ in range(6):
        estimates.observe_turn("d", cut, 32, report)
    estimate = estimates.devices["d"]
    assert estimate.speed == pytest.approx(0.25, rel=0.05)
    assert estimate.up_bps == pytest.approx(2.5e6, rel=0.05)
    assert 0 < estimate.rtt_s < 0.1
    state = estimates.fleet_state(["d"])
    assert state.uplink.capacity_bps(np.array([0]))[0] == pytest.approx(estimate.up_bps)


def test_a_slower_link_is_noticed_from_the_weight_upload_when_smashed_data_is_small():
    """At a late cut the smashed data fits a link's burst allowance and says nothing of its
    rate; the turn's weight upload is the one large transfer, and it must count."""
    cut = model_costs(load_profile(PROFILE)).resolve("fc2")
    estimates = LiveEstimates(smoothing=0.5)
    estimates.add("d", 1.0, link(16))
    small = timings(0.01, 0.01, 0.003, 10_000, 0.01, 10_000)  # 10 kB at "line speed"
    estimates.observe_turn("d", cut, 32, small)
    assert estimates.devices["d"].up_bps == pytest.approx(16e6)  # nothing to learn from it
    weights = 240_000
    slow = small.model_copy(
        update={
            "weights_up_bytes": weights,
            "weights_up_start_at": 1000.0,
            "weights_up_end_at": 1000.0 + 8 * weights / 0.3e6 + 0.002,
        }
    )
    for _ in range(8):
        estimates.observe_turn("d", cut, 32, slow)
    assert estimates.devices["d"].up_bps == pytest.approx(0.3e6, rel=0.05)


def scheduler(**overrides) -> AutoScheduler:
    values = dict(model_fingerprint=FINGERPRINT, batch_size=32, iterations=5, bounds=ClusterBounds(min_clusters=2))
    values.update(overrides)
    return AutoScheduler(**values)


def test_auto_plan_has_balanced_clusters_and_non_overlapping_slots():
    auto = scheduler()
    devices = [record(f"dev{i}") for i in range(6)]
    for i, device in enumerate(devices):
        auto.add_device(device, link([20, 5, 1][i % 3]), devices)
    plan = auto.plan(0, devices)
    assert sorted(itertools.chain.from_iterable(plan.clusters)) == [d.id for d in devices]
    assert len(plan.clusters) == 2 and all(len(c) == 3 for c in plan.clusters)
    assert plan.predicted_latency_s == pytest.approx(sum(t.predicted_turn_s for t in plan.timing.values()))
    # the least any plan could take is below the plan's own figure, and says what binds it
    assert 0 < plan.bound_s < plan.predicted_latency_s
    assert plan.decision["bound"]["bound_s"] == plan.bound_s and plan.decision["bound"]["binding"]
    for index, members in enumerate(plan.clusters):
        slots = sorted((plan.grants[d].slot_offset_s, plan.grants[d].slot_duration_s) for d in members)
        for (start, duration), (next_start, _) in itertools.pairwise(slots):
            assert start + duration <= next_start + 1e-12
        assert sorted(plan.timing[index].downlink_order) == sorted(members)
        # the bulk transfers take turns: weights down, gradients and weights up, one device at a time
        model_bits = 8 * auto.costs.cut(plan.cut).device_model_bytes
        for offsets, rate in (
            (plan.timing[index].weights_down_offsets, "down_bps"),
            ({d: plan.grants[d].weights_slot_offset_s for d in members}, "up_bps"),
        ):
            assert sorted(offsets) == sorted(members)
            turns = sorted((offset, d) for d, offset in offsets.items())
            for (start, device), (next_start, _) in itertools.pairwise(turns):
                duration = model_bits / getattr(auto.estimates.devices[device], rate)
                assert next_start == pytest.approx(start + duration, rel=1e-9, abs=1e-12)
        assert sorted(plan.timing[index].gradient_offsets) == sorted(members)
    assert plan.decision["cut_selection"]["reason"] == "first round"
    json.dumps(plan.decision)  # goes to metrics.jsonl as is


def test_auto_moves_the_cut_when_the_uplinks_collapse():
    auto = scheduler(iterations=20, reselect_every=100, drift_threshold=0.3)
    devices = [record(f"dev{i}") for i in range(4)]
    for device in devices:
        auto.add_device(device, link(1000), devices)
        auto.estimates.devices[device.id].speed = 0.05  # slow devices on a fast link: cut early
    auto.estimates.server_speed = 20.0
    first = auto.plan(0, devices)
    for estimate in auto.estimates.devices.values():
        estimate.up_bps = estimate.down_bps = 0.05e6
    second = auto.plan(1, devices)
    assert "drifted" in second.decision["cut_selection"]["reason"]
    costs = auto.costs
    assert costs.cut(second.cut).smashed_bytes_per_sample < costs.cut(first.cut).smashed_bytes_per_sample


def test_a_pinned_cut_is_kept_and_devices_without_profiles_start_at_reference_speed():
    auto = scheduler(fixed_cut=6)
    devices = [record("a"), record("b", profile=False)]
    for device in devices:
        auto.add_device(device, link(10), devices)
    assert auto.estimates.devices["b"].speed == 1.0
    assert auto.plan(0, devices).cut == 6
    assert auto.plan(1, devices).cut == 6


def test_a_device_training_elsewhere_than_its_profile_was_measured_is_named(caplog):
    """A Jetson that registers training on CUDA with a profile measured on its CPU: the plan's
    figures for it are wrong until its rounds measure it, and the log says why."""
    auto = scheduler()
    gpu = record("a")
    gpu.capabilities = m.Capabilities(accelerator="cuda", accelerator_name="cuda:0 (Orin)")
    devices = [gpu, record("b")]
    with caplog.at_level(logging.WARNING, logger="cpsl.server"):
        for device in devices:
            auto.add_device(device, link(10), devices)
    warnings = [r.getMessage() for r in caplog.records if "was measured on" in r.getMessage()]
    assert warnings == [
        "auto: a's profile was measured on cpu but it trains on cuda: its compute is mispredicted "
        "until its first rounds measure its speed (profile it where its agent trains: "
        "cpsl-profile --device)"
    ]


def test_auto_without_any_profile_says_what_to_do():
    from toolkit.errors import UserError

    auto = scheduler()
    with pytest.raises(UserError, match="needs a profile"):
        auto.add_device(record("a", profile=False), link(10), [record("a", profile=False)])


# slots on the wire ------------------------------------------------------------------------------


class KnownLinkScheduler(AutoScheduler):
    """Real probes, but the planned rate is what a 4 Mbit/s shared link would give, so the
    slots are long (hundreds of ms) against loopback's jitter: the test checks that the
    agents keep to them, on the real broker, with real training."""

    def add_device(self, record, link, devices):
        super().add_device(record, LinkMeasurement(link.rtt_s, link.clock_offset_s, 4e6, 8e6), devices)


def run_cluster(broker: str, tmp_path, scheduler, **overrides) -> EdgeServer:
    data = load_dataset("builtin:digits", seed=0)
    agents, _ = start_agents(broker, data, 3, profile=PROFILE.read_bytes())
    settings = dict(min_devices=3, batch_size=16, iterations=4, cut=1, run_id="slots", iteration_timeout_s=20)
    config = server_config(broker, tmp_path, **{**settings, **overrides})
    server = EdgeServer(config, load_model("lenet5", seed=0), data, scheduler=scheduler)
    try:
        server.run()
    finally:
        for agent in agents:
            agent.close()
    return server


def upload_intervals(server: EdgeServer, round_: int) -> dict[int, list[tuple[float, float, str]]]:
    by_iteration: dict[int, list] = {}
    for (r, device), report in server.timings.items():
        if r == round_:
            for row in report.iterations:
                by_iteration.setdefault(row.iteration, []).append((row.upload_start_at, row.upload_end_at, device))
    return by_iteration


def overlaps(intervals) -> int:
    ordered = sorted(intervals)
    return sum(1 for (_, end, _), (start, _, _) in itertools.pairwise(ordered) if start < end)


@pytest.mark.slow
def test_uploads_keep_to_their_slots_and_never_overlap(broker, tmp_path):
    auto = KnownLinkScheduler(FINGERPRINT, 16, 4, ClusterBounds(min_clusters=1), fixed_cut=1, medium="airtime")
    server = run_cluster(broker, tmp_path, auto)
    records = server.history
    assert len(records) == 2 and all(r["slots"]["iterations"] == 12 for r in records)
    for round_ in range(2):
        intervals = upload_intervals(server, round_)
        assert len(intervals) == 4
        for iteration, rows in intervals.items():
            assert len(rows) == 3
            assert overlaps(rows) == 0, f"round {round_} iteration {iteration}: uploads overlap {sorted(rows)}"
    # the prediction sits next to the measurement in metrics.jsonl
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["predicted_latency_s"] > 0 and "grants" in line["decision"] for line in lines)
    # and the distance to the limit: the bound at the estimated rates over the measured round (here
    # above 1: the plan's 4 Mbit/s is far below what loopback moves, and the bound believes the plan)
    assert all(line["efficiency"] > 0 and line["efficiency"] == line["bound_s"] / line["latency_s"] for line in lines)
    # and the round's timeline: every device's iteration, its phases in the order they happen
    slack = 0.05  # the server's estimate of each device's clock offset, on loopback
    for line in lines:
        rows = line["timeline"]
        assert sorted((r["device"], r["iteration"]) for r in rows) == sorted(
            (d, i) for d in ("dev0", "dev1", "dev2") for i in range(4)
        )
        for r in rows:
            assert r["forward_start"] <= r["upload_start"] <= r["upload_end"]
            assert r["upload_end"] <= r["smashed_arrived"] + slack
            assert r["smashed_arrived"] <= r["server_step"][0] <= r["server_step"][1] <= r["gradient_sent"]
            assert r["slot_start"] - slack <= r["upload_start"] and r["slot_start"] < r["slot_end"]
            assert r["gradient_sent"] <= line["latency_s"]  # server stamps: within the round


def test_without_slots_the_same_uploads_do_overlap(broker, tmp_path):
    """The control: the overlap check above can fail -- without slots, devices send together."""
    server = run_cluster(broker, tmp_path, FixedScheduler("cpsl", cut=1, clusters=1))
    total = sum(overlaps(rows) for round_ in range(2) for rows in upload_intervals(server, round_).values())
    assert total > 0


# what makes the plan come true -------------------------------------------------------------------


@pytest.mark.slow
def test_agent_warm_up_takes_the_first_optimiser_steps_cost_before_training():
    """The first SGD step of a process imports torch._dynamo (~1 s of CPU; 12 s on a board
    at 8% of a core). After the agent's warm-up, the first real step must be cheap."""
    code = (
        "import time, torch\n"
        "from firmware_agent.agent import warm_up_optimizer\n"
        "from toolkit.training import make_optimizer\n"
        "warm_up_optimizer()\n"
        "layer = torch.nn.Linear(4, 4)\n"
        "layer(torch.zeros(2, 4)).sum().backward()\n"
        "started = time.process_time()\n"
        "make_optimizer(list(layer.parameters()), 0.1, 0.0, 0.0).step()\n"
        "print(time.process_time() - started)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert float(result.stdout) < 0.1


def test_server_sends_bulk_transfers_in_slot_order_each_when_its_slot_opens():
    from edge_server.rounds import paced

    offsets = {"late": 0.20, "early": 0.0, "middle": 0.10}
    start = time.monotonic()
    sent = [
        (device, time.monotonic() - start) for device in paced(["late", "early", "middle", "free"], offsets, start, 10)
    ]
    assert [device for device, _ in sent] == ["free", "early", "middle", "late"]
    for device, at in sent:
        assert at >= offsets.get(device, 0.0) - 1e-3
    assert sent[-1][1] < 0.20 + 0.15


# the medium -------------------------------------------------------------------------------------


def probed(medium: str, together_up: dict[str, float], together_down: dict[str, float]) -> AutoScheduler:
    from edge_server.probe import TogetherMeasurement

    auto = scheduler(fixed_cut=6, medium=medium)
    devices = [record("a"), record("b"), record("c")]
    for device, mbit in zip(devices, (10, 5, 2), strict=True):
        auto.add_device(device, link(mbit), devices)
    assert auto.needs_medium_probe(["a", "b", "c"]) == (medium != "airtime")
    auto.set_medium(TogetherMeasurement(together_up, together_down))
    assert not auto.needs_medium_probe(["a", "b", "c"])
    return auto


def test_on_a_shared_medium_the_plan_lets_transfers_overlap_and_logs_the_evidence_once():
    # each device kept its cap when all sent at once: bytes are shared, overlap is free
    kept = {"a": 10e6, "b": 5e6, "c": 2e6}
    auto = probed("auto", kept, kept)
    devices = [record("a"), record("b"), record("c")]
    first, second = auto.plan(0, devices), auto.plan(1, devices)
    assert first.decision["medium"] == {"uplink": "shared", "downlink": "shared"}
    evidence = first.decision["medium_evidence"]["uplink"]
    assert evidence["utilisation"] == pytest.approx(3.0) and evidence["capacity_bps"] == pytest.approx(17e6)
    assert "medium_evidence" not in second.decision
    assert all(g.slot_duration_s is None and g.weights_slot_offset_s is None for g in first.grants.values())
    assert all(not t.gradient_offsets and not t.weights_down_offsets for t in first.timing.values())
    assert first.predicted_latency_s > 0
    # a growing fleet is probed together again
    assert auto.needs_medium_probe(["a", "b", "c", "d"]) is False  # d is not probed alone yet
    auto.add_device(record("d"), link(4), [*devices, record("d")])
    assert auto.needs_medium_probe(["a", "b", "c", "d"])


def test_on_an_airtime_medium_the_plan_gives_slots():
    # together the devices got equal throughput, 1 / sum(1/r): one air time between them
    equal = 1 / (1 / 10e6 + 1 / 5e6 + 1 / 2e6)
    auto = probed("auto", dict.fromkeys("abc", equal), dict.fromkeys("abc", equal))
    plan = auto.plan(0, [record("a"), record("b"), record("c")])
    assert plan.decision["medium"] == {"uplink": "airtime", "downlink": "airtime"}
    assert plan.decision["medium_evidence"]["downlink"]["utilisation"] == pytest.approx(1.0)
    # every cluster of two or more gets slots; a device alone contends with nobody, and the plan
    # says what slots would cost or save each cluster
    shared = [(i, c) for i, c in enumerate(plan.clusters) if len(c) > 1]
    assert shared and all(plan.grants[d].slot_duration_s is not None for _, c in shared for d in c)
    assert all(plan.timing[i].gradient_offsets for i, _ in shared)
    assert len(plan.decision["slots"]) == len(plan.clusters)
    assert plan.decision["plan"] == {"clusters": "planned", "slots": True, "iteration_flow": True}


def test_overlap_is_predicted_faster_than_slots_on_a_shared_medium():
    kept = {"a": 10e6, "b": 5e6, "c": 2e6}
    devices = [record("a"), record("b"), record("c")]
    shared = probed("auto", kept, kept).plan(0, devices).predicted_latency_s
    forced = probed("airtime", kept, kept)
    assert forced.plan(0, devices).decision["medium"]["uplink"] == "airtime"
    assert shared < forced.plan(1, devices).predicted_latency_s


def test_the_cut_is_chosen_again_once_the_labels_show_the_fleets_skew():
    auto = scheduler()
    devices = [record(f"dev{i}") for i in range(4)]
    for device in devices:
        auto.add_device(device, link(10), devices)
    first = auto.plan(0, devices).decision["cut_selection"]
    assert first["objective"] == "time-to-accuracy" and first["skew"] == 0.0
    assert "cut_selection" not in auto.plan(1, devices).decision
    # each device trained on two classes of its own: disjoint label sets, skew 0.75
    counts = {d.id: np.bincount([2 * i, 2 * i + 1] * 50, minlength=10) for i, d in enumerate(devices)}
    auto.observe(RoundMeasurements(auto.cut, {}, [], label_counts=counts))
    assert auto.label_skew([d.id for d in devices]) == pytest.approx(0.75)
    again = auto.plan(2, devices).decision["cut_selection"]
    assert again["reason"].startswith("label skew 0.75") and again["skew"] == pytest.approx(0.75)
    # the relative rounds grow with the layers left to averaging and with skew
    rounds = again["relative_rounds"]
    assert list(rounds.values()) == sorted(rounds.values())
    assert all(rounds[c] >= first["relative_rounds"][c] for c in rounds)


def test_the_first_plan_carries_the_per_scheme_advice_for_the_probed_fleet(caplog):
    auto = scheduler()
    devices = [record(f"dev{i}") for i in range(4)]
    for device, mbit in zip(devices, (10, 5, 2, 8), strict=True):
        auto.add_device(device, link(mbit), devices)
    with caplog.at_level("WARNING", logger="cpsl.server"):
        first = auto.plan(0, devices)
    advice = first.decision["advice"]
    assert [row["scheme"] for row in advice["schemes"]] == ["sl", "sfl", "fl", "cpsl-fixed", "cpsl-auto"]
    assert advice["schemes"][0]["cut"] == "pool2" and "rounds to the target unknown" in advice["basis"]
    assert sum("advice: " in r.message for r in caplog.records) == 7  # header, five schemes, verdict
    assert "advice" not in auto.plan(1, devices).decision


def test_a_device_that_comes_back_is_measured_again_before_it_is_planned():
    """Its goodbye (or will), then a new registration: the registry reports it returned, the
    scheduler forgets its link and clock, and the server's next probe measures it and the
    medium again. A second registration of the same life while online is not a return."""
    from edge_server.registry import Registry
    from tests.frames import received
    from toolkit.protocol import Kind

    registry = Registry()
    first, second = "a" * 32, "b" * 32
    register = m.Register(session=first, num_samples=5, capabilities=m.Capabilities())
    registry.update(received(Kind.REGISTER, register))
    registry.update(received(Kind.REGISTER, register))  # re-announced to a new server: same life, online
    assert registry.take_returned() == set()
    registry.update(received(Kind.OFFLINE, m.Offline(session=first)))
    registry.update(received(Kind.REGISTER, register))  # back after a blip, same life
    assert registry.take_returned() == {"dev0"} and registry.take_returned() == set()
    registry.update(received(Kind.REGISTER, m.Register(session=second, num_samples=5, capabilities=m.Capabilities())))
    assert registry.take_returned() == {"dev0"}  # a new life (agent restarted) while still listed online

    auto = scheduler()
    devices = [record(f"dev{i}") for i in range(3)]
    for device in devices:
        auto.add_device(device, link(10), devices)
    auto.media.fleet_size = 3
    assert not auto.needs_medium_probe([d.id for d in devices])
    auto.forget("dev1")
    assert auto.needs_probe("dev1") and not auto.needs_probe("dev0")
    auto.add_device(devices[1], link(2), devices)
    assert auto.needs_medium_probe([d.id for d in devices])  # the medium is measured again with it
    assert auto.estimates.devices["dev1"].up_bps == pytest.approx(2e6)


def test_a_stepped_device_clock_is_measured_again_not_smoothed_in():
    """Transits off by a clock step (the device's clock jumped 2 s ahead after the probe) make
    the device be probed again; ordinary jitter of a few ms is smoothed in as before."""
    auto = scheduler(iterations=5)
    devices = [record("dev0"), record("dev1")]
    for device in devices:
        auto.add_device(device, link(10, rtt=0.004), devices)
    cut = auto.costs.resolve("pool2").cut
    server_now = 1_000.0

    def report(clock_error_s: float) -> tuple[m.Timings, dict[int, float]]:
        """Each iteration: 1 ms each way plus transfer; the device clock off by clock_error_s."""
        rows, arrivals = [], {}
        for i in range(5):
            start = server_now + i  # server clock
            up = 8 * 20_000 / 10e6 + 0.001
            rows.append(
                m.IterationTiming(
                    iteration=i,
                    forward_s=0.01,
                    backward_s=0.01,
                    upload_s=up,
                    wait_gradient_s=0.0,
                    up_bytes=20_000,
                    down_bytes=20_000,
                    upload_start_at=start + clock_error_s,
                    gradient_transit_s=max(0.0, 8 * 20_000 / 10e6 + 0.001 + clock_error_s),
                )
            )
            arrivals[i] = start + up
        return m.Timings(iterations=rows, weights_down_bytes=0, weights_up_bytes=0, turn_s=1.0), arrivals

    steady, steady_arrivals = report(0.002)
    stepped, stepped_arrivals = report(2.0)
    auto.plan(0, devices)  # two clusters of one: each sends alone
    auto.observe(
        RoundMeasurements(
            cut, {"dev0": steady, "dev1": stepped}, [(64, 0.01)], {"dev0": steady_arrivals, "dev1": stepped_arrivals}
        )
    )
    assert auto.needs_probe("dev1") and not auto.needs_probe("dev0")
    assert abs(auto.estimates.devices["dev0"].clock_offset_s) < 0.01

    # devices that contended for the air (no slots, one cluster): a transit that includes the wait
    # for the medium says nothing about the clock, and nobody is probed again for it
    crowded = scheduler(iterations=5, slots=False, bounds=ClusterBounds(min_clusters=1))
    for device in devices:
        crowded.add_device(device, link(10, rtt=0.004), devices)
    plan = crowded.plan(0, devices)
    assert plan.clusters == [["dev0", "dev1"]] and not plan.decision["plan"]["slots"]
    waited, waited_arrivals = report(0.06)
    crowded.observe(
        RoundMeasurements(
            cut, {"dev0": steady, "dev1": waited}, [(64, 0.01)], {"dev0": steady_arrivals, "dev1": waited_arrivals}
        )
    )
    assert not crowded.needs_probe("dev1") and crowded.estimates.devices["dev1"].clock_step_s is None
    assert crowded.estimates.devices["dev1"].rtt_s == pytest.approx(0.004)


def test_the_first_measurement_replaces_the_profiles_prior_and_later_ones_are_smoothed():
    """A profile taken on another occasion can be several times off; blending from it would
    take rounds to converge while every plan in between is wrong."""
    cut = model_costs(load_profile(PROFILE)).resolve("pool2")
    estimates = LiveEstimates(smoothing=0.5)
    estimates.add("d", 1.0, link(10))
    predicted = cut.device_forward(32) + cut.device_backward(32)
    estimates.observe_turn("d", cut, 32, timings(predicted / 8, predicted / 8, 0.01, 10_000, 0.01, 10_000))
    assert estimates.devices["d"].speed == pytest.approx(4.0, rel=1e-6)
    estimates.observe_turn("d", cut, 32, timings(predicted / 2, predicted / 2, 0.01, 10_000, 0.01, 10_000))
    assert estimates.devices["d"].speed == pytest.approx(2.0, rel=1e-6)  # sqrt(4 * 1): smoothed in log space

    samples, seconds = 32, cut.server_step(32) / 8
    estimates.observe_server(cut, samples, seconds)
    assert estimates.server_speed == pytest.approx(8.0, rel=1e-6)
    estimates.observe_server(cut, samples, cut.server_step(32) / 2)
    assert estimates.server_speed == pytest.approx(4.0, rel=1e-6)


def test_resume_restores_the_measured_speeds_and_fixed_costs_and_probes_links_again():
    """--resume: what the rounds taught (device and server speed, fixed costs) comes back; a
    device's link is whatever its new probe says."""
    before = scheduler()
    devices = [record("a"), record("b")]
    for device in devices:
        before.add_device(device, link(10), devices)
    before.plan(0, devices)
    before.estimates.devices["a"].speed, before.estimates.devices["a"].speed_measured = 3.5, True
    before.estimates.server_speed, before.estimates.server_measured = 7.0, True
    before.fixed_costs.iteration_s, before.fixed_costs.observed_rounds = 0.02, 4
    saved = json.loads(json.dumps(before.state_dict()))  # goes through run.json's JSON

    after = scheduler()
    after.load_state_dict(saved)
    for device in devices:
        after.add_device(device, link(2), devices)
    assert after.estimates.devices["a"].speed == 3.5 and after.estimates.devices["a"].speed_measured
    assert after.estimates.devices["b"].speed == before.estimates.devices["b"].speed  # never measured: profile
    assert after.estimates.devices["a"].up_bps == pytest.approx(link(2).up_bps)  # probed again
    assert after.estimates.server_speed == 7.0
    assert after.fixed_costs.iteration_s == 0.02 and after.fixed_costs.observed_rounds == 4
    assert after.cut == before.cut

    saved["device_speeds"] = {"a": -1}
    with pytest.raises(UserError, match="not --auto's"):
        scheduler().load_state_dict(saved)


def test_states_planned_on_profile_figures_leave_the_saa_window_once_speeds_are_measured():
    auto = scheduler()
    devices = [record("a"), record("b")]
    for device in devices:
        auto.add_device(device, link(10), devices)
    plan = auto.plan(0, devices)
    assert len(auto.history) == 1
    cost = auto.costs.cut(plan.cut)
    predicted = cost.device_forward(32) + cost.device_backward(32)
    report = timings(predicted / 8, predicted / 8, 0.01, 10_000, 0.01, 10_000)  # 4x the profile's speed
    turns = [{"measured_s": 9.0, "predicted_turn_s": 3.0}]
    step = [(64, cost.server_step(64) / 3)]
    auto.observe(RoundMeasurements(plan.cut, {"a": report, "b": report}, step, turns=turns, latency_s=9.0))
    assert auto.history == []
    assert auto.fixed_costs.observed_rounds == 0  # its miss was the profiles' error, not a fixed cost
    second = auto.plan(1, devices)
    assert second.decision["cut_selection"]["samples"] == 1  # chosen again, on the measured state alone
    third = auto.plan(2, devices)
    assert "cut_selection" not in third.decision  # and not again: nothing drifted since
    auto.observe(RoundMeasurements(second.cut, {"a": report, "b": report}, step, turns=turns, latency_s=9.0))
    assert auto.fixed_costs.observed_rounds == 1  # a round planned on measurements calibrates


def test_the_planner_counts_compressed_bytes_and_codec_time_as_measured():
    """Issue #14 item 2: with compression on, the uplink and downlink are planned at the wire
    bytes the turns measured (not fp32's), and the device's encode/decode time is added to its
    compute, at a per-byte rate that carries to the other cuts."""
    from toolkit.planning.latency import SplitProblem, TrainingSettings

    costs = model_costs(load_profile(PROFILE))
    cut = costs.resolve("pool1")
    estimates = LiveEstimates(smoothing=0.5, compressed=True, uplink_ratio=0.25, downlink_ratio=0.25)
    estimates.add("d", 1.0, link(10))
    fp32_up, fp32_down = cut.uplink_bytes(32), cut.downlink_bytes(32)
    predicted = cut.device_forward(32) + cut.device_backward(32)
    row = m.IterationTiming(
        iteration=0,
        forward_s=predicted / 2,
        backward_s=predicted / 2,
        upload_s=0.01,
        wait_gradient_s=0.0,
        up_bytes=int(0.15 * fp32_up),  # int8 + zstd on this data: 15% of fp32 up
        down_bytes=int(0.5 * fp32_down),  # fp16 gradients
        encode_s=0.003,
        decode_s=0.001,
    )
    report = m.Timings(iterations=[row] * 5, weights_down_bytes=0, weights_up_bytes=0, turn_s=1.0)
    for _ in range(8):
        estimates.observe_turn("d", cut, 32, report)
    assert estimates.uplink_ratio == pytest.approx(0.15, rel=0.02)
    assert estimates.downlink_ratio == pytest.approx(0.5, rel=0.02)
    assert estimates.devices["d"].codec_s_per_byte == pytest.approx(0.004 / fp32_down, rel=0.01)
    state = estimates.fleet_state(["d"])
    settings = TrainingSettings(32, 5, 1.0, estimates.uplink_ratio, estimates.downlink_ratio)
    plain = SplitProblem.build(cut, state, TrainingSettings(32, 5))
    packed = SplitProblem.build(cut, state, settings)
    assert packed.uplink_bits == pytest.approx(0.15 * plain.uplink_bits, rel=0.02)
    assert packed.downlink_bits == pytest.approx(0.5 * plain.downlink_bits, rel=0.02)
    assert packed.forward_s[0] == pytest.approx(state.speed[0] ** -1 * cut.device_forward(32) + 0.004, rel=0.01)
    later = costs.resolve("pool2")  # a cut with a quarter of the data: a quarter of the codec time
    codec_later = SplitProblem.build(later, state, settings).forward_s[0] - later.device_forward(32) / state.speed[0]
    assert codec_later == pytest.approx(0.004 * later.downlink_bytes(32) / fp32_down, rel=0.01)
    # the server's side: decoding smashed data and encoding gradients, per sample of the step
    estimates.observe_server_codec(0.002, fp32_down)
    server = TrainingSettings(32, 5, 1.0, estimates.uplink_ratio, estimates.downlink_ratio, 0.002 / fp32_down)
    extra = SplitProblem.build(cut, state, server).server_s(2) - SplitProblem.build(cut, state, settings).server_s(2)
    assert estimates.server_codec_s_per_byte == pytest.approx(0.002 / fp32_down)
    assert extra == pytest.approx(2 * 0.002, rel=0.01)  # a cluster of two: twice one batch's codec time


def test_compression_shortens_the_plan_on_a_slow_link():
    devices = [record(f"dev{i}") for i in range(4)]
    predicted = {}
    for encodings in (("fp32", "fp32"), ("int8", "fp16")):
        auto = scheduler(fixed_cut=2, compression=encodings)
        for device in devices:
            auto.add_device(device, link(0.5), devices)
        predicted[encodings[0]] = auto.plan(0, devices)
    assert predicted["int8"].decision["compression"]["uplink_ratio"] == 0.25  # nominal until measured
    assert "compression" not in predicted["fp32"].decision
    assert predicted["int8"].predicted_latency_s < 0.5 * predicted["fp32"].predicted_latency_s


def test_compress_auto_takes_the_fastest_encodings_within_the_error_budget():
    import torch

    from toolkit.compression import CANDIDATES, trial

    generator = torch.Generator().manual_seed(0)
    samples = [(torch.relu(torch.randn(32, 6, 14, 14, generator=generator)), torch.randn(32, 6, 14, 14) * 1e-3)] * 2
    trials = [trial(samples, s, g) for s, g in CANDIDATES]
    devices = [record(f"dev{i}") for i in range(4)]
    chosen = {}
    for budget in (0.0, 0.01):
        auto = scheduler(fixed_cut=2, compression_auto=True, compression_budget=budget)
        for device in devices:
            auto.add_device(device, link(0.5), devices)
        auto.plan(0, devices)
        assert auto.wants_encoding_trials
        table = auto.choose_encodings(trials)
        assert not auto.wants_encoding_trials and table["chosen"] == list(auto.compression)
        rows = {(row["smashed"], row["gradient"]): row for row in table["trials"]}
        fastest = min((r for r in rows.values() if r["within_budget"]), key=lambda r: r["predicted_round_s"])
        assert table["chosen"] == [fastest["smashed"], fastest["gradient"]]
        chosen[budget] = (auto, rows)
    lossless, _ = chosen[0.0]
    assert lossless.compression == ("fp32", "fp32") and not lossless.estimates.compressed  # every other one errs
    lossy, rows = chosen[0.01]
    assert lossy.compression[0].startswith("int8")  # on a 0.5 Mbit/s link the fewest bytes win
    assert rows[lossy.compression]["predicted_round_s"] < 0.5 * rows[("fp32", "fp32")]["predicted_round_s"]
    assert lossy.estimates.uplink_ratio == rows[lossy.compression]["uplink_ratio"]
    assert lossy.plan(1, devices).decision["compression"]["encodings"] == list(lossy.compression)
    restored = scheduler(fixed_cut=2, compression_auto=True)
    restored.load_state_dict(lossy.state_dict())  # --resume keeps the choice
    assert restored.compression == lossy.compression and not restored.wants_encoding_trials


@pytest.mark.slow
def test_a_live_run_with_compress_auto_tries_the_first_round_and_trains_on_the_choice(broker, tmp_path):
    auto = KnownLinkScheduler(
        FINGERPRINT, 8, 2, ClusterBounds(min_clusters=1), fixed_cut=2, medium="airtime", compression_auto=True
    )
    # fp32 at 4 Mbit/s in slots makes round 0 long: short turns
    server = run_cluster(
        broker,
        tmp_path,
        auto,
        batch_size=8,
        iterations=2,
        cut=2,
        run_id="compress-auto",
        compress_smashed="auto",
        compress_gradient="auto",
    )
    first, second = server.history
    assert "encoding_choice" not in first and "compression" not in first["decision"]  # fp32 while it learns
    choice = second["encoding_choice"]
    assert len(choice["trials"]) == 6 and choice["chosen"] == list(auto.compression)
    assert auto.compression != ("fp32", "fp32")  # 4 Mbit/s for LeNet-5's conv1 output: compression pays
    assert all(r["rejected_messages"] == {} and r["dropped"] == [] for r in server.history)
    assert second["bytes"]["smashed"] < 0.6 * first["bytes"]["smashed"]  # the choice is used at once
    assert second["train_loss"] < first["train_loss"]  # it trains on the compressed data
    assert auto.estimates.server_codec_s_per_byte > 0  # the server's codec time, measured in the round


def heterogeneous(regroup: bool) -> tuple[AutoScheduler, list[DeviceRecord]]:
    """Eight devices on one air: CPUs and links each spread 10x, not lined up."""
    auto = scheduler(fixed_cut=6, medium="airtime", regroup=regroup, bounds=ClusterBounds(min_clusters=2))
    devices = [record(f"dev{i}") for i in range(8)]
    for i, device in enumerate(devices):
        auto.add_device(device, link([20, 6, 2][(i // 3 + i) % 3]), devices)
        auto.estimates.devices[device.id].speed = [2.0, 0.6, 0.2][i % 3]
        auto.estimates.devices[device.id].speed_measured = True
    return auto, devices


def test_regrouping_by_the_turn_plan_never_loses_to_the_clustering_and_is_what_runs():
    auto, devices = heterogeneous(regroup=True)
    plan = auto.plan(0, devices)
    regrouping = plan.decision["regrouping"]
    assert regrouping["regrouped_s"] <= regrouping["clustering_s"] * (1 + 1e-9)
    # what it scored is what the plan predicts: the sum of the turns as they will run
    assert plan.predicted_latency_s == pytest.approx(regrouping["regrouped_s"], rel=1e-9)
    assert sorted(itertools.chain.from_iterable(plan.clusters)) == sorted(d.id for d in devices)
    assert all(len(c) <= 5 for c in plan.clusters) and len(plan.clusters) >= 2
    plain, _ = heterogeneous(regroup=False)
    unregrouped = plain.plan(0, devices)
    assert "regrouping" not in unregrouped.decision
    assert unregrouped.predicted_latency_s == pytest.approx(regrouping["clustering_s"], rel=1e-9)
    assert plan.predicted_latency_s <= unregrouped.predicted_latency_s * (1 + 1e-9)


def test_regrouping_finds_the_best_partition_of_a_small_fleet():
    """Six devices, two clusters of up to five: the regrouping's partition is the best of all 31."""
    from toolkit.planning.latency import SplitProblem

    auto, devices = heterogeneous(regroup=True)
    devices = devices[:6]
    auto.bounds = ClusterBounds(max_cluster_size=5, min_clusters=2, max_clusters=2)
    plan = auto.plan(0, devices)
    view = auto.view(devices)
    problem = SplitProblem.build(auto.costs.cut(auto.cut), view.state, view.settings)
    one_way = np.array([auto.estimates.devices[d].rtt_s / 2 for d in view.ids])

    def turn(rows):
        rows = np.asarray(rows)
        return auto.predicted_turn_s(view.state, problem, rows, one_way[rows])

    best = min(
        turn(list(left)) + turn([i for i in range(6) if i not in left])
        for k in range(1, 6)
        for left in itertools.combinations(range(6), k)
    )
    assert plan.decision["regrouping"]["regrouped_s"] == pytest.approx(best, rel=1e-9)
    assert plan.predicted_latency_s == pytest.approx(best, rel=1e-9)
    assert plan.decision["regrouping"]["search"] == "exact"
    # no partition's turns as planned beat the bound of clusters taking turns, which is tighter
    # than the bound of any schedule here: the slow CPUs' cluster leaves the air idle
    bound = plan.decision["bound"]
    assert bound["any_schedule_s"] < bound["clusters_s"] == bound["bound_s"] <= best
    assert plan.bound_s == bound["bound_s"]
