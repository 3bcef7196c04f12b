"""A round's turns, in order: the round engine.

What a split turn does -- hand out the device-side weights with the ASSIGN, run I iterations
against the server-side model (collect the cluster's smashed data, one server step, gradients
back in their slots), collect and average the trained weights -- and an FL round, with the
pacing of bulk transfers in the plan's slots and the accounting of where the time went.
A turn a restarted device was in starts again from a snapshot (edge_server.records.TurnSnapshot).

:class:`RoundEngine` holds the server side's training state (the model, the server part's
optimiser, each device's batch-stream position) and talks to the devices only through a
:class:`edge_server.link.Link`; the edge server (edge_server.server) owns the run, the plan
and the records around it.
"""

from __future__ import annotations

import logging
import math
import secrets
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from edge_server.intake import check_smashed, check_weights, decode_smashed
from edge_server.placement import place
from edge_server.records import DeviceRestartedError, RoundStats, TurnSnapshot, turn_record
from edge_server.scheduler import RoundPlan, Scheduler
from edge_server.strategy import RobustAggregation, Upload
from edge_server.timeline import TurnStamps
from toolkit import compression
from toolkit.compression import Encoding
from toolkit.models import LayeredModel
from toolkit.protocol import Kind
from toolkit.protocol import messages as m
from toolkit.protocol.endpoint import Received
from toolkit.training import bound_smashed, make_optimizer, sample_norm_median, server_step

if TYPE_CHECKING:
    from edge_server.link import Link
    from edge_server.server import ServerConfig

log = logging.getLogger("cpsl.server")


ENCODING_SAMPLES = 4  # (smashed data, gradient) batches --compress auto tries the encodings on
SMASHED_FACTOR = 10.0  # a smashed sample's norm is bounded at this times the recent median
SMASHED_HISTORY = 64  # batch medians remembered per cut
SMASHED_STRIKES = 3  # iterations running with most of a batch over the bound: the device sits the round out


def paced(devices: list[str], offsets: dict[str, float], start: float, max_wait_s: float) -> Iterator[str]:
    """``devices`` in slot order, each when its slot opens (``start`` + offset, monotonic).

    The plan shares the medium one transfer at a time (TDMA, as Wi-Fi airtime is shared);
    sending everything at once would let the access point interleave the transfers and
    the plan's finish times would be fiction. Devices without a slot go first, at once;
    no wait is longer than ``max_wait_s``.
    """
    for device in sorted(devices, key=lambda d: (offsets.get(d, -1.0), d)):
        delay = start + offsets.get(device, 0.0) - time.monotonic()
        if delay > 0:
            time.sleep(min(delay, max_wait_s))
        yield device


