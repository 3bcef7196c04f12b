"""Split inference (issue #14, item 4): the cut choice and the link fit as pure functions, the
exported heads against torch, the service's checks, and the whole exchange over a real
Mosquitto with real onnxruntime heads and a real torch tail, the CLIs included."""

from __future__ import annotations

import json
import math
import random
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_server.serve import RequestRefusedError, ServeConfig, TailService, load_trained
from firmware_agent.infer import InferConfig, InferenceClient
from firmware_agent.infer_cli import main as infer_main
from tests.brokers import free_port
from tests.conftest import run_cli
from tests.frames import KeptFrames
from tests.fuzzing import InferenceHarness, mutate, recorded_frames
from tests.trained_run import RUN_ID, make_run
from toolkit import compression
from toolkit.compression import Encoding
from toolkit.errors import UserError
from toolkit.inference.heads import MANIFEST, HeadSet, read_manifest, weights_digest
from toolkit.inference.link import LinkEstimator
from toolkit.inference.planner import CutCost, Link, choose, interpolate, predict, shortlist
from toolkit.models import load_model
from toolkit.protocol import Kind, decode, encode, make_header, topics
from toolkit.protocol import messages as m
from toolkit.protocol.codec import Message
from toolkit.protocol.endpoint import Endpoint
from toolkit.transport import parse_broker_url


# the cut choice and the link, as pure functions ----------------------------------------------
def test_the_lowest_predicted_latency_wins_and_without_a_link_only_the_device_can():
    costs = [
        CutCost(0, 0.0, 0.0, 10_000, 0.002),  # server-only: 10 kB up
        CutCost(3, 0.004, 0.001, 2_000, 0.001),
        CutCost(12, 0.020),  # device-only
    ]
    fast = Link(0.001, 10e6 / 8)  # 10 Mbit/s
    assert predict(costs[0], fast) == pytest.approx(0.001 + 0.008 + 0.002)
    assert choose(costs, fast).cut == 3  # 0.0066 s against 0.011 s and 0.020 s
    assert choose(costs, Link(0.001, math.inf)).cut == 0  # bytes free: nothing on the device is cheaper
    assert choose(costs, Link(0.001, 0.1e6 / 8)).cut == 12  # 100 kbit/s: keep it all here
    assert choose(costs, None).cut == 12
    # requests at cut 3 really took 50 ms: that overrides the model, and the model's 7.6x optimism
    # there scales the unconfirmed server-only prediction too, so the device keeps it all
    assert choose(costs, fast, observed={3: 0.05}).cut == 12
    assert shortlist(costs, fast, 1) == [3, 12]  # the best predicted, and device-only (it costs no request)


def test_a_tie_keeps_more_layers_on_the_device():
    costs = [CutCost(0, 0.0, 0.0, 100, 0.001), CutCost(6, 0.0, 0.0, 100, 0.001)]
    assert choose(costs, Link(0.0, math.inf)).cut == 6


def test_server_time_is_interpolated_between_measured_batch_sizes():
    assert interpolate([1, 8, 32], [0.001, 0.004, 0.010], 1) == 0.001
    assert interpolate([1, 8, 32], [0.001, 0.004, 0.010], 20) == pytest.approx(0.007)
    assert interpolate([1, 8, 32], [0.001, 0.004, 0.010], 64) == pytest.approx(0.020)  # beyond: per sample


def test_the_link_fit_recovers_base_and_rate_and_shrugs_off_an_outlier():
    link = LinkEstimator()
    rng = random.Random(0)
    for _ in range(9):
        for cut, size in ((0, 20_000), (6, 2_000)):
            link.add(cut, size, 0.002 + size / 1e6 + rng.uniform(0, 2e-4))
    link.add(0, 20_000, 5.0)  # one request that stalled
    estimate = link.estimate()
    assert estimate.base_s == pytest.approx(0.0021, abs=2e-4)
    assert estimate.up_bytes_per_s == pytest.approx(1e6, rel=0.05)
    single = LinkEstimator()
    single.add(6, 1_000, 0.003)
    assert single.estimate() == Link(0.0, 1_000 / 0.003)  # one size: what it took is the bytes'


