"""One side of a conversation over the transport: frames out (chunked if large), messages in (validated).

Incoming frames are handled on the transport's network thread only as far as
decoding: decode (size limit first), check the kind may travel on that topic and the
header's device is the topic's, reassemble chunks (linear time, byte budgets per
sender and overall), drop duplicates (QoS 1 may deliver twice: the sender's sequence
number tells), then queue (the inbox is bounded in frames and in bytes). A frame that
fails any check is logged with its reason, counted in ``rejected``, and dropped;
nothing raises into the network thread and nothing reaches a model. The owner's main
loop takes messages from :meth:`receive` with a timeout.
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import torch

from toolkit.protocol import topics
from toolkit.protocol.chunking import Reassembler, split
from toolkit.protocol.codec import DEFAULT_MAX_FRAME_BYTES, Message, ProtocolError, decode, encode
from toolkit.protocol.messages import Body, Header, Kind

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
REPLAY_PER_TOPIC = 4  # the last messages sent on each topic are kept for replay after a reconnect
REPLAY_MAX_BYTES = 96 << 20  # and no more than this in all (oldest dropped first)
QOS_BY_KIND = {Kind.HEARTBEAT: 0}  # everything else: QoS 1 (at least once, duplicates dropped by seq)
MAX_REASONS = 64  # distinct rejection reasons counted; the rest go under "other"
MAX_SENDERS = 1024  # distinct devices whose rejected frames are counted apiece; the rest go under "other"
_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|\d+(\.\d+)?")


def reason_key(reason: str) -> str:
    """The counted form of a rejection reason: its text before any colon, with quoted values
    and numbers taken out, so a sender cannot grow the counter with made-up strings."""
    head = reason.split(":")[0]
    return _VARIABLE.sub("#", head)[:80].strip() or "other"


class RateLimitedLog:
    """Logs the first ``burst`` events of each key, then one in ``every``: a flood of bad
    frames must not fill the disk with log lines."""

    def __init__(self, logger: logging.Logger, burst: int = 20, every: int = 1000) -> None:
        self.logger, self.burst, self.every = logger, burst, every
        self._counts: Counter[str] = Counter()

    def warning(self, key: str, message: str, *args: object) -> None:
        self._counts[key] += 1
        count = self._counts[key]
        if count <= self.burst or count % self.every == 0:
            suffix = f" ({count} so far)" if count > self.burst else ""
            self.logger.warning(message + suffix, *args)


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
        inbox_max_bytes: int | None = None,
    ) -> None:
        self.name = name
        self.max_frame_bytes = max_frame_bytes
        self.chunk_bytes = chunk_bytes
        self.inbox_max_bytes = inbox_max_bytes or 4 * max_frame_bytes
        self.transport = None  # set by attach(); the transport calls on_frame
        self.rejected: Counter[str] = Counter()
        self.rejected_by_device: Counter[str] = Counter()  # by the device the topic names (the dashboard's fleet)
        # bytes by message kind (a bounded set of labels), for the Prometheus endpoint
        self.bytes_sent: Counter[str] = Counter()
        self.bytes_received: Counter[str] = Counter()
        self.unacknowledged = 0  # flushes that timed out: what they waited for goes again on reconnect
        self._inbox: queue.Queue[Received] = queue.Queue(maxsize=inbox_limit)
        self._inbox_bytes = 0
        self._reassembler = Reassembler(max_frame_bytes=max_frame_bytes)
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        # Sequence numbers start at a random point of a 62-bit space: nobody can predict the
        # next one from outside, and a restarted sender does not reuse numbers the receiver
        # still remembers from its previous life (the chance is below 1e-13).
        self._seq = itertools.count(secrets.randbits(62))
        self._lock = threading.Lock()
        self._log_limiter = RateLimitedLog(log)
        # (topic, pieces, qos) of the last messages sent per topic, oldest first: what a broker
        # restart may have lost in flight is sent again by replay(); receivers drop what they had
        self._replay: OrderedDict[int, tuple[str, list[bytes], int]] = OrderedDict()
        self._replay_by_topic: dict[str, deque[int]] = {}
        self._replay_bytes = 0

    def attach(self, transport: object) -> None:
        self.transport = transport

    def flush(self, timeout_s: float, what: str) -> bool:
        """Wait until everything sent so far is acknowledged (QoS 1). A timeout is logged and
        counted, never ignored: the link or the broker is in trouble; what was sent is kept
        for ``replay`` on reconnect, and the receiver's deadline decides what becomes of the
        turn. ``what`` says what was waited for, for the log."""
        transport = self.transport
        if transport is None:
            return False
        if transport.flush(timeout_s):
            return True
        self.unacknowledged += 1
        self._log_limiter.warning(
            "flush", "%s: %s not acknowledged by the broker within %g s", self.name, what, timeout_s
        )
        return False

    # network thread ------------------------------------------------------------------------
    def on_frame(self, topic: str, payload: bytes) -> None:
        """Decode, check and queue one frame; never raises (the transport's thread calls it)."""
        try:
            self._take(topic, payload)
        except ProtocolError as exc:
            self.reject(topic, str(exc))
        except Exception as exc:  # a defect here must cost one frame, not the network thread
            self.reject(topic, f"frame handling failed ({type(exc).__name__})")

    def _take(self, topic: str, payload: bytes) -> None:
        arrived = time.time()
        role = topics.role_of(topic)
        if role is None:
            raise ProtocolError("not a cpsl topic")
        message = decode(payload, self.max_frame_bytes)
        payload_size = len(payload)
        self._check_topic(topic, role, message)
        if message.kind is Kind.CHUNK:
            with self._lock:
                frame = self._reassembler.add(message)
            if frame is None:
                return
            payload_size = len(frame)
            message = decode(frame, self.max_frame_bytes)
            self._check_topic(topic, role, message)
        if self._duplicate(message.header):
            return
        with self._lock:
            if self._inbox_bytes + payload_size > self.inbox_max_bytes:
                raise ProtocolError(f"inbox full: {self._inbox_bytes} bytes wait to be handled")
            self._inbox_bytes += payload_size
            self.bytes_received[message.kind.name.lower()] += payload_size
        try:
            self._inbox.put_nowait(Received(topic, message, payload_size, time.monotonic(), arrived))
        except queue.Full:
            with self._lock:
                self._inbox_bytes -= payload_size
            raise ProtocolError("inbox full: too many frames wait to be handled") from None

    @staticmethod
    def _check_topic(topic: str, role: str, message: Message) -> None:
        allowed = topics.KINDS_BY_ROLE[role]
        if message.kind not in allowed and not (message.kind is Kind.CHUNK and role in topics.CHUNKED_ROLES):
            raise ProtocolError(f"{message.kind.name} may not travel on a {role} topic")
        sender = topics.device_of(topic)
        if sender is not None and message.header.device != sender:
            raise ProtocolError("header names another device than the topic")
        run = topics.run_of(topic)
        if run is not None and message.header.run != run:
            raise ProtocolError("header names another run than the topic")

    def reject(self, topic: str, reason: str) -> None:
        """Count a dropped frame under a bounded set of reasons, and log it (rate-limited)."""
        key = self.count(reason_key(reason))
        sender = topics.device_of(topic)
        if sender is not None:
            with self._lock:
                if sender not in self.rejected_by_device and len(self.rejected_by_device) >= MAX_SENDERS:
                    sender = "other"
                self.rejected_by_device[sender] += 1
        self._log_limiter.warning(key, "dropped a message on %s: %s", topic[:200], reason[:300])

    def count(self, key: str) -> str:
        """Add one to ``rejected[key]`` (thread-safe; past MAX_REASONS keys, under "other"); the key used."""
        with self._lock:
            if key not in self.rejected and len(self.rejected) >= MAX_REASONS:
                key = "other"
            self.rejected[key] += 1
        return key

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
            item = self._inbox.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None
        with self._lock:
            self._inbox_bytes -= item.size
        return item

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
        qos = QOS_BY_KIND.get(kind, 1)
        for piece in pieces:
            self.transport.publish(topic, piece, qos=qos, retain=retain)
        if qos > 0 and not retain:
            self._remember(header.seq, topic, pieces, qos)
        size = sum(len(piece) for piece in pieces)
        with self._lock:
            self.bytes_sent[kind.name.lower()] += size
        return size

    def _remember(self, seq: int, topic: str, pieces: list[bytes], qos: int) -> None:
        with self._lock:
            self._replay[seq] = (topic, pieces, qos)
            self._replay_bytes += sum(len(p) for p in pieces)
            recent = self._replay_by_topic.setdefault(topic, deque())
            recent.append(seq)
            while len(recent) > REPLAY_PER_TOPIC:
                self._forget(recent[0])
            while self._replay_bytes > REPLAY_MAX_BYTES and len(self._replay) > 1:
                self._forget(next(iter(self._replay)))

    def _forget(self, seq: int) -> None:
        topic, pieces, _ = self._replay.pop(seq)
        self._replay_bytes -= sum(len(p) for p in pieces)
        recent = self._replay_by_topic[topic]
        recent.remove(seq)
        if not recent:
            del self._replay_by_topic[topic]

    def replay(self, topic: str | None = None) -> int:
        """Publish again the last messages sent on each topic (or on ``topic`` only), in the order
        they were first sent; returns how many. For after a reconnect, ours or the receiver's:
        a broker that restarted, or a receiver that was away (a clean session keeps nothing),
        may have lost what was in flight, and nothing else would send it again. A receiver
        that had them drops the copies by sequence number."""
        with self._lock:
            kept = [entry for entry in self._replay.values() if topic is None or entry[0] == topic]
        for topic, pieces, qos in kept:
            for piece in pieces:
                self.transport.publish(topic, piece, qos=qos)
        return len(kept)
