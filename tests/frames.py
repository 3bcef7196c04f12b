"""Protocol frames and received messages built for tests that feed handlers without a broker."""

from __future__ import annotations

from toolkit.protocol import Kind, decode, encode, make_header
from toolkit.protocol import messages as m
from toolkit.protocol.endpoint import Received


def frame(kind: Kind, body: m.Body, device: str = "dev0", run: str = "r", tensors=None, seq: int = 1) -> bytes:
    return encode(kind, make_header(run, device, seq=seq), body, tensors)


def received(kind: Kind, body: m.Body, device: str = "dev0") -> Received:
    """A device's message outside any run (registration traffic), as the endpoint hands it on."""
    return Received("t", decode(frame(kind, body, device=device, run="idle")), 0, 0.0)