# heads ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained") / "run"
    make_run(folder)
    return folder


def test_each_head_computes_what_the_trained_model_computes_up_to_its_cut(run_dir):
    model, run_id = load_trained(run_dir)
    heads = HeadSet.open(run_dir / "heads")
    assert run_id == RUN_ID and heads.manifest.weights == weights_digest(model.net.state_dict())
    x = torch.randn(5, 1, 28, 28)
    model.net.eval()
    with torch.no_grad():
        for cut in heads.manifest.cuts:
            expected = model.net[:cut](x).numpy()
            np.testing.assert_allclose(heads.run(cut, x.numpy()), expected, rtol=1e-4, atol=1e-5)
    assert heads.output_shape(3) == (6, 14, 14) and heads.whole_model_cut == 12


def test_weights_digest_follows_the_values_not_the_object():
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    assert weights_digest(a) == weights_digest({"b": torch.zeros(2), "w": torch.ones(3)})
    assert weights_digest(a) != weights_digest({"w": torch.tensor([1.0, 1.0, 1.0001]), "b": torch.zeros(2)})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["heads"][0].update(file="../../etc/passwd.onnx"), "file"),
        (lambda d: d["heads"][0].update(after="conv2"), "does not end at layer"),
        (lambda d: d["heads"].append(dict(d["heads"][0])), "twice"),
    ],
)
def test_a_bad_manifest_is_one_line(run_dir, tmp_path, edit, message):
    document = json.loads((run_dir / "heads" / MANIFEST).read_text())
    edit(document)
    (tmp_path / MANIFEST).write_text(json.dumps(document))
    with pytest.raises(UserError, match=message) as caught:
        read_manifest(tmp_path)
    assert "\n" not in str(caught.value)


def test_a_head_file_that_is_not_the_one_exported_is_refused(run_dir, tmp_path):
    heads = HeadSet.open(run_dir / "heads")
    for entry in heads.manifest.heads:
        (tmp_path / entry.file).write_bytes((run_dir / "heads" / entry.file).read_bytes())
    (tmp_path / MANIFEST).write_text((run_dir / "heads" / MANIFEST).read_text())
    first = heads.manifest.heads[0].file
    (tmp_path / first).write_bytes((tmp_path / first).read_bytes() + b"\0")
    with pytest.raises(UserError, match="SHA-256"):
        HeadSet.open(tmp_path).run(heads.manifest.heads[0].cut, np.zeros((1, 1, 28, 28), np.float32))


# the service's checks, without a broker ----------------------------------------------------
@pytest.fixture(scope="module")
def service(run_dir):
    model, run_id = load_trained(run_dir)
    config = ServeConfig(parse_broker_url("mqtt://127.0.0.1:1"), run_dir, tail_repeats=1, tail_batch_sizes=(1, 4))
    return TailService(config, model, run_id)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8+zstd"])
@pytest.mark.parametrize("cut", [0, 3, 6])
def test_the_service_answers_with_the_logits_of_the_trained_model(service, encoding, cut):
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        activations = service.model.net[:cut](x)
        expected = service.model.net(x)
    request = m.Infer(request=1, cut=cut, weights=service.digest, encoding=encoding)
    logits = service.answer(request, compression.encode("x", activations, Encoding.parse(encoding)))
    tolerance = {"fp32": 1e-5, "fp16": 1e-2, "int8+zstd": 0.1}[encoding] * float(expected.abs().max())
    assert logits.shape == (4, 10) and float((logits - expected).abs().max()) <= tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device on this machine")
