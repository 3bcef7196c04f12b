"""A split round's timeline, per device and iteration, on the server's clock: what the Gantt view draws.

Each row is one device's iteration: its forward pass, its upload (as the device timed it,
moved to the server's clock by the offset the server estimated), the slot it was granted
(when there was one), the arrival of its smashed data, the server's step on the cluster's
batch, and the gradient's departure. Times are seconds from the round's start. Stamps a
side did not take are left out rather than guessed, so a row says exactly what was
measured. Pure: the server hands in what it stamped and what the devices reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from toolkit.protocol import messages as m


@dataclass
class TurnStamps:
    """What the server stamps during one cluster's turn (wall clock, ``time.time()``)."""

    cluster: int
    devices: list[str]
    epochs: dict[int, float] = field(default_factory=dict)  # iteration -> uplink epoch sent to the cluster
    server_steps: dict[int, tuple[float, float]] = field(default_factory=dict)  # iteration -> (start, end)
    gradients_sent: dict[tuple[str, int], float] = field(default_factory=dict)  # (device, iteration) -> sent
    weights_sent: dict[str, float] = field(default_factory=dict)  # device -> its device-side weights went down
    weights_arrived: dict[str, float] = field(default_factory=dict)  # device -> its trained weights came up
    # an attempt given up on (a device restarted mid-turn, the turn started again): its rows are
    # the server's stamps only (no device reported on it), with its own smashed-data arrivals
    abandoned: bool = False
    arrivals: dict[str, dict[int, float]] | None = None


def round_timeline(
    round_start: float,
    turns: list[TurnStamps],
    arrivals: Mapping[str, Mapping[int, float]],
    reports: Mapping[str, m.Timings],
    grants: Mapping[str, m.Grant],
) -> list[dict]:
    """One row per device and iteration of every turn, in turn and iteration order; the rows of an
    abandoned attempt say so (``abandoned``) and come before the attempt that completed."""

    def at(value: float | None) -> float | None:
        return None if value is None else round(value - round_start, 6)

    rows = []
    for turn in turns:
        for device in turn.devices:
            grant = grants.get(device)
            offset = grant.clock_offset_s if grant is not None else 0.0
            reported = device in reports and not turn.abandoned
            measured = {row.iteration: row for row in reports[device].iterations} if reported else {}
            arrived = (turn.arrivals or {}).get(device, {}) if turn.abandoned else arrivals.get(device, {})
            iterations = sorted({*measured, *arrived, *(i for d, i in turn.gradients_sent if d == device)})
            for iteration in iterations:
                row: dict = {"device": device, "cluster": turn.cluster, "iteration": iteration}
                if turn.abandoned:
                    row["abandoned"] = True
                timing = measured.get(iteration)
                if timing is not None and timing.upload_start_at > 0:
                    start = timing.upload_start_at - offset  # device clock -> server clock
                    row["forward_s"] = timing.forward_s
                    row["upload_start"] = at(start)
                    row["forward_start"] = at(start - timing.slot_wait_s - timing.encode_s - timing.forward_s)
                    if timing.upload_end_at > 0:
                        row["upload_end"] = at(timing.upload_end_at - offset)
                epoch = turn.epochs.get(iteration)
                if grant is not None and grant.slot_duration_s is not None and epoch is not None:
                    row["slot_start"] = at(epoch + grant.slot_offset_s)
                    row["slot_end"] = at(epoch + grant.slot_offset_s + grant.slot_duration_s)
                if iteration in arrived:
                    row["smashed_arrived"] = at(arrived[iteration])
                if iteration in turn.server_steps:
                    row["server_step"] = [at(t) for t in turn.server_steps[iteration]]
                if (device, iteration) in turn.gradients_sent:
                    row["gradient_sent"] = at(turn.gradients_sent[(device, iteration)])
                rows.append(row)
    return rows


def turn_transfers(round_start: float, turns: list[TurnStamps]) -> list[dict]:
    """The weight transfers of every turn, one row per device: when the server sent the
    device-side weights, when the device's last gradient left, and when its trained weights
    arrived (seconds from the round's start; a stamp not taken is left out)."""
    rows = []
    for turn in turns:
        for device in turn.devices:
            row: dict = {"device": device, "cluster": turn.cluster}
            if turn.abandoned:
                row["abandoned"] = True
            if device in turn.weights_sent:
                row["weights_sent"] = round(turn.weights_sent[device] - round_start, 6)
            last_gradient = max((t for (d, _), t in turn.gradients_sent.items() if d == device), default=None)
            if last_gradient is not None:
                row["last_gradient_sent"] = round(last_gradient - round_start, 6)
            if device in turn.weights_arrived:
                row["weights_arrived"] = round(turn.weights_arrived[device] - round_start, 6)
            rows.append(row)
    return rows
