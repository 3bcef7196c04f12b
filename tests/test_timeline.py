"""The round timeline: device stamps moved to the server's clock, slots placed from the epochs, nothing guessed."""

from __future__ import annotations

import pytest

from edge_server.timeline import TurnStamps, round_timeline
from toolkit.protocol import messages as m


def report(*rows: m.IterationTiming) -> m.Timings:
    return m.Timings(iterations=list(rows), weights_down_bytes=0, weights_up_bytes=0, turn_s=1.0)


def test_a_device_clock_ahead_by_its_offset_lands_on_the_servers_clock():
    start = 1000.0
    turn = TurnStamps(0, ["a", "b"], epochs={0: 1000.5})
    turn.server_steps[0] = (1001.0, 1001.1)
    turn.gradients_sent[("a", 0)] = 1001.2
    turn.gradients_sent[("b", 0)] = 1001.25
    arrivals = {"a": {0: 1000.9}, "b": {0: 1000.95}}
    timing = m.IterationTiming(
        iteration=0,
        forward_s=0.2,
        backward_s=0.1,
        upload_s=0.1,
        wait_gradient_s=0.3,
        up_bytes=1,
        down_bytes=1,
        upload_start_at=1002.7,
        upload_end_at=1002.8,
        slot_wait_s=0.1,
    )
    grants = {"a": m.Grant(slot_offset_s=0.1, slot_duration_s=0.2, clock_offset_s=2.0)}  # a's clock runs 2 s ahead
    rows = round_timeline(start, [turn], arrivals, {"a": report(timing)}, grants)
    a, b = rows
    assert a["upload_start"] == pytest.approx(0.7) and a["upload_end"] == pytest.approx(0.8)
    assert a["forward_start"] == pytest.approx(0.4)  # upload start less the slot wait and the forward pass
    assert (a["slot_start"], a["slot_end"]) == (pytest.approx(0.6), pytest.approx(0.8))
    assert a["smashed_arrived"] == pytest.approx(0.9) and a["server_step"] == [1.0, pytest.approx(1.1)]
    assert a["gradient_sent"] == pytest.approx(1.2)
    # b reported nothing and had no slot: only what the server itself stamped
    assert set(b) == {"device", "cluster", "iteration", "smashed_arrived", "server_step", "gradient_sent"}
