"""Which devices exist and which are online, from registrations, last wills and heartbeats."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from toolkit.protocol import Kind
from toolkit.protocol import messages as m
from toolkit.protocol.endpoint import Received

log = logging.getLogger("cpsl.server")


@dataclass
class DeviceRecord:
    id: str
    num_samples: int
    capabilities: m.Capabilities
    partition: str
    profile_json: bytes | None
    online: bool
    last_seen: float
    registered_seq: int = 0


class Registry:
    def __init__(self, heartbeat_timeout_s: float = 10.0) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.devices: dict[str, DeviceRecord] = {}

    def update(self, item: Received) -> bool:
        """Apply a REGISTER, OFFLINE or HEARTBEAT; returns False for any other kind."""
        message, device = item.message, item.message.header.device
        if message.kind is Kind.REGISTER:
            body: m.Register = message.body
            profile = message.tensors.get("profile")
            was = self.devices.get(device)
            self.devices[device] = DeviceRecord(
                id=device,
                num_samples=body.num_samples,
                capabilities=body.capabilities,
                partition=body.partition,
                profile_json=bytes(profile.numpy().tobytes()) if profile is not None else None,
                online=True,
                last_seen=time.monotonic(),
                registered_seq=message.header.seq,
            )
            if was is None or not was.online:
                log.info("device %s online (%d samples, partition %s)", device, body.num_samples, body.partition)
            return True
        if message.kind is Kind.OFFLINE:
            record = self.devices.get(device)
            # A will older than the latest registration belongs to a session the device has
            # already replaced (it crashed and came back): it must not mark the new one offline.
            if record is not None and record.online and message.header.seq >= record.registered_seq:
                record.online = False
                log.warning("device %s went offline: %s", device, message.body.reason)
            return True
        if message.kind is Kind.HEARTBEAT:
            record = self.devices.get(device)
            if record is not None:
                record.last_seen = time.monotonic()
            return True
        return False

    def is_online(self, device: str) -> bool:
        record = self.devices.get(device)
        return record is not None and record.online and time.monotonic() - record.last_seen <= self.heartbeat_timeout_s

    def online(self) -> list[DeviceRecord]:
        return sorted((r for r in self.devices.values() if self.is_online(r.id)), key=lambda r: r.id)