def test_a_service_on_the_gpu_answers_as_the_cpu_one_does(run_dir, service):
    """``serve --device cuda``: requests decoded on the CPU, the tail on the GPU, logits back on the
    CPU; the same weights digest (of the CPU tensors) and the same answers within 1e-4."""
    model, run_id = load_trained(run_dir)
    config = ServeConfig(
        parse_broker_url("mqtt://127.0.0.1:1"), run_dir, tail_repeats=1, tail_batch_sizes=(1, 4), device="cuda"
    )
    gpu = TailService(config, model, run_id)
    assert gpu.digest == service.digest and gpu.measure_tails()
    for cut in (0, 3, 6):
        with torch.no_grad():
            activations = service.model.net[:cut](torch.randn(4, 1, 28, 28))
        request = m.Infer(request=1, cut=cut, weights=service.digest, encoding="fp32")
        tensors = compression.encode("x", activations, Encoding.parse("fp32"))
        logits = gpu.answer(request, tensors)
        assert logits.device.type == "cpu"
        torch.testing.assert_close(logits, service.answer(request, tensors), atol=1e-4, rtol=0)


def _queue_requests(service, requests) -> dict[tuple[str, int], torch.Tensor]:
    """INFER frames (device, request id, cut, activations, weights) into the service's inbox, as the
    transport's thread would put them while the service is busy; the activations by request."""
    sent = {}
    for seq, (device, request_id, cut, x, weights) in enumerate(requests):
        body = m.Infer(request=request_id, cut=cut, weights=weights or service.digest, encoding="fp32")
        frame = encode(Kind.INFER, make_header(service.service, device, seq=seq), body, {"x": x})
        service.endpoint.on_frame(topics.infer_request(service.service, device), frame)
        sent[(device, request_id)] = x
    return sent


def _replies(transport) -> dict[tuple[str, int], Message]:
    return {(r.header.device, r.body.request): r for r in (decode(f) for _, f in transport.frames)}


@pytest.mark.parametrize("batching", [True, False])
def test_requests_waiting_together_are_answered_in_one_forward_per_cut(run_dir, service, batching):
    """Five requests queued at once from two devices: three at cut 3 (1, 2 and 4 inputs), one at
    cut 6, one for other weights. Batched: two forwards, one per cut; each device gets its own
    rows, as a request answered alone gets them (within 1e-5), and the refusal is its own."""
    model, run_id = load_trained(run_dir)
    config = ServeConfig(
        parse_broker_url("mqtt://127.0.0.1:1"), run_dir, tail_repeats=1, tail_batch_sizes=(1,), batching=batching
    )
    batched = TailService(config, model, run_id)
    transport = KeptFrames()
    batched.endpoint.attach(transport)
    with torch.no_grad():
        inputs = [service.model.net[:3](torch.randn(n, 1, 28, 28)) for n in (1, 2, 4)]
        at_six = service.model.net[:6](torch.randn(2, 1, 28, 28))
    sent = _queue_requests(
        batched,
        [
            ("dev0", 1, 3, inputs[0], None),
            ("dev1", 1, 3, inputs[1], None),
            ("dev0", 2, 6, at_six, None),
            ("dev1", 2, 3, inputs[2], "0" * 64),
            ("dev0", 3, 3, inputs[2], None),
        ],
    )
    batched.serve(duration_s=0.3)
    replies = _replies(transport)
    assert sorted(replies) == sorted(sent)
    assert "other weights" in replies[("dev1", 2)].body.error and batched.refused == 1
    for key in set(sent) - {("dev1", 2)}:
        cut = {("dev0", 2): 6}.get(key, 3)
        alone = service.answer(m.Infer(request=1, cut=cut, weights=service.digest, encoding="fp32"), {"x": sent[key]})
        torch.testing.assert_close(replies[key].tensors["logits"], alone, atol=1e-5, rtol=0)
    assert batched.forwards == (2 if batching else 4)


