"""What the devices' profiles tell the planner: the model's costs per cut (from a reference
profile, the first device's that fits the run's model, or the server's own), and each
device's compute speed relative to that reference. A profile that does not parse, or is
of another model, is logged and left out: the device is planned at the reference's speed
until its rounds measure its own.
"""

from __future__ import annotations

import logging

from edge_server.registry import MAX_PROFILE_BYTES, DeviceRecord
from toolkit.errors import ProfileError, UserError
from toolkit.planning.costs import ModelCosts, candidate_cuts, full_step, model_costs
from toolkit.profile_format import Profile, parse_profile
from toolkit.protocol.bounded_json import load_bounded_json

log = logging.getLogger("cpsl.server")


def profile_of(record: DeviceRecord, fingerprint: str) -> Profile | None:
    if record.profile_json is None:
        return None
    try:
        document = load_bounded_json(record.profile_json, max_bytes=MAX_PROFILE_BYTES, what=f"profile of {record.id}")
        profile = parse_profile(document, f"profile of {record.id}")
    except (ProfileError, ValueError) as exc:  # JsonLimitError is a ValueError
        log.warning("ignoring the profile %s registered with: %s", record.id, exc)
        return None
    if profile.model.fingerprint != fingerprint:
        log.warning(
            "profile of %s is of model %s (%s), not the run's (%s): ignored",
            record.id,
            profile.model.name,
            profile.model.fingerprint,
            fingerprint,
        )
        return None
    return profile


def reference_costs(
    devices: list[DeviceRecord],
    fingerprint: str,
    server_profile: Profile | None,
    server_profile_source: str,
    fixed_cut: int | None = None,
) -> ModelCosts:
    """The run's model costs per candidate cut (the pinned cut among them)."""
    profiles = [p for p in (profile_of(d, fingerprint) for d in devices) if p is not None]
    reference = profiles[0] if profiles else server_profile
    if reference is None:
        raise UserError(
            "cpsl --auto needs a profile of the run's model: start the agents with a profile "
            "(not --no-profile) or give the server --server-profile"
        )
    cuts = sorted({*candidate_cuts(reference), fixed_cut}) if fixed_cut is not None else None
    costs = model_costs(reference, server_profile, cuts)
    log.info(
        "auto: reference profile %s (%s); server profile: %s; candidate cuts %s",
        reference.device.id,
        reference.model.name,
        server_profile_source,
        ", ".join(f"{c.cut}:{c.name}" for c in costs.cuts),
    )
    return costs


def profile_speed(record: DeviceRecord, fingerprint: str, costs: ModelCosts, batch_size: int) -> float:
    """The device's speed relative to the reference, from its own profile (1 without one)."""
    profile = profile_of(record, fingerprint)
    if profile is None:
        return 1.0
    if profile.device.accelerator != record.capabilities.accelerator:
        log.warning(
            "auto: %s's profile was measured on %s but it trains on %s: its compute is mispredicted until "
            "its first rounds measure its speed (profile it where its agent trains: cpsl-profile --device)",
            record.id,
            profile.device.accelerator,
            record.capabilities.accelerator,
        )
    return costs.full_step(batch_size) / full_step(profile)(
        batch_size
    )  # the costs' whole-model step is the reference's
