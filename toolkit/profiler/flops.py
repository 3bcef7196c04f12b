"""Our own forward FLOP count, from layer shapes.

Convention (shared with torch.utils.flop_counter and fvcore): 2 FLOPs per
multiply-accumulate of convolutions and linear layers; activations, pooling,
normalisation and additions are not counted. The tests check this count against
``FlopCounterMode``; the profiler warns when a user's model does work this count
cannot see (a custom matmul, say).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _conv_flops(module: nn.Conv2d, output: torch.Tensor) -> int:
    kernel_ops = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return 2 * output.numel() * kernel_ops


def _linear_flops(module: nn.Linear, output: torch.Tensor) -> int:
    return 2 * output.numel() * module.in_features


FLOP_RULES = {
    nn.Conv1d: _conv_flops,
    nn.Conv2d: _conv_flops,
    nn.Conv3d: _conv_flops,
    nn.Linear: _linear_flops,
}


def count_forward_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``module`` on ``example`` (the whole batch)."""
    total = 0

    def hook(sub: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += FLOP_RULES[type(sub)](sub, output)

    handles = [sub.register_forward_hook(hook) for sub in module.modules() if type(sub) in FLOP_RULES]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


def reference_forward_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs as torch's own FlopCounterMode counts them, for cross-checking."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(example)
    return int(counter.get_total_flops())
