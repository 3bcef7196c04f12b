"""What the dashboard and the report draw, as JSON: pure functions of round records and the fleet.

The live page and the static report run the same script on the same view, so a finished
run looks the same in both. The view keeps only what is drawn: a round row is a few
hundred bytes (the full record, with grants and estimates, stays in metrics.jsonl), and
only the last round's timeline travels.

    view = {
        "run": {"id", "scheme", "model", "rounds_planned", "state"},   # state: waiting|training|finished|report
        "rounds": [round_row(record), ...],
        "timeline": {"round", "rows", "transfers", "turns"} | None,    # the last round that has one
        "fleet": [fleet row, ...],
    }
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping

BREAKDOWN_PARTS = (
    "device_compute_s",
    "uplink_s",
    "server_compute_s",
    "downlink_s",
    "model_transfer_s",
    "waiting_s",
)


def _number(value: object) -> float | None:
    """A finite number or None: JSON has no NaN, and the page draws a gap for None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def round_row(record: Mapping) -> dict:
    """One round as the page draws it: curves, breakdown, the decision in a few words."""
    breakdown = record.get("breakdown") if isinstance(record.get("breakdown"), Mapping) else {}
    decision = record.get("decision") if isinstance(record.get("decision"), Mapping) else {}
    selection = decision.get("cut_selection") if isinstance(decision.get("cut_selection"), Mapping) else None
    medium = decision.get("medium") if isinstance(decision.get("medium"), Mapping) else None
    restarted = record.get("restarted_turns") if isinstance(record.get("restarted_turns"), list) else []
    return {
        "round": record.get("round"),
        "accuracy": _number(record.get("accuracy")),
        "loss": _number(record.get("loss")),
        "train_loss": _number(record.get("train_loss")),
        "latency_s": _number(record.get("latency_s")),
        "predicted_latency_s": _number(record.get("predicted_latency_s")),
        "bound_s": _number(record.get("bound_s")),
        "efficiency": _number(record.get("efficiency")),
        "breakdown": {part: _number(breakdown.get(part)) or 0.0 for part in BREAKDOWN_PARTS},
        "cut": record.get("cut"),
        "cut_name": record.get("cut_name"),
        "clusters": record.get("clusters") or [],
        "dropped": record.get("dropped") or [],
        "restarted": [str(r.get("device")) for r in restarted if isinstance(r, Mapping)],
        "medium": f"{medium.get('uplink')} up, {medium.get('downlink')} down" if medium else None,
        "encodings": _encodings(decision),
        "bytes_up": _number(record.get("bytes_up")),
        "bytes_down": _number(record.get("bytes_down")),
        "reselection": str(selection.get("reason")) if selection and selection.get("reason") else None,
        "time": _number(record.get("time")),
    }


def _encodings(decision: Mapping) -> str | None:
    """What crossed the cut, in words: "int8+zstd up, fp16 down"; None when nothing was compressed."""
    compression = decision.get("compression") if isinstance(decision.get("compression"), Mapping) else None
    names = compression.get("encodings") if compression else None
    if not isinstance(names, list) or len(names) != 2:
        return None
    return f"{names[0]} up, {names[1]} down"


def timeline_of(record: Mapping) -> dict | None:
    """The round's Gantt data, if the round was a split one that stamped it."""
    rows = record.get("timeline")
    if not isinstance(rows, list) or not rows:
        return None
    return {
        "round": record.get("round"),
        "rows": rows,
        "transfers": record.get("transfers") or [],
        "turns": [
            {"cluster": t.get("cluster"), "measured_s": t.get("measured_s"), "predicted_s": t.get("predicted_turn_s")}
            for t in record.get("turns") or []
            if isinstance(t, Mapping)
        ],
    }


def last_timeline(records: list[Mapping]) -> dict | None:
    for record in reversed(records):
        timeline = timeline_of(record)
        if timeline is not None:
            return timeline
    return None


