"""How short a split round could possibly be: a lower bound, and how close a round came to it.

A round of split learning at cut l moves fixed work whatever the plan: every device runs
I iterations (forward, smashed data up, the server's step, gradient down, backward) and
its device-side model goes down and back up once. No clustering, order or slot plan can
beat any of three limits (docs/latency-model.md, "The distance to the limit"):

- **the medium**: the round's bits must cross it. With the whole medium at their
  disposal for the whole round, each device's bits need a share of it; by concavity of
  every rate law in the share (Jensen), no schedule moves ``b_n`` bits in T seconds with a
  time-averaged share below what the min-max allocation of the round's totals gives, so
  that allocation's finish time is a bound. On Wi-Fi the uplink and the downlink are one
  air (the access point contends like a station), so their bounds add; on a wired link
  they are separate wires, and the longer one binds;
- **the slowest chain**: a device's own iterations are a chain nobody can overlap: its
  model down, I times (forward, its upload alone on the medium, the server's step on its
  batch alone, its gradient alone, backward), its model up;
- **the server**: its steps are sequential; with an affine step time ``a + c k``, all
  clusters' steps together take at least one step on every sample, ``I (a + c N B)``.

``efficiency = bound / measured`` says what fraction of the round was unavoidable. It is
1 only where one limit is met exactly, so 0.8 is good; a scheme that leaves the medium idle
while devices compute (or the reverse) shows it as a lower figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toolkit.planning.allocation import allocate_shares
from toolkit.planning.latency import SplitProblem


@dataclass(frozen=True)
class RoundBound:
    medium_s: float  # the round's transfers with the medium to themselves
    chain_s: float  # the slowest device's own chain of iterations
    server_s: float  # every server step back to back, as one cluster
    chain_device: int  # which device's chain is the slowest (index into the problem's devices)

    @property
    def bound_s(self) -> float:
        return max(self.medium_s, self.chain_s, self.server_s)

    @property
    def binding(self) -> str:
        """Which limit the bound is: ``medium``, ``chain`` or ``server``."""
        terms = {"medium": self.medium_s, "chain": self.chain_s, "server": self.server_s}
        return max(terms, key=terms.__getitem__)

    def to_dict(self) -> dict:
        return {
            "bound_s": self.bound_s,
            "binding": self.binding,
            "medium_s": self.medium_s,
            "chain_s": self.chain_s,
            "server_s": self.server_s,
        }


def round_bound(problem: SplitProblem, one_air: bool) -> RoundBound:
    """The lower bound of a split round over all of ``problem``'s devices.

    ``one_air``: uplink and downlink share one medium's time (Wi-Fi); otherwise they are
    separate directions of a wire and overlap.
    """
    count = problem.size
    if count == 0:
        return RoundBound(0.0, 0.0, 0.0, -1)
    devices = np.arange(count)
    iterations = problem.iterations
    up_bits = iterations * problem.uplink_bits + problem.model_bits
    down_bits = iterations * problem.downlink_bits + problem.model_bits
    up_s = allocate_shares(problem.uplink, devices, up_bits).finish_s
    down_s = allocate_shares(problem.downlink, devices, down_bits).finish_s
    medium_s = up_s + down_s if one_air else max(up_s, down_s)
    solo_up = problem.uplink.capacity_bps(devices)
    solo_down = problem.downlink.capacity_bps(devices)
    per_iteration = (
        problem.forward_s
        + problem.uplink_bits / solo_up
        + problem.server_s(1)
        + problem.downlink_bits / solo_down
        + problem.backward_s
    )
    chains = problem.model_bits / solo_down + iterations * per_iteration + problem.model_bits / solo_up
    slowest = int(np.argmax(chains))
    server_s = iterations * problem.server_s(count)
    return RoundBound(float(medium_s), float(chains[slowest]), float(server_s), slowest)


def efficiency(bound_s: float | None, measured_s: float | None) -> float | None:
    """``bound / measured``, or None when either is missing or the round took no time."""
    if bound_s is None or not measured_s or measured_s <= 0:
        return None
    return bound_s / measured_s
