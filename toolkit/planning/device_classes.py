"""Device classes for simulation: compute speed relative to the reference profile.

A class's ``speed`` multiplies the reference profile's throughput (2.0 = every step takes
half the time). The reference is what ``profiles/epyc-vm-2vcpu/`` measured: one intra-op
thread of the AMD EPYC VM this project is developed on. Its effective training throughput
on the VGG profile is 64 samples x 3 x 40.57 MFLOP / 0.2497 s = 31.2 GFLOP/s (forward
FLOPs from the profile, backward counted as twice the forward).

The board classes are *estimates*, derived from datasheet peak FP32 throughput times an
assumed efficiency for small-batch CNN training (25% for NEON CPUs under PyTorch, 10% for
small embedded GPUs, which small kernels leave mostly idle), divided by 31.2 GFLOP/s. The
derivation of each is in its ``source``. Replace them with measurements: run
``cpsl-profile`` on the board and pass the profile to ``cpsl-sim --profile``, or give
your own classes with ``--device-classes FILE.json`` (a list of objects with the fields of
:class:`DeviceClass`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from toolkit.errors import UserError

REFERENCE_GFLOPS = 31.2


@dataclass(frozen=True)
class DeviceClass:
    name: str
    speed: float  # relative to the reference profile
    description: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


BUILTIN_CLASSES: dict[str, DeviceClass] = {
    c.name: c
    for c in (
        DeviceClass(
            name="reference",
            speed=1.0,
            description="one intra-op thread of the AMD EPYC VM of profiles/epyc-vm-2vcpu",
            source="measured: profiles/epyc-vm-2vcpu/vgg.json, 31.2 GFLOP/s effective training throughput",
        ),
        DeviceClass(
            name="raspberry-pi-4",
            speed=0.38,
            description="Raspberry Pi 4 Model B, 4x Cortex-A72 @ 1.5 GHz, PyTorch on the CPU",
            source=(
                "estimate: datasheet 4 cores x 1.5 GHz x 8 FP32 FLOP/cycle (one 4-lane NEON FMA) = 48 GFLOP/s, "
                "x 25% assumed efficiency = 12 GFLOP/s, / 31.2"
            ),
        ),
        DeviceClass(
            name="jetson-nano",
            speed=0.76,
            description="NVIDIA Jetson Nano 4 GB, 128-core Maxwell GPU @ 921.6 MHz",
            source=(
                "estimate: NVIDIA's 472 GFLOPS FP16 = 236 GFLOP/s FP32 (128 cores x 2 x 921.6 MHz), "
                "x 10% assumed efficiency = 23.6 GFLOP/s, / 31.2"
            ),
        ),
        DeviceClass(
            name="jetson-orin-nano",
            speed=4.1,
            description="NVIDIA Jetson Orin Nano 8 GB, 1024-core Ampere GPU @ 625 MHz (pre-'Super' clocks)",
            source=(
                "estimate: datasheet 1024 CUDA cores x 2 x 625 MHz = 1280 GFLOP/s FP32, "
                "x 10% assumed efficiency = 128 GFLOP/s, / 31.2"
            ),
        ),
    )
}


def load_device_classes(path: Path | None) -> dict[str, DeviceClass]:
    """The built-in classes, plus (overriding by name) those of a user's JSON file."""
    classes = dict(BUILTIN_CLASSES)
    if path is None:
        return classes
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read device classes {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"device classes {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(entries, list):
        raise UserError(f"device classes {path}: expected a JSON list of classes")
    for position, entry in enumerate(entries):
        where = f"device classes {path}, entry {position}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise UserError(f"{where}: needs a non-empty string field 'name'")
        speed = entry.get("speed")
        if isinstance(speed, bool) or not isinstance(speed, int | float) or not speed > 0:
            raise UserError(f"{where} ({entry['name']}): field 'speed' must be a positive number")
        classes[entry["name"]] = DeviceClass(
            name=entry["name"],
            speed=float(speed),
            description=str(entry.get("description", "")),
            source=str(entry.get("source", f"user file {path}")),
        )
    return classes


def parse_fleet(text: str, classes: dict[str, DeviceClass]) -> dict[str, float]:
    """``"raspberry-pi-4=2,jetson-nano=1"`` -> weights per class (a bare name weighs 1)."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight_text = part.partition("=")
        if name not in classes:
            raise UserError(f"fleet: unknown device class {name!r} (known: {', '.join(sorted(classes))})")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise UserError(f"fleet: weight {weight_text!r} of {name} is not a number") from None
        if not weight > 0:
            raise UserError(f"fleet: weight of {name} must be positive")
        weights[name] = weights.get(name, 0.0) + weight
    if not weights:
        raise UserError("fleet: no device classes given")
    return weights


def assign_classes(devices: int, weights: dict[str, float], seed: int) -> list[str]:
    """Deterministic: counts by largest remainder of the weights, order shuffled by seed."""
    import numpy as np

    total = sum(weights.values())
    exact = {name: devices * weight / total for name, weight in weights.items()}
    counts = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[: devices - sum(counts.values())]:
        counts[name] += 1
    names = [name for name in weights for _ in range(counts[name])]
    order = np.random.default_rng([seed, 0xC1A55]).permutation(len(names))
    return [names[i] for i in order]
