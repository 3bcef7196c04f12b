"""The arithmetic of a shared Wi-Fi medium: who transmits next, for how long, and what that predicts.

802.11's distributed coordination function gives every backlogged station about the same
number of transmit opportunities, whatever its PHY rate. A frame of b bytes from (or to)
a station at rate r holds the medium for ``8 b / r`` plus a fixed per-frame overhead
(inter-frame spaces, backoff, preambles, the ACK). With every station sending frames of F
bytes back to back, one cycle gives each of n stations one frame and lasts
``sum_j (8 F / r_j + o)``, so each station gets ``8 F / sum_j (8 F / r_j + o)`` bits per
second: the slowest station drags all the others down to about its own rate (the
802.11 performance anomaly, Heusse et al., INFOCOM 2003).

:class:`AirtimeScheduler` is that rule as a pure, deterministic object: contenders with
byte queues, served one frame per turn in round-robin order among the backlogged ones,
one transmission at a time. The access point is one contender like any station (its
downlink frames to different devices take turns inside its queue), so downlink traffic
shares the same airtime. ``toolkit/testbed/wifi.py`` drives it with real TCP traffic.

Default per-frame overhead, 802.11a/g/n OFDM at 5 GHz (IEEE 802.11-2016, clauses 17 and
19): DIFS 34 us (SIFS 16 + 2 slots of 9), mean backoff 67.5 us (CWmin 15: 7.5 slots),
PHY preamble and header 20 us, SIFS 16 us, ACK 28 us (preamble plus 14 bytes at 24
Mbit/s) -- 165.5 us; the 34 bytes of MAC header and FCS travel at the station's rate and
are added to each frame's bytes. Heusse et al. derive the same quantities for 802.11b.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

DEFAULT_OVERHEAD_S = 165.5e-6
MAC_HEADER_BYTES = 34
DEFAULT_FRAME_BYTES = 1500  # an Ethernet-sized MSDU: what a station sends per transmit opportunity


def frame_airtime(nbytes: int, rate_bps: float, overhead_s: float = DEFAULT_OVERHEAD_S) -> float:
    """Seconds one frame carrying ``nbytes`` of payload holds the medium at ``rate_bps``."""
    return 8.0 * (nbytes + MAC_HEADER_BYTES) / rate_bps + overhead_s


def saturated_throughput(
    rates_bps: list[float], frame_bytes: int = DEFAULT_FRAME_BYTES, overhead_s: float = DEFAULT_OVERHEAD_S
) -> list[float]:
    """Payload bits per second of each of n saturated stations taking turns frame by frame."""
    cycle = sum(frame_airtime(frame_bytes, rate, overhead_s) for rate in rates_bps)
    return [8.0 * frame_bytes / cycle for _ in rates_bps]


def saturated_mixed(
    uplink_bps: list[float],
    downlink_bps: list[float],
    frame_bytes: int = DEFAULT_FRAME_BYTES,
    overhead_s: float = DEFAULT_OVERHEAD_S,
) -> tuple[list[float], list[float]]:
    """Saturated stations sending up, and the access point sending down to others: (up, down) bits/s.

    The access point is one contender: per cycle each uplink station sends one frame and the
    access point one, to its destinations in turn. Over k cycles (k downlink destinations)
    each uplink station sends k frames and each destination receives one.
    """
    k = max(1, len(downlink_bps))
    period = k * sum(frame_airtime(frame_bytes, r, overhead_s) for r in uplink_bps) + sum(
        frame_airtime(frame_bytes, r, overhead_s) for r in downlink_bps
    )
    bits = 8.0 * frame_bytes
    return [k * bits / period for _ in uplink_bps], [bits / period for _ in downlink_bps]


@dataclass
class Transmission:
    contender: str  # a station's name, or "ap"
    flow: str  # which queue the bytes came from (a device's uplink, or the AP's flow to one device)
    nbytes: int
    airtime_s: float


@dataclass
class _Contender:
    name: str
    flows: deque = field(default_factory=deque)  # flow names with bytes queued, served round robin


class AirtimeScheduler:
    """One transmission at a time; the backlogged contenders take turns, one frame each.

    ``rates_bps`` gives each flow's PHY rate (a device's uplink flow at its rate, the AP's
    flow to a device at that device's rate). ``queued`` is what each flow has waiting;
    :meth:`next` takes the next frame off the queues and says how long it holds the medium.
    """

    def __init__(self, frame_bytes: int = DEFAULT_FRAME_BYTES, overhead_s: float = DEFAULT_OVERHEAD_S) -> None:
        if frame_bytes < 1 or overhead_s < 0:
            raise ValueError("frame bytes must be positive and the overhead not negative")
        self.frame_bytes = frame_bytes
        self.overhead_s = overhead_s
        self.rates_bps: dict[str, float] = {}
        self.contender_of: dict[str, str] = {}
        self.queued: dict[str, int] = {}
        self._contenders: dict[str, _Contender] = {}
        self._turns: deque[str] = deque()  # contenders in round-robin order

    def add_flow(self, flow: str, contender: str, rate_bps: float) -> None:
        if rate_bps <= 0:
            raise ValueError(f"flow {flow}: the PHY rate must be positive")
        self.rates_bps[flow] = rate_bps
        self.contender_of[flow] = contender
        self.queued.setdefault(flow, 0)
        if contender not in self._contenders:
            self._contenders[contender] = _Contender(contender)
            self._turns.append(contender)

    def remove_flow(self, flow: str) -> None:
        contender = self._contenders[self.contender_of.pop(flow)]
        if flow in contender.flows:
            contender.flows.remove(flow)
        self.rates_bps.pop(flow)
        self.queued.pop(flow)

    def enqueue(self, flow: str, nbytes: int) -> None:
        was = self.queued[flow]
        self.queued[flow] = was + nbytes
        if was == 0 and nbytes > 0:
            self._contenders[self.contender_of[flow]].flows.append(flow)

    def backlogged(self) -> bool:
        return any(contender.flows for contender in self._contenders.values())

    def next(self, blocked: set[str] = frozenset()) -> Transmission | None:
        """The next frame: the next backlogged contender's next flow (skipping ``blocked`` flows)."""
        for _ in range(len(self._turns)):
            name = self._turns[0]
            self._turns.rotate(-1)
            contender = self._contenders[name]
            for _ in range(len(contender.flows)):
                flow = contender.flows[0]
                contender.flows.rotate(-1)
                if flow in blocked:
                    continue
                nbytes = min(self.frame_bytes, self.queued[flow])
                self.queued[flow] -= nbytes
                if self.queued[flow] == 0:
                    contender.flows.remove(flow)
                return Transmission(name, flow, nbytes, frame_airtime(nbytes, self.rates_bps[flow], self.overhead_s))
        return None
