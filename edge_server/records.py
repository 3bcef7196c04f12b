"""Records of a run on disk: metrics.jsonl and the final model (state dict + ONNX); the per-round
state that ``--resume`` reads is edge_server/run_state.py's.

Apart from the round loop so that what a run leaves behind is written in one place, and
every file atomically: a crash mid-write leaves the previous file, never half of a new one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_server.scheduler import RoundPlan
from edge_server.timeline import round_timeline, turn_transfers
from toolkit.files import write_atomically
from toolkit.models import LayeredModel
from toolkit.planning.bound import efficiency
from toolkit.profiler.onnx_export import torchscript_exporter
from toolkit.protocol import Kind, topics
from toolkit.protocol import messages as m
from toolkit.protocol.endpoint import Endpoint


class RunRecords:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics = run_dir / "metrics.jsonl"

    def open(self) -> None:
        """A new run: an old metrics.jsonl in the same folder is replaced, not appended to
        (round numbers would start again from 0 in the middle of the file)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics.exists():
            write_atomically(self.metrics, "")

    def resume(self, last_round: int) -> list[dict]:
        """A resumed run: the records up to ``last_round`` (one the crash wrote past the saved
        state is dropped, so no round is counted twice); appending goes on after them."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept: list[dict] = []
        if self.metrics.exists():
            for line in self.metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by the crash: it and anything after it go
                if not isinstance(record, dict) or not isinstance(record.get("round"), int):
                    break
                if record["round"] <= last_round:
                    kept.append(record)
        write_atomically(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def write_fleet(self, devices: list[dict]) -> None:
        """fleet.json: each device's facts (board, samples, profile summary) for ``edge_server report``."""
        write_atomically(self.run_dir / "fleet.json", json.dumps({"devices": devices}, indent=1))

    def append(self, record: dict) -> None:
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def save_final(self, model: LayeredModel) -> None:
        atomic_torch_save(model.net.state_dict(), self.run_dir / "model.pt")
        frozen = model.net.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                frozen,
                (torch.zeros(1, *model.input_shape),),
                str(self.run_dir / "model.onnx"),
                **torchscript_exporter(),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        model.net.train()


