"""``cpsl-infer``: split inference on a board with the heads of a trained run.

    cpsl-infer plan --heads DIR --service NAME --broker URL [--bundle DIR] --device-id ID
    cpsl-infer run  --heads DIR ... --data builtin:mnist5k | --inputs FILE.npy [--cut auto] [--out FILE.jsonl]
    cpsl-infer sweep --heads DIR ... [--requests 20]     every candidate cut measured, against the plan

``plan`` measures the heads here, asks the service what it serves, probes the link with a
few real requests and prints the predicted latency of every candidate cut (the chosen one
marked). ``run`` does the same, then classifies the inputs, re-choosing the cut every
``--replan-every`` requests, and prints accuracy (when the inputs have labels), latency per
request and per sample, throughput, and where each batch was cut. ``sweep`` checks the plan
here: it runs a few requests at every candidate cut and reports each one's measured latency
beside its prediction, and how much slower the chosen cut is than the best measured. Any
flag may come from a ``--config`` TOML file, as for cpsl-agent.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from toolkit.cli.common import (
    OneLineArgumentParser,
    encoding_name,
    ensure_writable_file,
    positive_float,
    positive_int,
    progress_bar,
    run_cli,
)
from toolkit.cli.connection import add_broker_flags, apply_config_file, broker_from_args
from toolkit.errors import UserError
from toolkit.files import write_atomically
from toolkit.protocol.topics import check_id

PROG = "cpsl-infer"
MAX_INPUT_BYTES = 2 << 30  # an --inputs file


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="Split inference with a trained run's ONNX heads.")
    commands = parser.add_subparsers(dest="command", metavar="{plan,run,sweep}", parser_class=OneLineArgumentParser)
    commands.required = True
    plan = commands.add_parser("plan", help="measure, probe, and print the predicted latency of every cut")
    run = commands.add_parser("run", help="classify local inputs at the best cut")
    sweep = commands.add_parser("sweep", help="measure every candidate cut for real, against the plan")
    for sub in (plan, run, sweep):
        sub.add_argument("--config", type=Path, help="TOML file of settings (any long flag)")
        add_broker_flags(sub)
        sub.add_argument("--device-id", required=False, help="this device's id (with TLS: its certificate's name)")
        sub.add_argument("--heads", type=Path, help="folder from `edge_server export-heads` (heads.json + ONNX)")
        sub.add_argument("--service", help="the inference service's name (edge_server serve; default the run id)")
        sub.add_argument("--batch", type=positive_int, default=1, help="inputs per request (default 1)")
        sub.add_argument(
            "--compress",
            type=encoding_name,
            default="fp16",
            help="encoding of the activations sent (fp32, fp16, int8, each +zstd; default fp16)",
        )
        sub.add_argument(
            "--allow-raw-inputs",
            action="store_true",
            help="let the cut choice send raw inputs (cut 0, the whole model on the server); off by default",
        )
        sub.add_argument(
            "--timeout", type=positive_float, default=10.0, help="seconds to wait for the broker, the service, a reply"
        )
        sub.add_argument("--threads", type=positive_int, default=1, help="onnxruntime threads")
        sub.add_argument("--json", type=Path, help="write the plan (and the run's summary) to this JSON file")
        sub.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        sub.add_argument("--debug", action="store_true")
    for sub in (run, sweep):
        sub.add_argument("--data", help="labelled inputs: a dataset spec (builtin:mnist5k, idx:DIR, folder:DIR)")
        sub.add_argument("--split", choices=["test", "train"], default="test", help="which part of --data")
        sub.add_argument("--inputs", type=Path, help="unlabelled inputs: a .npy float32 array [N, *input shape]")
        sub.add_argument("--limit", type=positive_int, help="use the first N inputs only")
    sweep.add_argument("--requests", type=positive_int, default=20, help="requests timed at each cut (default 20)")
    run.add_argument("--cut", default="auto", help="auto (default), device, server, or a cut number or layer name")
    run.add_argument("--replan-every", type=positive_int, default=50, help="requests between cut choices")
    run.add_argument(
        "--in-flight",
        type=positive_int,
        default=1,
        help="requests out at once (default 1): with 2 or more the next batch's head runs while the service "
        "answers the previous ones -- more inputs per second, each answered later",
    )
    run.add_argument("--out", type=Path, help="one JSON line per input: index, class, label, cut, latency")
    parser.set_defaults(_commands={"plan": plan, "run": run, "sweep": sweep})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    from firmware_agent.infer import InferConfig, InferenceClient
    from toolkit.inference.heads import HeadSet

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ("plan", "run", "sweep"):  # --config fills the subcommand's defaults
        apply_config_file(parser.get_default("_commands")[argv[0]], argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s infer %(levelname)s %(message)s")
    for flag in ("device_id", "heads"):
        if getattr(args, flag) is None:
            raise UserError(f"--{flag.replace('_', '-')} is required")
    check_id(args.device_id, "device id")
    heads = HeadSet.open(args.heads, threads=args.threads)
    service = check_id(args.service or heads.manifest.run, "service name")
    inputs, labels = (None, None)
    if args.command == "run" or (args.command == "sweep" and (args.data or args.inputs)):
        inputs, labels = _inputs(args, heads)
    if getattr(args, "out", None) is not None:
        ensure_writable_file(args.out, "--out")
    if args.json is not None:
        ensure_writable_file(args.json, "--json")
    config = InferConfig(
        broker=broker_from_args(args),
        device_id=args.device_id,
        service=service,
        batch_size=args.batch,
        encoding=args.compress,
        allow_raw_inputs=args.allow_raw_inputs,
        timeout_s=args.timeout,
        connect_timeout_s=args.timeout,
        threads=args.threads,
        replan_every=getattr(args, "replan_every", 50),
    )
    client = InferenceClient(config, heads)
    sample = _calibration_batch(inputs, heads, args.batch)
    try:
        usable = client.connect()
        state = "online" if usable else f"not used ({client.service_problem()}): the whole model runs here"
        print(f"service {service}: {state}", file=sys.stderr)
        client.measure(sample)
        client.calibrate(sample)
        client.confirm(sample)
        choice = client.plan()
        report = {"plan": _plan_report(client, choice)}
        _print_plan(report["plan"])
        if args.command == "run":
            cut = _forced_cut(args.cut, client)
            report["run"] = _classify(client, inputs, labels, args, cut)
            _print_summary(report["run"])
        elif args.command == "sweep":
            report["sweep"] = _sweep(client, inputs if inputs is not None else sample, args.requests, report["plan"])
            _print_sweep(report["sweep"])
    finally:
        client.close()
    if args.json is not None:
        write_atomically(args.json, json.dumps(report, indent=1))
    return 0


def _inputs(args: argparse.Namespace, heads) -> tuple[np.ndarray, np.ndarray | None]:
    """The inputs to classify, [N, *input shape] float32, and their labels when known."""
    if (args.data is None) == (args.inputs is None):
        raise UserError("give the inputs with --data SPEC (labelled) or --inputs FILE.npy, one of them")
    shape = tuple(heads.manifest.input_shape)
    if args.data is not None:
        from toolkit.data import load_dataset

        data = load_dataset(args.data)
        x, y = (data.test_x, data.test_y) if args.split == "test" else (data.train_x, data.train_y)
        inputs, labels = x.numpy().astype(np.float32, copy=False), y.numpy()
    else:
        inputs, labels = _read_npy(args.inputs), None
    if tuple(inputs.shape[1:]) != shape or inputs.shape[0] == 0:
        raise UserError(f"inputs of shape {list(inputs.shape)}: the model takes [N, {', '.join(map(str, shape))}]")
    if args.limit is not None:
        inputs = inputs[: args.limit]
        labels = labels[: args.limit] if labels is not None else None
    return np.ascontiguousarray(inputs), labels


def _read_npy(path: Path) -> np.ndarray:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UserError(f"cannot read --inputs {path}: {exc.strerror or exc}") from None
    if size > MAX_INPUT_BYTES:
        raise UserError(f"--inputs {path} is more than {MAX_INPUT_BYTES} bytes")
    try:
        array = np.load(path, allow_pickle=False)  # never unpickle: an .npy of numbers only
    except (ValueError, OSError) as exc:
        raise UserError(f"--inputs {path} is not a .npy array of numbers: {str(exc)[:200]}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu" or array.ndim < 2:
        raise UserError(f"--inputs {path} must hold a numeric array [N, *input shape]")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise UserError(f"--inputs {path} holds values that are not finite")
    return array


def _calibration_batch(inputs: np.ndarray | None, heads, batch: int) -> np.ndarray:
    """A batch to time the heads and probe the link with: the first inputs (repeated to fill the
    batch), or, for ``plan`` without inputs, standard-normal values of the input's shape."""
    shape = tuple(heads.manifest.input_shape)
    if inputs is None:
        return np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    picked = inputs[np.arange(batch) % len(inputs)]
    return np.ascontiguousarray(picked)


