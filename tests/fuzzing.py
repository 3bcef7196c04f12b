"""Mutations of recorded frames, and harnesses that feed them to the codec, the endpoints and the
handlers of the server and the agent. Shared by tests/test_fuzz.py (hypothesis, bounded, in CI)
and bench/fuzz_frames.py (10,000 frames per kind, counts for docs/security.md).

The frames in tests/frames were recorded from a real run by bench/record_frames.py.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edge_server.intake import check_weights
from edge_server.server import EdgeServer, ServerConfig
from edge_server.strategy import Upload
from firmware_agent.agent import AgentConfig, DeviceAgent
from toolkit.data import load_dataset, partition_indices
from toolkit.models import load_model
from toolkit.protocol import Kind, ProtocolError, decode, topics
from toolkit.protocol import messages as m
from toolkit.protocol.endpoint import Endpoint
from toolkit.training import server_step
from toolkit.transport import BrokerAddress

FRAMES = Path(__file__).with_name("frames")
PREFIX = struct.Struct(">4sBBI")
RUN = "recorded"  # the run id of the recorded frames
CUT = 6  # the cut the recorded run trained at (pool2)
NASTY_VALUES = [
    None,
    True,
    -1,
    0,
    2**31,
    2**63,
    2**70,
    -(2**70),
    1e308,
    -1e308,
    0.5,
    "",
    "os:abort",
    "subprocess:run",
    "../../../etc/passwd",
    "x" * 5000,
    "\u202e\x00\ud7ff",
    [],
    {},
    [[[[[[[[]]]]]]]],
    {"a": {"b": {"c": {}}}},
    list(range(100)),
    "lenet5",
    "vgg",
    "dev1",
    "recorded",
    "0" * 40,
]


@dataclass(frozen=True)
class Recorded:
    kind: Kind
    topic: str
    frame: bytes


def lenet_assign(model: str, cut: int = CUT) -> m.Assign:
    """An ASSIGN for LeNet-5's shape and fingerprint that names ``model``: hostile when it is not lenet5."""
    return m.Assign(
        scheme="cpsl",
        model=model,
        model_fingerprint=load_model("lenet5").fingerprint(),
        input_shape=[1, 28, 28],
        num_classes=10,
        cut=cut,
        cluster=0,
        cluster_devices=["dev0"],
        hyper=m.Hyperparameters(batch_size=8, iterations=1, lr=0.1),
        gradient_timeout_s=5,
    )


def recorded_frames() -> list[Recorded]:
    index = json.loads((FRAMES / "index.json").read_text())
    return [Recorded(Kind[row["kind"]], row["topic"], (FRAMES / row["file"]).read_bytes()) for row in index]


def split_frame(frame: bytes) -> tuple[int, dict, bytes]:
    _, _, kind, length = PREFIX.unpack_from(frame)
    meta = json.loads(frame[PREFIX.size : PREFIX.size + length])
    return kind, meta, frame[PREFIX.size + length :]


def join_frame(kind: int, meta: object, payload: bytes, version: int = 1) -> bytes:
    text = json.dumps(meta).encode()
    return PREFIX.pack(b"CPSL", version, kind % 256, len(text)) + text + payload


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for position, child in enumerate(value[:8]):
            found += _paths(child, (*prefix, position))
    return found


def _replace(value: object, path: tuple, new: object, delete: bool = False) -> object:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        copy = dict(value)
        if delete and not rest:
            copy.pop(head, None)
        else:
            copy[head] = _replace(value[head], rest, new, delete)
        return copy
    copy = list(value)
    if delete and not rest:
        copy.pop(head)
    else:
        copy[head] = _replace(value[head], rest, new, delete)
    return copy


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """One to three random mutations of a frame: bytes, lengths, header JSON, tensor table, kind."""
    for _ in range(rng.randint(1, 3)):
        frame = rng.choice(MUTATORS)(frame, rng)
    return frame


