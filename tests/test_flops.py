"""Our FLOP count, from layer shapes, checked against torch's FlopCounterMode layer by layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.models import BUILTIN_MODELS, load_model
from toolkit.profiler.flops import count_forward_flops, reference_forward_flops


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_flops_match_flop_counter_mode_per_layer(name: str) -> None:
    model = load_model(name)
    model.net.eval()
    x = torch.randn(2, *model.input_shape)
    total = 0
    for layer in model.net:
        ours = count_forward_flops(layer, x)
        assert ours == reference_forward_flops(layer, x), type(layer).__name__
        total += ours
        with torch.no_grad():
            x = layer(x)
    assert total > 0


def test_lenet_conv1_flops_by_hand() -> None:
    conv1 = load_model("lenet5").net.conv1
    # 6 output channels x 28 x 28 positions x 25 MACs x 2 FLOPs, one sample
    assert count_forward_flops(conv1, torch.zeros(1, 1, 28, 28)) == 6 * 28 * 28 * 25 * 2


def test_grouped_convolution() -> None:
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.zeros(1, 8, 10, 10)
    assert count_forward_flops(depthwise, x) == 8 * 10 * 10 * 9 * 2 == reference_forward_flops(depthwise, x)