def _forced_cut(text: str, client) -> int | None:
    """None for auto; otherwise the cut ``--cut`` names, which must be a candidate here."""
    whole = client.whole_model
    if text == "auto":
        return None
    if text == "device":
        return whole
    if text == "server":
        cut = 0
    else:
        from toolkit.models.layered import resolve_cut

        cut = resolve_cut(client.manifest.layer_names, text)
    if cut == 0 and not client.config.allow_raw_inputs:
        raise UserError("--cut server sends the raw inputs: add --allow-raw-inputs")
    if cut not in client.network_cuts():
        problem = client.service_problem()
        if problem:
            raise UserError(f"--cut {text}: the service cannot be used: {problem}")
        raise UserError(f"--cut {text}: cut {cut} is not served, or its head is not in --heads")
    return cut


def _classify(client, inputs: np.ndarray, labels: np.ndarray | None, args: argparse.Namespace, cut: int | None) -> dict:
    batch = args.batch
    starts = range(0, len(inputs), batch)
    latencies, correct, lines = [], 0, []
    began = time.perf_counter()
    with progress_bar(Console(stderr=True)) as progress:
        task = progress.add_task("classifying", total=len(inputs))
        chunks = (inputs[start : start + batch] for start in starts)
        if args.in_flight > 1:
            outcomes = client.infer_stream(chunks, cut, in_flight=args.in_flight)
        else:
            outcomes = (client.infer(chunk, cut) for chunk in chunks)
        for start, outcome in zip(starts, outcomes, strict=True):
            chunk = inputs[start : start + batch]
            predicted = outcome.logits.argmax(axis=1)
            latencies.append(outcome.latency_s)
            if labels is not None:
                correct += int((predicted == labels[start : start + batch]).sum())
            for offset, value in enumerate(predicted.tolist()):
                line = {"index": start + offset, "class": int(value), "cut": outcome.cut}
                if labels is not None:
                    line["label"] = int(labels[start + offset])
                line["latency_s"] = outcome.latency_s
                if outcome.fallback:
                    line["fallback"] = True
                lines.append(line)
            progress.advance(task, len(chunk))
    elapsed = time.perf_counter() - began
    if args.out is not None:
        write_atomically(args.out, "".join(json.dumps(line) + "\n" for line in lines))
    ordered = sorted(latencies)
    counts = client.counts
    return {
        "inputs": len(inputs),
        "batch": batch,
        "requests": len(latencies),
        "accuracy": correct / len(inputs) if labels is not None else None,
        "latency_median_s": statistics.median(latencies),
        "latency_p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "latency_per_sample_s": statistics.median(latencies) / batch,
        "throughput_per_s": len(inputs) / elapsed if elapsed > 0 else None,
        "by_cut": {str(k): v for k, v in sorted(counts.by_cut.items())},
        "fallbacks": counts.fallbacks,
        "service_failures": counts.refusals,
        "forced_cut": cut,
        "in_flight": args.in_flight,
    }


