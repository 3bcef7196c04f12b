"""``--compress auto``'s choice: every candidate pair of encodings (smashed data, gradients),
tried on real batches of the run (toolkit.compression.trial), is priced by the round it
would give -- the last round's clusters planned again under the trial's sizes and codec
time -- and the fastest within the error budget is taken.
"""

from __future__ import annotations

import dataclasses

from toolkit.compression import Trial
from toolkit.planning.costs import CutCost
from toolkit.planning.latency import FleetState, SplitProblem, TrainingSettings, plan_split_round


def rank_encodings(
    trials: list[Trial],
    cut: CutCost,
    state: FleetState,
    groups: list[list[int]],
    settings: TrainingSettings,
    budget: float,
) -> tuple[list[dict], dict]:
    """Each trial's predicted round (the table for the record) and the row chosen. The trials
    ran on the edge server: a device's codec time is the server's scaled by their compute
    speeds (``server_speed / device speed``) until its own turns report it."""
    rows = []
    for candidate in trials:
        codec = candidate.codec_s_per_byte * settings.server_speed / state.speed
        trial_state = dataclasses.replace(state, codec_s_per_byte=codec)
        trial_settings = dataclasses.replace(
            settings,
            uplink_ratio=candidate.uplink_ratio,
            downlink_ratio=candidate.downlink_ratio,
            server_codec_s_per_byte=candidate.codec_s_per_byte,
        )
        predicted = plan_split_round(SplitProblem.build(cut, trial_state, trial_settings), groups).latency_s
        rows.append({**candidate.to_dict(), "predicted_round_s": predicted, "within_budget": candidate.error <= budget})
    allowed = [row for row in rows if row["within_budget"]] or rows[:1]
    return rows, min(allowed, key=lambda row: row["predicted_round_s"])
