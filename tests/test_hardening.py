"""Every network-input path bounded and counted, without a broker: codec, JSON, chunks, inbox,
topics, sessions, the aggregation strategy and the server step."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from edge_server.registry import Registry
from edge_server.strategy import RobustAggregation, Upload
from tests.frames import frame as make_frame
from tests.frames import received
from toolkit.protocol import Kind, ProtocolError, Reassembler, decode, make_header, split, topics
from toolkit.protocol import messages as m
from toolkit.protocol.bounded_json import JsonLimitError, load_bounded_json
from toolkit.protocol.codec import MAGIC
from toolkit.protocol.endpoint import Endpoint, reason_key
from toolkit.training import server_step

SESSION = "0123456789abcdef0123456789abcdef"


def test_deeply_nested_json_is_a_one_line_error_not_a_recursion_error() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(JsonLimitError, match="not valid JSON"):
        load_bounded_json(deep, max_bytes=1 << 20)
    with pytest.raises(JsonLimitError, match="nests 40 levels"):
        load_bounded_json(b"[" * 40 + b"]" * 40, max_bytes=1 << 20, max_depth=32)
    with pytest.raises(JsonLimitError, match="exceeds"):
        load_bounded_json(b"[]" * 100, max_bytes=10)
    with pytest.raises(JsonLimitError):
        load_bounded_json(b'{"x": NaN}', max_bytes=100)
    assert load_bounded_json(b'{"a": [1, {"b": 2}]}', max_bytes=100) == {"a": [1, {"b": 2}]}


def test_a_frame_whose_header_nests_deeply_is_rejected() -> None:
    meta = b'{"header":' + b"[" * 5000 + b"]" * 5000 + b',"body":{},"tensors":[]}'
    frame = MAGIC + bytes([1, int(Kind.HEARTBEAT)]) + len(meta).to_bytes(4, "big") + meta
    with pytest.raises(ProtocolError, match="header"):
        decode(frame)


def test_reassembly_budgets_refuse_a_greedy_sender_and_not_the_others() -> None:
    reassembler = Reassembler(max_frame_bytes=10_000, max_bytes_per_sender=12_000, max_transfers_per_sender=4)
    big = make_frame(Kind.WEIGHTS_UP, m.WeightsUp(num_samples=1), tensors={"w": torch.zeros(2000)})
    greedy = [split(big, make_header("r", "dev0", seq=s), 3000) for s in range(3)]
    assert reassembler.add(decode(greedy[0][0])) is None
    with pytest.raises(ProtocolError, match="would hold more than"):
        reassembler.add(decode(greedy[1][0]))  # two transfers of ~8 KB exceed dev0's 12 KB
    honest = split(big, make_header("r", "dev1", seq=1), 3000)
    results = [reassembler.add(decode(piece)) for piece in honest]
    assert results[-1] == big and all(r is None for r in results[:-1])
    assert reassembler.in_flight == 1  # dev0's first transfer only; dev1's is done and released


def test_reassembly_counts_each_byte_once_when_a_chunk_repeats() -> None:
    frame = make_frame(Kind.WEIGHTS_UP, m.WeightsUp(num_samples=1), tensors={"w": torch.zeros(3000)})
    pieces = split(frame, make_header("r", "dev0", seq=1), 4096)
    reassembler = Reassembler()
    assert reassembler.add(decode(pieces[0])) is None
    assert reassembler.add(decode(pieces[0])) is None  # a QoS 1 duplicate is not "more bytes than announced"
    assert [reassembler.add(decode(p)) for p in pieces[1:]][-1] == frame
    assert reassembler.reserved_bytes == 0


def test_inbox_is_bounded_in_bytes() -> None:
    endpoint = Endpoint("server", max_frame_bytes=1 << 20, inbox_max_bytes=100_000)
    topic = topics.up("r", "dev0")
    for seq in range(5):
        payload = make_frame(Kind.SMASHED, m.Smashed(), tensors={"smashed": torch.zeros(8000)}, seq=seq)
        endpoint.on_frame(topic, payload)
    assert endpoint.rejected["inbox full"] == 2  # 3 frames of 32 KB fit in 100 KB
    while endpoint.receive(0.0) is not None:
        pass
    endpoint.on_frame(topic, make_frame(Kind.SMASHED, m.Smashed(), tensors={"smashed": torch.zeros(8000)}, seq=99))
    assert endpoint.receive(0.0) is not None  # the bytes were given back as the frames were taken


def test_kinds_are_checked_against_the_topic_they_came_on() -> None:
    endpoint = Endpoint("dev1")
    assign_on_up = make_frame(Kind.STOP, m.Stop(), device="dev0")
    endpoint.on_frame(topics.up("r", "dev0"), assign_on_up)
    endpoint.on_frame(topics.device_status("dev1"), make_frame(Kind.OFFLINE, m.Offline(session=SESSION), device="dev0"))
    endpoint.on_frame("somewhere/else", make_frame(Kind.STOP, m.Stop(), device="dev0"))
    assert endpoint.rejected == {
        "STOP may not travel on a up topic": 1,
        "header names another device than the topic": 1,
        "not a cpsl topic": 1,
    }
    assert endpoint.receive(0.0) is None


def test_rejection_reasons_cannot_grow_without_bound() -> None:
    endpoint = Endpoint("server")
    for index in range(500):
        endpoint.reject("t", f"unknown device 'attacker{index}'")
        endpoint.reject("t", f"reason number {index} of many: detail")
        endpoint.reject("t", f"made-up reason {chr(0x4E00 + index)}")
    assert len(endpoint.rejected) <= 65
    assert endpoint.rejected["unknown device #"] == 500
    assert sum(endpoint.rejected.values()) == 1500
    assert reason_key("frame of 123 bytes exceeds the limit of 64: x") == "frame of # bytes exceeds the limit of #"


def test_sequence_numbers_do_not_follow_the_clock() -> None:
    first, second = Endpoint("a").next_seq(), Endpoint("a").next_seq()
    assert abs(first - second) > 1_000_000  # two senders started together are far apart
    endpoint = Endpoint("b")
    assert endpoint.next_seq() + 1 == endpoint.next_seq()


def test_a_flush_that_times_out_is_counted_and_logged_not_ignored(caplog) -> None:
    class Unacknowledging:
        def __init__(self, acknowledged: bool) -> None:
            self.acknowledged = acknowledged

        def flush(self, timeout_s: float) -> bool:
            return self.acknowledged

    endpoint = Endpoint("edge")
    assert not endpoint.flush(1.0, "nothing attached") and endpoint.unacknowledged == 0
    endpoint.attach(Unacknowledging(True))
    assert endpoint.flush(1.0, "round 3's weights") and endpoint.unacknowledged == 0
    endpoint.attach(Unacknowledging(False))
    assert not endpoint.flush(2.5, "round 3's gradients") and endpoint.unacknowledged == 1
    assert "round 3's gradients not acknowledged by the broker within 2.5 s" in caplog.text


def test_a_stale_last_will_does_not_unregister_the_device_that_came_back() -> None:
    registry = Registry()
    old, new = "a" * 32, "b" * 32
    capabilities = m.Capabilities()
    registry.update(received(Kind.REGISTER, m.Register(session=old, num_samples=5, capabilities=capabilities)))
    registry.update(received(Kind.REGISTER, m.Register(session=new, num_samples=5, capabilities=capabilities)))
    registry.update(received(Kind.OFFLINE, m.Offline(session=old)))  # the crashed life's will, delivered late
    assert registry.is_online("dev0")
    registry.update(received(Kind.OFFLINE, m.Offline(session=new)))  # this life's will: honoured at once
    assert not registry.is_online("dev0")


def test_a_device_busy_sending_is_not_gone_but_its_will_is_final() -> None:
    """Heartbeats queue behind a device's own large upload: silence past the heartbeat window
    keeps it out of the next plan, but does not drop it from the phase it is sending in."""
    registry = Registry(heartbeat_timeout_s=0.05)
    session = "c" * 32
    registry.update(received(Kind.REGISTER, m.Register(session=session, num_samples=5, capabilities=m.Capabilities())))
    time.sleep(0.1)
    assert not registry.is_online("dev0") and not registry.has_left("dev0")
    registry.seen("dev0")  # its upload arrived: alive again
    assert registry.is_online("dev0")
    registry.update(received(Kind.OFFLINE, m.Offline(session=session)))
    assert registry.has_left("dev0") and registry.has_left("nobody")


def test_the_registry_is_bounded_and_makes_room_only_by_forgetting_devices_that_left() -> None:
    from edge_server.registry import RegistryFullError

    registry = Registry(max_devices=3)

    def register(device: str) -> None:
        body = m.Register(session=device[-1] * 16, num_samples=5, capabilities=m.Capabilities())
        registry.update(received(Kind.REGISTER, body, device=device))

    for device in ("dev0", "dev1", "dev2"):
        register(device)
    with pytest.raises(RegistryFullError, match="registry full: dev3 refused"):
        register("dev3")
    assert sorted(registry.devices) == ["dev0", "dev1", "dev2"]
    register("dev1")  # a known device registering again needs no room
    registry.update(received(Kind.OFFLINE, m.Offline(session="1" * 16), device="dev1"))
    register("dev3")  # dev1 left: its record makes way
    assert sorted(registry.devices) == ["dev0", "dev2", "dev3"]


def test_the_intake_counts_a_registration_the_full_registry_refused() -> None:
    from edge_server.intake import Intake

    endpoint = Endpoint("edge")
    intake = Intake(endpoint, Registry(max_devices=1), run_id="run")
    for device in ("dev0", "dev1"):
        body = m.Register(session=device[-1] * 16, num_samples=5, capabilities=m.Capabilities())
        endpoint.on_frame(topics.device_status(device), make_frame(Kind.REGISTER, body, device=device, run="idle"))
        assert intake.poll(1.0) is None
    assert sorted(intake.registry.devices) == ["dev0"]
    assert endpoint.rejected == {"registry full": 1}  # one counter, whatever the refused devices' names


def _upload(tensors: dict[str, torch.Tensor], claimed: int, registered: int = 100) -> Upload:
    return Upload(tensors, claimed, registered)


def test_fedavg_weight_is_capped_at_the_registered_count() -> None:
    reference = {"w": torch.zeros(3)}
    uploads = {"honest": _upload({"w": torch.ones(3)}, 100), "greedy": _upload({"w": torch.full((3,), 2.0)}, 10**9)}
    result = RobustAggregation(norm_factor=0).aggregate(reference, uploads)
    assert result.weights == {"greedy": 100.0, "honest": 100.0}
    assert torch.allclose(result.state["w"], torch.full((3,), 1.5))


def test_zero_samples_in_a_one_device_cluster_keeps_the_weights() -> None:
    result = RobustAggregation().aggregate({"w": torch.zeros(2)}, {"dev0": _upload({"w": torch.ones(2)}, 0)})
    assert result.state is None and not result.rejected


def test_an_update_far_outside_the_others_is_rejected_also_in_clusters_of_one() -> None:
    strategy = RobustAggregation(norm_factor=10)
    reference = {"w": torch.zeros(4)}
    for step in range(4):  # SL: one device per cluster; the history is the reference
        honest = strategy.aggregate(reference, {f"dev{step}": _upload({"w": torch.full((4,), 0.1)}, 10)})
        assert honest.state is not None and not honest.rejected
    attack = strategy.aggregate(reference, {"evil": _upload({"w": torch.full((4,), 50.0)}, 10)})
    assert attack.state is None and "evil" in attack.rejected
    mixed = strategy.aggregate(
        reference, {"a": _upload({"w": torch.full((4,), 0.1)}, 10), "evil": _upload({"w": torch.full((4,), -9.0)}, 10)}
    )
    assert set(mixed.rejected) == {"evil"} and torch.allclose(mixed.state["w"], torch.full((4,), 0.1))


def test_a_non_finite_server_loss_changes_nothing() -> None:
    torch.manual_seed(0)
    server_part = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.nn.init.ones_(server_part[0].weight)  # 4 x 3e38 overflows float32: the logits are infinite
    before = {k: v.clone() for k, v in server_part.state_dict().items()}
    optimizer = torch.optim.SGD(server_part.parameters(), lr=0.1)
    smashed = [torch.full((2, 4), 3e38), torch.ones(1, 4)]
    labels = [torch.tensor([0, 1]), torch.tensor([2])]
    grads, loss = server_step(server_part, optimizer, smashed, labels, torch.nn.CrossEntropyLoss())
    assert loss != loss or loss in (float("inf"), float("-inf"))
    assert [g.shape for g in grads] == [(2, 4), (1, 4)] and all(not g.any() for g in grads)
    assert all(torch.equal(before[k], v) for k, v in server_part.state_dict().items())


def test_a_diverged_round_is_published_without_its_nan_loss() -> None:
    """A model that diverged evaluates to a NaN loss: the round's metrics still go out (finite
    values only), and the server does not stop on a validation error."""
    import math

    from edge_server.records import publish_metrics

    published: list[tuple[str, bytes]] = []

    class Recording:
        def publish(self, topic, payload, qos=1, retain=False) -> None:
            published.append((topic, payload))

    endpoint = Endpoint("server")
    endpoint.attach(Recording())
    publish_metrics(endpoint, "run", {"round": 3, "accuracy": 0.1, "loss": math.nan, "latency_s": 2.0})
    ((topic, payload),) = published
    assert topic == topics.run_metrics("run")
    assert decode(payload).body.values == {"accuracy": 0.1, "latency_s": 2.0}


def test_a_refusal_s_reason_cannot_forge_a_log_line_or_drive_a_terminal(caplog) -> None:
    from edge_server.intake import Intake

    endpoint = Endpoint("edge")
    registry = Registry()
    intake = Intake(endpoint, registry, run_id="run")
    register = m.Register(session="a" * 16, num_samples=5, capabilities=m.Capabilities())
    endpoint.on_frame(topics.device_status("dev0"), make_frame(Kind.REGISTER, register, run="idle"))
    assert intake.poll(1.0) is None
    forged = "fine\n2026-12-08 00:00:00 server WARNING all devices gone\x1b[2J\x1b]0;pwned\x07"
    refusal = m.Reject(refused="ASSIGN", reason=forged)
    endpoint.on_frame(topics.up("run", "dev0"), make_frame(Kind.REJECT, refusal, run="run", seq=2))
    assert intake.poll(1.0) is None
    shown = intake.refusals["dev0"]
    assert "\n" not in shown and "\x1b" not in shown and "\\x1b[2J" in shown and "\\n2026" in shown
    assert all("\n" not in record.getMessage() and "\x1b" not in record.getMessage() for record in caplog.records)


def _honest_and_liar(liar_scale: float, liar_count: int = 2**31) -> tuple[dict, dict]:
    reference = {"w": torch.zeros(4), "steps": torch.tensor(7)}
    uploads = {
        f"dev{i}": _upload({"w": torch.full((4,), 1.0 + 0.1 * i), "steps": torch.tensor(7)}, 100) for i in range(3)
    }
    uploads["liar"] = Upload({"w": torch.full((4,), liar_scale), "steps": torch.tensor(7)}, liar_count, liar_count)
    return reference, uploads


def test_no_device_weighs_more_than_three_times_the_fleet_s_median_registration() -> None:
    reference, uploads = _honest_and_liar(-1.0)
    result = RobustAggregation(norm_factor=0).aggregate(reference, uploads, typical_samples=100.0)
    assert result.weights["liar"] == 300.0 and result.capped == {"liar": float(2**31)}
    expected = (100 * (1.0 + 1.1 + 1.2) + 300 * -1.0) / 600
    assert torch.allclose(result.state["w"], torch.full((4,), expected, dtype=torch.float32))
    assert int(result.state["steps"]) == 7
    two = {"honest": _upload({"w": torch.ones(4)}, 100), "liar": Upload({"w": -torch.ones(4)}, 2**31, 2**31)}
    paired = RobustAggregation(norm_factor=0).aggregate({"w": torch.zeros(4)}, two)
    assert paired.weights["liar"] == 300.0  # no fleet given: the lower median, not the mean of a lie and the truth
    honest = {"big": _upload({"w": torch.ones(4)}, 250), "small": _upload({"w": torch.ones(4)}, 100)}
    assert not RobustAggregation().aggregate({"w": torch.zeros(4)}, honest, typical_samples=100.0).capped


@pytest.mark.parametrize("method", ["median", "trimmed-mean"])
def test_a_coordinate_wise_method_ignores_one_reversed_and_amplified_update(method) -> None:
    reference, uploads = _honest_and_liar(-8.0)
    uploads["dev3"] = _upload({"w": torch.full((4,), 1.3), "steps": torch.tensor(7)}, 100)  # five: trim drops one
    result = RobustAggregation(norm_factor=0, method=method).aggregate(reference, uploads)
    honest = torch.tensor([1.0, 1.1, 1.2, 1.3])
    assert result.state["w"].min() >= honest.min() - 1e-6 and result.state["w"].max() <= honest.max() + 1e-6
    assert result.weights == dict.fromkeys(uploads, 1.0)  # claims are not trusted: every device alike


def test_clipping_scales_an_amplified_update_down_to_the_median_norm() -> None:
    reference, uploads = _honest_and_liar(-8.0, liar_count=100)
    result = RobustAggregation(norm_factor=0, method="clipped").aggregate(reference, uploads)
    median = statistics.median(result.norms.values())  # 2.3: the liar's 16 and dev2's 2.4 are over it
    assert set(result.clipped) == {"liar", "dev2"}
    assert all(result.norms[d] * scale == pytest.approx(median) for d, scale in result.clipped.items())
    values = {"dev0": 1.0, "dev1": 1.1, "dev2": 1.2, "liar": -8.0}
    expected = sum(v * result.clipped.get(d, 1.0) for d, v in values.items()) / 4
    assert torch.allclose(result.state["w"], torch.full((4,), expected, dtype=torch.float32), atol=1e-6)
    with pytest.raises(ValueError, match="choose among"):
        RobustAggregation(method="krum")
