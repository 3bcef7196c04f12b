"""Compression of what crosses the cut (toolkit.compression, issue #14 item 1): lossless encodings
round-trip exactly, lossy ones within their stated bound, bad pieces are refused with one line,
and a real run over Mosquitto with a lossless encoding trains exactly what fp32 trains."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.intake import decode_smashed
from edge_server.server import EdgeServer
from tests.agents import start_agents
from tests.servers import assert_same_weights, close, server_config
from toolkit import compression
from toolkit.compression import Encoding
from toolkit.data import load_dataset
from toolkit.models import load_model
from toolkit.protocol import Kind
from toolkit.protocol import messages as m
from toolkit.protocol.codec import ProtocolError, decode, encode, make_header
from toolkit.protocol.endpoint import Received


def activations(seed: int = 0, shape=(16, 6, 14, 14)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(shape, generator=generator) * torch.linspace(0.1, 3.0, shape[1]).view(1, -1, 1, 1))


def round_trip(x: torch.Tensor, text: str, per: str = "channel") -> tuple[torch.Tensor, int]:
    """Through a real frame: encode the pieces, the codec, decode."""
    encoding = Encoding.parse(text)
    pieces = compression.encode("x", x, encoding, per=per)
    frame = encode(Kind.SMASHED, make_header("r", "dev0"), m.Smashed(encoding=encoding.name), pieces)
    received = decode(frame).tensors
    return compression.decode("x", received, encoding, per=per, expect_shape=tuple(x.shape)), len(frame)


@pytest.mark.parametrize("text", ["none", "fp32+zstd"])
def test_lossless_encodings_round_trip_exactly(text):
    x = activations()
    y, _ = round_trip(x, text)
    assert torch.equal(x, y)


def test_fp16_is_exact_on_what_fp16_holds_and_clamps_the_rest():
    x = activations().to(torch.float16).to(torch.float32)
    for text in ("fp16", "fp16+zstd"):
        assert torch.equal(round_trip(x, text)[0], x)
    big, _ = round_trip(torch.tensor([[1e6, -1e6, 1.0]]), "fp16")
    assert big.tolist() == [[65504.0, -65504.0, 1.0]]


@pytest.mark.parametrize("text", ["int8", "int8+zstd"])
def test_int8_per_channel_errs_by_at_most_half_a_step_of_each_channel(text):
    x = activations()
    y, _ = round_trip(x, text)
    rows = x.transpose(0, 1).reshape(x.shape[1], -1)
    half_step = (rows.max(1).values - rows.min(1).values) / 510
    error = (x - y).abs().transpose(0, 1).reshape(x.shape[1], -1).max(1).values
    assert bool((error <= half_step * 1.001 + 1e-7).all()), (error, half_step)


def test_int8_gradients_err_by_at_most_half_a_step_of_each_sample():
    g = torch.randn(8, 6, 5, 5) * torch.logspace(-4, 0, 8).view(-1, 1, 1, 1)  # samples of very different scale
    y, _ = round_trip(g, "int8", per="sample")
    half_step = g.reshape(8, -1).abs().max(1).values / 254
    assert bool(((g - y).abs().reshape(8, -1).max(1).values <= half_step * 1.001 + 1e-12).all())


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
    st.floats(1e-3, 1e3),
    st.sampled_from(["channel", "sample"]),
)
def test_int8_bound_holds_for_any_shape_and_scale(batch, channels, seed, scale, per):
    x = torch.randn((batch, channels, 3), generator=torch.Generator().manual_seed(seed)) * scale
    y, _ = round_trip(x, "int8+zstd", per=per)
    if per == "channel":
        rows = x.transpose(0, 1).reshape(channels, -1)
        bound = ((rows.max(1).values - rows.min(1).values) / 510).view(1, -1, 1)
    else:
        bound = (x.reshape(batch, -1).abs().max(1).values / 254).view(-1, 1, 1)
    assert bool(((x - y).abs() <= bound * 1.001 + 1e-9).all())


def test_constant_channels_and_zero_gradients_decode_exactly():
    x = torch.zeros(4, 3, 2, 2)
    x[:, 1] = 2.5
    assert torch.equal(round_trip(x, "int8")[0], x)
    assert torch.equal(round_trip(torch.zeros(4, 3), "int8", per="sample")[0], torch.zeros(4, 3))


def test_int8_with_zstd_is_several_times_smaller_than_fp32():
    x = activations(shape=(32, 6, 14, 14))  # LeNet-5's pool1 for a batch of 32: 4,704 bytes a sample
    sizes = {text: round_trip(x, text)[1] for text in ("fp32", "fp16", "int8", "int8+zstd")}
    assert sizes["fp16"] < 0.51 * sizes["fp32"]
    assert sizes["int8"] < 0.26 * sizes["fp32"]
    assert sizes["int8+zstd"] < sizes["int8"]  # the ReLU's zeros pack


def pieces(text: str, per: str = "channel") -> dict[str, torch.Tensor]:
    return compression.encode("x", activations(shape=(4, 3, 2, 2)), Encoding.parse(text), per=per)


BAD = [
    ("int8", lambda t: t.pop("x.step"), "expected tensors"),
    ("int8", lambda t: t.update({"x.extra": torch.zeros(1)}), "expected tensors"),
    ("int8", lambda t: t.update({"x.q": t["x.q"].to(torch.int32)}), "not uint8"),
    ("int8", lambda t: t.update({"x.step": torch.ones(2)}), "must be 3 float32 values"),
    ("int8", lambda t: t.update({"x.step": -torch.ones(3)}), "not a finite non-negative"),
    ("int8", lambda t: t.update({"x.lo": torch.tensor([0.0, float("inf"), 0.0])}), "not a finite"),
    ("fp16", lambda t: t.update({"x": t["x"].to(torch.float32)}), "not torch.float16"),
    ("int8+zstd", lambda t: t.update({"x.shape": torch.tensor([4, 3, 2, 3])}), "the shape says"),
    ("int8+zstd", lambda t: t.update({"x.shape": torch.tensor([1 << 30, 1 << 10])}), "would decode to"),
    ("int8+zstd", lambda t: t.update({"x.z": torch.zeros(40, dtype=torch.uint8)}), "does not decompress"),
    ("int8+zstd", lambda t: t.update({"x.shape": torch.tensor([[4, 3]])}), "int64 dimensions"),
]


@pytest.mark.parametrize(("text", "spoil", "message"), BAD)
def test_bad_pieces_are_refused_with_one_line(text, spoil, message):
    wire = pieces(text)
    spoil(wire)
    with pytest.raises(ProtocolError, match=message) as refused:
        compression.decode("x", wire, Encoding.parse(text))
    assert "\n" not in str(refused.value)


def test_a_bomb_cannot_expand_past_its_declared_size():
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(10 << 20))  # 10 MB of zeros in a few hundred bytes
    wire = {"x.z": torch.frombuffer(bytearray(bomb), dtype=torch.uint8), "x.shape": torch.tensor([16])}
    wire |= {"x.lo": torch.zeros(1), "x.step": torch.zeros(1)}
    with pytest.raises(ProtocolError, match=r"does not decompress|the shape says"):
        compression.decode("x", wire, Encoding.parse("int8+zstd"), per="channel")


def test_the_server_takes_only_the_encoding_the_run_asked_for():
    x = activations(shape=(4, 6, 14, 14))

    def received(text: str) -> Received:
        wire = compression.encode("smashed", x, Encoding.parse(text))
        tensors = {**wire, "labels": torch.zeros(4, dtype=torch.int64)}
        message = decode(encode(Kind.SMASHED, make_header("r", "dev0"), m.Smashed(encoding=text), tensors))
        return Received("t", message, 0, 0.0, 0.0)

    item = received("int8+zstd")
    assert decode_smashed(item, "int8+zstd") is None
    assert set(item.message.tensors) == {"smashed", "labels"} and item.message.tensors["smashed"].shape == x.shape
    assert decode_smashed(received("fp16"), "int8+zstd") == "smashed data encoded as fp16; this run asked for int8+zstd"


@pytest.mark.slow
def test_a_bad_encoding_flag_is_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "edge_server", "demo", "--compress", "int4"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "'int4' is not an encoding" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_run_compressed_losslessly_trains_what_fp32_trains_and_int8_sends_fewer_bytes(broker, tmp_path):
    data = load_dataset("builtin:digits", seed=0)
    runs = {}
    for text, gradients in (("fp32", "fp32"), ("fp32+zstd", "fp32+zstd"), ("int8+zstd", "fp16")):
        agents, _ = start_agents(broker, data, 2)
        config = server_config(
            broker,
            tmp_path / text,
            rounds=2,
            min_devices=2,
            cut=2,  # after conv1 + relu: wide activations, half of them zeros
            compress_smashed=text,
            compress_gradient=gradients,
            run_id=f"compress-{text.replace('+', '-')}",
        )
        server = EdgeServer(config, load_model("lenet5", seed=0), data)
        try:
            server.run()
        finally:
            close(agents)
        runs[text] = server
    fp32, lossless, int8 = runs["fp32"], runs["fp32+zstd"], runs["int8+zstd"]
    assert_same_weights(lossless.model.net.state_dict(), fp32.model.net.state_dict(), atol=0)
    for run in runs.values():
        assert all(r["rejected_messages"] == {} and r["dropped"] == [] for r in run.history)
    smashed = {text: sum(r["bytes"]["smashed"] for r in run.history) for text, run in runs.items()}
    gradient = {text: sum(r["bytes"]["gradient"] for r in run.history) for text, run in runs.items()}
    assert smashed["int8+zstd"] < smashed["fp32"] / 4 and smashed["fp32+zstd"] < smashed["fp32"]
    assert gradient["int8+zstd"] < 0.55 * gradient["fp32"]  # fp16
    assert abs(int8.history[-1]["accuracy"] - fp32.history[-1]["accuracy"]) < 0.1
    assert all(r["bytes_up"] == r["bytes"]["smashed"] + r["bytes"]["weights_up"] for r in int8.history)


def test_an_agent_without_zstandard_refuses_a_packed_assignment_in_one_line(monkeypatch):
    import importlib.util

    from firmware_agent.agent import AgentConfig, DeviceAgent
    from tests.frames import KeptFrames
    from toolkit.protocol.endpoint import Received
    from toolkit.transport import parse_broker_url

    data = load_dataset("builtin:digits", seed=0)
    agent = DeviceAgent(
        AgentConfig(parse_broker_url("mqtt://127.0.0.1:1"), "dev0", "0/1"), data, torch.arange(10).numpy(), None
    )
    model = load_model("lenet5", seed=0)
    body = m.Assign(
        scheme="cpsl",
        model="lenet5",
        model_fingerprint=model.fingerprint(),
        input_shape=list(data.input_shape),
        num_classes=data.num_classes,
        cut=2,
        cluster=0,
        cluster_devices=["dev0"],
        hyper=m.Hyperparameters(batch_size=8, iterations=1, lr=0.1, momentum=0.0, weight_decay=0.0),
        gradient_timeout_s=5,
        compression=m.Compression(smashed="int8+zstd", gradient="fp16"),
    )
    message = decode(encode(Kind.ASSIGN, make_header("r", "server"), body))
    agent.endpoint.attach(transport := KeptFrames())
    assignment = Received("cpsl/v1/runs/r/devices/dev0/down", message, 0, time.monotonic())
    agent.handle(assignment)  # zstandard is installed here: accepted
    assert agent.assignment is not None and not transport.sent(Kind.REJECT)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "zstandard" else real(name, *a))
    agent.handle(assignment)
    [refusal] = transport.sent(Kind.REJECT)
    assert refusal.body.refused == "ASSIGN" and "lacks it: pip install zstandard" in refusal.body.reason
