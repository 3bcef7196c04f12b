"""Typed message bodies, one pydantic record per message kind: no pickled dicts on the wire.

Every frame carries a common header (run, round, iteration, sequence number, sender)
and a kind-specific ``body`` validated by the record below; tensors travel beside it
as dtype + shape + raw bytes (see ``codec``).
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
SESSION_PATTERN = r"^[0-9a-f]{16,64}$"
MAX_TEXT = 512  # free-text fields (reasons, board names): bounded like everything from outside
MAX_LIST = 100_000  # list fields (cluster members, per-iteration timings)
MAX_PROBE_BYTES = 8 << 20  # the most payload a probe may carry or ask to be echoed: the server's policy
MAX_SAMPLES = 1 << 31  # a device's local sample count
MAX_STREAM_POSITION = 10_000_000  # batches into a run: 100,000 rounds of 100 iterations
MAX_TURN_TOKEN = 2**31 - 1
# what crosses the cut: QUANT[+zstd] (toolkit.compression)
ENCODING_PATTERN = r"^(fp32|fp16|int8)(\+zstd)?$"
CONNECTION_LOST = "connection lost"  # an agent's last will says this; a goodbye says something else
Text = Annotated[str, Field(max_length=MAX_TEXT)]


def printable(text: str) -> str:
    """``text`` from another party, safe for a log line, a terminal or a page: every character
    that is not printable (newlines, ANSI escapes, NUL) written out as its escape, so a
    received string can neither forge a log line nor drive a terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class Kind(enum.IntEnum):
    REGISTER = 1
    HEARTBEAT = 2
    OFFLINE = 3
    SERVER_STATUS = 4
    SERVICE_STATUS = 5
    ASSIGN = 10
    WEIGHTS_DOWN = 11
    GRADIENT = 12
    STOP = 13
    PROBE = 14
    PREDICTION = 15
    SMASHED = 20
    WEIGHTS_UP = 21
    TIMINGS = 22
    PROBE_ECHO = 23
    REJECT = 24
    INFER = 25
    METRICS = 30
    CHUNK = 40


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Header(Body):
    """Fields every frame has. ``seq`` increases per sender and lets receivers drop duplicates (QoS 1)."""

    run: str = Field(pattern=ID_PATTERN)
    device: str = Field(pattern=ID_PATTERN)
    round: int = Field(ge=0, le=1 << 31)
    iteration: int = Field(ge=0, le=1 << 31)
    seq: int = Field(ge=0, lt=1 << 63)
    sent_at: float = Field(ge=0, le=1e11)


class Capabilities(Body):
    board: Text = ""
    torch: Text = ""
    threads: int = Field(default=1, ge=1)
    accelerator: Literal["cpu", "cuda"] = "cpu"  # where the device side trains (cpsl-agent --device)
    accelerator_name: Text = ""  # e.g. "cuda:0 (Orin)"; "" from agents before it was sent


class Register(Body):
    """``session``: random per agent process, repeated in its OFFLINE frames (its last will
    included): an OFFLINE ends only the registration of the same session, so a stale will
    from an earlier life never unregisters a device that came back."""

    session: str = Field(pattern=SESSION_PATTERN)
    num_samples: int = Field(ge=0, le=MAX_SAMPLES)
    partition: Text = ""
    capabilities: Capabilities
    model: Text = ""
    model_fingerprint: Text = ""
    models: list[Text] = Field(default_factory=list, max_length=64)  # what this device's owner lets it train
    # The full device profile travels as a uint8 tensor named "profile" (JSON text).


class Heartbeat(Body):
    state: Literal["idle", "training"]
    uptime_s: float = Field(ge=0)


class Offline(Body):
    session: str = Field(pattern=SESSION_PATTERN)
    reason: Text = CONNECTION_LOST


class ServerStatus(Body):
    state: Literal["online", "offline"]
    model: Text = ""
    scheme: Text = ""


class Hyperparameters(Body):
    batch_size: int = Field(ge=1, le=65536)
    iterations: int = Field(ge=1, le=1_000_000)
    lr: float = Field(gt=0, le=100)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)


class Grant(Body):
    """When a device may upload its smashed data in each iteration.

    With ``slot_duration_s`` set, the device starts its upload no earlier than
    ``uplink_epoch + clock_offset_s + slot_offset_s`` on its own clock, where the epoch
    (server clock) comes with the weights (iteration 0) or the previous gradient, and the
    server planned the slot so that the upload ends within ``slot_duration_s``.
    ``clock_offset_s`` is the device clock minus the server clock, as the server's probes
    estimated it. ``rate_bps`` is the rate the plan expects inside the slot. Without a
    slot the device sends as soon as its forward pass is done.
    """

    slot_offset_s: float = Field(default=0.0, ge=0)
    slot_duration_s: float | None = Field(default=None, gt=0)
    rate_bps: float | None = Field(default=None, gt=0)
    clock_offset_s: float = 0.0
    # the trained weights go up no earlier than the last gradient's epoch + clock offset + this
    weights_slot_offset_s: float | None = Field(default=None, ge=0)


