"""``cpsl-sim``: compare sl, sfl, fl, cpsl-random and cpsl on a simulated wireless cell.

Thin by design: flags in, :mod:`toolkit.planning.scenario` does the work, a table, JSON
and a figure out. ``--devices`` or ``--bandwidth-mhz`` given as a comma list runs a sweep.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolkit.allocator import pin_malloc_thresholds
from toolkit.cli.common import (
    OneLineArgumentParser,
    ensure_writable_file,
    positive_float,
    positive_int,
    progress_bar,
    run_cli,
)
from toolkit.errors import UserError
from toolkit.planning.channel import MEDIA, RadioSettings
from toolkit.planning.clustering import ClusterBounds
from toolkit.planning.device_classes import load_device_classes, parse_fleet
from toolkit.planning.latency import TrainingSettings
from toolkit.planning.plots import plot_rounds, plot_sweep
from toolkit.planning.scenario import Scenario, find_model_profile, load_costs, profile_classes, run_scenario, run_sweep
from toolkit.planning.simulate import DEFAULT_SCHEMES, SCHEMES, SimulationConfig, parse_schemes

PROG = "cpsl-sim"
DEFAULT_FLEET = "raspberry-pi-4,jetson-nano,jetson-orin-nano"


def number_list(kind):
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} is empty")
        return [kind(p) for p in parts]

    return parse


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG,
        description="Simulate training rounds of sl, sfl, fl, cpsl-random and cpsl over a wireless cell "
        "(path loss, Rayleigh fading, heterogeneous devices) and compare their round latency.",
    )
    parser.add_argument(
        "--devices", type=number_list(positive_int), default=[10], help="number of devices; a comma list sweeps"
    )
    parser.add_argument(
        "--schemes",
        type=parse_schemes,
        default=list(DEFAULT_SCHEMES),
        help=f"among {','.join(SCHEMES)} (default {','.join(DEFAULT_SCHEMES)})",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="lenet5", help="use the shipped reference profile of this model")
    source.add_argument(
        "--profile",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="device profiles of one model: the first is the reference, each is a device class by measured speed",
    )
    parser.add_argument("--profile-dir", type=Path, help="where --model looks for NAME.json")
    parser.add_argument("--server-profile", type=Path, help="the edge server's profile (default: the reference's)")
    parser.add_argument(
        "--server-speed",
        type=positive_float,
        default=8.0,
        help="server compute speed relative to the server profile (default 8: an edge PC vs one reference thread)",
    )
    parser.add_argument(
        "--bandwidth-mhz", type=number_list(positive_float), default=[10.0], help="band W; a comma list sweeps"
    )
    parser.add_argument("--rounds", type=positive_int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fleet",
        default=None,
        help=f"device classes and weights, e.g. raspberry-pi-4=2,jetson-nano=1 (default {DEFAULT_FLEET}; "
        "with --profile: one class per profile)",
    )
    parser.add_argument("--device-classes", type=Path, help="JSON list of extra classes {name, speed, ...}")
    parser.add_argument("--list-classes", action="store_true", help="print the device classes and exit")
    parser.add_argument(
        "--max-cluster-size", type=positive_int, default=5, help="most devices served in parallel (default 5)"
    )
    parser.add_argument("--clusters", type=positive_int, help="exactly this many clusters (default: the algorithm's)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--local-iterations", type=positive_int, default=20, help="iterations per cluster turn")
    parser.add_argument("--cpsl-cut", help="pin cpsl's cut (layer name or number) instead of choosing it by SAA")
    parser.add_argument("--split-cut", help="pin sl's, sfl's and cpsl-random's cut (default: the middle candidate)")
    parser.add_argument(
        "--medium",
        choices=MEDIA,
        default="cell",
        help="cell: frequency shares (CPSL.md); wifi: air time with DCF contention; wired: a switch",
    )
    parser.add_argument(
        "--wired-capacity-mbit", type=positive_float, default=20.0, help="--medium wired: the server's link"
    )
    parser.add_argument("--saa-samples", type=positive_int, default=10, help="sampled states per cut selection")
    parser.add_argument("--reselect-every", type=positive_int, default=10, help="rounds between cut selections")
    parser.add_argument("--drift-threshold", type=positive_float, default=0.3, help="log-drift forcing re-selection")
    parser.add_argument("--speed-jitter", type=float, default=0.1, help="sd of log compute speed per round")
    parser.add_argument("--cell-radius-m", type=positive_float, default=200.0)
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--plot", type=Path, help="draw the results to this PNG or SVG")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


def _scenario(args) -> Scenario:
    classes = load_device_classes(args.device_classes)
    if args.profile:
        costs, profiles, _ = load_costs(args.profile, args.server_profile)
        measured = profile_classes(profiles, args.batch_size)
        classes.update({c.name: c for c in measured})
        fleet = parse_fleet(args.fleet, classes) if args.fleet else {c.name: 1.0 for c in measured}
        source = ", ".join(str(p) for p in args.profile)
    else:
        path = find_model_profile(args.model, args.profile_dir)
        costs, _, _ = load_costs([path], args.server_profile)
        fleet = parse_fleet(args.fleet or DEFAULT_FLEET, classes)
        source = str(path)
    if args.speed_jitter < 0:
        raise UserError("--speed-jitter must be 0 or more")
    if args.clusters and args.clusters > max(args.devices):
        raise UserError(f"--clusters {args.clusters} is more than the {max(args.devices)} devices")
    bounds = (
        ClusterBounds(min_clusters=args.clusters, max_clusters=args.clusters)
        if args.clusters
        else ClusterBounds(max_cluster_size=args.max_cluster_size)
    )
    try:
        settings = TrainingSettings(args.batch_size, args.local_iterations, args.server_speed)
        radio = RadioSettings(
            cell_radius_m=args.cell_radius_m,
            speed_jitter=args.speed_jitter,
            medium=args.medium,
            wired_capacity_bps=args.wired_capacity_mbit * 1e6,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    cpsl_cut = costs.resolve(args.cpsl_cut).cut if args.cpsl_cut else None
    split_cut = costs.resolve(args.split_cut).cut if args.split_cut else None
    config = SimulationConfig(
        cpsl_cut=cpsl_cut,
        split_cut=split_cut,
        rounds=args.rounds,
        seed=args.seed,
        settings=settings,
        bounds=bounds,
        saa_samples=args.saa_samples,
        reselect_every=args.reselect_every,
        drift_threshold=args.drift_threshold,
    )
    return Scenario(costs, classes, fleet, radio, config, source)


def _print_classes(console: Console, args) -> None:
    table = Table(title="device classes (speed relative to the reference profile)")
    for column in ("name", "speed", "description", "source"):
        table.add_column(column, overflow="fold")
    for c in load_device_classes(args.device_classes).values():
        table.add_row(c.name, f"{c.speed:g}", c.description, c.source)
    console.print(table)


def _summary(console: Console, result: dict) -> None:
    if "sweep" in result:
        sweep = result["sweep"]
        table = Table(title=f"mean round latency [s] against {sweep['parameter']}")
        table.add_column(sweep["parameter"], justify="right")
        for scheme in sweep["mean_latency_s"]:
            table.add_column(scheme, justify="right")
        if sweep["cpsl_cut"]:
            table.add_column("cpsl cut")
        for i, value in enumerate(sweep["values"]):
            row = [f"{value:g}"] + [f"{means[i]:.2f}" for means in sweep["mean_latency_s"].values()]
            if sweep["cpsl_cut"]:
                row.append(f"{sweep['cpsl_cut'][i]['cut']}:{sweep['cpsl_cut'][i]['name']}")
            table.add_row(*row)
        console.print(table)
        return
    schemes = result["schemes"]
    table = Table(
        title=f"{result['config']['model']}, {result['config']['devices']} devices, "
        f"{result['config']['bandwidth_mhz']:g} MHz, {result['config']['rounds']} rounds"
    )
    for column in ("scheme", "mean round [s]", "vs cpsl", "cut", "clusters (round 0)"):
        table.add_column(column, justify="right" if column != "scheme" else "left")
    reference = schemes.get("cpsl", {}).get("mean_latency_s")
    for scheme, data in schemes.items():
        first = data["rounds"][0]
        ratio = f"{data['mean_latency_s'] / reference:.2f}x" if reference else "-"
        table.add_row(
            scheme, f"{data['mean_latency_s']:.3f}", ratio, str(first["cut_name"]), str(len(first["clusters"]))
        )
    console.print(table)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    pin_malloc_thresholds()  # the search's candidate arrays straddle glibc's mmap threshold (toolkit/allocator.py)
    console = Console(stderr=True)
    if args.list_classes:
        _print_classes(Console(), args)
        return 0
    if len(args.devices) > 1 and len(args.bandwidth_mhz) > 1:
        raise UserError("sweep one parameter at a time: --devices or --bandwidth-mhz as a list, not both")
    for path, what in ((args.json, "JSON output"), (args.plot, "plot")):
        if path is not None:
            ensure_writable_file(path, what)
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserError(f"plot {args.plot}: use a .png, .svg or .pdf file name")
    scenario = _scenario(args)

    sweep = "devices" if len(args.devices) > 1 else "bandwidth_mhz" if len(args.bandwidth_mhz) > 1 else None
    points = len(args.devices) * len(args.bandwidth_mhz)
    with progress_bar(console) as progress:
        task = progress.add_task("simulating", total=points * args.rounds * len(args.schemes))

        def advance(scheme: str, round_: int) -> None:
            progress.update(task, advance=1, description=f"{scheme} round {round_}")

        if sweep == "devices":
            result = run_sweep(scenario, "devices", args.devices, 0, args.bandwidth_mhz[0], args.schemes, advance)
        elif sweep == "bandwidth_mhz":
            result = run_sweep(
                scenario, "bandwidth_mhz", args.bandwidth_mhz, args.devices[0], 0.0, args.schemes, advance
            )
        else:
            result = run_scenario(scenario, args.devices[0], args.bandwidth_mhz[0], args.schemes, advance)

    _summary(Console(), result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {args.json}")
    if args.plot:
        (plot_sweep if sweep else plot_rounds)(result, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
