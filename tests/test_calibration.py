"""The fixed costs the latency model does not see: learned from measured turns."""

from __future__ import annotations

import pytest

from edge_server.calibration import FixedCosts

ITERATIONS = 5


def measured_round(costs: FixedCosts, model_iteration: float, model_turn_rest: float, truth: dict, turns: int = 2):
    """Turns as EdgeServer records them: the prediction from ``costs``, the measurement from
    a world whose hidden fixed costs are ``truth``."""
    records = []
    for _ in range(turns):
        predicted_iteration = costs.iteration(model_iteration)
        records.append(
            {
                "measured_s": model_turn_rest + truth["turn"] + ITERATIONS * (model_iteration + truth["iteration"]),
                "iteration_s": model_iteration + truth["iteration"],
                "predicted_iteration_s": predicted_iteration,
                "predicted_turn_s": costs.turn(model_turn_rest + ITERATIONS * predicted_iteration),
            }
        )
    latency = sum(r["measured_s"] for r in records) + turns * truth["between"]
    predicted = costs.round([r["predicted_turn_s"] for r in records])
    return records, latency, predicted


def test_steady_fixed_costs_are_learned_within_a_few_rounds():
    costs = FixedCosts()
    truth = {"iteration": 0.012, "turn": 0.3, "between": 0.05}
    ratios = []
    for _ in range(8):
        turns, latency, predicted = measured_round(costs, 0.1, 1.0, truth)
        ratios.append(latency / predicted)
        costs.observe(turns, latency, ITERATIONS)
    assert ratios[0] > 1.2  # uncalibrated: the model misses about a quarter of the round
    assert all(abs(r - 1) < 0.02 for r in ratios[4:])
    assert costs.iteration_s == pytest.approx(0.012, rel=0.05)
    assert costs.turn_s == pytest.approx(0.3, rel=0.05)
    assert costs.between_turns_s == pytest.approx(0.05, rel=0.05)


def test_an_over_predicting_model_is_corrected_down_but_never_below_half():
    costs = FixedCosts()
    truth = {"iteration": -0.03, "turn": -0.2, "between": 0.0}
    for _ in range(10):
        turns, latency, predicted = measured_round(costs, 0.1, 1.0, truth)
        costs.observe(turns, latency, ITERATIONS)
    assert latency / predicted == pytest.approx(1.0, abs=0.02)
    assert costs.iteration(0.01) == pytest.approx(0.005)  # a much shorter iteration keeps half its model time


def test_turns_without_measurements_change_nothing():
    costs = FixedCosts()
    costs.observe([{"measured_s": None, "predicted_turn_s": 1.0}], 3.0, ITERATIONS)
    costs.observe([], 3.0, ITERATIONS)
    assert costs.to_dict() == {"iteration_s": 0.0, "turn_s": 0.0, "between_turns_s": 0.0, "observed_rounds": 0}
