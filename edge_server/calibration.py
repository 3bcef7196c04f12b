"""The fixed costs the latency model does not see, learned from the rounds as they run.

The model (docs/latency-model.md) counts compute and transfers. A real round also pays
for things no profile or probe measures: waking a thread per message, decoding and
validating frames, loading weights into a model, building an optimiser, the broker's
store-and-forward, and the server's bookkeeping between turns. On loopback, where the
transfers are nearly free, these are most of a round: before calibration the demo's
rounds took 1.2x their prediction.

Three costs, each observed directly in every turn the server measures
(``EdgeServer._turn_record``) and folded in by exponential smoothing:

- ``iteration_s``: per iteration of a cluster, measured iteration time (between
  consecutive smashed-data arrivals) minus the model's;
- ``turn_s``: per cluster turn (weights down, ASSIGN handling, averaging, weights up):
  the turn's measured time minus the model's, less the iterations' share;
- ``between_turns_s``: per turn, the round's time outside its turns (waiting for the
  devices' timing reports, starting the next turn), over the number of turns.

Each observation is the residual against a prediction that already contains the current
estimate, so the update ``estimate += gain * residual`` is a smoothing of the direct
observation ``estimate + residual``: one noisy turn moves it by half, a steady offset is
absorbed within two or three rounds. A cost may come out negative (the model
over-predicts some phase, e.g. slots planned with a conservative guard); a prediction is
never cut below half of the model's own.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

MIN_FRACTION_OF_MODEL = 0.5


@dataclass
class FixedCosts:
    iteration_s: float = 0.0
    turn_s: float = 0.0
    between_turns_s: float = 0.0
    gain: float = 0.5
    observed_rounds: int = 0

    def iteration(self, model_s: float) -> float:
        """A predicted iteration: the model's plus the fixed per-iteration cost."""
        return max(model_s + self.iteration_s, MIN_FRACTION_OF_MODEL * model_s)

    def turn(self, model_s: float) -> float:
        """A predicted turn from the model's (its iterations already calibrated): plus the per-turn cost."""
        return max(model_s + self.turn_s, MIN_FRACTION_OF_MODEL * model_s)

    def round(self, turns_s: Sequence[float]) -> float:
        """A predicted round from its predicted turns: plus the time between them."""
        return float(sum(turns_s)) + len(turns_s) * max(self.between_turns_s, 0.0)

    def observe(self, turns: Sequence[dict], round_latency_s: float, iterations: int) -> None:
        """One round's measured turns (with their predictions) and its measured latency."""
        measured = [t for t in turns if _number(t.get("measured_s")) and _number(t.get("predicted_turn_s"))]
        if not measured:
            return
        iteration_residuals = [
            t["iteration_s"] - t["predicted_iteration_s"]
            for t in measured
            if _number(t.get("iteration_s")) and _number(t.get("predicted_iteration_s"))
        ]
        iteration_residual = statistics.median(iteration_residuals) if iteration_residuals else 0.0
        turn_residual = (
            statistics.median(t["measured_s"] - t["predicted_turn_s"] for t in measured)
            - iterations * iteration_residual
        )
        outside = (round_latency_s - sum(t["measured_s"] for t in measured)) / len(measured)
        self.iteration_s += self.gain * iteration_residual
        self.turn_s += self.gain * turn_residual
        if math.isfinite(outside):
            self.between_turns_s += self.gain * (outside - self.between_turns_s)
        self.observed_rounds += 1

    def to_dict(self) -> dict:
        return {
            "iteration_s": self.iteration_s,
            "turn_s": self.turn_s,
            "between_turns_s": self.between_turns_s,
            "observed_rounds": self.observed_rounds,
        }


def _number(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
