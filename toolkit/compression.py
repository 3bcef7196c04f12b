"""What crosses the cut, in fewer bytes: quantisation and lossless packing of the smashed data
(device -> server) and of the gradients at the cut (server -> device).

An encoding is a quantiser and an optional packer, written ``QUANT[+PACK]``:

- ``fp32``: as is (4 bytes a value);
- ``fp16``: half precision (2 bytes; lossy past fp16's 11-bit mantissa, values clamped to its range);
- ``int8``: 1 byte a value, affine per channel (dim 1: a convolution's channels, a linear layer's
  features) from each channel's min and max over the batch; the error is at most half a step,
  (max - min) / 510, per value. Smashed data after a ReLU is mostly zeros and small values:
  the range per channel keeps the step small where a single scale for the tensor would not;
- ``+zstd``: the quantised bytes packed by Zstandard (the maintained ``zstandard`` binding),
  lossless; zeros and repeated codes pack well.

Gradients at the cut are per sample of one batch; the next batch is other samples, so a
quantisation residual carried to it (error feedback) would be added to the wrong samples.
They are quantised per batch without feedback: ``fp16``, or ``int8`` with one symmetric
scale per sample.

On the wire a tensor ``x`` becomes a few named tensors (``x.q``, ``x.lo``, ``x.step``,
``x.z``, ``x.shape``) in the same frame; the message body names the encoding. Decoding
validates like the codec does for every frame: the pieces present and no others, their
dtypes and shapes consistent with the declared shape, finite scales, a packed payload that
decompresses to exactly the declared size (never more: the decompressor is bounded). Any
failure is a :class:`ProtocolError` with one line.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from toolkit.protocol.codec import MAX_DIM, MAX_RANK, ProtocolError
from toolkit.protocol.messages import ENCODING_PATTERN

QUANTISERS = ("fp32", "fp16", "int8")
PACKERS = ("zstd",)
ZSTD_LEVEL = 3  # fast enough for a board per batch; level 19 gains a few % at 50x the time
MAX_DECODED_BYTES = 64 << 20  # one tensor, decoded: the frame limit (codec.DEFAULT_MAX_FRAME_BYTES)
_PIECE = re.compile(r"^(?P<base>[A-Za-z_][A-Za-z0-9_]*)\.(?P<part>q|lo|step|z|shape)$")


@dataclass(frozen=True)
class Encoding:
    quantiser: str = "fp32"
    packer: str | None = None

    @classmethod
    def parse(cls, text: str) -> Encoding:
        text = "fp32" if text.strip() == "none" else text.strip()
        match = re.match(ENCODING_PATTERN, text)
        if match is None:
            raise ValueError(
                f"{text!r} is not an encoding: none, or QUANT[+zstd] with QUANT one of {', '.join(QUANTISERS)}"
            )
        return cls(match.group(1), "zstd" if match.group(2) else None)

    @property
    def name(self) -> str:
        return self.quantiser + (f"+{self.packer}" if self.packer else "")

    @property
    def nominal_ratio(self) -> float:
        """Wire bytes per fp32 byte before anything is measured: the quantiser's width (what zstd
        adds depends on the data, so it is not guessed)."""
        return {"fp32": 1.0, "fp16": 0.5, "int8": 0.25}[self.quantiser]

    @property
    def is_identity(self) -> bool:
        return self.quantiser == "fp32" and self.packer is None

    def __str__(self) -> str:
        return self.name


FP32 = Encoding()


# encoding ----------------------------------------------------------------------------------------
def encode(name: str, tensor: torch.Tensor, encoding: Encoding, per: str = "channel") -> dict[str, torch.Tensor]:
    """``tensor`` (floating point) as the wire tensors of ``encoding``; ``per``: "channel" (dim 1,
    asymmetric: smashed data) or "sample" (dim 0, symmetric: gradients) for int8."""
    x = tensor.detach().to(torch.float32).contiguous()
    if encoding.is_identity:
        return {name: x}
    pieces: dict[str, torch.Tensor] = {}
    if encoding.quantiser == "fp32":
        payload = x
    elif encoding.quantiser == "fp16":
        payload = x.clamp(-65504.0, 65504.0).to(torch.float16)
    elif per == "channel":
        payload, lo, step = _int8_per_channel(x)
        pieces[f"{name}.lo"], pieces[f"{name}.step"] = lo, step
    else:
        payload, step = _int8_per_sample(x)
        pieces[f"{name}.step"] = step
    if encoding.packer == "zstd":
        import zstandard

        raw = payload.numpy().tobytes()
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
        pieces[f"{name}.z"] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
        pieces[f"{name}.shape"] = torch.tensor(list(x.shape), dtype=torch.int64)
    elif encoding.quantiser == "int8":
        pieces[f"{name}.q"] = payload
    else:
        pieces[name] = payload
    return pieces


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (C, N * ...): one row per channel."""
    return x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() >= 2 else x.reshape(1, -1)


