"""Memory a training step needs: bytes saved for backward and the measured peak of a step.

Saved bytes come from saved-tensor hooks, which see exactly the tensors autograd
keeps for backward; parameters are excluded (they are resident anyway) and
storages are counted once. The peak of a step on the CPU comes from the torch
profiler's allocation events (running total of every allocation and free during
the step), on CUDA from the caching allocator's peak counter. Process RSS deltas
are not used: at this granularity they are noise.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn


def saved_tensor_bytes(run: Callable[[], object], parameters: list[nn.Parameter]) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``run`` executes."""
    param_storages = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in param_storages:
            seen[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    del result
    return sum(seen.values())


def peak_transient_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated above what was allocated before ``step`` started, while it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    return _cpu_peak_from_profiler(step)


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null while the torch profiler runs.

    Its kineto backend writes "USDT: profiler_start/stop" lines from C++ straight to the
    descriptors around every session, and no setting turns them off. Python exceptions
    are unaffected: they propagate and are printed after the descriptors are restored.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _cpu_peak_from_profiler(step: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _native_output_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    deltas = _allocation_deltas(prof)
    running = itertools.accumulate(delta for _, delta in sorted(deltas))
    return max(0, max(running, default=0))


def _allocation_deltas(prof: object) -> list[tuple[int, int]]:
    """(time, +bytes for an allocation / -bytes for a free) for every CPU allocator event."""
    try:  # the event tree has every allocator event; its API is private, so keep a fallback
        from torch._C._profiler import _EventType

        deltas: list[tuple[int, int]] = []
        pending = list(prof.profiler.kineto_results.experimental_event_tree())
        while pending:
            node = pending.pop()
            if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
                deltas.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
            pending.extend(node.children)
        return deltas
    except (ImportError, AttributeError):
        return [
            (event.time_range.start, int(event.self_cpu_memory_usage))
            for event in prof.events()
            if event.self_cpu_memory_usage
        ]
