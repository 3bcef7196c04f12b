"""How uploads become the next model: FedAvg with bounded weights and an outlier check on update norms.

Kept apart from the round loop, as Flower keeps its ``Strategy`` (``aggregate_fit``) apart
from the server: the loop collects uploads, this decides what they are worth.

Two defences against a device that tries to steer the model:

- **Bounded weight.** FedAvg weights an upload by the sample count its sender claims. A
  claim is capped at the count the device registered with, so a device cannot raise its
  weight in a round by claiming more than it declared when it joined.
- **Norm check.** An upload whose update (uploaded weights minus the weights handed out)
  has a norm more than ``norm_factor`` times the median of its reference set is rejected
  and counted. The reference set is the cluster's update norms this turn plus the last
  accepted ones for the same part of the model, so the check also works for clusters of
  one or two devices (SL), where a median of the cluster alone would follow the outlier.

This bounds the damage of one malicious device; it does not make FedAvg Byzantine-robust
(docs/security.md says what it does not stop).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch

from toolkit.training import weighted_average

HISTORY = 32  # accepted update norms remembered per part of the model


@dataclass(frozen=True)
class Upload:
    tensors: dict[str, torch.Tensor]
    claimed_samples: int
    registered_samples: int


@dataclass
class Aggregate:
    state: dict[str, torch.Tensor] | None  # None: nothing usable, keep the weights as they were
    weights: dict[str, float]
    rejected: dict[str, str]  # device -> reason
    norms: dict[str, float]


@dataclass
class BoundedFedAvg:
    norm_factor: float = 10.0
    _history: dict[tuple[str, ...], deque] = field(default_factory=dict)

    def aggregate(self, reference: dict[str, torch.Tensor], uploads: dict[str, Upload]) -> Aggregate:
        """FedAvg of the acceptable uploads, or ``state=None`` when none carries weight."""
        norms = {device: update_norm(reference, upload.tensors) for device, upload in uploads.items()}
        part = tuple(sorted(reference))
        history = self._history.setdefault(part, deque(maxlen=HISTORY))
        rejected: dict[str, str] = {}
        if self.norm_factor > 0 and norms:
            median = statistics.median([*norms.values(), *history])
            for device, norm in norms.items():
                if norm > self.norm_factor * median and norm > 1e-12:
                    rejected[device] = f"update norm {norm:.3g} is over {self.norm_factor:g}x the median {median:.3g}"
        accepted = sorted(d for d in uploads if d not in rejected)
        weights = {d: float(min(uploads[d].claimed_samples, uploads[d].registered_samples)) for d in accepted}
        for device in accepted:
            history.append(norms[device])
        if not accepted or sum(weights.values()) <= 0:
            return Aggregate(None, weights, rejected, norms)
        state = weighted_average([uploads[d].tensors for d in accepted], [weights[d] for d in accepted])
        return Aggregate(state, weights, rejected, norms)


def update_norm(reference: dict[str, torch.Tensor], uploaded: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``uploaded - reference`` over the floating-point tensors (the same keys)."""
    total = 0.0
    for key, before in reference.items():
        if before.is_floating_point():
            total += float(torch.sum((uploaded[key].double() - before.double()) ** 2))
    return math.sqrt(total)
