"""The arithmetic of split learning, free of any transport: what the agent and the server compute.

- :class:`BatchStream`: a device's endless, seeded sequence of mini-batches over its
  local samples (reshuffled every epoch), continued across rounds. Tests replay it to
  train a centralized reference on exactly the same batches.
- :func:`server_step`: one step of the server-side model on the concatenation of a
  cluster's smashed data; returns each device the gradient of its own batch's loss.
- :func:`weighted_average`: FedAvg of state dicts, weighted by sample counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


class BatchStream:
    """Mini-batches of ``indices``, reshuffled each epoch by a generator seeded once.

    The stream is a pure function of (indices, batch size, seed, batches drawn): ``seek``
    puts it at any position, so a server can tell a device where its stream stands (a
    resumed run, a device that restarted) and the batches are the ones an uninterrupted
    run would have drawn.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
        if len(indices) == 0:
            raise ValueError("a device needs at least one local sample")
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.drawn = 0  # batches drawn since the start of the stream
        self._rng = np.random.default_rng(seed)
        self._order: np.ndarray = np.empty(0, dtype=np.int64)
        self._position = 0

    def next(self) -> np.ndarray:
        """The next batch's indices; a batch never spans two epochs (the last one may be short)."""
        if self._position >= len(self._order):
            self._order = self._rng.permutation(self.indices)
            self._position = 0
        batch = self._order[self._position : self._position + self.batch_size]
        self._position += len(batch)
        self.drawn += 1
        return batch

    def seek(self, position: int) -> None:
        """Stand where a stream that has drawn ``position`` batches stands. Whole epochs are
        skipped one permutation each, so the cost is epochs, not batches."""
        if position < 0:
            raise ValueError(f"stream position {position} is negative")
        if position < self.drawn:
            self._rng = np.random.default_rng(self.seed)
            self._order, self._position, self.drawn = np.empty(0, dtype=np.int64), 0, 0
        while self.drawn < position and self._position < len(self._order):
            self.next()  # the rest of the current epoch
        per_epoch = -(-len(self.indices) // self.batch_size)
        while position - self.drawn >= per_epoch:
            self._rng.permutation(self.indices)  # an epoch not trained on: only its draw matters
            self.drawn += per_epoch
        while self.drawn < position:
            self.next()

    def take(self, count: int) -> Iterator[np.ndarray]:
        for _ in range(count):
            yield self.next()


def stream_seed(data_seed: int, device_id: str) -> int:
    """Seed of a device's batch stream: depends on the run's data seed and the device id only."""
    return (data_seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(device_id))) % (2**32)


def make_optimizer(params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class SplitStep:
    """The device's side of one split iteration, apart from any I/O: ``forward`` to the
    smashed data, then ``backward`` from the server's gradient and the optimiser step. The
    agent runs it between its sends and waits; the in-process rehearsal runs it between
    function calls; both train exactly this."""

    def __init__(self, part: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.part, self.optimizer = part, optimizer
        self._output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The smashed data of ``x`` (still in the graph: detach what you send)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._output = self.part(x)
        return self._output

    def backward(self, gradient: torch.Tensor) -> None:
        """Back-propagate the gradient of the smashed data from the last ``forward``; step."""
        output, self._output = self._output, None
        if output is None:
            raise RuntimeError("backward without a forward")
        output.backward(gradient.to(output.device, output.dtype))
        self.optimizer.step()


class LocalStep:
    """FL's step on the device: the whole model, its loss on the device's own batch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self._loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self._loss = self.loss_fn(self.model(x), y)
        return float(self._loss.detach())

    def backward(self) -> None:
        loss, self._loss = self._loss, None
        if loss is None:
            raise RuntimeError("backward without a forward")
        loss.backward()
        self.optimizer.step()


def bound_smashed(batches: list[torch.Tensor], limit: float) -> tuple[list[torch.Tensor], list[int]]:
    """Every sample's smashed data scaled down to an L2 norm of at most ``limit``; per batch,
    how many samples were. One device's data enters a server step every member of its
    cluster shares: bounded per sample, an amplified batch moves that step no more than a
    batch of ordinary samples at the bound does."""
    bounded, clipped = [], []
    for batch in batches:
        norms = batch.detach().flatten(1).norm(dim=1)
        over = norms > limit
        if bool(over.any()):
            scale = torch.where(over, limit / norms.clamp_min(1e-30), torch.ones_like(norms))
            batch = batch * scale.view(-1, *([1] * (batch.dim() - 1))).to(batch.dtype)
        bounded.append(batch)
        clipped.append(int(over.sum()))
    return bounded, clipped


def sample_norm_median(batch: torch.Tensor) -> float:
    """The median per-sample L2 norm of a batch of smashed data."""
    return float(batch.detach().flatten(1).norm(dim=1).median())


def server_step(
    server_part: nn.Module,
    optimizer: torch.optim.Optimizer,
    smashed: list[torch.Tensor],
    labels: list[torch.Tensor],
    loss_fn: nn.Module,
) -> tuple[list[torch.Tensor], float]:
    """Forward/backward/step on the concatenated batch; returns per-device gradients and the loss.

    The server part steps on the mean loss over the whole concatenated batch, as
    centralized training on the cluster's pooled batch would. Each device gets the
    gradient of the mean loss over *its own* batch, which is its slice of the pooled
    gradient times ``N / n_i`` (N pooled samples, n_i its own). Why not the bare slice:
    the slice carries a factor n_i / N, so in a cluster of k equal devices every device
    would step with lr / k and the averaged device side would learn k times slower than
    the server side on the same data (measured: SFL with 8 devices and cpsl with 2
    clusters of 4 stalled near chance for rounds). With the scaled gradient, one plain
    SGD step of every member followed by an average weighted by batch size moves the
    device side by exactly lr times the pooled gradient: the turn is centralized training
    of the whole model on the pooled batch, for both halves alike (with FedAvg's sample
    weights and equal batches it is the sample-weighted mean of the members' gradients).
    With one device the factor is 1, so SL is unchanged.

    A loss that is not finite (smashed data crafted to overflow, say) is not
    back-propagated: the server part is left as it was and every device gets a zero
    gradient.
    """
    inputs = torch.cat(smashed).detach().requires_grad_(True)
    targets = torch.cat(labels)
    sizes = [len(part) for part in smashed]
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(server_part(inputs), targets)
    value = float(loss.detach())
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        return [torch.zeros_like(part) for part in smashed], value
    loss.backward()
    gradients = [inputs.grad, *(p.grad for p in server_part.parameters() if p.grad is not None)]
    if not all(bool(torch.isfinite(g).all()) for g in gradients):
        optimizer.zero_grad(set_to_none=True)
        return [torch.zeros_like(part) for part in smashed], math.nan
    optimizer.step()
    total = sum(sizes)
    slices = torch.split(inputs.grad.detach(), sizes)
    return [part * (total / size) for part, size in zip(slices, sizes, strict=True)], value


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg: sum_k w_k * state_k / sum_k w_k, key by key; integer buffers take the first state's value."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state, and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    averaged = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            averaged[key] = sum(state[key].double() * (w / total) for state, w in zip(states, weights, strict=True)).to(
                first.dtype
            )
        else:  # e.g. BatchNorm's num_batches_tracked
            averaged[key] = first.clone()
    return averaged


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode; restores its train/eval mode."""
    was_training = model.training
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    correct, loss = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        loss += float(loss_fn(logits, target))
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return correct / max(1, len(labels)), loss / max(1, len(labels))
