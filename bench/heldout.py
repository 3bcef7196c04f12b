"""Benchmark (issue #24, item 5): the advisor on a fleet and a model nothing was fitted on.

The planning code's constants were fitted or checked on LeNet-5, VGG and WideNet and on
the testbed's default, heavy and wide fleets. The held-out check uses neither: the FedAvg
paper's MNIST CNN (toolkit/models/fedavg_cnn.py) on six devices of its own
(bench/heldout/fleet.json), on the Wi-Fi medium with DCF contention. It runs in two steps,
and the first step's output is committed before the second starts:

1. ``predict``: profiles the model at each of the fleet's CPU shares inside the testbed's
   CPU groups (what ``cpsl-profile`` on each device would measure), and on this host for
   the reference; writes the fleet file ``edge_server advise`` reads (each device's
   profile, its PHY rates less 802.11's per-frame overhead, the air-time medium); runs the
   advisor with the testbed's data and training settings; writes ``prediction.json``
   (the advice, the command, the fleet file's and spec's digests). It refuses to
   overwrite a prediction.
2. ``check``: runs every scheme the advisor planned on the testbed (``bench/ablation.py``:
   three seeds each -- one for a scheme over 3x slower than cpsl-auto, item 4's rule --
   cpsl without resource management as ``cpsl-none``, SL and SFL at the advisor's
   baseline cut), then ``report``.
3. ``report``: the advisor's call against the fastest measured scheme, and per scheme its
   predicted time to the target against the measured one (the rounds' latencies summed,
   which is what the advisor models, and wall clock from the server's start, which adds
   the server's profiling, probes and planning that the advisor does not model).

    sudo python bench/heldout.py predict [--out bench/results/heldout]
    sudo python bench/heldout.py check [--seeds 0,1,2]
    python bench/heldout.py report

Writes OUT/prediction.json, OUT/fleet-advise.json, OUT/runs/ (the ablation's folder) and
OUT/check.json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

from toolkit.cli.testbed import load_spec
from toolkit.files import write_atomically
from toolkit.planning.contention import DEFAULT_FRAME_BYTES
from toolkit.testbed.airtime import frame_airtime

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "bench" / "heldout" / "fleet.json"
MODEL = "fedavgcnn"
BASELINE_CUT = "pool2"  # SL's, SFL's and cpsl-fixed's cut, named before any run
REFERENCE = ROOT / "profiles" / "epyc-vm-2vcpu" / "fedavgcnn.json"
DATA, NON_IID, TARGET = "builtin:mnist5k", "dirichlet:0.5", 0.9
# the testbed's training settings (toolkit.testbed.runner.RunSpec), which the advisor rehearses
BATCH, LOCAL_ITERATIONS, LR, CLUSTERS, MAX_ROUNDS = 32, 20, 0.05, 2, 25
VARIANT_OF = {"sl": f"sl@{BASELINE_CUT}", "sfl": f"sfl@{BASELINE_CUT}", "fl": "fl"}
VARIANT_OF |= {"cpsl-fixed": "cpsl-none", "cpsl-auto": "cpsl-auto"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wifi_goodput_mbit(phy_mbit: float) -> float:
    """What one station alone moves at a PHY rate: full frames, each with 802.11's fixed
    per-frame air time (preamble, DIFS, SIFS, ACK, the first backoff) on top."""
    return 8 * DEFAULT_FRAME_BYTES / frame_airtime(DEFAULT_FRAME_BYTES, phy_mbit * 1e6) / 1e6


def profile_reference() -> None:
    """The model on this host, one thread: the settings of the other reference profiles."""
    command = [sys.executable, "-m", "toolkit.cli.profile", "--model", MODEL, "--input-shape", "1,28,28"]
    command += ["--batch-size", "16", "--batch-size", "64", "--repeats", "30", "--warmup", "5", "--threads", "1"]
    command += ["--no-onnx", "--device-id", "epyc-vm-2vcpu", "--out", str(REFERENCE)]
    subprocess.run(command, cwd=ROOT, check=True)


def predict(out: Path, force: bool) -> None:
    from toolkit.testbed.runner import profile_devices
    from toolkit.testbed.topology import Testbed, require_root

    prediction = out / "prediction.json"
    if prediction.exists() and not force:
        raise SystemExit(f"{prediction} exists: a prediction is made once, before the first run (--force to redo)")
    require_root()
    spec = load_spec(SPEC, "wifi", "dcf")
    if not REFERENCE.exists():
        profile_reference()
    testbed = Testbed(spec)
    try:
        testbed.create()
        profiles = profile_devices(testbed, out / "runs" / "profiles", BATCH, MODEL)
    finally:
        testbed.destroy()
    fleet = {
        "medium": "airtime",
        "devices": [
            {
                "name": device.name,
                "uplink_mbit": round(wifi_goodput_mbit(device.uplink_mbit), 3),
                "downlink_mbit": round(wifi_goodput_mbit(device.downlink_mbit), 3),
                "profile": str(profiles[i].relative_to(out)),
            }
            for i, device in enumerate(spec.devices)
        ],
    }
    fleet_file = out / "fleet-advise.json"
    write_atomically(fleet_file, json.dumps(fleet, indent=1))
    advice_file = out / "advice.json"

    def shown(path: Path) -> str:  # the record names paths in the checkout, not on this machine
        path = path.resolve()
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    command = ["edge_server", "advise", "--profile", shown(REFERENCE), "--fleet", shown(fleet_file)]
    command += ["--data", DATA, "--non-iid", NON_IID, "--target", str(TARGET), "--max-rounds", str(MAX_ROUNDS)]
    command += ["--cut", BASELINE_CUT, "--clusters", str(CLUSTERS), "--batch-size", str(BATCH)]
    command += ["--local-iterations", str(LOCAL_ITERATIONS), "--lr", str(LR), "--json", shown(advice_file)]
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=True)
    print(done.stdout, flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record = {
        "made_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join(command),
        "spec": str(SPEC.relative_to(ROOT)),
        "spec_sha256": digest(SPEC),
        "fleet_sha256": digest(fleet_file),
        "baseline_cut": BASELINE_CUT,
        "advice": json.loads(advice_file.read_text()),
    }
    write_atomically(prediction, json.dumps(record, indent=1))
    print(f"wrote {prediction}: commit it before `check`")


def check(out: Path, seeds: str) -> None:
    record = json.loads((out / "prediction.json").read_text())
    if record["spec_sha256"] != digest(SPEC):
        raise SystemExit(f"{SPEC} changed since the prediction: the check would test another fleet")
    # cpsl-auto first: the rule that lets a scheme 3x slower run one seed measures against it
    variants = sorted(
        (VARIANT_OF[row["scheme"]] for row in record["advice"]["schemes"]), key=lambda v: v != "cpsl-auto"
    )
    command = [sys.executable, str(ROOT / "bench" / "ablation.py"), "--spec", str(SPEC), "--model", MODEL]
    command += ["--medium", "wifi", "--contention", "dcf", "--cut", BASELINE_CUT, "--rounds", str(MAX_ROUNDS)]
    command += ["--target", str(TARGET), "--local-iterations", str(LOCAL_ITERATIONS)]
    command += ["--variants", ",".join(variants), "--seeds", seeds, "--out", str(out / "runs")]
    subprocess.run(command, cwd=ROOT, check=True)
    report(out)


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return predicted / measured - 1


def report(out: Path) -> dict:
    record = json.loads((out / "prediction.json").read_text())
    advice = record["advice"]
    measured = json.loads((out / "runs" / "ablation.json").read_text())["runs"]
    rows = {}
    for row in advice["schemes"]:
        scheme = row["scheme"]
        runs = measured.get(VARIANT_OF[scheme], {})

        def median(key: str, runs: dict = runs) -> float | None:
            values = [r.get(key) for r in runs.values() if r.get(key) is not None]
            return statistics.median(values) if values else None

        rounds = median("round_to_target")
        summed, wall = median("latency_sum_to_target_s"), median("wall_to_target_s")
        rows[scheme] = {
            "variant": VARIANT_OF[scheme],
            "seeds": sorted(runs),
            "reached": [r.get("round_to_target") is not None for r in runs.values()],
            "predicted": {k: row.get(k) for k in ("cut", "round_latency_s", "rounds", "time_to_target_s")},
            "measured": {
                "rounds": rounds + 1 if rounds is not None else None,
                "mean_round_s": median("mean_round_s"),
                "latency_sum_to_target_s": summed,
                "wall_to_target_s": wall,
                "cut": next((r.get("cut") for r in runs.values()), None),
            },
            "error_vs_rounds_sum": relative_error(row.get("time_to_target_s"), summed),
            "error_vs_wall": relative_error(row.get("time_to_target_s"), wall),
        }
    reached = {s: r["measured"]["wall_to_target_s"] for s, r in rows.items() if r["measured"]["wall_to_target_s"]}
    fastest = min(reached, key=reached.get) if reached else None
    result = {
        "prediction_made_utc": record["made_utc"],
        "prediction_commit": record["commit"],
        "recommended": advice["recommended"],
        "close": advice.get("close", []),
        "fastest_measured": fastest,
        "names_the_fastest": advice["recommended"] == fastest,
        "fastest_named_or_close": fastest in [advice["recommended"], *advice.get("close", [])],
        "schemes": rows,
    }
    write_atomically(out / "check.json", json.dumps(result, indent=1))
    print(f"advised {advice['recommended']} (too close to call: {advice.get('close') or 'none'}); fastest {fastest}")
    print("| scheme | predicted: cut, round, rounds, time | measured: cut, round, rounds, rounds' sum, wall | error |")
    print("|---|---|---|---|")
    for scheme, row in rows.items():
        p, m = row["predicted"], row["measured"]
        error = row["error_vs_rounds_sum"]
        print(
            f"| {scheme} | {p['cut'] or '-'}, {fmt(p['round_latency_s'])} s, {fmt(p['rounds'])}, "
            f"{fmt(p['time_to_target_s'])} s | {m['cut'] or '-'}, {fmt(m['mean_round_s'])} s, {fmt(m['rounds'])}, "
            f"{fmt(m['latency_sum_to_target_s'])} s, {fmt(m['wall_to_target_s'])} s | "
            f"{'-' if error is None else f'{error:+.0%}'} |"
        )
    return result


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("predict", "check", "report"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heldout")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--force", action="store_true", help="predict again over an existing prediction")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "predict":
        predict(args.out, args.force)
    elif args.command == "check":
        check(args.out, args.seeds)
    else:
        report(args.out)


if __name__ == "__main__":
    main()
