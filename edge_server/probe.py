"""Measuring each device's link through the broker: round-trip time, clock offset, throughput.

Devices are probed one at a time, so each measurement is the device alone on the medium:
its capacity with the whole medium, which is what the latency model's linear rate law
needs. For each device:

1. eight empty pings: round-trip time ``(t3 - t0) - (t2 - t1)`` and clock offset
   ``((t1 - t0) + (t2 - t3)) / 2`` (NTP's formulas; t0/t3 server clock, t1/t2 device
   clock), keeping the sample with the shortest round trip;
2. a payload down (echo empty) and a payload up (probe empty, echo with payload): the
   extra round-trip time over the ping is the transfer time, so the rate is
   ``8 bytes / extra`` through the broker, MQTT framing included. A first 64 KB probe
   sizes a second one to take about ``target_s``.

Every wait has a timeout; a device that does not answer is reported unmeasured.

:meth:`LinkProber.measure_together` then probes every device *at once* with one payload
size, each direction in turn: the rates the devices keep when they all send together,
against their solo rates, tell an air-time medium from a byte-shared one
(:func:`toolkit.planning.medium.detect_medium`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from toolkit.protocol import Kind
from toolkit.protocol import messages as m
from toolkit.protocol.endpoint import Received

if TYPE_CHECKING:
    from edge_server.scheduler import Scheduler

log = logging.getLogger("cpsl.server")

FIRST_PROBE_BYTES = 64 << 10
MAX_PROBE_BYTES = 8 << 20
PINGS = 8  # the shortest round trip has the least asymmetric queueing: its offset is kept


@dataclass(frozen=True)
class LinkMeasurement:
    rtt_s: float
    clock_offset_s: float  # device clock minus server clock
    up_bps: float
    down_bps: float


class ProbeTimeoutError(Exception):
    pass


@dataclass(frozen=True)
class TogetherMeasurement:
    """All devices probed at once: each one's mean rate over its own transfer, the bits it
    moved, and the span of the whole exchange, per direction."""

    up_bps: dict[str, float]
    down_bps: dict[str, float]
    up_bits: dict[str, float] | None = None
    down_bits: dict[str, float] | None = None
    up_span_s: float | None = None
    down_span_s: float | None = None


class LinkProber:
    def __init__(
        self,
        send: Callable[[str, m.Probe, dict[str, torch.Tensor] | None], None],
        receive: Callable[[float], Received | None],
        timeout_s: float = 10.0,
        target_s: float = 0.3,
        flush: Callable[[], None] = lambda: None,
        discard: Callable[[Received, str], None] | None = None,
    ) -> None:
        """``send`` queues a probe, ``flush`` waits until the queued ones are out, ``discard``
        counts a message that came while probing and answers none of the probes (the
        server's endpoint rejects it; by default it is logged)."""
        self._send, self._receive, self._flush = send, receive, flush
        self._discard = discard or (lambda item, reason: log.debug("%s", reason))
        self.timeout_s, self.target_s = timeout_s, target_s
        self._next_id = 1

    def _exchange(self, device: str, down_bytes: int, echo_bytes: int) -> tuple[float, float, float, float]:
        """(t0, t1, t2, t3) of one probe and its echo."""
        return self._exchange_all({device: (down_bytes, echo_bytes)})[device]

    @staticmethod
    def _round_trip(t0: float, t1: float, t2: float, t3: float) -> float:
        return max(0.0, (t3 - t0) - (t2 - t1))

    def _rate(self, device: str, rtt: float, down: bool) -> float:
        size = FIRST_PROBE_BYTES
        for _ in range(2):
            times = self._exchange(device, size if down else 0, 0 if down else size)
            extra = max(self._round_trip(*times) - rtt, 1e-6)
            rate = 8.0 * size / extra
            if extra >= self.target_s / 3 or size >= MAX_PROBE_BYTES:
                return rate
            size = int(min(MAX_PROBE_BYTES, max(size * 2, rate * self.target_s / 8.0)))
        return rate

    def _exchange_all(self, sizes: dict[str, tuple[int, int]]) -> dict[str, tuple[float, float, float, float]]:
        """One probe to every device, all sent before any echo is awaited: (t0, t1, t2, t3) each."""
        pending: dict[int, tuple[str, float]] = {}
        for device, (down_bytes, echo_bytes) in sizes.items():
            probe_id = self._next_id
            self._next_id += 1
            tensors = {"payload": torch.zeros(down_bytes, dtype=torch.uint8)} if down_bytes else None
            pending[probe_id] = (device, time.time())
            self._send(device, m.Probe(probe_id=probe_id, echo_bytes=echo_bytes), tensors)
        self._flush()
        times: dict[str, tuple[float, float, float, float]] = {}
        timeout_s = self.timeout_s * max(1, len(sizes))
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            item = self._receive(min(0.5, max(0.0, deadline - time.monotonic())))
            if item is None:
                continue
            message = item.message
            expected = pending.get(message.body.probe_id) if message.kind is Kind.PROBE_ECHO else None
            if expected is None or message.header.device != expected[0]:
                self._discard(item, f"{message.kind.name} from {message.header.device} while probing")
                continue
            device, t0 = pending.pop(message.body.probe_id)
            times[device] = (t0, message.body.received_at, message.header.sent_at, item.arrived_wall)
        if pending:
            missing = sorted(device for device, _ in pending.values())
            raise ProbeTimeoutError(f"{', '.join(missing)} did not answer a probe within {timeout_s:g} s")
        return times

    def measure_together(
        self, links: dict[str, LinkMeasurement], span_s: float = 2.0, min_solo_s: float = 0.25
    ) -> TogetherMeasurement:
        """Every device at once, each direction in turn. Device n's payload is what it would
        move alone in ``solo_s = max(min_solo_s, span_s / n)``, so on air time the exchange
        lasts about n x ``solo_s`` (``span_s`` up to ``span_s / min_solo_s`` devices) and on
        shared bytes about ``solo_s`` (more if the medium's capacity binds): the span tells
        them apart by a factor of n whatever the devices' rates
        (:func:`toolkit.planning.medium.detect_medium`). A quarter of a second is still long
        against a shaper's burst (10 ms) and TCP's start on a warm connection, and keeps a
        fleet of 8 on air time probing for about 4 s before round 0, not 16."""
        solo_s = max(min_solo_s, span_s / max(1, len(links)))
        measured: dict[str, dict] = {}
        for direction in ("down", "up"):
            solo = {d: (link.down_bps if direction == "down" else link.up_bps) for d, link in links.items()}
            size = {d: int(min(MAX_PROBE_BYTES, max(FIRST_PROBE_BYTES, solo[d] * solo_s / 8.0))) for d in links}
            sizes = {d: (size[d], 0) if direction == "down" else (0, size[d]) for d in links}
            times = self._exchange_all(sizes)
            transfer = {d: max(self._round_trip(*times[d]) - links[d].rtt_s, 1e-6) for d in links}
            first = min(t[0] for t in times.values())
            measured[direction] = {
                "bps": {d: 8.0 * size[d] / transfer[d] for d in links},
                "bits": {d: 8.0 * size[d] for d in links},
                "span_s": max(times[d][0] - first + transfer[d] for d in links),
            }
        up, down = measured["up"], measured["down"]
        return TogetherMeasurement(up["bps"], down["bps"], up["bits"], down["bits"], up["span_s"], down["span_s"])

    def measure(self, device: str) -> LinkMeasurement:
        samples = [self._exchange(device, 0, 0) for _ in range(PINGS)]
        t0, t1, t2, t3 = min(samples, key=lambda s: self._round_trip(*s))
        rtt = self._round_trip(t0, t1, t2, t3)
        offset = ((t1 - t0) + (t2 - t3)) / 2.0
        down = self._rate(device, rtt, down=True)
        up = self._rate(device, rtt, down=False)
        return LinkMeasurement(rtt_s=rtt, clock_offset_s=offset, up_bps=up, down_bps=down)


def probe_fleet(scheduler: Scheduler, prober: LinkProber, devices: list) -> None:
    """Probe every device ``scheduler`` has not measured yet, each alone; then, when it asks
    (two or more known devices, or the fleet grew), all of them at once for the medium."""
    for record in devices:
        if scheduler.needs_probe(record.id):
            try:
                scheduler.add_device(record, prober.measure(record.id), devices)
            except ProbeTimeoutError as exc:
                log.warning("probe failed, %s sits this round out: %s", record.id, exc)
    ids = [record.id for record in devices]
    if not scheduler.needs_medium_probe(ids):
        return
    try:
        scheduler.set_medium(prober.measure_together(scheduler.known_links(ids)))
    except ProbeTimeoutError as exc:
        log.warning("the simultaneous probe failed, the medium stays as it was: %s", exc)
