"""The frame codec and chunking, without a broker: round trips and every kind of bad frame."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from toolkit.protocol import Kind, ProtocolError, Reassembler, decode, encode, make_header, split
from toolkit.protocol import messages as m
from toolkit.protocol.codec import MAGIC


def header(**overrides):
    values = {"run": "run-1", "device": "pi-3", "round_": 2, "iteration": 5, "seq": 9} | overrides
    return make_header(**values)


def smashed_frame(batch: int = 4) -> bytes:
    return encode(
        Kind.SMASHED, header(), m.Smashed(), {"smashed": torch.randn(batch, 16, 5, 5), "labels": torch.arange(batch)}
    )


def test_round_trip_keeps_dtype_shape_values_and_header() -> None:
    tensors = {
        "smashed": torch.randn(3, 16, 5, 5),
        "labels": torch.tensor([1, 7, 2]),
        "half": torch.randn(2, 2).half(),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
    }
    message = decode(encode(Kind.SMASHED, header(), m.Smashed(), tensors))
    assert message.kind is Kind.SMASHED
    assert (message.header.run, message.header.round, message.header.iteration) == ("run-1", 2, 5)
    for name, tensor in tensors.items():
        assert message.tensors[name].dtype == tensor.dtype
        assert torch.equal(message.tensors[name], tensor)


def test_typed_body_round_trip() -> None:
    body = m.Assign(
        scheme="cpsl",
        model="lenet5",
        model_fingerprint="a1ed2c1a51521309",
        input_shape=[1, 28, 28],
        num_classes=10,
        cut=6,
        cluster=1,
        cluster_devices=["a", "b"],
        hyper=m.Hyperparameters(batch_size=16, iterations=10, lr=0.05),
        gradient_timeout_s=5,
    )
    assert decode(encode(Kind.ASSIGN, header(), body)).body == body


def test_no_pickle_opcode_ever_appears() -> None:
    frame = smashed_frame()
    assert frame[:4] == MAGIC and b"\x80\x04\x95" not in frame[:64]


def _rebuild(meta: dict, payload: bytes, kind: int = Kind.SMASHED) -> bytes:
    raw = json.dumps(meta).encode()
    return struct.pack(">4sBBI", MAGIC, 1, kind, len(raw)) + raw + payload


def _parts(frame: bytes) -> tuple[dict, bytes]:
    length = struct.unpack_from(">I", frame, 6)[0]
    return json.loads(frame[10 : 10 + length]), frame[10 + length :]


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda f: b"garbage bytes that are not a frame", "bad magic"),
        (lambda f: f[:7], "shorter than"),
        (lambda f: f[:4] + b"\x07" + f[5:], "protocol version 7"),
        (lambda f: f[:5] + b"\xee" + f[6:], "unknown message kind 238"),
        (lambda f: f[:6] + struct.pack(">I", 10**6) + f[10:], "does not fit"),
        (lambda f: f[:-3], "only"),
        (lambda f: f + b"xx", "2 bytes after the last tensor"),
    ],
)
def test_structurally_bad_frames(mangle, reason) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode(mangle(smashed_frame()))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda meta: meta["tensors"][0].update(dtype="object"), "dtype 'object' is not allowed"),
        (lambda meta: meta["tensors"][0].update(shape=[-1, 5]), "shape"),
        (lambda meta: meta["tensors"][0].update(shape=[1] * 9), "shape"),
        (lambda meta: meta["tensors"][1].update(name="smashed"), "repeated name"),
        (lambda meta: meta["header"].update(run="../../#"), "field run"),
        (lambda meta: meta["header"].update(round=-1), "field round"),
        (lambda meta: meta.update(extra=1), "exactly header, body and tensors"),
        (lambda meta: meta["body"].update(unexpected=True), "Extra inputs"),
    ],
)
def test_semantically_bad_frames(edit, reason) -> None:
    meta, payload = _parts(smashed_frame())
    edit(meta)
    with pytest.raises(ProtocolError, match=reason):
        decode(_rebuild(meta, payload))


def test_non_finite_values_are_refused() -> None:
    frame = encode(Kind.GRADIENT, header(), m.Gradient(), {"grad": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ProtocolError, match="NaN or infinity"):
        decode(frame)


def test_size_limit_is_checked_first() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(smashed_frame(batch=64), max_bytes=1000)


def test_chunking_round_trip_in_any_order() -> None:
    frame = smashed_frame(batch=200)
    chunks = split(frame, header(), max_chunk_bytes=16_000)
    assert len(chunks) > 10 and all(len(chunk) <= 16_000 for chunk in chunks)
    reassembler = Reassembler()
    results = [reassembler.add(decode(chunk)) for chunk in reversed(chunks)]
    assert results[:-1] == [None] * (len(chunks) - 1) and results[-1] == frame
    assert reassembler.in_flight == 0


def test_small_frames_are_not_chunked() -> None:
    frame = smashed_frame()
    assert split(frame, header(), max_chunk_bytes=1 << 20) == [frame]


def test_reassembler_bounds_memory() -> None:
    chunks = split(smashed_frame(batch=200), header(), max_chunk_bytes=16_000)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        Reassembler(max_frame_bytes=1000).add(decode(chunks[0]))
    crowded = Reassembler(max_transfers=1)
    crowded.add(decode(chunks[0]))
    other = split(smashed_frame(batch=200), header(), max_chunk_bytes=16_000)
    with pytest.raises(ProtocolError, match="in flight"):
        crowded.add(decode(other[0]))


def test_stalled_transfers_expire() -> None:
    chunks = split(smashed_frame(batch=200), header(), max_chunk_bytes=16_000)
    reassembler = Reassembler(expiry_s=0.0)
    reassembler.add(decode(chunks[0]))
    reassembler.add(decode(split(smashed_frame(batch=200), header(), max_chunk_bytes=16_000)[0]))
    assert reassembler.in_flight == 1  # the first transfer was forgotten
