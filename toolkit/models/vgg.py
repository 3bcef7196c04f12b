"""A small VGG-style CNN for 3x32x32 images (CIFAR-10 sized).

Four 3x3 convolutions in three stages and two fully connected layers: deep enough
that the cut matters (smashed data shrinks from 32 KiB to 1 KiB per sample along
the network) and small enough to train on a Raspberry Pi.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

DEFAULT_INPUT_SHAPE = (3, 32, 32)


def build_vgg(input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE, num_classes: int = 10) -> nn.Sequential:
    channels = input_shape[0]
    features = OrderedDict(
        conv1=nn.Conv2d(channels, 32, 3, padding=1),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 64, 3, padding=1),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        conv3=nn.Conv2d(64, 128, 3, padding=1),
        relu3=nn.ReLU(),
        conv4=nn.Conv2d(128, 128, 3, padding=1),
        relu4=nn.ReLU(),
        pool3=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
    )
    with torch.no_grad():
        flat = nn.Sequential(features)(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(
        OrderedDict(
            **features,
            fc1=nn.Linear(flat, 256),
            relu5=nn.ReLU(),
            fc2=nn.Linear(256, num_classes),
        )
    )
