"""What contention costs on 802.11: Bianchi's model of the distributed coordination function.

Stations that have data at the same time do not take polite turns: each waits a random
backoff (a whole number of idle slots drawn from its contention window), the first to
reach zero transmits, and two that reach zero in the same slot collide, both frames are
lost, and both double their windows. The air time a collision wastes and the idle slots
of the backoff grow with the number of contenders, so n saturated stations move less in
total than one station alone (Bianchi, "Performance analysis of the IEEE 802.11
distributed coordination function", IEEE JSAC 18(3), 2000). A server that grants
transmission slots lets one device send at a time: no backoff beyond the first, no
collision. That difference is what slots can buy on Wi-Fi (CPSL.md, wave 3).

Bianchi's fixed point, for n stations, minimum window W = CWmin + 1 and m doublings:

    tau = 2 (1 - 2p) / ((1 - 2p)(W + 1) + p W (1 - (2p)^m))     (a station transmits in a slot)
    p   = 1 - (1 - tau)^(n - 1)                                  (its frame collides)

then, with P_tr = 1 - (1 - tau)^n the chance that someone transmits in a slot and P_s the
chance that exactly one does given that someone does, a generic slot lasts
``(1 - P_tr) sigma + P_tr P_s T_s + P_tr (1 - P_s) T_c`` on average, and one frame's payload
goes through per ``P_tr P_s`` of them. Here T_s and T_c are both DIFS + preamble + frame +
SIFS + ACK (a collided sender learns of it when its ACK does not come: the ACK timeout
stands where the ACK would have been). Stations of different PHY rates (the performance
anomaly) get the same number of successful frames; the slot's mean then uses each one's
own frame time for its successes, and a collision lasts as long as the longest frame in it.

Timing defaults: 802.11a/g/n OFDM at 5 GHz (IEEE 802.11-2016): slot 9 us, SIFS 16 us,
DIFS 34 us, PHY preamble and header 20 us, ACK 28 us, CWmin 15, CWmax 1023 (m = 6).
With one station the mean backoff is 7.5 slots, and T_s plus it is the 165.5 us of
per-frame overhead of the contention-free medium (``toolkit.testbed.airtime``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy.optimize import brentq

MAC_HEADER_BYTES = 34  # MAC header and FCS: they travel at the station's rate with every frame
DEFAULT_FRAME_BYTES = 1500  # an Ethernet-sized MSDU: what a station sends per transmit opportunity


@dataclass(frozen=True)
class DcfTiming:
    """802.11's contention parameters (defaults: OFDM at 5 GHz)."""

    slot_s: float = 9e-6
    sifs_s: float = 16e-6
    difs_s: float = 34e-6
    preamble_s: float = 20e-6
    ack_s: float = 28e-6
    cw_min: int = 15
    cw_max: int = 1023

    def __post_init__(self) -> None:
        if self.slot_s <= 0 or min(self.sifs_s, self.difs_s, self.preamble_s, self.ack_s) < 0:
            raise ValueError("802.11 timings must be positive (slot) or not negative (the rest)")
        if self.cw_min < 1 or self.cw_max < self.cw_min:
            raise ValueError("contention windows need 1 <= CWmin <= CWmax")
        for window in (self.cw_min, self.cw_max):
            if (window + 1) & window:
                raise ValueError(f"a contention window is 2^k - 1, not {window}")

    @property
    def window(self) -> int:
        """W: backoffs are drawn from 0..W-1 at the first attempt."""
        return self.cw_min + 1

    @property
    def max_stage(self) -> int:
        """m: how many times a window doubles before it stops growing."""
        return ((self.cw_max + 1) // (self.cw_min + 1)).bit_length() - 1

    @property
    def frame_fixed_s(self) -> float:
        """What every transmission holds the medium for beside its bits: DIFS, preamble, SIFS, ACK."""
        return self.difs_s + self.preamble_s + self.sifs_s + self.ack_s

    @property
    def mean_first_backoff_s(self) -> float:
        return self.cw_min / 2.0 * self.slot_s

    def window_at(self, stage: int) -> int:
        """The number of backoff values at backoff stage ``stage`` (0 = first attempt)."""
        return self.window << min(max(stage, 0), self.max_stage)

    def transmission_s(self, nbytes: int, rate_bps: float) -> float:
        """Seconds a frame of ``nbytes`` payload at ``rate_bps`` holds the medium, success or collision."""
        return self.frame_fixed_s + 8.0 * (nbytes + MAC_HEADER_BYTES) / rate_bps


DEFAULT_DCF = DcfTiming()


def collision_probability(stations: int, timing: DcfTiming = DEFAULT_DCF) -> tuple[float, float]:
    """(tau, p) of Bianchi's fixed point for ``stations`` saturated stations."""
    if stations < 1:
        raise ValueError("at least one station")
    w, m = timing.window, timing.max_stage

    def tau_of(p: float) -> float:
        if abs(1.0 - 2.0 * p) < 1e-12:  # the formula's removable singularity at p = 1/2
            p += 1e-9
        return 2.0 * (1.0 - 2.0 * p) / ((1.0 - 2.0 * p) * (w + 1) + p * w * (1.0 - (2.0 * p) ** m))

    if stations == 1:
        return tau_of(0.0), 0.0
    p = brentq(lambda q: q - (1.0 - (1.0 - tau_of(q)) ** (stations - 1)), 0.0, 1.0 - 1e-12, xtol=1e-14)
    return tau_of(p), p


def saturated_throughput_dcf(
    rates_bps: Sequence[float], frame_bytes: int = DEFAULT_FRAME_BYTES, timing: DcfTiming = DEFAULT_DCF
) -> list[float]:
    """Payload bits per second of each of n saturated stations contending under DCF."""
    n = len(rates_bps)
    if n == 0:
        return []
    tau, _ = collision_probability(n, timing)
    idle = (1.0 - tau) ** n
    one_success = tau * (1.0 - tau) ** (n - 1)  # a given station alone transmits in a slot
    busy = sorted(timing.transmission_s(frame_bytes, rate) for rate in rates_bps)
    # a collision lasts as long as its longest frame: station k (in order of frame time) sends
    # the longest when it transmits, none after it does and at least one before it does
    collisions_s = sum(
        tau * (1.0 - tau) ** (n - 1 - k) * (1.0 - (1.0 - tau) ** k) * frame_s for k, frame_s in enumerate(busy)
    )
    mean_slot = idle * timing.slot_s + one_success * sum(busy) + collisions_s
    return [one_success * 8.0 * frame_bytes / mean_slot] * n


def saturated_throughput_turns(
    rates_bps: Sequence[float], frame_bytes: int = DEFAULT_FRAME_BYTES, timing: DcfTiming = DEFAULT_DCF
) -> list[float]:
    """The same stations taking turns with one mean first backoff each and no collision:
    what the contention-free medium gives (the 802.11 anomaly, Heusse et al. 2003)."""
    cycle = sum(timing.transmission_s(frame_bytes, rate) + timing.mean_first_backoff_s for rate in rates_bps)
    return [8.0 * frame_bytes / cycle for _ in rates_bps]


def contention_efficiency(
    stations: int, rate_bps: float = 24e6, frame_bytes: int = DEFAULT_FRAME_BYTES, timing: DcfTiming = DEFAULT_DCF
) -> float:
    """What ``stations`` saturated contenders move, as a fraction of what they would taking turns.

    1 for one station; below 1 and falling with more (for 8 stations at 24 Mbit/s about
    0.87, for 16 about 0.80). The planner multiplies an unscheduled air-time phase's rates
    by it: the price of sending at once without slots.
    """
    if stations <= 1:
        return 1.0
    rates = [rate_bps] * stations
    return (
        saturated_throughput_dcf(rates, frame_bytes, timing)[0]
        / saturated_throughput_turns(rates, frame_bytes, timing)[0]
    )


def phy_rate_of(
    effective_bps: float, frame_bytes: int = DEFAULT_FRAME_BYTES, timing: DcfTiming = DEFAULT_DCF
) -> float | None:
    """The PHY rate at which a lone station moves ``effective_bps`` of payload (the inverse of
    :func:`saturated_throughput_turns` for one station): what the planner measures is the
    effective rate, what contention depends on is the frame's air time. None when no PHY
    rate could: one frame per transmit opportunity tops out at ``8 F / overhead`` (72.5
    Mbit/s with the defaults), so a faster link is not a single-frame 802.11 link (a wire,
    loopback, or Wi-Fi with frame aggregation, which this model does not cover)."""
    per_frame_s = 8.0 * frame_bytes / effective_bps - timing.frame_fixed_s - timing.mean_first_backoff_s
    return 8.0 * (frame_bytes + MAC_HEADER_BYTES) / per_frame_s if per_frame_s > 0 else None


def contention_factor(
    effective_bps: Sequence[float], frame_bytes: int = DEFAULT_FRAME_BYTES, timing: DcfTiming = DEFAULT_DCF
) -> float:
    """What stations with these solo rates move sending at once under DCF, against taking turns
    (1 for one station, and where a rate is beyond what the model covers: :func:`phy_rate_of`)."""
    if len(effective_bps) <= 1:
        return 1.0
    phy = [phy_rate_of(rate, frame_bytes, timing) for rate in effective_bps]
    if any(rate is None for rate in phy):
        return 1.0
    return (
        saturated_throughput_dcf(phy, frame_bytes, timing)[0] / saturated_throughput_turns(phy, frame_bytes, timing)[0]
    )
