"""The round's link with the devices in this process: the same turn code, no network.

Each :class:`InMemoryDevice` answers as an agent does (firmware_agent.agent): an ASSIGN sets
its turn, the weights start it (the first smashed data of a split turn, or all of an FL
round's local steps and the trained weights), each gradient steps it and brings the next
smashed data or, after the last iteration, the trained weights. It trains with the agent's
own step (toolkit.training.SplitStep, LocalStep), draws the agent's batch stream, and
encodes what crosses the cut with the agent's encodings; replies are the protocol's
messages, checked by the server's intake checks as over MQTT. Nothing is timed here: the
replies are there when the round collects them, so deadlines and slots cost nothing.

Used by the advisor's rehearsal (edge_server.rehearsal) and by tests of the turn code.
"""

from __future__ import annotations

import copy
import time
from collections import Counter

import numpy as np
import torch
from torch import nn

from edge_server.records import RoundStats
from toolkit import compression
from toolkit.compression import Encoding
from toolkit.data import Dataset
from toolkit.protocol import Kind, make_header
from toolkit.protocol import messages as m
from toolkit.protocol.codec import Message
from toolkit.protocol.endpoint import Received, reason_key
from toolkit.training import BatchStream, LocalStep, SplitStep, make_optimizer, stream_seed

SESSION = "in-process"


class InMemoryDevice:
    def __init__(self, device_id: str, net: nn.Sequential, data: Dataset, indices: np.ndarray) -> None:
        self.id, self.data, self.indices = device_id, data, indices
        self.net = copy.deepcopy(net)  # the structure; every turn loads the weights handed out
        self.assignment: m.Assign | None = None
        self.stream: BatchStream | None = None
        self.step: SplitStep | LocalStep | None = None
        self.labels: torch.Tensor | None = None
        self.smashed_shape: tuple[int, ...] = ()

    def receive(self, kind: Kind, body: m.Body, tensors: dict[str, torch.Tensor], round_: int, iteration: int):
        """The replies to one message, as (kind, body, tensors, iteration)."""
        if kind is Kind.ASSIGN:
            self.assignment = body
            return []
        a = self.assignment
        if kind is Kind.WEIGHTS_DOWN and a is not None:
            part = self.net if a.cut is None else self.net[: a.cut]
            part.load_state_dict(tensors, strict=True)
            part.train()
            optimizer = make_optimizer(list(part.parameters()), a.hyper.lr, a.hyper.momentum, a.hyper.weight_decay)
            self.stream = BatchStream(self.indices, a.hyper.batch_size, stream_seed(a.data_seed, self.id))
            self.stream.seek(a.stream_position or 0)
            if a.cut is None:
                step = LocalStep(part, optimizer)
                for batch in self.stream.take(a.hyper.iterations):
                    step.forward(self.data.train_x[batch], self.data.train_y[batch])
                    step.backward()
                return [self._weights_up(part)]
            self.step = SplitStep(part, optimizer)
            return [self._smashed(0)]
        if kind is Kind.GRADIENT and a is not None and self.step is not None:
            gradient = compression.decode("grad", tensors, Encoding.parse(body.encoding), "sample", self.smashed_shape)
            self.step.backward(gradient)
            if iteration + 1 < a.hyper.iterations:
                return [self._smashed(iteration + 1)]
            return [self._weights_up(self.step.part)]
        return []  # STOP, PROBE: nothing to say in process

    def _smashed(self, iteration: int):
        batch = self.stream.next()
        x, y = self.data.train_x[batch], self.data.train_y[batch]
        smashed = self.step.forward(x)
        self.smashed_shape = tuple(smashed.shape)
        encoding = Encoding.parse(self.assignment.compression.smashed)
        wire = compression.encode("smashed", smashed.detach(), encoding)
        body = m.Smashed(turn=self.assignment.turn, encoding=encoding.name)
        return Kind.SMASHED, body, {**wire, "labels": y}, iteration

    def _weights_up(self, part: nn.Module):
        state = {k: v.detach().clone() for k, v in part.state_dict().items()}
        body = m.WeightsUp(num_samples=len(self.indices), turn=self.assignment.turn)
        return Kind.WEIGHTS_UP, body, state, 0


class InMemoryLink:
    """:class:`edge_server.link.Link` over :class:`InMemoryDevice` objects."""

    def __init__(self, devices: dict[str, InMemoryDevice], run_id: str = "in-process") -> None:
        self.devices, self.run_id = devices, run_id
        self.outbox: list[Received] = []
        self.refused: Counter[str] = Counter()

    def send(self, device, kind, body, round_, iteration=0, tensors=None) -> int:
        for reply_kind, reply, reply_tensors, at in self.devices[device].receive(
            kind, body, tensors or {}, round_, iteration
        ):
            header = make_header(self.run_id, device, round_=round_, iteration=at)
            message = Message(reply_kind, header, reply, dict(reply_tensors))
            now = time.time()
            self.outbox.append(Received(f"in-process/{device}", message, 0, time.monotonic(), now))
        return sum(t.numel() * t.element_size() for t in (tensors or {}).values())

    def collect(self, kind, round_, iteration, expected, stats: RoundStats, deadline, check=None):
        got: dict[str, Received] = {}
        kept = []
        for item in self.outbox:
            message = item.message
            device = message.header.device
            wanted = message.kind is kind and message.header.round == round_ and message.header.iteration == iteration
            if not wanted or device not in expected or device in got:
                kept.append(item)
                continue
            problem = check(item) if check is not None else None
            if problem:
                self.refused[reason_key(problem)] += 1
                continue
            got[device] = item
        self.outbox = kept
        for device in expected - got.keys():
            stats.dropped.add(device)  # its reply failed the checks: as over MQTT, it sits the round out
        return got

    def flush(self, what: str) -> bool:
        return True

    def count(self, reason: str) -> None:
        self.refused[reason] += 1

    def refuse(self, device: str, reason: str) -> None:
        self.refused[reason_key(reason)] += 1

    def reports(self, round_: int, devices: list[str], wait_s: float) -> dict[str, m.Timings]:
        return {}  # nothing is timed in process

    def session_of(self, device: str) -> str:
        return SESSION
