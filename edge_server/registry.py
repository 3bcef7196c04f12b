"""Which devices exist and which are online, from registrations, last wills and heartbeats.

A registration belongs to one agent session (a random id the agent draws at start and
repeats in every OFFLINE, its last will included). An OFFLINE ends the registration of its
own session only: a will from an earlier life of the device, delivered late, cannot
unregister the device that came back, and it needs no sequence-number arithmetic.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

from toolkit.protocol import Kind
from toolkit.protocol import messages as m
from toolkit.protocol.endpoint import Received

log = logging.getLogger("cpsl.server")

MAX_PROFILE_BYTES = 4 << 20  # a LeNet profile is 60 KB, a MobileNetV2 one about 400 KB
MAX_DEVICES = 1024  # records kept: far more than one access point serves
MAX_PROFILES_BYTES = 256 << 20  # every record's profile together


class RegistryFullError(Exception):
    """A new device's registration would pass the registry's bounds (no offline record to replace)."""


@dataclass
class DeviceRecord:
    id: str
    num_samples: int
    capabilities: m.Capabilities
    partition: str
    profile_json: bytes | None
    online: bool
    last_seen: float
    session: str = ""
    models: tuple[str, ...] = ()
    refused: str = ""  # why the device refused this run's assignment; it is not planned again until it re-registers
    left_at: float | None = None  # monotonic time of its OFFLINE
    said_goodbye: bool = False  # the OFFLINE was the agent's own, not its last will


class Registry:
    def __init__(
        self,
        heartbeat_timeout_s: float = 10.0,
        max_devices: int = MAX_DEVICES,
        max_profiles_bytes: int = MAX_PROFILES_BYTES,
    ) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_devices, self.max_profiles_bytes = max_devices, max_profiles_bytes
        self.devices: dict[str, DeviceRecord] = {}
        # devices that registered again after going offline, or as a new life (new session):
        # their link, clock offset and speed may have changed, so they are measured again
        self.returned: set[str] = set()
        self.announced: set[str] = set()  # registered (again) since the server last looked

    def update(self, item: Received) -> bool:
        """Apply a REGISTER, OFFLINE or HEARTBEAT; returns False for any other kind."""
        message, device = item.message, item.message.header.device
        if message.kind is Kind.REGISTER:
            self._register(device, message.body, message.tensors.get("profile"))
            return True
        if message.kind is Kind.OFFLINE:
            record = self.devices.get(device)
            if record is not None and record.online and message.body.session == record.session:
                record.online = False
                record.left_at = time.monotonic()
                record.said_goodbye = message.body.reason != m.CONNECTION_LOST
                log.warning("device %s went offline: %s", device, m.printable(message.body.reason))
            return True
        if message.kind is Kind.HEARTBEAT:
            record = self.devices.get(device)
            if record is not None:
                record.last_seen = time.monotonic()
            return True
        return False

    def _register(self, device: str, body: m.Register, profile) -> None:
        profile_json = None
        if profile is not None:
            if profile.dtype.is_floating_point or profile.dim() != 1 or profile.numel() > MAX_PROFILE_BYTES:
                log.warning("device %s registered with an unusable profile tensor: ignored", device)
            else:
                profile_json = bytes(profile.numpy().tobytes())
        was = self.devices.get(device)
        self._make_room(device, len(profile_json or b""))
        if was is not None and (not was.online or was.session != body.session):
            self.returned.add(device)
        self.announced.add(device)
        self.devices[device] = DeviceRecord(
            id=device,
            num_samples=body.num_samples,
            capabilities=body.capabilities,
            partition=body.partition,
            profile_json=profile_json,
            online=True,
            last_seen=time.monotonic(),
            session=body.session,
            models=tuple(body.models),
        )
        if was is None or not was.online:
            log.info(
                "device %s online (%d samples, partition %s, trains on %s)",
                device,
                body.num_samples,
                m.printable(body.partition),
                m.printable(body.capabilities.accelerator_name or body.capabilities.accelerator),
            )

    def _make_room(self, device: str, profile_bytes: int) -> None:
        """Keep the registry within its bounds: the records of devices gone longest (left, or
        silent past the heartbeat timeout) make way for a new one; with none gone, the
        registration is refused (the intake counts it) and every device known keeps its place."""

        def over() -> bool:
            others = [r for d, r in self.devices.items() if d != device]
            profiles = sum(len(r.profile_json or b"") for r in others)
            return len(others) >= self.max_devices or profiles + profile_bytes > self.max_profiles_bytes

        while over():
            gone = [r for d, r in self.devices.items() if d != device and not self.is_online(d)]
            if not gone:
                raise RegistryFullError(
                    f"registry full: {device} refused, the registry holds {len(self.devices)} devices "
                    f"(at most {self.max_devices}, {self.max_profiles_bytes >> 20} MB of profiles), all online"
                )
            oldest = min(gone, key=lambda r: r.left_at if r.left_at is not None else r.last_seen)
            del self.devices[oldest.id]
            self.returned.discard(oldest.id)
            self.announced.discard(oldest.id)

    def take_announced(self) -> set[str]:
        """The devices that registered since the last call: after a reconnect, a device missed
        what was sent to it while it was away (and forget them)."""
        announced, self.announced = self.announced, set()
        return announced

    def take_returned(self) -> set[str]:
        """The devices that came back since the last call (and forget them)."""
        returned, self.returned = self.returned, set()
        return returned

    def refuse(self, device: str, reason: str, refused: str = "ASSIGN") -> None:
        """The device refused the run's assignment, or could not carry out a turn (``refused``:
        WEIGHTS_DOWN, e.g. out of GPU memory): leave it out of plans until it registers anew."""
        record = self.devices.get(device)
        if record is not None and not record.refused:
            record.refused = reason
            what = "refused the assignment" if refused == "ASSIGN" else f"could not carry out {refused}"
            log.warning("device %s %s: %s", device, what, reason)

    def seen(self, device: str) -> None:
        """Any accepted message from the device is a sign of life, not only heartbeats: a heartbeat
        queues behind the device's own large uploads on its one connection."""
        record = self.devices.get(device)
        if record is not None:
            record.last_seen = time.monotonic()

    def has_left(self, device: str, grace_s: float = 0.0) -> bool:
        """The device said goodbye, or the broker delivered its last will more than ``grace_s``
        ago and it has not registered again since, or it refused the run.

        This, not a stale heartbeat, is what drops a device the server is waiting on: while the
        device sends a model that takes longer than the heartbeat window to cross a slow link,
        its heartbeats wait behind it; the phase's deadline bounds the wait instead. The grace
        is for a lost connection that comes back: a broker restart delivers every device's
        will, and they all reconnect and register again within seconds.
        """
        record = self.devices.get(device)
        if record is None or record.refused:
            return True
        if record.online:
            return False
        return record.said_goodbye or record.left_at is None or time.monotonic() - record.left_at >= grace_s

    def is_online(self, device: str) -> bool:
        record = self.devices.get(device)
        return (
            record is not None
            and record.online
            and not record.refused
            and time.monotonic() - record.last_seen <= self.heartbeat_timeout_s
        )

    def online(self) -> list[DeviceRecord]:
        return sorted((r for r in self.devices.values() if self.is_online(r.id)), key=lambda r: r.id)

    def median_samples(self) -> float | None:
        """The median registered sample count of the devices known (the weight cap's yardstick)."""
        counts = [record.num_samples for record in self.devices.values()]
        return statistics.median(counts) if counts else None

    def registered_samples(self, device: str) -> int:
        record = self.devices.get(device)
        return record.num_samples if record is not None else 0
