"""Benchmark: how long the per-round decision takes for large fleets (issue #4, item 4).

The decision is what the edge server computes every round: the clustering and the share
allocation of every phase of every cluster (``cluster_devices`` + ``plan_split_round``).
Targets: 50 ms for 100 devices, 1 s for 1000. Each size runs on several seeded states;
the figure reported is the median. Beside it, in the same run, the round latency the
decision buys against the baseline of random clusters with equal shares (cpsl-random's
decision) and against random clusters with optimal shares (clustering's own share).

    python bench/decision_time.py [--sizes 100,1000] [--repeats 7] [--model vgg]

Writes bench/results/decision_time.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from toolkit.allocator import pin_malloc_thresholds
from toolkit.planning.allocation import equal_shares
from toolkit.planning.channel import ChannelModel, RadioSettings
from toolkit.planning.clustering import ClusterBounds, cluster_devices
from toolkit.planning.costs import model_costs
from toolkit.planning.device_classes import BUILTIN_CLASSES, assign_classes
from toolkit.planning.latency import SplitProblem, TrainingSettings, plan_split_round
from toolkit.planning.simulate import random_clusters
from toolkit.profile_format import load_profile

ROOT = Path(__file__).resolve().parents[1]
TARGETS_S = {100: 0.05, 1000: 1.0}
FLEET = {"raspberry-pi-4": 1.0, "jetson-nano": 1.0, "jetson-orin-nano": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default="vgg")
    parser.add_argument("--max-cluster-size", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decision_time.json")
    args = parser.parse_args()
    allocator = pin_malloc_thresholds()  # as the edge server does: see toolkit/allocator.py

    costs = model_costs(load_profile(ROOT / "profiles" / "epyc-vm-2vcpu" / f"{args.model}.json"))
    cut = costs.middle_cut()
    settings = TrainingSettings(server_speed=8)
    bounds = ClusterBounds(max_cluster_size=args.max_cluster_size)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        names = assign_classes(size, FLEET, 0)
        speeds = np.array([BUILTIN_CLASSES[n].speed for n in names])
        channel = ChannelModel(speeds, RadioSettings(bandwidth_hz=20e6), seed=0)
        cluster_times, allocation_times, ours, random_equal, random_optimal = [], [], [], [], []
        cluster_devices(SplitProblem.build(cut, channel.state(999), settings), bounds)  # warm caches/imports
        for repeat in range(args.repeats):
            problem = SplitProblem.build(cut, channel.state(repeat), settings)
            started = time.perf_counter()
            clusters = cluster_devices(problem, bounds, seed=repeat)
            clustered = time.perf_counter()
            plan = plan_split_round(problem, clusters)
            finished = time.perf_counter()
            cluster_times.append(clustered - started)
            allocation_times.append(finished - clustered)
            ours.append(plan.latency_s)
            baseline = random_clusters(size, len(clusters), np.random.default_rng(repeat))
            random_equal.append(plan_split_round(problem, baseline, equal_shares).latency_s)
            random_optimal.append(plan_split_round(problem, baseline).latency_s)
        decision = [a + b for a, b in zip(cluster_times, allocation_times, strict=True)]
        row = {
            "devices": size,
            "clusters": len(clusters),
            "repeats": args.repeats,
            "decision_s_median": statistics.median(decision),
            "decision_s_max": max(decision),
            "clustering_s_median": statistics.median(cluster_times),
            "allocation_s_median": statistics.median(allocation_times),
            "target_s": TARGETS_S.get(size),
            "round_latency_s_median": {
                "cpsl_decision": statistics.median(ours),
                "random_clusters_equal_shares": statistics.median(random_equal),
                "random_clusters_optimal_shares": statistics.median(random_optimal),
            },
            "latency_vs_random_equal_median": statistics.median(o / r for o, r in zip(ours, random_equal, strict=True)),
            "latency_vs_random_optimal_median": statistics.median(
                o / r for o, r in zip(ours, random_optimal, strict=True)
            ),
        }
        results.append(row)
        target = f" (target {row['target_s'] * 1000:.0f} ms)" if row["target_s"] else ""
        print(
            f"N={size:5d}: decision median {1000 * row['decision_s_median']:7.1f} ms{target} "
            f"[clustering {1000 * row['clustering_s_median']:.1f} ms + allocation "
            f"{1000 * row['allocation_s_median']:.1f} ms], round latency x{row['latency_vs_random_equal_median']:.3f} "
            f"of random+equal, x{row['latency_vs_random_optimal_median']:.3f} of random+optimal shares"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python bench/decision_time.py " + f"--sizes {args.sizes} --repeats {args.repeats} "
                f"--model {args.model} --max-cluster-size {args.max_cluster_size}",
                "machine": platform.processor() or platform.machine(),
                "allocator": allocator,
                "model": args.model,
                "cut": f"{cut.cut}:{cut.name}",
                "results": results,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