class Compression(Body):
    """How the smashed data (device -> server) and the gradients at the cut (server -> device)
    are encoded this run (toolkit.compression)."""

    smashed: str = Field(default="fp32", pattern=ENCODING_PATTERN)
    gradient: str = Field(default="fp32", pattern=ENCODING_PATTERN)


class Assign(Body):
    scheme: Literal["cpsl", "sl", "sfl", "fl"]
    model: Text
    model_fingerprint: Text
    input_shape: list[Annotated[int, Field(ge=1, le=1 << 16)]] = Field(min_length=1, max_length=8)
    num_classes: int = Field(ge=2, le=1 << 20)
    cut: int | None = Field(default=None, ge=1, le=100_000)  # None for FL: the whole model trains on the device
    cluster: int = Field(ge=0)
    cluster_devices: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(max_length=MAX_LIST)
    hyper: Hyperparameters
    grant: Grant = Grant()
    gradient_timeout_s: float = Field(gt=0, le=3600)
    data_seed: int = 0
    # batches this device has drawn in this run before this turn: the device's stream is put
    # there (toolkit.training.BatchStream.seek), so a resumed run or a restarted device trains
    # on the batches an uninterrupted run would have. None: carry on where the stream is.
    stream_position: int | None = Field(default=None, ge=0, le=MAX_STREAM_POSITION)
    # this hand-out of the turn (random per hand-out): the device names it in its SMASHED and
    # WEIGHTS_UP, so a turn the server starts again (a device of it restarted) takes no reply
    # to the hand-out before. None: a server that does not replay turns.
    turn: int | None = Field(default=None, ge=0, le=MAX_TURN_TOKEN)
    compression: Compression = Compression()


class WeightsDown(Body):
    """Tensors: the device-side state dict (the whole model for FL).

    ``uplink_epoch``: server-clock time the first iteration's upload slots count from."""

    uplink_epoch: float | None = Field(default=None, ge=0)


class Gradient(Body):
    """Tensors: ``grad``, the loss gradient with respect to this device's smashed data.

    ``uplink_epoch``: server-clock time the next iteration's upload slots count from."""

    uplink_epoch: float | None = Field(default=None, ge=0)
    encoding: str = Field(default="fp32", pattern=ENCODING_PATTERN)  # of ``grad`` (its pieces: toolkit.compression)


class Stop(Body):
    reason: Text = "training finished"


class Probe(Body):
    """Link measurement. Tensors: optional ``payload`` (uint8) to time the downlink; the
    device answers at once with a PROBE_ECHO carrying ``echo_bytes`` of payload back."""

    probe_id: int = Field(ge=0, lt=1 << 63)
    echo_bytes: int = Field(default=0, ge=0, le=MAX_PROBE_BYTES)


class ProbeEcho(Body):
    """The device's answer to a PROBE: when it had the whole probe (device clock);
    ``header.sent_at`` is when it sent this. Tensors: optional ``payload``."""

    probe_id: int = Field(ge=0, lt=1 << 63)
    received_at: float = Field(ge=0)


class Smashed(Body):
    """Tensors: ``smashed`` (cut activations of one mini-batch) and ``labels`` (int64).

    ``turn``: the ASSIGN's, echoed (None from agents that predate it). ``encoding``: of
    ``smashed``, as the ASSIGN's compression asked (its pieces: toolkit.compression)."""

    turn: int | None = Field(default=None, ge=0, le=MAX_TURN_TOKEN)
    encoding: str = Field(default="fp32", pattern=ENCODING_PATTERN)


class WeightsUp(Body):
    # the device's local samples: the averaging weight, which the server caps at the count it registered
    num_samples: int = Field(ge=0, le=MAX_SAMPLES)
    turn: int | None = Field(default=None, ge=0, le=MAX_TURN_TOKEN)  # the ASSIGN's, echoed


class IterationTiming(Body):
    iteration: int = Field(ge=0)
    forward_s: float = Field(ge=0)
    backward_s: float = Field(ge=0)
    upload_s: float = Field(ge=0)
    wait_gradient_s: float = Field(ge=0)
    up_bytes: int = Field(ge=0)
    down_bytes: int = Field(ge=0)
    # device wall clock (time.time()) when the smashed data started and finished its upload
    upload_start_at: float = Field(default=0.0, ge=0)
    upload_end_at: float = Field(default=0.0, ge=0)
    slot_wait_s: float = Field(default=0.0, ge=0)  # waited for the slot after the forward pass
    slot_late_s: float = Field(default=0.0, ge=0)  # ready after the slot had started
    gradient_transit_s: float | None = None  # gradient sent (server clock) to received, offset-corrected
    encode_s: float = Field(default=0.0, ge=0)  # the smashed data, after the forward pass (toolkit.compression)
    decode_s: float = Field(default=0.0, ge=0)  # the gradient, before the backward pass


