"""Layered models and the built-in zoo (LeNet-5, a VGG-style CNN, MobileNetV2)."""

from toolkit.models.layered import LayeredModel, resolve_cut, split
from toolkit.models.registry import BUILTIN_MODELS, load_model

__all__ = ["BUILTIN_MODELS", "LayeredModel", "load_model", "resolve_cut", "split"]