def test_the_service_is_scraped_by_prometheus(run_dir, service):
    """``serve --metrics-port``: what it answered, refused and merged, over HTTP, parsed with the
    Prometheus client's own parser."""
    from edge_server.serve_metrics import ServiceMetrics
    from tests.scrape import scrape

    model, run_id = load_trained(run_dir)
    config = ServeConfig(parse_broker_url("mqtt://127.0.0.1:1"), run_dir, tail_repeats=1, tail_batch_sizes=(1,))
    live = TailService(config, model, run_id)
    live.endpoint.attach(KeptFrames())
    metrics = ServiceMetrics(live)
    metrics.serve("127.0.0.1", 0)
    try:
        assert scrape(metrics.port)[("cpsl_infer_inputs_total", ())] == 0
        with torch.no_grad():
            x = service.model.net[:3](torch.randn(2, 1, 28, 28))
        _queue_requests(live, [("dev0", 1, 3, x, None), ("dev1", 1, 3, x, None), ("dev1", 2, 3, x, "0" * 64)])
        live.serve(duration_s=0.3)
        samples = scrape(metrics.port)
    finally:
        metrics.close()
    assert samples[("cpsl_infer_requests_total", (("cut", "3"),))] == 2
    assert samples[("cpsl_infer_inputs_total", ())] == 4
    assert samples[("cpsl_infer_forward_passes_total", ())] == 1  # the two merged
    assert samples[("cpsl_infer_refused_total", ())] == 1
    assert sum(v for (name, _), v in samples.items() if name == "cpsl_infer_rejected_total") == 1
    assert 0 < samples[("cpsl_infer_server_seconds", (("quantile", "0.5"),))] < 10
    assert samples[("cpsl_infer_sent_bytes_total", (("kind", "prediction"),))] > 0


def test_a_batch_never_goes_past_max_batch_inputs(run_dir, service):
    model, run_id = load_trained(run_dir)
    config = ServeConfig(parse_broker_url("mqtt://127.0.0.1:1"), run_dir, tail_repeats=1, max_batch=4)
    batched = TailService(config, model, run_id)
    batched.endpoint.attach(transport := KeptFrames())
    with torch.no_grad():
        x = service.model.net[:3](torch.randn(2, 1, 28, 28))
    _queue_requests(batched, [(f"dev{i}", 1, 3, x, None) for i in range(3)])
    batched.serve(duration_s=0.3)
    assert len(_replies(transport)) == 3 and batched.forwards == 2  # 4 inputs, then 2


def _request(service, **changes) -> tuple[m.Infer, dict]:
    fields = {"request": 1, "cut": 3, "weights": service.digest, "encoding": "fp16"}
    fields.update(changes)
    return m.Infer(**fields), compression.encode("x", torch.randn(2, 6, 14, 14), Encoding.parse("fp16"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": "0" * 32}, "other weights"),
        ({"cut": 12}, "not served"),
        ({"cut": 6}, r"shape \[2, 6, 14, 14\]: cut 6 needs \[1..256, 16, 5, 5\]"),
        ({"encoding": "int8"}, "expected tensors"),
    ],
)
def test_the_service_refuses_what_it_cannot_answer_in_one_line(service, change, message):
    request, tensors = _request(service, **change)
    with pytest.raises(RequestRefusedError, match=message) as caught:
        service.answer(request, tensors)
    assert "\n" not in str(caught.value)


def test_the_service_refuses_oversized_batches_and_stray_tensors_before_decoding(service):
    request, tensors = _request(service)
    big = compression.encode("x", torch.zeros(300, 6, 14, 14), Encoding.parse("fp16+zstd"))
    with pytest.raises(RequestRefusedError, match=r"\[1\.\.256"):
        service.answer(m.Infer(request=1, cut=3, weights=service.digest, encoding="fp16+zstd"), big)
    with pytest.raises(RequestRefusedError, match="unexpected tensors"):
        service.answer(request, {**tensors, "y": torch.zeros(1)})
    raw_off = TailService(
        ServeConfig(service.config.broker, service.config.run_dir, raw_inputs=False), service.model, "x"
    )
    with pytest.raises(RequestRefusedError, match="raw inputs"):
        raw_off.answer(*_request(raw_off, cut=0))