def atomic_torch_save(obj: object, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class RoundStats:
    """What one round measured (the breakdown written to metrics.jsonl). Each attempt at a
    cluster's turn gathers its own, which the round's absorbs when the turn completes or
    is abandoned."""

    device_compute_s: float = 0.0
    uplink_s: float = 0.0
    server_compute_s: float = 0.0
    downlink_s: float = 0.0
    model_transfer_s: float = 0.0
    train_losses: list[float] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)
    server_steps: list[tuple[int, float]] = field(default_factory=list)  # (samples, seconds)
    arrivals: dict[str, dict[int, float]] = field(default_factory=dict)  # device -> iteration -> wall clock
    turns: list[dict] = field(default_factory=list)  # per cluster: measured phases (and predicted, with slots)
    label_counts: dict[str, np.ndarray] = field(default_factory=dict)  # per device, the labels it trained on
    sessions: dict[str, str] = field(default_factory=dict)  # each device's agent life when the round began
    stamps: list = field(default_factory=list)  # one edge_server.timeline.TurnStamps per split turn
    handout_epoch: float | None = None  # the uplink epoch the last weights-down carried
    handout_positions: dict[str, int] = field(default_factory=dict)  # each device's stream position at ASSIGN
    weights_sent: dict[str, float] = field(default_factory=dict)  # device -> wall clock its weights went down
    turn_token: int | None = None  # the last hand-out's (ASSIGN.turn): replies must name it
    replays_left: int = 0  # times this turn may still start again for a restarted device (edge_server.server)
    restarts: list[dict] = field(default_factory=list)  # turns started again: cluster and device
    server_codec_s: float = 0.0  # decoding smashed data, encoding gradients (toolkit.compression)
    server_codec_bytes: int = 0  # fp32 bytes of smashed data they covered
    capped_weights: dict[str, float] = field(default_factory=dict)  # device -> its weight before the cap
    clipped_smashed: dict[str, int] = field(default_factory=dict)  # device -> smashed samples bounded
    left_out: dict[str, str] = field(default_factory=dict)  # device -> why it sat the rest of the round out
    clipped_updates: dict[str, float] = field(default_factory=dict)  # device -> the scale its update was clipped by

    def absorb_time(self, attempt: RoundStats) -> None:
        """The seconds an abandoned attempt at a turn spent, and nothing it trained."""
        for name in ("device_compute_s", "uplink_s", "server_compute_s", "downlink_s", "model_transfer_s"):
            setattr(self, name, getattr(self, name) + getattr(attempt, name))

    def abandon(self, attempt: RoundStats) -> None:
        """An attempt at a turn given up on (a device came back as a new agent life): its seconds,
        and what the server stamped of it for the timeline, marked abandoned; nothing it trained."""
        self.absorb_time(attempt)
        for stamps in attempt.stamps:
            stamps.abandoned, stamps.arrivals = True, attempt.arrivals
        self.stamps += attempt.stamps

    def absorb(self, attempt: RoundStats) -> None:
        """A completed turn's stats into the round's."""
        self.absorb_time(attempt)
        self.train_losses += attempt.train_losses
        self.dropped |= attempt.dropped
        self.server_steps += attempt.server_steps
        self.arrivals.update(attempt.arrivals)
        self.turns += attempt.turns
        for device, counts in attempt.label_counts.items():
            self.label_counts[device] = self.label_counts.get(device, 0) + counts
        self.stamps += attempt.stamps
        self.handout_epoch = attempt.handout_epoch
        self.handout_positions.update(attempt.handout_positions)
        self.capped_weights.update(attempt.capped_weights)
        self.left_out.update(attempt.left_out)
        for device, count in attempt.clipped_smashed.items():
            self.clipped_smashed[device] = self.clipped_smashed.get(device, 0) + count
        self.clipped_updates.update(attempt.clipped_updates)
        self.weights_sent.update(attempt.weights_sent)
        self.server_codec_s += attempt.server_codec_s
        self.server_codec_bytes += attempt.server_codec_bytes


class DeviceRestartedError(Exception):
    """A device of the turn is back as a new agent life: the turn starts again (edge_server.server)."""

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.device = device


@dataclass
class TurnSnapshot:
    """What a split turn changes on the server, as it was when the turn began: the server-side
    weights, the server optimiser's state and the members' batch-stream positions."""

    weights: dict[str, torch.Tensor]
    optimizer: dict
    positions: dict[str, int]

    @classmethod
    def take(cls, server_part, optimizer, positions: dict[str, int], devices: list[str]) -> TurnSnapshot:
        return cls(
            {k: v.detach().clone() for k, v in server_part.state_dict().items()},
            copy.deepcopy(optimizer.state_dict()),
            {d: positions.get(d, 0) for d in devices},
        )

    def restore(self, server_part, optimizer, positions: dict[str, int]) -> None:
        server_part.load_state_dict(self.weights)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        positions.update(self.positions)


def turn_record(
    cluster: int, plan: RoundPlan, started: float, smashed_in: list[float], last_gradient: float, ended: float
) -> dict:
    """A turn's phases as measured (monotonic seconds), next to the plan's prediction: where a
    prediction misses. Goes into the round's record under ``turns``."""
    gaps = len(smashed_in) - 1
    record = {
        "cluster": cluster,
        "measured_s": ended - started,
        "first_smashed_s": smashed_in[0] - started if smashed_in else None,
        "iteration_s": (smashed_in[-1] - smashed_in[0]) / gaps if gaps > 0 else None,
        "model_up_s": ended - last_gradient,
    }
    timing = plan.timing.get(cluster)
    if timing is not None:
        record.update(timing.to_dict())
    return record


def publish_metrics(endpoint: Endpoint, run_id: str, record: dict) -> None:
    """The round's evaluation, retained on the run's metrics topic for dashboards and agents
    (a diverged model's NaN loss is left out: the message carries finite numbers only)."""
    values = {k: record[k] for k in ("accuracy", "loss", "latency_s") if math.isfinite(record[k])}
    endpoint.send(
        topics.run_metrics(run_id),
        Kind.METRICS,
        m.Metrics(values=values),
        run=run_id,
        device="server",
        round_=record["round"],
        retain=True,
    )


