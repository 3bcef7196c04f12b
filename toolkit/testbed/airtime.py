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
one transmission at a time, no collision. :class:`DcfScheduler` is what DCF really does
with the same queues: random backoff and collisions, whose cost grows with the number of
stations that send at once (Bianchi 2000; ``toolkit.planning.contention``). The access
point is one contender like any station (its downlink frames to different devices take
turns inside its queue), so downlink traffic shares the same airtime.
``toolkit/testbed/wifi.py`` drives them with real TCP traffic.

Default per-frame overhead, 802.11a/g/n OFDM at 5 GHz (IEEE 802.11-2016, clauses 17 and
19): DIFS 34 us (SIFS 16 + 2 slots of 9), mean backoff 67.5 us (CWmin 15: 7.5 slots),
PHY preamble and header 20 us, SIFS 16 us, ACK 28 us (preamble plus 14 bytes at 24
Mbit/s) -- 165.5 us; the 34 bytes of MAC header and FCS travel at the station's rate and
are added to each frame's bytes. Heusse et al. derive the same quantities for 802.11b.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from toolkit.planning.contention import DEFAULT_DCF, DEFAULT_FRAME_BYTES, MAC_HEADER_BYTES, DcfTiming

DEFAULT_OVERHEAD_S = DEFAULT_DCF.frame_fixed_s + DEFAULT_DCF.mean_first_backoff_s  # 165.5 us
CONTENTION_MODES = ("dcf", "none")


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
    airtime_s: float  # from the end of the previous transmission to the end of this one
    collisions: int = 0  # collided attempts (any station's) within airtime_s, before this frame got through


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


class DcfScheduler(AirtimeScheduler):
    """Contention as 802.11's DCF has it: random backoff, collisions, doubling windows.

    Every contender holds a backoff counter drawn from its contention window. The ready
    contenders (those with a frame whose receiver takes bytes) count idle slots down
    together; the first at zero transmits; two or more at zero in the same slot collide:
    the medium is busy for the longest of their frames, nothing is delivered, each of them
    doubles its window (up to CWmax) and draws again, and their frames stay at the head of
    their queues. A success resets the sender's window and draws its next backoff. The
    same frame-level rule as :class:`AirtimeScheduler`'s otherwise (the AP is one
    contender whose flows take turns), so with one station the mean air time per frame
    is the same; with several, the idle slots and collisions are the cost of contention
    that Bianchi's model predicts (``toolkit.planning.contention``).

    :meth:`next` returns the next frame that gets through, with ``airtime_s`` counting the
    idle slots and collisions since the previous transmission; the draws come from a
    seeded generator, so a run is reproducible.
    """

    def __init__(self, frame_bytes: int = DEFAULT_FRAME_BYTES, timing: DcfTiming = DEFAULT_DCF, seed: int = 0) -> None:
        super().__init__(frame_bytes, timing.frame_fixed_s)
        self.timing = timing
        self._random = random.Random(seed)
        self._backoff: dict[str, int] = {}
        self._stage: dict[str, int] = {}
        self.attempts = 0
        self.collided_attempts = 0  # attempts that were part of a collision

    def add_flow(self, flow: str, contender: str, rate_bps: float) -> None:
        super().add_flow(flow, contender, rate_bps)
        if contender not in self._stage:
            self._stage[contender] = 0
            self._backoff[contender] = self._draw(0)

    def _draw(self, stage: int) -> int:
        return self._random.randrange(self.timing.window_at(stage))

    def _head(self, contender: _Contender, blocked: set[str]) -> str | None:
        return next((flow for flow in contender.flows if flow not in blocked), None)

    def _frame_s(self, flow: str) -> float:
        return self.timing.transmission_s(min(self.frame_bytes, self.queued[flow]), self.rates_bps[flow])

    def next(self, blocked: set[str] = frozenset()) -> Transmission | None:
        heads = {name: head for name, c in self._contenders.items() if (head := self._head(c, blocked)) is not None}
        if not heads:
            return None
        elapsed, collisions = 0.0, 0
        while True:
            wait = min(self._backoff[name] for name in heads)
            for name in heads:
                self._backoff[name] -= wait
            elapsed += wait * self.timing.slot_s
            senders = [name for name in heads if self._backoff[name] == 0]
            self.attempts += len(senders)
            if len(senders) == 1:
                break
            elapsed += max(self._frame_s(heads[name]) for name in senders)
            collisions += 1
            self.collided_attempts += len(senders)
            for name in senders:
                self._stage[name] = min(self._stage[name] + 1, self.timing.max_stage)
                self._backoff[name] = self._draw(self._stage[name])
        name = senders[0]
        flow = heads[name]
        elapsed += self._frame_s(flow)
        nbytes = min(self.frame_bytes, self.queued[flow])
        self.queued[flow] -= nbytes
        contender = self._contenders[name]
        contender.flows.remove(flow)
        if self.queued[flow]:
            contender.flows.append(flow)  # its other flows go first next time (round robin)
        self._stage[name] = 0
        self._backoff[name] = self._draw(0)
        return Transmission(name, flow, nbytes, elapsed, collisions)


def make_scheduler(
    contention: str, frame_bytes: int = DEFAULT_FRAME_BYTES, overhead_s: float = DEFAULT_OVERHEAD_S, seed: int = 0
) -> AirtimeScheduler:
    """``dcf``: stations contend (:class:`DcfScheduler`, the 802.11 timings); ``none``: they take
    turns, each frame charged ``overhead_s`` (:class:`AirtimeScheduler`)."""
    if contention == "dcf":
        return DcfScheduler(frame_bytes, seed=seed)
    if contention == "none":
        return AirtimeScheduler(frame_bytes, overhead_s)
    raise ValueError(f"contention {contention!r} is not one of {', '.join(CONTENTION_MODES)}")
