"""The CNN of the FedAvg paper (McMahan et al., AISTATS 2017, section 3): the federated
learning benchmark's own MNIST model.

Two 5x5 convolutions (32 and 64 channels), each followed by ReLU and 2x2 max pooling, a
512-unit fully connected layer and the classifier: 1,663,370 parameters (6.3 MiB). Most
weights sit in ``fc1`` (3136 x 512), so federated learning ships 6.3 MiB each way per
device and round, while a device cut after ``pool2`` keeps 52 k weights and sends 12.25 KiB
per 1x28x28 digit, after ``fc1`` 2 KiB. It learns MNIST quickly with plain SGD (90% in
100-200 steps of 32 at lr 0.05). None of the planning code's constants was fitted on it:
it is the model of the held-out check (bench/heldout.py).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from toolkit.models.layered import flattened_size

DEFAULT_INPUT_SHAPE = (1, 28, 28)


def build_fedavg_cnn(input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE, num_classes: int = 10) -> nn.Sequential:
    channels = input_shape[0]
    features = OrderedDict(
        conv1=nn.Conv2d(channels, 32, kernel_size=5, padding=2),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 64, kernel_size=5, padding=2),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
    )
    flat = flattened_size(features, tuple(input_shape))  # 3136 for 28x28
    return nn.Sequential(
        OrderedDict(**features, fc1=nn.Linear(flat, 512), relu3=nn.ReLU(), fc2=nn.Linear(512, num_classes))
    )
