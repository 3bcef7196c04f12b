"""Finding a model by name: the built-in zoo, or a user's function given as ``module:function``.

The zoo is a table, not an if/elif chain: adding a model is adding a row.

A user spec imports and runs the owner's code, so a spec must only ever come from local
configuration (a flag or config file of cpsl-profile, cpsl-agent or edge_server), never
from a message: the agent matches an assignment's model name against the specs its owner
configured and builds only those (firmware_agent/agent.py, ``_configured_spec``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from toolkit.errors import UserError
from toolkit.models import fedavg_cnn, lenet, mobilenet, resnet, vgg, widenet
from toolkit.models.layered import LayeredModel, check_runs, layered_from_modules


@dataclass(frozen=True)
class BuiltinModel:
    build: Callable[..., nn.Sequential]
    default_input_shape: tuple[int, ...]
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "lenet5": BuiltinModel(lenet.build_lenet5, lenet.DEFAULT_INPUT_SHAPE, "LeNet-5, 12 layers, 1x28x28"),
    "vgg": BuiltinModel(vgg.build_vgg, vgg.DEFAULT_INPUT_SHAPE, "VGG-style CNN, 16 layers, 3x32x32"),
    "mobilenetv2": BuiltinModel(
        mobilenet.build_mobilenetv2, mobilenet.DEFAULT_INPUT_SHAPE, "MobileNetV2, 23 blocks, 3x32x32"
    ),
    "fedavgcnn": BuiltinModel(
        fedavg_cnn.build_fedavg_cnn,
        fedavg_cnn.DEFAULT_INPUT_SHAPE,
        "the FedAvg paper's MNIST CNN, 1.66 M weights, 1x28x28",
    ),
    "resnet8": BuiltinModel(
        resnet.build_resnet8, resnet.DEFAULT_INPUT_SHAPE, "ResNet-8 (GroupNorm), 3 residual blocks, 1x28x28"
    ),
    "widenet": BuiltinModel(
        widenet.build_widenet, widenet.DEFAULT_INPUT_SHAPE, "small CNN under a 5.5 MB fully connected head, 1x28x28"
    ),
}
ALIASES = {
    "lenet": "lenet5",
    "lenet-5": "lenet5",
    "mobilenet": "mobilenetv2",
    "mobilenet_v2": "mobilenetv2",
    "fedavg-cnn": "fedavgcnn",
}


def canonical_name(spec: str) -> str:
    return ALIASES.get(spec.lower(), spec.lower()) if ":" not in spec else spec


def is_builtin(spec: str) -> bool:
    """A built-in model's name (or alias): building it runs no code from outside the toolkit."""
    return canonical_name(spec) in BUILTIN_MODELS


def model_to_rebuild(recorded: str, given: str | None, where: str) -> str:
    """The model to rebuild a saved run with (``--resume``, ``serve``, ``export-heads``).

    A run folder may have been copied from anywhere: the model it records is used only when
    it is built in. A model of the operator's own code is named again on the command line
    (``given``); the run's fingerprint then checks that it is the model the run trained."""
    if given:
        return given
    if is_builtin(recorded):
        return recorded
    raise UserError(
        f"{where} names model {recorded[:200]!r}, which is code, not a built-in model: a run folder never "
        "names code to run; if you trust that model, name its file yourself with --model FILE.py:FUNCTION"
    )


def load_model(
    spec: str,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int = 10,
    seed: int | None = None,
) -> LayeredModel:
    """Build the model named by ``spec`` and check that ``input_shape`` runs through it.

    ``spec`` is a built-in name (see ``BUILTIN_MODELS``), ``package.module:function``
    or ``path/to/file.py:function``; the function returns an ``nn.Sequential`` or a list
    of (name, module) pairs and may accept ``input_shape`` and ``num_classes`` keywords.
    ``seed`` makes the initial weights reproducible.
    """
    if seed is not None:
        torch.manual_seed(seed)
    name = canonical_name(spec)
    if name in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[name]
        shape = tuple(input_shape) if input_shape else entry.default_input_shape
        if len(shape) != 3:
            raise UserError(f"model {name!r} needs an input shape C,H,W, got {len(shape)} dimension(s)")
        try:
            net = entry.build(input_shape=shape, num_classes=num_classes)
        except Exception as exc:
            raise UserError(f"model {name!r} cannot be built for input shape {_fmt(shape)}: {exc}") from exc
        model = LayeredModel(name=name, net=net, input_shape=shape)
    elif ":" in spec:
        model = _load_user_model(spec, input_shape, num_classes)
    else:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise UserError(
            f"unknown model {spec!r}: built-in models are {known}; "
            "a model of your own is given as package.module:function or path/to/file.py:function"
        )
    check_runs(model)
    return model


def _fmt(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)


def _load_user_model(spec: str, input_shape: tuple[int, ...] | None, num_classes: int) -> LayeredModel:
    target, _, function_name = spec.rpartition(":")
    if not target or not function_name.isidentifier():
        raise UserError(f"model spec {spec!r} is not of the form module:function or file.py:function")
    if input_shape is None:
        raise UserError(f"model {spec!r} is not built in: give its input shape with --input-shape C,H,W")
    module = _import_target(target, spec)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"model spec {spec!r}: {target} has no function {function_name!r}")
    accepted = inspect.signature(function).parameters
    kwargs = {
        key: value
        for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes))
        if key in accepted
    }
    try:
        built = function(**kwargs)
    except Exception as exc:
        raise UserError(f"model function {spec!r} raised {type(exc).__name__}: {exc}") from exc
    return layered_from_modules(spec, built, tuple(input_shape))


def _import_target(target: str, spec: str) -> ModuleType:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"model spec {spec!r}: file {target} does not exist")
        module_name = f"cpsl_user_model_{abs(hash(path.resolve()))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"model spec {spec!r}: {target} cannot be imported")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise UserError(f"model file {target} raised {type(exc).__name__} on import: {exc}") from exc
        return module
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise UserError(f"model spec {spec!r}: cannot import {target}: {type(exc).__name__}: {exc}") from exc
