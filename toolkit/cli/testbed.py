"""``cpsl-testbed``: train on N emulated heterogeneous devices on this host (needs root).

    cpsl-testbed run --devices 8 --scheme cpsl --run-dir runs/testbed [--throttle dev3:4:1] [--drop dev5:6]
    cpsl-testbed cleanup        # remove what a killed run left (cpsl-* namespaces and cgroups)
    cpsl-testbed --instance bench run ...   # a second testbed beside the first (bench-* names)

Thin: flags in, :mod:`toolkit.testbed` does the work. The namespaces, links and CPU groups
are removed when the run ends, fails, or is interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from toolkit.cli.common import OneLineArgumentParser, encoding_name, positive_int, run_cli
from toolkit.errors import UserError
from toolkit.models.registry import BUILTIN_MODELS
from toolkit.planning.medium import MEDIUM_CHOICES
from toolkit.testbed.airtime import CONTENTION_MODES
from toolkit.testbed.runner import Event, RunSpec, profile_devices, run
from toolkit.testbed.topology import (
    INSTANCE_ENV,
    MEDIA,
    DeviceSpec,
    Testbed,
    TestbedSpec,
    instance_prefix,
    remove_leftovers,
    require_root,
)

PROG = "cpsl-testbed"
CPU_CLASSES = (0.30, 0.15, 0.08)  # fraction of one core: fast, medium, slow
HEAVY_CPU_CLASSES = (0.15, 0.08, 0.05)  # the heavy fleet: devices too weak to train a whole model quickly
UPLINK_CLASSES = (16.0, 6.0, 2.5)  # Mbit/s: good, fair, poor channel
WIDE_CPU_CLASSES = (0.50, 0.16, 0.05)  # the wide fleet: compute 10x apart (0.05: the testbed's floor)
WIDE_UPLINK_CLASSES = (20.0, 6.3, 2.0)  # and channels 10x apart
# fleet -> (CPU classes, model, uplink classes): "default" is LeNet-5 on capable devices, FL's
# case; "heavy" is WideNet (5.5 MB, most of it a fully connected head) on weak ones, split
# learning's case; "wide" is WideNet on a fleet whose CPUs and links are each spread 10x, the
# case where grouping devices by speed should pay most
FLEETS = {
    "default": (CPU_CLASSES, "lenet5", UPLINK_CLASSES),
    "heavy": (HEAVY_CPU_CLASSES, "widenet", UPLINK_CLASSES),
    "wide": (WIDE_CPU_CLASSES, "widenet", WIDE_UPLINK_CLASSES),
}


def default_spec(
    devices: int,
    medium_up: float = 20.0,
    medium_down: float = 40.0,
    medium: str = "wired",
    fleet: str = "default",
    contention: str = "dcf",
) -> TestbedSpec:
    """Device i: compute class i mod 3 (of the fleet's classes), channel class
    (i // 3 + i) mod 3 (so the two do not line up), downlink twice its uplink; the shared
    medium 20 Mbit/s up, 40 down."""
    classes, _, links = FLEETS[fleet]
    return TestbedSpec(
        tuple(
            DeviceSpec(f"dev{i}", links[(i // 3 + i) % 3], 2 * links[(i // 3 + i) % 3], classes[i % 3])
            for i in range(devices)
        ),
        medium_up,
        medium_down,
        medium,
        contention,
    )


def load_spec(path: Path, medium: str = "wired", contention: str = "dcf") -> TestbedSpec:
    try:
        data = json.loads(path.read_text())
        devices = tuple(
            DeviceSpec(str(d["name"]), float(d["uplink_mbit"]), float(d["downlink_mbit"]), float(d["cpu_share"]))
            for d in data["devices"]
        )
        return TestbedSpec(
            devices,
            float(data.get("medium_up_mbit", 20)),
            float(data.get("medium_down_mbit", 40)),
            medium,
            contention,
        )
    except OSError as exc:
        raise UserError(f"cannot read testbed spec {path}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"testbed spec {path}: needs devices [{{name, uplink_mbit, downlink_mbit, cpu_share}}] "
            f"({type(exc).__name__}: {exc})"
        ) from exc


INSTANCE_HELP = (
    f"the testbed instance: its namespaces and CPU groups are NAME-ap, NAME-d0, ... (default ${INSTANCE_ENV} "
    "or cpsl); a second instance runs beside the first"
)


def instance_name(text: str) -> str:
    """``--instance``: checked here, so a bad name is a one-line usage error."""
    try:
        instance_prefix(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="Emulated testbed of heterogeneous devices (root only).")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="train once on the testbed")
    run_parser.add_argument("--instance", type=instance_name, help=INSTANCE_HELP)
    run_parser.add_argument("--devices", type=positive_int, default=8)
    run_parser.add_argument("--spec", type=Path, help="JSON testbed spec instead of the default classes")
    run_parser.add_argument(
        "--medium",
        choices=MEDIA,
        default="wired",
        help="wired: tbf shares bytes (caps plus a shared capacity); wifi: an airtime relay, 802.11's rule",
    )
    run_parser.add_argument(
        "--contention",
        choices=CONTENTION_MODES,
        default="dcf",
        help="wifi: dcf, stations that send at once contend as 802.11 DCF has them (random backoff, "
        "collisions); none, they take turns without collisions",
    )
    run_parser.add_argument(
        "--planner-medium",
        choices=MEDIUM_CHOICES,
        default="auto",
        help="the server's --medium: how cpsl --auto models the medium (default: decided from probes)",
    )
    run_parser.add_argument(
        "--fleet",
        choices=sorted(FLEETS),
        default="default",
        help="default: LeNet-5 on CPU classes 0.30/0.15/0.08 of a core; heavy: WideNet on 0.15/0.08/0.05; "
        "wide: WideNet on 0.50/0.16/0.05 with uplinks of 20/6.3/2 Mbit/s",
    )
    run_parser.add_argument("--model", choices=sorted(BUILTIN_MODELS), help="train this built-in model instead")
    run_parser.add_argument("--scheme", choices=("cpsl", "sl", "sfl", "fl"), default="cpsl")
    run_parser.add_argument("--auto", action=argparse.BooleanOptionalAction, default=None)
    run_parser.add_argument("--random-clusters", action="store_true", help="cpsl: clusters drawn at random")
    run_parser.add_argument(
        "--slots", action=argparse.BooleanOptionalAction, default=True, help="cpsl --auto: the server's --slots"
    )
    run_parser.add_argument(
        "--iteration-flow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cpsl --auto: the server's --iteration-flow",
    )
    run_parser.add_argument("--cut")
    run_parser.add_argument("--clusters", type=positive_int, default=2)
    run_parser.add_argument("--rounds", type=positive_int, default=30)
    run_parser.add_argument("--target-accuracy", type=float, default=0.9)
    run_parser.add_argument("--local-iterations", type=positive_int, default=20)
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--run-dir", type=Path, default=Path("runs/testbed"))
    run_parser.add_argument(
        "--throttle",
        action="append",
        default=[],
        metavar="devI:ROUND:MBIT",
        help="after ROUND, cap device I's uplink at MBIT",
    )
    run_parser.add_argument(
        "--drop", action="append", default=[], metavar="devI:ROUND", help="after ROUND, kill device I's agent"
    )
    run_parser.add_argument(
        "--link-down",
        action="append",
        default=[],
        metavar="devI:ROUND:SECONDS",
        help="after ROUND, take device I's link down for SECONDS, then back up",
    )
    run_parser.add_argument("--compress", type=encoding_name, default="fp32", help="the server's --compress")
    run_parser.add_argument("--compress-gradients", type=encoding_name, help="the server's --compress-gradients")
    run_parser.add_argument(
        "--broker-nagle",
        action="store_true",
        help="leave Nagle's algorithm on the broker's sockets (Mosquitto's default, as the testbed ran before "
        "2026-11-26); by default the broker has set_tcp_nodelay true, as provisioned",
    )
    run_parser.add_argument("--debug", action="store_true")
    cleanup = sub.add_parser("cleanup", help="remove cpsl-* namespaces and cgroups left by a killed run")
    cleanup.add_argument("--instance", type=instance_name, help=INSTANCE_HELP)
    cleanup.add_argument("--debug", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s testbed %(message)s")
    if args.command == "cleanup":
        namespaces, groups = remove_leftovers(instance_prefix(args.instance))
        print(f"removed {namespaces} namespaces and {groups} CPU groups")
        return 0
    require_root()
    if args.spec:
        spec = load_spec(args.spec, args.medium, args.contention)
    else:
        spec = default_spec(args.devices, medium=args.medium, fleet=args.fleet, contention=args.contention)
    if args.throttle and spec.medium != "wired":
        raise UserError("--throttle needs --medium wired (the wifi relay's rates are fixed per run)")
    count = len(spec.devices)
    events = (
        [Event.parse("throttle", t, count) for t in args.throttle]
        + [Event.parse("drop", d, count) for d in args.drop]
        + [Event.parse("down", d, count) for d in args.link_down]
    )
    run_spec = RunSpec(
        scheme=args.scheme,
        auto=args.auto,
        random_clusters=args.random_clusters,
        cut=args.cut,
        clusters=args.clusters,
        rounds=args.rounds,
        target_accuracy=args.target_accuracy,
        local_iterations=args.local_iterations,
        seed=args.seed,
        events=events,
        planner_medium=args.planner_medium,
        slots=args.slots,
        iteration_flow=args.iteration_flow,
        model=args.model or FLEETS[args.fleet][1],
        compress=args.compress,
        compress_gradients=args.compress_gradients,
        broker_nodelay=not args.broker_nagle,
    )
    testbed = Testbed(spec, prefix=instance_prefix(args.instance))
    try:
        testbed.create()
        profiles = profile_devices(testbed, args.run_dir / "profiles", run_spec.batch_size, run_spec.model)
        records = run(testbed, run_spec, args.run_dir, profiles)
    except (RuntimeError, OSError) as exc:
        raise UserError(f"testbed run failed: {exc}") from exc
    finally:
        testbed.destroy()
    for record in records:
        predicted = record.get("predicted_latency_s")
        extra = f", predicted {predicted:.2f} s" if predicted else ""
        print(
            f"round {record['round']:3d}: accuracy {record['accuracy']:.2%}, latency {record['latency_s']:.2f} s"
            f"{extra}, cut {record['cut_name']}, clusters {record['clusters']}"
        )
    print(f"metrics in {args.run_dir / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
