"""Intake: every message for the run is decoded, checked and counted here before training sees it.

The endpoint has already checked the frame itself (size, codec, kind allowed on its topic,
header device equal to the topic's, duplicates). Intake applies registry traffic, then
checks what only the server knows: the run id, that the sender is registered, the round,
and, for training payloads, the shapes, dtypes and ranges the cut implies. A failing
message is rejected with a reason counted by the endpoint, and never reaches a model.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from edge_server.registry import Registry, RegistryFullError
from toolkit import compression
from toolkit.compression import Encoding
from toolkit.protocol import Kind
from toolkit.protocol import messages as m
from toolkit.protocol.codec import ProtocolError
from toolkit.protocol.endpoint import Endpoint, Received

log = logging.getLogger("cpsl.server")
TIMING_ROUNDS = 16  # rounds of device timing reports kept


class Intake:
    def __init__(self, endpoint: Endpoint, registry: Registry, run_id: str) -> None:
        self.endpoint = endpoint
        self.registry = registry
        self.run_id = run_id
        self.round = 0  # TIMINGS are taken for the current round only: at most one per device and round
        self.timings: dict[tuple[int, str], m.Timings] = {}
        self.refusals: dict[str, str] = {}  # device -> the reason it gave (REJECT), shown in metrics
        # what devices refused, by the kind they refused: a device's answer, not a frame we dropped
        self.refused: Counter[str] = Counter()

    def start_round(self, round_: int) -> None:
        """Timings are taken for the current round only; the last ``TIMING_ROUNDS`` rounds'
        are kept (a run of any length keeps a bounded number of reports)."""
        self.round = round_
        self.timings = {key: t for key, t in self.timings.items() if key[0] > round_ - TIMING_ROUNDS}

    def poll(self, timeout_s: float) -> Received | None:
        """One message for the caller, after registry traffic and validation have been dealt with."""
        item = self.endpoint.receive(timeout_s)
        if item is None:
            return None
        try:
            if self.registry.update(item):
                return None
        except RegistryFullError as full:
            self.endpoint.reject(item.topic, str(full))
            return None
        message = item.message
        header = message.header
        if header.run != self.run_id:
            self.endpoint.reject(item.topic, f"wrong run id {header.run!r}")
            return None
        if header.device not in self.registry.devices:
            self.endpoint.reject(item.topic, f"unknown device {header.device!r}")
            return None
        self.registry.seen(header.device)
        if message.kind is Kind.TIMINGS:
            if header.round != self.round:
                self.endpoint.reject(item.topic, f"timings for round {header.round}, not the current one")
            else:
                self.timings[(header.round, header.device)] = message.body
            return None
        if message.kind is Kind.REJECT:
            body: m.Reject = message.body
            self.refusals[header.device] = f"{body.refused}: {m.printable(body.reason)}"
            self.refused[body.refused] += 1
            self.registry.refuse(header.device, m.printable(body.reason), body.refused)
            return None
        return item

    def timings_of(self, round_: int) -> dict[str, m.Timings]:
        return {device: t for (r, device), t in self.timings.items() if r == round_}


def decode_smashed(item: Received, expected: str) -> str | None:
    """Put the float32 ``smashed`` in place of its wire pieces (toolkit.compression), or say why not.

    The encoding must be the one this run asked for: a device that sends another is out of
    step with the run (or not ours), and what it sends would not be what the plan counted."""
    message = item.message
    encoding = message.body.encoding
    if encoding != expected:
        return f"smashed data encoded as {encoding}; this run asked for {expected}"
    tensors = message.tensors
    try:
        smashed = compression.decode("smashed", tensors, Encoding.parse(encoding), per="channel")
    except ProtocolError as exc:
        return f"smashed data: {exc}"
    rest = {k: v for k, v in tensors.items() if k != "smashed" and not k.startswith("smashed.")}
    message.tensors = {"smashed": smashed, **rest}
    return None


def check_smashed(
    item: Received, per_sample_shape: tuple[int, ...], batch_size: int, num_classes: int, cut: int
) -> str | None:
    """Why a SMASHED message cannot be trained on, or None when it can."""
    tensors = item.message.tensors
    smashed, labels = tensors.get("smashed"), tensors.get("labels")
    if smashed is None or labels is None or len(tensors) != 2:
        return "smashed data needs exactly the tensors smashed and labels"
    if smashed.dtype != torch.float32 or smashed.dim() == 0 or tuple(smashed.shape[1:]) != per_sample_shape:
        shape = tuple(smashed.shape)
        return f"smashed shape {shape} {smashed.dtype} does not fit cut {cut} (per sample {per_sample_shape})"
    if not 1 <= smashed.shape[0] <= batch_size:
        return f"batch of {smashed.shape[0]} is outside 1..{batch_size}"
    if labels.dtype != torch.int64 or tuple(labels.shape) != (smashed.shape[0],):
        return "labels must be int64, one per sample"
    if labels.numel() and not (int(labels.min()) >= 0 and int(labels.max()) < num_classes):
        return "labels out of range"
    return None


def check_weights(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> str | None:
    """Why uploaded weights do not fit the part of the model that was handed out, or None."""
    if tensors.keys() != reference.keys() or any(
        tensors[k].shape != reference[k].shape or tensors[k].dtype != reference[k].dtype for k in reference
    ):
        return "uploaded weights do not match the model"
    return None
