"""``edge_server``: train across registered devices; ``edge_server demo``: everything on this machine.

    edge_server --broker mqtt://HOST:PORT --model lenet5 --data builtin:mnist5k --scheme cpsl \\
        --rounds 10 --min-devices 4 [--clusters 2] [--cut pool2] [--run-dir runs/x]
    edge_server demo [--devices 4] [--scheme cpsl] [--rounds 8] [--run-dir runs/demo] [--broker URL]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.live import Live

from edge_server.display import make_console, rounds_table
from edge_server.scheduler import SCHEMES
from edge_server.server import EdgeServer, ServerConfig
from toolkit.allocator import pin_malloc_thresholds
from toolkit.cli.common import OneLineArgumentParser, positive_float, positive_int, run_cli
from toolkit.data import load_dataset
from toolkit.errors import UserError
from toolkit.models import load_model
from toolkit.protocol.topics import check_id
from toolkit.transport import parse_broker_url

PROG = "edge_server"


def add_training_flags(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--scheme", choices=SCHEMES, default=defaults.get("scheme", "cpsl"))
    parser.add_argument("--rounds", type=positive_int, default=defaults.get("rounds", 10))
    parser.add_argument(
        "--clusters", type=positive_int, default=2, help="clusters per round (cpsl; with --auto, the fewest)"
    )
    parser.add_argument("--cut", help="cut layer, by name or index (default: chosen live with --auto, else pool2)")
    parser.add_argument(
        "--auto",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cpsl: probe the links, choose cut, clusters and upload slots live (default for cpsl)",
    )
    parser.add_argument("--max-cluster-size", type=positive_int, help="--auto: most devices trained in parallel")
    parser.add_argument(
        "--random-clusters", action="store_true", help="--no-auto cpsl: draw the clusters at random every round"
    )
    parser.add_argument("--server-profile", type=Path, help="--auto: this server's cpsl-profile of the model")
    parser.add_argument("--reselect-every", type=positive_int, default=10, help="--auto: rounds between cut choices")
    parser.add_argument(
        "--drift-threshold",
        type=positive_float,
        default=0.3,
        help="--auto: estimated-state drift (log) that forces a new cut choice",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--local-iterations", type=positive_int, default=20, help="iterations per cluster turn")
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="data split, partitions and initial weights")
    parser.add_argument("--run-dir", type=Path, default=defaults.get("run_dir"))
    parser.add_argument("--target-accuracy", type=positive_float, help="stop once test accuracy reaches it (0-1)")
    parser.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait for a device")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--debug", action="store_true")


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="CPSL edge server (see also: edge_server demo --help)")
    parser.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--data", default="builtin:mnist5k")
    parser.add_argument("--min-devices", type=positive_int, required=True)
    parser.add_argument("--wait-devices", type=positive_float, default=120.0, help="seconds to wait for them")
    parser.add_argument("--run-id", help="name of this run (default: run-DATE-TIME-XXXX)")
    add_training_flags(parser, {"run_dir": None})
    return parser


def build_demo_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=f"{PROG} demo",
        description="Start a broker, N agents and the server on this machine, and train LeNet-5 on builtin:mnist5k.",
    )
    parser.add_argument("--devices", type=positive_int, default=4)
    parser.add_argument("--non-iid", default="dirichlet:0.5")
    parser.add_argument("--broker", help="use this broker instead of the embedded one")
    add_training_flags(parser, {"rounds": 15, "run_dir": Path("runs/demo")})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from edge_server.demo import run_demo

        return run_demo(build_demo_parser().parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s server %(levelname)s %(message)s")
    broker = parse_broker_url(args.broker)
    if args.run_id:
        check_id(args.run_id, "run id")
    model = load_model(args.model, seed=args.seed)
    data = load_dataset(args.data, args.seed)
    config = make_config(args, broker, model, args.min_devices, args.run_id or "")
    config.register_timeout_s = args.wait_devices
    return train(config, model, data)


def make_config(args: argparse.Namespace, broker, model, min_devices: int, run_id: str) -> ServerConfig:
    auto = args.scheme == "cpsl" if args.auto is None else args.auto
    if auto and args.scheme != "cpsl":
        raise UserError(f"--auto manages cpsl only; scheme {args.scheme} runs as configured (drop --auto)")
    if args.random_clusters and (auto or args.scheme != "cpsl"):
        raise UserError("--random-clusters is for cpsl with --no-auto")
    if args.target_accuracy is not None and args.target_accuracy > 1:
        raise UserError(f"--target-accuracy {args.target_accuracy:g} is a fraction: give a number in (0, 1]")
    if args.scheme == "fl":
        cut = None
    elif auto:
        cut = model.cut_index(args.cut) if args.cut else None  # None: chosen live
    else:
        cut = model.cut_index(args.cut or "pool2")
    run_dir = args.run_dir or Path("runs") / (run_id or time.strftime("run-%Y%m%d-%H%M%S"))
    return ServerConfig(
        broker=broker,
        scheme=args.scheme,
        rounds=args.rounds,
        min_devices=min_devices,
        batch_size=args.batch_size,
        iterations=args.local_iterations,
        lr=args.lr,
        momentum=args.momentum,
        clusters=args.clusters,
        cut=cut,
        run_dir=run_dir,
        run_id=run_id,
        data_seed=args.seed,
        iteration_timeout_s=args.timeout,
        auto=auto,
        max_cluster_size=args.max_cluster_size,
        server_profile=args.server_profile,
        reselect_every=args.reselect_every,
        drift_threshold=args.drift_threshold,
        random_clusters=args.random_clusters,
        target_accuracy=args.target_accuracy,
    )


def train(config: ServerConfig, model, data) -> int:
    pin_malloc_thresholds()
    console = make_console()
    history: list[dict] = []
    title = f"{config.scheme} · {model.name} · {config.rounds} rounds · run dir {config.run_dir}"
    with Live(rounds_table(history, title + " (waiting for devices)"), console=console, refresh_per_second=4) as live:

        def show(record: dict) -> None:
            history.append(record)
            live.update(rounds_table(history, title))

        server = EdgeServer(config, model, data, on_round=show)
        server.run()
    console.print()
    console.print(
        f"run {server.run_id}: final accuracy {history[-1]['accuracy']:.2%}; "
        f"metrics, checkpoint and model (state dict + ONNX) in {config.run_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
