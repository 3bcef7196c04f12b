"""The one seam between cpsl-edge and the network: publish bytes to topics, receive bytes from topics.

Agents and the server see only :class:`Transport`; MQTT (paho) is one driver behind it,
as NVIDIA FLARE keeps its drivers. Handlers are called from the driver's network
thread and must not block: they decode and queue, the owner's main loop does the work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

from toolkit.errors import UserError

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class Will:
    """What the broker publishes for us when we vanish without saying goodbye."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (port 1883 by default)."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme != "mqtt":
        raise UserError(f"broker URL {url!r}: only mqtt://HOST:PORT is supported")
    try:
        port = parsed.port or 1883
    except ValueError:
        raise UserError(f"broker URL {url!r} has an invalid port") from None
    if not parsed.hostname:
        raise UserError(f"broker URL {url!r} has no host")
    return BrokerAddress(parsed.hostname, port)


class Transport(Protocol):
    def connect(self, timeout_s: float) -> None:
        """Connect, or raise UserError naming the broker within ``timeout_s``."""

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything published so far has left (QoS 1: acknowledged); False on timeout."""

    def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...
