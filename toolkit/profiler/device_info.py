"""What hardware a profile was made on: board, CPU, memory, software versions.

Raspberry Pi boards name themselves in /proc/device-tree/model; Jetson boards
in /etc/nv_tegra_release and the same device-tree file; anything else is
described by its CPU model.
"""

from __future__ import annotations

import platform
import socket
from pathlib import Path

import psutil
import torch

from toolkit import __version__
from toolkit.devices import accelerator_kind
from toolkit.profile_format import DeviceInfo

DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
CPUINFO = Path("/proc/cpuinfo")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read(CPUINFO).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"model name", "Model", "Hardware", "cpu model"} and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def board_name() -> str:
    tree_model = _read(DEVICE_TREE_MODEL)
    tegra = _read(TEGRA_RELEASE).splitlines()
    if tegra:
        release = tegra[0].lstrip("# ").strip()
        return f"{tree_model or 'NVIDIA Jetson'} ({release})"
    if tree_model:
        return tree_model
    return cpu_model()


def describe_device(device_id: str | None, threads: int, accelerator: torch.device) -> DeviceInfo:
    frequency = psutil.cpu_freq()
    cuda_name = torch.cuda.get_device_name(accelerator) if accelerator.type == "cuda" else None
    return DeviceInfo(
        id=device_id or socket.gethostname() or "device",
        board=board_name(),
        cpu_model=cpu_model(),
        machine=platform.machine(),
        cores_logical=psutil.cpu_count(logical=True) or 1,
        cores_physical=psutil.cpu_count(logical=False),
        max_freq_mhz=float(frequency.max) if frequency and frequency.max else None,
        ram_bytes=int(psutil.virtual_memory().total),
        os=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        onnxruntime=_onnxruntime_version(),
        accelerator=accelerator_kind(accelerator),
        cuda_device=cuda_name,
        threads=threads,
    )


def _onnxruntime_version() -> str | None:
    """None on a board installed without the ``onnx`` extra (no ONNX export there)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def tool_version() -> str:
    return __version__
