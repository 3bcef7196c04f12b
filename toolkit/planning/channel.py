"""A wireless cell for simulation: positions, path loss, Rayleigh fading, wobbling compute.

Our choices (docs/simulation.md lists them with their sources):

- devices uniform over the area of an annulus around the access point (``min_distance_m``
  to ``cell_radius_m``), fixed for a run;
- path loss ``128.1 + 37.6 log10(d / km)`` dB (3GPP TR 36.814 macro-cell model, as in
  CPSL.md), times Rayleigh fading: an exponential power gain of mean 1, drawn per device,
  per direction and per round (block fading: constant within a round);
- uplink: each device transmits with ``device_power_dbm`` on its share of the band, so
  its rate is power-limited (:class:`rates.PowerLimitedRates`);
- downlink: the access point spreads ``ap_power_dbm`` over the whole band, so a share of
  the band is a share of its rate (:class:`rates.LinearRates`);
- thermal noise ``noise_dbm_per_hz`` (-174 dBm/Hz at 290 K);
- ``medium``: ``cell`` is the above (frequency shares, power-limited uplink, as in CPSL.md);
  ``wifi`` is one channel shared in air time: each device's PHY rate is its Shannon rate at
  its distance, capped at ``wifi_max_phy_bps`` (802.11a/g's 54 Mbit/s), and what it moves
  alone is what DCF leaves of that rate (:func:`contention.saturated_throughput_turns`:
  headers, preamble, ACK, backoff); both ways linear in air time, and devices that send
  unscheduled contend under DCF (:class:`rates.LinearRates` with ``contention``);
  ``wired`` is a switch: each device's own link at that rate, all of them sharing
  ``wired_capacity_bps`` to the server (:class:`rates.SharedRates`, bytes overlap for free);
- compute speed of each device: its class's speed times a log-normal factor drawn per
  round (``speed_jitter`` is the standard deviation of its logarithm), for thermal
  throttling and background load.

Every draw comes from a generator seeded by (seed, round), so any round can be replayed
without replaying the rounds before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit.planning.contention import saturated_throughput_turns
from toolkit.planning.latency import FleetState
from toolkit.planning.rates import LinearRates, PowerLimitedRates, SharedRates

POSITION_STREAM = 0x5EED_0001
ROUND_STREAM = 0x5EED_0002
MEDIA = ("cell", "wifi", "wired")


def dbm_to_watt(dbm: float) -> float:
    return 10.0 ** ((dbm - 30.0) / 10.0)


def path_loss_db(distance_m: np.ndarray) -> np.ndarray:
    return 128.1 + 37.6 * np.log10(np.asarray(distance_m, dtype=float) / 1000.0)


@dataclass(frozen=True)
class RadioSettings:
    bandwidth_hz: float = 10e6
    device_power_dbm: float = 23.0
    ap_power_dbm: float = 30.0
    noise_dbm_per_hz: float = -174.0
    cell_radius_m: float = 200.0
    min_distance_m: float = 20.0
    speed_jitter: float = 0.1
    medium: str = "cell"
    wifi_max_phy_bps: float = 54e6  # 802.11a/g's fastest rate
    wired_capacity_bps: float = 20e6  # the testbed's wired medium (topology.TestbedSpec.medium_up_mbit)

    def __post_init__(self) -> None:
        if self.medium not in MEDIA:
            raise ValueError(f"medium {self.medium!r}: choose among {', '.join(MEDIA)}")
        if not (self.wifi_max_phy_bps > 0 and self.wired_capacity_bps > 0):
            raise ValueError("wifi_max_phy_bps and wired_capacity_bps must be positive")
        if self.bandwidth_hz <= 0:
            raise ValueError("bandwidth must be positive")
        if not 0 < self.min_distance_m < self.cell_radius_m:
            raise ValueError("need 0 < min_distance_m < cell_radius_m")
        if self.speed_jitter < 0:
            raise ValueError("speed_jitter must be >= 0")


def _wifi_effective(phy_bps: np.ndarray) -> np.ndarray:
    """What each station moves alone at its PHY rate, once 802.11's per-frame costs are paid."""
    return np.array([saturated_throughput_turns([float(rate)])[0] for rate in phy_bps])


class ChannelModel:
    """Seeded per-round :class:`FleetState` for devices of given base speeds."""

    def __init__(self, base_speed: np.ndarray, radio: RadioSettings | None = None, seed: int = 0):
        self.base_speed = np.asarray(base_speed, dtype=float)
        if self.base_speed.ndim != 1 or (self.base_speed <= 0).any():
            raise ValueError("base speeds must be a 1-D array of positive numbers")
        self.radio = radio or RadioSettings()
        self.seed = seed
        rng = np.random.default_rng([seed, POSITION_STREAM])
        inner, outer = self.radio.min_distance_m, self.radio.cell_radius_m
        # uniform over the annulus' area: radius = sqrt(uniform(inner^2, outer^2))
        self.distance_m = np.sqrt(rng.uniform(inner**2, outer**2, size=len(self.base_speed)))

    @property
    def size(self) -> int:
        return len(self.base_speed)

    def mean_gain(self) -> np.ndarray:
        return 10.0 ** (-path_loss_db(self.distance_m) / 10.0)

    def state(self, round_: int) -> FleetState:
        rng = np.random.default_rng([self.seed, ROUND_STREAM, round_])
        radio = self.radio
        fading_up = rng.exponential(1.0, size=self.size)
        fading_down = rng.exponential(1.0, size=self.size)
        jitter = np.exp(rng.normal(0.0, radio.speed_jitter, size=self.size)) if radio.speed_jitter else 1.0
        noise_w = dbm_to_watt(radio.noise_dbm_per_hz) * radio.bandwidth_hz
        gain = self.mean_gain()
        snr_up = dbm_to_watt(radio.device_power_dbm) * gain * fading_up / noise_w
        snr_down = dbm_to_watt(radio.ap_power_dbm) * gain * fading_down / noise_w
        speed = self.base_speed * jitter
        if radio.medium == "wifi":
            up = _wifi_effective(np.minimum(radio.bandwidth_hz * np.log2(1.0 + snr_up), radio.wifi_max_phy_bps))
            down = _wifi_effective(np.minimum(radio.bandwidth_hz * np.log2(1.0 + snr_down), radio.wifi_max_phy_bps))
            return FleetState(speed=speed, uplink=LinearRates(up, contention=True), downlink=LinearRates(down))
        if radio.medium == "wired":
            # a cable does not fade: each link's rate is set by the device's mean path gain
            link = radio.bandwidth_hz * np.log2(1.0 + dbm_to_watt(radio.device_power_dbm) * gain / noise_w)
            return FleetState(
                speed=speed,
                uplink=SharedRates(link, radio.wired_capacity_bps),
                downlink=SharedRates(link, radio.wired_capacity_bps),
            )
        return FleetState(
            speed=speed,
            uplink=PowerLimitedRates(radio.bandwidth_hz, snr_up),
            downlink=LinearRates(radio.bandwidth_hz * np.log2(1.0 + snr_down)),
        )

    def states(self, rounds: range | list[int]) -> list[FleetState]:
        return [self.state(r) for r in rounds]
