"""``edge_server serve RUN_DIR``: the trained model's server side for split inference.

A device (``cpsl-infer``) runs the first layers of the trained model in onnxruntime and
sends the activations after them, encoded as ``toolkit.compression`` does for training, as
an INFER on its own request topic; the service runs the remaining layers in torch and
answers with a PREDICTION (the logits) on the device's reply topic. Same protocol, same
broker, same certificates and ACL as training: the device is who the topic (and so the
broker's authentication) says, and nothing received names code -- the model is the one
the run in RUN_DIR trained, its weights read from model.pt with ``weights_only=True``.

Every request is checked before the model sees it: the weights it was made for (the digest
the service announces), a cut the service serves, an encoding it knows, a batch no larger
than ``--max-batch``, activations of exactly the shape the cut produces. A refused request
gets a PREDICTION with the reason, and is counted; the service keeps serving.

Requests that wait together are answered together: when one arrives, every request already
queued behind it (up to ``--max-batch`` inputs in all) is checked and decoded on its own,
then those at the same cut go through the model as one batch, and each gets back its own
rows (``--no-batching`` answers one at a time). Nothing waits for a batch to fill: under
light load each request goes alone; under load, while one batch computes, the next one
gathers. In eval mode a row's logits do not depend on the other rows, so merging requests
of different devices changes nothing but the float rounding (within 1e-5, tested).

The retained SERVICE_STATUS tells devices what is served: the cuts, the encodings, the
weights' digest and the server's measured time for its part at each cut (at a few batch
sizes), which the device's cut choice needs. The last will turns it offline.
"""

from __future__ import annotations

import io
import logging
import secrets
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_server.run_state import read_settings
from toolkit import compression
from toolkit.compression import Encoding
from toolkit.devices import resolve_device
from toolkit.errors import UserError
from toolkit.files import read_bounded
from toolkit.inference.heads import weights_digest
from toolkit.models import LayeredModel, load_model
from toolkit.protocol import Kind, topics
from toolkit.protocol import messages as m
from toolkit.protocol.codec import ProtocolError, encode, make_header
from toolkit.protocol.endpoint import Endpoint, Received, reason_key
from toolkit.transport import BrokerAddress, MqttTransport, Will

log = logging.getLogger("cpsl.serve")

MAX_MODEL_BYTES = 4 << 30
SENDER = "server"  # the header's device on the service's own frames (its status)
TAIL_BATCH_SIZES = (1, 8, 32)
ACCEPTED_ENCODINGS = ("fp32", "fp16", "int8", "fp32+zstd", "fp16+zstd", "int8+zstd")


@dataclass
class ServeConfig:
    broker: BrokerAddress
    run_dir: Path
    service: str = ""  # default: the run's id
    threads: int = 1
    max_batch: int = 256
    raw_inputs: bool = True  # serve cut 0 (the device sends its raw inputs): the operator may refuse
    connect_timeout_s: float = 10.0
    tail_batch_sizes: tuple[int, ...] = TAIL_BATCH_SIZES
    tail_repeats: int = 5
    device: str = "cpu"  # where the server's part runs: cpu, cuda, cuda:N, auto (toolkit.devices)
    batching: bool = True  # answer the requests queued together in one forward per cut


class RequestRefusedError(Exception):
    """An INFER the service will not answer with logits; the message is the reason it sends back."""


