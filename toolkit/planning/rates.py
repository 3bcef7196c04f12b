"""How fast a device moves data when it holds a share x of the medium.

Three rate laws, one interface:

- :class:`PowerLimitedRates`: each device transmits with its own power p_n on a share x of
  the band W, so its SNR grows as the share shrinks:
  ``r(x) = x W log2(1 + s / x)`` with ``s = p g / (W N0)`` its SNR over the whole band.
  This is the uplink of an OFDMA cell (CPSL.md, "Radio").
- :class:`LinearRates`: a fixed capacity C per device, cut into time or frequency shares
  with no power gain: ``r(x) = x C``. This is the access point's downlink (its power is
  spread over the whole band whoever it serves), and any real shared link where a share
  means a fraction of the air time: a Wi-Fi channel.
- :class:`SharedRates`: per-device caps plus a common capacity, shared by bytes, where
  transfers overlap for free while their sum fits: a wired or tbf-shaped link.

Both are increasing in x, so the share a device needs to move ``bits`` in ``seconds`` is
unique; :meth:`share_for` returns it (``inf`` when no share suffices). That inverse is
what the common-finish-time bisection needs. :meth:`concurrent_bps` is the other side:
the rates devices get when they all send at once with nobody scheduling them (Wi-Fi's
DCF, TCP over a shared link), which is what a run without slots sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.special import lambertw

from toolkit.planning.contention import contention_factor

LN2 = float(np.log(2.0))


class RateModel(Protocol):
    """Per-device rate law over shares of one medium."""

    def rate_bps(self, share: np.ndarray, devices: np.ndarray) -> np.ndarray:
        """Rate of each listed device at the given share of the medium (bit/s)."""
        ...

    def share_for(self, bits: np.ndarray, seconds: np.ndarray, devices: np.ndarray) -> np.ndarray:
        """Smallest share that moves ``bits`` within ``seconds``; 0 for no bits, inf if impossible."""
        ...

    def capacity_bps(self, devices: np.ndarray) -> np.ndarray:
        """Rate with the whole medium (share 1)."""
        ...

    def is_linear(self) -> bool:
        """True when rate is proportional to share: then air-time slots realise any share plan."""
        ...

    def concurrent_bps(self, devices: np.ndarray) -> np.ndarray:
        """Rate of each listed device while all of them send at once, unscheduled."""
        ...


@dataclass(frozen=True)
class LinearRates:
    """``r(x) = x * capacity``: time- or frequency-sharing with no power gain."""

    capacity: np.ndarray  # bit/s per device with the whole medium
    # the devices are stations contending under 802.11 DCF when they send unscheduled (a Wi-Fi
    # uplink); False: one sender, or senders that take turns for free (the access point's downlink)
    contention: bool = False

    def rate_bps(self, share: np.ndarray, devices: np.ndarray) -> np.ndarray:
        return np.asarray(share, dtype=float) * self.capacity[devices]

    def share_for(self, bits: np.ndarray, seconds: np.ndarray, devices: np.ndarray) -> np.ndarray:
        bits = np.asarray(bits, dtype=float)
        seconds = np.asarray(seconds, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = bits / (seconds * self.capacity[devices])
        share = np.where(seconds > 0, share, np.inf)
        return np.where(bits <= 0, 0.0, share)

    def capacity_bps(self, devices: np.ndarray) -> np.ndarray:
        return self.capacity[devices].astype(float)

    def is_linear(self) -> bool:
        return True

    def concurrent_bps(self, devices: np.ndarray) -> np.ndarray:
        """802.11 DCF: equal transmit opportunities give every backlogged station the same
        throughput, ``1 / sum_j (1 / C_j)`` (Heusse et al., INFOCOM 2003); with ``contention``,
        times what backoff and collisions leave of it for that many stations
        (:func:`toolkit.planning.contention.contention_factor`, Bianchi's model)."""
        capacity = self.capacity[devices].astype(float)
        if capacity.size == 0:
            return capacity
        factor = contention_factor(capacity.tolist()) if self.contention else 1.0
        return np.full(capacity.shape, factor / float(np.sum(1.0 / capacity)))


@dataclass(frozen=True)
class PowerLimitedRates:
    """``r(x) = x W log2(1 + snr / x)``: own transmit power concentrated on the share."""

    bandwidth_hz: float
    snr: np.ndarray  # linear SNR of each device over the whole band

    def rate_bps(self, share: np.ndarray, devices: np.ndarray) -> np.ndarray:
        share = np.asarray(share, dtype=float)
        snr = self.snr[devices]
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = share * self.bandwidth_hz * np.log2(1.0 + snr / share)
        return np.where(share > 0, rate, 0.0)

    def share_for(self, bits: np.ndarray, seconds: np.ndarray, devices: np.ndarray) -> np.ndarray:
        """Closed form through Lambert W.

        Need x ln(1 + s/x) = q with q = bits ln2 / (W seconds). With k = q/s and
        v = 1 + s/x this is ln v = k (v - 1), whose root v > 1 is
        v = -W_{-1}(-k e^{-k}) / k, defined for 0 < k < 1. k >= 1 asks for more than the
        power-limited ceiling s W / ln 2 and no share suffices.
        """
        bits = np.asarray(bits, dtype=float)
        seconds = np.asarray(seconds, dtype=float)
        snr = self.snr[devices]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            q = bits * LN2 / (self.bandwidth_hz * seconds)
            k = q / snr
            feasible = (seconds > 0) & (k < 1.0) & (k > 0)
            safe_k = np.where(feasible, k, 0.5)
            v = -np.real(lambertw(-safe_k * np.exp(-safe_k), -1)) / safe_k
            share = snr / (v - 1.0)
            share = _polish(share, snr, np.where(feasible, q, 1.0))
        share = np.where(feasible, share, np.inf)
        return np.where(bits <= 0, 0.0, share)

    def capacity_bps(self, devices: np.ndarray) -> np.ndarray:
        return self.bandwidth_hz * np.log2(1.0 + self.snr[devices])

    def is_linear(self) -> bool:
        return False

    def concurrent_bps(self, devices: np.ndarray) -> np.ndarray:
        """An unplanned OFDMA cell: equal shares of the band."""
        devices = np.asarray(devices, dtype=int)
        return self.rate_bps(np.full(devices.shape, 1.0 / max(1, devices.size)), devices)


@dataclass(frozen=True)
class SharedRates:
    """A byte-shared medium: device n is capped at ``caps[n]``, all together at ``capacity``.

    This is a wired or shaped link (the testbed's ``wired`` medium: a tbf per device and
    one for the medium). A *share* here is a fraction of the common capacity,
    ``r(x) = min(x C, cap_n)``; unlike air time, transfers overlap for free as long as
    their sum fits. The min-max allocation over these shares is what a server that
    paced every transfer could reach; transfers left to TCP share by water-filling
    instead (:func:`allocation.concurrent_phase`), which the live planner predicts with.
    """

    caps: np.ndarray  # bit/s per device, alone on the medium
    capacity: float  # bit/s, all devices together

    def __post_init__(self) -> None:
        if not self.capacity > 0:
            raise ValueError(f"a shared medium needs a positive capacity, not {self.capacity}")

    def rate_bps(self, share: np.ndarray, devices: np.ndarray) -> np.ndarray:
        return np.minimum(np.asarray(share, dtype=float) * self.capacity, self.caps[devices])

    def share_for(self, bits: np.ndarray, seconds: np.ndarray, devices: np.ndarray) -> np.ndarray:
        bits = np.asarray(bits, dtype=float)
        seconds = np.asarray(seconds, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = bits / seconds
        share = np.where((seconds > 0) & (rate <= self.caps[devices] * (1 + 1e-12)), rate / self.capacity, np.inf)
        return np.where(bits <= 0, 0.0, share)

    def capacity_bps(self, devices: np.ndarray) -> np.ndarray:
        return np.minimum(self.caps[devices].astype(float), self.capacity)

    def is_linear(self) -> bool:
        return False

    def concurrent_bps(self, devices: np.ndarray) -> np.ndarray:
        """Water-filling: max-min fair rates under the caps and the capacity (what TCP flows
        sharing one bottleneck converge to)."""
        return max_min_fair(self.caps[devices].astype(float), self.capacity)


def max_min_fair(caps: np.ndarray, capacity: float) -> np.ndarray:
    """Max-min fair rates: every device gets ``min(cap, level)`` with the level that fills
    ``capacity`` (or every cap, if they all fit)."""
    caps = np.asarray(caps, dtype=float)
    rates = np.zeros(caps.shape)
    left = float(capacity)
    order = np.argsort(caps, kind="stable")
    for position, index in enumerate(order):
        level = left / (len(order) - position)
        rates[index] = min(caps[index], level)
        left -= rates[index]
    return rates


def _polish(share: np.ndarray, snr: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Two Newton steps on f(x) = x ln(1 + s/x) - q, where Lambert W loses digits (k near 1)."""
    for _ in range(2):
        f = share * np.log1p(snr / share) - q
        slope = np.log1p(snr / share) - snr / (share + snr)
        step = np.where(np.isfinite(f) & (slope > 0), f / slope, 0.0)
        share = np.where(np.isfinite(share - step) & (share - step > 0), share - step, share)
    return share
