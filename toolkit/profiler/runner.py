"""Measuring a layered model on this hardware: per layer, per candidate cut, and the whole model.

For each batch size the runner measures
- every layer alone: forward and backward time, and the bytes it saves for backward;
- every cut's device-side part as a whole: forward, backward from a smashed-data
  gradient, optimizer step and the full training step, with the per-layer sums
  beside them so the latency model's additivity can be checked; the peak memory of
  one step; the onnxruntime inference time of its exported ONNX file;
- the whole model's training step, which is what FL costs a device.

It works on a private copy of the model, so profiling never changes the caller's
weights, and reports progress through a callback so it stays free of any UI.
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit import profile_format as pf
from toolkit.allocator import pin_malloc_thresholds
from toolkit.errors import UserError
from toolkit.models.layered import LayeredModel
from toolkit.profiler.device_info import describe_device, tool_version
from toolkit.profiler.flops import count_forward_flops, reference_forward_flops
from toolkit.profiler.memory import peak_transient_bytes, saved_tensor_bytes
from toolkit.profiler.timing import no_sync, shifted, summarize, time_phases

# Learning rate 0: the optimizer does all of its arithmetic (momentum, moments, the update)
# but the weights never move. With a real rate, 35 steps along the same synthetic gradient
# drifted the weights until half the activations were zero, and data-dependent kernels
# (max-pooling) then ran 2x faster than on real data.
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.0, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.0),
}


@dataclass
class ProfileRequest:
    model: LayeredModel
    batch_sizes: list[int]
    repeats: int = 30
    warmup: int = 5
    passes: int = 3
    threads: int | None = None
    device_id: str | None = None
    onnx_dir: Path | None = None
    profile_dir: Path | None = None  # ONNX paths in the profile are written relative to it
    cuts: list[int] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # toolkit.devices.resolve_device
    optimizer: str = "sgd"
    seed: int = 0
    notes: list[str] = field(default_factory=list)  # filled with warnings worth showing the user

    def selected_cuts(self) -> list[int]:
        return sorted(set(self.cuts)) if self.cuts else self.model.candidate_cuts()

    def planned_steps(self) -> int:
        per_batch = (self.model.num_layers + len(self.selected_cuts()) + 1) * self.passes
        exports = len(self.selected_cuts()) if self.onnx_dir is not None else 0
        return exports + per_batch * len(self.batch_sizes)


def _param_bytes(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def _zero_grads(module: nn.Module, *tensors: torch.Tensor) -> None:
    for parameter in module.parameters():
        parameter.grad = None
    for tensor in tensors:
        tensor.grad = None


class _Measurer:
    """Holds what every measurement shares (repeats, warm-up, device, sync) and pools samples across passes.

    The repeats are split over several passes through all measurements of a batch size,
    and each measurement's samples are pooled over the passes. A burst of interference
    from outside (another process, the hypervisor) then touches a fraction of every
    measurement's samples, where the median ignores it, instead of all samples of
    whichever measurement ran at that moment. Every pass makes the same calls in the
    same order, so a call's position within its pass identifies the measurement.
    """

    def __init__(self, request: ProfileRequest, device: torch.device) -> None:
        self.passes = request.passes
        self.repeats_per_pass = math.ceil(request.repeats / request.passes)
        self.warmup = request.warmup
        self.placement = device
        self.sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else no_sync
        self._pooled: dict[int, list[np.ndarray]] = {}
        self._position = 0
        self.final_pass = True

    def begin_pass(self, number: int) -> None:
        self._position = 0
        self.final_pass = number == self.passes - 1
        if number == 0:
            self._pooled.clear()

    def phases(self, phases: list[Callable], setup: Callable | None = None) -> tuple[list[pf.Stats], pf.Stats]:
        """Stats per phase and for the whole run (the per-run sum of the phases), over all passes so far."""
        samples = time_phases(phases, repeats=self.repeats_per_pass, warmup=self.warmup, setup=setup, sync=self.sync)
        pooled = self._pooled.setdefault(self._position, [])
        self._position += 1
        pooled.append(samples)
        everything = np.concatenate(pooled)
        return [summarize(column) for column in everything.T], summarize(everything.sum(axis=1))

    def backward_call_overhead(self) -> float:
        """Fixed cost of starting one backward pass (autograd engine start-up), in seconds.

        Timing a layer alone pays it once per layer; a device-side part pays it once in
        all. Per-layer backward times are stored without it so that their sum plus one
        overhead predicts a part's backward time.
        """
        leaf = torch.ones(1, device=self.placement, requires_grad=True)
        seed = torch.ones(1, device=self.placement)
        samples = time_phases(
            [lambda out: out.backward(seed)], repeats=100, warmup=10, setup=lambda: leaf * 2, sync=self.sync
        )
        return float(np.median(samples))


def run_profile(request: ProfileRequest, on_step: Callable[[str], None] = lambda _: None) -> pf.Profile:
    """Measure ``request.model`` and return the validated profile (not yet written anywhere).

    The caller's torch thread count and random state are as they were afterwards: the
    profile's threads and seed hold for the measurement only (an agent profiles, then trains)."""
    if request.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {request.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    device = request.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("profiling on CUDA was asked for, but torch sees no CUDA device")
    threads_before = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _measure(request, on_step)
    finally:
        torch.set_num_threads(threads_before)


def _measure(request: ProfileRequest, on_step: Callable[[str], None]) -> pf.Profile:
    device = request.device
    allocator = pin_malloc_thresholds()
    threads = request.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(request.seed)

    model = request.model
    net = copy.deepcopy(model.net).to(device).train()
    measurer = _Measurer(request, device)
    overhead = measurer.backward_call_overhead()
    cuts = request.selected_cuts()
    layers_static = _layer_statics(net, model, request.notes)
    exports = _export_cuts(net, model, cuts, request, threads, on_step) if request.onnx_dir else {}

    layer_batches: list[list[pf.LayerBatch]] = [[] for _ in range(model.num_layers)]
    cut_batches: dict[int, list[pf.CutBatch]] = {cut: [] for cut in cuts}
    full_batches: list[pf.FullModelBatch] = []
    for batch_size in request.batch_sizes:
        x = torch.randn(batch_size, *model.input_shape, device=device)
        _reach_steady_state(net, x, request)
        for number in range(request.passes):  # only the last pass's records are kept: they pool all passes
            measurer.begin_pass(number)
            per_layer = _measure_layers(net, x, measurer, overhead, on_step)
            per_cut = []
            for cut in cuts:
                on_step(f"batch {batch_size}: cut {cut} ({model.cut_name(cut)})")
                session = exports[cut].session if cut in exports else None
                per_cut.append(_measure_cut(net, cut, x, per_layer, overhead, measurer, request, session))
            on_step(f"batch {batch_size}: whole model (FL)")
            full = _measure_full_model(net, x, measurer, request)
        for index, entry in enumerate(per_layer):
            layer_batches[index].append(entry)
        for cut, entry in zip(cuts, per_cut, strict=True):
            cut_batches[cut].append(entry)
        full_batches.append(full)

    flops = [entry["flops"] for entry in layers_static]
    cut_records = []
    for cut in cuts:
        device_part = net[:cut]
        count, size = _param_bytes(device_part)
        optimizer = OPTIMIZERS[request.optimizer](list(device_part.parameters()))
        cut_records.append(
            pf.Cut(
                cut=cut,
                after=model.cut_name(cut),
                smashed_shape=layers_static[cut - 1]["shape"],
                smashed_bytes_per_sample=layers_static[cut - 1]["bytes"],
                device_param_count=count,
                device_param_bytes=size,
                optimizer_state_bytes=_probe_optimizer_state(device_part, optimizer, model, device),
                device_flops_per_sample=sum(flops[:cut]),
                server_flops_per_sample=sum(flops[cut:]),
                onnx=_onnx_record(exports.get(cut), request),
                batches=cut_batches[cut],
            )
        )
    full_count, full_size = _param_bytes(net)
    full_optimizer = OPTIMIZERS[request.optimizer](list(net.parameters()))
    return pf.Profile(
        format=pf.FORMAT_NAME,
        version=pf.FORMAT_VERSION,
        model=pf.ModelInfo(
            name=model.name,
            fingerprint=model.fingerprint(),
            input_shape=list(model.input_shape),
            input_bytes_per_sample=math.prod(model.input_shape) * 4,
            num_layers=model.num_layers,
            layer_names=model.layer_names,
        ),
        device=describe_device(request.device_id, threads, device),
        backward_call_overhead_s=overhead,
        settings=pf.Settings(
            batch_sizes=list(request.batch_sizes),
            repeats=request.repeats,
            warmup=request.warmup,
            optimizer=request.optimizer,
            dtype="float32",
            allocator=allocator,
            created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            tool_version=tool_version(),
        ),
        layers=[
            pf.Layer(
                index=index,
                name=name,
                type=type(net[index]).__name__,
                output_shape=layers_static[index]["shape"],
                output_bytes_per_sample=layers_static[index]["bytes"],
                param_count=layers_static[index]["param_count"],
                param_bytes=layers_static[index]["param_bytes"],
                flops_per_sample=flops[index],
                batches=layer_batches[index],
            )
            for index, name in enumerate(model.layer_names)
        ],
        cuts=cut_records,
        full_model=pf.FullModel(
            param_count=full_count,
            param_bytes=full_size,
            optimizer_state_bytes=_probe_optimizer_state(net, full_optimizer, model, device),
            flops_per_sample=sum(flops),
            batches=full_batches,
        ),
    )


def _layer_statics(net: nn.Sequential, model: LayeredModel, notes: list[str]) -> list[dict]:
    """Shapes, output bytes, parameters and FLOPs per layer, from one sample."""
    statics = []
    x = torch.zeros(1, *model.input_shape, device=next(net.parameters()).device)
    for index, layer in enumerate(net):
        flops = count_forward_flops(layer, x)
        reference = reference_forward_flops(layer, x)
        if reference > flops * 1.01:
            notes.append(
                f"layer {model.layer_names[index]}: FlopCounterMode counts {reference} FLOPs per sample, "
                f"our count sees {flops} (ops other than conv/linear are not counted)"
            )
        with torch.no_grad():
            x = layer(x)
        count, size = _param_bytes(layer)
        statics.append(
            {
                "shape": list(x.shape[1:]),
                "bytes": x[0].numel() * x.element_size(),
                "param_count": count,
                "param_bytes": size,
                "flops": flops,
            }
        )
    return statics


def _reach_steady_state(net: nn.Sequential, x: torch.Tensor, request: ProfileRequest) -> None:
    """Run whole training steps at this batch size before timing anything.

    The first allocations of large activation buffers are slow (glibc serves them with
    fresh mmaps, and raises its threshold only after frees; thread pools and caches
    warm up), which would otherwise inflate whichever measurement happens to come
    first. A device in training runs in this steady state, so that is what we measure.
    """
    optimizer = OPTIMIZERS[request.optimizer](list(net.parameters()))
    snapshot = copy.deepcopy(net.state_dict())
    for _ in range(max(3, 2 * request.warmup)):
        optimizer.zero_grad(set_to_none=True)
        net(x).sum().backward()
        optimizer.step()
    net.load_state_dict(snapshot)
    _zero_grads(net)


def _measure_layers(
    net: nn.Sequential,
    x: torch.Tensor,
    measurer: _Measurer,
    overhead: float,
    on_step: Callable[[str], None],
) -> list[pf.LayerBatch]:
    """Each layer alone, fed the activations the layers before it produce, as in training."""
    results = []
    trainable_upstream = False  # in the chain, a layer's input needs a gradient iff a layer before it trains
    current = x
    for index, layer in enumerate(net):
        on_step(f"batch {x.shape[0]}: layer {index + 1}/{len(net)}")
        layer_input = current.detach().requires_grad_(trainable_upstream)
        trains = trainable_upstream or any(p.requires_grad for p in layer.parameters())
        results.append(_measure_one_layer(layer, layer_input, trains, measurer, overhead))
        with torch.no_grad():
            current = layer(layer_input)
        trainable_upstream = trains
    return results


def _measure_one_layer(
    layer: nn.Module, layer_input: torch.Tensor, trains: bool, measurer: _Measurer, overhead: float
) -> pf.LayerBatch:
    if trains:
        with torch.no_grad():
            grad_out = torch.ones_like(layer(layer_input))
        (forward, backward), _ = measurer.phases(
            [lambda _: layer(layer_input), lambda out: out.backward(grad_out)],
            setup=lambda: _zero_grads(layer, layer_input),
        )
        backward = shifted(backward, overhead)
    else:  # nothing before or in this layer trains: backward never reaches it
        (forward,), _ = measurer.phases([lambda _: layer(layer_input)])
        backward = pf.Stats(median=0.0, p10=0.0, p90=0.0, n=forward.n)
    saved = saved_tensor_bytes(lambda: layer(layer_input), list(layer.parameters())) if measurer.final_pass else 0
    return pf.LayerBatch(batch_size=layer_input.shape[0], forward_s=forward, backward_s=backward, saved_bytes=saved)


def _measure_cut(
    net: nn.Sequential,
    cut: int,
    x: torch.Tensor,
    per_layer: list[pf.LayerBatch],
    overhead: float,
    measurer: _Measurer,
    request: ProfileRequest,
    session: object | None,
) -> pf.CutBatch:
    """One device-side training step at this cut: forward, backward from the smashed gradient, update."""
    device_part = net[:cut]
    optimizer = OPTIMIZERS[request.optimizer](list(device_part.parameters()))
    with torch.no_grad():
        smashed_grad = torch.ones_like(device_part(x))

    def forward(_: object) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        return device_part(x)

    def train_step() -> None:
        forward(None).backward(smashed_grad)
        optimizer.step()

    (forward_s, backward_s, optimizer_s), step_s = measurer.phases(
        [forward, lambda smashed: smashed.backward(smashed_grad), lambda _: optimizer.step()]
    )
    if not measurer.final_pass:  # the byte counts are deterministic: measure them once
        saved = transient = 0
    else:
        saved = saved_tensor_bytes(lambda: device_part(x), list(device_part.parameters()))
        transient = peak_transient_bytes(train_step, measurer.placement)
    resident = (
        _param_bytes(device_part)[1]
        + _optimizer_state_bytes(optimizer)
        + x.numel() * x.element_size()
        + smashed_grad.numel() * smashed_grad.element_size()
    )
    onnx_latency = None
    if session is not None:
        feed = {"input": x.detach().cpu().numpy()}
        (onnx_latency,), _ = measurer.phases([lambda _: session.run(None, feed)])
    return pf.CutBatch(
        batch_size=x.shape[0],
        forward_s=forward_s,
        backward_s=backward_s,
        optimizer_step_s=optimizer_s,
        step_s=step_s,
        forward_layer_sum_s=sum(entry.forward_s.median for entry in per_layer[:cut]),
        backward_layer_sum_s=overhead + sum(entry.backward_s.median for entry in per_layer[:cut]),
        saved_bytes=saved,
        peak_transient_bytes=transient,
        peak_memory_bytes=resident + transient,
        onnx_inference_s=onnx_latency,
    )


def _measure_full_model(
    net: nn.Sequential, x: torch.Tensor, measurer: _Measurer, request: ProfileRequest
) -> pf.FullModelBatch:
    """The whole model's training step on this device: what one FL iteration costs."""
    with torch.no_grad():
        classes = net(x[:1]).shape[1]
    labels = torch.randint(0, classes, (x.shape[0],), device=x.device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = OPTIMIZERS[request.optimizer](list(net.parameters()))

    def forward(_: object) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        return loss_fn(net(x), labels)

    def train_step() -> None:
        forward(None).backward()
        optimizer.step()

    (forward_s, backward_s, _), step_s = measurer.phases(
        [forward, lambda loss: loss.backward(), lambda _: optimizer.step()]
    )
    transient = peak_transient_bytes(train_step, measurer.placement) if measurer.final_pass else 0
    resident = _param_bytes(net)[1] + _optimizer_state_bytes(optimizer) + x.numel() * x.element_size()
    return pf.FullModelBatch(
        batch_size=x.shape[0],
        forward_s=forward_s,
        backward_s=backward_s,
        step_s=step_s,
        peak_transient_bytes=transient,
        peak_memory_bytes=resident + transient,
    )


def _probe_optimizer_state(
    part: nn.Module, optimizer: torch.optim.Optimizer, model: LayeredModel, device: torch.device
) -> int:
    """Bytes of optimizer state after one step, measured rather than assumed (momentum, Adam moments)."""
    if not any(p.requires_grad for p in part.parameters()):
        return 0
    snapshot = copy.deepcopy(part.state_dict())
    out = part(torch.zeros(1, *model.input_shape, device=device))
    out.backward(torch.ones_like(out))
    optimizer.step()
    size = _optimizer_state_bytes(optimizer)
    part.load_state_dict(snapshot)
    _zero_grads(part)
    return size


def _export_cuts(
    net: nn.Sequential,
    model: LayeredModel,
    cuts: list[int],
    request: ProfileRequest,
    threads: int,
    on_step: Callable[[str], None],
) -> dict:
    assert request.onnx_dir is not None
    from toolkit.profiler.onnx_export import export_submodel  # onnx is optional on a board: only here

    example = torch.randn(2, *model.input_shape)
    results = {}
    for cut in cuts:
        on_step(f"ONNX export: cut {cut} ({model.cut_name(cut)})")
        filename = f"{_safe(model.name)}_cut{cut:02d}_{_safe(model.cut_name(cut))}.onnx"
        results[cut] = export_submodel(net[:cut], example, request.onnx_dir / filename, threads)
    return results


def _safe(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)
    return keep.strip("_") or "model"


def _onnx_record(result: object | None, request: ProfileRequest) -> pf.OnnxModel | None:
    if result is None:
        return None
    base = request.profile_dir or Path.cwd()
    file = os.path.relpath(result.path.resolve(), base.resolve())
    from toolkit.profiler.onnx_export import OPSET

    return pf.OnnxModel(file=file, sha256=result.sha256, opset=OPSET, max_abs_error=result.max_abs_error)


def relative_error(measured: float, predicted: float) -> float:
    """|predicted - measured| / measured, the figure the additivity check reports."""
    return abs(predicted - measured) / measured if measured > 0 else float(np.inf if predicted else 0.0)
