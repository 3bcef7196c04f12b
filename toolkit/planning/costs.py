"""What one training step costs, per candidate cut, read from profiles.

The latency model needs, for a batch of B samples at cut l: the device-side forward and
backward (+ optimiser step) times, the server-side forward + backward + step time for the
cluster's k = |cluster| * B samples, the bytes of smashed data, gradients and labels, and
the bytes of the device-side model. All of it is in a ``cpsl-profile`` file; this module
turns it into plain numbers.

Why fit a line over batch sizes: a profile measures a few batch sizes (16 and 64 by
default) while a run uses any B, and the server trains on k = m * B samples. Time per
step is close to affine in the batch (a fixed launch/dispatch cost plus a per-sample
cost), so a least-squares line through the measured points interpolates and extrapolates
better than scaling one point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from toolkit.errors import UserError
from toolkit.profile_format import Profile

LABEL_BYTES_PER_SAMPLE = 8  # labels travel as int64
PARAMETER_FREE_TYPES = ("ReLU", "ReLU6", "Flatten", "Dropout", "Identity", "Sigmoid", "Tanh", "GELU", "SiLU")


@dataclass(frozen=True)
class Affine:
    """``seconds(batch) = fixed_s + per_sample_s * batch``, both non-negative."""

    fixed_s: float
    per_sample_s: float

    def __call__(self, batch: float) -> float:
        return self.fixed_s + self.per_sample_s * batch

    def scaled(self, factor: float) -> Affine:
        return Affine(self.fixed_s * factor, self.per_sample_s * factor)


def fit_affine(points: Sequence[tuple[int, float]]) -> Affine:
    """Least-squares line through (batch, seconds); proportional through one point.

    Constrained to non-negative coefficients: a negative intercept (noise on two close
    points) falls back to a line through the origin, a negative slope to a constant.
    """
    if not points:
        raise ValueError("no (batch, seconds) points to fit")
    if len({batch for batch, _ in points}) == 1:
        batch = points[0][0]
        mean = sum(seconds for _, seconds in points) / len(points)
        return Affine(0.0, mean / batch)
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    var_b = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / var_b
    intercept = mean_t - slope * mean_b
    if slope < 0:
        return Affine(mean_t, 0.0)
    if intercept < 0:
        through_origin = sum(b * t for b, t in points) / sum(b * b for b, _ in points)
        return Affine(0.0, through_origin)
    return Affine(intercept, slope)


@dataclass(frozen=True)
class CutCost:
    """One candidate cut: what crosses the link and what each side computes."""

    cut: int  # number of device-side layers
    name: str  # the last device-side layer
    smashed_bytes_per_sample: int
    device_model_bytes: int
    device_forward: Affine  # reference device, seconds for a batch
    device_backward: Affine  # backward + optimiser step, reference device
    server_step: Affine  # server forward + backward + step for its layers, server profile

    def uplink_bytes(self, batch: int) -> int:
        """Smashed data and labels of one mini-batch."""
        return batch * (self.smashed_bytes_per_sample + LABEL_BYTES_PER_SAMPLE)

    def downlink_bytes(self, batch: int) -> int:
        """The gradient of the loss with respect to the smashed data."""
        return batch * self.smashed_bytes_per_sample


@dataclass(frozen=True)
class ModelCosts:
    """Per-cut costs of one model, plus the whole-model (FL) step."""

    model: str
    fingerprint: str
    cuts: tuple[CutCost, ...]
    full_model_bytes: int
    full_step: Affine  # reference device, whole model forward + backward + step
    trainable_layers: tuple[int, ...] = ()  # indices of the layers with parameters

    def cut(self, cut: int) -> CutCost:
        for candidate in self.cuts:
            if candidate.cut == cut:
                return candidate
        names = ", ".join(f"{c.cut}:{c.name}" for c in self.cuts)
        raise UserError(f"cut {cut} is not a candidate cut of {self.model} (candidates: {names})")

    def resolve(self, cut: int | str) -> CutCost:
        """A cut by its number of device layers or by the name of its last device layer."""
        if isinstance(cut, str) and not cut.isdigit():
            for candidate in self.cuts:
                if candidate.name == cut:
                    return candidate
            names = ", ".join(c.name for c in self.cuts)
            raise UserError(f"cut {cut!r} is not a candidate cut of {self.model} (candidates: {names})")
        return self.cut(int(cut))

    def middle_cut(self) -> CutCost:
        """The baselines' fixed cut: the middle candidate."""
        return self.cuts[(len(self.cuts) - 1) // 2]


def _layer_time(layer_batches: Sequence, attribute: str) -> Affine:
    return fit_affine([(b.batch_size, getattr(b, attribute).median) for b in layer_batches])


def candidate_cuts(profile: Profile) -> list[int]:
    """Cuts worth considering: a cut after a parameter-free layer that does not shrink the
    smashed data (ReLU, Flatten, ...) costs the same traffic as the cut before it and only
    moves a cheap layer; it is skipped (CPSL.md, "candidate set")."""
    keep: list[int] = []
    previous_bytes = None
    for cut in profile.cuts:
        layer = profile.layers[cut.cut - 1]
        duplicate = (
            previous_bytes == cut.smashed_bytes_per_sample
            and layer.param_count == 0
            and layer.type in PARAMETER_FREE_TYPES
        )
        if not duplicate:
            keep.append(cut.cut)
        previous_bytes = cut.smashed_bytes_per_sample
    return keep


def full_step(profile: Profile) -> Affine:
    """The whole-model training step (forward + backward + optimiser) against batch size."""
    return fit_affine([(b.batch_size, b.step_s.median) for b in profile.full_model.batches])


def relative_speed(profile: Profile, reference: Profile, batch: int) -> float:
    """A device's compute speed relative to ``reference``: the ratio of whole-model step times."""
    return full_step(reference)(batch) / full_step(profile)(batch)


def model_costs(
    device_profile: Profile, server_profile: Profile | None = None, cuts: Sequence[int] | None = None
) -> ModelCosts:
    """Costs of every candidate cut from a device profile (the reference device) and the
    server's own profile of the same model (defaults to the device profile).

    Server time of cut l for k samples: the sum over layers l+1..L of the layers' forward
    and backward lines, plus the autograd start-up cost once, plus the server's share of
    the whole-model optimiser step (by parameter bytes).
    """
    server_profile = server_profile or device_profile
    if server_profile.model.fingerprint != device_profile.model.fingerprint:
        raise UserError(
            f"server profile is of model {server_profile.model.name} ({server_profile.model.fingerprint}), "
            f"device profile of {device_profile.model.name} ({device_profile.model.fingerprint})"
        )
    chosen = list(cuts) if cuts is not None else candidate_cuts(device_profile)
    layer_lines = [
        (_layer_time(layer.batches, "forward_s"), _layer_time(layer.batches, "backward_s"))
        for layer in server_profile.layers
    ]
    full = server_profile.full_model
    optimizer = fit_affine(
        [(b.batch_size, max(0.0, b.step_s.median - b.forward_s.median - b.backward_s.median)) for b in full.batches]
    )
    overhead = server_profile.backward_call_overhead_s
    total_param_bytes = max(1, full.param_bytes)

    costs = []
    for number in chosen:
        cut = device_profile.cut(number)
        device_forward = fit_affine([(b.batch_size, b.forward_s.median) for b in cut.batches])
        device_backward = fit_affine(
            [(b.batch_size, b.backward_s.median + b.optimizer_step_s.median) for b in cut.batches]
        )
        server_layers = layer_lines[number:]
        server_share = (full.param_bytes - server_profile.cut(number).device_param_bytes) / total_param_bytes
        server_step = Affine(
            sum(f.fixed_s + b.fixed_s for f, b in server_layers) + overhead + optimizer.fixed_s * server_share,
            sum(f.per_sample_s + b.per_sample_s for f, b in server_layers) + optimizer.per_sample_s * server_share,
        )
        costs.append(
            CutCost(
                cut=number,
                name=cut.after,
                smashed_bytes_per_sample=cut.smashed_bytes_per_sample,
                device_model_bytes=cut.device_param_bytes,
                device_forward=device_forward,
                device_backward=device_backward,
                server_step=server_step,
            )
        )
    return ModelCosts(
        model=device_profile.model.name,
        fingerprint=device_profile.model.fingerprint,
        cuts=tuple(costs),
        full_model_bytes=device_profile.full_model.param_bytes,
        full_step=full_step(device_profile),
        trainable_layers=tuple(layer.index for layer in device_profile.layers if layer.param_count > 0),
    )
