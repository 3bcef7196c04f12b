"""Dividing the medium inside a cluster: optimal shares, and the slots that realise them.

One *phase* of a cluster iteration is: every device n is busy for ``lead_n`` seconds
before it can send (its forward pass), sends ``bits_n``, and is busy ``tail_n`` seconds
after receiving (its backward pass). With shares x_n of the medium (sum <= 1) device n
finishes at ``lead_n + bits_n / r_n(x_n) + tail_n``. :func:`allocate_shares` minimises
the latest finish.

Why bisection on the finish time is exact: the share device n needs to finish by T,
x_n(T), is continuous and strictly decreasing in T, so sum_n x_n(T) = 1 has exactly one
root T*, and at the optimum every device that sends finishes at T* (if one finished
earlier, its surplus share could speed up the last one). Root-finding uses Brent's
method (bracketed, so it keeps bisection's guarantee and converges faster).

:func:`slot_schedule` turns a plan into air-time slots for a real shared link (one
sender at a time, each at its full rate). With linear rates, sending in order of ready
time (uplink) or of longest remaining work (downlink, Jackson's rule) ends every device by
T*: for the devices ready at or after time a, sum d_n = sum x_n (T* - lead_n) <= T* - a,
so no suffix of the queue overruns (docs/latency-model.md gives the proof).

:func:`concurrent_phase` is what happens with no plan at all: every device sends as soon
as it is ready and the medium shares itself (:meth:`RateModel.concurrent_bps`: equal
throughput under Wi-Fi's DCF, water-filling on a byte-shared link), simulated event by
event as devices start and finish. It predicts the schemes that run without slots, and
cpsl on a byte-shared medium, where overlapping transfers is the better plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from toolkit.planning.rates import RateModel

BATCH_RELATIVE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class PhasePlan:
    """Shares of one phase, and when it ends (seconds from the phase start)."""

    devices: np.ndarray  # global device indices
    shares: np.ndarray
    finish_s: float  # the phase's latency: the latest device finish
    device_finish_s: np.ndarray


def _as_array(value: float | np.ndarray, size: int) -> np.ndarray:
    array = np.asarray(value, dtype=float)
    return np.full(size, float(array)) if array.ndim == 0 else array.astype(float)


def _finish_times(rates: RateModel, devices, shares, bits, busy) -> np.ndarray:
    rate = rates.rate_bps(shares, devices)
    with np.errstate(divide="ignore", invalid="ignore"):
        transfer = np.where(bits > 0, bits / rate, 0.0)
    return busy + transfer


def _phase_inputs(
    devices: np.ndarray, bits: float | np.ndarray, lead: float | np.ndarray, tail: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Device indices, bits per device and each device's busy (non-transfer) time, as arrays."""
    devices = np.asarray(devices, dtype=int)
    size = len(devices)
    return devices, _as_array(bits, size), _as_array(lead, size) + _as_array(tail, size)


def allocate_shares(
    rates: RateModel,
    devices: np.ndarray,
    bits: float | np.ndarray,
    lead: float | np.ndarray = 0.0,
    tail: float | np.ndarray = 0.0,
) -> PhasePlan:
    """The min-max share allocation of one phase (see the module docstring)."""
    devices, bits, busy = _phase_inputs(devices, bits, lead, tail)
    size = len(devices)
    if size == 0:
        return PhasePlan(devices, np.zeros(0), 0.0, np.zeros(0))
    active = bits > 0
    if not active.any():
        return PhasePlan(devices, np.zeros(size), float(busy.max()), busy.copy())
    on = devices[active]
    on_bits, on_busy = bits[active], busy[active]
    count = len(on)

    def excess(finish: float) -> float:
        return float(np.sum(rates.share_for(on_bits, finish - on_busy, on))) - 1.0

    solo = on_busy + on_bits / rates.capacity_bps(on)
    low = float(solo.max())  # nobody finishes before its own time with the whole medium
    high = float(np.max(on_busy + on_bits / rates.rate_bps(np.full(count, 1.0 / count), on)))  # equal shares
    if excess(low) <= 0 or count == 1:
        finish = low
    elif excess(high) >= 0:
        finish = high
    else:
        # the root is found to ~1e-15 relative; normalising the shares below makes the
        # plan feasible exactly, and the reported finish is recomputed from those shares
        finish = brentq(excess, low, high, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=200)
    idle_finish = float(busy[~active].max()) if (~active).any() else 0.0
    finish = max(finish, idle_finish)
    shares = np.zeros(size)
    needed = rates.share_for(on_bits, finish - on_busy, on)
    total = float(needed.sum())
    shares[active] = needed / total if total > 0 else 1.0 / count  # any spare share goes to senders
    device_finish = _finish_times(rates, devices, shares, bits, busy)
    return PhasePlan(devices, shares, float(max(finish, device_finish.max())), device_finish)


