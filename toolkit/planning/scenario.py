"""A simulated deployment from profiles and device classes, run once or swept.

The part of ``cpsl-sim`` that is not flag parsing: it resolves the model's profiles, the
fleet's compute speeds and the cell, runs :func:`simulate.simulate`, and returns plain
JSON-ready dicts (``docs/simulation.md`` describes them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from toolkit.errors import ProfileError, UserError
from toolkit.planning.channel import ChannelModel, RadioSettings
from toolkit.planning.costs import ModelCosts, model_costs, relative_speed
from toolkit.planning.device_classes import DeviceClass, assign_classes
from toolkit.planning.simulate import SimulationConfig, simulate
from toolkit.profile_format import Profile, load_profile

DEFAULT_PROFILE_DIR = Path(__file__).resolve().parents[2] / "profiles" / "epyc-vm-2vcpu"


def find_model_profile(name: str, profile_dir: Path | None = None) -> Path:
    folder = profile_dir or DEFAULT_PROFILE_DIR
    path = folder / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise UserError(
            f"no profile of model {name!r} in {folder} (have: {', '.join(known) or 'none'}); "
            f"make one with `cpsl-profile --model {name} --out {path}` or pass --profile FILE"
        )
    return path


def profile_classes(profiles: Sequence[Profile], batch: int) -> list[DeviceClass]:
    """One class per measured device: speed = reference whole-model step / its own."""
    classes = []
    for profile in profiles:
        if profile.model.fingerprint != profiles[0].model.fingerprint:
            raise UserError(
                f"profile of device {profile.device.id} is of model {profile.model.name} "
                f"({profile.model.fingerprint}), the first of {profiles[0].model.name} "
                f"({profiles[0].model.fingerprint})"
            )
        classes.append(
            DeviceClass(
                name=f"profile:{profile.device.id}",
                speed=relative_speed(profile, profiles[0], batch),
                description=f"{profile.device.board} ({profile.device.cpu_model}), threads {profile.device.threads}",
                source=f"measured: cpsl-profile of device {profile.device.id}",
            )
        )
    return classes


@dataclass(frozen=True)
class Scenario:
    """Everything a simulation run needs besides the number of devices and the bandwidth."""

    costs: ModelCosts
    classes: dict[str, DeviceClass]
    fleet: dict[str, float]  # class name -> weight
    radio: RadioSettings = field(default_factory=RadioSettings)
    config: SimulationConfig = field(default_factory=SimulationConfig)
    model_source: str = ""


def load_costs(
    device_profiles: Sequence[Path], server_profile: Path | None
) -> tuple[ModelCosts, list[Profile], Profile | None]:
    try:
        profiles = [load_profile(path) for path in device_profiles]
        server = load_profile(server_profile) if server_profile else None
    except ProfileError as exc:
        raise UserError(str(exc)) from exc
    return model_costs(profiles[0], server), profiles, server


def run_scenario(
    scenario: Scenario,
    devices: int,
    bandwidth_mhz: float,
    schemes: Sequence[str],
    progress: Callable[[str, int], None] | None = None,
) -> dict:
    if devices < 1:
        raise UserError("need at least one device")
    names = assign_classes(devices, scenario.fleet, scenario.config.seed)
    speeds = np.array([scenario.classes[name].speed for name in names])
    radio = replace(scenario.radio, bandwidth_hz=bandwidth_mhz * 1e6)
    channel = ChannelModel(speeds, radio, seed=scenario.config.seed)
    results = simulate(scenario.costs, channel, schemes, scenario.config, progress)
    settings = scenario.config.settings
    bounds = scenario.config.bounds
    return {
        "config": {
            "model": scenario.costs.model,
            "model_fingerprint": scenario.costs.fingerprint,
            "model_source": scenario.model_source,
            "devices": devices,
            "bandwidth_mhz": bandwidth_mhz,
            "rounds": scenario.config.rounds,
            "seed": scenario.config.seed,
            "batch_size": settings.batch_size,
            "local_iterations": settings.local_iterations,
            "server_speed": settings.server_speed,
            "max_cluster_size": bounds.max_cluster_size,
            "min_clusters": bounds.min_clusters,
            "max_clusters": bounds.max_clusters,
            "saa_samples": scenario.config.saa_samples,
            "reselect_every": scenario.config.reselect_every,
            "drift_threshold": scenario.config.drift_threshold,
            "radio": {
                "device_power_dbm": radio.device_power_dbm,
                "ap_power_dbm": radio.ap_power_dbm,
                "noise_dbm_per_hz": radio.noise_dbm_per_hz,
                "cell_radius_m": radio.cell_radius_m,
                "min_distance_m": radio.min_distance_m,
                "speed_jitter": radio.speed_jitter,
                "medium": radio.medium,
                "wifi_max_phy_bps": radio.wifi_max_phy_bps,
                "wired_capacity_bps": radio.wired_capacity_bps,
            },
            "split_cut": scenario.config.split_cut,
            "candidate_cuts": [{"cut": c.cut, "name": c.name} for c in scenario.costs.cuts],
            "fleet": scenario.fleet,
        },
        "device_classes": {name: scenario.classes[name].to_dict() for name in sorted(set(names))},
        "devices": [
            {"index": i, "class": name, "speed": float(speeds[i]), "distance_m": float(channel.distance_m[i])}
            for i, name in enumerate(names)
        ],
        "schemes": {scheme: result.to_dict() for scheme, result in results.items()},
    }


def run_sweep(
    scenario: Scenario,
    parameter: str,
    values: Sequence[float],
    devices: int,
    bandwidth_mhz: float,
    schemes: Sequence[str],
    progress: Callable[[str, int], None] | None = None,
) -> dict:
    """One run per value of ``parameter`` ("devices" or "bandwidth_mhz"); keeps the means."""
    means: dict[str, list[float]] = {scheme: [] for scheme in schemes}
    cuts = []
    points = []
    for value in values:
        run = run_scenario(
            scenario,
            int(value) if parameter == "devices" else devices,
            float(value) if parameter == "bandwidth_mhz" else bandwidth_mhz,
            schemes,
            progress,
        )
        for scheme in schemes:
            means[scheme].append(run["schemes"][scheme]["mean_latency_s"])
        if "cpsl" in schemes:
            used = Counter((r["cut"], r["cut_name"]) for r in run["schemes"]["cpsl"]["rounds"])
            (cut, name), _ = used.most_common(1)[0]
            cuts.append({"cut": cut, "name": name})
        points.append({"value": value, "config": run["config"], "schemes": run["schemes"]})
    first = points[0]["config"] if points else {}
    return {
        "config": first,
        "sweep": {
            "parameter": parameter,
            "values": list(values),
            "rounds": scenario.config.rounds,
            "seed": scenario.config.seed,
            "mean_latency_s": means,
            "cpsl_cut": cuts,
        },
        "points": points,
    }
