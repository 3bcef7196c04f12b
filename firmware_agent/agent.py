"""The device agent: registers with its profile, then serves the edge server's commands.

A daemon in the Flower SuperNode sense: it stays connected across runs and trains
whatever the server assigns. All work happens on the main thread; the transport's
thread only decodes and queues (``toolkit.protocol.endpoint``), and a small thread
sends heartbeats. Raw inputs never leave :meth:`DeviceAgent._train_turn`: only
smashed data (cut-layer activations), labels, weights and timings are published.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from toolkit.data import Dataset
from toolkit.models import LayeredModel, load_model
from toolkit.protocol import Kind, topics
from toolkit.protocol import messages as m
from toolkit.protocol.codec import Message, encode, make_header
from toolkit.protocol.endpoint import Endpoint, Received
from toolkit.training import BatchStream, make_optimizer
from toolkit.transport import BrokerAddress, MqttTransport, Will

log = logging.getLogger("cpsl.agent")

IDLE_RUN = "idle"  # run id used on messages sent outside any run (registration, heartbeats)


@dataclass
class AgentConfig:
    broker: BrokerAddress
    device_id: str
    partition: str = "0/1"
    seed: int = 0
    heartbeat_s: float = 2.0
    connect_timeout_s: float = 10.0
    threads: int = 1
    model_hint: str = ""
    model_fingerprint: str = ""


class TurnAbortedError(Exception):
    """The server stopped the run or moved on; the current cluster turn is abandoned."""


class DeviceAgent:
    def __init__(self, config: AgentConfig, data: Dataset, indices: np.ndarray, profile_json: bytes | None) -> None:
        self.config = config
        self.data = data
        self.indices = np.asarray(indices)
        self.profile_json = profile_json
        self.endpoint = Endpoint(config.device_id)
        self.started = time.monotonic()
        self.state = "idle"
        self.assignment: m.Assign | None = None
        self.assigned_run = ""
        self.assigned_round = -1
        self._model: LayeredModel | None = None
        self._streams: dict[tuple[str, int], BatchStream] = {}
        self._stop = threading.Event()
        self._uplink_epoch: float | None = None  # server clock; the current iteration's slots count from it

    # lifecycle ---------------------------------------------------------------------------
    def _offline_frame(self, reason: str) -> bytes:
        header = make_header(IDLE_RUN, self.config.device_id, seq=self.endpoint.next_seq())
        return encode(Kind.OFFLINE, header, m.Offline(reason=reason))

    def warm_up(self) -> None:
        """Build the model we expect to train and run one training step on a dummy batch.

        Torch's first forward and backward pay one-off costs (kernel selection, allocator
        growth, lazy imports), and so does the first optimiser step (it imports
        torch._dynamo, some 800 modules): about 1 s of CPU, which a board at 8% of a core
        turns into 12 s -- measured on the testbed as a first round of sl eight times 12 s
        longer than the rest. Paid here, before registering, it does not stall the first
        round. The model is kept if the server assigns the same one.
        """
        warm_up_optimizer()
        if not self.config.model_hint:
            return
        try:
            model = load_model(self.config.model_hint)
        except Exception as exc:  # an unknown hint: the server's ASSIGN decides anyway
            log.info("no warm-up: cannot build %s (%s)", self.config.model_hint, exc)
            return
        started = time.monotonic()
        batch = torch.zeros(2, *model.input_shape)
        nn.functional.cross_entropy(model.net(batch), torch.zeros(2, dtype=torch.int64)).backward()
        model.net.zero_grad(set_to_none=True)
        self._model = model
        log.info("warmed up %s in %.1f s", model.name, time.monotonic() - started)

    def start(self) -> None:
        self.warm_up()
        status = topics.device_status(self.config.device_id)
        transport = MqttTransport(
            self.config.broker,
            client_id=f"cpsl-agent-{self.config.device_id}",
            on_message=self.endpoint.on_frame,
            will=Will(status, self._offline_frame("connection lost"), qos=1, retain=True),
        )
        self.endpoint.attach(transport)
        transport.subscribe(topics.all_down_for(self.config.device_id), qos=1)
        transport.connect(self.config.connect_timeout_s)
        self._register()
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        log.info(
            "%s registered at %s with %d samples", self.config.device_id, self.config.broker.url, len(self.indices)
        )

    def _register(self) -> None:
        tensors = {}
        if self.profile_json is not None:
            tensors["profile"] = torch.frombuffer(bytearray(self.profile_json), dtype=torch.uint8)
        body = m.Register(
            num_samples=len(self.indices),
            partition=self.config.partition,
            capabilities=m.Capabilities(board=_board(), torch=torch.__version__, threads=self.config.threads),
            model=self.config.model_hint,
            model_fingerprint=self.config.model_fingerprint,
        )
        self.endpoint.send(
            topics.device_status(self.config.device_id),
            Kind.REGISTER,
            body,
            run=IDLE_RUN,
            device=self.config.device_id,
            tensors=tensors,
            retain=True,
        )

    def _heartbeats(self) -> None:
        topic = topics.device_heartbeat(self.config.device_id)
        while not self._stop.wait(self.config.heartbeat_s):
            body = m.Heartbeat(state=self.state, uptime_s=time.monotonic() - self.started)
            try:
                self.endpoint.send(topic, Kind.HEARTBEAT, body, run=IDLE_RUN, device=self.config.device_id)
            except Exception:  # a heartbeat must never kill the agent
                log.debug("heartbeat not sent", exc_info=True)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Say goodbye properly: a retained OFFLINE replaces our registration, then disconnect."""
        self._stop.set()
        transport = self.endpoint.transport
        if transport is None:
            return
        if transport.connected:
            transport.publish(
                topics.device_status(self.config.device_id), self._offline_frame("agent stopped"), qos=1, retain=True
            )
            transport.flush(2.0)
        transport.close()

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            item = self.endpoint.receive(0.5)
            if item is not None:
                self.handle(item)

    # commands ----------------------------------------------------------------------------
    def handle(self, item: Received) -> None:
        message = item.message
        if message.kind is Kind.ASSIGN:
            self._accept_assignment(message)
        elif message.kind is Kind.WEIGHTS_DOWN:
            if (message.header.run, message.header.round) != (self.assigned_run, self.assigned_round):
                log.warning(
                    "weights for run %s round %d do not match the assignment; ignored",
                    message.header.run,
                    message.header.round,
                )
                return
            try:
                self._train_turn(message)
            except TurnAbortedError as reason:
                log.warning("turn abandoned: %s", reason)
            finally:
                self.state = "idle"
        elif message.kind is Kind.PROBE:
            self._echo(item)
        elif message.kind is Kind.STOP:
            log.info("run %s stopped: %s", message.header.run, message.body.reason)
            self.assignment = None
        else:
            log.debug("ignoring %s outside a turn", message.kind.name)

    def _echo(self, item: Received) -> None:
        """Answer a link probe at once: when the probe arrived, and the payload asked for."""
        probe: m.Probe = item.message.body
        tensors = {}
        if probe.echo_bytes:
            tensors["payload"] = torch.zeros(probe.echo_bytes, dtype=torch.uint8)
        body = m.ProbeEcho(probe_id=probe.probe_id, received_at=item.arrived_wall)
        self.endpoint.send(
            topics.up(item.message.header.run, self.config.device_id),
            Kind.PROBE_ECHO,
            body,
            run=item.message.header.run,
            device=self.config.device_id,
            round_=item.message.header.round,
            tensors=tensors,
        )

    def _accept_assignment(self, message: Message) -> None:
        body: m.Assign = message.body
        if self._model is None or self._model.name != body.model or self._model.fingerprint() != body.model_fingerprint:
            try:
                model = load_model(body.model, tuple(body.input_shape), body.num_classes)
            except Exception as exc:  # the server asked for something we cannot build
                log.error("cannot build model %s for run %s: %s", body.model, message.header.run, exc)
                return
            if model.fingerprint() != body.model_fingerprint:
                log.error(
                    "model %s here has fingerprint %s, the server's has %s: not training",
                    body.model,
                    model.fingerprint(),
                    body.model_fingerprint,
                )
                return
            self._model = model
        if body.cut is not None and not 1 <= body.cut < self._model.num_layers:
            log.error("assignment names cut %d, which %s does not have", body.cut, body.model)
            return
        self.assignment = body
        self.assigned_run, self.assigned_round = message.header.run, message.header.round

    def _stream(self, run: str, batch_size: int) -> BatchStream:
        key = (run, batch_size)
        if key not in self._streams:
            seed = stream_seed(self.assignment.data_seed, self.config.device_id)
            self._streams[key] = BatchStream(self.indices, batch_size, seed)
        return self._streams[key]

    def _train_turn(self, weights: Message) -> None:
        a = self.assignment
        run, round_ = weights.header.run, weights.header.round
        part: nn.Module = self._model.net if a.cut is None else self._model.net[: a.cut]
        try:
            part.load_state_dict(weights.tensors, strict=True)
        except (RuntimeError, KeyError) as exc:
            log.error("weights for round %d do not fit the model: %s", round_, str(exc).splitlines()[0])
            return
        self.state = "training"
        part.train()
        up = topics.up(run, self.config.device_id)
        optimizer = make_optimizer(list(part.parameters()), a.hyper.lr, a.hyper.momentum, a.hyper.weight_decay)
        stream = self._stream(run, a.hyper.batch_size)
        self._uplink_epoch = weights.body.uplink_epoch
        started = time.monotonic()
        timings = []
        for iteration, batch in enumerate(stream.take(a.hyper.iterations)):
            x, y = self.data.train_x[batch], self.data.train_y[batch]
            if a.cut is None:
                timings.append(self._local_step(part, optimizer, x, y, iteration))
            else:
                timings.append(self._split_step(part, optimizer, x, y, run, round_, iteration, up))
        state = {k: v.detach() for k, v in part.state_dict().items()}
        if a.cut is not None:
            self._wait_until_granted(a.grant.weights_slot_offset_s)
        weights_up_start = time.time()
        sent = self.endpoint.send(
            up,
            Kind.WEIGHTS_UP,
            m.WeightsUp(num_samples=len(self.indices)),
            run=run,
            device=self.config.device_id,
            round_=round_,
            tensors=state,
        )
        self.endpoint.transport.flush(a.gradient_timeout_s)
        report = m.Timings(
            iterations=timings,
            weights_down_bytes=_nbytes(weights.tensors),
            weights_up_bytes=sent,
            turn_s=time.monotonic() - started,
            weights_up_start_at=weights_up_start,
            weights_up_end_at=time.time(),
        )
        self.endpoint.send(up, Kind.TIMINGS, report, run=run, device=self.config.device_id, round_=round_)
        self.endpoint.transport.flush(10.0)

    def _local_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, x, y, iteration: int
    ) -> m.IterationTiming:
        """FL: the whole model trains here."""
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        optimizer.step()
        t2 = time.perf_counter()
        return m.IterationTiming(
            iteration=iteration,
            forward_s=t1 - t0,
            backward_s=t2 - t1,
            upload_s=0.0,
            wait_gradient_s=0.0,
            up_bytes=0,
            down_bytes=0,
        )

    def _wait_for_slot(self) -> tuple[float, float]:
        """Hold the upload until this iteration's slot opens; returns (waited, late) seconds.

        No slot granted, or no epoch from the server: send at once. A device whose forward
        pass ends after its slot opened sends at once and reports how late it was.
        """
        grant = self.assignment.grant
        return self._wait_until_granted(grant.slot_offset_s if grant.slot_duration_s is not None else None)

    def _wait_until_granted(self, offset_s: float | None) -> tuple[float, float]:
        """Wait until ``epoch + clock offset + offset_s``; (waited, late). None: no slot, go now."""
        if offset_s is None or self._uplink_epoch is None:
            return 0.0, 0.0
        opens = self._uplink_epoch + self.assignment.grant.clock_offset_s + offset_s
        delay = opens - time.time()
        if delay <= 0:
            return 0.0, -delay
        # never wait past the gradient timeout: a bad epoch must not freeze the device
        self._stop.wait(min(delay, self.assignment.gradient_timeout_s))
        return delay, 0.0

    def _split_step(self, part, optimizer, x, y, run: str, round_: int, iteration: int, up: str) -> m.IterationTiming:
        a = self.assignment
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        smashed = part(x)
        t1 = time.perf_counter()
        waited, late = self._wait_for_slot()
        upload_start = time.time()
        t_send = time.perf_counter()
        sent = self.endpoint.send(
            up,
            Kind.SMASHED,
            m.Smashed(),
            run=run,
            device=self.config.device_id,
            round_=round_,
            iteration=iteration,
            tensors={"smashed": smashed.detach(), "labels": y},
        )
        self.endpoint.transport.flush(a.gradient_timeout_s)
        upload_end = time.time()
        t2 = time.perf_counter()
        received = self._wait_gradient(run, round_, iteration, a.gradient_timeout_s)
        gradient = received.message
        t3 = time.perf_counter()
        grad = gradient.tensors.get("grad")
        if grad is None or grad.shape != smashed.shape or grad.dtype != smashed.dtype:
            raise TurnAbortedError(f"gradient for iteration {iteration} has the wrong shape or dtype")
        smashed.backward(grad)
        optimizer.step()
        t4 = time.perf_counter()
        self._uplink_epoch = gradient.body.uplink_epoch
        transit = received.arrived_wall - a.grant.clock_offset_s - gradient.header.sent_at
        return m.IterationTiming(
            iteration=iteration,
            forward_s=t1 - t0,
            backward_s=t4 - t3,
            upload_s=t2 - t_send,
            wait_gradient_s=t3 - t2,
            up_bytes=sent,
            down_bytes=_nbytes(gradient.tensors),
            upload_start_at=upload_start,
            upload_end_at=upload_end,
            slot_wait_s=waited,
            slot_late_s=late,
            gradient_transit_s=max(0.0, transit),
        )

    def _wait_gradient(self, run: str, round_: int, iteration: int, timeout_s: float) -> Received:
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set():
            item = self.endpoint.receive(deadline - time.monotonic())
            if item is None:
                if time.monotonic() >= deadline:
                    raise TurnAbortedError(f"no gradient for iteration {iteration} within {timeout_s:g} s")
                continue
            message = item.message
            header = message.header
            if message.kind is Kind.GRADIENT and (header.run, header.round, header.iteration) == (
                run,
                round_,
                iteration,
            ):
                return item
            if message.kind is Kind.PROBE:
                self._echo(item)
                continue
            if message.kind in (Kind.STOP, Kind.ASSIGN) and header.run == run:
                self.handle(item)
                raise TurnAbortedError(f"server sent {message.kind.name} during the turn")
            log.debug(
                "ignoring %s (round %d, iteration %d) while waiting", message.kind.name, header.round, header.iteration
            )
        raise TurnAbortedError("agent is stopping")


def warm_up_optimizer() -> None:
    """One SGD step on a scratch tensor: the first step anywhere imports torch._dynamo."""
    scratch = torch.zeros(1, requires_grad=True)
    scratch.grad = torch.zeros(1)
    make_optimizer([scratch], lr=0.1, momentum=0.9, weight_decay=0.0).step()


def stream_seed(data_seed: int, device_id: str) -> int:
    """Seed of a device's batch stream: depends on the run's data seed and the device id only."""
    return (data_seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(device_id))) % (2**32)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _board() -> str:
    from toolkit.profiler.device_info import board_name

    return board_name()