def _plan_report(client, choice) -> dict:
    from firmware_agent.infer import link_summary, predicted_table

    return {
        "service": client.config.service,
        "service_usable": not client.service_problem(),
        "batch": client.config.batch_size,
        "encoding": client.encoding.name,
        "link": link_summary(client),
        "candidates": predicted_table(client),
        "chosen": choice.cut,
        "chosen_predicted_s": choice.predicted_s,
    }


def _ms(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value * 1e3:9.2f}"


def _print_plan(plan: dict) -> None:
    link = plan["link"]
    if link["base_s"] is None:
        rate = "unmeasured"
    else:
        speed = f"{link['up_mbit']:.1f} Mbit/s" if link["up_mbit"] else "bytes free"
        rate = f"base {link['base_s'] * 1e3:.2f} ms, {speed}"
    print(f"batch {plan['batch']}, {plan['encoding']}; link: {rate}")
    columns = ("head ms", "enc ms", "bytes", "server ms", "predicted", "observed")
    print(f"{'cut':>4} {'after':<12} {'where':<6} " + " ".join(f"{name:>9}" for name in columns))
    for row in plan["candidates"]:
        mark = "  <- chosen" if row["cut"] == plan["chosen"] else ""
        print(
            f"{row['cut']:>4} {row['after']:<12} {row['where']:<6} {_ms(row['head_s'])} {_ms(row['encode_s'])} "
            f"{int(row['wire_bytes']):>9} {_ms(row['server_s'])} {_ms(row['predicted_s'])} "
            f"{_ms(row['observed_s'])}{mark}"
        )


