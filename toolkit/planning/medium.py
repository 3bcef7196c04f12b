"""Which medium the devices share, decided from probes, and the rate law that models it.

Two media, two rate laws (:mod:`toolkit.planning.rates`):

- ``airtime``: one sender at a time (Wi-Fi). Device n alone moves ``a_n`` bit/s; a share
  of the air time moves that share of ``a_n``. The planner grants transmission slots.
- ``shared``: bytes are shared (a wired or shaped link). Device n is capped at ``a_n``,
  all devices together at a capacity C; transfers overlap for free while they fit. The
  planner lets them overlap (no slots) and predicts them by water-filling.

The evidence is one number per direction. Probe every device alone (rate ``a_n``), then
all of them at once with the same payload (mean rate ``t_n`` over each one's transfer),
and add up the fractions of their solo rates they kept: ``u = sum_n t_n / a_n``; better,
the same from the whole exchange's span, with each payload sized to one solo second
(:func:`detect_medium`).

- On an air-time medium the fractions are fractions of one air time: ``u`` is 1 (under
  DCF every station gets the same throughput ``1 / sum_j (1/a_j)``, and
  ``sum_n (1/a_n) / sum_j (1/a_j) = 1``; with slots it is 1 by construction).
- On a byte-shared medium each device keeps its cap while the sum fits, so ``u`` is n
  with no common bottleneck and lies between 1 and n with one.

The decision threshold is :data:`AIRTIME_MAX_UTILISATION` (1.4): an air-time medium
measures about 1 (per-frame overhead and probe jitter move it by a few percent), while a
byte-shared medium whose capacity exceeds the fastest device's rate by 40% or more is
above it. Below that, a byte-shared medium *is* close to an air-time one (its capacity
is nearly one device's rate, so devices do take turns), and both laws predict alike.
The capacity C of a shared medium is what the devices moved together (all payloads over
the exchange's span, else ``sum_n t_n``), never less than the fastest solo rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from toolkit.planning.rates import LinearRates, RateModel, SharedRates

MediumKind = Literal["airtime", "shared"]
MEDIUM_CHOICES = ("auto", "airtime", "shared")
AIRTIME_MAX_UTILISATION = 1.4


@dataclass(frozen=True)
class MediumEvidence:
    """One direction's verdict and the measurements behind it (logged with the round)."""

    kind: MediumKind
    utilisation: float | None  # solo rates' worth kept together; None when not measured (forced, or one device)
    capacity_bps: float | None  # shared: what the devices moved together
    alone_bps: dict[str, float]
    together_bps: dict[str, float]
    reason: str

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "utilisation": self.utilisation,
            "capacity_bps": self.capacity_bps,
            "alone_bps": dict(self.alone_bps),
            "together_bps": dict(self.together_bps),
            "reason": self.reason,
        }


def detect_medium(
    alone_bps: Mapping[str, float],
    together_bps: Mapping[str, float],
    payload_bits: Mapping[str, float] | None = None,
    span_s: float | None = None,
) -> MediumEvidence:
    """The medium one direction behaves as, from solo and simultaneous probes.

    With ``payload_bits`` (what each device sent in the simultaneous probe) and ``span_s``
    (first send to last arrival), the evidence is the span against the air-time one:
    ``u = sum_n (payload_n / a_n) / span``. Taking turns, the span is the sum of the solo
    times and ``u = 1``; overlapping, it is the longest solo time (or the total over the
    capacity, if that binds), and with payloads sized to equal solo times ``u`` reaches n.
    This is robust where the per-device means are not (a device that started late or
    whose round trip was misjudged skews its own mean, hardly the span), and the
    capacity is then the bits moved over the span. Without them, ``u = sum_n t_n / a_n``.
    """
    devices = sorted(d for d in together_bps if alone_bps.get(d, 0) > 0 and together_bps[d] > 0)
    alone = {d: float(alone_bps[d]) for d in devices}
    together = {d: float(together_bps[d]) for d in devices}
    if len(devices) < 2:
        return MediumEvidence(
            "airtime", None, None, alone, together, "fewer than two devices probed together: the media are alike"
        )
    utilisation, capacity = _utilisation_and_capacity(alone, together, payload_bits, span_s)
    if utilisation <= AIRTIME_MAX_UTILISATION:
        return MediumEvidence(
            "airtime",
            utilisation,
            None,
            alone,
            together,
            f"{len(devices)} devices at once kept {utilisation:.2f} of one device's air time "
            f"(<= {AIRTIME_MAX_UTILISATION}): they take turns",
        )
    return MediumEvidence(
        "shared",
        utilisation,
        capacity,
        alone,
        together,
        f"{len(devices)} devices at once kept {utilisation:.2f} solo rates' worth (> {AIRTIME_MAX_UTILISATION}): "
        f"transfers overlap, {capacity / 1e6:.1f} Mbit/s together",
    )