def load_trained(run_dir: Path, model_spec: str | None = None) -> tuple[LayeredModel, str]:
    """The model run_dir's run trained, with its final weights (model.pt), and the run's id.
    ``model_spec``: the operator's name for a model of their own code (a run folder's is not used)."""
    from toolkit.models.registry import model_to_rebuild

    settings = read_settings(run_dir)
    if not settings.model:
        raise UserError(f"{run_dir}/run.json names no model")
    shape, classes = None, 10
    if settings.data:  # built for the data's shape and classes, as the run built it
        from toolkit.data import load_dataset

        data = load_dataset(settings.data, settings.seed)
        shape, classes = data.input_shape, data.num_classes
    spec = model_to_rebuild(settings.model, model_spec, f"{run_dir}/run.json")
    model = load_model(spec, input_shape=shape, num_classes=classes, seed=settings.seed)
    raw = read_bounded(run_dir / "model.pt", MAX_MODEL_BYTES, "trained model")
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch's own error types vary by version
        raise UserError(f"{run_dir}/model.pt is not a saved state dict: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{run_dir}/model.pt is not a state dict of tensors")
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{run_dir}/model.pt does not fit {model.name}: {str(exc).splitlines()[0][:200]}") from None
    run_id = str(settings.config.get("run_id") or run_dir.name)
    return model, run_id