def equal_shares(
    rates: RateModel,
    devices: np.ndarray,
    bits: float | np.ndarray,
    lead: float | np.ndarray = 0.0,
    tail: float | np.ndarray = 0.0,
) -> PhasePlan:
    """The baseline without resource management: every sender gets 1/(number of senders)."""
    devices, bits, busy = _phase_inputs(devices, bits, lead, tail)
    if len(devices) == 0:
        return PhasePlan(devices, np.zeros(0), 0.0, np.zeros(0))
    active = bits > 0
    shares = np.where(active, 1.0 / max(1, int(active.sum())), 0.0)
    device_finish = _finish_times(rates, devices, shares, bits, busy)
    return PhasePlan(devices, shares, float(device_finish.max()), device_finish)


def concurrent_phase(
    rates: RateModel,
    devices: np.ndarray,
    bits: float | np.ndarray,
    lead: float | np.ndarray = 0.0,
    tail: float | np.ndarray = 0.0,
) -> PhasePlan:
    """Everyone sends when ready; the medium shares itself among the senders of the moment.

    Between two events (a device becoming ready, a transfer ending) the set of senders is
    fixed and so are their rates, so the phase is exact in at most 2n steps. ``shares``
    reports each device's mean rate over its transfer as a fraction of its capacity.
    """
    devices = np.asarray(devices, dtype=int)
    size = len(devices)
    bits = _as_array(bits, size)
    lead = _as_array(lead, size)
    tail = _as_array(tail, size)
    if size == 0:
        return PhasePlan(devices, np.zeros(0), 0.0, np.zeros(0))
    left = bits.copy()
    done = np.where(bits > 0, np.inf, lead)
    clock = float(lead[bits > 0].min()) if (bits > 0).any() else 0.0
    for _ in range(2 * size + 1):
        sending = np.flatnonzero((left > 0) & (lead <= clock))
        waiting = np.flatnonzero((left > 0) & (lead > clock))
        if sending.size == 0:
            if waiting.size == 0:
                break
            clock = float(lead[waiting].min())
            continue
        rate = rates.concurrent_bps(devices[sending])
        step = float(np.min(left[sending] / rate))
        if waiting.size:
            step = min(step, float(lead[waiting].min()) - clock)
        left[sending] -= rate * step
        clock += step
        ended = sending[left[sending] <= bits[sending] * 1e-12]
        left[ended] = 0.0
        done[ended] = clock
    device_finish = done + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_rate = np.where(bits > 0, bits / (done - lead), 0.0)
    shares = np.where(bits > 0, mean_rate / rates.capacity_bps(devices), 0.0)
    return PhasePlan(devices, shares, float(device_finish.max()), device_finish)


@dataclass(frozen=True)
class Slot:
    device: int  # global device index
    start_s: float  # from the phase start
    duration_s: float


@dataclass(frozen=True)
class SlotSchedule:
    slots: tuple[Slot, ...]  # in transmission order, never overlapping
    finish_s: float  # latest (slot end + tail) over the devices, or idle busy time

    def slot_of(self, device: int) -> Slot | None:
        return next((slot for slot in self.slots if slot.device == device), None)


