"""Layered models: an ordered list of named layers where every boundary is a candidate cut.

A cut is identified by how many layers run on the device: cut ``k`` puts layers
``1..k`` on the device and ``k+1..L`` on the server, so valid cuts are ``1..L-1``.
Users may also name a cut by the name of the last device-side layer
(``"pool2"`` for LeNet is cut 6). Splitting shares the layer modules with the
whole model instead of copying them, so ``server(device(x))`` is the whole model
by construction, parameter for parameter.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from toolkit.errors import UserError


@dataclass
class LayeredModel:
    """A model as a named ``nn.Sequential`` plus the input shape it expects (without batch)."""

    name: str
    net: nn.Sequential
    input_shape: tuple[int, ...]

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.net.named_children()]

    @property
    def num_layers(self) -> int:
        return len(self.net)

    def candidate_cuts(self) -> list[int]:
        """All cuts that leave at least one layer on each side."""
        return list(range(1, self.num_layers))

    def cut_index(self, cut: int | str) -> int:
        """Resolve a cut given as an index (int or digit string) or a layer name."""
        return resolve_cut(self.layer_names, cut)

    def cut_name(self, cut: int) -> str:
        """The name of the last device-side layer of cut ``cut``."""
        return self.layer_names[cut - 1]

    def split(self, cut: int | str) -> tuple[nn.Sequential, nn.Sequential]:
        return split(self, cut)

    def fingerprint(self) -> str:
        """A hash of the architecture (names, types, parameter shapes, input shape), not the weights.

        Profiles carry it so a profile made for one model is never used for another
        that merely shares its name.
        """
        return architecture_fingerprint(self.net, self.input_shape)


def resolve_cut(layer_names: list[str], cut: int | str) -> int:
    num_layers = len(layer_names)
    valid = f"valid cuts are 1..{num_layers - 1} or a layer name among {', '.join(layer_names[:-1])}"
    if isinstance(cut, str) and cut.strip().lstrip("-").isdigit():
        cut = int(cut.strip())
    if isinstance(cut, int):
        if 1 <= cut <= num_layers - 1:
            return cut
        raise UserError(f"cut {cut} does not exist: {valid}")
    if cut in layer_names:
        index = layer_names.index(cut) + 1
        if index == num_layers:
            raise UserError(f"cut {cut!r} is the last layer and leaves nothing on the server: {valid}")
        return index
    raise UserError(f"cut {cut!r} does not exist: {valid}")


def split(model: LayeredModel, cut: int | str) -> tuple[nn.Sequential, nn.Sequential]:
    """Device-side and server-side parts of ``model`` at ``cut``; they share the model's modules."""
    index = model.cut_index(cut)
    return model.net[:index], model.net[index:]


def architecture_fingerprint(net: nn.Module, input_shape: tuple[int, ...]) -> str:
    description = {
        "input_shape": list(input_shape),
        "layers": [
            {
                "name": name,
                "type": type(module).__name__,
                "params": [[pname, list(p.shape)] for pname, p in module.named_parameters()],
            }
            for name, module in net.named_children()
        ],
    }
    blob = json.dumps(description, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def layered_from_modules(
    name: str,
    modules: nn.Sequential | list[nn.Module] | list[tuple[str, nn.Module]],
    input_shape: tuple[int, ...],
) -> LayeredModel:
    """Build a LayeredModel from what a user function returns, giving unnamed layers readable names.

    ``nn.Sequential`` children named ``"0"``, ``"1"``... become ``conv2d0``, ``relu1``...
    so that cuts can be named and ONNX node names stay recognisable.
    """
    if isinstance(modules, nn.Sequential):
        items = list(modules.named_children())
    elif isinstance(modules, (list, tuple)):
        items = []
        for position, item in enumerate(modules):
            if isinstance(item, nn.Module):
                items.append((str(position), item))
            elif (
                isinstance(item, (list, tuple))
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], nn.Module)
            ):
                items.append((item[0], item[1]))
            else:
                raise UserError(
                    f"model {name!r}: element {position} is {type(item).__name__}, "
                    "expected an nn.Module or a (name, nn.Module) pair"
                )
    else:
        raise UserError(
            f"model {name!r} is a {type(modules).__name__}, expected an nn.Sequential or a list of named modules"
        )
    if len(items) < 2:
        raise UserError(f"model {name!r} has {len(items)} layer(s); at least 2 are needed to cut it")
    named: OrderedDict[str, nn.Module] = OrderedDict()
    for position, (layer_name, module) in enumerate(items):
        if layer_name.isdigit():
            layer_name = f"{type(module).__name__.lower()}{position}"
        if layer_name in named:
            raise UserError(f"model {name!r}: layer name {layer_name!r} appears twice")
        named[layer_name] = module
    return LayeredModel(name=name, net=nn.Sequential(named), input_shape=tuple(input_shape))


def check_runs(model: LayeredModel) -> torch.Size:
    """Run one sample through the model to prove the input shape fits; returns the output shape."""
    model.net.eval()
    try:
        with torch.no_grad():
            out = model.net(torch.zeros(1, *model.input_shape))
    except Exception as exc:  # the user's model or shape is wrong; say which in one line
        shape = ",".join(str(d) for d in model.input_shape)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model {model.name!r} does not accept input shape {shape}: {first}") from exc
    finally:
        model.net.train()
    return out.shape


def flattened_size(features: dict[str, nn.Module], input_shape: tuple[int, ...]) -> int:
    """Features per sample after ``features`` (ending in a Flatten) for one input of
    ``input_shape``: what a classifier head's first Linear layer takes, for any input size."""
    with torch.no_grad():
        return int(nn.Sequential(OrderedDict(features))(torch.zeros(1, *input_shape)).shape[1])
