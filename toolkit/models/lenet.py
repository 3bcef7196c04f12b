"""LeNet-5 (LeCun et al. 1998) in its common modern form, for 1x28x28 digits.

Layer names are fixed by the issue tracker and the docs; cutting after ``pool2``
sends 400 floats per sample, after ``fc1`` 120.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from toolkit.models.layered import flattened_size

DEFAULT_INPUT_SHAPE = (1, 28, 28)


def build_lenet5(input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE, num_classes: int = 10) -> nn.Sequential:
    channels = input_shape[0]
    features = OrderedDict(
        conv1=nn.Conv2d(channels, 6, kernel_size=5, padding=2),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 16, kernel_size=5),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
    )
    flat = flattened_size(features, tuple(input_shape))  # the flattened size follows the input shape (400 for 28x28)
    return nn.Sequential(
        OrderedDict(
            **features,
            fc1=nn.Linear(flat, 120),
            relu3=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            relu4=nn.ReLU(),
            fc3=nn.Linear(84, num_classes),
        )
    )