def profile_summary(profile_json: bytes | None) -> dict:
    """The few profile facts a person reads in a fleet table; {} for none or one that does not parse
    (the server validated it at registration; this only reads)."""
    if not profile_json:
        return {}
    try:
        profile = json.loads(profile_json)
        device, full = profile["device"], profile["full_model"]["batches"][0]
        step_s = sum(float(full[key]["median"]) for key in ("forward_s", "backward_s", "step_s"))
        return {
            "cpu": str(device.get("cpu_model", ""))[:80],
            "cores": device.get("cores_logical"),
            "ram_gb": round(float(device.get("ram_bytes", 0)) / 2**30, 1),
            "train_step_ms": round(step_s * 1e3, 2),
            "batch": full.get("batch_size"),
        }
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}


def device_info(record) -> dict:
    """What does not change while a device stays registered (a DeviceRecord of edge_server.registry):
    written to the run directory (fleet.json) so the report can show it after the run."""
    capabilities = record.capabilities
    return {
        "id": record.id,
        "board": capabilities.board or "",
        "threads": capabilities.threads,
        "accelerator": capabilities.accelerator_name or capabilities.accelerator,
        "samples": record.num_samples,
        "partition": record.partition,
        "profile": profile_summary(record.profile_json),
    }


def fleet_rows(
    infos: Mapping[str, Mapping],
    records: list[Mapping],
    online: Mapping[str, bool] | None = None,
    rejected: Mapping[str, int] | None = None,
) -> list[dict]:
    """One row per device the run has seen: its facts, its last cluster, the links the scheduler
    estimates, how often it was dropped. ``online`` is None for a finished run (the report)."""
    seen: dict[str, None] = dict.fromkeys(infos)
    cluster_of: dict[str, int] = {}
    drops: Counter[str] = Counter()
    estimates: dict[str, Mapping] = {}
    for record in records:
        for index, members in enumerate(record.get("clusters") or []):
            for device in members:
                seen.setdefault(device, None)
                cluster_of[device] = index
        drops.update(record.get("dropped") or [])
        decision = record.get("decision")
        if isinstance(decision, Mapping) and isinstance(decision.get("estimates"), Mapping):
            estimates.update(decision["estimates"])
    last_clusters = records[-1].get("clusters") or [] if records else []
    in_last = {device for members in last_clusters for device in members}
    rows = []
    for device in sorted(seen):
        info = dict(infos.get(device) or {"id": device})
        estimate = estimates.get(device) if isinstance(estimates.get(device), Mapping) else {}
        up, down, rtt = (_number(estimate.get(k)) for k in ("up_bps", "down_bps", "rtt_s"))
        info.update(
            {
                "online": None if online is None else bool(online.get(device, False)),
                "cluster": cluster_of.get(device) if device in in_last else None,
                "speed": _number(estimate.get("speed")),
                "up_mbit": None if up is None else round(up / 1e6, 2),
                "down_mbit": None if down is None else round(down / 1e6, 2),
                "rtt_ms": None if rtt is None else round(rtt * 1e3, 1),
                "drops": drops.get(device, 0),
                "rejected": int((rejected or {}).get(device, 0)),
            }
        )
        rows.append(info)
    return rows


def run_view(
    run: Mapping,
    records: list[Mapping],
    infos: Mapping[str, Mapping],
    online: Mapping[str, bool] | None = None,
    rejected: Mapping[str, int] | None = None,
) -> dict:
    return {
        "run": dict(run),
        "rounds": [round_row(record) for record in records],
        "timeline": last_timeline(records),
        "fleet": fleet_rows(infos, records, online, rejected),
    }


def to_json(view: object) -> str:
    """Compact JSON; a NaN or infinity anywhere becomes null (the browser's JSON.parse refuses them)."""
    return json.dumps(_finite(view), separators=(",", ":"), allow_nan=False)


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)
