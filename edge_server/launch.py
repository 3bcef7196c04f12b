"""Starting a training run: the flags every way of starting one shares, the config they make, the live view.

Used by ``edge_server`` (a run against an existing broker) and ``edge_server demo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from rich.live import Live

from edge_server.display import make_console, rejections_summary, rounds_table
from edge_server.run_state import RunState, load_state, read_settings
from edge_server.scheduler import SCHEMES
from edge_server.server import EdgeServer, ServerConfig
from edge_server.strategy import METHODS
from toolkit.allocator import pin_malloc_thresholds
from toolkit.cli.common import encoding_name, listen_address, positive_float, positive_int
from toolkit.devices import device_name, resolve_device
from toolkit.errors import UserError
from toolkit.planning.medium import MEDIUM_CHOICES


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def add_training_flags(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument(
        "--metrics-port",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics (edge_server/prometheus.py) on this port (loopback unless HOST is given)",
    )
    parser.add_argument(
        "--dashboard",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="serve the live dashboard on this port (loopback unless HOST is given; elsewhere it needs the "
        "token printed at start)",
    )
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
        "--random-clusters",
        action="store_true",
        help="cpsl: draw the clusters at random every round (with --auto: the cut and slots still planned; "
        "an ablation of what clustering buys)",
    )
    parser.add_argument(
        "--slots",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--auto on air time: grant transmission slots (default); --no-slots lets the devices contend "
        "(an ablation of what slots buy)",
    )
    parser.add_argument(
        "--iteration-flow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--auto with slots: plan each iteration's gradients and the next uploads as one stretch of air, "
        "devices computing while others send (default); --no-iteration-flow: two phases with a barrier",
    )
    parser.add_argument("--server-profile", type=Path, help="--auto: this server's cpsl-profile of the model")
    parser.add_argument("--reselect-every", type=positive_int, default=10, help="--auto: rounds between cut choices")
    parser.add_argument(
        "--drift-threshold",
        type=positive_float,
        default=0.3,
        help="--auto: estimated-state drift (log) that forces a new cut choice",
    )
    parser.add_argument(
        "--medium",
        choices=MEDIUM_CHOICES,
        default="auto",
        help="--auto: the medium the devices share: airtime (slots, one sender at a time: Wi-Fi), shared (bytes "
        "shared, transfers overlap: wired) or auto (decided from probing the devices together; default)",
    )
    parser.add_argument(
        "--compress",
        type=lambda text: "auto" if text == "auto" else encoding_name(text),
        default="fp32",
        metavar="ENC",
        help="how smashed data (and, unless --compress-gradients says otherwise, the gradients) cross the cut: "
        "none (fp32), fp16, int8, each optionally +zstd, or auto (--auto: chosen after the first round within "
        "--compress-budget) (docs/compression.md)",
    )
    parser.add_argument(
        "--compress-budget",
        type=fraction,
        default=0.01,
        metavar="E",
        help="--compress auto: the largest relative RMS error an encoding may add to what crosses the cut "
        "(default 0.01; 0: lossless only)",
    )
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="where the server side trains: cpu (default), cuda, cuda:N, or auto (CUDA when torch sees it); "
        "the device side of the model stays on the CPU (docs/operations.md)",
    )
    parser.add_argument(
        "--compress-gradients", type=encoding_name, metavar="ENC", help="the gradients' encoding (default: --compress)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--local-iterations", type=positive_int, default=20, help="iterations per cluster turn")
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="data split, partitions and initial weights")
    parser.add_argument("--run-dir", type=Path, default=defaults.get("run_dir"))
    parser.add_argument("--target-accuracy", type=positive_float, help="stop once test accuracy reaches it (0-1)")
    parser.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait for a device")
    parser.add_argument(
        "--min-link-mbit",
        type=positive_float,
        default=1.0,
        help="the slowest the medium may carry models, all devices together (Mbit/s, default 1): "
        "phases that move models wait --timeout plus their bytes at this rate",
    )
    parser.add_argument(
        "--norm-factor",
        type=float,
        default=10.0,
        help="reject an upload whose update norm is over this times the median of the cluster's and recent ones "
        "(default 10; 0 turns the check off)",
    )
    parser.add_argument(
        "--aggregate",
        choices=METHODS,
        default="fedavg",
        help="how uploads are combined: fedavg (weighted mean), trimmed-mean, median (coordinate-wise, "
        "every device alike), clipped (updates clipped to the median norm); every method caps a device's "
        "weight at three times the fleet's median registration and rejects norm outliers (docs/security.md)",
    )
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--debug", action="store_true")


def make_config(args: argparse.Namespace, broker, model, min_devices: int, run_id: str) -> ServerConfig:
    auto = args.scheme == "cpsl" if args.auto is None else args.auto
    resolve_device(args.device)  # a device that cannot be used is one line before anything starts
    if auto and args.scheme != "cpsl":
        raise UserError(f"--auto manages cpsl only; scheme {args.scheme} runs as configured (drop --auto)")
    if args.compress == "auto" and not auto:
        raise UserError("--compress auto needs --auto: the encodings are chosen by the plans they make")
    if args.compress == "auto" and args.compress_gradients:
        raise UserError("--compress auto chooses the gradients' encoding too: drop --compress-gradients")
    if args.random_clusters and args.scheme != "cpsl":
        raise UserError("--random-clusters is for cpsl")
    if not auto and not (args.slots and args.iteration_flow):
        raise UserError("--no-slots and --no-iteration-flow are for cpsl --auto (without it there are no slots)")
    if not (args.norm_factor == 0 or args.norm_factor >= 1):
        raise UserError(f"--norm-factor {args.norm_factor:g} must be 0 (off) or at least 1")
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
        min_link_bps=args.min_link_mbit * 1e6,
        auto=auto,
        max_cluster_size=args.max_cluster_size,
        server_profile=args.server_profile,
        reselect_every=args.reselect_every,
        drift_threshold=args.drift_threshold,
        random_clusters=args.random_clusters,
        slots=args.slots,
        iteration_flow=args.iteration_flow,
        norm_factor=args.norm_factor,
        aggregate=args.aggregate,
        target_accuracy=args.target_accuracy,
        medium=args.medium,
        compress_smashed=args.compress,
        compress_gradient=args.compress_gradients or args.compress,
        compress_budget=args.compress_budget,
        device=args.device,
        model_spec=getattr(args, "model", "") or "",
        data_spec=getattr(args, "data", "") or "",
    )


def train(
    config: ServerConfig,
    model,
    data,
    resume: RunState | None = None,
    metrics_address: tuple[str, int] | None = None,
    dashboard_address: tuple[str, int] | None = None,
) -> int:
    pin_malloc_thresholds()
    console = make_console()
    history: list[dict] = []
    title = f"{config.scheme} · {model.name} · {config.rounds} rounds · run dir {config.run_dir}"
    if resume is not None:
        title += f" · resumed after round {resume.round}"
    with Live(rounds_table(history, title + " (waiting for devices)"), console=console, refresh_per_second=4) as live:

        def show(record: dict) -> None:
            history.append(record)
            live.update(rounds_table(history, title))

        server = EdgeServer(config, model, data, on_round=show)
        metrics = None
        if metrics_address is not None:
            from edge_server.prometheus import RunMetrics, chain

            metrics = RunMetrics(server, config.scheme)
            metrics.serve(*metrics_address)
            server.on_round = chain(show, metrics.observe)
            console.print(f"Prometheus metrics at http://{metrics_address[0]}:{metrics.port}/metrics")
        dashboard = _start_dashboard(server, config, model, dashboard_address, console)
        try:
            server.run(resume)
        except BaseException:
            if dashboard is not None:
                dashboard.feed.state = "failed"
            raise
        else:
            if dashboard is not None:
                dashboard.feed.state = "finished"
        finally:
            if dashboard is not None:
                dashboard.close()
            if metrics is not None:
                metrics.close()
    console.print()
    for line in rejections_summary(history[-1]) if history else []:
        console.print(line, style="yellow", markup=False)
    console.print(
        f"run {server.run_id}: final accuracy {history[-1]['accuracy']:.2%}; "
        f"metrics, checkpoint and model (state dict + ONNX) in {config.run_dir}"
    )
    return 0


def _start_dashboard(server: EdgeServer, config: ServerConfig, model, address, console):
    """The live dashboard on ``address`` (None: none), its URL printed; the DashboardServer or None."""
    if address is None:
        return None
    from edge_server.dashboard.feed import LiveFeed
    from edge_server.dashboard.web import DashboardServer

    run = {"id": server.run_id, "scheme": config.scheme, "model": model.name, "rounds_planned": config.rounds}
    dashboard = DashboardServer(LiveFeed(server, run), *address)
    dashboard.start()
    console.print(f"Dashboard at {dashboard.url}", markup=False, highlight=False, soft_wrap=True)
    if dashboard.token:
        console.print("(not a loopback address: the page needs the token in that URL)", style="yellow")
    return dashboard


# what a run folder may set, and within what bounds: it is input, however it was written
RESUME_BOUNDS: dict[str, tuple[float, float]] = {
    "rounds": (1, 1_000_000),
    "min_devices": (1, 100_000),
    "batch_size": (1, 1 << 16),
    "iterations": (1, 1_000_000),
    "lr": (1e-9, 10.0),
    "momentum": (0.0, 0.999),
    "weight_decay": (0.0, 1.0),
    "clusters": (1, 100_000),
    "cut": (1, 100_000),
    "iteration_timeout_s": (0.1, 86_400),
    "register_timeout_s": (0.1, 86_400),
    "heartbeat_timeout_s": (0.1, 86_400),
    "min_link_bps": (1e3, 1e12),
    "reconnect_grace_s": (0.0, 86_400),
    "turn_replays": (0, 100),
    "max_frame_bytes": (1 << 10, 1 << 31),
    "max_cluster_size": (1, 100_000),
    "reselect_every": (1, 1_000_000),
    "drift_threshold": (0.0, 100.0),
    "target_accuracy": (0.0, 1.0),
    # 0 would switch the outlier check off: a run folder cannot turn a defence off
    "norm_factor": (1.0, 1e6),
    "compress_budget": (0.0, 1.0),
    "data_seed": (0, 2**32 - 1),
}


def resumed_config(values: dict, broker, where: str) -> ServerConfig:
    """The run's settings as this version's ServerConfig, every value checked for its type and
    its bounds: one line naming the key, never a traceback."""
    from pydantic import TypeAdapter, ValidationError

    known = {item.name for item in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{where}: unknown setting {unknown[0]!r} (not a setting of this version)")
    try:
        config = TypeAdapter(ServerConfig).validate_python({**values, "broker": broker}, strict=False)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        raise UserError(f"{where}: {key}: {error['msg']}") from None
    if config.aggregate not in METHODS:
        raise UserError(f"{where}: aggregate is {config.aggregate[:40]!r}; choose among {', '.join(METHODS)}")
    if config.scheme not in SCHEMES:
        raise UserError(f"{where}: scheme is {config.scheme[:40]!r}; choose among {', '.join(SCHEMES)}")
    for key, (low, high) in RESUME_BOUNDS.items():
        value = getattr(config, key)
        if value is not None and not low <= value <= high:
            raise UserError(f"{where}: {key} is {value!r}; it must lie between {low:g} and {high:g}")
    return config


def resume_run(
    run_dir: Path,
    broker,
    metrics_address: tuple[str, int] | None = None,
    dashboard_address: tuple[str, int] | None = None,
    model_spec: str | None = None,
) -> int:
    """``edge_server --resume RUN_DIR``: the run's settings from run.json, its state from
    checkpoint.pt; ``broker`` (None: the one the run used) is the only thing given anew."""
    from toolkit.data import load_dataset
    from toolkit.models import load_model
    from toolkit.models.registry import model_to_rebuild

    settings = read_settings(run_dir)
    if not settings.model or not settings.data:
        raise UserError(f"{run_dir} was started without a model or data spec: it cannot be resumed")
    values = dict(settings.config)
    values["run_dir"] = run_dir
    config = resumed_config(values, broker or settings.broker, f"{run_dir}/run.json")
    data = load_dataset(settings.data, settings.seed)
    spec = model_to_rebuild(settings.model, model_spec, f"{run_dir}/run.json")
    model = load_model(spec, input_shape=data.input_shape, num_classes=data.num_classes, seed=settings.seed)
    state = load_state(run_dir, config.run_id, model.fingerprint())
    if state.round + 1 >= config.rounds:
        raise UserError(f"run {config.run_id} already completed its {config.rounds} rounds")
    return train(
        config, model, data, resume=state, metrics_address=metrics_address, dashboard_address=dashboard_address
    )