def _utilisation_and_capacity(
    alone: Mapping[str, float],
    together: Mapping[str, float],
    payload_bits: Mapping[str, float] | None,
    span_s: float | None,
) -> tuple[float, float]:
    """``u`` and the moved capacity over the devices of ``alone`` (see :func:`detect_medium`)."""
    devices = list(alone)
    if payload_bits and span_s and span_s > 0 and all(payload_bits.get(d, 0) > 0 for d in devices):
        utilisation = sum(payload_bits[d] / alone[d] for d in devices) / span_s
        return utilisation, max(sum(payload_bits[d] for d in devices) / span_s, max(alone.values()))
    utilisation = sum(together[d] / alone[d] for d in devices)
    return utilisation, max(sum(together[d] for d in devices), max(alone.values()))


def decide_medium(
    choice: str,
    alone_bps: Mapping[str, float],
    together_bps: Mapping[str, float] | None = None,
    payload_bits: Mapping[str, float] | None = None,
    span_s: float | None = None,
) -> MediumEvidence:
    """``--medium``: ``auto`` follows the probes; a named medium overrides them (and the
    reason says what the probes would have chosen, if there were any)."""
    if choice not in MEDIUM_CHOICES:
        raise ValueError(f"medium {choice!r} is not one of {', '.join(MEDIUM_CHOICES)}")
    evidence = detect_medium(alone_bps, together_bps or {}, payload_bits, span_s)
    if choice == "auto" or choice == evidence.kind:
        return evidence if choice == "auto" else replace(evidence, reason=f"--medium {choice}; {evidence.reason}")
    capacity = evidence.capacity_bps
    if choice == "shared" and capacity is None:
        if evidence.utilisation is not None:  # probed together, read as air time: what they moved
            capacity = _utilisation_and_capacity(evidence.alone_bps, evidence.together_bps, payload_bits, span_s)[1]
        else:
            measured = together_bps or alone_bps
            capacity = max(sum(measured.values()), max(alone_bps.values(), default=0.0)) or None
    kind: MediumKind = "shared" if choice == "shared" else "airtime"
    return replace(
        evidence,
        kind=kind,
        capacity_bps=capacity if kind == "shared" else None,
        reason=f"--medium {choice} (the probes alone would say {evidence.kind}: {evidence.reason})",
    )


def rate_model(evidence: MediumEvidence | None, caps_bps: np.ndarray, stations_send: bool = False) -> RateModel:
    """The rate law for these devices' solo rates (in the planner's device order); air time
    when no medium was decided. ``stations_send``: the devices are the senders (an uplink),
    who contend for air time when nobody schedules them; on a downlink the access point
    sends alone."""
    caps = np.asarray(caps_bps, dtype=float)
    if evidence is None or evidence.kind == "airtime":
        return LinearRates(caps, contention=stations_send)
    capacity = evidence.capacity_bps if evidence.capacity_bps else float(caps.sum())
    return SharedRates(caps, max(capacity, float(caps.max(initial=0.0)), 1.0))