def _flip(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    return bytes(data)


def _truncate(frame: bytes, rng: random.Random) -> bytes:
    return frame[: rng.randrange(len(frame) + 1)]


def _extend(frame: bytes, rng: random.Random) -> bytes:
    return frame + rng.randbytes(rng.choice([1, 7, 100, 4096]))


def _header_value(frame: bytes, rng: random.Random) -> bytes:
    try:
        kind, meta, payload = split_frame(frame)
    except Exception:
        return _flip(frame, rng)
    path = rng.choice(_paths(meta)[1:] or [()])
    action = rng.random()
    if action < 0.15 and path:
        meta = _replace(meta, path, None, delete=True)
    elif action < 0.25:
        meta = _replace(meta, path[:-1], {**_at(meta, path[:-1]), "unknown": 1}) if _is_dict(meta, path[:-1]) else meta
    else:
        meta = _replace(meta, path, rng.choice(NASTY_VALUES))
    return join_frame(kind, meta, payload)


def _at(value: object, path: tuple) -> object:
    for part in path:
        value = value[part]
    return value


def _is_dict(value: object, path: tuple) -> bool:
    try:
        return isinstance(_at(value, path), dict)
    except (KeyError, IndexError, TypeError):
        return False


def _tensor_table(frame: bytes, rng: random.Random) -> bytes:
    try:
        kind, meta, payload = split_frame(frame)
        table = meta["tensors"]
    except Exception:
        return _flip(frame, rng)
    if not isinstance(table, list) or not all(isinstance(e, dict) and isinstance(e.get("shape"), list) for e in table):
        return _flip(frame, rng)
    if not table:
        table.append({"name": "extra", "dtype": "uint8", "shape": [len(payload) + 1]})
    entry = rng.choice(table)
    choice = rng.random()
    if choice < 0.3:
        entry["dtype"] = rng.choice(["float64", "float16", "int64", "uint8", "bool", "complex64", "object"])
    elif choice < 0.6 and entry["shape"]:
        position = rng.randrange(len(entry["shape"]))
        size = entry["shape"][position]
        doubled = 2 * size if isinstance(size, int) else 2
        entry["shape"][position] = rng.choice([0, 1, doubled, 2**31, -1])
    elif choice < 0.8:
        entry["shape"] = [*entry["shape"], 1] if rng.random() < 0.5 else entry["shape"][:-1]
    else:
        table.append(dict(entry))
    return join_frame(kind, meta, payload)


def _kind(frame: bytes, rng: random.Random) -> bytes:
    if len(frame) < PREFIX.size:
        return frame
    data = bytearray(frame)
    data[5] = rng.choice([*list(Kind), 0, 99, 255])
    return bytes(data)


def _payload_values(frame: bytes, rng: random.Random) -> bytes:
    """Valid structure, hostile numbers: the tensor bytes replaced by huge, NaN or random floats."""
    try:
        kind, meta, payload = split_frame(frame)
    except Exception:
        return _flip(frame, rng)
    fill = rng.choice([b"\x00\x00\x80\x7f", b"\x00\x00\xc0\x7f", b"\xff\xff\x7f\x7f", b"\x00\x00\x00\x00"])
    data = bytearray(payload)
    for start in range(rng.randrange(4) * 4 if data else 0, len(data) - 3, rng.choice([4, 16, 4096])):
        data[start : start + 4] = fill
    return join_frame(kind, meta, bytes(data))


MUTATORS = [_flip, _truncate, _extend, _header_value, _header_value, _tensor_table, _kind, _payload_values]


def parameters_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RecordingTransport:
    """The transport seam's in-memory stand-in for handler fuzzing (no broker: nothing travels)."""

    connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, len(payload)))

    def flush(self, timeout_s: float) -> bool:
        return True

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        pass