def slot_schedule(
    rates: RateModel,
    devices: np.ndarray,
    bits: float | np.ndarray,
    lead: float | np.ndarray = 0.0,
    tail: float | np.ndarray = 0.0,
) -> SlotSchedule:
    """One sender at a time at its full rate, ordered by Schrage's rule: among the devices
    ready to send, the one with the longest tail first; if none is ready, wait for the next.
    Optimal when all tails are equal (uplink: earliest ready first) or all leads are equal
    (downlink: Jackson's rule), which are the two phases the latency model has.
    """
    devices = np.asarray(devices, dtype=int)
    size = len(devices)
    bits = _as_array(bits, size)
    lead = _as_array(lead, size)
    tail = _as_array(tail, size)
    durations = np.where(bits > 0, bits / rates.capacity_bps(devices), 0.0)
    finish = float(np.max(lead + tail)) if size else 0.0
    pending = [i for i in range(size) if bits[i] > 0]
    slots: list[Slot] = []
    clock = 0.0
    while pending:
        ready = [i for i in pending if lead[i] <= clock]
        if not ready:
            clock = min(lead[i] for i in pending)
            continue
        pick = max(ready, key=lambda i: (tail[i], -lead[i], -i))
        pending.remove(pick)
        slots.append(Slot(int(devices[pick]), clock, float(durations[pick])))
        clock += float(durations[pick])
        finish = max(finish, clock + float(tail[pick]))
    return SlotSchedule(tuple(slots), finish)


@dataclass(frozen=True)
class BoundarySchedule:
    """One iteration's gradients and the next iteration's uploads as one stretch of one air.

    Times are from the moment the gradients start going out (the server's step is done).
    """

    gradients: SlotSchedule  # finish: when the last device is ready to upload again
    uploads: SlotSchedule  # finish: when the last upload ends

    @property
    def finish_s(self) -> float:
        return self.uploads.finish_s


EXHAUSTIVE_BOUNDARY_DEVICES = 6  # up to 720 gradient orders are tried outright; above, local search


def boundary_schedule(
    downlink: RateModel,
    uplink: RateModel,
    devices: np.ndarray,
    gradient_bits: float | np.ndarray,
    upload_bits: float | np.ndarray,
    compute: float | np.ndarray,
) -> BoundarySchedule:
    """Gradients out and the next smashed data in, as one flow shop on an air-time medium.

    Between two server steps every device of the cluster needs the medium twice (its
    gradient down, later its next upload) with its own compute in between (``compute``: the
    gradient's delivery delay, the backward pass and the next forward pass). Planned as two
    phases with a barrier between them, the medium idles while the last device runs its
    backward pass and again while the first runs its forward pass. Planned as one stretch
    it need not: the gradients go out back to back, and each device uploads as soon as it
    is ready and the medium is free, in order of readiness (uploads start once the last
    gradient is out: one sender at a time). What is left to choose is the gradients' order,
    and it matters both ways: a device with much compute ahead wants its gradient early,
    and the first upload wants a device that is ready by the time the gradients are out
    (a two-operation coupled-task problem, NP-hard in general). Up to
    :data:`EXHAUSTIVE_BOUNDARY_DEVICES` devices every order is tried; above, a local search
    (moving one device at a time) from the longest-compute-first order (Jackson's rule).
    """
    devices = np.asarray(devices, dtype=int)
    size = len(devices)
    compute = _as_array(compute, size)
    down_bits = _as_array(gradient_bits, size)
    up_bits = _as_array(upload_bits, size)
    down_s = np.where(down_bits > 0, down_bits / downlink.capacity_bps(devices), 0.0)
    up_s = np.where(up_bits > 0, up_bits / uplink.capacity_bps(devices), 0.0)

    def uploads_after(order: tuple[int, ...]) -> tuple[float, np.ndarray, np.ndarray, list[int]]:
        delivered = np.zeros(size)
        clock = 0.0
        for k in order:
            clock += down_s[k]
            delivered[k] = clock
        ready = delivered + compute
        starts = np.zeros(size)
        sequence = sorted(range(size), key=lambda k: (ready[k], -up_s[k], k))
        for k in sequence:
            starts[k] = clock = max(clock, ready[k])
            clock += up_s[k]
        return clock, delivered, starts, sequence

    jackson = tuple(sorted(range(size), key=lambda k: (-compute[k], k)))
    if size <= EXHAUSTIVE_BOUNDARY_DEVICES:
        best = min(itertools.permutations(range(size)), key=lambda order: (uploads_after(order)[0], order != jackson))
    else:
        best, best_s = jackson, uploads_after(jackson)[0]
        improved = True
        while improved:
            improved = False
            for source in range(size):
                for target in range(size):
                    if source == target:
                        continue
                    order = list(best)
                    order.insert(target, order.pop(source))
                    finish = uploads_after(tuple(order))[0]
                    if finish < best_s * (1 - 1e-12):
                        best, best_s, improved = tuple(order), finish, True
    finish, delivered, starts, sequence = uploads_after(tuple(best))
    gradients = SlotSchedule(
        tuple(Slot(int(devices[k]), float(delivered[k] - down_s[k]), float(down_s[k])) for k in best),
        float(np.max(delivered + compute)) if size else 0.0,
    )
    uploads = SlotSchedule(tuple(Slot(int(devices[k]), float(starts[k]), float(up_s[k])) for k in sequence), finish)
    return BoundarySchedule(gradients, uploads)


