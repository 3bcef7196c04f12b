"""Rounds of any scheme in one process: how a scheme and a cut converge, without the network.

The edge server and the agents compute, per round, exactly this (tests/test_system.py
checks the weights agree with a live run to float precision): clusters take turns; in a
turn every member loads the current device-side weights, builds a fresh optimiser, and
for each of I iterations draws its next batch (the same seeded stream an agent draws),
runs its part forward, the server steps its part on the cluster's concatenated smashed
data and returns each member its gradient slice, and the member steps; at the end the
members' device-side weights are averaged by sample count. FL trains the whole model
locally for I steps and averages. The server's optimiser lives as long as the cut does.

What it is for: the number of rounds a cut needs to reach a target accuracy depends on
the data's skew and on how much of the model is averaged per cluster instead of trained
on the concatenated batch. That is what time-to-accuracy cut selection must weigh
(docs/latency-model.md, "Rounds to the target"), and what ``bench/cut_hindsight.py``
measures for every fixed cut.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from toolkit.data import Dataset
from toolkit.models import LayeredModel
from toolkit.training import (
    BatchStream,
    LocalStep,
    SplitStep,
    evaluate,
    make_optimizer,
    server_step,
    stream_seed,
    weighted_average,
)

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
    """One run's state: the model, the devices' batch streams and the server's optimiser."""

    def __init__(self, model: LayeredModel, data: Dataset, parts: dict[str, np.ndarray], config: RehearsalConfig):
        self.model, self.data, self.config = model, data, config
        self.parts = parts
        self.streams = {
            d: BatchStream(indices, config.batch_size, stream_seed(config.data_seed, d)) for d, indices in parts.items()
        }
        self.loss_fn = nn.CrossEntropyLoss()
        self.server_optimizer: torch.optim.Optimizer | None = None
        self.server_cut: int | None = None

    def _optimizer(self, part: nn.Module) -> torch.optim.Optimizer:
        c = self.config
        return make_optimizer(list(part.parameters()), c.lr, c.momentum, c.weight_decay)

    def _server_part(self, cut: int) -> nn.Module:
        if self.server_cut != cut:
            self.server_cut = cut
            self.server_optimizer = self._optimizer(self.model.net[cut:])
        return self.model.net[cut:]

    def _batch(self, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.streams[device].next()
        return self.data.train_x[index], self.data.train_y[index]

    def split_turn(self, cut: int, members: Sequence[str], losses: list[float]) -> None:
        device_part, server_part = self.model.net[:cut], self._server_part(cut)
        server_part.train()
        handed_out = {k: v.detach().clone() for k, v in device_part.state_dict().items()}
        steps = {}
        for device in members:
            replica = copy.deepcopy(device_part)  # a structural copy; the handed-out weights go in next
            replica.load_state_dict(handed_out)
            replica.train()
            steps[device] = SplitStep(replica, self._optimizer(replica))  # what the agent runs
        order = sorted(members)
        for _ in range(self.config.iterations):
            smashed, labels = [], []
            for device in order:
                x, y = self._batch(device)
                smashed.append(steps[device].forward(x).detach())
                labels.append(y)
            grads, loss = server_step(server_part, self.server_optimizer, smashed, labels, self.loss_fn)
            if np.isfinite(loss):
                losses.append(loss)
            for device, grad in zip(order, grads, strict=True):
                steps[device].backward(grad)
        states = [steps[d].part.state_dict() for d in order]
        weights = [float(len(self.parts[d])) for d in order]
        device_part.load_state_dict(weighted_average(states, weights))

    def fl_round(self, members: Sequence[str], losses: list[float]) -> None:
        net = self.model.net
        handed_out = {k: v.detach().clone() for k, v in net.state_dict().items()}
        states, weights = [], []
        for device in sorted(members):
            local = copy.deepcopy(net)
            local.load_state_dict(handed_out)
            local.train()
            step = LocalStep(local, self._optimizer(local), self.loss_fn)  # what the agent runs
            for _ in range(self.config.iterations):
                x, y = self._batch(device)
                losses.append(step.forward(x, y))
                step.backward()
            states.append(local.state_dict())
            weights.append(float(len(self.parts[device])))
        net.load_state_dict(weighted_average(states, weights))

    def round(self, round_: int, clusters: Sequence[Sequence[str]], cut: int | None = None) -> RehearsedRound:
        """One round over ``clusters`` (in turn) at ``cut`` (default: the config's)."""
        losses: list[float] = []
        cut = self.config.cut if cut is None else cut
        if self.config.scheme == "fl":
            self.fl_round([d for c in clusters for d in c], losses)
        else:
            for members in clusters:
                if members:
                    self.split_turn(cut, members, losses)
        accuracy, loss = evaluate(self.model.net, self.data.test_x, self.data.test_y)
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
