"""A cluster's turn as the planner times it: each transfer's slots (or none) and the
predicted phases, from a fleet's state at one cut (docs/latency-model.md, "One stretch of
air"). Pure functions of their arguments; ``edge_server.auto`` plans rounds with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_server.calibration import FixedCosts
from toolkit.planning.allocation import boundary_schedule, concurrent_phase, slot_schedule
from toolkit.planning.latency import FleetState, SplitProblem
from toolkit.planning.rates import RateModel

GUARD_S = 0.002


@dataclass(frozen=True)
class PhaseTiming:
    """A predicted phase: when it ends, and each device's slot start (None: no slots, all at once)."""

    finish_s: float
    offsets: dict[int, float] | None
    durations: dict[int, float] | None


def plan_phase(rates: RateModel, rows: np.ndarray, bits: float, lead=0.0, tail=0.0, slots: bool = True) -> PhaseTiming:
    """Slots on an air-time medium (one sender at a time); all at once on a byte-shared one, or
    without ``slots``, where the devices contend."""
    if slots and rates.is_linear():
        schedule = slot_schedule(rates, rows, bits, lead=lead, tail=tail)
        return PhaseTiming(
            schedule.finish_s,
            {slot.device: slot.start_s for slot in schedule.slots},
            {slot.device: slot.duration_s for slot in schedule.slots},
        )
    return PhaseTiming(concurrent_phase(rates, rows, bits, lead=lead, tail=tail).finish_s, None, None)


@dataclass(frozen=True)
class TurnTiming:
    """A cluster turn as planned: each transfer's slots (offsets None: no slots) and its times."""

    uplink: PhaseTiming  # the smashed data's slots, from the uplink epoch
    downlink: PhaseTiming  # the gradients as a phase of their own, each backward pass after it
    gradients: PhaseTiming  # the gradients' slots as sent (the flow's order where there is one)
    model_down: PhaseTiming
    model_up: PhaseTiming  # from when every backward pass is predicted done
    iteration_s: float  # from one server step to the next, fixed costs included
    turn_s: float
    epoch_s: float  # the next uploads' epoch, from when the gradients start to go out
    handout_shift_s: float  # the first uploads' epoch, from the weights being all in
    last_gradients_s: float  # the weights' epoch lies this much before the backward passes' end

    @property
    def slotted(self) -> bool:
        return self.uplink.offsets is not None


def plan_flow(
    state: FleetState, problem: SplitProblem, rows: np.ndarray, one_way: np.ndarray
) -> tuple[PhaseTiming, PhaseTiming] | None:
    """On an air-time medium: the uploads (slots from the gradients' start) and the gradients of
    one stretch from a server step to the next (``allocation.boundary_schedule``); None on a
    byte-shared medium, where transfers overlap and nothing is slotted."""
    if not (state.uplink.is_linear() and state.downlink.is_linear()):
        return None
    compute = one_way + problem.backward_s[rows] + problem.forward_s[rows]
    flow = boundary_schedule(state.downlink, state.uplink, rows, problem.downlink_bits, problem.uplink_bits, compute)
    uploads = PhaseTiming(
        flow.uploads.finish_s,
        {slot.device: slot.start_s for slot in flow.uploads.slots},
        {slot.device: slot.duration_s for slot in flow.uploads.slots},
    )
    gradients = PhaseTiming(
        flow.gradients.finish_s,
        {slot.device: slot.start_s for slot in flow.gradients.slots},
        {slot.device: slot.duration_s for slot in flow.gradients.slots},
    )
    return uploads, gradients


def plan_turn(
    state: FleetState,
    problem: SplitProblem,
    rows: np.ndarray,
    one_way: np.ndarray,
    slots: bool,
    fixed_costs: FixedCosts,
    iterations: int,
    iteration_flow: bool = True,
) -> TurnTiming:
    """One cluster's turn: every transfer's slots (or none) and the predicted times."""
    uplink = plan_phase(state.uplink, rows, problem.uplink_bits, lead=problem.forward_s[rows], slots=slots)
    downlink = plan_phase(
        state.downlink, rows, problem.downlink_bits, tail=problem.backward_s[rows] + one_way, slots=slots
    )
    model_down = plan_phase(state.downlink, rows, problem.model_bits, tail=one_way, slots=slots)
    # counted from the last gradient's epoch, when every backward pass is predicted done
    model_up = plan_phase(state.uplink, rows, problem.model_bits, slots=slots)
    server_s = problem.server_s(len(rows))
    flow = plan_flow(state, problem, rows, one_way) if slots and iteration_flow else None
    if flow is None:  # two phases with a barrier: every backward pass done before any upload
        gradients, between_s, epoch_s = downlink, uplink.finish_s + downlink.finish_s, downlink.finish_s + GUARD_S
        handout_shift_s = last_gradients_s = 0.0
    else:  # one stretch of air from the gradients out to the next uploads in
        uplink, gradients = flow
        between_s, epoch_s, last_gradients_s = uplink.finish_s + GUARD_S, GUARD_S, downlink.finish_s
        # the first uploads count from the weights being in: each slot after its forward pass
        handout_shift_s = max(problem.forward_s[row] - uplink.offsets[row] for row in rows)
    iteration_s = fixed_costs.iteration(between_s + one_way.max() + server_s + GUARD_S)
    turn_s = fixed_costs.turn(
        model_down.finish_s
        + GUARD_S
        + handout_shift_s
        + iterations * iteration_s
        + last_gradients_s
        + model_up.finish_s
        + one_way.max()
    )
    return TurnTiming(
        uplink,
        downlink,
        gradients,
        model_down,
        model_up,
        iteration_s,
        turn_s,
        epoch_s,
        handout_shift_s,
        last_gradients_s,
    )
