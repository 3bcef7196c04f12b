"""The simultaneous probe tells an air-time medium from a byte-shared one, briefly.

The devices and the medium are simulated in virtual time behind the prober's own send and
receive seams: each probe's transfer finishes when the medium would finish it (one at a time
on air time, all together on shared bytes), the echo carries the device's clock, and the
prober's clock reads the time of the last echo it was handed."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

from edge_server.probe import LinkMeasurement, LinkProber
from toolkit.planning.medium import detect_medium
from toolkit.protocol import Kind
from toolkit.protocol import messages as m
from toolkit.protocol.codec import Message
from toolkit.protocol.endpoint import Received

RTT_S = 0.004


class SimulatedMedium:
    """Devices at ``rates_bps`` (both directions) on an ``airtime`` or a shared medium."""

    def __init__(self, rates_bps: dict[str, float], airtime: bool) -> None:
        self.rates, self.airtime = rates_bps, airtime
        self.now = 1000.0  # the prober's clock
        self.busy_until = 0.0
        self.echoes: deque[Received] = deque()
        self.payload_bytes: dict[str, int] = {}

    def send(self, device: str, probe: m.Probe, tensors) -> None:
        sent = self.now
        down = int(tensors["payload"].numel()) if tensors else 0
        size = down or probe.echo_bytes
        self.payload_bytes[device] = size
        transfer = 8.0 * size / self.rates[device]
        start = max(sent, self.busy_until) if self.airtime else sent
        done = start + transfer
        if self.airtime:
            self.busy_until = done
        at_device = done if down else sent + RTT_S / 2
        back = (done if not down else at_device) + RTT_S / 2
        header = m.Header(run="r", device=device, round=0, iteration=0, seq=probe.probe_id, sent_at=at_device)
        body = m.ProbeEcho(probe_id=probe.probe_id, received_at=at_device)
        message = Message(Kind.PROBE_ECHO, header, body)
        self.echoes.append(Received(topic="t", message=message, size=size, received_at=0.0, arrived_wall=back))

    def receive(self, timeout_s: float) -> Received | None:
        if not self.echoes:
            return None
        item = self.echoes.popleft()
        self.now = max(self.now, item.arrived_wall)
        return item


@pytest.mark.parametrize("airtime", [True, False])
@pytest.mark.parametrize("devices", [2, 8])
def test_the_simultaneous_probe_names_the_medium_in_about_two_seconds_a_direction(airtime, devices, monkeypatch):
    rates = {f"dev{i}": (4e6 if i % 2 else 24e6) for i in range(devices)}
    medium = SimulatedMedium(rates, airtime)
    clock = SimpleNamespace(time=lambda: medium.now, monotonic=lambda: medium.now)
    monkeypatch.setattr("edge_server.probe.time", clock)
    prober = LinkProber(medium.send, medium.receive)
    links = {d: LinkMeasurement(rtt_s=RTT_S, clock_offset_s=0.0, up_bps=r, down_bps=r) for d, r in rates.items()}
    together = prober.measure_together(links)
    for direction in ("up", "down"):
        bps, bits = getattr(together, f"{direction}_bps"), getattr(together, f"{direction}_bits")
        span = getattr(together, f"{direction}_span_s")
        evidence = detect_medium({d: rates[d] for d in rates}, bps, bits, span)
        assert evidence.kind == ("airtime" if airtime else "shared")
        solo_s = {d: bits[d] / rates[d] for d in rates}
        assert solo_s == pytest.approx(dict.fromkeys(rates, max(0.25, 2.0 / devices)), rel=0.01)
        # air time: the payloads one after another, 2 s; shared: the longest alone
        assert span == pytest.approx(2.0 if airtime else max(0.25, 2.0 / devices), rel=0.05, abs=0.02)


def test_a_message_that_answers_no_probe_is_handed_to_discard_and_the_probe_goes_on(monkeypatch):
    medium = SimulatedMedium({"dev0": 8e6}, airtime=True)
    clock = SimpleNamespace(time=lambda: medium.now, monotonic=lambda: medium.now)
    monkeypatch.setattr("edge_server.probe.time", clock)
    header = m.Header(run="r", device="dev1", round=0, iteration=0, seq=1, sent_at=medium.now)
    stray = Message(Kind.PROBE_ECHO, header, m.ProbeEcho(probe_id=999, received_at=medium.now))
    medium.echoes.append(Received(topic="stray", message=stray, size=0, received_at=0.0, arrived_wall=medium.now))
    discarded: list[tuple[str, str]] = []
    prober = LinkProber(
        medium.send, medium.receive, discard=lambda item, reason: discarded.append((item.topic, reason))
    )
    link = LinkMeasurement(rtt_s=RTT_S, clock_offset_s=0.0, up_bps=8e6, down_bps=8e6)
    together = prober.measure_together({"dev0": link})
    assert discarded == [("stray", "PROBE_ECHO from dev1 while probing")]
    assert together.up_bps["dev0"] > 0
