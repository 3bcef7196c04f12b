"""Protocol frames and received messages built for tests that feed handlers without a broker."""

from __future__ import annotations

from toolkit.protocol import Kind, decode, encode, make_header
from toolkit.protocol import messages as m
from toolkit.protocol.codec import Message
from toolkit.protocol.endpoint import Received


def frame(kind: Kind, body: m.Body, device: str = "dev0", run: str = "r", tensors=None, seq: int = 1) -> bytes:
    return encode(kind, make_header(run, device, seq=seq), body, tensors)


def received(kind: Kind, body: m.Body, device: str = "dev0") -> Received:
    """A device's message outside any run (registration traffic), as the endpoint hands it on."""
    return Received("t", decode(frame(kind, body, device=device, run="idle")), 0, 0.0)


class KeptFrames:
    """The transport seam in memory: keeps every frame published (no broker; nothing travels)."""

    connected = True

    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.frames.append((topic, payload))

    def flush(self, timeout_s: float) -> bool:
        return True

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        pass

    def sent(self, kind: Kind) -> list[Message]:
        return [m for m in (decode(frame) for _, frame in self.frames) if m.kind is kind]
