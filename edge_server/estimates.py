"""What the server believes about each device, from probes, profiles and the last rounds.

Per device: compute speed relative to the reference profile, uplink and downlink rate
with the whole medium, round-trip time and clock offset. Each round's observations move
the estimate part of the way (exponential smoothing in log space, so a 2x slowdown and a
2x speedup count alike): quick enough that a device throttled mid-run is re-planned
within a round or two, slow enough that one noisy iteration does not reshuffle clusters.

The first measurement of a speed replaces the profile's figure outright instead of being
blended with it: the profile is a prior taken on another occasion (another load, another
thread count, the server profiled on a different machine), and on the heavy wired testbed
it was 8x off for the server. Blending from it took four rounds to converge while the
fixed-cost calibration chased the moving error (measured/predicted 1.18 over the run).
Later measurements are smoothed as above.

Observations:
- compute: the median over a turn's iterations of forward + backward (+ step) time,
  against what the reference profile predicts for the cut and batch;
- uplink: smashed bytes over upload time (send until the broker acknowledged), less one
  round trip, median over the turn -- in a slot the device has the medium to itself, so
  this is its full-medium rate. On a byte-shared medium, where a cluster's uploads
  overlap, an upload's rate is its part of the capacity, not its cap: only a device that
  sent alone (a cluster of one) updates its rate there. Only uploads of 64 KiB or more count: smaller ones fit in
  a shaper's or an access point's burst allowance and pass at line speed, which says
  nothing about the sustained rate (the probes measure that with larger payloads);
- latency and clock offset: the gradient's transit (server send to device arrival) and
  the smashed data's (device send to server arrival), each less its transfer time, sum
  to the round trip whatever the clocks say, and their difference corrects the offset;
- server: measured server steps against the server-side cost the profile predicts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from edge_server.probe import LinkMeasurement
from toolkit.planning.costs import CutCost
from toolkit.planning.latency import FleetState
from toolkit.planning.medium import MediumEvidence, rate_model
from toolkit.protocol import messages as m

RATE_SAMPLE_BYTES = 64 << 10  # smaller messages pass a link's token bucket at line speed: no rate to read
CLOCK_STEP_S = 0.05  # an offset error this large in one turn is a step of the clock, not drift


@dataclass
class DeviceEstimate:
    speed: float
    up_bps: float
    down_bps: float
    rtt_s: float = 0.0
    clock_offset_s: float = 0.0
    observed_rounds: int = 0
    speed_measured: bool = False  # False while ``speed`` is the profile's prior
    clock_step_s: float | None = None  # set when a turn showed the device's clock jumped: probe it again
    codec_s_per_byte: float = 0.0  # encoding smashed data + decoding gradients, per fp32 byte (compression on)

    def link(self) -> LinkMeasurement:
        return LinkMeasurement(self.rtt_s, self.clock_offset_s, self.up_bps, self.down_bps)

    def to_dict(self) -> dict:
        return {
            "speed": self.speed,
            "up_bps": self.up_bps,
            "down_bps": self.down_bps,
            "rtt_s": self.rtt_s,
            "clock_offset_s": self.clock_offset_s,
        }


def _blend(old: float, new: float, weight: float) -> float:
    if not (new > 0 and math.isfinite(new)):
        return old
    return math.exp((1 - weight) * math.log(old) + weight * math.log(new))


@dataclass
class LiveEstimates:
    smoothing: float = 0.5  # weight of the newest observation
    devices: dict[str, DeviceEstimate] = field(default_factory=dict)
    server_speed: float = 1.0
    server_measured: bool = False  # False while ``server_speed`` is the profile's prior
    # with compression (toolkit.compression): wire bytes per fp32 byte of what crosses the cut,
    # each direction; the encoding's nominal ratio until turns measure it (compressed=False: 1.0, unmeasured)
    compressed: bool = False
    uplink_ratio: float = 1.0
    downlink_ratio: float = 1.0
    server_codec_s_per_byte: float = 0.0

    def add(self, device: str, speed: float, link: LinkMeasurement) -> None:
        self.devices[device] = DeviceEstimate(
            speed=speed,
            up_bps=link.up_bps,
            down_bps=link.down_bps,
            rtt_s=link.rtt_s,
            clock_offset_s=link.clock_offset_s,
        )

    def observe_turn(
        self,
        device: str,
        cut: CutCost,
        batch_size: int,
        timings: m.Timings,
        arrivals: dict[int, float] | None = None,
        sent_alone: bool = True,
    ) -> None:
        """One turn's report; ``arrivals``: server-clock arrival of each iteration's smashed
        data; ``sent_alone``: its uploads had the medium to themselves (slots, or no company)."""
        estimate = self.devices.get(device)
        if estimate is None or not timings.iterations:
            return
        rows = timings.iterations
        compute = statistics.median(r.forward_s + r.backward_s for r in rows)
        predicted = cut.device_forward(batch_size) + cut.device_backward(batch_size)
        estimate.speed = _blend(estimate.speed, predicted / max(compute, 1e-9), self._weight(estimate.speed_measured))
        estimate.speed_measured = True
        transfers = [(r.up_bytes, r.upload_s) for r in rows]
        if timings.weights_up_end_at > timings.weights_up_start_at > 0:  # the trained weights, in their own slot
            transfers.append((timings.weights_up_bytes, timings.weights_up_end_at - timings.weights_up_start_at))
        uploads = [
            8.0 * size / (seconds - estimate.rtt_s)
            for size, seconds in transfers
            if size >= RATE_SAMPLE_BYTES and seconds > 2 * estimate.rtt_s
        ]
        if uploads and sent_alone:
            estimate.up_bps = _blend(estimate.up_bps, statistics.median(uploads), self.smoothing)
        if sent_alone:  # a contended transfer's transit includes its wait for the air: not a clock error
            self._observe_latency(estimate, rows, arrivals or {})
        if self.compressed:
            self._observe_codec(estimate, cut, batch_size, rows)
        estimate.observed_rounds += 1

    def _observe_codec(self, estimate: DeviceEstimate, cut: CutCost, batch_size: int, rows: list) -> None:
        """What the encoding did this turn: wire bytes per fp32 byte each way (frames included,
        as the links are measured through the broker), and the device's codec time per byte."""
        fp32_up, fp32_down = cut.uplink_bytes(batch_size), cut.downlink_bytes(batch_size)
        if fp32_up <= 0 or fp32_down <= 0:
            return
        up = statistics.median(r.up_bytes for r in rows) / fp32_up
        down = max(statistics.median(r.down_bytes for r in rows), 1) / fp32_down
        self.uplink_ratio = _blend(self.uplink_ratio, up, self.smoothing)
        self.downlink_ratio = _blend(self.downlink_ratio, down, self.smoothing)
        codec = statistics.median(r.encode_s + r.decode_s for r in rows) / fp32_down
        estimate.codec_s_per_byte = (
            codec if estimate.observed_rounds == 0 else 0.5 * (estimate.codec_s_per_byte + codec)
        )

    def _observe_latency(self, estimate: DeviceEstimate, rows: list, arrivals: dict[int, float]) -> None:
        """Round trip and clock offset from both directions of every iteration, offset-free.

        The gradient's transit as the device measured it is ``L_down + theta`` (theta: the
        error of our offset estimate), the smashed data's as the server measures it
        ``L_up - theta``, each after its transfer time. Their sum is the round trip, whatever
        the clocks; their half-difference corrects the offset (assuming ``L_up = L_down``).
        """
        trips, errors = [], []
        for row in rows:
            arrival = arrivals.get(row.iteration)
            if row.gradient_transit_s is None or arrival is None or row.upload_start_at <= 0:
                continue
            down = row.gradient_transit_s - 8.0 * row.down_bytes / estimate.down_bps
            up = (arrival - row.upload_start_at + estimate.clock_offset_s) - 8.0 * row.up_bytes / estimate.up_bps
            trips.append(max(down + up, 1e-5))
            errors.append((down - up) / 2)
        if trips:
            error = statistics.median(errors)
            if abs(error) > max(CLOCK_STEP_S, 5 * estimate.rtt_s):
                # a clock that stepped (NTP set it, a board without an RTC got its time): the
                # transits are off by the step, which smoothing would take rounds to absorb while
                # every slot is misplaced; the device is probed again instead
                estimate.clock_step_s = error
                return
            estimate.rtt_s = _blend(max(estimate.rtt_s, 1e-5), statistics.median(trips), self.smoothing)
            estimate.clock_offset_s += self.smoothing * error

    def observe_server(self, cut: CutCost, samples: int, seconds: float) -> None:
        if seconds > 0:
            self.server_speed = _blend(
                self.server_speed, cut.server_step(samples) / seconds, self._weight(self.server_measured)
            )
            self.server_measured = True

    def observe_server_codec(self, seconds: float, fp32_bytes: int) -> None:
        """The server's decoding of smashed data and encoding of gradients over a round."""
        if self.compressed and fp32_bytes > 0 and seconds >= 0:
            rate = seconds / fp32_bytes
            first = self.server_codec_s_per_byte == 0.0
            self.server_codec_s_per_byte = (
                rate if first else (1 - self.smoothing) * self.server_codec_s_per_byte + (self.smoothing * rate)
            )

    def _weight(self, measured_before: bool) -> float:
        """The newest observation's weight: all of it against a profile's prior, else the smoothing."""
        return self.smoothing if measured_before else 1.0

    def fleet_state(
        self, devices: list[str], uplink: MediumEvidence | None = None, downlink: MediumEvidence | None = None
    ) -> FleetState:
        """The devices' state under each direction's medium (air time when none was decided)."""
        rows = [self.devices[d] for d in devices]
        return FleetState(
            speed=np.array([r.speed for r in rows]),
            uplink=rate_model(uplink, np.array([r.up_bps for r in rows]), stations_send=True),
            downlink=rate_model(downlink, np.array([r.down_bps for r in rows])),
            codec_s_per_byte=np.array([r.codec_s_per_byte for r in rows]) if self.compressed else None,
        )
