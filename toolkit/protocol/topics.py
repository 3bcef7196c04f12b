"""The MQTT topic tree. Every topic of the system is built and parsed here, nowhere else.

    cpsl/v1/server/status                           retained: the server's run, or offline (last will)
    cpsl/v1/devices/{device}/status                 retained: registration, or offline (last will)
    cpsl/v1/devices/{device}/heartbeat              liveness, QoS 0
    cpsl/v1/runs/{run}/devices/{device}/down        server -> device: assignment, weights, gradients, stop
    cpsl/v1/runs/{run}/devices/{device}/up          device -> server: smashed data, weights, timings
    cpsl/v1/runs/{run}/metrics                      retained: the latest round's evaluation
    cpsl/v1/infer/{service}/status                  retained: an inference service, or offline (last will)
    cpsl/v1/infer/{service}/devices/{device}/request    device -> service: activations at a cut
    cpsl/v1/infer/{service}/devices/{device}/reply      service -> device: predictions

Device ids, run ids and service ids are restricted to ``[A-Za-z0-9_.-]`` so they can never inject
topic levels or wildcards.
"""

from __future__ import annotations

import re

from toolkit.errors import UserError
from toolkit.protocol.messages import Kind

ROOT = "cpsl/v1"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise UserError(f"{what} {value!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
    return value


def server_status() -> str:
    return f"{ROOT}/server/status"


def device_status(device: str) -> str:
    return f"{ROOT}/devices/{device}/status"


def device_heartbeat(device: str) -> str:
    return f"{ROOT}/devices/{device}/heartbeat"


def down(run: str, device: str) -> str:
    return f"{ROOT}/runs/{run}/devices/{device}/down"


def up(run: str, device: str) -> str:
    return f"{ROOT}/runs/{run}/devices/{device}/up"


def run_metrics(run: str) -> str:
    return f"{ROOT}/runs/{run}/metrics"


def infer_status(service: str) -> str:
    return f"{ROOT}/infer/{service}/status"


def infer_request(service: str, device: str) -> str:
    return f"{ROOT}/infer/{service}/devices/{device}/request"


def infer_reply(service: str, device: str) -> str:
    return f"{ROOT}/infer/{service}/devices/{device}/reply"


def all_infer_requests(service: str) -> str:
    return f"{ROOT}/infer/{service}/devices/+/request"


ALL_DEVICE_STATUS = f"{ROOT}/devices/+/status"
ALL_DEVICE_HEARTBEATS = f"{ROOT}/devices/+/heartbeat"


def all_up(run: str) -> str:
    return f"{ROOT}/runs/{run}/devices/+/up"


def all_down_for(device: str) -> str:
    return f"{ROOT}/runs/+/devices/{device}/down"


def device_of(topic: str) -> str | None:
    """The device id in a device-scoped topic, or None if the topic is not one of ours."""
    parts = topic.split("/")
    if len(parts) >= 4 and "/".join(parts[:2]) == ROOT:
        if parts[2] == "devices" and _ID.match(parts[3]):
            return parts[3]
        if parts[2] in _SCOPES and len(parts) == 7 and parts[4] == "devices" and _ID.match(parts[5]):
            return parts[5]
    return None


_SCOPES = ("runs", "infer")  # a run's topics, an inference service's: the header's run names the scope


def run_of(topic: str) -> str | None:
    """The run (or inference service) a topic belongs to; frames on it must name it in their header."""
    parts = topic.split("/")
    if len(parts) >= 4 and "/".join(parts[:2]) == ROOT and parts[2] in _SCOPES and _ID.match(parts[3]):
        return parts[3]
    return None


# What may travel on each kind of topic. A frame of any other kind there is refused by the
# receiving endpoint: a device cannot, say, send an ASSIGN on its up topic to its peers.
KINDS_BY_ROLE: dict[str, frozenset[Kind]] = {
    "server_status": frozenset({Kind.SERVER_STATUS}),
    "device_status": frozenset({Kind.REGISTER, Kind.OFFLINE}),
    "heartbeat": frozenset({Kind.HEARTBEAT}),
    "down": frozenset({Kind.ASSIGN, Kind.WEIGHTS_DOWN, Kind.GRADIENT, Kind.STOP, Kind.PROBE}),
    "up": frozenset({Kind.SMASHED, Kind.WEIGHTS_UP, Kind.TIMINGS, Kind.PROBE_ECHO, Kind.REJECT}),
    "metrics": frozenset({Kind.METRICS}),
    "service_status": frozenset({Kind.SERVICE_STATUS}),
    "request": frozenset({Kind.INFER}),
    "reply": frozenset({Kind.PREDICTION}),
}
CHUNKED_ROLES = frozenset({"down", "up", "request", "reply"})  # large frames travel as CHUNKs on these


def role_of(topic: str) -> str | None:
    """Which kind of topic of the tree above ``topic`` is, or None if it is not one of ours."""
    parts = topic.split("/")
    if "/".join(parts[:2]) != ROOT:
        return None
    rest = parts[2:]
    if rest == ["server", "status"]:
        return "server_status"
    if len(rest) == 3 and rest[0] == "devices" and _ID.match(rest[1]) and rest[2] in ("status", "heartbeat"):
        return "device_status" if rest[2] == "status" else "heartbeat"
    if len(rest) == 3 and rest[0] == "runs" and _ID.match(rest[1]) and rest[2] == "metrics":
        return "metrics"
    if len(rest) == 5 and rest[0] == "runs" and _ID.match(rest[1]) and rest[2] == "devices" and _ID.match(rest[3]):
        return rest[4] if rest[4] in ("up", "down") else None
    if len(rest) == 3 and rest[0] == "infer" and _ID.match(rest[1]) and rest[2] == "status":
        return "service_status"
    if len(rest) == 5 and rest[0] == "infer" and _ID.match(rest[1]) and rest[2] == "devices" and _ID.match(rest[3]):
        return rest[4] if rest[4] in ("request", "reply") else None
    return None
