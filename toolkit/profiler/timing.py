"""Repeated timing of multi-phase runs with warm-up and percentile summaries, CPU or CUDA.

A training step is timed as one run split into phases (forward, backward, optimizer
step): every phase gets its own samples and the whole step is their sum, all from the
same runs, so the parts and the whole are coherent. Each phase boundary is bracketed
by ``sync`` (``torch.cuda.synchronize`` on CUDA, a no-op on CPU) so asynchronous
kernels are counted where they run. Set-up work runs outside the timed region, and
Python's garbage collector is paused so a collection is never charged to a layer.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from toolkit.profile_format import Stats


def no_sync() -> None:
    """Synchronisation for CPU tensors: nothing to wait for."""


def summarize(samples: Sequence[float]) -> Stats:
    values = np.asarray(samples, dtype=float)
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return Stats(median=float(median), p10=float(p10), p90=float(p90), n=len(values))


def time_phases(
    phases: Sequence[Callable[[Any], Any]],
    *,
    repeats: int,
    warmup: int,
    setup: Callable[[], Any] | None = None,
    sync: Callable[[], None] = no_sync,
) -> np.ndarray:
    """Seconds per phase, shape (repeats, len(phases)); each phase gets the previous phase's result."""
    samples = np.zeros((repeats, len(phases)))
    # the young generations only: what the last measurement left behind. A full collection walks
    # every object torch created at import (0.12 s each here, 6 of a LeNet profile's 8.4 s) and
    # buys nothing: the collector is off while timing either way.
    gc.collect(1)
    gc.disable()
    try:
        for iteration in range(warmup + repeats):
            state = setup() if setup is not None else None
            sync()
            marks = [time.perf_counter()]
            for phase in phases:
                state = phase(state)
                sync()
                marks.append(time.perf_counter())
            if iteration >= warmup:
                samples[iteration - warmup] = np.diff(marks)
            del state
    finally:
        gc.enable()
    return samples


def shifted(stats: Stats, offset: float) -> Stats:
    """``stats`` minus a constant, floored at zero (used to remove a fixed per-call cost)."""
    return Stats(
        median=max(0.0, stats.median - offset),
        p10=max(0.0, stats.p10 - offset),
        p90=max(0.0, stats.p90 - offset),
        n=stats.n,
    )