def allocate_shares_many(
    rates: RateModel,
    groups: list[np.ndarray],
    bits: float,
    lead: np.ndarray | None = None,
    tail: np.ndarray | None = None,
) -> list[PhasePlan]:
    """:func:`allocate_shares` for many clusters at once (the same phase of every cluster).

    Bisection on every cluster's finish time in parallel: the clusters are padded into one
    (clusters x largest) array, and each bracket is halved (geometrically, so the
    precision is relative) until it is within 1e-12 of its finish time -- a picosecond
    on a second. Used where a whole round is planned; equals the one-cluster solver to
    ~1e-12 (tests/test_allocation.py).
    """
    if not groups:
        return []
    width = max(len(g) for g in groups)
    count = len(groups)
    index = np.zeros((count, width), dtype=int)
    member = np.zeros((count, width), dtype=bool)
    for k, group in enumerate(groups):
        index[k, : len(group)] = group
        member[k, : len(group)] = True
    size = int(index.max()) + 1
    lead_all = np.zeros(size) if lead is None else np.asarray(lead, dtype=float)
    tail_all = np.zeros(size) if tail is None else np.asarray(tail, dtype=float)
    busy = lead_all[index] + tail_all[index]
    idle_finish = np.where(member, busy, 0.0).max(axis=1)
    if bits <= 0:
        return [
            PhasePlan(np.asarray(g, dtype=int), np.zeros(len(g)), float(idle_finish[k]), busy[k, : len(g)].copy())
            for k, g in enumerate(groups)
        ]
    senders = member.sum(axis=1)
    bits_all = np.where(member, bits, 0.0)
    capacity = rates.capacity_bps(index)
    solo = np.where(member, busy + bits / capacity, 0.0)
    low = solo.max(axis=1)
    equal = rates.rate_bps(np.broadcast_to(1.0 / senders[:, None], index.shape), index)
    high = np.where(member, busy + bits / np.where(member, equal, 1.0), 0.0).max(axis=1)
    high = np.maximum(high, low)

    def demand(finish: np.ndarray) -> np.ndarray:
        need = rates.share_for(bits_all, finish[:, None] - busy, index)
        return np.where(member, need, 0.0).sum(axis=1)

    single = senders == 1
    for _ in range(100):
        middle = np.sqrt(low * high)
        over = demand(middle) > 1.0
        low = np.where(over, middle, low)
        high = np.where(over, high, middle)
        if np.all(high <= low * (1 + BATCH_RELATIVE_TOLERANCE)):
            break
    finish = np.where(single, low, high)
    finish = np.maximum(finish, idle_finish)
    plans = []
    needed = np.where(member, rates.share_for(bits_all, finish[:, None] - busy, index), 0.0)
    for k, group in enumerate(groups):
        n = len(group)
        shares = needed[k, :n]
        total = shares.sum()
        shares = shares / total if total > 0 else np.full(n, 1.0 / n)
        devices = np.asarray(group, dtype=int)
        device_finish = _finish_times(rates, devices, shares, np.full(n, float(bits)), busy[k, :n])
        plans.append(PhasePlan(devices, shares, float(max(finish[k], device_finish.max())), device_finish))
    return plans