class Timings(Body):
    iterations: list[IterationTiming] = Field(max_length=MAX_LIST)
    weights_down_bytes: int = Field(ge=0)
    weights_up_bytes: int = Field(ge=0)
    turn_s: float = Field(ge=0)
    weights_up_start_at: float = Field(default=0.0, ge=0)  # device wall clock; 0: not measured
    weights_up_end_at: float = Field(default=0.0, ge=0)


class Metrics(Body):
    values: dict[Annotated[str, Field(max_length=64)], float] = Field(max_length=64)


class Reject(Body):
    """A device refuses a command (an ASSIGN naming a model its owner did not configure, say)
    and says why; the server counts it and shows it. ``refused`` names the refused kind."""

    refused: Literal["ASSIGN", "WEIGHTS_DOWN", "GRADIENT", "PROBE", "STOP"]
    reason: Text


# split inference (toolkit.inference, edge_server.serve, firmware_agent.infer) ---------------------
WEIGHTS_PATTERN = r"^[0-9a-f]{16,64}$"  # toolkit.inference.heads.weights_digest
MAX_CUTS = 1024
MAX_BATCH_SIZES = 16


class TailLatency(Body):
    """The server's measured time for its part of the model after ``cut`` (0: the whole model),
    at each of ``batch_sizes``; the device interpolates for its own batch size."""

    cut: int = Field(ge=0, le=100_000)
    batch_sizes: list[Annotated[int, Field(ge=1, le=65536)]] = Field(min_length=1, max_length=MAX_BATCH_SIZES)
    seconds: list[Annotated[float, Field(ge=0, le=3600)]] = Field(min_length=1, max_length=MAX_BATCH_SIZES)

    @model_validator(mode="after")
    def _one_time_per_batch_size(self) -> TailLatency:
        if len(self.seconds) != len(self.batch_sizes) or len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError("one time per batch size, and each batch size once")
        return self


class ServiceStatus(Body):
    """Retained on the service's status topic: what the inference service runs, or that it is
    gone (its last will). ``weights``: digest of the trained weights; a device whose heads were
    exported from other weights does not use the service. ``cuts``: the cuts it serves (0: the
    raw input, the whole model on the server, only where its operator allows raw inputs)."""

    state: Literal["online", "offline"]
    model: Text = ""
    model_fingerprint: Text = ""
    weights: str = Field(default="", pattern=r"^([0-9a-f]{16,64})?$")
    num_layers: int = Field(default=0, ge=0, le=100_000)
    cuts: list[Annotated[int, Field(ge=0, le=100_000)]] = Field(default_factory=list, max_length=MAX_CUTS)
    tail: list[TailLatency] = Field(default_factory=list, max_length=MAX_CUTS)
    encodings: list[Annotated[str, Field(pattern=ENCODING_PATTERN)]] = Field(default_factory=list, max_length=16)
    max_batch: int = Field(default=1, ge=1, le=65536)


class Infer(Body):
    """Device -> service: classify a batch whose first ``cut`` layers ran on the device.
    Tensors: ``x``, the activations after layer ``cut`` (the raw inputs at cut 0), in
    ``encoding`` (toolkit.compression's pieces). ``request``: the device's id for the reply."""

    request: int = Field(ge=0, lt=1 << 63)
    cut: int = Field(ge=0, le=100_000)
    weights: str = Field(pattern=WEIGHTS_PATTERN)
    encoding: str = Field(default="fp32", pattern=ENCODING_PATTERN)


class Prediction(Body):
    """Service -> device: the answer to INFER ``request``. Tensors: ``logits`` float32
    [batch, classes], none when ``error`` says why the request was refused. ``server_s``:
    decoding and the server's layers; ``queued_s``: waiting behind other requests."""

    request: int = Field(ge=0, lt=1 << 63)
    server_s: float = Field(default=0.0, ge=0, le=3600)
    queued_s: float = Field(default=0.0, ge=0, le=3600)
    error: Text = ""


class Chunk(Body):
    transfer: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    index: int = Field(ge=0)
    count: int = Field(ge=2, le=1_000_000)
    total_bytes: int = Field(ge=1)


BODIES: dict[Kind, type[Body]] = {
    Kind.REGISTER: Register,
    Kind.HEARTBEAT: Heartbeat,
    Kind.OFFLINE: Offline,
    Kind.SERVER_STATUS: ServerStatus,
    Kind.SERVICE_STATUS: ServiceStatus,
    Kind.ASSIGN: Assign,
    Kind.WEIGHTS_DOWN: WeightsDown,
    Kind.GRADIENT: Gradient,
    Kind.STOP: Stop,
    Kind.PROBE: Probe,
    Kind.PREDICTION: Prediction,
    Kind.SMASHED: Smashed,
    Kind.WEIGHTS_UP: WeightsUp,
    Kind.TIMINGS: Timings,
    Kind.PROBE_ECHO: ProbeEcho,
    Kind.REJECT: Reject,
    Kind.INFER: Infer,
    Kind.METRICS: Metrics,
    Kind.CHUNK: Chunk,
}