def _print_summary(run: dict) -> None:
    accuracy = "" if run["accuracy"] is None else f"accuracy {run['accuracy']:.2%}, "
    cuts = ", ".join(f"cut {k}: {v}" for k, v in run["by_cut"].items())
    print(
        f"{run['inputs']} inputs in {run['requests']} requests: {accuracy}latency median "
        f"{run['latency_median_s'] * 1e3:.2f} ms (p90 {run['latency_p90_s'] * 1e3:.2f} ms), "
        f"{run['throughput_per_s']:.1f} inputs/s; {cuts}"
        + (f"; {run['fallbacks']} answered here after a failed request" if run["fallbacks"] else "")
    )


def _sweep(client, inputs: np.ndarray, requests: int, plan: dict) -> dict:
    """``requests`` batches at every candidate cut, then the plan's choice against the best."""
    batch = client.config.batch_size
    rows = []
    with progress_bar(Console(stderr=True)) as progress:
        task = progress.add_task("sweeping cuts", total=requests * len(plan["candidates"]))
        for candidate in plan["candidates"]:
            cut = candidate["cut"]
            latencies = []
            began = time.perf_counter()
            for index in range(requests):
                start = (index * batch) % max(1, len(inputs) - batch + 1)
                latencies.append(client.infer(inputs[start : start + batch], cut).latency_s)
                progress.advance(task)
            elapsed = time.perf_counter() - began
            ordered = sorted(latencies)
            rows.append(
                {
                    **candidate,
                    "measured_s": statistics.median(latencies),
                    "measured_p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
                    "throughput_per_s": requests * batch / elapsed if elapsed > 0 else None,
                }
            )
    best = min(rows, key=lambda row: row["measured_s"])
    chosen = next(row for row in rows if row["cut"] == plan["chosen"])
    return {
        "batch": batch,
        "requests_per_cut": requests,
        "rows": rows,
        "chosen": chosen["cut"],
        "best": best["cut"],
        "chosen_over_best": chosen["measured_s"] / best["measured_s"] - 1.0,
        "fallbacks": client.counts.fallbacks,
    }


def _print_sweep(sweep: dict) -> None:
    print(f"measured, {sweep['requests_per_cut']} requests of {sweep['batch']} at each cut:")
    for row in sweep["rows"]:
        marks = "  chosen" if row["cut"] == sweep["chosen"] else ""
        marks += "  best" if row["cut"] == sweep["best"] else ""
        print(
            f"{row['cut']:>4} {row['after']:<12} predicted {_ms(row['predicted_s'])} ms  measured "
            f"{_ms(row['measured_s'])} ms  {row['throughput_per_s']:8.1f} inputs/s{marks}"
        )
    print(f"the chosen cut is {sweep['chosen_over_best']:+.1%} against the best measured")


if __name__ == "__main__":
    raise SystemExit(main())
