"""What each piece of resource management buys, on the emulated testbed, under a skeptic's rules.

cpsl at one cut with (a) nothing (random clusters, no slots), (b) clustering only, (c) slots
only, (d) both, and (e) the cut chosen too (cpsl-auto), beside SL, SFL and FL at the cuts
named for them, on one fleet and medium, in one invocation; ``cpsl-both-max7`` (any planned
variant with ``-maxN``) lets the planner make clusters of up to N devices, unequal ones too:

    sudo .venv/bin/python bench/ablation.py --fleet heavy --medium wifi --cut pool3 \\
        --variants cpsl-none,cpsl-clusters,cpsl-slots,cpsl-both,cpsl-auto,sl@pool3,sfl@pool3,fl \\
        --seeds 0,1,2 --out bench/results/ablation/heavy_wifi

The rules (issue #24 item 4):

- time to target is wall-clock from the server's start (its own profiling, the probes, the
  planning and the encoding trials included) to the end of the first round at the target;
  the sum of the round latencies up to it is shown beside it;
- every variant runs every seed (the seed sets the data partition, the initial weights,
  the random clusters and the medium's backoff draws); medians and ranges over the seeds;
- a claim "X beats Y" holds when X's median beats Y's median and X's slowest seed beats Y's
  median too;
- events (``--throttle``, ``--drop``) hit every variant alike;
- a variant whose first seed took over 3x as long as cpsl-auto's slowest runs that one seed
  (``--all-seeds`` runs them anyway), and a run that passes 3x cpsl-auto's slowest seed on
  the wall clock is stopped there: its table entry is "> T (stopped)", a lower bound, and a
  claim against it compares with that bound (so its ratio is an upper bound);
- a split baseline swept over several cuts (``sl@pool2,sl@pool3,...``) runs every cut at
  its first seed, then the remaining seeds only at the cuts within 10% of the sweep's best
  first seed: the baseline's best cut gets every seed, a cut that lost clearly does not;
- resumable: each finished run leaves ``OUT/VARIANT/seed-K/summary.json`` and is not run
  again; a run that was cut short is run again from its start. The summary is rewritten
  after every run, so a stopped invocation keeps what it measured.

Writes ``OUT/ablation.json`` (every run, the medians, the claims) and prints the table.
Needs root (the testbed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.cli.testbed import FLEETS, default_spec, load_spec  # noqa: E402
from toolkit.files import write_atomically  # noqa: E402
from toolkit.testbed.runner import REGISTERED, Event, RunSpec, profile_devices, run  # noqa: E402
from toolkit.testbed.topology import MEDIA, Testbed, require_root  # noqa: E402

VARIANTS = ("cpsl-none", "cpsl-clusters", "cpsl-slots", "cpsl-both", "cpsl-auto")
SLOW_FACTOR = 3.0
SWEEP_MARGIN = 1.1  # a swept cut this close to the best cut's first seed runs every seed too


def run_spec(variant: str, cut: str) -> RunSpec:
    """The testbed run of a variant: cpsl ablations at ``cut``, or ``sl@CUT``, ``sfl@CUT``, ``fl``;
    a planned cpsl variant ending in ``-maxN`` (``cpsl-both-max7``) lets the planner make
    clusters of up to N devices (the server's ``--max-cluster-size``), unequal ones included."""
    base, marker, cap = variant.partition("-max")
    if marker and base in VARIANTS[1:]:
        if not cap.isdigit() or not 1 <= int(cap) <= 64:
            raise SystemExit(f"variant {variant!r}: -maxN takes a cluster size from 1 to 64")
        spec = run_spec(base, cut)
        spec.max_cluster_size = int(cap)
        return spec
    if variant == "cpsl-none":
        return RunSpec(scheme="cpsl", auto=False, random_clusters=True, cut=cut)
    if variant == "cpsl-clusters":
        return RunSpec(scheme="cpsl", auto=True, cut=cut, slots=False)
    if variant == "cpsl-slots":
        return RunSpec(scheme="cpsl", auto=True, cut=cut, random_clusters=True)
    if variant == "cpsl-both":
        return RunSpec(scheme="cpsl", auto=True, cut=cut)
    if variant == "cpsl-auto":
        return RunSpec(scheme="cpsl", auto=True)
    if variant == "fl":
        return RunSpec(scheme="fl")
    scheme, _, at = variant.partition("@")
    if scheme in ("sl", "sfl") and at:
        return RunSpec(scheme=scheme, cut=at)
    raise SystemExit(
        f"variant {variant!r}: choose among {', '.join(VARIANTS)} (the planned ones with -maxN), sl@CUT, sfl@CUT, fl"
    )


def fleet_ready_at(folder: Path) -> float | None:
    """When the last agent registered (from the agents' logs). Runs whose agents booted on
    their CPU quota (before the testbed booted them unthrottled and started the server after
    the fleet registered) spent 60-130 s of their wall clock here, the same work for every
    variant: the time from here shows the difference without it."""
    times = []
    for log in sorted((folder / "logs").glob("agent-*.log")):
        line = next((x for x in log.read_text(errors="replace").splitlines() if REGISTERED in x), None)
        if line is None:
            return None
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        times.append(stamp.timestamp())
    return max(times) if times else None


def summarize(
    records: list[dict],
    started_at: float,
    target: float,
    ready_at: float | None = None,
    gave_up_after_s: float | None = None,
) -> dict:
    """One run's figures. ``gave_up_after_s``: the run was stopped that long after the
    server started, before it reached the target; its time to target is over that."""
    latencies = [r["latency_s"] for r in records]
    reached = next((i for i, r in enumerate(records) if r["accuracy"] >= target), None)
    efficiencies = [r["efficiency"] for r in records[1:] if isinstance(r.get("efficiency"), int | float)]
    bounds = [r["bound_s"] for r in records if isinstance(r.get("bound_s"), int | float)]
    return {
        "rounds": len(records),
        "round_to_target": reached,
        "gave_up_after_s": gave_up_after_s if reached is None else None,
        "wall_to_target_s": records[reached]["time"] - started_at if reached is not None else None,
        "ready_to_target_s": records[reached]["time"] - max(ready_at, started_at)
        if reached is not None and ready_at
        else None,
        "latency_sum_to_target_s": sum(latencies[: reached + 1]) if reached is not None else None,
        "mean_round_s": statistics.mean(latencies[1:]) if len(latencies) > 1 else None,
        "median_efficiency": statistics.median(efficiencies) if efficiencies else None,
        "median_bound_s": statistics.median(bounds) if bounds else None,
        "final_accuracy": records[-1]["accuracy"] if records else None,
        "cut": records[-1].get("cut_name") if records else None,
        "latency_s": latencies,
        "accuracy": [r["accuracy"] for r in records],
    }


def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def claim(ours: list[dict], theirs: list[dict], key: str = "wall_to_target_s") -> dict | None:
    """Ours beats theirs: our median below their median, and our slowest seed below it too.

    A run of theirs stopped before the target counts at the time it was stopped, a lower
    bound of its time to target: their median is then a lower bound too, the claim errs
    against us, and the ratio is an upper bound (``at_most``)."""
    a = [r[key] for r in ours if r.get(key) is not None]
    b = [r[key] for r in theirs if r.get(key) is not None]
    stopped = [] if key != "wall_to_target_s" else [r["gave_up_after_s"] for r in theirs if r.get("gave_up_after_s")]
    if not a or not (b or stopped):
        return None
    mine, yours = statistics.median(a), statistics.median(b + stopped)
    verdict = {"ratio": mine / yours, "holds": mine < yours and max(a) < yours, "ours": mine, "theirs": yours}
    return verdict | {"at_most": True} if stopped else verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", choices=sorted(FLEETS), default="heavy")
    parser.add_argument("--spec", type=Path, help="a testbed spec file instead of the fleet's devices")
    parser.add_argument("--model", help="the model (default: the fleet's)")
    parser.add_argument("--medium", choices=MEDIA, default="wifi")
    parser.add_argument("--contention", choices=("dcf", "none"), default="dcf")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--cut", default="pool3", help="the cut of the cpsl ablations (a)-(d)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--local-iterations", type=int, default=20)
    parser.add_argument("--throttle", action="append", default=[], help="devI:ROUND:MBIT, for every variant")
    parser.add_argument("--drop", action="append", default=[], help="devI:ROUND, for every variant")
    parser.add_argument("--all-seeds", action="store_true", help="run every seed even of a variant 3x slower")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    require_root()
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    for variant in variants:
        run_spec(variant, args.cut)  # a bad name fails before anything starts
    spec = (
        load_spec(args.spec, args.medium, args.contention)
        if args.spec
        else default_spec(args.devices, medium=args.medium, fleet=args.fleet, contention=args.contention)
    )
    model = args.model or FLEETS[args.fleet][1]
    count = len(spec.devices)
    events = [Event.parse("throttle", t, count) for t in args.throttle] + [
        Event.parse("drop", d, count) for d in args.drop
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    # what earlier invocations finished, of these variants and of any other in the same folder
    # (the table keeps them: an invocation may run more seeds of a few variants only)
    earlier = sorted(p.parent.parent.name for p in args.out.glob("*/seed-*/summary.json"))
    results: dict[str, dict[int, dict]] = {v: {} for v in [*variants, *dict.fromkeys(earlier)]}
    for variant in results:
        for seed in sorted({*seeds, *(int(p.name[5:]) for p in args.out.glob(f"{variant}/seed-*"))}):
            folder = args.out / variant / f"seed-{seed}"
            done = folder / "summary.json"
            if done.exists():
                summary = json.loads(done.read_text())
                if "ready_to_target_s" not in summary:  # from before that column: recomputed from the run
                    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
                    started_at = json.loads((folder / "testbed.json").read_text())["server_started_at"]
                    summary = summarize(records, started_at, args.target, fleet_ready_at(folder))
                    write_atomically(done, json.dumps(summary, indent=1))
                results[variant][seed] = summary
    report(args, spec, model, results)
    testbed = Testbed(spec)
    try:
        testbed.create()
        profiles = profile_devices(testbed, args.out / "profiles", 32, model)
        for seed in seeds:
            for variant in variants:
                if seed in results[variant] or skipped(args, results, variant, seed):
                    continue
                folder = args.out / variant / f"seed-{seed}"
                shutil.rmtree(folder, ignore_errors=True)  # a run cut short starts again
                spec_run = run_spec(variant, args.cut)
                spec_run.rounds, spec_run.target_accuracy, spec_run.model = args.rounds, args.target, model
                spec_run.seed, spec_run.local_iterations, spec_run.events = seed, args.local_iterations, list(events)
                spec_run.give_up_after_s = give_up_after(args, results, variant)
                print(f"== {variant} seed {seed}", flush=True)
                records = run(testbed, spec_run, folder, profiles)
                started = json.loads((folder / "testbed.json").read_text())
                summary = summarize(
                    records,
                    started["server_started_at"],
                    args.target,
                    fleet_ready_at(folder),
                    started.get("gave_up_after_s"),
                )
                write_atomically(folder / "summary.json", json.dumps(summary, indent=1))
                results[variant][seed] = summary
                print(
                    f"   to {args.target:.0%}: {summary['wall_to_target_s']} s wall "
                    f"(rounds' sum {summary['latency_sum_to_target_s']}), mean round {summary['mean_round_s']}, "
                    f"efficiency {summary['median_efficiency']}",
                    flush=True,
                )
                report(args, spec, model, results)
    finally:
        testbed.destroy()
    report(args, spec, model, results, final=True)


def _autos(results: dict) -> list[str]:
    return [v for v in results if v == "cpsl-auto" or v.startswith("cpsl-auto-")]


def _slowest_auto(results: dict) -> float | None:
    """cpsl-auto's slowest seed to the target, over every cpsl-auto variant (``-max7`` too)."""
    walls = [r["wall_to_target_s"] for v in _autos(results) for r in results[v].values() if r.get("wall_to_target_s")]
    return max(walls) if walls else None


def give_up_after(args, results: dict, variant: str) -> float | None:
    """When to stop a run of ``variant`` short of the target: at 3x cpsl-auto's slowest seed,
    past which its one seed is all the rules ask of it (never for cpsl-auto itself)."""
    slowest = _slowest_auto(results)
    if args.all_seeds or variant.startswith("cpsl-auto") or slowest is None:
        return None
    return SLOW_FACTOR * slowest


def _first(runs: dict) -> dict | None:
    return runs[min(runs)] if runs else None


def skipped(args, results: dict, variant: str, seed: int) -> bool:
    """A variant over 3x slower than cpsl-auto's slowest seed (of every cpsl-auto variant,
    ``cpsl-auto-max7`` too), or stopped there, runs its first seed only; so does a swept cut
    of a split baseline whose first seed was over 10% slower than the sweep's best cut's."""
    if args.all_seeds or variant in _autos(results) or not results[variant]:
        return False
    first = _first(results[variant])
    slowest = _slowest_auto(results)
    if slowest is not None and first.get("gave_up_after_s"):
        return True
    wall = first.get("wall_to_target_s")
    if slowest is not None and wall is not None and wall > SLOW_FACTOR * slowest:
        return True
    scheme, at, _ = variant.partition("@")
    swept = [_first(runs) for v, runs in results.items() if v.startswith(f"{scheme}@") and runs] if at else []
    reached = [r["wall_to_target_s"] for r in swept if r.get("wall_to_target_s")]
    if len(swept) < 2 or not reached:
        return False
    return wall is None or wall > SWEEP_MARGIN * min(reached)


def report(args, spec, model: str, results: dict, final: bool = False) -> None:
    rows = {
        variant: {
            "wall_to_target_s": spread([r.get("wall_to_target_s") for r in runs.values()]),
            "gave_up_after_s": spread([r.get("gave_up_after_s") for r in runs.values()]),
            "ready_to_target_s": spread([r.get("ready_to_target_s") for r in runs.values()]),
            "latency_sum_to_target_s": spread([r.get("latency_sum_to_target_s") for r in runs.values()]),
            "rounds_to_target": spread([r.get("round_to_target") for r in runs.values()]),
            "mean_round_s": spread([r.get("mean_round_s") for r in runs.values()]),
            "median_efficiency": spread([r.get("median_efficiency") for r in runs.values()]),
            "median_bound_s": spread([r.get("median_bound_s") for r in runs.values()]),
            "seeds": sorted(runs),
        }
        for variant, runs in results.items()
    }
    claims = {}
    for ours in [v for v in results if v.startswith("cpsl-") and v != "cpsl-none"]:
        for theirs in results:
            if ours in results and theirs != ours and results[ours] and results[theirs]:
                claims[f"{ours} vs {theirs}"] = claim(list(results[ours].values()), list(results[theirs].values()))
                claims[f"{ours} vs {theirs} (round)"] = claim(
                    list(results[ours].values()), list(results[theirs].values()), "mean_round_s"
                )
    # the most any plan could buy over cpsl without resource management at this cut: its round
    # against the lower bound of a round (toolkit/planning/bound.py), which no schedule beats
    bounds = [row["median_bound_s"]["median"] for row in rows.values() if row["median_bound_s"]]
    none = rows.get("cpsl-none", {}).get("mean_round_s")
    ceiling = none["median"] / statistics.median(bounds) if none and bounds else None
    document = {
        "command": "sudo .venv/bin/python bench/ablation.py " + " ".join(sys.argv[1:]),
        "fleet": args.fleet,
        "medium": args.medium,
        "contention": args.contention,
        "model": model,
        "cut": args.cut,
        "spec": [vars(d) for d in spec.devices],
        "target": args.target,
        "rows": rows,
        "claims": claims,
        "ceiling_over_none": ceiling,
        "runs": results,
    }
    write_atomically(args.out / "ablation.json", json.dumps(document, indent=1))
    if final:

        def cell(value: dict | None, digits: int = 1) -> str:
            if not value:
                return "-"
            return f"{value['median']:.{digits}f} ({value['min']:.{digits}f}-{value['max']:.{digits}f})"

        def wall(row: dict) -> str:
            stopped = row.get("gave_up_after_s")
            if stopped and not row["wall_to_target_s"]:
                return f"> {cell(stopped)} stopped"
            return cell(row["wall_to_target_s"])

        print(
            f"{'variant':16} {'wall to target [s]':22} {'from fleet ready [s]':22} {'rounds sum [s]':22} "
            f"{'round [s]':20} efficiency  seeds"
        )
        for variant, row in rows.items():
            print(
                f"{variant:16} {wall(row):22} {cell(row['ready_to_target_s']):22} "
                f"{cell(row['latency_sum_to_target_s']):22} {cell(row['mean_round_s'], 2):20} "
                f"{cell(row['median_efficiency'], 2):11} {row['seeds']}"
            )
        if ceiling:
            print(f"no plan at this cut can be more than {ceiling:.2f}x faster a round than cpsl-none (round / bound)")
        print(f"wrote {args.out / 'ablation.json'}")


if __name__ == "__main__":
    main()
