"""``edge_server export-heads`` and ``edge_server serve``: a trained run put to work (split inference).

edge_server export-heads RUN_DIR [--out DIR]          the device-side heads, one ONNX per cut
edge_server serve RUN_DIR --broker URL [--bundle DIR] the server side, for cpsl-infer on the boards
"""

from __future__ import annotations

import argparse
import logging
import signal
import statistics
import threading
from pathlib import Path

from toolkit.cli.common import listen_address, positive_float, positive_int
from toolkit.cli.connection import add_broker_flags, broker_from_args
from toolkit.devices import device_name, resolve_device

log = logging.getLogger("cpsl.serve")


def add_inference_commands(commands) -> None:
    export = commands.add_parser(
        "export-heads",
        help="a trained run's device-side heads as ONNX files, for cpsl-infer",
        description="Export the device-side part of RUN_DIR's trained model at every cut (the last: the whole "
        "model) as ONNX files, each checked against torch, with heads.json tying them to the weights.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--out", type=Path, help="folder to write (default RUN_DIR/heads)")
    export.add_argument("--threads", type=positive_int, default=1, help="onnxruntime threads for the check")
    export.add_argument("--model", help="FILE.py:FUNCTION, when the run trained a model of your own code")
    serve = commands.add_parser(
        "serve",
        help="serve a trained run's server side to cpsl-infer (split inference)",
        description="Answer split-inference requests from cpsl-infer with RUN_DIR's trained model, until Ctrl-C.",
    )
    serve.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    serve.add_argument("--model", help="FILE.py:FUNCTION, when the run trained a model of your own code")
    add_broker_flags(serve)
    serve.add_argument("--service", help="the service's name, which devices give as --service (default: the run id)")
    serve.add_argument("--threads", type=positive_int, default=1, help="torch threads for the server's part")
    serve.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="where the server's part runs: cpu (default), cuda, cuda:N, or auto (as edge_server --device)",
    )
    serve.add_argument("--max-batch", type=positive_int, default=256, help="the largest batch a request may carry")
    serve.add_argument(
        "--metrics-port",
        type=listen_address,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics (edge_server/serve_metrics.py) on this port (loopback unless HOST is given)",
    )
    serve.add_argument(
        "--no-batching",
        action="store_true",
        help="answer requests one at a time (default: those waiting together go through the model as one batch)",
    )
    serve.add_argument(
        "--no-raw-inputs", action="store_true", help="refuse cut 0 (raw inputs from the device), whatever devices allow"
    )
    serve.add_argument("--duration", type=positive_float, help="stop after this many seconds (default: until stopped)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_export_heads(args: argparse.Namespace) -> int:
    from edge_server.serve import load_trained
    from toolkit.inference.heads import export_heads

    model, run_id = load_trained(args.run_dir, args.model)
    out = args.out or args.run_dir / "heads"
    manifest = export_heads(
        model, out, run_id, threads=args.threads, on_step=lambda text: print(f"  exporting {text}", flush=True)
    )
    size = sum((out / entry.file).stat().st_size for entry in manifest.heads)
    print(
        f"wrote {len(manifest.heads)} heads of {model.name} ({size / 1e6:.1f} MB) and heads.json to {out}; "
        f"weights {manifest.weights[:12]}...: copy the folder to the boards (cpsl-infer --heads DIR)"
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from edge_server.serve import ServeConfig, TailService, load_trained

    logging.basicConfig(level=args.log_level, format="%(asctime)s serve %(levelname)s %(message)s")
    broker = broker_from_args(args)
    resolve_device(args.device)  # a device torch cannot use is one line before the model loads
    model, run_id = load_trained(args.run_dir, args.model)
    config = ServeConfig(
        broker=broker,
        run_dir=args.run_dir,
        service=args.service or "",
        threads=args.threads,
        max_batch=args.max_batch,
        raw_inputs=not args.no_raw_inputs,
        device=args.device,
        batching=not args.no_batching,
    )
    import torch

    torch.set_num_threads(args.threads)
    service = TailService(config, model, run_id)
    metrics = None
    if args.metrics_port is not None:
        from edge_server.serve_metrics import ServiceMetrics

        metrics = ServiceMetrics(service)
        metrics.serve(*args.metrics_port)  # a port in use is one line before anything is measured
        print(f"Prometheus metrics at http://{args.metrics_port[0]}:{metrics.port}/metrics", flush=True)
    print(f"measuring the server's part of {model.name} at {len(service.cuts)} cuts on {service.placement}", flush=True)
    service.measure_tails()
    service.start()
    stop = threading.Event()

    def on_signal(signum, frame) -> None:  # SIGTERM (systemd, the testbed) ends it like Ctrl-C
        stop.set()
        service.stop()

    previous = signal.signal(signal.SIGTERM, on_signal)
    print(f"serving {model.name} of run {run_id} as service {service.service!r} at {broker.url}", flush=True)
    try:
        service.serve(args.duration, on_progress=_progress)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.close()
        if metrics is not None:
            metrics.close()
    print(_summary(service), flush=True)
    return 0


def _progress(service) -> None:
    log.info(_summary(service))


def _summary(service) -> str:
    served = sum(service.served.values())
    cuts = ", ".join(f"cut {cut}: {count}" for cut, count in sorted(service.served.items())) or "none"
    timing = f"; median {statistics.median(service.server_s) * 1e3:.2f} ms each" if service.server_s else ""
    merged = f" in {service.forwards} batches" if service.forwards < served else ""
    return f"{served} requests answered{merged} ({service.samples} inputs; {cuts}{timing}), {service.refused} refused"
