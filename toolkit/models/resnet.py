"""ResNet-8: three residual stages for small images, cut only between blocks.

The CIFAR ResNets of He et al. (2016, section 4.2) at depth 8 and half their widths -- a
3x3 stem, one basic block per stage (8, 16, 32 channels; the last two halve the
resolution), global average pooling and one linear layer -- so that a device at a tenth
of a core trains a batch of 32 digits in about 0.4 s; and with GroupNorm in place of BatchNorm: a device-side
BatchNorm would keep running statistics of its own data that averaging does not reconcile,
GroupNorm normalises each sample alone and keeps no state but its weights.

Its 20 k parameters (79 kB) are few and its activations large: cut after ``block1`` a
device sends 8x28x28 floats per 1x28x28 digit (25 kB, 8x the input), after ``block2``
12.5 kB, after ``block3`` 6.3 kB, after ``pool`` 128 bytes. It is the case where federated learning ships little
and split learning ships a lot unless the cut is late -- the opposite of WideNet
(toolkit/models/widenet.py). With plain SGD it learns slowly (79% of MNIST after 600
steps of 32 at lr 0.05, centrally): give it more rounds, or a larger learning rate.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

DEFAULT_INPUT_SHAPE = (1, 28, 28)
STAGES = (8, 16, 32)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (a 1x1 convolution where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def build_resnet8(input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE, num_classes: int = 10) -> nn.Sequential:
    channels = input_shape[0]
    first, second, third = STAGES
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(channels, first, 3, 1, 1, bias=False), _norm(first), nn.ReLU()),
            block1=BasicBlock(first, first, 1),
            block2=BasicBlock(first, second, 2),
            block3=BasicBlock(second, third, 2),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(third, num_classes),
        )
    )
