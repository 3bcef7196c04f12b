"""The device-side heads of a trained model, one ONNX file per cut, and the manifest that ties
them to the weights they were exported from (split inference).

``edge_server export-heads RUN_DIR`` writes ``heads.json`` and ``head_cutNN_<layer>.onnx`` for
every cut 1..L: cut ``k`` runs layers 1..k, and cut L is the whole model (device-only
inference). The operator copies the folder to a board; ``cpsl-infer`` loads only what that
folder's manifest lists, after checking each file's SHA-256 against it. Nothing here comes
from the network: the heads are the owner's files, like the models an agent may train.

``weights`` in the manifest is :func:`weights_digest` of the trained state dict: the
inference service announces the digest of the weights it serves, so a board whose heads
came from another run (or another round) never mixes its activations into other weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toolkit.errors import UserError
from toolkit.files import read_bounded, write_atomically
from toolkit.models import LayeredModel

FORMAT = "cpsl-heads"
VERSION = 1
MANIFEST = "heads.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_HEAD_BYTES = 1 << 30  # one ONNX file
FILE_PATTERN = r"^[A-Za-z0-9_.-]{1,128}\.onnx$"  # a plain name inside the folder: no path can escape it


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """32 hex digits of SHA-256 over every tensor's name, dtype, shape and bytes, in key order:
    equal for the same weights however they were saved, different for any other weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:32]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class HeadFile(_Strict):
    cut: int = Field(ge=1, le=100_000)
    after: str = Field(max_length=256)
    file: str = Field(pattern=FILE_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    output_shape: list[Annotated[int, Field(ge=1, le=1 << 20)]] = Field(min_length=1, max_length=8)
    max_abs_error: float = Field(ge=0)


class HeadManifest(_Strict):
    format: str = Field(pattern=f"^{FORMAT}$")
    version: int = Field(ge=VERSION, le=VERSION)
    run: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    model: str = Field(max_length=512)
    model_fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")
    weights: str = Field(pattern=r"^[0-9a-f]{32}$")
    input_shape: list[Annotated[int, Field(ge=1, le=1 << 16)]] = Field(min_length=1, max_length=8)
    num_classes: int = Field(ge=2, le=1 << 20)
    layer_names: list[Annotated[str, Field(max_length=256)]] = Field(min_length=2, max_length=100_000)
    heads: list[HeadFile] = Field(min_length=1, max_length=100_000)
    created_utc: str = Field(max_length=64)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def head(self, cut: int) -> HeadFile:
        for entry in self.heads:
            if entry.cut == cut:
                return entry
        raise UserError(f"the heads folder has no head for cut {cut}: it has {', '.join(map(str, self.cuts))}")

    @property
    def cuts(self) -> list[int]:
        return [entry.cut for entry in self.heads]


def export_heads(
    model: LayeredModel,
    out_dir: Path,
    run_id: str,
    cuts: list[int] | None = None,
    threads: int = 1,
    on_step: Callable[[str], None] | None = None,
) -> HeadManifest:
    """Export ``model``'s device-side part at each cut (default: every cut 1..L, L being the
    whole model), each checked against torch (toolkit.profiler.onnx_export); the manifest last,
    atomically, so a folder with a manifest has every file it names."""
    from toolkit.profiler.onnx_export import export_submodel  # onnx: the server's extra, not a board's

    layers = model.num_layers
    chosen = sorted(set(cuts)) if cuts else list(range(1, layers + 1))
    if any(not 1 <= cut <= layers for cut in chosen):
        raise UserError(f"heads exist for cuts 1..{layers} (cut {layers}: the whole model)")
    out_dir.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, *model.input_shape)
    entries = []
    for cut in chosen:
        after = model.layer_names[cut - 1]
        if on_step is not None:
            on_step(f"cut {cut} ({after})")
        name = f"head_cut{cut:02d}_{_safe(after)}.onnx"
        result = export_submodel(model.net[:cut], example, out_dir / name, threads)
        with torch.no_grad():
            shape = list(model.net[:cut].eval()(example[:1]).shape[1:])
        model.net.train()
        entries.append(
            HeadFile(
                cut=cut,
                after=after,
                file=name,
                sha256=result.sha256,
                output_shape=shape,
                max_abs_error=result.max_abs_error,
            )
        )
    with torch.no_grad():
        classes = int(model.net.eval()(example[:1]).shape[-1])
    model.net.train()
    manifest = HeadManifest(
        format=FORMAT,
        version=VERSION,
        run=run_id,
        model=model.name,
        model_fingerprint=model.fingerprint(),
        weights=weights_digest(model.net.state_dict()),
        input_shape=list(model.input_shape),
        num_classes=classes,
        layer_names=model.layer_names,
        heads=entries,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_atomically(out_dir / MANIFEST, manifest.model_dump_json(indent=1))
    return manifest


def _safe(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)
    return keep.strip("_") or "layer"


def read_manifest(folder: Path) -> HeadManifest:
    """The folder's manifest, validated; one line naming the file and the problem otherwise."""
    path = folder / MANIFEST
    raw = read_bounded(path, MAX_MANIFEST_BYTES, "heads manifest")
    try:
        manifest = HeadManifest.model_validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise UserError(f"heads manifest {path} is not JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"heads manifest {path}: {where}: {first['msg']}") from None
    if len({entry.cut for entry in manifest.heads}) != len(manifest.heads):
        raise UserError(f"heads manifest {path} lists a cut twice")
    for entry in manifest.heads:
        if entry.cut > manifest.num_layers or manifest.layer_names[entry.cut - 1] != entry.after:
            raise UserError(f"heads manifest {path}: cut {entry.cut} does not end at layer {entry.after!r}")
    return manifest


@dataclass
class HeadSet:
    """The heads of one folder, each loaded into onnxruntime the first time it is used, after its
    bytes are checked against the manifest's SHA-256."""

    folder: Path
    manifest: HeadManifest
    threads: int = 1
    _sessions: dict[int, object] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, threads: int = 1) -> HeadSet:
        return cls(folder, read_manifest(folder), threads)

    @property
    def whole_model_cut(self) -> int:
        return self.manifest.num_layers

    def output_shape(self, cut: int) -> tuple[int, ...]:
        return tuple(self.manifest.input_shape) if cut == 0 else tuple(self.manifest.head(cut).output_shape)

    def session(self, cut: int):
        if cut not in self._sessions:
            entry = self.manifest.head(cut)
            path = self.folder / entry.file
            blob = read_bounded(path, MAX_HEAD_BYTES, "ONNX head")
            if hashlib.sha256(blob).hexdigest() != entry.sha256:
                raise UserError(f"{path} is not the file the manifest lists (SHA-256 differs): export the heads again")
            self._sessions[cut] = _session(blob, self.threads, path)
        return self._sessions[cut]

    def run(self, cut: int, inputs: np.ndarray) -> np.ndarray:
        """Layers 1..cut on ``inputs`` (float32, [batch, *input_shape]); cut 0 is the inputs."""
        if cut == 0:
            return inputs
        session = self.session(cut)
        return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def _session(blob: bytes, threads: int, path: Path):
    """An onnxruntime CPU session (a board needs onnxruntime only: the ``infer`` extra, not ``onnx``)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("cpsl-infer runs the heads in onnxruntime: pip install 'cpsl-edge[infer]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a malformed file
        raise UserError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:200]}") from None
