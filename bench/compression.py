"""Benchmark (issue #14, item 3): encodings of what crosses the cut, side by side on the testbed.

The default emulated fleet (8 devices, 0.30/0.15/0.08 of a core, 16/6/2.5 Mbit/s uplinks on
a 20/40 Mbit/s shared medium) trains LeNet-5 on builtin:mnist5k with cpsl --auto at a cut
pinned where the data crossing it is large (pool1: 4,704 bytes per sample each way), once per
encoding, each run for the same number of rounds from the same seed:

- fp32 (no compression), fp16 both ways, int8 smashed data with fp16 gradients, the same
  packed by zstd (int8+zstd / fp16+zstd), and int8+zstd both ways.

Reported per encoding: bytes per round (up, down, and what crossed the cut alone), mean round
latency, time to the target accuracy (sum of round latencies until the first round at or
above it), and the final accuracy against fp32's. Goal (issue #14): int8 smashed data with
compressed gradients cuts bytes per round at least 3.5x, with final accuracy within 0.5
points of fp32, and cuts the time to 90%.

    sudo python bench/compression.py [--rounds 15] [--cut pool1] [--medium wired|wifi] [--out DIR]

Writes OUT/compression.json and compression.png. Needs root (the testbed).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time
from pathlib import Path

from toolkit.cli.testbed import default_spec
from toolkit.testbed.runner import RunSpec, profile_devices, run
from toolkit.testbed.topology import MEDIA, Testbed, require_root

ROOT = Path(__file__).resolve().parents[1]
ENCODINGS = {  # name -> (smashed data, gradients)
    "fp32": ("fp32", "fp32"),
    "fp16": ("fp16", "fp16"),
    "int8": ("int8", "fp16"),
    "int8+zstd": ("int8+zstd", "fp16+zstd"),
    "int8+zstd/int8": ("int8+zstd", "int8+zstd"),  # int8 gradients too
}


def summarize(records: list[dict], target: float) -> dict:
    latencies = [r["latency_s"] for r in records]
    reached = next((i for i, r in enumerate(records) if r["accuracy"] >= target), None)
    cut = [r["bytes"]["smashed"] + r["bytes"]["gradient"] for r in records if "bytes" in r]
    return {
        "rounds": len(records),
        "final_accuracy": records[-1]["accuracy"],
        "accuracy": [r["accuracy"] for r in records],
        "mean_round_latency_s": statistics.fmean(latencies),
        "time_to_target_s": None if reached is None else sum(latencies[: reached + 1]),
        "bytes_up_per_round": statistics.fmean(r["bytes_up"] for r in records),
        "bytes_down_per_round": statistics.fmean(r["bytes_down"] for r in records),
        "cut_bytes_per_round": statistics.fmean(cut) if cut else None,
        "fidelity_median": statistics.median(
            r["latency_s"] / r["predicted_latency_s"] for r in records[1:] if r.get("predicted_latency_s")
        ),
    }


def plot(results: dict, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (bytes_axis, time_axis, accuracy_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    total = [(results[n]["bytes_up_per_round"] + results[n]["bytes_down_per_round"]) / 1e6 for n in names]
    bytes_axis.bar(names, total, color="#60a5fa")
    bytes_axis.set_ylabel("MB per round (up + down)")
    bytes_axis.set_title("Bytes per round")
    reach = [results[n]["time_to_target_s"] or 0 for n in names]
    time_axis.bar(names, reach, color="#f59e0b")
    time_axis.set_ylabel(f"seconds to {target:.0%}")
    time_axis.set_title(f"Time to {target:.0%} test accuracy")
    for name in names:
        latencies = results[name]["accuracy"]
        accuracy_axis.plot(range(len(latencies)), [100 * a for a in latencies], label=name)
    accuracy_axis.set_xlabel("round")
    accuracy_axis.set_ylabel("test accuracy (%)")
    accuracy_axis.set_title("Accuracy by round")
    accuracy_axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--cut", default="pool1")
    parser.add_argument("--model", default="lenet5", help="lenet5, or vgg (the VGG-style model, built for 1x28x28)")
    parser.add_argument("--local-iterations", type=int, default=20)
    parser.add_argument("--medium", choices=MEDIA, default="wired")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compression")
    args = parser.parse_args()
    require_root()
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))  # clean up
    args.out.mkdir(parents=True, exist_ok=True)
    spec = default_spec(args.devices, medium=args.medium)
    model = args.model
    results: dict[str, dict] = {}
    started = time.time()
    testbed = Testbed(spec)
    try:
        testbed.create()
        profiles = profile_devices(testbed, args.out / "profiles", 32, model)
        for name in args.encodings.split(","):
            smashed, gradients = ENCODINGS[name]
            run_spec = RunSpec(
                scheme="cpsl",
                auto=True,
                cut=args.cut,
                rounds=args.rounds,
                target_accuracy=None,  # every encoding trains the same rounds
                model=model,
                local_iterations=args.local_iterations,
                compress=smashed,
                compress_gradients=gradients,
            )
            print(f"== {name}: smashed {smashed}, gradients {gradients}", flush=True)
            records = run(testbed, run_spec, args.out / name, profiles)
            results[name] = summarize(records, args.target)
            row = results[name]
            print(
                f"   {row['bytes_up_per_round'] / 1e6:.2f} MB up, {row['bytes_down_per_round'] / 1e6:.2f} MB down "
                f"per round; mean round {row['mean_round_latency_s']:.2f} s; to {args.target:.0%}: "
                f"{row['time_to_target_s']} s; final accuracy {row['final_accuracy']:.2%}",
                flush=True,
            )
            write_report(args, spec, started, results)
    finally:
        testbed.destroy()
    write_report(args, spec, started, results)
    plot(results, args.out / "compression.png", args.target)
    print(f"wrote {args.out / 'compression.json'} and compression.png")


def write_report(args, spec, started: float, results: dict) -> None:
    """compression.json, rewritten after every encoding: a run stopped midway keeps what it measured."""
    base = results.get("fp32")
    for row in results.values():
        if base is not None:
            total = row["bytes_up_per_round"] + row["bytes_down_per_round"]
            row["bytes_reduction_vs_fp32"] = (base["bytes_up_per_round"] + base["bytes_down_per_round"]) / total
            row["accuracy_gap_pp_vs_fp32"] = 100 * (row["final_accuracy"] - base["final_accuracy"])
    out = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    report = {
        "command": f"sudo python bench/compression.py --model {args.model} --encodings {args.encodings} "
        f"--rounds {args.rounds} --local-iterations {args.local_iterations} --devices {args.devices} "
        f"--cut {args.cut} --medium {args.medium} --out {out}",
        "spec": [vars(d) for d in spec.devices],
        "medium": args.medium,
        "wall_s": time.time() - started,
        "results": results,
    }
    (args.out / "compression.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
