"""The seam between a round and whatever carries its messages to the devices.

A round needs few verbs (NVIDIA FLARE's broadcast / send / relay-and-wait, reduced to what
a CPSL turn exchanges): ``send`` a device a message, ``collect`` one kind of reply from a
set of devices by a deadline, ``flush`` what was sent, count what it refuses, read the
devices' timing reports, and serve the intake while it waits. :class:`MqttLink` carries
them over the broker (the endpoint, the intake's checks, the registry's view of who is
online); the round code (edge_server.rounds) knows nothing else of the network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch

from edge_server.intake import Intake
from edge_server.records import DeviceRestartedError, RoundStats
from edge_server.registry import Registry
from toolkit.protocol import Kind, topics
from toolkit.protocol import messages as m
from toolkit.protocol.endpoint import Endpoint, Received

log = logging.getLogger("cpsl.server")

Check = Callable[[Received], str | None]


class Link(Protocol):
    def send(
        self,
        device: str,
        kind: Kind,
        body: m.Body,
        round_: int,
        iteration: int = 0,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> int:
        """Send ``device`` one message; returns the bytes it took."""

    def collect(
        self,
        kind: Kind,
        round_: int,
        iteration: int,
        expected: set[str],
        stats: RoundStats,
        deadline: float,
        check: Check | None = None,
    ) -> dict[str, Received]:
        """One ``kind`` for this round and iteration from each expected device, by ``deadline``
        (monotonic). A device that left, or sent nothing in time, goes into ``stats.dropped``;
        one back as a new agent life raises DeviceRestartedError while the turn may start
        again; a reply failing ``check`` is refused and counted, and its device stays expected."""

    def flush(self, what: str) -> bool:
        """Wait until what was sent has left; False (logged, counted) if it did not in time."""

    def count(self, reason: str) -> None:
        """Count an event of the round under the link's refusals (a non-finite server loss)."""

    def refuse(self, device: str, reason: str) -> None:
        """Count a reply refused after it was collected (an outlier update)."""

    def reports(self, round_: int, devices: list[str], wait_s: float) -> dict[str, m.Timings]:
        """The devices' timing reports of the round, waiting up to ``wait_s`` for missing ones."""

    def session_of(self, device: str) -> str:
        """The device's current agent life."""


class MqttLink:
    """The round's verbs over the broker."""

    def __init__(
        self,
        endpoint: Endpoint,
        intake: Intake,
        registry: Registry,
        run_id: str,
        reconnect_grace_s: float,
        flush_timeout_s: float,
    ) -> None:
        self.endpoint, self.intake, self.registry, self.run_id = endpoint, intake, registry, run_id
        self.reconnect_grace_s, self.flush_timeout_s = reconnect_grace_s, flush_timeout_s

    def send(
        self,
        device: str,
        kind: Kind,
        body: m.Body,
        round_: int,
        iteration: int = 0,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> int:
        return self.endpoint.send(
            topics.down(self.run_id, device),
            kind,
            body,
            run=self.run_id,
            device=device,
            round_=round_,
            iteration=iteration,
            tensors=tensors,
        )

    def flush(self, what: str) -> bool:
        return self.endpoint.flush(self.flush_timeout_s, what)

    def count(self, reason: str) -> None:
        self.endpoint.count(reason)

    def refuse(self, device: str, reason: str) -> None:
        self.endpoint.reject(topics.up(self.run_id, device), reason)

    def session_of(self, device: str) -> str:
        return self.registry.devices[device].session

    def poll(self, timeout_s: float) -> Received | None:
        """The next message for the run, after registry traffic and the intake's checks."""
        item = self.intake.poll(timeout_s)
        for device in self.registry.take_announced():  # back after a reconnect: what it may have missed
            self.endpoint.replay(topics.down(self.run_id, device))
        return item

    def serve(self, timeout_s: float) -> None:
        """Serve the intake (registrations, timings, refusals) outside a collection; a turn's
        message that arrives here answers no open request, and is counted as such."""
        item = self.poll(timeout_s)
        if item is not None:
            where = f"round {item.message.header.round} iteration {item.message.header.iteration}"
            self.endpoint.reject(item.topic, f"{item.message.kind.name} for {where} outside a collection")

    def reports(self, round_: int, devices: list[str], wait_s: float) -> dict[str, m.Timings]:
        timings = self.intake.timings
        deadline = time.monotonic() + wait_s
        while any((round_, d) not in timings for d in devices) and time.monotonic() < deadline:
            self.serve(0.1)
        return {d: timings[(round_, d)] for d in devices if (round_, d) in timings}

    def collect(
        self,
        kind: Kind,
        round_: int,
        iteration: int,
        expected: set[str],
        stats: RoundStats,
        deadline: float,
        check: Check | None = None,
    ) -> dict[str, Received]:
        got: dict[str, Received] = {}
        while expected - got.keys() - stats.dropped:
            for device in expected - got.keys():
                # gone for good, or back as a new agent life (restarted: its turn is lost with it;
                # a split turn is then started again with it, while it may be)
                record = self.registry.devices.get(device)
                restarted = record is not None and stats.sessions.get(device, record.session) != record.session
                if restarted and stats.replays_left > 0 and self.registry.is_online(device):
                    raise DeviceRestartedError(device)
                left = restarted or self.registry.has_left(device, self.reconnect_grace_s)
                if device not in stats.dropped and left:
                    log.warning("device %s is offline: dropped from round %d", device, round_)
                    stats.dropped.add(device)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for device in expected - got.keys() - stats.dropped:
                    log.warning(
                        "device %s sent no %s for round %d iteration %d in time: dropped from the round",
                        device,
                        kind.name,
                        round_,
                        iteration,
                    )
                    stats.dropped.add(device)
                break
            item = self.poll(min(remaining, 0.5))
            if item is None:
                continue
            message, device = item.message, item.message.header.device
            if message.kind is not kind or message.header.round != round_ or message.header.iteration != iteration:
                where = f"round {message.header.round} iteration {message.header.iteration}"
                self.endpoint.reject(item.topic, f"unexpected {message.kind.name} for {where} (late or early)")
                continue
            if device not in expected or device in stats.dropped:
                self.endpoint.reject(item.topic, f"{device} is not active in this cluster")
                continue
            turn = getattr(message.body, "turn", None)
            if turn is not None and stats.turn_token is not None and turn != stats.turn_token:
                self.endpoint.reject(item.topic, f"{kind.name} answers an earlier hand-out (the turn started again)")
                continue
            problem = check(item) if check is not None else None
            if problem:
                self.endpoint.reject(item.topic, problem)
                continue
            got[device] = item
        return got
