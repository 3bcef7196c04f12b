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
- compute speed of each device: its class's speed times a log-normal factor drawn per
  round (``speed_jitter`` is the standard deviation of its logarithm), for thermal
  throttling and background load.

Every draw comes from a generator seeded by (seed, round), so any round can be replayed
without replaying the rounds before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit.planning.latency import FleetState
from toolkit.planning.rates import LinearRates, PowerLimitedRates

POSITION_STREAM = 0x5EED_0001
ROUND_STREAM = 0x5EED_0002


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

    def __post_init__(self) -> None:
        if self.bandwidth_hz <= 0:
            raise ValueError("bandwidth must be positive")
        if not 0 < self.min_distance_m < self.cell_radius_m:
            raise ValueError("need 0 < min_distance_m < cell_radius_m")
        if self.speed_jitter < 0:
            raise ValueError("speed_jitter must be >= 0")


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
        return FleetState(
            speed=self.base_speed * jitter,
            uplink=PowerLimitedRates(radio.bandwidth_hz, snr_up),
            downlink=LinearRates(radio.bandwidth_hz * np.log2(1.0 + snr_down)),
        )

    def states(self, rounds: range | list[int]) -> list[FleetState]:
        return [self.state(r) for r in rounds]
