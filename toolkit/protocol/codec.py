"""Frames: a small versioned header plus raw tensor bytes. No pickle, no torch.load, ever.

Layout (all integers big-endian)::

    offset  size  field
    0       4     magic b"CPSL"
    4       1     protocol version (1)
    5       1     message kind (messages.Kind)
    6       4     header length H
    10      H     header: UTF-8 JSON {"header": {...}, "body": {...}, "tensors": [{"name", "dtype", "shape"}]}
    10+H    ...   the tensors' bytes back to back in table order, little-endian, C order

Decoding checks, before anything reaches a model: the total size limit, magic, version,
kind, header length, JSON, the header and body records, every dtype against an allow
list, shapes (non-negative, bounded rank), that the tensor bytes add up to exactly the
payload, and that floating-point tensors are finite. Any failure is a
:class:`ProtocolError` with a one-line reason; the caller logs and drops the frame.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import ValidationError

from toolkit.protocol.bounded_json import JsonLimitError, load_bounded_json
from toolkit.protocol.messages import BODIES, Body, Header, Kind

MAGIC = b"CPSL"
VERSION = 1
_PREFIX = struct.Struct(">4sBBI")
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_DEPTH = 8  # header JSON: {"body": {"iterations": [{...}]}} is 4 deep; nothing needs more
MAX_RANK = 8
MAX_DIM = 1 << 31
MAX_TENSORS = 4096  # a VGG state dict has 40 tensors; MobileNetV2's about 300
DEFAULT_MAX_FRAME_BYTES = 64 << 20

# dtype name on the wire -> (numpy little-endian dtype, torch dtype)
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype("<f4"), torch.float32),
    "float16": (np.dtype("<f2"), torch.float16),
    "float64": (np.dtype("<f8"), torch.float64),
    "int64": (np.dtype("<i8"), torch.int64),
    "int32": (np.dtype("<i4"), torch.int32),
    "uint8": (np.dtype("u1"), torch.uint8),
    "bool": (np.dtype("?"), torch.bool),
}
_TORCH_TO_WIRE = {torch_dtype: name for name, (_, torch_dtype) in DTYPES.items()}


class ProtocolError(ValueError):
    """A frame that must be dropped; the message says why in one line."""


@dataclass
class Message:
    kind: Kind
    header: Header
    body: Body
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def encode(kind: Kind, header: Header, body: Body, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    if not isinstance(body, BODIES[kind]):
        raise TypeError(f"{kind.name} needs a {BODIES[kind].__name__} body, got {type(body).__name__}")
    table = []
    chunks = []
    for name, tensor in (tensors or {}).items():
        tensor = tensor.detach()
        if tensor.dtype not in _TORCH_TO_WIRE:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which the protocol does not carry")
        wire = _TORCH_TO_WIRE[tensor.dtype]
        array = tensor.cpu().contiguous().numpy().astype(DTYPES[wire][0], copy=False)
        table.append({"name": name, "dtype": wire, "shape": list(tensor.shape)})
        chunks.append(array.tobytes(order="C"))
    meta = json.dumps(
        {"header": header.model_dump(mode="json"), "body": body.model_dump(mode="json"), "tensors": table},
        separators=(",", ":"),
    ).encode()
    return b"".join([_PREFIX.pack(MAGIC, VERSION, int(kind), len(meta)), meta, *chunks])


def decode(frame: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """The message in ``frame``, or :class:`ProtocolError`: no other exception escapes."""
    try:
        return _decode(frame, max_bytes)
    except ProtocolError:
        raise
    except Exception as exc:  # a defect of ours must still be a counted rejection, never a crash
        raise ProtocolError(f"undecodable frame ({type(exc).__name__})") from None


def _decode(frame: bytes, max_bytes: int) -> Message:
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError(f"a frame is bytes, not {type(frame).__name__}")
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_bytes}")
    if len(frame) < _PREFIX.size:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, kind_number, header_length = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError("not a cpsl frame (bad magic)")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {VERSION})")
    try:
        kind = Kind(kind_number)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind_number}") from None
    if header_length > MAX_HEADER_BYTES or _PREFIX.size + header_length > len(frame):
        raise ProtocolError(f"header length {header_length} does not fit a {len(frame)}-byte frame")
    try:
        meta = load_bounded_json(
            frame[_PREFIX.size : _PREFIX.size + header_length], max_bytes=MAX_HEADER_BYTES, max_depth=MAX_HEADER_DEPTH
        )
    except JsonLimitError as exc:
        raise ProtocolError(f"header: {exc}") from None
    if not isinstance(meta, dict) or set(meta) != {"header", "body", "tensors"}:
        raise ProtocolError("header JSON must be an object with exactly header, body and tensors")
    try:
        header = Header.model_validate(meta["header"])
        body = BODIES[kind].model_validate(meta["body"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ProtocolError(f"{kind.name}: field {where}: {first['msg']}") from None
    tensors = _decode_tensors(meta["tensors"], memoryview(frame)[_PREFIX.size + header_length :])
    return Message(kind=kind, header=header, body=body, tensors=tensors)


def _decode_tensors(table: object, payload: memoryview) -> dict[str, torch.Tensor]:
    if not isinstance(table, list) or len(table) > MAX_TENSORS:
        raise ProtocolError(f"tensor table must be a list of at most {MAX_TENSORS} entries")
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for position, entry in enumerate(table):
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise ProtocolError(f"tensor {position}: entry must have exactly name, dtype and shape")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not name or len(name) > 256 or name in tensors:
            raise ProtocolError(f"tensor {position}: bad or repeated name {name!r}")
        if dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} is not a list of at most {MAX_RANK} sizes")
        numpy_dtype, _ = DTYPES[dtype]
        nbytes = math.prod(shape) * numpy_dtype.itemsize
        if offset + nbytes > len(payload):
            raise ProtocolError(f"tensor {name!r}: needs {nbytes} bytes, only {len(payload) - offset} remain")
        array = np.frombuffer(payload[offset : offset + nbytes], dtype=numpy_dtype).reshape(shape).copy()
        offset += nbytes
        tensor = torch.from_numpy(array)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(f"tensor {name!r}: contains NaN or infinity")
        tensors[name] = tensor
    if offset != len(payload):
        raise ProtocolError(f"{len(payload) - offset} bytes after the last tensor")
    return tensors


def make_header(run: str, device: str, round_: int = 0, iteration: int = 0, seq: int = 0) -> Header:
    return Header(run=run, device=device, round=round_, iteration=iteration, seq=seq, sent_at=time.time())