class TailService:
    def __init__(self, config: ServeConfig, model: LayeredModel, run_id: str) -> None:
        self.config = config
        self.model = model
        self.run_id = run_id
        self.service = topics.check_id(config.service or run_id, "service name")
        self.placement = resolve_device(config.device)
        model.net.eval()
        self.num_layers = model.num_layers
        self.cuts = list(range(0 if config.raw_inputs else 1, self.num_layers))
        self.digest = weights_digest(model.net.state_dict())  # of the CPU tensors, as the heads were digested
        model.net.to(self.placement)  # requests are decoded on the CPU, then moved; logits come back
        self.shapes = self._shapes()
        self.accepted = {Encoding.parse(name).name for name in ACCEPTED_ENCODINGS}
        self.endpoint = Endpoint(f"serve-{self.service}")
        self.tail: list[m.TailLatency] = []
        self.served: Counter[int] = Counter()  # requests answered, by cut
        self.samples = 0
        self.refused = 0
        self.server_s: deque[float] = deque(maxlen=1000)  # the last requests' decode + tail seconds
        self.forwards = 0  # forward passes run: fewer than requests answered when requests were merged
        self._stop = threading.Event()

    def _shapes(self) -> dict[int, tuple[int, ...]]:
        """Each cut's activations for one sample (cut 0: the input)."""
        shapes = {0: tuple(self.model.input_shape)}
        x = torch.zeros(1, *self.model.input_shape, device=self.placement)
        with torch.inference_mode():
            for index, layer in enumerate(self.model.net, start=1):
                x = layer(x)
                shapes[index] = tuple(x.shape[1:])
        return shapes

    # measuring ---------------------------------------------------------------------------------
    def measure_tails(self, on_step: Callable[[str], None] | None = None) -> list[m.TailLatency]:
        """The server's part at every served cut and a few batch sizes: median of a few timed runs
        after one untimed, in eval mode as requests run."""
        sizes = [b for b in self.config.tail_batch_sizes if b <= self.config.max_batch] or [1]
        measured = []
        for cut in self.cuts:
            if on_step is not None:
                on_step(f"server part after cut {cut}")
            tail = self.model.net[cut:]
            seconds = []
            for batch in sizes:
                x = torch.randn(batch, *self.shapes[cut])
                runs = []
                with torch.inference_mode():
                    for repeat in range(self.config.tail_repeats + 1):
                        started = time.perf_counter()
                        tail(x.to(self.placement)).cpu()  # as a request runs: in, computed, back
                        if repeat:
                            runs.append(time.perf_counter() - started)
                seconds.append(statistics.median(runs))
            measured.append(m.TailLatency(cut=cut, batch_sizes=sizes, seconds=seconds))
        self.tail = measured
        return measured

    def status(self, state: str) -> m.ServiceStatus:
        if state == "offline":
            return m.ServiceStatus(state="offline", model=self.model.name)
        return m.ServiceStatus(
            state="online",
            model=self.model.name,
            model_fingerprint=self.model.fingerprint(),
            weights=self.digest,
            num_layers=self.num_layers,
            cuts=self.cuts,
            tail=self.tail,
            encodings=sorted(self.accepted),
            max_batch=self.config.max_batch,
        )

    def _status_frame(self, state: str) -> bytes:
        header = make_header(self.service, SENDER, seq=self.endpoint.next_seq())
        return encode(Kind.SERVICE_STATUS, header, self.status(state))

    # connection ------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.tail:
            self.measure_tails()
        status = topics.infer_status(self.service)
        transport = MqttTransport(
            self.config.broker,
            client_id=f"cpsl-serve-{self.service}-{secrets.token_hex(4)}",
            on_message=self.endpoint.on_frame,
            will=Will(status, self._status_frame("offline")),
            on_reconnect=self._announce,
        )
        self.endpoint.attach(transport)
        transport.subscribe(topics.all_infer_requests(self.service), qos=1)
        transport.connect(self.config.connect_timeout_s)
        self._announce()

    def _announce(self) -> None:
        """The retained status (again after a reconnect: a broker restarted without persistence forgot it)."""
        frame = self._status_frame("online")
        self.endpoint.transport.publish(topics.infer_status(self.service), frame, qos=1, retain=True)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        transport = self.endpoint.transport
        if transport is None:
            return
        frame = self._status_frame("offline")
        transport.publish(topics.infer_status(self.service), frame, qos=1, retain=True)
        self.endpoint.flush(5.0, "the offline status")
        transport.close()

    # serving ---------------------------------------------------------------------------------
    def serve(self, duration_s: float | None = None, on_progress: Callable[[TailService], None] | None = None) -> None:
        """Answer requests until :meth:`stop` (or ``duration_s``); ``on_progress`` every few seconds."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        next_progress = time.monotonic() + 5.0
        while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
            received = self.endpoint.receive(0.25)
            if received is not None:
                self.handle_batch([received, *self._queued_behind(received)])
            if on_progress is not None and time.monotonic() >= next_progress:
                on_progress(self)
                next_progress = time.monotonic() + 5.0

    def _queued_behind(self, first: Received) -> list[Received]:
        """The requests waiting now (none is waited for), up to --max-batch inputs with ``first``."""
        if not self.config.batching:
            return []
        waiting, room = [], self.config.max_batch - _declared_rows(first)
        while room > 0:
            item = self.endpoint.receive(0.0)
            if item is None:
                break
            waiting.append(item)
            room -= _declared_rows(item)
        return waiting

    def handle(self, received: Received) -> None:
        """One request: answered with logits, or with the reason it is refused (and counted)."""
        self.handle_batch([received])

    def handle_batch(self, items: list[Received]) -> None:
        """Requests that arrived together: each checked and decoded alone (a refusal is that
        request's), then one forward per cut for the rest, and each answered with its rows."""
        ready: dict[int, list[tuple[Received, torch.Tensor, float]]] = {}
        for item in items:
            if item.message.kind is not Kind.INFER:  # the endpoint lets only INFER through; a defect otherwise
                continue
            started = time.perf_counter()
            try:
                x = self.prepare(item.message.body, item.message.tensors)
            except RequestRefusedError as exc:
                checked_s = time.perf_counter() - started
                self._reply(item, time.monotonic() - checked_s, checked_s, error=str(exc))
                continue
            ready.setdefault(item.message.body.cut, []).append((item, x, time.perf_counter() - started))
        for cut, requests in ready.items():
            for group in _at_most(requests, self.config.max_batch):
                group_at, started = time.monotonic(), time.perf_counter()
                logits = self.forward(cut, torch.cat([x for _, x, _ in group]) if len(group) > 1 else group[0][1])
                shared_s = time.perf_counter() - started
                rows = 0
                for item, x, decode_s in group:
                    mine = logits[rows : rows + x.shape[0]].contiguous()
                    rows += x.shape[0]
                    # queued: all but its own decode and the forward (the others' decodes, earlier groups)
                    self._reply(item, group_at - decode_s, decode_s + shared_s, logits=mine)

    def _reply(
        self, item: Received, queued_until: float, server_s: float, error: str = "", logits: torch.Tensor | None = None
    ) -> None:
        """Send one request its PREDICTION (logits, or the reason it was refused) and count it;
        ``queued_until``: when the work counted in ``server_s`` began for it (monotonic)."""
        message = item.message
        device = message.header.device
        request: m.Infer = message.body
        queued = queued_until - item.received_at
        tensors: dict[str, torch.Tensor] = {}
        if error:
            self.refused += 1
            self.endpoint.count(reason_key(error))
            log.warning("refused a request of %s: %s", device, error)
        else:
            tensors["logits"] = logits
            self.served[request.cut] += 1
            self.samples += int(logits.shape[0])
            self.server_s.append(server_s)
        body = m.Prediction(request=request.request, server_s=server_s, queued_s=max(0.0, queued), error=error)
        try:
            self.endpoint.send(
                topics.infer_reply(self.service, device),
                Kind.PREDICTION,
                body,
                run=self.service,
                device=device,
                tensors=tensors,
            )
        except Exception as exc:  # a reply that cannot be sent costs that reply, not the service
            log.warning("could not answer %s: %s", device, exc)

    def answer(self, request: m.Infer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits for ``request``, or RequestRefusedError saying why not."""
        return self.forward(request.cut, self.prepare(request, tensors))

    def forward(self, cut: int, x: torch.Tensor) -> torch.Tensor:
        """The model after ``cut`` on the decoded activations ``x`` (CPU), logits back on the CPU."""
        self.forwards += 1
        with torch.inference_mode():
            return self.model.net[cut:](x.to(self.placement)).to("cpu", torch.float32).contiguous()

    def prepare(self, request: m.Infer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``request``'s activations, checked and decoded (CPU), or RequestRefusedError saying why not."""
        if request.weights != self.digest:
            raise RequestRefusedError(
                f"made for other weights ({request.weights[:12]}...): this service runs {self.digest[:12]}..."
            )
        if request.cut not in self.cuts:
            served = f"cuts served: {self.cuts[0]}..{self.cuts[-1]}"
            if request.cut == 0:
                served = "raw inputs (cut 0) are not accepted here"
            raise RequestRefusedError(f"cut {request.cut} is not served: {served}")
        try:
            encoding = Encoding.parse(request.encoding)
        except ValueError as exc:
            raise RequestRefusedError(str(exc)) from None
        if encoding.name not in self.accepted:
            raise RequestRefusedError(f"encoding {encoding} is not accepted")
        expected = self.shapes[request.cut]
        stray = sorted(name for name in tensors if name != "x" and not name.startswith("x."))
        if stray:
            raise RequestRefusedError(f"unexpected tensors {stray[:4]}: a request carries x only")
        try:
            shape = compression.declared_shape("x", tensors, encoding)
            if tuple(shape[1:]) != expected or not 1 <= (shape[0] if shape else 0) <= self.config.max_batch:
                raise RequestRefusedError(
                    f"activations of shape {list(shape)}: cut {request.cut} needs [1..{self.config.max_batch}, "
                    f"{', '.join(map(str, expected))}]"
                )
            return compression.decode("x", tensors, encoding, expect_shape=shape)
        except ProtocolError as exc:
            raise RequestRefusedError(str(exc)) from None


def _declared_rows(item: Received) -> int:
    """How many inputs a request says it carries, before anything is decoded; 1 where it says
    nothing usable (it will be refused on its own)."""
    try:
        shape = compression.declared_shape("x", item.message.tensors, Encoding.parse(item.message.body.encoding))
        return max(1, int(shape[0]))
    except (ProtocolError, ValueError, IndexError):  # malformed: the request is refused on its own, later
        return 1


def _at_most(requests: list, max_rows: int) -> list[list]:
    """Consecutive groups of (item, x, seconds) whose inputs add up to at most ``max_rows`` each."""
    groups: list[list] = [[]]
    rows = 0
    for request in requests:
        size = int(request[1].shape[0])
        if groups[-1] and rows + size > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(request)
        rows += size
    return groups