@dataclass
class Outcome:
    accepted: int = 0
    rejected: int = 0
    uncaught: list[str] = field(default_factory=list)
    changed_by_rejected: int = 0

    def count(self, accepted: bool, changed: bool) -> None:
        """One frame: accepted or rejected, and whether it changed what it must not."""
        if accepted:
            self.accepted += 1
        else:
            self.rejected += 1
        self.changed_by_rejected += int(changed)


class ServerHarness:
    """The server's intake, checks, training step and strategy, fed frame by frame.

    An accepted SMASHED is trained on and an accepted WEIGHTS_UP is averaged in, as in a
    round; after a rejected frame the model's parameters must be exactly as before.
    """

    def __init__(self) -> None:
        self.data = load_dataset("builtin:digits", seed=0)
        config = ServerConfig(
            broker=BrokerAddress("127.0.0.1", 1),
            scheme="cpsl",
            rounds=1,
            min_devices=1,
            batch_size=8,
            iterations=3,
            cut=CUT,
            run_id=RUN,
        )
        self.server = EdgeServer(config, load_model("lenet5", seed=0), self.data)
        self.server.rounds.ensure_server_optimizer(CUT)
        self.reference = {k: v.clone() for k, v in self.server.model.net[:CUT].state_dict().items()}
        for item in recorded_frames():
            if item.kind is Kind.REGISTER:
                self.server.endpoint.on_frame(item.topic, item.frame)
        while self.server.endpoint._inbox.qsize():
            self.server.intake.poll(0)
        self.outcome = Outcome()

    def feed(self, topic: str, frame: bytes) -> None:
        before = parameters_digest(self.server.model.net)
        self.server.endpoint._seen.clear()  # mutants share their original's sequence number: not duplicates here
        accepted = False
        try:
            accepted = self._handle(topic, frame)
        except Exception as exc:  # the property: never
            self.outcome.uncaught.append(f"{type(exc).__name__}: {exc}"[:300])
            return
        self.outcome.count(accepted, not accepted and parameters_digest(self.server.model.net) != before)

    def _handle(self, topic: str, frame: bytes) -> bool:
        server = self.server
        counted = dict(server.endpoint.rejected)
        server.endpoint.on_frame(topic, frame)
        item = server.intake.poll(0)
        if item is None:  # refused, or taken by the registry (REGISTER, OFFLINE, HEARTBEAT) or intake (TIMINGS, REJECT)
            return dict(server.endpoint.rejected) == counted  # taken, not dropped
        message = item.message
        if message.kind is Kind.SMASHED:
            if server.rounds.check_smashed(item, CUT) is not None:
                return False
            server_step(
                server.model.net[CUT:],
                server.rounds.server_optimizer,
                [message.tensors["smashed"]],
                [message.tensors["labels"]],
                server.rounds.loss_fn,
            )
            return True
        if message.kind is Kind.WEIGHTS_UP:
            if check_weights(message.tensors, self.reference) is not None:
                return False
            device = message.header.device
            upload = Upload(message.tensors, message.body.num_samples, server.registry.registered_samples(device))
            result = server.strategy.aggregate(self.reference, {device: upload})
            if result.state is None:
                return False
            server.model.net[:CUT].load_state_dict(result.state)
            return True
        return message.kind is Kind.PROBE_ECHO


class AgentHarness:
    """A device agent's endpoint and handlers, fed frame by frame; turns end at their first wait."""

    def __init__(self) -> None:
        data = load_dataset("builtin:digits", seed=0)
        indices = partition_indices(data.train_y.numpy(), 2, "iid", 0)[0]
        self.agent = DeviceAgent(AgentConfig(BrokerAddress("127.0.0.1", 1), "dev0", "0/2"), data, indices, None)
        self.transport = RecordingTransport()
        self.agent.endpoint.attach(self.transport)
        self.agent.stop()  # a turn aborts where it would wait for the server: fuzzing must not block
        self.outcome = Outcome()

    def feed(self, topic: str, frame: bytes) -> None:
        agent = self.agent
        failures = agent.failures
        agent.endpoint._seen.clear()  # mutants share their original's sequence number: not duplicates here
        try:
            agent.endpoint.on_frame(topic, frame)
            item = agent.endpoint.receive(0)
            if item is None:
                self.outcome.rejected += 1
                return
            agent.handle_safely(item)
            self.outcome.accepted += 1
        except Exception as exc:  # the property: never
            self.outcome.uncaught.append(f"{type(exc).__name__}: {exc}"[:300])
        if agent.failures != failures:
            self.outcome.uncaught.append("a handler raised (caught by the serve loop; see the log)")


