"""Where to cut a model for inference: the lowest predicted end-to-end latency, Neurosurgeon-style
(Kang et al., ASPLOS 2017), with the device-only and server-only extremes among the candidates.

Pure functions of measured numbers, no network and no model:

    latency(cut) = head_s(cut) + encode_s(cut)                                   on the device
                 + base_s + wire_bytes(cut) / up_bytes_per_s                     the request, the reply
                 + server_s(cut)                                                 the rest of the model

for a cut 0 < cut < L and for cut 0 (the raw inputs go up, ``head_s`` = 0), and
``latency(L) = head_s(L)`` for the whole model on the device (nothing crosses the link).
``head_s`` and ``encode_s`` are measured on the device on its own heads (onnxruntime) and its own
inputs, ``wire_bytes`` is the size of the encoded request frame, ``server_s`` is what the service
announces it measured for its part, and the link (``base_s``, ``up_bytes_per_s``) is fitted to
the device's own requests (:mod:`toolkit.inference.link`). The reply (a few logits) is small and
the same size at every cut, so it sits in ``base_s``.

A prediction is where nothing better is known. Once requests at a cut have been timed end to
end, their median stands for that cut (``observed``): on a board under a CPU quota, or beside
other work, what a request really costs includes stalls no per-part timing sees, and the
client confirms its shortlist of predicted-best cuts with real requests before it settles.
The cuts not confirmed keep their prediction scaled by how far off the model was on the
confirmed ones (the median of observed over predicted among the networked cuts), so an
optimistic model does not make an unconfirmed cut look better than one that was measured.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CutCost:
    """What a cut costs apart from the link: ``server_s`` None means device-only (nothing is sent)."""

    cut: int
    head_s: float
    encode_s: float = 0.0
    wire_bytes: float = 0.0
    server_s: float | None = None

    @property
    def device_only(self) -> bool:
        return self.server_s is None


@dataclass(frozen=True)
class Link:
    base_s: float  # a request's fixed cost: the broker's two hops, the reply, the frames' handling
    up_bytes_per_s: float  # math.inf: bytes cost nothing measurable


@dataclass(frozen=True)
class Choice:
    cut: int
    predicted_s: float
    table: tuple[tuple[int, float], ...]  # every candidate's prediction, in cut order


def predict(cost: CutCost, link: Link | None) -> float:
    """Predicted seconds for one request at ``cost.cut``; inf for a networked cut without a link."""
    device = cost.head_s + cost.encode_s
    if cost.device_only:
        return device
    if link is None:
        return math.inf
    transfer = 0.0 if math.isinf(link.up_bytes_per_s) else cost.wire_bytes / link.up_bytes_per_s
    return device + link.base_s + transfer + cost.server_s


def choose(costs: Sequence[CutCost], link: Link | None, observed: Mapping[int, float] | None = None) -> Choice:
    """The candidate with the lowest latency -- observed where requests were timed, predicted
    elsewhere; on a tie the one that keeps more layers on the device (less of the input's
    information leaves it)."""
    if not costs:
        raise ValueError("no candidate cut")
    seen = observed or {}
    bias = model_bias(costs, link, seen)
    table = tuple(
        sorted(
            (
                cost.cut,
                seen[cost.cut] if cost.cut in seen else predict(cost, link) * (1.0 if cost.device_only else bias),
            )
            for cost in costs
        )
    )
    cut, best = min(table, key=lambda item: (item[1], -item[0]))
    return Choice(cut, best, table)


def model_bias(costs: Sequence[CutCost], link: Link | None, observed: Mapping[int, float]) -> float:
    """Median of observed / predicted over the networked cuts with both (1.0 without any)."""
    ratios = []
    for cost in costs:
        predicted = predict(cost, link)
        if not cost.device_only and cost.cut in observed and 0 < predicted < math.inf:
            ratios.append(observed[cost.cut] / predicted)
    return statistics.median(ratios) if ratios else 1.0


def shortlist(costs: Sequence[CutCost], link: Link | None, size: int) -> list[int]:
    """The ``size`` candidates predicted fastest, and the device-only one (it costs no request)."""
    ranked = sorted(costs, key=lambda cost: (predict(cost, link), -cost.cut))
    picked = [cost.cut for cost in ranked[:size]]
    picked += [cost.cut for cost in costs if cost.device_only and cost.cut not in picked]
    return picked


def interpolate(batch_sizes: Sequence[int], seconds: Sequence[float], batch: int) -> float:
    """Seconds at ``batch`` from measurements at ``batch_sizes``: piecewise linear between them,
    proportional to the batch beyond the largest, the smallest's below it."""
    points = sorted(zip(batch_sizes, seconds, strict=True))
    if not points:
        raise ValueError("no measurement")
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, s0), (b1, s1) in itertools.pairwise(points):
        if batch <= b1:
            return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)
    last_batch, last_s = points[-1]
    return last_s * batch / last_batch
