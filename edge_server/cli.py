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
from toolkit.cli.common import OneLineArgumentParser, positive_int, run_cli
from toolkit.data import load_dataset
from toolkit.models import load_model
from toolkit.protocol.topics import check_id
from toolkit.transport import parse_broker_url

PROG = "edge_server"


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def add_training_flags(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--scheme", choices=SCHEMES, default=defaults.get("scheme", "cpsl"))
    parser.add_argument("--rounds", type=positive_int, default=defaults.get("rounds", 10))
    parser.add_argument("--clusters", type=positive_int, default=2, help="clusters per round (cpsl)")
    parser.add_argument("--cut", default="pool2", help="cut layer, by name or index (not used by fl)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--local-iterations", type=positive_int, default=20, help="iterations per cluster turn")
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="data split, partitions and initial weights")
    parser.add_argument("--run-dir", type=Path, default=defaults.get("run_dir"))
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
    parser = OneLineArgumentParser(prog=f"{PROG} demo", description="Start a broker, N agents and the server on "
                                   "this machine, and train LeNet-5 on builtin:mnist5k.")  # fmt: skip
    parser.add_argument("--devices", type=positive_int, default=4)
    parser.add_argument("--non-iid", default="dirichlet:0.5")
    parser.add_argument("--broker", help="use this broker instead of the embedded one")
    add_training_flags(parser, {"rounds": 12, "run_dir": Path("runs/demo")})
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
    cut = None if args.scheme == "fl" else model.cut_index(args.cut)
    run_dir = args.run_dir or Path("runs") / (run_id or time.strftime("run-%Y%m%d-%H%M%S"))
    return ServerConfig(broker=broker, scheme=args.scheme, rounds=args.rounds, min_devices=min_devices,
                        batch_size=args.batch_size, iterations=args.local_iterations, lr=args.lr,
                        momentum=args.momentum, clusters=args.clusters, cut=cut, run_dir=run_dir, run_id=run_id,
                        data_seed=args.seed, iteration_timeout_s=args.timeout)  # fmt: skip


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
    console.print(f"run {server.run_id}: final accuracy {history[-1]['accuracy']:.2%}; "
                  f"metrics, checkpoint and model (state dict + ONNX) in {config.run_dir}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
