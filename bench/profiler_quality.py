"""Measurement quality of cpsl-profile, as issue #2 asks for it.

1. Additivity: at every cut, does the sum of the per-layer times (forward + backward)
   predict the device-side part timed as a whole? Target: within 15%.
2. Reproducibility: two separate runs of the profiler (separate processes, as a user
   would run them): are the medians within 10% of each other?
3. Speed: wall time of ``cpsl-profile`` on LeNet at one batch size. Target: under 60 s.

Each profile is made by the real CLI in its own process. Results go to
bench/results/profiler_quality.json and .png.

    python bench/profiler_quality.py [--models lenet5,vgg] [--batch-sizes 16,64] [--runs 2] [--speed-runs 3]
                                     [--threads T] [--tag -t1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolkit.profile_format import Profile, load_profile

RESULTS = Path(__file__).parent / "results"


def profile_once(model: str, batch_sizes: list[int], out: Path, threads: int | None) -> float:
    command = [sys.executable, "-m", "toolkit.cli.profile", "--model", model, "--out", str(out)]
    if threads:
        command += ["--threads", str(threads)]
    for batch_size in batch_sizes:
        command += ["--batch-size", str(batch_size)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def additivity(profile: Profile) -> list[dict]:
    rows = []
    for cut in profile.cuts:
        for batch in cut.batches:
            whole = batch.forward_s.median + batch.backward_s.median
            summed = batch.forward_layer_sum_s + batch.backward_layer_sum_s
            rows.append(
                {
                    "cut": cut.cut,
                    "after": cut.after,
                    "batch_size": batch.batch_size,
                    "whole_s": whole,
                    "layer_sum_s": summed,
                    "error": (summed - whole) / whole,
                }
            )
    return rows


def reproducibility(first: Profile, second: Profile) -> dict[str, list[float]]:
    """Relative differences of medians between two runs: cut steps, cut fwd+bwd, single layers."""
    diffs: dict[str, list[float]] = {"cut_step_s": [], "cut_fwd_bwd_s": [], "layer_fwd_bwd_s": []}

    def rel(a: float, b: float) -> float:
        return abs(a - b) / min(a, b)

    for cut_a, cut_b in zip(first.cuts, second.cuts, strict=True):
        for a, b in zip(cut_a.batches, cut_b.batches, strict=True):
            diffs["cut_step_s"].append(rel(a.step_s.median, b.step_s.median))
            diffs["cut_fwd_bwd_s"].append(
                rel(a.forward_s.median + a.backward_s.median, b.forward_s.median + b.backward_s.median)
            )
    for layer_a, layer_b in zip(first.layers, second.layers, strict=True):
        for a, b in zip(layer_a.batches, layer_b.batches, strict=True):
            diffs["layer_fwd_bwd_s"].append(
                rel(a.forward_s.median + a.backward_s.median, b.forward_s.median + b.backward_s.median)
            )
    return diffs


def summary(values: list[float]) -> dict[str, float]:
    absolute = [abs(v) for v in values]
    return {"median": statistics.median(absolute), "max": max(absolute), "n": len(absolute)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet5,vgg")
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--speed-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="passed to cpsl-profile (default: torch's)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": " ".join(sys.argv), "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models.split(","):
            profiles = []
            for run in range(args.runs):
                out = Path(scratch) / f"{model}-{run}.json"
                seconds = profile_once(model, batch_sizes, out, args.threads)
                profiles.append(load_profile(out))
                print(f"{model}: run {run + 1} took {seconds:.1f} s", flush=True)
            rows = [additivity(profile) for profile in profiles]
            entry = {
                "additivity_per_run": [summary([r["error"] for r in run_rows]) for run_rows in rows],
                "additivity_rows": rows,
                "within_15pct_per_run": [all(abs(r["error"]) <= 0.15 for r in run_rows) for run_rows in rows],
            }
            if len(profiles) >= 2:
                diffs = reproducibility(profiles[0], profiles[1])
                entry["reproducibility"] = {key: summary(values) for key, values in diffs.items()}
                entry["reproducibility_within_10pct"] = {
                    key: sum(v <= 0.10 for v in values) / len(values) for key, values in diffs.items()
                }
            report["models"][model] = entry
            print(json.dumps({k: v for k, v in entry.items() if k != "additivity_rows"}, indent=1), flush=True)
        speed_outs = [Path(scratch) / f"speed-{i}.json" for i in range(args.speed_runs)]
        speed = [profile_once("lenet5", [16], out, args.threads) for out in speed_outs]
    report["lenet_one_batch_wall_s"] = {"runs": speed, "median": statistics.median(speed)}
    print(f"LeNet, one batch size, wall time: median {statistics.median(speed):.1f} s over {speed}")
    (RESULTS / f"profiler_quality{args.tag}.json").write_text(json.dumps(report, indent=1))
    draw(report, RESULTS / f"profiler_quality{args.tag}.png")


def draw(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        for run, rows in enumerate(report["models"][model]["additivity_rows"]):
            for batch_size in sorted({r["batch_size"] for r in rows}):
                picked = [r for r in rows if r["batch_size"] == batch_size]
                axis.plot(
                    [r["cut"] for r in picked],
                    [100 * r["error"] for r in picked],
                    marker="o",
                    label=f"run {run + 1}, batch {batch_size}",
                )
        axis.axhspan(-15, 15, color="green", alpha=0.1, label="target ±15%")
        axis.set_title(f"{model}: per-layer sum vs whole device-side part")
        axis.set_xlabel("cut")
        axis.set_ylabel("(Σ layers - whole) / whole [%]")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
