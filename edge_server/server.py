"""The edge server: registry, rounds of cluster turns, server-side training, aggregation, evaluation.

Every wait has a deadline. A device that vanishes (its last will arrives) or straggles
past the deadline is dropped from that iteration and the rest of the round with a
warning; the round completes with the others, and the device is planned again next
round if it is back online. Every received message is checked against the run, the
round, the iteration, the device's membership in the active cluster and the shapes
the cut implies before it touches the model; a bad one is logged and dropped.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_server.dashboard.view import device_info
from edge_server.intake import Intake
from edge_server.placement import SplitForward, place
from edge_server.records import (
    DeviceRestartedError,
    RoundOutcome,
    RoundStats,
    RunRecords,
    publish_metrics,
    round_record,
    round_traffic,
)
from edge_server.registry import Registry
from edge_server.rounds import RoundSteps
from edge_server.run_state import RunState, capture, restore, save_state, write_settings
from edge_server.scheduler import FixedScheduler, RoundMeasurements, Scheduler
from edge_server.strategy import BoundedFedAvg
from toolkit import compression
from toolkit.data import Dataset
from toolkit.devices import resolve_device
from toolkit.errors import UserError
from toolkit.models import LayeredModel
from toolkit.protocol import Kind, topics
from toolkit.protocol import messages as m
from toolkit.protocol.codec import encode, make_header
from toolkit.protocol.endpoint import Endpoint, Received
from toolkit.training import evaluate
from toolkit.transport import BrokerAddress, MqttTransport, Will

log = logging.getLogger("cpsl.server")


@dataclass
class ServerConfig:
    broker: BrokerAddress
    scheme: str
    rounds: int
    min_devices: int
    batch_size: int = 32
    iterations: int = 20
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    clusters: int = 2
    cut: int | None = 6
    run_dir: Path = Path("runs/latest")
    run_id: str = ""
    data_seed: int = 0
    iteration_timeout_s: float = 30.0
    register_timeout_s: float = 120.0
    heartbeat_timeout_s: float = 10.0
    # The slowest the whole medium may carry bulk data (bit/s), for the deadlines of phases that
    # move models: a phase moving B bytes in all waits iteration_timeout_s + 8 B / this at most.
    min_link_bps: float = 1e6
    reconnect_grace_s: float = 10.0  # a device whose will arrived may register again this long before it is dropped
    turn_replays: int = 2  # times one split turn starts again for a device restarted mid-turn
    max_frame_bytes: int = 64 << 20
    auto: bool = False  # cpsl only: cut, clusters and slots decided live (edge_server.auto)
    max_cluster_size: int | None = None
    server_profile: Path | None = None
    reselect_every: int = 10
    drift_threshold: float = 0.3
    random_clusters: bool = False  # cpsl: clusters drawn at random each round (with --auto: the rest planned)
    slots: bool = True  # --auto on air time: transmission slots (False: devices contend)
    iteration_flow: bool = True  # --auto with slots: gradients and the next uploads as one stretch
    target_accuracy: float | None = None  # stop once the test accuracy reaches it
    norm_factor: float = 10.0  # an upload whose update norm exceeds this times the median is rejected (0: off)
    medium: str = "auto"  # --auto: how the devices share the medium ("auto": decided from probes)
    compress_smashed: str = "fp32"  # encodings of what crosses the cut (toolkit.compression)
    compress_gradient: str = "fp32"  # "auto" in both: chosen after the first split round (--auto only)
    compress_budget: float = 0.01  # --compress auto: the largest relative RMS error an encoding may add
    device: str = "cpu"  # where the server side trains: cpu, cuda, cuda:N, auto (edge_server.placement)
    model_spec: str = ""  # what the run was started with, for run.json (edge_server.run_state)
    data_spec: str = ""


class EdgeServer(RoundSteps):
    def __init__(
        self,
        config: ServerConfig,
        model: LayeredModel,
        data: Dataset,
        scheduler: Scheduler | None = None,
        on_round: Callable[[dict], None] | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.data = data
        self.placement = resolve_device(config.device)
        self.run_id = config.run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        self.scheduler = scheduler or self._default_scheduler()
        self.on_round = on_round or (lambda record: None)
        self.registry = Registry(config.heartbeat_timeout_s)
        self.endpoint = Endpoint("server", max_frame_bytes=config.max_frame_bytes)
        self.intake = Intake(self.endpoint, self.registry, self.run_id)
        self.strategy = BoundedFedAvg(config.norm_factor)
        self.loss_fn = nn.CrossEntropyLoss()
        self.server_optimizer: torch.optim.Optimizer | None = None
        self.server_cut: int | None = None
        self._smashed_shapes: dict[int, tuple[int, ...]] = {}
        self.history: list[dict] = []
        self.stream_positions: dict[str, int] = {}  # batches each device has drawn in this run
        self._fleet_written: list[tuple[str, str]] = []

    def _default_scheduler(self) -> Scheduler:
        c = self.config
        if c.auto and c.scheme == "cpsl":
            from edge_server.auto import AutoScheduler
            from edge_server.own_profile import own_profile, pooled_batch_sizes
            from toolkit.planning.clustering import ClusterBounds
            from toolkit.profile_format import load_profile

            if c.server_profile:
                server_profile = load_profile(c.server_profile, self.model.fingerprint())
                source = f"given ({c.server_profile})"
            else:  # measured here, on the threads it trains with (edge_server/own_profile.py)
                largest = c.max_cluster_size or max(1, -(-c.min_devices // max(1, c.clusters)))
                sizes = pooled_batch_sizes(c.batch_size, largest)
                server_profile, source = own_profile(self.model, sizes, device=self.placement)
            bounds = ClusterBounds(max_cluster_size=c.max_cluster_size, min_clusters=c.clusters)
            return AutoScheduler(
                self.model.fingerprint(),
                c.batch_size,
                c.iterations,
                bounds,
                server_profile,
                source,
                c.reselect_every,
                c.drift_threshold,
                fixed_cut=c.cut,
                medium=c.medium,
                compression=("fp32", "fp32")
                if c.compress_smashed == "auto"
                else (c.compress_smashed, c.compress_gradient),
                compression_auto=c.compress_smashed == "auto",
                compression_budget=c.compress_budget,
                random_clusters=c.random_clusters,
                cluster_seed=c.data_seed,
                slots=c.slots,
                iteration_flow=c.iteration_flow,
            )
        return FixedScheduler(c.scheme, c.cut, c.clusters, c.random_clusters, c.data_seed)

    # connection --------------------------------------------------------------------------
    def _status_frame(self, state: str) -> bytes:
        body = m.ServerStatus(state=state, model=self.model.name, scheme=self.config.scheme)
        # its own sequence number: receivers drop repeats by (sender, seq), and every status is news
        return encode(Kind.SERVER_STATUS, make_header(self.run_id, "server", seq=self.endpoint.next_seq()), body)

    def connect(self) -> None:
        transport = MqttTransport(
            self.config.broker,
            client_id=f"cpsl-server-{self.run_id}-{secrets.token_hex(4)}",
            on_message=self.endpoint.on_frame,
            will=Will(topics.server_status(), self._status_frame("offline")),
            on_reconnect=self._announce,
        )
        self.endpoint.attach(transport)
        for topic_filter in (topics.ALL_DEVICE_STATUS, topics.ALL_DEVICE_HEARTBEATS, topics.all_up(self.run_id)):
            transport.subscribe(topic_filter, qos=1)
        transport.connect(10.0)
        self._announce()

    def _announce(self) -> None:
        """At start and after every reconnect: the retained "online" status, and again the last
        messages to each device, which a broker restart may have lost (devices drop copies)."""
        self.endpoint.transport.publish(topics.server_status(), self._status_frame("online"), qos=1, retain=True)
        self.endpoint.replay()

    def close(self) -> None:
        transport = self.endpoint.transport
        if transport is None:
            return
        for device in list(self.registry.devices):
            self._send(device, Kind.STOP, m.Stop(reason="run finished"), round_=0)
        transport.publish(topics.server_status(), self._status_frame("offline"), qos=1, retain=True)
        self.endpoint.flush(5.0, "the STOPs and the offline status")
        transport.close()

    def _send(
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

    # intake ------------------------------------------------------------------------------
    @property
    def timings(self) -> dict[tuple[int, str], m.Timings]:
        return self.intake.timings

    def _poll(self, timeout_s: float) -> Received | None:
        item = self.intake.poll(timeout_s)
        for device in self.registry.take_announced():  # back after a reconnect: what it may have missed
            self.endpoint.replay(topics.down(self.run_id, device))
        return item

    def serve_intake(self, timeout_s: float) -> None:
        """Serve the intake (registrations, timings, refusals) outside a collection; a turn's
        message that arrives here answers no open request, and is counted as such."""
        item = self._poll(timeout_s)
        if item is not None:
            where = f"round {item.message.header.round} iteration {item.message.header.iteration}"
            self.endpoint.reject(item.topic, f"{item.message.kind.name} for {where} outside a collection")

    def _devices_for_round(self, round_: int) -> list:
        """The online devices; with none online, wait for one (up to the registration timeout)
        instead of running and counting an empty round."""
        devices = self.registry.online()
        if devices:
            return devices
        log.warning("round %d: no device online; waiting up to %g s", round_, self.config.register_timeout_s)
        deadline = time.monotonic() + self.config.register_timeout_s
        while not devices:
            if time.monotonic() > deadline:
                raise UserError(f"no device online for round {round_} within {self.config.register_timeout_s:g} s")
            self.serve_intake(0.2)
            devices = self.registry.online()
        return devices

    def wait_for_devices(self) -> None:
        deadline = time.monotonic() + self.config.register_timeout_s
        while len(self.registry.online()) < self.config.min_devices:
            if time.monotonic() > deadline:
                raise UserError(
                    f"only {len(self.registry.online())} of {self.config.min_devices} devices registered "
                    f"within {self.config.register_timeout_s:g} s"
                )
            self.serve_intake(0.2)

    def _collect(
        self,
        kind: Kind,
        round_: int,
        iteration: int,
        expected: set[str],
        stats: RoundStats,
        deadline: float,
        check: Callable[[Received], str | None] | None = None,
    ) -> dict[str, Received]:
        """Messages of ``kind`` for this round/iteration from each expected device, until the deadline.

        A message that fails ``check`` is rejected and the device stays expected: a forged or
        corrupt message must not knock a genuine device out of the round.
        """
        got: dict[str, Received] = {}
        while expected - got.keys() - stats.dropped:
            for device in expected - got.keys():
                # gone for good, or back as a new agent life (restarted: its turn is lost with it;
                # a split turn is then started again with it, while it may be)
                record = self.registry.devices.get(device)
                restarted = record is not None and stats.sessions.get(device, record.session) != record.session
                if restarted and stats.replays_left > 0 and self.registry.is_online(device):
                    raise DeviceRestartedError(device)
                if device not in stats.dropped and (
                    restarted or self.registry.has_left(device, self.config.reconnect_grace_s)
                ):
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
            item = self._poll(min(remaining, 0.5))
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

    def probe_new_devices(self, round_: int, devices: list) -> None:
        """Measure the link of every device the scheduler has not seen, and the medium (edge_server.probe)."""
        for device in self.registry.take_returned():
            self.scheduler.forget(device)
        from edge_server.probe import LinkProber, probe_fleet

        def send(device: str, body: m.Probe, tensors) -> None:
            self._send(device, Kind.PROBE, body, round_, tensors=tensors)

        prober = LinkProber(
            send,
            self._poll,
            timeout_s=self.config.iteration_timeout_s,
            flush=lambda: self.endpoint.flush(self.config.iteration_timeout_s, f"round {round_}'s probes"),
            discard=lambda item, reason: self.endpoint.reject(item.topic, reason),
        )
        probe_fleet(self.scheduler, prober, devices)

    def run_round(self, round_: int) -> dict:
        self.intake.start_round(round_)
        devices = self._devices_for_round(round_)
        self.probe_new_devices(round_, devices)
        encoding_choice = self._choose_encodings()
        plan = self.scheduler.plan(round_, devices)
        plan.clusters = [cluster for cluster in plan.clusters if cluster]
        stats = RoundStats(sessions={d.id: d.session for d in devices})
        counters = (dict(self.endpoint.bytes_received), dict(self.endpoint.bytes_sent))
        started, started_wall = time.monotonic(), time.time()
        if not plan.clusters:
            log.warning("round %d: the plan has no devices; nothing trained", round_)
        elif plan.cut is None:
            self._fl_round(round_, plan.clusters[0], plan, stats)
        else:
            for cluster, members in enumerate(plan.clusters):
                self._split_turn(round_, cluster, members, plan, stats)
        latency = time.monotonic() - started
        if plan.cut is not None:
            self.scheduler.observe(
                RoundMeasurements(
                    cut=plan.cut,
                    timings={d: t for (r, d), t in self.timings.items() if r == round_},
                    server_steps=stats.server_steps,
                    arrivals=stats.arrivals,
                    turns=stats.turns,
                    latency_s=latency,
                    label_counts=stats.label_counts,
                    server_codec=(stats.server_codec_s, stats.server_codec_bytes),
                )
            )
        whole = SplitForward(self.model.net, self.server_cut, self.placement)  # each side where it trains
        accuracy, loss = evaluate(whole, self.data.test_x, self.data.test_y)
        record = round_record(
            RoundOutcome(round_, self.run_id, self.config.scheme, plan, started_wall, latency, accuracy, loss),
            stats,
            self.model.cut_name(plan.cut) if plan.cut else None,
            {d: t for (r, d), t in self.timings.items() if r == round_},
            dict(self.endpoint.rejected),
            dict(self.intake.refusals),
            round_traffic(counters, (self.endpoint.bytes_received, self.endpoint.bytes_sent)),
            dict(self.intake.refused),
        )
        if encoding_choice is not None:
            record["encoding_choice"] = encoding_choice
        return record

    def _choose_encodings(self) -> dict | None:
        """--compress auto: once a split round has left batches to try, every candidate pair of
        encodings on them; the scheduler picks (edge_server.auto). Until then, keep batches."""
        if not self.scheduler.wants_encoding_trials:
            self.encoding_samples = None
            return None
        if not self.encoding_samples:
            self.encoding_samples = []
            return None
        trials = [compression.trial(self.encoding_samples, s, g) for s, g in compression.CANDIDATES]
        self.encoding_samples = None
        return self.scheduler.choose_encodings(trials)

    def _write_fleet(self, records: RunRecords) -> None:
        """fleet.json when a device (or an agent life) is new since the last write."""
        devices = list(self.registry.devices.values())
        key = sorted((d.id, d.session) for d in devices)
        if key != self._fleet_written:
            records.write_fleet([device_info(d) for d in sorted(devices, key=lambda d: d.id)])
            self._fleet_written = key

    def run(self, resume: RunState | None = None) -> list[dict]:
        """Train; with ``resume``, go on from the round after the one it saved (``--resume``)."""
        records = RunRecords(self.config.run_dir)
        if resume is None:
            records.open()
            write_settings(self.config.run_dir, self.config, self.run_id)
            first = 0
        else:
            first = restore(self, resume)
            self.history = records.resume(resume.round)
        self.connect()
        try:
            self.wait_for_devices()
            for round_ in range(first, self.config.rounds):
                record = self.run_round(round_)
                self.history.append(record)
                records.append(record)
                self._write_fleet(records)
                save_state(self.config.run_dir, capture(self, round_))
                publish_metrics(self.endpoint, self.run_id, record)
                self.on_round(record)
                if self.config.target_accuracy is not None and record["accuracy"] >= self.config.target_accuracy:
                    log.warning("target accuracy %.2f reached in round %d", self.config.target_accuracy, round_)
                    break
            place(self.model.net, None, self.placement)  # the whole model on the CPU, for model.pt and the ONNX file
            records.save_final(self.model)
        finally:
            self.close()
        return self.history
