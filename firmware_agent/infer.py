"""Split inference on a device: the head of a trained model in onnxruntime here, the rest on the
edge server's inference service (``edge_server serve``), cut where the predicted end-to-end
latency is lowest (:mod:`toolkit.inference.planner`).

The device measures what only it can: each head's time on its own inputs, the time to encode
the activations, the size of the request frame at each cut, and the link, from its own
requests (:mod:`toolkit.inference.link`). The service announces the rest in its retained
status: the cuts it serves and its measured time for its part. The whole model on the device
(no request at all) is always a candidate, and the fallback: a request that times out, a
service that goes offline or refuses, costs that request its offload, never its answer.

Nothing received names code. The heads are the owner's files (``--heads DIR``, checked
against their manifest); the service's status only selects among them, and a service
running other weights than the heads were exported from is not used.
"""

from __future__ import annotations

import logging
import math
import secrets
import statistics
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from toolkit import compression
from toolkit.compression import Encoding
from toolkit.errors import UserError
from toolkit.inference.heads import HeadSet
from toolkit.inference.link import LinkEstimator
from toolkit.inference.planner import Choice, CutCost, choose, interpolate, predict, shortlist
from toolkit.protocol import Kind, topics
from toolkit.protocol import messages as m
from toolkit.protocol.codec import encode, make_header
from toolkit.protocol.endpoint import Endpoint
from toolkit.transport import BrokerAddress, MqttTransport

log = logging.getLogger("cpsl.infer")

SERVICE_BACKOFF_S = 10.0  # after a failed request, the device answers alone this long before trying again
OBSERVED_WINDOW = 8  # end-to-end latencies kept per cut


@dataclass
class InferConfig:
    broker: BrokerAddress
    device_id: str
    service: str
    batch_size: int = 1
    encoding: str = "fp16"
    allow_raw_inputs: bool = False  # cut 0 sends the raw inputs: only where the owner allows it
    timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    threads: int = 1
    head_time_s: float = 0.1  # each head runs back to back at least this long (and 5 times) to be timed
    probes: int = 3  # requests per calibration cut
    shortlist: int = 3  # predicted-best cuts confirmed with real requests before the choice
    confirm_requests: int = 8  # requests per shortlisted cut
    replan_every: int = 50  # requests between cut choices (the link estimate moves on meanwhile)


@dataclass(frozen=True)
class LocalCost:
    """What a cut costs on this device, measured: its head, encoding its output, the request's size."""

    head_s: float
    encode_s: float
    wire_bytes: int


@dataclass
class Outcome:
    logits: np.ndarray
    cut: int  # where it was cut (the whole-model cut for device-only and for fallbacks)
    latency_s: float
    fallback: bool = False  # the service did not answer in time, or refused: computed here
    server_s: float = 0.0


@dataclass
class Counts:
    requests: int = 0
    by_cut: dict[int, int] = field(default_factory=dict)
    fallbacks: int = 0
    refusals: list[str] = field(default_factory=list)  # the service's reasons (the first few)
    most_in_flight: int = 0  # the most requests out at once (--in-flight)


@dataclass
class Pending:
    """A request sent and not yet answered (``cpsl-infer run --in-flight``)."""

    request: int
    cut: int
    inputs: np.ndarray
    started: float  # perf_counter: before its head ran
    sent: float  # perf_counter: when it went out
    size: int  # bytes on the wire
    deadline: float  # monotonic


class ServiceError(Exception):
    """The service did not answer a request in time, or refused it (the message says which)."""


