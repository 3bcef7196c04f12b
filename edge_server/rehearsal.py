"""Rounds of any scheme in one process: how a scheme and a cut converge, without the network.

Not a model of the system but the system: the edge server's round engine
(edge_server.rounds.RoundEngine, the same turn code, checks and aggregation strategy)
over the in-process link (edge_server.memory_link), whose devices train with the agent's
own step and batch streams. tests/test_system.py checks a rehearsal's weights against a
live run over Mosquitto to float precision.

What it is for: the number of rounds a cut needs to reach a target accuracy depends on
the data's skew and on how much of the model is averaged per cluster instead of trained
on the concatenated batch. That is what time-to-accuracy cut selection must weigh
(docs/latency-model.md, "Rounds to the target"), and what ``bench/cut_hindsight.py``
measures for every fixed cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edge_server.memory_link import SESSION, InMemoryDevice, InMemoryLink
from edge_server.records import RoundStats
from edge_server.rounds import RoundEngine
from edge_server.scheduler import FixedScheduler, RoundPlan
from edge_server.server import ServerConfig
from edge_server.strategy import RobustAggregation
from toolkit.data import Dataset
from toolkit.models import LayeredModel
from toolkit.training import evaluate
from toolkit.transport import BrokerAddress

SCHEMES = ("cpsl", "sl", "sfl", "fl")


@dataclass(frozen=True)
class RehearsalConfig:
    scheme: str = "cpsl"
    cut: int | None = 6  # None for fl
    clusters: int = 2  # cpsl: clusters per round, dealt round-robin by device id
    iterations: int = 20
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    data_seed: int = 0
    rounds: int = 10
    target_accuracy: float | None = None  # stop at the first round at or above it

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if (self.scheme == "fl") != (self.cut is None):
            raise ValueError("fl trains the whole model (cut None); the split schemes need a cut")


@dataclass(frozen=True)
class RehearsedRound:
    round: int
    accuracy: float
    loss: float
    train_loss: float | None


def device_ids(count: int) -> list[str]:
    return [f"dev{i}" for i in range(count)]


def default_clusters(config: RehearsalConfig, devices: Sequence[str]) -> list[list[str]]:
    """What :class:`edge_server.scheduler.FixedScheduler` deals (without random clusters)."""
    ids = sorted(devices)
    if config.scheme == "sl":
        return [[d] for d in ids]
    if config.scheme in ("sfl", "fl"):
        return [ids]
    count = max(1, min(config.clusters, len(ids)))
    return [ids[start::count] for start in range(count)]


class Rehearsal:
    """One run's state: the round engine over in-process devices."""

    def __init__(
        self,
        model: LayeredModel,
        data: Dataset,
        parts: dict[str, np.ndarray],
        config: RehearsalConfig,
        norm_factor: float = 10.0,
    ) -> None:
        self.model, self.data, self.config, self.parts = model, data, config, parts
        devices = {d: InMemoryDevice(d, model.net, data, indices) for d, indices in parts.items()}
        self.link = InMemoryLink(devices)
        settings = ServerConfig(
            broker=BrokerAddress("in-process", 1),  # nothing is connected: the link is in process
            scheme=config.scheme,
            rounds=config.rounds,
            min_devices=len(parts),
            batch_size=config.batch_size,
            iterations=config.iterations,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            clusters=config.clusters,
            cut=config.cut,
            data_seed=config.data_seed,
            norm_factor=norm_factor,
        )
        self.engine = RoundEngine(
            self.link,
            model,
            data.num_classes,
            settings,
            torch.device("cpu"),
            RobustAggregation(norm_factor),
            FixedScheduler(config.scheme, config.cut, config.clusters),  # asked for encodings only: the run's
            lambda device: len(parts[device]),
            lambda: float(np.median([len(indices) for indices in parts.values()])),
        )

    def round(self, round_: int, clusters: Sequence[Sequence[str]], cut: int | None = None) -> RehearsedRound:
        """One round over ``clusters`` (in turn) at ``cut`` (default: the config's)."""
        cut = self.config.cut if cut is None else cut
        fl = self.config.scheme == "fl"
        groups = [list(c) for c in clusters if c]
        plan = RoundPlan(cut=None if fl else cut, clusters=[[d for g in groups for d in g]] if fl else groups)
        stats = RoundStats(sessions=dict.fromkeys(self.parts, SESSION))
        if fl:
            self.engine.fl_round(round_, plan.clusters[0], plan, stats)
        else:
            for index, members in enumerate(plan.clusters):
                self.engine.split_turn(round_, index, members, plan, stats)
        accuracy, loss = evaluate(self.model.net, self.data.test_x, self.data.test_y)
        losses = stats.train_losses
        return RehearsedRound(round_, accuracy, loss, float(np.mean(losses)) if losses else None)


def rehearse(
    model: LayeredModel,
    data: Dataset,
    parts: Sequence[np.ndarray],
    config: RehearsalConfig,
    clusters_for_round: Callable[[int, list[str]], list[list[str]]] | None = None,
    on_round: Callable[[RehearsedRound], None] | None = None,
) -> list[RehearsedRound]:
    """Train ``model`` in place for up to ``config.rounds`` rounds; one record per round."""
    ids = device_ids(len(parts))
    rehearsal = Rehearsal(model, data, dict(zip(ids, parts, strict=True)), config)
    results = []
    for round_ in range(config.rounds):
        clusters = clusters_for_round(round_, ids) if clusters_for_round else default_clusters(config, ids)
        result = rehearsal.round(round_, clusters)
        results.append(result)
        if on_round is not None:
            on_round(result)
        if config.target_accuracy is not None and result.accuracy >= config.target_accuracy:
            break
    return results
