"""How many rounds a cut needs to reach the target, relative to the others.

Time to accuracy is round latency times rounds, and the cut changes both. In a cluster's
turn the server-side layers take one step per iteration on the cluster's concatenated
batch, as centralised training would; the device-side layers take I local steps on each
member's own batches and are then averaged, as FedAvg does. A later cut hands more of the
network to averaging, and averaging after local steps progresses less per sample than
training on the pooled batch, the more so when the members' data differ.

The estimate (docs/latency-model.md, "Rounds to the target"):

    R(c) = R_0 * (1 + kappa(s) * lambda_c),    kappa(s) = KAPPA_IID + KAPPA_SKEW * s

- ``lambda_c``: the fraction of the model's trainable layers on the device side at cut c
  (layers, not parameters: the weights' share says little about how far averaging slows
  training);
- ``s``: label skew, the mean total-variation distance between each device's label
  histogram and the fleet's (0 for identical histograms, 1 for disjoint ones). The server
  sees every label it trains on, so it measures ``s`` as it goes;
- ``KAPPA_IID`` = 0.05 and ``KAPPA_SKEW`` = 0.93: the joint least-squares fit of
  ``R(c) / R(first cut)`` to the rounds every cut of LeNet-5 and VGG needed to 90% on
  builtin:mnist5k, 8 devices in 2 clusters, IID (s = 0.05) and Dirichlet 0.5 (s = 0.44)
  (bench/results/cut_hindsight/hindsight.json; rms residual 0.10, against 0.15 for no
  rounds term at all). Fitted per scenario, kappa was 0.28 and 0.77 for LeNet-5 (IID,
  Dirichlet), 0.0 and 0.32 for VGG: averaging costs rounds only when the members' data
  differ, and then little -- every cut reached 90% in 5 to 7 rounds. (Before each member
  got its own batch's gradient, ``toolkit.training.server_step``, the device side learned
  k times slower in clusters of k and the same fit gave kappa 3.2: most of what looked
  like the price of averaging was that bug.) Choosing the cut needs only the ratio
  between cuts, so ``R_0`` cancels.

``R_0`` (the rounds if nothing were averaged) matters only for absolute predictions,
which cut selection does not make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from toolkit.planning.costs import ModelCosts

KAPPA_IID = 0.05
KAPPA_SKEW = 0.93


def label_histograms(labels_per_device: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(devices x classes) label counts."""
    return np.array([np.bincount(np.asarray(y, dtype=int), minlength=num_classes) for y in labels_per_device], float)


def label_skew(histograms: np.ndarray) -> float:
    """Mean total-variation distance between each device's label distribution and the fleet's."""
    histograms = np.asarray(histograms, dtype=float)
    rows = histograms[histograms.sum(axis=1) > 0]
    if len(rows) < 2:
        return 0.0
    pooled = rows.sum(axis=0) / rows.sum()
    return float(np.mean(0.5 * np.abs(rows / rows.sum(axis=1, keepdims=True) - pooled).sum(axis=1)))


def kappa(skew: float) -> float:
    return KAPPA_IID + KAPPA_SKEW * min(max(skew, 0.0), 1.0)


def averaged_fraction(costs: ModelCosts, cut: int) -> float:
    """lambda_c: the fraction of trainable layers that sit on the device side at ``cut``."""
    layers = costs.trainable_layers
    if not layers:
        return 0.0
    return sum(1 for index in layers if index < cut) / len(layers)


@dataclass(frozen=True)
class RoundsEstimate:
    cut: int
    averaged_fraction: float
    skew: float
    kappa: float
    relative_rounds: float  # R(c) / R_0

    def to_dict(self) -> dict:
        return {
            "cut": self.cut,
            "averaged_fraction": self.averaged_fraction,
            "skew": self.skew,
            "kappa": self.kappa,
            "relative_rounds": self.relative_rounds,
        }


def estimate_rounds(costs: ModelCosts, cut: int, skew: float) -> RoundsEstimate:
    """R(c) / R_0 for ``cut`` at label skew ``skew``."""
    fraction = averaged_fraction(costs, cut)
    k = kappa(skew)
    return RoundsEstimate(cut, fraction, skew, k, 1.0 + k * fraction)
