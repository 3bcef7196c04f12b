"""Splitting frames above a size limit into CHUNK frames, and putting them back together.

Brokers and small boards have message size limits (Mosquitto's default is 256 MiB,
but many deployments set far less, and a Pi Zero should not buffer a 100 MB message).
A frame larger than ``max_chunk_bytes`` travels as CHUNK frames that carry a transfer
id, their index, the count and the total size, and a slice of the original frame as a
uint8 tensor. The reassembler bounds memory (total size limit, number of transfers in
flight) and forgets transfers that stall, so a lost chunk costs memory only briefly.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field

import torch

from toolkit.protocol.codec import DEFAULT_MAX_FRAME_BYTES, Message, ProtocolError, encode
from toolkit.protocol.messages import Chunk, Header, Kind

CHUNK_OVERHEAD_BYTES = 1024  # prefix + JSON header of a CHUNK frame, generously


def split(frame: bytes, header: Header, max_chunk_bytes: int) -> list[bytes]:
    """``[frame]`` if it fits, else CHUNK frames of at most ``max_chunk_bytes`` each."""
    if len(frame) <= max_chunk_bytes:
        return [frame]
    data_per_chunk = max_chunk_bytes - CHUNK_OVERHEAD_BYTES
    if data_per_chunk <= 0:
        raise ValueError(f"max_chunk_bytes {max_chunk_bytes} leaves no room for data")
    count = math.ceil(len(frame) / data_per_chunk)
    transfer = secrets.token_hex(8)
    whole = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
    return [
        encode(
            Kind.CHUNK,
            header,
            Chunk(transfer=transfer, index=index, count=count, total_bytes=len(frame)),
            {"data": whole[index * data_per_chunk : (index + 1) * data_per_chunk]},
        )
        for index in range(count)
    ]


@dataclass
class _Transfer:
    count: int
    total_bytes: int
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    def __init__(
        self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, max_transfers: int = 64, expiry_s: float = 120.0
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_transfers = max_transfers
        self.expiry_s = expiry_s
        self._transfers: dict[tuple[str, str], _Transfer] = {}

    def add(self, message: Message) -> bytes | None:
        """Take one CHUNK message; returns the original frame once all its chunks have arrived."""
        body = message.body
        assert isinstance(body, Chunk)
        self._expire()
        if body.total_bytes > self.max_frame_bytes:
            raise ProtocolError(f"chunked frame of {body.total_bytes} bytes exceeds the limit {self.max_frame_bytes}")
        if body.index >= body.count:
            raise ProtocolError(f"chunk index {body.index} is not below its count {body.count}")
        data = message.tensors.get("data")
        if data is None or data.dtype != torch.uint8 or data.dim() != 1:
            raise ProtocolError("chunk must carry one 1-D uint8 tensor named data")
        key = (message.header.device, body.transfer)
        transfer = self._transfers.get(key)
        if transfer is None:
            if len(self._transfers) >= self.max_transfers:
                raise ProtocolError(f"more than {self.max_transfers} chunked transfers in flight")
            transfer = self._transfers[key] = _Transfer(body.count, body.total_bytes, time.monotonic())
        elif (transfer.count, transfer.total_bytes) != (body.count, body.total_bytes):
            del self._transfers[key]
            raise ProtocolError(f"chunk {body.index} of transfer {body.transfer} disagrees on count or size")
        transfer.parts[body.index] = data.numpy().tobytes()
        received = sum(len(part) for part in transfer.parts.values())
        if received > transfer.total_bytes:
            del self._transfers[key]
            raise ProtocolError(f"transfer {body.transfer} sent more bytes than announced")
        if len(transfer.parts) < transfer.count:
            return None
        del self._transfers[key]
        frame = b"".join(transfer.parts[index] for index in range(transfer.count))
        if len(frame) != transfer.total_bytes:
            raise ProtocolError(
                f"transfer {body.transfer} reassembled to {len(frame)} bytes, announced {transfer.total_bytes}"
            )
        return frame

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._transfers.items() if now - t.started > self.expiry_s]:
            del self._transfers[key]

    @property
    def in_flight(self) -> int:
        return len(self._transfers)
