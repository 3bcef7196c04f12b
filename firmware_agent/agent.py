"""The device agent: registers with its profile, then serves the edge server's commands.

A daemon in the Flower SuperNode sense: it stays connected across runs and trains
whatever the server assigns. All work happens on the main thread; the transport's
thread only decodes and queues (``toolkit.protocol.endpoint``), and a small thread
sends heartbeats. Raw inputs never leave :meth:`DeviceAgent._train_turn`: only
smashed data (cut-layer activations), labels, weights and timings are published.

Nothing received names code. The agent trains only the models its owner configured
(``AgentConfig.models``: built-in names or the owner's own ``file.py:function`` specs),
built for the input shape and classes of its own data; an ASSIGN naming anything else,
or another shape, is refused with a REJECT the server counts, and the agent keeps
serving. No message can end the serve loop: a handler that fails costs that message.
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from firmware_agent.health import write_health
from toolkit import compression
from toolkit.compression import Encoding
from toolkit.data import Dataset
from toolkit.devices import accelerator_kind, accelerator_name, resolve_device, synchronize
from toolkit.models import LayeredModel, load_model
from toolkit.models.registry import canonical_name
from toolkit.protocol import Kind, topics
from toolkit.protocol import messages as m
from toolkit.protocol.codec import Message, ProtocolError, encode, make_header
from toolkit.protocol.endpoint import Endpoint, Received
from toolkit.training import BatchStream, LocalStep, SplitStep, make_optimizer, stream_seed
from toolkit.transport import BrokerAddress, MqttTransport, Will

log = logging.getLogger("cpsl.agent")

IDLE_RUN = "idle"  # run id used on messages sent outside any run (registration, heartbeats)
REREGISTER_MIN_S = 1.0  # a server status makes the agent register again at most this often
CLOSE_FLUSH_S = 0.5  # how long a stopping agent waits for its goodbye to be acknowledged
CLOSE_JOIN_S = 0.5  # and for the network thread to end
MAX_STREAMS = 8  # batch streams kept, one per (run, batch size): an agent serves run after run


@dataclass
class AgentConfig:
    broker: BrokerAddress
    device_id: str
    partition: str = "0/1"
    seed: int = 0
    heartbeat_s: float = 2.0
    connect_timeout_s: float = 10.0
    # MQTT keepalive. Both ends count only complete packets as signs of life: Mosquitto drops a
    # client it has not heard a whole packet from in 1.5x this, and paho gives up when a ping's
    # answer queues behind a large message for this long. So it must exceed the longest single
    # transfer the device makes (a whole model for FL on a slow, shared link).
    keepalive_s: int = 60
    threads: int = 1
    # The models this device may train, as its owner configured them (--model, or the config
    # file): built-in names or user specs. The first is warmed up and announced.
    models: tuple[str, ...] = ("lenet5",)
    model_fingerprint: str = ""
    max_probe_bytes: int = m.MAX_PROBE_BYTES
    health_file: Path | None = None  # refreshed every heartbeat (firmware_agent/health.py)
    # Where the device side trains: cpu, cuda, cuda:N or auto (toolkit.devices). Weights, smashed
    # data and gradients cross the wire as CPU tensors; only the layers and the batch live there.
    device: str = "cpu"


class RefusedError(Exception):
    """A command this device will not carry out; the message is the reason sent to the server."""


class TurnAbortedError(Exception):
    """The server stopped the run or moved on; the current cluster turn is abandoned."""


class DeviceAgent:
    def __init__(self, config: AgentConfig, data: Dataset, indices: np.ndarray, profile_json: bytes | None) -> None:
        self.config = config
        self.data = data
        self.indices = np.asarray(indices)
        self.profile_json = profile_json
        self.placement = resolve_device(config.device)
        self.endpoint = Endpoint(config.device_id)
        self.session = secrets.token_hex(16)  # repeated in our OFFLINE frames, last will included
        self.started = time.monotonic()
        self.state = "idle"
        self.assignment: m.Assign | None = None
        self.assigned_run = ""
        self.assigned_round = -1
        self._model: LayeredModel | None = None
        self._built: dict[str, LayeredModel] = {}  # configured spec -> model built for our data
        self.failures = 0  # messages whose handling failed; the loop went on
        self._streams: dict[tuple[str, int], BatchStream] = {}
        self._stop = threading.Event()
        self._uplink_epoch: float | None = None  # server clock; the current iteration's slots count from it
        self._server_run = ""  # the run of the last edge server seen online
        self._registered_at = -REREGISTER_MIN_S
        self._early_weights: Message | None = None  # weights that overtook their ASSIGN

    # lifecycle ---------------------------------------------------------------------------
    def _offline_frame(self, reason: str) -> bytes:
        header = make_header(IDLE_RUN, self.config.device_id, seq=self.endpoint.next_seq())
        return encode(Kind.OFFLINE, header, m.Offline(session=self.session, reason=reason))

    def _build(self, spec: str) -> LayeredModel:
        """A configured model, built once for the shape and classes of this device's data."""
        if spec not in self._built:
            model = load_model(spec, self.data.input_shape, self.data.num_classes)
            model.net.to(self.placement)
            self._built[spec] = model
        return self._built[spec]

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
        if not self.config.models:
            return
        try:
            model = self._build(self.config.models[0])
        except Exception as exc:  # the owner's model does not build for this data: every ASSIGN will say so
            log.warning("no warm-up: cannot build %s (%s)", self.config.models[0], exc)
            return
        started = time.monotonic()
        batch = torch.zeros(2, *model.input_shape, device=self.placement)
        labels = torch.zeros(2, dtype=torch.int64, device=self.placement)
        nn.functional.cross_entropy(model.net(batch), labels).backward()
        model.net.zero_grad(set_to_none=True)
        synchronize(self.placement)
        self._model = model
        log.info(
            "warmed up %s on %s in %.1f s", model.name, accelerator_name(self.placement), time.monotonic() - started
        )

    def start(self) -> None:
        self.warm_up()
        status = topics.device_status(self.config.device_id)
        transport = MqttTransport(
            self.config.broker,
            client_id=f"cpsl-agent-{self.config.device_id}-{secrets.token_hex(4)}",
            on_message=self.endpoint.on_frame,
            will=Will(status, self._offline_frame(m.CONNECTION_LOST), qos=1, retain=True),
            keepalive_s=self.config.keepalive_s,
            # a broker restarted without persistence has forgotten the retained registration,
            # and a blip's last will has replaced it: register again on every reconnect, and
            # send again the last messages, which the restart may have lost in flight
            on_reconnect=self._reconnected,
        )
        self.endpoint.attach(transport)
        transport.subscribe(topics.all_down_for(self.config.device_id), qos=1)
        transport.subscribe(topics.server_status(), qos=1)
        transport.connect(self.config.connect_timeout_s)
        self._register()
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        log.info(
            "%s registered at %s with %d samples", self.config.device_id, self.config.broker.url, len(self.indices)
        )

    def _reconnected(self) -> None:
        """Announce ourselves again, and send again what may have been lost in flight."""
        self._register()
        self.endpoint.replay()

    def _register(self) -> None:
        self._registered_at = time.monotonic()
        tensors = {}
        if self.profile_json is not None:
            tensors["profile"] = torch.frombuffer(bytearray(self.profile_json), dtype=torch.uint8)
        body = m.Register(
            session=self.session,
            num_samples=len(self.indices),
            partition=self.config.partition,
            capabilities=m.Capabilities(
                board=_board(),
                torch=torch.__version__,
                threads=self.config.threads,
                accelerator=accelerator_kind(self.placement),
                accelerator_name=accelerator_name(self.placement),
            ),
            model=self.config.models[0] if self.config.models else "",
            model_fingerprint=self.config.model_fingerprint,
            models=list(self.config.models),
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
        while True:
            self._report_health()
            if self._stop.wait(self.config.heartbeat_s):
                return
            body = m.Heartbeat(state=self.state, uptime_s=time.monotonic() - self.started)
            try:
                self.endpoint.send(topic, Kind.HEARTBEAT, body, run=IDLE_RUN, device=self.config.device_id)
            except Exception:  # a heartbeat must never kill the agent
                log.debug("heartbeat not sent", exc_info=True)

    def _report_health(self) -> None:
        if self.config.health_file is None:
            return
        transport = self.endpoint.transport
        connected = transport is not None and transport.connected
        try:
            write_health(self.config.health_file, self.config.device_id, connected, self.state)
        except OSError as exc:
            log.warning("cannot write the health file %s: %s", self.config.health_file, exc)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def batch_streams(self) -> list[tuple[str, int]]:
        """The (run, batch size) of each batch stream kept, oldest first."""
        return list(self._streams)

    def close(self) -> None:
        """Say goodbye properly: a retained OFFLINE replaces our registration, then disconnect.

        Bounded to about a second whatever the link does (a service manager, or the
        operator, waits on it): the goodbye gets half a second to be acknowledged, and a
        network thread still in a connection attempt is left behind (it is a daemon)."""
        self._stop.set()
        transport = self.endpoint.transport
        if transport is None:
            return
        if transport.connected:
            transport.publish(
                topics.device_status(self.config.device_id), self._offline_frame("agent stopped"), qos=1, retain=True
            )
            self.endpoint.flush(CLOSE_FLUSH_S, "the goodbye")
        transport.close(CLOSE_JOIN_S)

    def serve_forever(self) -> None:
        """Serve until stopped; no message ends the loop, whatever it says or however it fails."""
        while not self._stop.is_set():
            item = self.endpoint.receive(0.5)
            if item is not None:
                self.handle_safely(item)

    def handle_safely(self, item: Received) -> None:
        try:
            self.handle(item)
        except Exception:
            self.failures += 1
            log.exception("handling %s failed; serving on", item.message.kind.name)
            self.state = "idle"

    # commands ----------------------------------------------------------------------------
    def handle(self, item: Received) -> None:
        message = item.message
        if message.kind is Kind.ASSIGN:
            try:
                self._accept_assignment(message)
            except RefusedError as reason:
                self._refuse(message, str(reason))
                return
            early, self._early_weights = self._early_weights, None
            if early is not None and (early.header.run, early.header.round) == (self.assigned_run, self.assigned_round):
                self._weights(early)  # they overtook their assignment (a resend after a reconnect)
        elif message.kind is Kind.WEIGHTS_DOWN:
            if self.assignment is None or (message.header.run, message.header.round) != (
                self.assigned_run,
                self.assigned_round,
            ):
                # kept (one, the latest) in case their ASSIGN is still on its way: after a broker
                # restart the sender's queued copy and its resent ones can arrive out of order,
                # and the copy that follows would be dropped as a repeat
                log.warning(
                    "weights for run %s round %d came before their assignment; kept for it",
                    message.header.run,
                    message.header.round,
                )
                self._early_weights = message
                return
            self._weights(message)
        elif message.kind is Kind.PROBE:
            self._echo(item)
        elif message.kind is Kind.STOP:
            log.info("run %s stopped: %s", message.header.run, m.printable(message.body.reason))
            if message.header.run == self.assigned_run:  # another run's end leaves ours as it is
                self.assignment, self.assigned_run, self.assigned_round = None, "", -1
        elif message.kind is Kind.SERVER_STATUS:
            self._server_status(message)
        else:
            log.debug("ignoring %s outside a turn", message.kind.name)

    def _weights(self, message: Message) -> None:
        try:
            self._train_turn(message)
        except TurnAbortedError as reason:
            log.warning("turn abandoned: %s", reason)
        except Exception as exc:  # say why now: the server would otherwise wait out its timeout
            self._refuse(message, self._turn_failure(exc))
            raise  # handle_safely logs it, traceback and all, counts it, and serves on
        finally:
            self.state = "idle"

    def _turn_failure(self, exc: Exception) -> str:
        """The reason a turn failed, as the server shows it (a REJECT of the weights)."""
        first_line = (str(exc).splitlines() or [""])[0][:200]
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            if self.placement.type == "cuda":
                torch.cuda.empty_cache()  # what the failed step held goes back for the next run
            batch = self.assignment.hyper.batch_size if self.assignment is not None else "?"
            return (
                f"out of memory on {accelerator_name(self.placement)} at batch {batch} "
                f"(train on the CPU or with a smaller batch): {first_line}"
            )
        return f"training failed: {type(exc).__name__}: {first_line}"

    def _server_status(self, message: Message) -> None:
        """Watch the edge server: when a server (re)starts, announce ourselves to it again; when
        ours reconnects, send it again what it may have missed. Its going offline changes
        nothing here: a broker restart delivers its last will while it is about to come back,
        and a server that is gone for good sends nothing more (every wait here has a timeout,
        and the next run's ASSIGN replaces the assignment).

        Under TLS the broker's ACL lets only the server write its status. Re-registering is
        rate-limited all the same, so a flood of statuses cannot make the device flood the broker.
        """
        body: m.ServerStatus = message.body
        run = message.header.run
        if body.state == "online" and run != self._server_run:
            self._server_run = run
            if time.monotonic() - self._registered_at >= REREGISTER_MIN_S:
                log.info("edge server %s is online: registering again", run)
                self._register()
        elif body.state == "online" and run == self.assigned_run:
            # our server announced itself again: it reconnected (it subscribes before it
            # announces), and what we sent while it was away went nowhere -- the broker keeps
            # nothing for a clean session: send it again. Each announcement is one frame (the
            # endpoint drops repeats by sequence number), so this is once per reconnect.
            log.info("edge server %s reconnected: sending the last messages again", run)
            self.endpoint.replay()
        elif body.state == "offline" and run == self.assigned_run:
            log.warning("the edge server of run %s went offline; waiting for it", run)

    def _echo(self, item: Received) -> None:
        """Answer a link probe at once: when the probe arrived, and the payload asked for."""
        probe: m.Probe = item.message.body
        if probe.echo_bytes > self.config.max_probe_bytes:
            self._refuse(
                item.message, f"probe asks for {probe.echo_bytes} bytes, more than {self.config.max_probe_bytes}"
            )
            return
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

    def _refuse(self, message: Message, reason: str) -> None:
        """Tell the server we will not do what ``message`` asks, and why; log it here too."""
        log.error("refused %s for run %s: %s", message.kind.name, message.header.run, reason)
        body = m.Reject(refused=message.kind.name, reason=reason[: m.MAX_TEXT])
        up = topics.up(message.header.run, self.config.device_id)
        try:
            self.endpoint.send(
                up, Kind.REJECT, body, run=message.header.run, device=self.config.device_id, round_=message.header.round
            )
        except Exception:  # the refusal stands even if the server cannot be told
            log.debug("refusal not sent", exc_info=True)

    def _configured_spec(self, name: str) -> str:
        """The owner's spec that the assignment's model name refers to, or RefusedError.

        A built-in matches by its canonical name; a user model by its spec, or by the
        function name (the owner's file may live at another path than the server's).
        Nothing outside ``AgentConfig.models`` is ever built, imported or run.
        """
        wanted = canonical_name(name)
        for spec in self.config.models:
            if canonical_name(spec) == wanted:
                return spec
        if ":" in name:
            function = name.rpartition(":")[2]
            for spec in self.config.models:
                if ":" in spec and spec.rpartition(":")[2] == function:
                    return spec
        configured = ", ".join(self.config.models) or "none"
        raise RefusedError(f"model {name!r} is not one this device is configured to train ({configured})")

    def _accept_assignment(self, message: Message) -> None:
        body: m.Assign = message.body
        spec = self._configured_spec(body.model)
        if tuple(body.input_shape) != self.data.input_shape or body.num_classes != self.data.num_classes:
            raise RefusedError(
                f"assignment is for input {tuple(body.input_shape)} with {body.num_classes} classes; this device's "
                f"data is {self.data.input_shape} with {self.data.num_classes}"
            )
        try:
            model = self._build(spec)
        except Exception as exc:  # the owner's model does not build: say so, keep serving
            raise RefusedError(f"cannot build the configured model {spec}: {str(exc)[:200]}") from None
        if model.fingerprint() != body.model_fingerprint:
            raise RefusedError(
                f"model {spec} here has fingerprint {model.fingerprint()}, the server's has {body.model_fingerprint}"
            )
        if body.cut is not None and not 1 <= body.cut < model.num_layers:
            raise RefusedError(f"assignment names cut {body.cut}, which {spec} does not have")
        packed = [text for text in (body.compression.smashed, body.compression.gradient) if text.endswith("+zstd")]
        if packed and importlib.util.find_spec("zstandard") is None:
            raise RefusedError(f"assignment packs with zstd ({packed[0]}); this device lacks it: pip install zstandard")
        self._model = model
        self.assignment = body
        self.assigned_run, self.assigned_round = message.header.run, message.header.round

    def _stream(self, run: str, batch_size: int) -> BatchStream:
        key = (run, batch_size)
        if key not in self._streams:
            while len(self._streams) >= MAX_STREAMS:  # the oldest run's stream goes: a server's count can seek it
                del self._streams[next(iter(self._streams))]
            seed = stream_seed(self.assignment.data_seed, self.config.device_id)
            self._streams[key] = BatchStream(self.indices, batch_size, seed)
        stream = self._streams[key]
        position = self.assignment.stream_position
        if position is not None and position != stream.drawn:
            log.info("run %s: batch stream moved from %d to %d batches (server's count)", run, stream.drawn, position)
            stream.seek(position)
        return stream

    def _train_turn(self, weights: Message) -> None:
        a = self.assignment
        run, round_ = weights.header.run, weights.header.round
        part: nn.Module = self._model.net if a.cut is None else self._model.net[: a.cut]
        try:
            part.load_state_dict(weights.tensors, strict=True)
        except (RuntimeError, KeyError) as exc:  # say so now: the server would wait out its deadline
            self._refuse(weights, f"weights do not fit the model: {(str(exc).splitlines() or [''])[0][:200]}")
            return
        self.state = "training"
        part.train()
        up = topics.up(run, self.config.device_id)
        optimizer = make_optimizer(list(part.parameters()), a.hyper.lr, a.hyper.momentum, a.hyper.weight_decay)
        stream = self._stream(run, a.hyper.batch_size)
        self._uplink_epoch = weights.body.uplink_epoch
        started = time.monotonic()
        timings = []
        step = LocalStep(part, optimizer) if a.cut is None else SplitStep(part, optimizer)
        for iteration, batch in enumerate(stream.take(a.hyper.iterations)):
            x, y = self.data.train_x[batch].to(self.placement), self.data.train_y[batch]
            if a.cut is None:
                timings.append(self._local_step(step, x, y.to(self.placement), iteration))
            else:  # the labels go to the server from here, as they are
                timings.append(self._split_step(step, x, y, run, round_, iteration, up))
        state = {k: v.detach().cpu() for k, v in part.state_dict().items()}
        if a.cut is not None:
            self._wait_until_granted(a.grant.weights_slot_offset_s)
        weights_up_start = time.time()
        sent = self.endpoint.send(
            up,
            Kind.WEIGHTS_UP,
            m.WeightsUp(num_samples=len(self.indices), turn=a.turn),
            run=run,
            device=self.config.device_id,
            round_=round_,
            tensors=state,
        )
        self.endpoint.flush(a.gradient_timeout_s, f"round {round_}'s weights")
        report = m.Timings(
            iterations=timings,
            weights_down_bytes=_nbytes(weights.tensors),
            weights_up_bytes=sent,
            turn_s=time.monotonic() - started,
            weights_up_start_at=weights_up_start,
            weights_up_end_at=time.time(),
        )
        self.endpoint.send(up, Kind.TIMINGS, report, run=run, device=self.config.device_id, round_=round_)
        self.endpoint.flush(10.0, f"round {round_}'s timings")

    def _local_step(self, step: LocalStep, x, y, iteration: int) -> m.IterationTiming:
        """FL: the whole model trains here."""
        t0 = time.perf_counter()
        step.forward(x, y)
        synchronize(self.placement)
        t1 = time.perf_counter()
        step.backward()
        synchronize(self.placement)
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

    def _split_step(self, step: SplitStep, x, y, run: str, round_: int, iteration: int, up: str) -> m.IterationTiming:
        a = self.assignment
        t0 = time.perf_counter()
        smashed = step.forward(x)
        synchronize(self.placement)
        t1 = time.perf_counter()
        encoding = Encoding.parse(a.compression.smashed)
        wire = compression.encode("smashed", smashed.detach().cpu(), encoding)
        encode_s = time.perf_counter() - t1
        waited, late = self._wait_for_slot()
        upload_start = time.time()
        t_send = time.perf_counter()
        sent = self.endpoint.send(
            up,
            Kind.SMASHED,
            m.Smashed(turn=a.turn, encoding=encoding.name),
            run=run,
            device=self.config.device_id,
            round_=round_,
            iteration=iteration,
            tensors={**wire, "labels": y},
        )
        self.endpoint.flush(a.gradient_timeout_s, f"round {round_} iteration {iteration}'s smashed data")
        upload_end = time.time()
        t2 = time.perf_counter()
        received = self._wait_gradient(run, round_, iteration, a.gradient_timeout_s)
        gradient = received.message
        t_decode = time.perf_counter()
        if gradient.body.encoding != a.compression.gradient:
            raise TurnAbortedError(
                f"gradient for iteration {iteration} is encoded as {gradient.body.encoding}, "
                f"the assignment said {a.compression.gradient}"
            )
        try:
            grad = compression.decode(
                "grad", gradient.tensors, Encoding.parse(gradient.body.encoding), "sample", tuple(smashed.shape)
            )
        except ProtocolError as exc:
            raise TurnAbortedError(f"gradient for iteration {iteration}: {exc}") from None
        t3 = time.perf_counter()
        step.backward(grad)
        synchronize(self.placement)
        t4 = time.perf_counter()
        self._uplink_epoch = gradient.body.uplink_epoch
        transit = received.arrived_wall - a.grant.clock_offset_s - gradient.header.sent_at
        return m.IterationTiming(
            iteration=iteration,
            forward_s=t1 - t0,
            backward_s=t4 - t3,
            upload_s=t2 - t_send,
            wait_gradient_s=t_decode - t2,
            up_bytes=sent,
            down_bytes=_nbytes(gradient.tensors),
            upload_start_at=upload_start,
            upload_end_at=upload_end,
            slot_wait_s=waited,
            slot_late_s=late,
            gradient_transit_s=max(0.0, transit),
            encode_s=encode_s,
            decode_s=t3 - t_decode,
        )

    def _wait_gradient(self, run: str, round_: int, iteration: int, timeout_s: float) -> Received:
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set():
            item = self.endpoint.receive(min(0.5, deadline - time.monotonic()))  # short waits: a stop ends it soon
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
            if message.kind is Kind.SERVER_STATUS:  # the server reconnected: it may need our upload again
                self._server_status(message)
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


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _board() -> str:
    from toolkit.profiler.device_info import board_name

    return board_name()
