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

from edge_server.dashboard.view import device_info
from edge_server.intake import Intake
from edge_server.link import MqttLink
from edge_server.placement import SplitForward, place
from edge_server.records import (
    RoundOutcome,
    RoundStats,
    RunRecords,
    publish_metrics,
    round_record,
    round_traffic,
)
from edge_server.registry import Registry
from edge_server.rounds import RoundEngine
from edge_server.run_state import RunState, capture, restore, save_state, write_settings
from edge_server.scheduler import FixedScheduler, RoundMeasurements, Scheduler
from edge_server.strategy import RobustAggregation
from toolkit import compression
from toolkit.data import Dataset
from toolkit.devices import resolve_device
from toolkit.errors import UserError
from toolkit.models import LayeredModel
from toolkit.protocol import Kind, topics
from toolkit.protocol import messages as m
from toolkit.protocol.codec import encode, make_header
from toolkit.protocol.endpoint import Endpoint
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
    aggregate: str = "fedavg"  # how uploads are combined (edge_server.strategy.METHODS)
    medium: str = "auto"  # --auto: how the devices share the medium ("auto": decided from probes)
    compress_smashed: str = "fp32"  # encodings of what crosses the cut (toolkit.compression)
    compress_gradient: str = "fp32"  # "auto" in both: chosen after the first split round (--auto only)
    compress_budget: float = 0.01  # --compress auto: the largest relative RMS error an encoding may add
    device: str = "cpu"  # where the server side trains: cpu, cuda, cuda:N, auto (edge_server.placement)
    model_spec: str = ""  # what the run was started with, for run.json (edge_server.run_state)
    data_spec: str = ""


class EdgeServer:
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
        self.strategy = RobustAggregation(config.norm_factor, config.aggregate)
        self.link = MqttLink(
            self.endpoint, self.intake, self.registry, self.run_id, config.reconnect_grace_s, config.iteration_timeout_s
        )
        self.rounds = RoundEngine(
            self.link,
            model,
            data.num_classes,
            config,
            self.placement,
            self.strategy,
            self.scheduler,
            self.registry.registered_samples,
            self.registry.median_samples,
        )
        self.history: list[dict] = []
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
            self.link.send(device, Kind.STOP, m.Stop(reason="run finished"), round_=0)
        transport.publish(topics.server_status(), self._status_frame("offline"), qos=1, retain=True)
        self.endpoint.flush(5.0, "the STOPs and the offline status")
        transport.close()

    # intake ------------------------------------------------------------------------------
    @property
    def timings(self) -> dict[tuple[int, str], m.Timings]:
        return self.intake.timings

    def serve_intake(self, timeout_s: float) -> None:
        """Registrations, heartbeats, timings and refusals, served for up to ``timeout_s``."""
        self.link.serve(timeout_s)

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
            self.link.serve(0.2)
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
            self.link.serve(0.2)

    def probe_new_devices(self, round_: int, devices: list) -> None:
        """Measure the link of every device the scheduler has not seen, and the medium (edge_server.probe)."""
        for device in self.registry.take_returned():
            self.scheduler.forget(device)
        from edge_server.probe import LinkProber, probe_fleet

        def send(device: str, body: m.Probe, tensors) -> None:
            self.link.send(device, Kind.PROBE, body, round_, tensors=tensors)

        prober = LinkProber(
            send,
            self.link.poll,
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
            self.rounds.fl_round(round_, plan.clusters[0], plan, stats)
        else:
            for cluster, members in enumerate(plan.clusters):
                self.rounds.split_turn(round_, cluster, members, plan, stats)
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
        whole = SplitForward(self.model.net, self.rounds.server_cut, self.placement)  # each side where it trains
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
            self.rounds.encoding_samples = None
            return None
        if not self.rounds.encoding_samples:
            self.rounds.encoding_samples = []
            return None
        trials = [compression.trial(self.rounds.encoding_samples, s, g) for s, g in compression.CANDIDATES]
        self.rounds.encoding_samples = None
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