class InferenceClient:
    def __init__(self, config: InferConfig, heads: HeadSet) -> None:
        self.config = config
        self.heads = heads
        self.manifest = heads.manifest
        self.encoding = Encoding.parse(config.encoding)
        self.endpoint = Endpoint(f"infer-{config.device_id}")
        self.status: m.ServiceStatus | None = None
        self.link = LinkEstimator()
        self.local: dict[int, LocalCost] = {}
        self.choice: Choice | None = None
        self.counts = Counts()
        self._request_ids = secrets.randbits(48)
        self._replies: dict[int, tuple[m.Prediction, dict[str, torch.Tensor]]] = {}
        self._awaited: set[int] = set()  # requests sent and not yet answered or given up on
        self._backoff_until = 0.0
        self._since_plan = 0
        self._observed: dict[int, deque[float]] = {}  # cut -> recent end-to-end latencies
        self._unreachable = ""  # why the broker could not be reached, if it could not

    @property
    def whole_model(self) -> int:
        return self.manifest.num_layers

    # connection --------------------------------------------------------------------------------
    def connect(self) -> bool:
        """Connect and wait (up to the timeout) for the service's status; whether it can be used."""
        transport = MqttTransport(
            self.config.broker,
            client_id=f"cpsl-infer-{self.config.device_id}-{secrets.token_hex(4)}",
            on_message=self.endpoint.on_frame,
            on_reconnect=self.endpoint.replay,  # a request a broker restart lost in flight goes again
        )
        self.endpoint.attach(transport)
        transport.subscribe(topics.infer_reply(self.config.service, self.config.device_id), qos=1)
        transport.subscribe(topics.infer_status(self.config.service), qos=1)
        try:
            transport.connect(self.config.connect_timeout_s)
        except UserError as exc:  # no broker: the board still answers, with the whole model
            self._unreachable = str(exc)
            log.warning("%s; the whole model runs here", exc)
            return False
        deadline = time.monotonic() + self.config.timeout_s
        while self.status is None and time.monotonic() < deadline:
            self._pump(deadline - time.monotonic())
        problem = self.service_problem()
        if problem:
            log.warning("service %s not used: %s; the whole model runs here", self.config.service, problem)
        return not problem

    def close(self) -> None:
        if self.endpoint.transport is not None:
            self.endpoint.transport.close()

    def service_problem(self) -> str:
        """Why the service cannot take this device's requests, or "" when it can."""
        status = self.status
        if self._unreachable:
            return self._unreachable
        if status is None:
            return f"no status from service {self.config.service!r} within {self.config.timeout_s:g} s"
        if status.state != "online":
            return "it is offline"
        if status.model_fingerprint != self.manifest.model_fingerprint:
            return f"it serves another model ({status.model}, fingerprint {status.model_fingerprint})"
        if status.weights != self.manifest.weights:
            theirs, ours = status.weights[:12], self.manifest.weights[:12]
            return f"it serves other weights ({theirs}...) than the heads' ({ours}...)"
        if self.encoding.name not in status.encodings:
            return f"it does not accept {self.encoding} (it takes {', '.join(status.encodings)})"
        if self.config.batch_size > status.max_batch:
            return f"it takes batches of at most {status.max_batch}"
        return ""

    def _pump(self, timeout_s: float) -> None:
        """Take one message from the inbox: a status updates what we know, a reply is kept if awaited."""
        received = self.endpoint.receive(max(0.0, timeout_s))
        if received is None:
            return
        message = received.message
        if message.kind is Kind.SERVICE_STATUS:
            changed = self.status is None or self.status.state != message.body.state
            self.status = message.body
            if changed:
                log.info("service %s is %s", self.config.service, message.body.state)
        elif message.kind is Kind.PREDICTION and message.body.request in self._awaited:
            self._replies[message.body.request] = (message.body, message.tensors)
        # a late reply to a request given up on, or anything else: dropped

    # candidates and costs ------------------------------------------------------------------
    def network_cuts(self) -> list[int]:
        """The cuts a request can be made at now: served, exported here, allowed by the owner."""
        if self.service_problem():
            return []
        served = set(self.status.cuts)
        mine = {cut for cut in self.manifest.cuts if cut < self.whole_model}
        if self.config.allow_raw_inputs:
            mine.add(0)
        return sorted(served & mine)

    def measure(self, sample: np.ndarray) -> dict[int, LocalCost]:
        """Time every candidate head on ``sample`` (one batch of this device's inputs), encode its
        output and size its request; cut 0 is the inputs encoded, the whole model costs no request.

        Each part runs back to back for a while and its mean is taken, not a median of a few
        runs: under a CPU quota (a board sharing its cores, the testbed's CFS groups) a run is
        fast while the quota lasts and stalls once it is spent, and only the sustained mean
        says what the part costs request after request."""
        cuts = sorted({self.whole_model, *self.network_cuts()})
        for cut in cuts:
            head_s, output = (0.0, sample)
            if cut > 0:
                head_s, output = self._sustained(lambda cut=cut: self.heads.run(cut, sample))
            if cut == self.whole_model:
                self.local[cut] = LocalCost(head_s, 0.0, 0)
                continue
            x = torch.from_numpy(np.ascontiguousarray(output))
            encode_s, pieces = self._sustained(lambda x=x: compression.encode("x", x, self.encoding))
            header = make_header(self.config.service, self.config.device_id)
            frame = encode(Kind.INFER, header, self._body(cut, 0), pieces)
            self.local[cut] = LocalCost(head_s, encode_s, len(frame))
        return self.local

    def _sustained(self, work):
        """(mean seconds of ``work`` run back to back for ``head_time_s`` and at least 5 times, after
        one untimed run; its last result)."""
        result = work()
        runs = 0
        started = time.perf_counter()
        while runs < 5 or (time.perf_counter() - started < self.config.head_time_s and runs < 10_000):
            result = work()
            runs += 1
        return (time.perf_counter() - started) / runs, result

    def costs(self) -> list[CutCost]:
        result = []
        tails = {entry.cut: entry for entry in (self.status.tail if self.status else [])}
        networked = set(self.network_cuts())
        for cut, local in sorted(self.local.items()):
            if cut == self.whole_model:
                result.append(CutCost(cut, local.head_s))
            elif cut in networked and cut in tails:
                tail = tails[cut]
                server_s = interpolate(tail.batch_sizes, tail.seconds, self.config.batch_size)
                result.append(CutCost(cut, local.head_s, local.encode_s, local.wire_bytes, server_s))
        return result

    def calibrate(self, sample: np.ndarray) -> None:
        """A few real requests at the smallest and the largest request size, to fit the link."""
        networked = [cut for cut in self.network_cuts() if cut in self.local]
        if not networked:
            return
        by_size = sorted(networked, key=lambda cut: self.local[cut].wire_bytes)
        for cut in dict.fromkeys([by_size[0], by_size[-1]]):
            for _ in range(self.config.probes):
                try:
                    self._offload(sample, cut)
                except ServiceError as exc:
                    log.warning("calibration request at cut %d failed: %s", cut, exc)
                    return

    def confirm(self, sample: np.ndarray) -> list[int]:
        """Time real requests at the predicted-best cuts (and device-only), so the choice rests on
        what they cost end to end here; the cuts confirmed."""
        picked = shortlist(self.costs(), self.link.estimate(), self.config.shortlist)
        for cut in picked:
            for _ in range(self.config.confirm_requests):
                self.infer(sample, cut, record=False)
        return picked

    def observed(self) -> dict[int, float]:
        """The median end-to-end latency of the recent requests at each cut tried (3 at least)."""
        return {cut: statistics.median(kept) for cut, kept in self._observed.items() if len(kept) >= 3}

    def plan(self) -> Choice:
        self.choice = choose(self.costs(), self.link.estimate(), self.observed())
        self._since_plan = 0
        return self.choice

    # requests ------------------------------------------------------------------------------
    def _body(self, cut: int, request: int) -> m.Infer:
        return m.Infer(request=request, cut=cut, weights=self.manifest.weights, encoding=self.encoding.name)

    def _offload(self, inputs: np.ndarray, cut: int) -> Outcome:
        return self._collect(self._send(inputs, cut))

    def _send(self, inputs: np.ndarray, cut: int) -> Pending:
        """Run the head, encode its output and send the request; the answer is :meth:`_collect`'s."""
        started = time.perf_counter()
        activations = self.heads.run(cut, inputs)
        pieces = compression.encode("x", torch.from_numpy(np.ascontiguousarray(activations)), self.encoding)
        self._request_ids += 1
        request = self._request_ids
        self._awaited.add(request)
        self.counts.most_in_flight = max(self.counts.most_in_flight, len(self._awaited))
        sent = time.perf_counter()
        size = self.endpoint.send(
            topics.infer_request(self.config.service, self.config.device_id),
            Kind.INFER,
            self._body(cut, request),
            run=self.config.service,
            device=self.config.device_id,
            tensors=pieces,
        )
        deadline = time.monotonic() + self.config.timeout_s
        return Pending(request, cut, inputs, started, sent, size, deadline)

    def _collect(self, pending: Pending) -> Outcome:
        """Wait for ``pending``'s answer (replies to the other requests in flight are kept meanwhile);
        ServiceError when it does not come in time, the service goes offline, or it is refused."""
        try:
            while pending.request not in self._replies:
                if time.monotonic() >= pending.deadline:
                    raise ServiceError(f"no answer within {self.config.timeout_s:g} s")
                if self.status is not None and self.status.state != "online":
                    raise ServiceError("the service went offline")
                self._pump(min(0.5, pending.deadline - time.monotonic()))
            reply, tensors = self._replies.pop(pending.request)
        finally:
            self._awaited.discard(pending.request)
        ended = time.perf_counter()
        logits = self.answer_of(reply, tensors, pending.inputs.shape[0])
        self.link.add(pending.cut, pending.size, (ended - pending.sent) - reply.server_s - reply.queued_s)
        return Outcome(logits, pending.cut, ended - pending.started, server_s=reply.server_s)

    def answer_of(self, reply: m.Prediction, tensors: dict[str, torch.Tensor], batch: int) -> np.ndarray:
        """The logits a reply carries for a batch of ``batch``; ServiceError for a refusal, or for
        anything but exactly [batch, classes] float32 logits (and nothing else)."""
        if reply.error:
            raise ServiceError(f"refused: {reply.error}")
        logits = tensors.get("logits")
        expected = (batch, self.manifest.num_classes)
        if set(tensors) != {"logits"} or logits.dtype != torch.float32 or tuple(logits.shape) != expected:
            raise ServiceError(f"the answer is not {list(expected)} float32 logits alone")
        return logits.numpy()

    def _alone(self, inputs: np.ndarray, fallback: bool = False) -> Outcome:
        started = time.perf_counter()
        logits = self.heads.run(self.whole_model, inputs)
        return Outcome(np.asarray(logits), self.whole_model, time.perf_counter() - started, fallback=fallback)

    def infer(self, inputs: np.ndarray, cut: int | None = None, record: bool = True) -> Outcome:
        """Classify one batch at ``cut`` (None: the planned cut, re-planned every few requests).
        ``record``: count it among the answers (calibration and confirmation requests are not)."""
        outcome = self._infer_at(inputs, self._cut_for(inputs, cut))
        self._count(outcome, record, observed=True)
        return outcome

    def infer_stream(
        self, batches: Iterable[np.ndarray], cut: int | None = None, in_flight: int = 2
    ) -> Iterator[Outcome]:
        """Classify ``batches`` in order, up to ``in_flight`` requests out at once: the next batch's
        head runs (and goes out) while the service answers the previous ones, so a board keeps
        its CPU, the link and the server busy together. Each answer is yielded in input order;
        one that fails falls back to the whole model here, as :meth:`infer`'s does. Latencies
        here include waiting behind the board's own earlier requests, so they do not feed the
        cut choice's observed latencies (the link estimate still learns from them)."""
        window: deque[Pending | Outcome] = deque()
        for inputs in batches:
            chosen = self._cut_for(inputs, cut)
            if self._can_offload(chosen):
                window.append(self._send(inputs, chosen))
            else:
                window.append(self._alone(inputs, fallback=chosen != self.whole_model))
            while len(window) >= max(1, in_flight):
                yield self._finish(window.popleft())
        while window:
            yield self._finish(window.popleft())

    def _finish(self, item: Pending | Outcome) -> Outcome:
        outcome = self._settle(item) if isinstance(item, Pending) else item
        self._count(outcome, record=True, observed=False)
        return outcome

    def _can_offload(self, cut: int) -> bool:
        """A request at ``cut`` may go to the service now: not the whole model, no backoff, usable."""
        return cut != self.whole_model and time.monotonic() >= self._backoff_until and not self.service_problem()

    def _settle(self, pending: Pending) -> Outcome:
        """``pending``'s answer, or, when the service fails it, the whole model here (the failed
        request's wait included in its latency) and a backoff before the service is tried again."""
        try:
            return self._collect(pending)
        except ServiceError as exc:
            self._failed(str(exc))
            outcome = self._alone(pending.inputs, fallback=True)
            outcome.latency_s = time.perf_counter() - pending.started
            return outcome

    def _cut_for(self, inputs: np.ndarray, cut: int | None) -> int:
        if cut is None:
            if self.choice is None or self._since_plan >= self.config.replan_every:
                self._refresh_link(inputs)
                self.plan()
            cut = self.choice.cut
        self._since_plan += 1
        return cut

    def _count(self, outcome: Outcome, record: bool, observed: bool) -> None:
        if observed and not outcome.fallback:
            self._observed.setdefault(outcome.cut, deque(maxlen=OBSERVED_WINDOW)).append(outcome.latency_s)
        if record:
            self.counts.requests += 1
            self.counts.by_cut[outcome.cut] = self.counts.by_cut.get(outcome.cut, 0) + 1
            self.counts.fallbacks += int(outcome.fallback)

    def _infer_at(self, inputs: np.ndarray, cut: int) -> Outcome:
        if self._can_offload(cut):
            return self._settle(self._send(inputs, cut))
        return self._alone(inputs, fallback=cut != self.whole_model)

    def _refresh_link(self, inputs: np.ndarray) -> None:
        """While the whole model runs here, the other cuts get no new requests: one request at the
        best of them keeps its latency (and the link estimate) current, so a link that got faster
        is noticed. A real inference; its answer is not used."""
        if self.choice is None or self.choice.cut != self.whole_model or time.monotonic() < self._backoff_until:
            return
        others = [(seconds, cut) for cut, seconds in self.choice.table if cut != self.whole_model]
        if others and math.isfinite(min(others)[0]):
            self.infer(inputs, min(others)[1], record=False)

    def _failed(self, reason: str) -> None:
        self._backoff_until = time.monotonic() + SERVICE_BACKOFF_S
        if len(self.counts.refusals) < 8:
            self.counts.refusals.append(reason)
        service, backoff = self.config.service, SERVICE_BACKOFF_S
        log.warning("request to %s failed (%s): answering here for %g s", service, reason, backoff)


def predicted_table(client: InferenceClient) -> list[dict]:
    """One row per candidate for ``cpsl-infer plan`` and the bench: measured parts and the prediction."""
    link, observed = client.link.estimate(), client.observed()
    rows = []
    for cost in client.costs():
        rows.append(
            {
                "cut": cost.cut,
                "after": "(input)" if cost.cut == 0 else client.manifest.layer_names[cost.cut - 1],
                "where": "device" if cost.device_only else ("server" if cost.cut == 0 else "split"),
                "head_s": cost.head_s,
                "encode_s": cost.encode_s,
                "wire_bytes": cost.wire_bytes,
                "server_s": cost.server_s,
                "predicted_s": predict(cost, link),
                "observed_s": observed.get(cost.cut),
            }
        )
    return rows


def link_summary(client: InferenceClient) -> dict:
    link = client.link.estimate()
    if link is None:
        return {"base_s": None, "up_mbit": None, "samples": 0}
    rate = None if math.isinf(link.up_bytes_per_s) else link.up_bytes_per_s * 8 / 1e6
    return {"base_s": link.base_s, "up_mbit": rate, "samples": client.link.samples}
