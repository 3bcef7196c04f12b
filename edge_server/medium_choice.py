"""How the devices share the medium, per direction, as the planner takes it: pinned by
``--medium``, or decided from the probes (all devices at once against each alone,
toolkit.planning.medium), and decided again when the fleet grows past those it was
decided with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge_server.probe import TogetherMeasurement
from toolkit.planning.medium import MediumEvidence, decide_medium

log = logging.getLogger("cpsl.server")


@dataclass
class MediumChoice:
    setting: str = "auto"  # "auto" (from probes), "airtime" or "shared"
    uplink: MediumEvidence | None = None
    downlink: MediumEvidence | None = None
    fleet_size: int = 0  # devices probed together when it was last decided
    logged: bool = False  # the evidence went into a round's decision

    def needs_probe(self, known_devices: int) -> bool:
        """Probe together? Once two or more devices are known, and again when there are more."""
        return self.setting != "airtime" and known_devices >= 2 and known_devices > self.fleet_size

    def decide(self, together: TogetherMeasurement, solo_up: dict[str, float], solo_down: dict[str, float]) -> None:
        """Each direction's medium from a simultaneous probe beside each device's rate alone."""
        self.uplink, self.downlink = (
            decide_medium(self.setting, solo, *measured)
            for solo, measured in (
                (solo_up, (together.up_bps, together.up_bits, together.up_span_s)),
                (solo_down, (together.down_bps, together.down_bits, together.down_span_s)),
            )
        )
        self.fleet_size, self.logged = len(solo_up), False
        for direction, evidence in (("uplink", self.uplink), ("downlink", self.downlink)):
            log.warning("auto: %s medium %s: %s", direction, evidence.kind, evidence.reason)

    def current(self, up_bps: dict[str, float], down_bps: dict[str, float]) -> tuple[MediumEvidence, MediumEvidence]:
        """The media to plan on; before any simultaneous probe, what the setting and the rates alone say."""
        if self.uplink is None or self.downlink is None:
            self.uplink = decide_medium(self.setting, up_bps)
            self.downlink = decide_medium(self.setting, down_bps)
            self.logged = False
        return self.uplink, self.downlink

    def forget_one(self, remaining: int) -> None:
        """A device came back: the medium is probed again with it."""
        self.fleet_size = min(self.fleet_size, remaining)

    def unlogged_evidence(self) -> dict | None:
        """The evidence of the last decision, once: the round that was planned on it records it."""
        if self.logged or self.uplink is None or self.downlink is None:
            return None
        self.logged = True
        return {"uplink": self.uplink.to_dict(), "downlink": self.downlink.to_dict()}
