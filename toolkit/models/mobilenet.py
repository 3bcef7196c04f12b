"""MobileNetV2 (Sandler et al. 2018) written with torch.nn only, cut only at block boundaries.

Each layer of the returned Sequential is a whole block (stem, 17 inverted-residual
blocks, head, pool, flatten, classifier), so every candidate cut falls between
blocks and never inside a residual connection. For small inputs (32x32, CIFAR) the
stem and the first downsampling stage use stride 1, the usual CIFAR adaptation;
224x224 inputs get the strides of the paper.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

DEFAULT_INPUT_SHAPE = (3, 32, 32)

# (expansion t, output channels c, repeats n, first stride s) from Table 2 of the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear); residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu(cin, hidden, 1, 1))
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


def build_mobilenetv2(
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
    num_classes: int = 10,
    width_mult: float = 1.0,
) -> nn.Sequential:
    small_input = min(input_shape[1:]) < 64
    cin = _make_divisible(32 * width_mult)
    last = _make_divisible(1280 * max(1.0, width_mult))
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["stem"] = _conv_bn_relu(input_shape[0], cin, 3, 1 if small_input else 2)
    block = 0
    for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
        cout = _make_divisible(c * width_mult)
        first_stride = 1 if (small_input and stage == 1) else s
        for repeat in range(n):
            block += 1
            layers[f"block{block}"] = InvertedResidual(cin, cout, first_stride if repeat == 0 else 1, t)
            cin = cout
    layers["head"] = _conv_bn_relu(cin, last, 1, 1)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["dropout"] = nn.Dropout(0.2)
    layers["fc"] = nn.Linear(last, num_classes)
    return nn.Sequential(layers)