class RoundEngine:
    """The rounds of one run: what a turn needs, declared here and nowhere else."""

    def __init__(
        self,
        link: Link,
        model: LayeredModel,
        num_classes: int,
        config: ServerConfig,
        placement: torch.device,
        strategy: RobustAggregation,
        scheduler: Scheduler,
        registered_samples: Callable[[str], int],
        typical_samples: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.link, self.model, self.num_classes, self.config = link, model, num_classes, config
        self.placement, self.strategy, self.scheduler = placement, strategy, scheduler
        self.registered_samples, self.typical_samples = registered_samples, typical_samples
        self._nonfinite_logged: int | None = None  # the last round whose non-finite server loss was logged
        self._warned_capped: set[str] = set()  # each device's capped claim is logged once; every round records it
        self.loss_fn = nn.CrossEntropyLoss()
        self.server_optimizer: torch.optim.Optimizer | None = None
        self.server_cut: int | None = None
        self.stream_positions: dict[str, int] = {}  # batches each device has drawn in this run
        self.encoding_samples: list | None = None  # batches kept for --compress auto's trials, while it wants them
        self.codec_clock = 0.0  # seconds spent decoding smashed data (toolkit.compression)
        self._smashed_shapes: dict[int, tuple[int, ...]] = {}
        self._smashed_norms: dict[int, deque] = {}  # per cut: median per-sample norms of recent batches

    def encodings(self) -> tuple[str, str]:
        """This round's encodings of smashed data and gradients: the scheduler's under --auto
        (chosen by it with --compress auto), else the run's settings."""
        chosen = self.scheduler.encodings()
        return tuple(chosen) if chosen is not None else (self.config.compress_smashed, self.config.compress_gradient)

    def assign(
        self, device: str, round_: int, cluster: int, devices: list[str], plan: RoundPlan, turn: int | None = None
    ) -> m.Assign:
        c = self.config
        smashed, gradient = self.encodings()
        return m.Assign(
            scheme=c.scheme,
            model=self.model.name,
            model_fingerprint=self.model.fingerprint(),
            input_shape=list(self.model.input_shape),
            num_classes=self.num_classes,
            cut=plan.cut,
            cluster=cluster,
            cluster_devices=devices,
            hyper=m.Hyperparameters(
                batch_size=c.batch_size,
                iterations=c.iterations,
                lr=c.lr,
                momentum=c.momentum,
                weight_decay=c.weight_decay,
            ),
            grant=plan.grants.get(device, m.Grant()),
            gradient_timeout_s=c.iteration_timeout_s * 2,
            data_seed=c.data_seed,
            stream_position=self.stream_positions.get(device, 0),
            turn=turn,
            compression=m.Compression(smashed=smashed, gradient=gradient),
        )

    def ensure_server_optimizer(self, cut: int) -> None:
        if self.server_cut != cut:
            self.server_cut = cut
            place(self.model.net, cut, self.placement)  # the server side on --device, the rest on the CPU
            server_part = self.model.net[cut:]
            self.server_optimizer = make_optimizer(
                list(server_part.parameters()), self.config.lr, self.config.momentum, self.config.weight_decay
            )

    def check_smashed(self, item: Received, cut: int) -> str | None:
        started = time.perf_counter()
        problem = decode_smashed(item, self.encodings()[0])
        self.codec_clock += time.perf_counter() - started
        if problem:
            return problem
        return check_smashed(item, self._smashed_shape(cut), self.config.batch_size, self.num_classes, cut)

    def _smashed_shape(self, cut: int) -> tuple[int, ...]:
        """Per-sample shape of the cut's activations; one probe forward per cut, not per message."""
        if cut not in self._smashed_shapes:
            part = self.model.net[:cut]
            was_training = part.training
            with torch.no_grad():
                shape = tuple(part.eval()(torch.zeros(1, *self.model.input_shape)).shape[1:])
            part.train(was_training)
            self._smashed_shapes[cut] = shape
        return self._smashed_shapes[cut]

    def split_turn(self, round_: int, cluster: int, devices: list[str], plan: RoundPlan, stats: RoundStats) -> None:
        """One cluster's turn, started again if a device of it comes back mid-turn as a new agent
        life (killed and restarted: what it had trained died with it). The server side is put
        back as it was when the turn began and every device draws the same batches again, so
        the turn trains what it would have trained without the fault; the time lost stays in
        the round's latency and the record lists the restart. Past ``turn_replays`` restarts
        of one turn, a restarted device is dropped from the round instead."""
        self.ensure_server_optimizer(plan.cut)
        before = TurnSnapshot.take(self.model.net[plan.cut :], self.server_optimizer, self.stream_positions, devices)
        for replays_left in range(self.config.turn_replays, -1, -1):
            attempt = RoundStats(sessions=stats.sessions, replays_left=replays_left)
            try:
                self._split_turn_once(round_, cluster, devices, plan, attempt)
            except DeviceRestartedError as restart:
                log.warning(
                    "round %d cluster %d: %s is back as a new agent life mid-turn; the turn starts again",
                    round_,
                    cluster,
                    restart.device,
                )
                before.restore(self.model.net[plan.cut :], self.server_optimizer, self.stream_positions)
                stats.sessions[restart.device] = self.link.session_of(restart.device)
                stats.restarts.append({"cluster": cluster, "device": restart.device})
                stats.abandon(attempt)
                continue
            stats.absorb(attempt)
            return

    def _split_turn_once(
        self, round_: int, cluster: int, devices: list[str], plan: RoundPlan, stats: RoundStats
    ) -> None:
        """One cluster's turn: weights down, I parallel iterations against the server model, average."""
        cut = plan.cut
        device_part, server_part = self.model.net[:cut], self.model.net[cut:]
        self.ensure_server_optimizer(cut)
        server_part.train()
        timing = plan.timing.get(cluster)  # with slots: the downlink slots, and the next uplink slots' epoch
        gradient_offsets = timing.gradient_offsets if timing is not None else {}
        turn_started = time.monotonic()
        state = self._hand_out(device_part, round_, cluster, devices, plan, stats)
        stamps = TurnStamps(cluster, list(devices))
        if stats.handout_epoch is not None:
            stamps.epochs[0] = stats.handout_epoch
        stamps.weights_sent = {d: stats.weights_sent[d] for d in devices if d in stats.weights_sent}
        stats.stamps.append(stamps)
        active = set(devices)
        strikes: dict[str, int] = {}  # iterations running in which a device's smashed data was mostly over the bound
        smashed_in: list[float] = []  # when each iteration's last smashed data arrived
        for iteration in range(self.config.iterations):
            deadline = time.monotonic() + self.config.iteration_timeout_s
            got = self.link.collect(
                Kind.SMASHED,
                round_,
                iteration,
                active,
                stats,
                deadline,
                check=lambda item: self.check_smashed(item, cut),
            )
            active = set(got)
            smashed_in.append(time.monotonic())
            stats.server_codec_s, self.codec_clock = stats.server_codec_s + self.codec_clock, 0.0
            for device, item in got.items():
                stats.arrivals.setdefault(device, {})[iteration] = item.arrived_wall
                counts = np.bincount(item.message.tensors["labels"].numpy(), minlength=self.num_classes)
                stats.label_counts[device] = stats.label_counts.get(device, 0) + counts
            if not active:
                log.warning("cluster %d of round %d has no device left", cluster, round_)
                return
            order = sorted(got)
            smashed = self._bounded_smashed(cut, order, got, stats, strikes, round_, iteration)
            for device in [d for d in order if strikes.get(d, 0) >= SMASHED_STRIKES]:
                reason = f"smashed data over the bound in {SMASHED_STRIKES} iterations running"
                log.warning("round %d: %s left out of the round: %s", round_, device, reason)
                stats.dropped.add(device)
                stats.left_out[device] = reason
                active.discard(device)
            kept = [i for i, d in enumerate(order) if d in active]
            order, smashed = [order[i] for i in kept], [smashed[i] for i in kept]
            if not order:
                log.warning("cluster %d of round %d has no device left", cluster, round_)
                return
            t0, wall0 = time.monotonic(), time.time()
            grads, loss = server_step(  # decoded and checked on the CPU, then moved
                server_part,
                self.server_optimizer,
                [batch.to(self.placement) for batch in smashed],
                [got[d].message.tensors["labels"].to(self.placement) for d in order],
                self.loss_fn,
            )
            grads = [g.cpu() for g in grads]  # encoded and sent from the CPU
            t1 = time.monotonic()
            stamps.server_steps[iteration] = (wall0, wall0 + (t1 - t0))
            if not math.isfinite(loss):
                # the server part was not stepped; the devices get zero gradients and go on
                self.link.count("non-finite server loss")
                if self._nonfinite_logged != round_:  # once a round; the count has every one
                    self._nonfinite_logged = round_
                    log.warning(
                        "round %d iteration %d: the server loss is %s; step skipped (logged once a round, "
                        "counted as non-finite server loss)",
                        round_,
                        iteration,
                        loss,
                    )
            else:
                stats.train_losses.append(loss)
            stats.server_steps.append((sum(int(got[d].message.tensors["labels"].shape[0]) for d in order), t1 - t0))
            gradient_of = dict(zip(order, grads, strict=True))
            epoch = time.time() + timing.downlink_s if timing is not None else None
            if epoch is not None:
                stamps.epochs[iteration + 1] = epoch
            encoding = Encoding.parse(self.encodings()[1])
            encode_started = time.perf_counter()
            wire = {d: compression.encode("grad", gradient_of[d], encoding, per="sample") for d in order}
            stats.server_codec_s += time.perf_counter() - encode_started
            stats.server_codec_bytes += sum(4 * gradient_of[d].numel() for d in order)
            if self.encoding_samples is not None and len(self.encoding_samples) < ENCODING_SAMPLES:
                first = order[0]  # real batches for --compress auto's trials
                self.encoding_samples.append((got[first].message.tensors["smashed"], gradient_of[first].detach()))
            for device in paced(order, gradient_offsets, time.monotonic(), self.config.iteration_timeout_s):
                body = m.Gradient(uplink_epoch=epoch, encoding=encoding.name)
                self.link.send(device, Kind.GRADIENT, body, round_, iteration, tensors=wire[device])
                stamps.gradients_sent[(device, iteration)] = time.time()
            self.link.flush(f"round {round_} iteration {iteration}'s gradients")
            stats.server_compute_s += t1 - t0
            stats.downlink_s += time.monotonic() - t1
        t_weights = time.monotonic()
        good = self.link.collect(
            Kind.WEIGHTS_UP,
            round_,
            0,
            active,
            stats,
            t_weights + self.config.iteration_timeout_s + self._transfer_allowance_s(state, len(active), 1),
            check=lambda item: check_weights(item.message.tensors, state),
        )
        stamps.weights_arrived = {device: item.arrived_wall for device, item in good.items()}
        self._average_into(device_part, state, good, stats)
        turn_ended = time.monotonic()
        stats.model_transfer_s += turn_ended - t_weights
        stats.turns.append(turn_record(cluster, plan, turn_started, smashed_in, t_weights, turn_ended))
        self._account_device_timings(round_, sorted(good), stats)

    def _bounded_smashed(
        self,
        cut: int,
        order: list[str],
        got: dict[str, Received],
        stats: RoundStats,
        strikes: dict[str, int],
        round_: int,
        iteration: int,
    ) -> list[torch.Tensor]:
        """The iteration's smashed data, each sample bounded at ``SMASHED_FACTOR`` times the
        median per-sample norm of the cut's recent batches (this iteration's among them: the
        median holds while the honest devices are most). Clipped samples are counted per
        device; a device whose batch was mostly clipped earns a strike, and an ordinary batch
        clears them."""
        batches = [got[d].message.tensors["smashed"] for d in order]
        history = self._smashed_norms.setdefault(cut, deque(maxlen=SMASHED_HISTORY))
        medians = [sample_norm_median(batch) for batch in batches]
        reference = statistics.median([*medians, *history])
        history.extend(medians)
        if not reference > 0:
            return batches
        bounded, clipped = bound_smashed(batches, SMASHED_FACTOR * reference)
        for device, count, batch in zip(order, clipped, batches, strict=True):
            if count:
                stats.clipped_smashed[device] = stats.clipped_smashed.get(device, 0) + count
            strikes[device] = strikes.get(device, 0) + 1 if 2 * count > len(batch) else 0
        if any(clipped):
            counts = dict(zip(order, clipped, strict=True))
            log.debug("round %d iteration %d: smashed samples bounded %s", round_, iteration, counts)
        return bounded

    def _transfer_allowance_s(self, state: dict[str, torch.Tensor], devices: int, directions: int) -> float:
        """Seconds to allow for ``devices`` copies of ``state`` crossing the medium ``directions`` times
        at the slowest rate the deployment allows: a fixed timeout alone would cut off FL on a
        slow fleet whose whole-model transfers take longer than it."""
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        return 8 * nbytes * devices * directions / self.config.min_link_bps

    def fl_round(self, round_: int, devices: list[str], plan: RoundPlan, stats: RoundStats) -> None:
        started = time.monotonic()
        state = self._hand_out(self.model.net, round_, 0, devices, plan, stats)
        compute_s = self.config.iteration_timeout_s * (1 + self.config.iterations / 10)
        deadline = started + compute_s + self._transfer_allowance_s(state, len(devices), 2)
        good = self.link.collect(
            Kind.WEIGHTS_UP,
            round_,
            0,
            set(devices),
            stats,
            deadline,
            check=lambda item: check_weights(item.message.tensors, state),
        )
        self._average_into(self.model.net, state, good, stats)
        self._account_device_timings(round_, sorted(good), stats)

    def _hand_out(
        self, part: nn.Module, round_: int, cluster: int, devices: list[str], plan: RoundPlan, stats: RoundStats
    ) -> dict[str, torch.Tensor]:
        """ASSIGN and the current weights of ``part`` to each device; returns the weights sent."""
        state = {k: v.detach().clone() for k, v in part.state_dict().items()}
        started = time.monotonic()
        timing = plan.timing.get(cluster)
        epoch = time.time() + timing.model_down_s if timing is not None else None
        stats.handout_epoch = epoch
        stats.turn_token = secrets.randbelow(m.MAX_TURN_TOKEN)
        for device in devices:
            assign = self.assign(device, round_, cluster, devices, plan, stats.turn_token)
            self.link.send(device, Kind.ASSIGN, assign, round_)
            stats.handout_positions[device] = self.stream_positions.get(device, 0)
            # the turn draws this many batches from the device's stream (its next ASSIGN says so)
            self.stream_positions[device] = self.stream_positions.get(device, 0) + self.config.iterations
        offsets = timing.weights_down_offsets if timing is not None else {}
        for device in paced(devices, offsets, started, self.config.iteration_timeout_s):
            self.link.send(device, Kind.WEIGHTS_DOWN, m.WeightsDown(uplink_epoch=epoch), round_, tensors=state)
            stats.weights_sent[device] = time.time()
        self.link.flush(f"round {round_}'s weights")
        stats.model_transfer_s += time.monotonic() - started
        return state

    def _average_into(
        self, part: nn.Module, handed_out: dict[str, torch.Tensor], uploads: dict[str, Received], stats: RoundStats
    ) -> None:
        """The strategy's combination of the uploads (bounded weights, outliers rejected), loaded
        into ``part``; whose weight was capped and whose update clipped goes into the round's record."""
        result = self.strategy.aggregate(
            handed_out,
            {
                device: Upload(item.message.tensors, item.message.body.num_samples, self.registered_samples(device))
                for device, item in uploads.items()
            },
            self.typical_samples(),
        )
        for device, reason in sorted(result.rejected.items()):
            self.link.refuse(device, f"update norm outlier: weights of {device}: {reason}")
        for device, claimed in sorted(result.capped.items()):
            if device not in self._warned_capped:
                self._warned_capped.add(device)
                log.warning("%s claims %.0f samples, over the weight cap: capped (rounds record it)", device, claimed)
        stats.capped_weights.update(result.capped)
        stats.clipped_updates.update(result.clipped)
        if result.state is None:
            if uploads:
                log.warning("no upload carried weight (%s): the weights stay as they were", sorted(uploads))
            return
        part.load_state_dict(result.state)

    def _account_device_timings(self, round_: int, devices: list[str], stats: RoundStats) -> None:
        """Device compute and uplink per iteration: the slowest device of the cluster sets the pace."""
        reports = list(self.link.reports(round_, devices, wait_s=2.0).values())
        if not reports:
            return
        for iteration in range(max(len(r.iterations) for r in reports)):
            rows = [r.iterations[iteration] for r in reports if iteration < len(r.iterations)]
            stats.device_compute_s += max(row.forward_s for row in rows) + max(row.backward_s for row in rows)
            stats.uplink_s += max(row.upload_s for row in rows)
