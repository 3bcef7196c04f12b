"""``cpsl-profile``: measure a model on this device and write its profile, ONNX submodels, table and plot.

Thin by design: it parses flags, checks that outputs are writable before the
(minutes-long) measurement starts, and hands over to ``toolkit.profiler``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from toolkit.cli.common import (
    OneLineArgumentParser,
    ensure_writable_dir,
    ensure_writable_file,
    non_negative_int,
    parse_shape,
    positive_int,
    progress_bar,
    run_cli,
)
from toolkit.devices import device_name, resolve_device
from toolkit.errors import UserError
from toolkit.models import BUILTIN_MODELS, load_model
from toolkit.profile_format import load_profile, save_profile
from toolkit.profiler.plot import plot_sl_vs_fl
from toolkit.profiler.report import print_report
from toolkit.profiler.runner import OPTIMIZERS, ProfileRequest, run_profile

PROG = "cpsl-profile"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG,
        description="Measure per-layer and per-cut training latency and memory of a model on this device, "
        "export the device-side submodel of every cut to ONNX, and write a device profile.",
    )
    parser.add_argument(
        "--model", help=f"built-in ({', '.join(BUILTIN_MODELS)}), package.module:function or path/to/file.py:function"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        action="append",
        dest="batch_sizes",
        help="batch size to measure; repeat for several",
    )
    parser.add_argument("--input-shape", type=parse_shape, help="C,H,W of one sample (default: the model's own)")
    parser.add_argument("--num-classes", type=positive_int, default=10)
    parser.add_argument("--out", type=Path, help="profile JSON to write")
    parser.add_argument("--onnx-dir", type=Path, help="folder for the device-side ONNX files (default: beside --out)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and inference timing")
    parser.add_argument("--device-id", help="name of this device in the fleet (default: host name)")
    parser.add_argument("--threads", type=positive_int, help="torch and onnxruntime threads (default: torch's)")
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed repeats per measurement")
    parser.add_argument("--warmup", type=non_negative_int, default=5, help="untimed repeats before them")
    parser.add_argument(
        "--passes",
        type=positive_int,
        default=3,
        help="interleaved passes the repeats are split over (robust to bursts of interference)",
    )
    parser.add_argument("--cuts", help="comma-separated cuts to profile, by index or layer name (default: all)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="where to measure: cpu (default), cuda, cuda:N or auto -- where the agent will train (its --device)",
    )
    parser.add_argument("--cuda", action="store_true", help="the same as --device cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="draw SL per cut against FL to this PNG or SVG")
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=1250,
        help="local samples per device for --plot (default 1250: mnist5k over 4 devices)",
    )
    parser.add_argument("--show", type=Path, metavar="PROFILE", help="print (and --plot) an existing profile")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze tables into 80 columns
        console = Console(width=140)
    if args.plot is not None:
        if args.plot.suffix.lower() not in {".png", ".svg", ".pdf"}:
            raise UserError(f"--plot {args.plot}: the file name must end in .png, .svg or .pdf")
        ensure_writable_file(args.plot, "plot")
    if args.show is not None:
        profile = load_profile(args.show)
        print_report(profile, console)
        if args.plot is not None:
            plot_sl_vs_fl(profile, args.plot, args.samples)
            console.print(f"plot: {args.plot}")
        return 0

    missing = [
        flag
        for flag, value in (("--model", args.model), ("--batch-size", args.batch_sizes), ("--out", args.out))
        if not value
    ]
    if missing:
        parser.error(f"missing {', '.join(missing)}")
    ensure_writable_file(args.out, "profile")
    onnx_dir = None if args.no_onnx else (args.onnx_dir or args.out.parent / "onnx")
    if onnx_dir is not None:
        if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
            raise UserError(
                "the ONNX export needs onnx and onnxruntime: pip install 'cpsl-edge[onnx]', or profile with --no-onnx"
            )
        ensure_writable_dir(onnx_dir, "ONNX folder")

    if args.cuda and args.device not in ("cpu", "cuda"):
        parser.error(f"--cuda and --device {args.device} disagree: give one")
    device = resolve_device("cuda" if args.cuda else args.device)
    model = load_model(args.model, input_shape=args.input_shape, num_classes=args.num_classes, seed=args.seed)
    cuts = [model.cut_index(part.strip()) for part in args.cuts.split(",")] if args.cuts else None
    request = ProfileRequest(
        model=model,
        batch_sizes=list(dict.fromkeys(args.batch_sizes)),
        repeats=args.repeats,
        warmup=args.warmup,
        passes=min(args.passes, args.repeats),
        threads=args.threads,
        device_id=args.device_id,
        onnx_dir=onnx_dir,
        profile_dir=args.out.parent,
        cuts=cuts,
        device=device,
        optimizer=args.optimizer,
        seed=args.seed,
    )
    with progress_bar(console, 40) as progress:
        task = progress.add_task("starting", total=request.planned_steps())

        def advance(description: str) -> None:
            progress.update(task, advance=1, description=description)

        profile = run_profile(request, advance)
    save_profile(profile, args.out)
    print_report(profile, console)
    for note in request.notes:
        console.print(f"[yellow]note:[/] {note}")
    if args.plot is not None:
        plot_sl_vs_fl(profile, args.plot, args.samples, request.batch_sizes[0])
        console.print(f"plot: {args.plot}")
    console.print(f"profile: {args.out}" + (f"   ONNX files: {onnx_dir}" if onnx_dir else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
