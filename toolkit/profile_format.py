"""The device profile: the versioned JSON that ``cpsl-profile`` writes and the server reads.

Validation is done with pydantic models (typed records with field paths in their
errors) instead of hand-written checks; on top of the per-field rules, the loader
checks what a schema cannot: layers and cuts agree with each other, and the profile
belongs to the model the caller expects. Every failure is a :class:`ProfileError`
whose one-line message names the file and the field. Field meanings and units are
documented in docs/profile-format.md.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolkit.errors import ProfileError
from toolkit.protocol.bounded_json import DEFAULT_MAX_DEPTH, json_depth

MAX_PROFILE_FILE_BYTES = 4 << 20  # a LeNet profile is 60 KB, a MobileNetV2 one about 400 KB

FORMAT_NAME = "cpsl-profile"
FORMAT_VERSION = 1

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)


class Record(BaseModel):
    model_config = _STRICT


class Stats(Record):
    """Summary of repeated timings, in seconds."""

    median: float = Field(ge=0)
    p10: float = Field(ge=0)
    p90: float = Field(ge=0)
    n: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Stats:
        if not self.p10 <= self.median <= self.p90:
            raise ValueError(f"p10 <= median <= p90 must hold, got {self.p10}, {self.median}, {self.p90}")
        return self


class LayerBatch(Record):
    batch_size: int = Field(ge=1)
    forward_s: Stats
    backward_s: Stats
    saved_bytes: int = Field(ge=0)


class Layer(Record):
    index: int = Field(ge=0)
    name: str = Field(min_length=1)
    type: str
    output_shape: list[int]
    output_bytes_per_sample: int = Field(ge=0)
    param_count: int = Field(ge=0)
    param_bytes: int = Field(ge=0)
    flops_per_sample: int = Field(ge=0)
    batches: list[LayerBatch] = Field(min_length=1)


class CutBatch(Record):
    batch_size: int = Field(ge=1)
    forward_s: Stats
    backward_s: Stats
    optimizer_step_s: Stats
    step_s: Stats
    forward_layer_sum_s: float = Field(ge=0)
    backward_layer_sum_s: float = Field(ge=0)
    saved_bytes: int = Field(ge=0)
    peak_transient_bytes: int = Field(ge=0)
    peak_memory_bytes: int = Field(ge=0)
    onnx_inference_s: Stats | None = None


class OnnxModel(Record):
    file: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=7)
    max_abs_error: float = Field(ge=0)


class Cut(Record):
    cut: int = Field(ge=1)
    after: str
    smashed_shape: list[int]
    smashed_bytes_per_sample: int = Field(ge=1)
    device_param_count: int = Field(ge=0)
    device_param_bytes: int = Field(ge=0)
    optimizer_state_bytes: int = Field(ge=0)
    device_flops_per_sample: int = Field(ge=0)
    server_flops_per_sample: int = Field(ge=0)
    onnx: OnnxModel | None = None
    batches: list[CutBatch] = Field(min_length=1)


class FullModelBatch(Record):
    batch_size: int = Field(ge=1)
    forward_s: Stats
    backward_s: Stats
    step_s: Stats
    peak_transient_bytes: int = Field(ge=0)
    peak_memory_bytes: int = Field(ge=0)


class FullModel(Record):
    param_count: int = Field(ge=0)
    param_bytes: int = Field(ge=0)
    optimizer_state_bytes: int = Field(ge=0)
    flops_per_sample: int = Field(ge=0)
    batches: list[FullModelBatch] = Field(min_length=1)


class ModelInfo(Record):
    name: str = Field(min_length=1)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")
    input_shape: list[int] = Field(min_length=1)
    input_bytes_per_sample: int = Field(ge=1)
    num_layers: int = Field(ge=2)
    layer_names: list[str]


class DeviceInfo(Record):
    id: str = Field(min_length=1)
    board: str
    cpu_model: str
    machine: str
    cores_logical: int = Field(ge=1)
    cores_physical: int | None = Field(default=None, ge=1)
    max_freq_mhz: float | None = Field(default=None, ge=0)
    ram_bytes: int = Field(ge=0)
    os: str
    python: str
    torch: str
    onnxruntime: str | None = None  # None where the onnx extra is not installed
    accelerator: Literal["cpu", "cuda"]
    cuda_device: str | None = None
    threads: int = Field(ge=1)


class Settings(Record):
    batch_sizes: list[int] = Field(min_length=1)
    repeats: int = Field(ge=1)
    warmup: int = Field(ge=0)
    optimizer: str
    dtype: str
    allocator: str
    created_utc: str
    tool_version: str


class Profile(Record):
    format: Literal["cpsl-profile"]
    version: Literal[1]
    model: ModelInfo
    device: DeviceInfo
    settings: Settings
    backward_call_overhead_s: float = Field(ge=0)
    layers: list[Layer]
    cuts: list[Cut]
    full_model: FullModel

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        names = [layer.name for layer in self.layers]
        if names != self.model.layer_names or len(names) != self.model.num_layers:
            raise ValueError("layers do not match model.layer_names")
        for position, layer in enumerate(self.layers):
            if layer.index != position:
                raise ValueError(f"layers[{position}].index is {layer.index}, expected {position}")
        for cut in self.cuts:
            if not 1 <= cut.cut < self.model.num_layers:
                raise ValueError(f"cut {cut.cut} is outside 1..{self.model.num_layers - 1}")
            if cut.after != names[cut.cut - 1]:
                raise ValueError(f"cut {cut.cut}.after is {cut.after!r}, expected {names[cut.cut - 1]!r}")
        return self

    # Lookups the latency model and the CLIs use.
    def cut(self, index: int) -> Cut:
        for cut in self.cuts:
            if cut.cut == index:
                return cut
        raise ProfileError(f"profile has no cut {index}; it has {[c.cut for c in self.cuts]}")


def _field_path(location: tuple) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def parse_profile(data: object, source: str = "profile") -> Profile:
    """Validate already-decoded JSON; raises ProfileError naming the first bad field."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
    if data.get("format") != FORMAT_NAME:
        raise ProfileError(f"{source}: field format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    if data.get("version") != FORMAT_VERSION:
        raise ProfileError(
            f"{source}: field version is {data.get('version')!r}; this cpsl-edge reads version {FORMAT_VERSION}"
        )
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ProfileError(f"{source}: field {_field_path(first['loc'])}: {first['msg']}") from exc


def load_profile(path: str | os.PathLike, expect_fingerprint: str | None = None) -> Profile:
    """Read and validate a profile file; with ``expect_fingerprint``, refuse a profile of another model."""
    source = str(path)
    try:
        with Path(path).open("rb") as handle:  # bounded: a profile path may name /dev/zero or a huge file
            raw = handle.read(MAX_PROFILE_FILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"cannot read profile {source}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_PROFILE_FILE_BYTES:
        raise ProfileError(f"profile {source} is more than {MAX_PROFILE_FILE_BYTES >> 20} MB: not a profile")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"profile {source} is not UTF-8 text") from exc
    try:
        data = json.loads(text)  # NaN parses here, so that the field holding it is named below
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile {source} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
    except RecursionError:
        raise ProfileError(f"profile {source} nests too deep to be a profile") from None
    if json_depth(data) > DEFAULT_MAX_DEPTH:
        raise ProfileError(f"profile {source} nests more than {DEFAULT_MAX_DEPTH} levels deep: not a profile")
    profile = parse_profile(data, source)
    if expect_fingerprint is not None and profile.model.fingerprint != expect_fingerprint:
        raise ProfileError(
            f"{source}: field model.fingerprint is {profile.model.fingerprint} (model {profile.model.name!r}), "
            f"expected {expect_fingerprint}: the profile is for another model"
        )
    return profile


def save_profile(profile: Profile, path: str | os.PathLike) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a profile."""
    target = Path(path)
    data = profile.model_dump(mode="json")
    _check_finite(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_finite(value: object) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("refusing to write a non-finite number into a profile")
    if isinstance(value, dict):
        for item in value.values():
            _check_finite(item)
    elif isinstance(value, list):
        for item in value:
            _check_finite(item)
