"""Benchmark (issue #10, item 3): every fixed cut's time to the target accuracy, in hindsight.

For each model and data skew, every candidate cut is trained for real (in one process,
:mod:`edge_server.rehearsal`, which computes what the live system computes) until the target
accuracy or the round limit; its round latency is what the planner predicts for the
testbed's 8-device fleet on the Wi-Fi medium (the measured CPU-class profiles of
``bench/results/testbed_wifi/profiles``, each device's PHY rate less 802.11's per-frame
overhead, clusters and slots as cpsl --auto plans them). Time to the target of a cut =
its rounds to the target x its round latency.

Then each cut-selection rule picks a cut from what it would know before training, and is
scored against the best cut in hindsight:

- ``latency``: the lowest round latency (what SAA chose before time to accuracy);
- ``time-to-accuracy``: round latency x the estimated rounds
  (:mod:`toolkit.planning.rounds`), from the fleet's label histograms and the model.

    python bench/cut_hindsight.py [--models lenet5,vgg] [--skews iid,dirichlet:0.5] [--rounds 30] [--out DIR]

Writes DIR/hindsight.json (every cut's accuracy curve, rounds and time to the target, and
each rule's pick and its ratio to the best) and DIR/hindsight.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edge_server.rehearsal import RehearsalConfig, rehearse
from toolkit.cli.testbed import default_spec
from toolkit.data import load_dataset, partition_indices
from toolkit.models import load_model
from toolkit.planning.clustering import ClusterBounds, cluster_devices, round_latency
from toolkit.planning.costs import model_costs, relative_speed
from toolkit.planning.latency import FleetState, SplitProblem, TrainingSettings
from toolkit.planning.rates import LinearRates
from toolkit.planning.rounds import estimate_rounds, label_histograms, label_skew
from toolkit.profile_format import load_profile
from toolkit.testbed.airtime import saturated_throughput

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {
    "lenet5": ROOT / "profiles" / "epyc-vm-2vcpu" / "lenet5.json",
    "vgg": ROOT / "profiles" / "epyc-vm-2vcpu" / "vgg-mnist.json",
}
CLASS_PROFILES = ROOT / "bench" / "results" / "testbed_wifi" / "profiles"


def fleet_state(reference, batch: int, devices: int) -> FleetState:
    """The testbed fleet: speed from each CPU class's measured whole-model step (LeNet-5
    profiles, so a ratio of speeds), rates as one saturated station on 802.11 air time."""
    spec = default_spec(devices, medium="wifi")

    lenet = load_profile(PROFILES["lenet5"])
    speed = [
        relative_speed(load_profile(CLASS_PROFILES / f"cpu{d.cpu_share:g}.json"), lenet, batch) for d in spec.devices
    ]
    up = [saturated_throughput([d.uplink_mbit * 1e6])[0] for d in spec.devices]
    down = [saturated_throughput([d.downlink_mbit * 1e6])[0] for d in spec.devices]
    return FleetState(np.array(speed), LinearRates(np.array(up)), LinearRates(np.array(down)))


def cut_latencies(profile, state: FleetState, settings: TrainingSettings, bounds: ClusterBounds) -> dict[int, float]:
    costs = model_costs(profile)
    latencies = {}
    for cut in costs.cuts:
        problem = SplitProblem.build(cut, state, settings)
        latencies[cut.cut] = round_latency(problem, cluster_devices(problem, bounds, seed=0))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,vgg")
    parser.add_argument("--skews", default="iid,dirichlet:0.5")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--clusters", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cut_hindsight")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("builtin:mnist5k", seed=args.seed)
    settings = TrainingSettings(args.batch_size, args.iterations)
    bounds = ClusterBounds(-(-args.devices // args.clusters), args.clusters)
    report: dict = {
        "command": "python bench/cut_hindsight.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "scenarios": [],
    }
    started = time.time()
    for model_name in args.models.split(","):
        profile = load_profile(PROFILES[model_name])
        state = fleet_state(profile, args.batch_size, args.devices)
        latencies = cut_latencies(profile, state, settings, bounds)
        for skew in args.skews.split(","):
            parts = partition_indices(data.train_y.numpy(), args.devices, skew, args.seed)
            scenario = {"model": model_name, "skew": skew, "cuts": {}}
            costs = model_costs(profile)
            trained: dict[tuple[int, ...], list[float]] = {}  # cuts with the same device layers train alike
            for cut, latency in latencies.items():
                model = load_model(model_name, input_shape=data.input_shape, seed=args.seed)
                device_layers = tuple(i for i in costs.trainable_layers if i < cut)
                t0 = time.time()
                if device_layers not in trained:
                    config = RehearsalConfig(
                        scheme="cpsl",
                        cut=cut,
                        clusters=args.clusters,
                        iterations=args.iterations,
                        batch_size=args.batch_size,
                        lr=args.lr,
                        data_seed=args.seed,
                        rounds=args.rounds,
                        target_accuracy=args.target,
                    )
                    trained[device_layers] = [r.accuracy for r in rehearse(model, data, parts, config)]
                accuracy = trained[device_layers]
                reached = next((i + 1 for i, a in enumerate(accuracy) if a >= args.target), None)
                scenario["cuts"][str(cut)] = {
                    "name": model.cut_name(cut),
                    "round_latency_s": latency,
                    "accuracy": accuracy,
                    "rounds_to_target": reached,
                    "time_to_target_s": reached * latency if reached else None,
                }
                print(
                    f"{model_name} {skew} cut {model.cut_name(cut)}: {reached} rounds x {latency:.2f} s "
                    f"({time.time() - t0:.0f} s to rehearse)",
                    flush=True,
                )
            scenario["picks"] = pick(scenario, profile, parts, data)
            report["scenarios"].append(scenario)
            (args.out / "hindsight.json").write_text(json.dumps(report, indent=1))
    report["wall_s"] = time.time() - started
    (args.out / "hindsight.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "hindsight.png")
    print(f"wrote {args.out / 'hindsight.json'} and hindsight.png")


def pick(scenario: dict, profile, parts, data) -> dict:
    """Each rule's cut, scored against the best cut in hindsight (and against pool2)."""
    cuts = scenario["cuts"]
    times = {c: row["time_to_target_s"] for c, row in cuts.items() if row["time_to_target_s"] is not None}
    best = min(times, key=times.get) if times else None
    skew = label_skew(label_histograms([data.train_y.numpy()[p] for p in parts], data.num_classes))
    costs = model_costs(profile)
    estimates = {str(c.cut): estimate_rounds(costs, c.cut, skew) for c in costs.cuts}
    pool2 = next((c for c, row in cuts.items() if row["name"] == "pool2"), None)

    def scored(chosen: str) -> dict:
        time_s = cuts[chosen]["time_to_target_s"]
        return {
            "cut": chosen,
            "name": cuts[chosen]["name"],
            "time_to_target_s": time_s,
            "ratio_to_best": time_s / times[best] if time_s and best else None,
            "ratio_to_pool2": time_s / times[pool2] if time_s and pool2 in times else None,
        }

    result = {"best": best, "skew": skew, "estimates": {c: e.to_dict() for c, e in estimates.items()}}
    result["latency"] = scored(min(cuts, key=lambda c: cuts[c]["round_latency_s"]))
    result["time-to-accuracy"] = scored(
        min(cuts, key=lambda c: cuts[c]["round_latency_s"] * estimates[c].relative_rounds)
    )
    # how much the pick hangs on kappa: the same rule with kappa fixed at each value
    result["kappa_sensitivity"] = {
        str(k): scored(min(cuts, key=lambda c: cuts[c]["round_latency_s"] * (1 + k * estimates[c].averaged_fraction)))[
            "ratio_to_best"
        ]
        for k in (0, 1, 2, 3, 4, 6, 8, 12)
    }
    return result


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = report["scenarios"]
    figure, axes = plt.subplots(1, len(scenarios), figsize=(4.5 * len(scenarios), 4), squeeze=False)
    for axis, scenario in zip(axes[0], scenarios, strict=True):
        names = [row["name"] for row in scenario["cuts"].values()]
        times = [row["time_to_target_s"] or 0 for row in scenario["cuts"].values()]
        colors = ["tab:gray"] * len(names)
        picks = scenario["picks"]
        for index, cut in enumerate(scenario["cuts"]):
            if cut == picks["time-to-accuracy"]["cut"]:
                colors[index] = "tab:green"
            elif cut == picks["latency"]["cut"]:
                colors[index] = "tab:orange"
        axis.bar(names, times, color=colors)
        axis.set_title(f"{scenario['model']}, {scenario['skew']}", fontsize=9)
        axis.set_ylabel("time to target [s] (0: not reached)")
        axis.tick_params(axis="x", rotation=45)
    figure.suptitle("green: time-to-accuracy pick, orange: lowest-latency pick", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