def _int8_per_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = _channels_last(x)
    lo = rows.min(dim=1).values if rows.numel() else torch.zeros(rows.shape[0])
    hi = rows.max(dim=1).values if rows.numel() else torch.zeros(rows.shape[0])
    step = (hi - lo) / 255.0
    safe = torch.where(step > 0, step, torch.ones_like(step))
    shape = (1, -1) + (1,) * (x.dim() - 2) if x.dim() >= 2 else (1,)
    q = torch.round((x - lo.view(shape)) / safe.view(shape)).clamp(0, 255).to(torch.uint8)
    return q, lo, step


def _int8_per_sample(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.reshape(x.shape[0], -1) if x.dim() >= 1 else x.reshape(1, -1)
    step = rows.abs().max(dim=1).values / 127.0 if rows.numel() else torch.zeros(rows.shape[0])
    safe = torch.where(step > 0, step, torch.ones_like(step))
    shape = (-1,) + (1,) * (x.dim() - 1)
    q = (torch.round(x / safe.view(shape)).clamp(-127, 127) + 128).to(torch.uint8)  # the wire has no int8
    return q, step


# decoding ----------------------------------------------------------------------------------------
def decode(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    encoding: Encoding,
    per: str = "channel",
    expect_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The float32 tensor ``name`` from its wire pieces in ``tensors``; ProtocolError if they are
    not exactly what ``encoding`` makes, or decode to another shape than ``expect_shape``."""
    mine = {key for key in tensors if key == name or key.startswith(name + ".")}
    wanted = _pieces(name, encoding, per)
    if mine != wanted:
        raise ProtocolError(f"{name} in {encoding}: expected tensors {sorted(wanted)}, got {sorted(mine) or 'none'}")
    if encoding.packer == "zstd":
        shape = _declared_shape(tensors[f"{name}.shape"], name)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.uint8}[encoding.quantiser]
        payload = _unpack(tensors[f"{name}.z"], shape, dtype, name)
    elif encoding.quantiser == "int8":
        payload = tensors[f"{name}.q"]
        if payload.dtype != torch.uint8:
            raise ProtocolError(f"{name}.q is {payload.dtype}, not uint8")
    else:
        payload = tensors[name]
        want = torch.float16 if encoding.quantiser == "fp16" else torch.float32
        if payload.dtype != want:
            raise ProtocolError(f"{name} in {encoding} is {payload.dtype}, not {want}")
    shape = tuple(payload.shape)
    if expect_shape is not None and shape != tuple(expect_shape):
        raise ProtocolError(f"{name} has shape {list(shape)}, expected {list(expect_shape)}")
    if encoding.quantiser != "int8":
        return payload.to(torch.float32)
    if per == "channel":
        channels = shape[1] if len(shape) >= 2 else 1
        lo = _scale(tensors[f"{name}.lo"], channels, f"{name}.lo", nonnegative=False)
        step = _scale(tensors[f"{name}.step"], channels, f"{name}.step")
        view = (1, -1) + (1,) * (len(shape) - 2) if len(shape) >= 2 else (1,)
        return payload.to(torch.float32) * step.view(view) + lo.view(view)
    samples = shape[0] if shape else 1
    step = _scale(tensors[f"{name}.step"], samples, f"{name}.step")
    view = (-1,) + (1,) * (len(shape) - 1)
    return (payload.to(torch.float32) - 128.0) * step.view(view)


def declared_shape(
    name: str, tensors: Mapping[str, torch.Tensor], encoding: Encoding, per: str = "channel"
) -> tuple[int, ...]:
    """The shape the wire pieces of ``name`` declare, checked before anything is decompressed (so a
    receiver can refuse an oversized batch first); ProtocolError if the pieces are not ``encoding``'s."""
    mine = {key for key in tensors if key == name or key.startswith(name + ".")}
    wanted = _pieces(name, encoding, per)
    if mine != wanted:
        raise ProtocolError(f"{name} in {encoding}: expected tensors {sorted(wanted)}, got {sorted(mine) or 'none'}")
    if encoding.packer == "zstd":
        return _declared_shape(tensors[f"{name}.shape"], name)
    return tuple(tensors[f"{name}.q" if encoding.quantiser == "int8" else name].shape)


def _pieces(name: str, encoding: Encoding, per: str) -> set[str]:
    if encoding.is_identity:
        return {name}
    pieces = {f"{name}.z", f"{name}.shape"} if encoding.packer else set()
    if encoding.quantiser == "int8":
        pieces |= {f"{name}.step"} | ({f"{name}.lo"} if per == "channel" else set())
        if not encoding.packer:
            pieces.add(f"{name}.q")
    elif not encoding.packer:
        pieces.add(name)
    return pieces


def _declared_shape(tensor: torch.Tensor, name: str) -> tuple[int, ...]:
    if tensor.dtype != torch.int64 or tensor.dim() != 1 or not 0 < tensor.numel() <= MAX_RANK:
        raise ProtocolError(f"{name}.shape must be 1 to {MAX_RANK} int64 dimensions")
    shape = tuple(int(v) for v in tensor.tolist())
    if any(not 0 <= v <= MAX_DIM for v in shape):
        raise ProtocolError(f"{name}.shape {list(shape)} has a dimension out of range")
    return shape


def _unpack(packed: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor:
    import zstandard

    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ProtocolError(f"{name}.z must be a 1-D uint8 tensor")
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if size > MAX_DECODED_BYTES:
        raise ProtocolError(f"{name} would decode to {size} bytes, over {MAX_DECODED_BYTES}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(packed.numpy().tobytes(), max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"{name}.z does not decompress: {str(exc)[:200]}") from None
    if len(raw) != size:
        raise ProtocolError(f"{name}.z decompresses to {len(raw)} bytes, the shape says {size}")
    numpy_dtype = {torch.float32: "<f4", torch.float16: "<f2", torch.uint8: "u1"}[dtype]
    array = np.frombuffer(raw, dtype=np.dtype(numpy_dtype)).reshape(shape)
    tensor = torch.from_numpy(array.copy())
    if dtype != torch.uint8 and not bool(torch.isfinite(tensor).all()):
        raise ProtocolError(f"{name} holds non-finite values")
    return tensor


def _scale(tensor: torch.Tensor, length: int, name: str, nonnegative: bool = True) -> torch.Tensor:
    if tensor.dtype != torch.float32 or tuple(tensor.shape) != (length,):
        raise ProtocolError(f"{name} must be {length} float32 values, got {tensor.dtype} {list(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()) or (nonnegative and bool((tensor < 0).any())):
        raise ProtocolError(f"{name} holds a value that is not a finite{' non-negative' if nonnegative else ''} number")
    return tensor


def wire_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# trying the encodings on real data (``--compress auto``) ---------------------------------------
CANDIDATES = (  # (smashed data, gradients): from none to the fewest bytes
    ("fp32", "fp32"),
    ("fp16", "fp16"),
    ("fp16+zstd", "fp16+zstd"),
    ("int8", "fp16"),
    ("int8+zstd", "fp16+zstd"),
    ("int8+zstd", "int8+zstd"),
)


@dataclass(frozen=True)
class Trial:
    """What one pair of encodings did to batches that crossed the cut."""

    smashed: str
    gradient: str
    uplink_ratio: float  # wire bytes per fp32 byte, smashed data
    downlink_ratio: float  # the same, gradients
    smashed_error: float  # relative RMS error the encoding added, ||x - decode(encode(x))|| / ||x||
    gradient_error: float
    codec_s_per_byte: float  # encode + decode of both, here, per fp32 byte of smashed data

    @property
    def error(self) -> float:
        return max(self.smashed_error, self.gradient_error)

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.__dataclass_fields__}


def trial(samples: list[tuple[torch.Tensor, torch.Tensor]], smashed: str, gradient: str) -> Trial:
    """Encode and decode each (smashed data, gradient) pair of ``samples`` with the two encodings."""
    up_enc, down_enc = Encoding.parse(smashed), Encoding.parse(gradient)
    if samples:  # once untimed: the first call of a codec pays for its imports and allocations
        decode("smashed", encode("smashed", samples[0][0], up_enc), up_enc)
        decode("grad", encode("grad", samples[0][1], down_enc, per="sample"), down_enc, per="sample")
    wire_up = wire_down = fp32 = 0
    error_up = error_down = norm_up = norm_down = 0.0
    seconds = 0.0
    for x, g in samples:
        started = time.perf_counter()
        pieces_up = encode("smashed", x, up_enc)
        back_up = decode("smashed", pieces_up, up_enc)
        pieces_down = encode("grad", g, down_enc, per="sample")
        back_down = decode("grad", pieces_down, down_enc, per="sample")
        seconds += time.perf_counter() - started
        fp32 += x.numel() * 4
        wire_up, wire_down = wire_up + wire_bytes(pieces_up), wire_down + wire_bytes(pieces_down)
        error_up += float((x - back_up).pow(2).sum())
        error_down += float((g - back_down).pow(2).sum())
        norm_up, norm_down = norm_up + float(x.pow(2).sum()), norm_down + float(g.pow(2).sum())
    fp32 = max(fp32, 1)
    return Trial(
        smashed,
        gradient,
        wire_up / fp32,
        wire_down / fp32,
        math.sqrt(error_up / norm_up) if norm_up > 0 else 0.0,
        math.sqrt(error_down / norm_down) if norm_down > 0 else 0.0,
        seconds / fp32,
    )