def decode_only(frame: bytes) -> str | None:
    """None if ``frame`` decodes or is refused with a ProtocolError; else what escaped."""
    try:
        decode(frame)
    except ProtocolError:
        pass
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def endpoint_only(topic: str, frame: bytes, endpoint: Endpoint) -> str | None:
    try:
        endpoint.on_frame(topic, frame)
        endpoint.receive(0)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


class InferenceHarness:
    """Split inference's two ends, fed frame by frame: INFER to the service (edge_server.serve),
    SERVICE_STATUS and PREDICTION to a device's client (firmware_agent.infer).

    The service's model must never change (it only answers); an accepted INFER is one answered
    with logits. The client awaits whichever request a reply names, so a reply that decodes
    goes through its checks (a refusal or malformed logits is rejected there); an accepted
    status must leave the client able to say whether it can use the service."""

    def __init__(self, folder: Path) -> None:
        from edge_server.serve import ServeConfig, TailService
        from firmware_agent.infer import InferConfig, InferenceClient
        from toolkit.inference.heads import HeadSet, export_heads

        model = load_model("lenet5", seed=0)
        broker = BrokerAddress("127.0.0.1", 1)
        config = ServeConfig(broker, folder, service=RUN, tail_repeats=1, tail_batch_sizes=(1,))
        self.service = TailService(config, model, RUN)
        self.service.endpoint.attach(RecordingTransport())
        export_heads(model, folder / "heads", RUN, cuts=[12])
        self.client = InferenceClient(InferConfig(broker, "dev0", RUN), HeadSet.open(folder / "heads"))
        self.client.endpoint.attach(RecordingTransport())
        self.outcome = Outcome()

    def feed(self, topic: str, frame: bytes) -> None:
        from firmware_agent.infer import ServiceError

        before = parameters_digest(self.service.model.net)
        accepted = False
        try:
            if topics.role_of(topic) == "request":
                self.service.endpoint._seen.clear()
                answered = self.service.served.total()
                self.service.endpoint.on_frame(topic, frame)
                item = self.service.endpoint.receive(0)
                if item is not None:
                    self.service.handle(item)
                accepted = self.service.served.total() > answered
            else:
                client = self.client
                client.endpoint._seen.clear()
                try:  # the client awaits the request this reply names (if it is one)
                    peek = decode(frame)
                    if isinstance(peek.body, m.Prediction):
                        client._awaited = {peek.body.request}
                except ProtocolError:
                    pass
                status = client.status
                client.endpoint.on_frame(topic, frame)
                client._pump(0)
                if client.status is not status:
                    accepted = isinstance(client.service_problem(), str) and isinstance(client.network_cuts(), list)
                elif client._replies:
                    _, (reply, tensors) = client._replies.popitem()
                    batch = tensors["logits"].shape[0] if "logits" in tensors and tensors["logits"].dim() else 1
                    try:
                        client.answer_of(reply, tensors, batch)
                        accepted = True
                    except ServiceError:
                        accepted = False
        except Exception as exc:  # the property: never
            self.outcome.uncaught.append(f"{type(exc).__name__}: {exc}"[:300])
            return
        # the service never trains: any change at all is a defect
        self.outcome.count(accepted, parameters_digest(self.service.model.net) != before)
