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
    sender: str
    parts: dict[int, bytes] = field(default_factory=dict)
    received_bytes: int = 0  # kept as chunks arrive: no re-summing, linear time overall


class Reassembler:
    """Puts chunked frames back together, in time linear in the bytes received.

    Memory is bounded three ways: a transfer reserves its announced size when its first
    chunk arrives, against a budget per sender and one overall; a sender may have at
    most ``max_transfers_per_sender`` transfers open; and a transfer that stalls for
    ``expiry_s`` is forgotten. A sender that exceeds its budget is refused; the others
    are not affected.
    """

    def __init__(
        self,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_transfers: int = 64,
        expiry_s: float = 120.0,
        max_bytes_per_sender: int | None = None,
        max_bytes_total: int | None = None,
        max_transfers_per_sender: int = 4,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_transfers = max_transfers
        self.expiry_s = expiry_s
        self.max_bytes_per_sender = max_bytes_per_sender or 2 * max_frame_bytes
        self.max_bytes_total = max_bytes_total or 8 * max_frame_bytes
        self.max_transfers_per_sender = max_transfers_per_sender
        self._transfers: dict[tuple[str, str], _Transfer] = {}
        self._reserved_by_sender: dict[str, int] = {}
        self._reserved_total = 0

    def add(self, message: Message) -> bytes | None:
        """Take one CHUNK message; returns the original frame once all its chunks have arrived."""
        body = message.body
        if not isinstance(body, Chunk):
            raise ProtocolError("not a chunk")
        self._expire()
        if body.total_bytes > self.max_frame_bytes:
            raise ProtocolError(f"chunked frame of {body.total_bytes} bytes exceeds the limit {self.max_frame_bytes}")
        if body.index >= body.count:
            raise ProtocolError(f"chunk index {body.index} is not below its count {body.count}")
        if body.count > body.total_bytes:
            raise ProtocolError(f"{body.count} chunks cannot carry {body.total_bytes} bytes")
        data = message.tensors.get("data")
        if data is None or data.dtype != torch.uint8 or data.dim() != 1 or len(message.tensors) != 1:
            raise ProtocolError("chunk must carry one 1-D uint8 tensor named data")
        sender = message.header.device
        key = (sender, body.transfer)
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = self._open(key, body)
        elif (transfer.count, transfer.total_bytes) != (body.count, body.total_bytes):
            self._close(key)
            raise ProtocolError(f"chunk {body.index} of transfer {body.transfer} disagrees on count or size")
        part = data.numpy().tobytes()
        previous = transfer.parts.get(body.index)
        transfer.received_bytes += len(part) - (len(previous) if previous is not None else 0)
        transfer.parts[body.index] = part
        if transfer.received_bytes > transfer.total_bytes:
            self._close(key)
            raise ProtocolError(f"transfer {body.transfer} sent more bytes than announced")
        if len(transfer.parts) < transfer.count:
            return None
        self._close(key)
        if transfer.received_bytes != transfer.total_bytes:
            raise ProtocolError(
                f"transfer {body.transfer} reassembled to {transfer.received_bytes} bytes, "
                f"announced {transfer.total_bytes}"
            )
        return b"".join(transfer.parts[index] for index in range(transfer.count))

    def _open(self, key: tuple[str, str], body: Chunk) -> _Transfer:
        sender = key[0]
        if len(self._transfers) >= self.max_transfers:
            raise ProtocolError(f"more than {self.max_transfers} chunked transfers in flight")
        if sum(1 for s, _ in self._transfers if s == sender) >= self.max_transfers_per_sender:
            raise ProtocolError(f"sender has more than {self.max_transfers_per_sender} chunked transfers open")
        held = self._reserved_by_sender.get(sender, 0)
        if held + body.total_bytes > self.max_bytes_per_sender:
            raise ProtocolError(f"sender's chunked transfers would hold more than {self.max_bytes_per_sender} bytes")
        if self._reserved_total + body.total_bytes > self.max_bytes_total:
            raise ProtocolError(f"chunked transfers would hold more than {self.max_bytes_total} bytes in all")
        self._reserved_by_sender[sender] = held + body.total_bytes
        self._reserved_total += body.total_bytes
        transfer = self._transfers[key] = _Transfer(body.count, body.total_bytes, time.monotonic(), sender)
        return transfer

    def _close(self, key: tuple[str, str]) -> None:
        transfer = self._transfers.pop(key)
        left = self._reserved_by_sender[transfer.sender] - transfer.total_bytes
        if left:
            self._reserved_by_sender[transfer.sender] = left
        else:
            del self._reserved_by_sender[transfer.sender]
        self._reserved_total -= transfer.total_bytes

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._transfers.items() if now - t.started > self.expiry_s]:
            self._close(key)

    @property
    def in_flight(self) -> int:
        return len(self._transfers)

    @property
    def reserved_bytes(self) -> int:
        return self._reserved_total
