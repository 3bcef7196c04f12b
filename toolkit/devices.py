"""Which torch device a part of the model computes on, named the same way everywhere.

``edge_server --device``, ``cpsl-agent --device`` (and ``device`` in its config file) and
``cpsl-profile --device`` all take ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA where torch
sees one, else the CPU). A name torch cannot use here is one line before anything starts,
not a stack trace in the middle of a run.

CUDA runs asynchronously: a timer read after a kernel launch measures the launch, not the
work. :func:`synchronize` is what every timed section calls before it reads the clock, so the
agent's reported timings and the profiler's measurements mean the same on either device.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from toolkit.errors import UserError

if TYPE_CHECKING:
    import torch

CHOICES = "cpu, cuda, cuda:N or auto"


def device_name(text: str) -> str:
    """An argparse type: ``text`` if it is a device name at all (whether this machine has it is
    :func:`resolve_device`'s question, asked once the run starts)."""
    value = str(text).strip().lower()
    if value in ("cpu", "cuda", "auto") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: choose {CHOICES}")


def resolve_device(text: str, flag: str = "--device") -> torch.device:
    """The torch device ``text`` names; one line saying why not when it cannot be used here."""
    import torch  # here, not above: device_name checks flags in processes that never load torch

    value = str(text).strip().lower()
    if value == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(
                f"{flag} {text}: torch {torch.__version__} sees no CUDA device here ({_why_no_cuda()}); use cpu"
            )
        index = int(value[5:]) if ":" in value else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"{flag} {text}: there are {torch.cuda.device_count()} CUDA devices (0..)")
        return torch.device("cuda", index)
    raise UserError(f"{flag} {text!r}: choose {CHOICES}")


def _why_no_cuda() -> str:
    import torch

    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    return f"a CUDA {torch.version.cuda} build, but no GPU or driver is reachable"


def accelerator_kind(device: torch.device) -> str:
    """``cuda`` or ``cpu``: what a registration's capabilities and a profile's device record say."""
    return "cuda" if device.type == "cuda" else "cpu"


def cache_tag(device: torch.device, threads: int) -> str:
    """What a cached profile's file name says of where it was measured: ``cuda0``, or ``t2`` (threads)."""
    return f"cuda{device.index or 0}" if device.type == "cuda" else f"t{threads}"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: call it before reading a clock (a no-op on the CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def accelerator_name(device: torch.device) -> str:
    """What a person recognises: ``cpu`` or ``cuda:0 (NVIDIA Orin)``."""
    if device.type == "cuda":
        import torch

        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return "cpu"
