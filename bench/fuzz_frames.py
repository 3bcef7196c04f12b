"""Fuzzing benchmark (issue #9): at least 10,000 mutated frames per message kind, with counts.

Each recorded frame of tests/frames (bench/record_frames.py) is mutated (bytes, lengths, header
JSON values, tensor tables, kinds, hostile floats; tests/fuzzing.py) and fed to the codec, to an
endpoint, and to the handlers of the side that receives that kind: the server's intake, checks,
training step and strategy, or the agent's handlers. Counted per kind: frames, frames the codec
still decodes, frames a handler accepted, rejected, uncaught exceptions, model parameters changed
by a rejected frame, and the process's memory (RSS) before and after.

    python bench/fuzz_frames.py [--per-kind 10000] [--seed 0] [--out bench/results/fuzz]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOWN_KINDS = ("ASSIGN", "WEIGHTS_DOWN", "GRADIENT", "STOP", "PROBE")
INFERENCE_KINDS = ("INFER", "PREDICTION", "SERVICE_STATUS")  # split inference: the service and a client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz")
    args = parser.parse_args()

    import logging

    import psutil

    from tests.fuzzing import (
        AgentHarness,
        InferenceHarness,
        ServerHarness,
        decode_only,
        endpoint_only,
        mutate,
        recorded_frames,
    )
    from toolkit.protocol import ProtocolError, decode
    from toolkit.protocol.endpoint import Endpoint

    logging.disable(logging.CRITICAL)  # 160,000 rejections would otherwise be 160,000 log lines
    rng = random.Random(args.seed)
    by_kind = defaultdict(list)
    for recorded in recorded_frames():
        if recorded.kind.name in DOWN_KINDS and "/dev0/" not in recorded.topic:
            continue  # the agent under test is dev0: frames for dev1 never reach it
        by_kind[recorded.kind].append(recorded)
    process = psutil.Process()
    server, agent = ServerHarness(), AgentHarness()
    inference = InferenceHarness(Path(tempfile.mkdtemp(prefix="cpsl-fuzz-")))
    endpoint = Endpoint("fuzz")
    rows = []
    started = time.monotonic()
    for kind, corpus in sorted(by_kind.items()):
        harness = agent if kind.name in DOWN_KINDS else inference if kind.name in INFERENCE_KINDS else server
        rss_before = process.memory_info().rss
        outcome_before = (harness.outcome.accepted, harness.outcome.rejected, len(harness.outcome.uncaught))
        changed_before = harness.outcome.changed_by_rejected
        codec_uncaught, endpoint_uncaught, decodable = [], [], 0
        kind_started = time.monotonic()
        for _ in range(args.per_kind):
            recorded = rng.choice(corpus)
            frame = mutate(recorded.frame, rng)
            problem = decode_only(frame)
            if problem:
                codec_uncaught.append(problem)
            try:
                decode(frame)
                decodable += 1
            except ProtocolError:
                pass
            problem = endpoint_only(recorded.topic, frame, endpoint)
            if problem:
                endpoint_uncaught.append(problem)
            harness.feed(recorded.topic, frame)
        accepted = harness.outcome.accepted - outcome_before[0]
        rejected = harness.outcome.rejected - outcome_before[1]
        uncaught = harness.outcome.uncaught[outcome_before[2] :]
        row = {
            "kind": kind.name,
            "frames": args.per_kind,
            "still_decodable": decodable,
            "handler": {id(agent): "agent", id(inference): "inference"}.get(id(harness), "server"),
            "accepted": accepted,
            "rejected": rejected,
            "uncaught_codec": len(codec_uncaught),
            "uncaught_endpoint": len(endpoint_uncaught),
            "uncaught_handler": len(uncaught),
            "examples": (codec_uncaught + endpoint_uncaught + uncaught)[:5],
            "params_changed_by_rejected": harness.outcome.changed_by_rejected - changed_before,
            "rss_before_mib": rss_before / 2**20,
            "rss_after_mib": process.memory_info().rss / 2**20,
            "seconds": time.monotonic() - kind_started,
        }
        rows.append(row)
        print(
            f"{kind.name:<14} {args.per_kind} frames: decodable {decodable:>5}, accepted {accepted:>5}, "
            f"rejected {rejected:>5}, uncaught {len(codec_uncaught) + len(endpoint_uncaught) + len(uncaught)}, "
            f"params changed by rejected {row['params_changed_by_rejected']}, "
            f"RSS {row['rss_before_mib']:.0f} -> {row['rss_after_mib']:.0f} MiB ({row['seconds']:.0f} s)",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": f"python bench/fuzz_frames.py --per-kind {args.per_kind} --seed {args.seed}",
        "seconds": time.monotonic() - started,
        "endpoint_rejections_by_reason": dict(endpoint.rejected.most_common()),
        "rows": rows,
    }
    (args.out / "fuzz.json").write_text(json.dumps(result, indent=1) + "\n")
    total = sum(r["uncaught_codec"] + r["uncaught_endpoint"] + r["uncaught_handler"] for r in rows)
    changed = sum(r["params_changed_by_rejected"] for r in rows)
    print(f"{sum(r['frames'] for r in rows)} frames, {total} uncaught, {changed} rejected frames changed parameters")
    print(f"wrote {args.out / 'fuzz.json'}")
    if total or changed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
