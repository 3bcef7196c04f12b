"""Where the edge server computes: ``--device cpu|cuda|cuda:N|auto``.

The server-side layers (after the cut) and their optimiser live on the chosen device; the
device-side layers stay on the CPU, where the weights are handed out, averaged and checked.
What comes from the wire is decoded and validated on the CPU and only then moved; the
gradients at the cut go back to the CPU before they are encoded. When the cut moves (the
automatic scheduler re-selects it), the layers are placed again and the server optimiser is
made anew for the new server side, as it always was. Evaluation runs the two sides where
they are and moves the activations between them, so it computes what the whole model on one
device computes.
"""

from __future__ import annotations

import torch
from torch import nn


def place(net: nn.Sequential, cut: int | None, device: torch.device) -> None:
    """Layers 1..cut on the CPU, the rest on ``device`` (cut None: the whole model on the CPU, as
    FL aggregates it). In place: parameters keep their identity, so references stay valid."""
    split = len(net) if cut is None else cut
    net[:split].to("cpu")
    net[split:].to(device)


class SplitForward(nn.Module):
    """The whole model as one module while its two sides sit on different devices: the CPU side,
    then the activations moved, then the rest; logits back on the CPU."""

    def __init__(self, net: nn.Sequential, cut: int | None, device: torch.device) -> None:
        super().__init__()
        self.net, self.cut, self.placement = net, cut, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cut is None or self.placement.type == "cpu":
            return self.net(x)
        return self.net[self.cut :](self.net[: self.cut](x).to(self.placement)).cpu()
