"""WideNet: a small convolutional feature extractor under a wide fully connected head.

The shape of AlexNet's and VGG-16's classifiers, where most weights sit in the fully
connected layers while the features that reach them are small: for 1x28x28 digits, three
conv/pool stages leave 3x3x32 = 288 floats per sample (1.1 kB), and the head
(288 -> 1024 -> 1024 -> classes) holds 1.36 M of the 1.38 M parameters (5.5 MB). This is
the case split learning is for: a device that keeps the convolutions (91 kB of weights)
sends 1.1 kB per sample, while federated learning ships 5.5 MB each way every round and
trains the whole head on the device. It is the model of the testbed's heavy fleet
(docs/testbed.md); LeNet-5, where the whole model is 240 kB, is the opposite case.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from toolkit.models.layered import flattened_size

DEFAULT_INPUT_SHAPE = (1, 28, 28)
HIDDEN = 1024


def build_widenet(input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE, num_classes: int = 10) -> nn.Sequential:
    channels = input_shape[0]
    features = OrderedDict(
        conv1=nn.Conv2d(channels, 16, kernel_size=5, padding=2),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(16, 32, kernel_size=5, padding=2),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        conv3=nn.Conv2d(32, 32, kernel_size=3, padding=1),
        relu3=nn.ReLU(),
        pool3=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
    )
    flat = flattened_size(features, tuple(input_shape))  # 288 for 28x28
    return nn.Sequential(
        OrderedDict(
            **features,
            fc1=nn.Linear(flat, HIDDEN),
            relu4=nn.ReLU(),
            fc2=nn.Linear(HIDDEN, HIDDEN),
            relu5=nn.ReLU(),
            fc3=nn.Linear(HIDDEN, num_classes),
        )
    )
