"""One side of a conversation over the transport: frames out (chunked if large), messages in (validated).

Incoming frames are handled on the transport's network thread only as far as
decoding: decode (size limit first), reassemble chunks, drop duplicates (QoS 1 may
deliver twice: the sender's sequence number tells), then queue. A frame that fails
any check is logged with its reason, counted in ``rejected``, and dropped; nothing
raises into the network thread and nothing reaches a model. The owner's main loop
takes messages from :meth:`receive` with a timeout.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from toolkit.protocol import topics
from toolkit.protocol.chunking import Reassembler, split
from toolkit.protocol.codec import DEFAULT_MAX_FRAME_BYTES, Message, ProtocolError, decode, encode
from toolkit.protocol.messages import Body, Header, Kind

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
QOS_BY_KIND = {Kind.HEARTBEAT: 0}  # everything else: QoS 1 (at least once, duplicates dropped by seq)


@dataclass
class Received:
    topic: str
    message: Message
    size: int
    received_at: float  # time.monotonic(), for durations on this host
    arrived_wall: float = 0.0  # time.time() when the (last piece of the) frame arrived, for cross-host timing


class Endpoint:
    def __init__(
        self,
        name: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        inbox_limit: int = 10_000,
    ) -> None:
        self.name = name
        self.max_frame_bytes = max_frame_bytes
        self.chunk_bytes = chunk_bytes
        self.transport = None  # set by attach(); the transport calls on_frame
        self.rejected: Counter[str] = Counter()
        self._inbox: queue.Queue[Received] = queue.Queue(maxsize=inbox_limit)
        self._reassembler = Reassembler(max_frame_bytes=max_frame_bytes)
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        # Sequence numbers start at the current time in microseconds, so a restarted sender
        # never reuses numbers the receiver remembers from its previous life.
        self._seq = itertools.count(time.time_ns() // 1000)
        self._lock = threading.Lock()

    def attach(self, transport: object) -> None:
        self.transport = transport

    # network thread ------------------------------------------------------------------------
    def on_frame(self, topic: str, payload: bytes) -> None:
        arrived = time.time()
        try:
            message = decode(payload, self.max_frame_bytes)
            if message.kind is Kind.CHUNK:
                with self._lock:
                    frame = self._reassembler.add(message)
                if frame is None:
                    return
                payload_size = len(frame)
                message = decode(frame, self.max_frame_bytes)
            else:
                payload_size = len(payload)
            sender = topics.device_of(topic)
            if sender is not None and message.header.device != sender and message.kind is not Kind.SERVER_STATUS:
                raise ProtocolError(f"header names device {message.header.device!r} but the topic is {sender!r}'s")
            if self._duplicate(message.header):
                return
            self._inbox.put_nowait(Received(topic, message, payload_size, time.monotonic(), arrived))
        except ProtocolError as exc:
            self.reject(topic, str(exc))
        except queue.Full:
            self.reject(topic, "inbox full")

    def reject(self, topic: str, reason: str) -> None:
        self.rejected[reason.split(":")[0]] += 1
        log.warning("dropped a message on %s: %s", topic, reason)

    def _duplicate(self, header: Header) -> bool:
        key = (header.device, header.seq)
        with self._lock:
            if key in self._seen:
                return True
            self._seen[key] = None
            if len(self._seen) > 50_000:
                self._seen.popitem(last=False)
        return False

    # owner's thread ------------------------------------------------------------------------
    def receive(self, timeout_s: float) -> Received | None:
        try:
            return self._inbox.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def next_seq(self) -> int:
        return next(self._seq)

    def send(
        self,
        topic: str,
        kind: Kind,
        body: Body,
        *,
        run: str,
        device: str,
        round_: int = 0,
        iteration: int = 0,
        tensors: dict[str, torch.Tensor] | None = None,
        retain: bool = False,
    ) -> int:
        """Encode, chunk if needed, publish; returns the bytes put on the wire."""
        header = Header(
            run=run, device=device, round=round_, iteration=iteration, seq=self.next_seq(), sent_at=time.time()
        )
        frame = encode(kind, header, body, tensors)
        pieces = [frame] if retain else split(frame, header, self.chunk_bytes)
        for piece in pieces:
            self.transport.publish(topic, piece, qos=QOS_BY_KIND.get(kind, 1), retain=retain)
        return sum(len(piece) for piece in pieces)