class Captured:
    """A transport that keeps what is published: the service's replies, for the fuzzing below."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))


INFER_FRAMES = [frame for frame in recorded_frames() if frame.kind is Kind.INFER]


@pytest.fixture(scope="module")
def recorded_service(tmp_path_factory):
    """The service the recorded requests were made for (bench/record_frames.py: LeNet-5, seed 0)."""
    config = ServeConfig(parse_broker_url("mqtt://127.0.0.1:1"), tmp_path_factory.mktemp("recorded"))
    return TailService(config, load_model("lenet5", seed=0), "recorded")


def _serve_one(service: TailService, topic: str, frame: bytes) -> list[tuple[str, bytes]]:
    endpoint, transport = Endpoint("fuzz"), Captured()
    endpoint.attach(transport)
    service.endpoint = endpoint
    endpoint.on_frame(topic, frame)
    received = endpoint.receive(0)
    if received is not None:
        service.handle(received)
    return transport.published


def test_the_recorded_requests_are_answered(recorded_service):
    """The recorded ones at cuts the service serves get logits (so the fuzzing below starts from
    requests that reach the model); the one at cut 99 was recorded for its refusal."""
    answered = 0
    for recorded in INFER_FRAMES:
        (topic, reply), *rest = _serve_one(recorded_service, recorded.topic, recorded.frame)
        answer = decode(reply)
        assert not rest and topic == topics.infer_reply("recorded", "dev0")
        if recorded.frame and decode(recorded.frame).body.cut == 99:
            assert answer.body.error.startswith("cut 99 is not served") and not answer.tensors
        else:
            assert answer.body.error == "" and answer.tensors["logits"].shape[1] == 10
            answered += 1
    assert answered >= 2


INFERENCE_FRAMES = [f for f in recorded_frames() if f.kind in (Kind.INFER, Kind.PREDICTION, Kind.SERVICE_STATUS)]


@pytest.fixture(scope="module")
def inference_harness(tmp_path_factory):
    return InferenceHarness(tmp_path_factory.mktemp("harness"))


def test_the_harness_accepts_the_intact_recorded_frames(inference_harness):
    """So the fuzzing below starts from frames that reach the handlers (the refusal aside)."""
    for recorded in INFERENCE_FRAMES:
        inference_harness.feed(recorded.topic, recorded.frame)
    outcome = inference_harness.outcome
    assert outcome.uncaught == [] and outcome.changed_by_rejected == 0
    assert outcome.accepted >= len(INFERENCE_FRAMES) - 2  # the refused request and its refusal


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.sampled_from(INFERENCE_FRAMES), st.integers(min_value=0, max_value=2**32 - 1))
def test_both_ends_survive_mutated_frames_and_the_service_never_changes(inference_harness, recorded, seed):
    """Every mutant is dropped by an endpoint (counted), refused in one line, or answered."""
    inference_harness.feed(recorded.topic, mutate(recorded.frame, random.Random(seed)))
    assert inference_harness.outcome.uncaught == [] and inference_harness.outcome.changed_by_rejected == 0


# over a real broker ----------------------------------------------------------------------------
@pytest.fixture
def live_service(run_dir, broker):
    model, run_id = load_trained(run_dir)
    config = ServeConfig(parse_broker_url(broker), run_dir, tail_repeats=1, tail_batch_sizes=(1, 4))
    service = TailService(config, model, run_id)
    service.start()
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    yield service
    service.stop()
    thread.join(5)
    service.close()


def _client(broker: str, heads_dir, **changes) -> InferenceClient:
    fields = {"batch_size": 4, "allow_raw_inputs": True, "timeout_s": 5.0, "head_time_s": 0.01}
    fields.update(changes)
    config = InferConfig(parse_broker_url(broker), "dev0", RUN_ID, **fields)
    return InferenceClient(config, HeadSet.open(heads_dir))


def test_split_inference_over_mosquitto_gives_the_models_answers_and_falls_back_when_the_service_goes(
    run_dir, broker, live_service
):
    client = _client(broker, run_dir / "heads")
    assert client.connect(), client.service_problem()
    assert client.network_cuts() == [0, 3, 6]  # served and exported here (cut 12 is device-only)
    x = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)
    client.measure(x)
    client.calibrate(x)
    assert client.link.samples == 6 and client.link.estimate() is not None
    client.confirm(x)
    choice = client.plan()
    assert {cut for cut, _ in choice.table} == {0, 3, 6, 12}
    with torch.no_grad():
        expected = live_service.model.net(torch.from_numpy(x)).numpy()
    for cut in (0, 3, 6, 12, None):
        outcome = client.infer(x, cut)
        assert not outcome.fallback
        np.testing.assert_allclose(outcome.logits, expected, atol=0.02 * float(np.abs(expected).max()))
    assert client.counts.requests == 5 and live_service.served[3] >= 1
    live_service.stop()
    time.sleep(0.5)
    live_service.close()  # its status goes offline: the device answers alone, and says so
    deadline = time.monotonic() + 5
    while client.status.state != "offline" and time.monotonic() < deadline:
        client._pump(0.2)
    outcome = client.infer(x, 6)
    assert outcome.fallback and outcome.cut == 12
    np.testing.assert_allclose(outcome.logits, expected, rtol=1e-4, atol=1e-5)
    client.close()


def test_requests_in_flight_together_give_the_answers_in_order_and_fall_back_when_the_service_goes(
    run_dir, broker, live_service
):
    """``cpsl-infer run --in-flight 4``: up to four requests out at once, each batch answered in
    input order with its own logits; once the service goes, what is still out and what follows
    is classified here -- every input answered."""
    client = _client(broker, run_dir / "heads")
    assert client.connect(), client.service_problem()
    batches = [np.random.default_rng(seed).standard_normal((4, 1, 28, 28)).astype(np.float32) for seed in range(12)]
    with torch.no_grad():
        expected = [live_service.model.net(torch.from_numpy(x)).numpy() for x in batches]
    outcomes = list(client.infer_stream(batches, 6, in_flight=4))
    assert client.counts.most_in_flight == 4 and client.counts.requests == 12
    for outcome, want in zip(outcomes, expected, strict=True):
        assert not outcome.fallback and outcome.cut == 6
        np.testing.assert_allclose(outcome.logits, want, atol=0.02 * float(np.abs(want).max()))
    live_service.stop()
    time.sleep(0.5)
    live_service.close()
    stream = client.infer_stream(batches, 6, in_flight=4)
    outcomes = list(stream)
    assert len(outcomes) == 12 and all(o.fallback and o.cut == 12 for o in outcomes)
    for outcome, want in zip(outcomes, expected, strict=True):
        np.testing.assert_allclose(outcome.logits, want, rtol=1e-4, atol=1e-5)
    client.close()


def test_heads_of_other_weights_never_use_the_service(tmp_path, broker, live_service):
    make_run(tmp_path / "other", seed=7)
    client = _client(broker, tmp_path / "other" / "heads")
    assert not client.connect()
    assert "other weights" in client.service_problem() and client.network_cuts() == []
    client.measure(np.zeros((4, 1, 28, 28), np.float32))
    assert client.plan().cut == 12
    client.close()


@pytest.mark.slow
def test_the_clis_export_serve_and_classify(run_dir, broker, tmp_path, capsys):
    exported = run_cli("edge_server", "export-heads", str(run_dir), "--out", str(tmp_path / "heads"))
    assert exported.returncode == 0, exported.stderr
    assert read_manifest(tmp_path / "heads").cuts == list(range(1, 13))
    serve = run_cli("edge_server", "serve", str(run_dir), "--broker", broker, "--duration", "0.1")
    assert serve.returncode == 0 and "0 requests answered" in serve.stdout, serve.stderr
    common = ["--heads", str(run_dir / "heads"), "--broker", broker, "--device-id", "dev0", "--timeout", "1"]
    assert infer_main(["run", *common, "--cut", "server", "--data", "builtin:digits"]) == 2
    assert "add --allow-raw-inputs" in capsys.readouterr().err
    np.save(tmp_path / "inputs.npy", np.zeros((6, 1, 28, 28), np.float32))
    out, report = tmp_path / "predictions.jsonl", tmp_path / "report.json"
    code = infer_main(
        ["run", *common, "--inputs", str(tmp_path / "inputs.npy"), "--out", str(out), "--json", str(report)]
    )
    assert code == 0  # no service: the whole model runs here
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(6)) and {line["cut"] for line in lines} == {12}
    assert json.loads(report.read_text())["plan"]["service_usable"] is False
    nobody = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--out", str(out)]  # no broker there at all
    assert infer_main(["run", *common[:2], *common[4:], "--inputs", str(tmp_path / "inputs.npy"), *nobody]) == 0
    assert {json.loads(line)["cut"] for line in out.read_text().splitlines()} == {12}
    assert "not used (cannot reach broker" in capsys.readouterr().err
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    assert infer_main(["run", *common, "--inputs", str(tmp_path / "bad.npy")]) == 2
    assert "is not a .npy array" in capsys.readouterr().err


def test_the_inference_topics_name_service_and_device_and_carry_only_their_kinds():
    request, reply, status = (
        topics.infer_request("svc", "d1"),
        topics.infer_reply("svc", "d1"),
        topics.infer_status("svc"),
    )
    assert [topics.role_of(t) for t in (request, reply, status)] == ["request", "reply", "service_status"]
    assert topics.device_of(request) == "d1" and topics.run_of(request) == "svc" and topics.device_of(status) is None
    assert topics.role_of("cpsl/v1/infer/svc/devices/d1/other") is None
    endpoint = Endpoint("check")
    body = m.Prediction(request=1)
    frame = encode(Kind.PREDICTION, make_header("svc", "d1"), body)
    endpoint.on_frame(request, frame)  # a reply where requests go: refused, counted
    endpoint.on_frame(reply.replace("/svc/", "/other/"), frame)  # the header names another service
    assert endpoint.receive(0) is None and sum(endpoint.rejected.values()) == 2
    endpoint.on_frame(reply, frame)
    assert endpoint.receive(0).message.body == body


def test_an_unconfirmed_cut_is_judged_by_how_far_off_the_model_was_on_the_confirmed_ones():
    costs = [CutCost(cut, 0.001 * cut, 0.0, 1000, 0.010) for cut in (1, 2, 3)] + [CutCost(9, 0.050)]
    link = Link(0.002, math.inf)  # predicted 13, 14 and 15 ms; device-only 50 ms
    observed = {1: 0.0182, 2: 0.0168}  # the model was 1.4x and 1.2x optimistic on the two measured
    choice = choose(costs, link, observed)
    assert choice.cut == 2  # cut 3's 15 ms becomes 19.5 ms (x1.3): the measured 16.8 ms wins
    assert dict(choice.table)[3] == pytest.approx(0.015 * 1.3)
    assert dict(choice.table)[9] == 0.050  # device-only is not a networked prediction: unscaled


def test_a_service_status_whose_timings_do_not_pair_up_is_refused():
    with pytest.raises(ValueError, match="one time per batch size"):
        m.TailLatency(cut=3, batch_sizes=[1, 8], seconds=[0.001])
    with pytest.raises(ValueError, match="each batch size once"):
        m.TailLatency(cut=3, batch_sizes=[8, 8], seconds=[0.001, 0.002])
