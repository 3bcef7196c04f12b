"""Benchmark (issue #5): the schemes side by side on the emulated testbed, in one invocation.

8 heterogeneous emulated devices (cpsl-testbed's default classes: 0.30/0.15/0.08 of a core,
16/6/2.5 Mbit/s uplinks, a 20 Mbit/s up / 40 Mbit/s down shared medium) train LeNet-5 on
builtin:mnist5k (Dirichlet 0.5 partitions) until 90% test accuracy or the round limit:

- sl, sfl, fl (as configured, no slots);
- cpsl-fixed: cpsl without resource management (cut pool2, random clusters, no slots);
- cpsl-auto: cpsl with it (probes, SAA cut, live clustering; upload slots on an air-time
  medium, overlapping transfers on a byte-shared one, as the probes decide);
- cpsl-auto-airtime: the same with the planner told the medium is air time (slots always):
  on the wired medium, what modelling the medium buys.

Reported per scheme: time to 90% (sum of round latencies until the first round at or above
90%; ``wall_to_target_s`` beside it, wall clock from the server's start, its profiling,
probes and planning included), mean round latency, and for cpsl-auto the fidelity
measured / predicted round latency per round. Optional events, for every scheme alike:
``--throttle dev2:3:0.5``, ``--drop dev5:6``. One run per scheme: ``bench/ablation.py``
runs seeds and states claims under issue #24's rules.

    sudo python bench/testbed_compare.py [--schemes ...] [--rounds 25] [--medium wired|wifi]
                                         [--fleet default|heavy] [--out DIR]

``--fleet heavy`` trains WideNet (5.5 MB, toolkit/models/widenet.py) on devices of
0.15/0.08/0.05 of a core: the case split learning is for.

``--medium wifi`` shares the medium's airtime as 802.11 does (docs/testbed.md, "Two media"),
each device's uplink and downlink rates then being its PHY rates.

Writes ``compare.json`` and ``compare.png`` under ``--out``. Needs root.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time
from pathlib import Path

from toolkit.cli.testbed import FLEETS, default_spec
from toolkit.testbed.runner import Event, RunSpec, profile_devices, run
from toolkit.testbed.topology import MEDIA, Testbed, require_root

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = {
    "sl": RunSpec(scheme="sl"),
    "sfl": RunSpec(scheme="sfl"),
    "fl": RunSpec(scheme="fl"),
    "cpsl-fixed": RunSpec(scheme="cpsl", auto=False, random_clusters=True, cut="pool2"),
    "cpsl-auto": RunSpec(scheme="cpsl", auto=True),
    # the planner told the medium is air time whatever the probes say: what modelling the medium buys
    "cpsl-auto-airtime": RunSpec(scheme="cpsl", auto=True, planner_medium="airtime"),
}


def summarize(records: list[dict], target: float, started_at: float | None = None) -> dict:
    """``started_at``: the server's start (run_dir/testbed.json); wall-clock time to the target
    counts from it, the server's profiling, probes and planning included."""
    latencies = [r["latency_s"] for r in records]
    reached = next((i for i, r in enumerate(records) if r["accuracy"] >= target), None)
    fidelity = [r["latency_s"] / r["predicted_latency_s"] for r in records if r.get("predicted_latency_s")]
    return {
        "rounds": len(records),
        "final_accuracy": records[-1]["accuracy"] if records else None,
        "round_to_target": reached,
        "time_to_target_s": sum(latencies[: reached + 1]) if reached is not None else None,
        "wall_to_target_s": (
            records[reached]["time"] - started_at if reached is not None and started_at is not None else None
        ),
        "mean_round_latency_s": statistics.mean(latencies) if latencies else None,
        "mean_round_latency_after_first_s": statistics.mean(latencies[1:]) if len(latencies) > 1 else None,
        "fidelity": fidelity,
        "fidelity_median": statistics.median(fidelity[1:]) if len(fidelity) > 1 else None,
        "accuracy": [r["accuracy"] for r in records],
        "latency_s": latencies,
        "predicted_latency_s": [r.get("predicted_latency_s") for r in records],
        "cut": [r.get("cut_name") for r in records],
        "clusters": [r.get("clusters") for r in records],
        "dropped": [r.get("dropped") for r in records],
        "slots": [r.get("slots") for r in records],
    }