@dataclass
class RoundOutcome:
    """What a round was, for its record: the plan it ran, when, how long, how the model fared."""

    round: int
    run_id: str
    scheme: str
    plan: RoundPlan
    started_wall: float
    latency_s: float
    accuracy: float
    loss: float


def round_record(
    outcome: RoundOutcome,
    stats: RoundStats,
    cut_name: str | None,
    reports: dict[str, m.Timings],
    rejected: dict[str, int],
    refusals: dict[str, str],
    traffic: dict[str, int] | None = None,
    refused: dict[str, int] | None = None,
) -> dict:
    """The round's line in metrics.jsonl (docs/operations.md lists its fields)."""
    plan = outcome.plan
    parts = {
        "device_compute_s": stats.device_compute_s,
        "uplink_s": stats.uplink_s,
        "server_compute_s": stats.server_compute_s,
        "downlink_s": stats.downlink_s,
        "model_transfer_s": stats.model_transfer_s,
    }
    parts["waiting_s"] = max(0.0, outcome.latency_s - sum(parts.values()))
    record = {
        "round": outcome.round,
        "run": outcome.run_id,
        "scheme": outcome.scheme,
        "cut": plan.cut,
        "cut_name": cut_name,
        "clusters": plan.clusters,
        "accuracy": outcome.accuracy,
        "loss": outcome.loss,
        "train_loss": sum(stats.train_losses) / len(stats.train_losses) if stats.train_losses else None,
        "latency_s": outcome.latency_s,
        "predicted_latency_s": plan.predicted_latency_s,
        "bound_s": plan.bound_s,
        "efficiency": efficiency(plan.bound_s, outcome.latency_s),
        "breakdown": parts,
        "dropped": sorted(stats.dropped),
        "rejected_messages": rejected,
        "refusals": refusals,
        "refused_messages": refused or {},
        "capped_weights": dict(stats.capped_weights),  # device -> the weight it claimed, over the cap
        "clipped_smashed": dict(stats.clipped_smashed),  # device -> smashed samples bounded this round
        "left_out": dict(stats.left_out),  # device -> why it sat the rest of the round out
        "clipped_updates": dict(stats.clipped_updates),  # device -> the scale its update was clipped by
        "time": time.time(),
    }
    if traffic is not None:
        record["bytes_up"] = traffic["smashed"] + traffic["weights_up"]
        record["bytes_down"] = traffic["gradient"] + traffic["weights_down"]
        record["bytes"] = traffic
    if stats.restarts:
        record["restarted_turns"] = stats.restarts
    if stats.turns:
        record["turns"] = stats.turns
    if stats.stamps:
        record["timeline"] = round_timeline(outcome.started_wall, stats.stamps, stats.arrivals, reports, plan.grants)
        record["transfers"] = turn_transfers(outcome.started_wall, stats.stamps)
    if any(grant.slot_duration_s is not None for grant in plan.grants.values()):
        rows = [row for timings in reports.values() for row in timings.iterations]
        record["slots"] = {
            "late_iterations": sum(1 for row in rows if row.slot_late_s > 0.001),
            "iterations": len(rows),
            "max_late_s": max((row.slot_late_s for row in rows), default=0.0),
        }
    if plan.decision:
        record["decision"] = plan.decision
    return record


UPLINK_KINDS = ("smashed", "weights_up")
DOWNLINK_KINDS = ("gradient", "weights_down")


def round_traffic(before: tuple[dict, dict], after: tuple[dict, dict]) -> dict[str, int]:
    """Frame bytes that crossed the cut (smashed data up, gradients down) and the model transfers
    during the round, from the endpoint's (received, sent) counters before and after it."""
    (received0, sent0), (received1, sent1) = before, after
    up = {kind: received1.get(kind, 0) - received0.get(kind, 0) for kind in UPLINK_KINDS}
    down = {kind: sent1.get(kind, 0) - sent0.get(kind, 0) for kind in DOWNLINK_KINDS}
    return {**up, **down}
