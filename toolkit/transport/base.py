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
from toolkit.transport.tls import TlsFiles

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
    tls: TlsFiles | None = None  # set: mqtts, the broker verified against tls.ca, our certificate presented

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def parse_broker_url(url: str, tls: TlsFiles | None = None) -> BrokerAddress:
    """``mqtt://host[:port]`` (1883 by default) or ``mqtts://host[:port]`` (8883), which needs ``tls``."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in DEFAULT_PORTS:
        raise UserError(f"broker URL {url!r}: give mqtt://HOST:PORT or mqtts://HOST:PORT")
    try:
        port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    except ValueError:
        raise UserError(f"broker URL {url!r} has an invalid port") from None
    if not parsed.hostname:
        raise UserError(f"broker URL {url!r} has no host")
    if parsed.scheme == "mqtts" and tls is None:
        raise UserError(f"broker URL {url!r} is TLS: give the CA (--ca, or --bundle DIR from edge_server provision)")
    if parsed.scheme == "mqtt" and tls is not None:
        raise UserError(f"TLS files were given but broker URL {url!r} is plaintext: use mqtts://")
    return BrokerAddress(parsed.hostname, port, tls)


class Transport(Protocol):
    def connect(self, timeout_s: float) -> None:
        """Connect, or raise UserError naming the broker within ``timeout_s``."""

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything published so far has left (QoS 1: acknowledged); False on timeout."""

    def close(self, timeout_s: float | None = None) -> None:
        """Disconnect; with ``timeout_s``, return within about that long whatever the link does."""

    @property
    def connected(self) -> bool: ...