def plot(results: dict, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve, bars, fidelity) = plt.subplots(1, 3, figsize=(16, 4.8))
    for scheme, data in results.items():
        elapsed, total = [], 0.0
        for latency in data["latency_s"]:
            total += latency
            elapsed.append(total)
        curve.plot(elapsed, data["accuracy"], marker="o", ms=3, label=scheme)
    curve.axhline(target, color="gray", linestyle=":")
    curve.set_xlabel("wall time [s] (sum of round latencies)")
    curve.set_ylabel("test accuracy")
    curve.legend(fontsize=8)
    curve.grid(alpha=0.3)
    names = list(results)
    bars.bar(names, [results[n]["mean_round_latency_after_first_s"] or 0 for n in names], color="tab:blue")
    bars.set_ylabel("mean round latency [s] (rounds 1..)")
    bars.tick_params(axis="x", rotation=20)
    for scheme, data in results.items():
        if data["fidelity"]:
            fidelity.plot(range(len(data["fidelity"])), data["fidelity"], marker="o", label=scheme)
    fidelity.axhspan(0.85, 1.15, color="tab:green", alpha=0.15, label="target 0.85-1.15")
    fidelity.set_xlabel("round")
    fidelity.set_ylabel("measured / predicted round latency")
    fidelity.legend(fontsize=8)
    fidelity.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--throttle", action="append", default=[], help="devI:ROUND:MBIT, for every scheme")
    parser.add_argument("--drop", action="append", default=[], help="devI:ROUND, for every scheme")
    parser.add_argument("--medium", choices=MEDIA, default="wired")
    parser.add_argument(
        "--fleet",
        choices=sorted(FLEETS),
        default="default",
        help="default: LeNet-5, capable CPUs; heavy: WideNet, weak",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "testbed")
    args = parser.parse_args()
    require_root()
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))  # clean up
    args.out.mkdir(parents=True, exist_ok=True)
    spec = default_spec(args.devices, medium=args.medium, fleet=args.fleet)
    model = FLEETS[args.fleet][1]
    results = {}
    testbed = Testbed(spec)
    started = time.time()
    try:
        testbed.create()
        profiles = profile_devices(testbed, args.out / "profiles", 32, model)
        for name in args.schemes.split(","):
            run_spec = SCHEMES[name]
            run_spec.rounds, run_spec.target_accuracy, run_spec.model = args.rounds, args.target, model
            # events hit every scheme alike: a throttle or a drop that only cpsl-auto met would
            # be a handicap the comparison hid, or a stress only one side was shown to survive
            run_spec.events = [Event.parse("throttle", t, args.devices) for t in args.throttle] + [
                Event.parse("drop", d, args.devices) for d in args.drop
            ]
            print(f"== {name}", flush=True)
            records = run(testbed, run_spec, args.out / name, profiles)
            started_at = json.loads((args.out / name / "testbed.json").read_text())["server_started_at"]
            results[name] = summarize(records, args.target, started_at)
            row = results[name]
            print(
                f"   rounds {row['rounds']}, to {args.target:.0%}: {row['time_to_target_s']} s, "
                f"mean round {row['mean_round_latency_s']:.2f} s, fidelity {row['fidelity_median']}",
                flush=True,
            )
            write_report(args, spec, model, started, results)
    finally:
        testbed.destroy()
    write_report(args, spec, model, started, results)
    plot(results, args.out / "compare.png", args.target)
    print(f"wrote {args.out / 'compare.json'} and compare.png")


def write_report(args, spec, model: str, started: float, results: dict) -> None:
    """compare.json, rewritten after every scheme: a long run stopped midway keeps what it measured."""
    report = {
        "command": "python bench/testbed_compare.py "
        + " ".join(
            [f"--schemes {args.schemes}", f"--devices {args.devices}", f"--rounds {args.rounds}"]
            + [
                f"--medium {args.medium}",
                f"--fleet {args.fleet}",
                f"--out {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}",
            ]
            + [f"--throttle {t}" for t in args.throttle]
            + [f"--drop {d}" for d in args.drop]
        ),
        "spec": [vars(d) for d in spec.devices],
        "medium": args.medium,
        "fleet": args.fleet,
        "model": model,
        "medium_mbit": {"up": spec.medium_up_mbit, "down": spec.medium_down_mbit},
        "wall_s": time.time() - started,
        "results": results,
    }
    (args.out / "compare.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
