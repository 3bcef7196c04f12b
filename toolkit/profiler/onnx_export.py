"""Exporting a device-side submodel to ONNX and proving the file computes what torch computes.

The TorchScript exporter (``dynamo=False``) is used because it works offline and
writes one self-contained file whose node names carry the Sequential index; the
dynamo exporter needs onnxscript. The batch dimension is dynamic so one file
serves every batch size. Each file is checked with ``onnx.checker`` and run in
onnxruntime against torch on the same input.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 17
TOLERANCE = 1e-5


@dataclass
class ExportResult:
    path: Path
    sha256: str
    max_abs_error: float
    session: ort.InferenceSession


class OnnxMismatchError(RuntimeError):
    """onnxruntime's output differs from torch's by more than the tolerance."""


def torchscript_exporter() -> dict:
    """The keyword that picks the TorchScript exporter: ``dynamo=False`` where the exporter has
    the choice (torch 2.5 and later); before that it is the only exporter and takes no such keyword."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def export_submodel(part: nn.Sequential, example: torch.Tensor, path: Path, threads: int) -> ExportResult:
    """Export ``part`` (in eval mode, on the CPU) to ``path``, check it and compare with torch."""
    frozen = copy.deepcopy(part).cpu().eval()  # never flip the caller's modules to eval mode
    example = example.detach().cpu()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated, and says so loudly
        torch.onnx.export(
            frozen,
            (example,),
            buffer,
            **torchscript_exporter(),
            opset_version=OPSET,
            input_names=["input"],
            output_names=["smashed"],
            dynamic_axes={"input": {0: "batch"}, "smashed": {0: "batch"}},
        )
    blob = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)
    path.write_bytes(blob)

    session = make_session(blob, threads)
    with torch.no_grad():
        expected = frozen(example).numpy()
    actual = session.run(None, {"input": example.numpy()})[0]
    error = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    if not error <= TOLERANCE * max(1.0, float(np.max(np.abs(expected)))):
        raise OnnxMismatchError(f"{path.name}: onnxruntime differs from torch by {error:.3g}")
    return ExportResult(path=path, sha256=hashlib.sha256(blob).hexdigest(), max_abs_error=error, session=session)


def make_session(model: bytes | str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
