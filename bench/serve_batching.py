"""Benchmark: `edge_server serve` answering many devices at once, with and without request batching.

N devices send requests back to back to one service at the same cut, each waiting for its
answer before sending the next (as ``cpsl-infer run`` does). With batching (the default) the
requests that queue while the model computes go through it together; ``--no-batching``
answers them one at a time. Reported per setting: requests answered per second (all devices
together) and each request's latency at the device (median and 90th percentile), with the
service's own count of forward passes.

The model is MobileNetV2 (3x32x32) with its seeded initial weights (latency does not depend
on the values), served whole: the devices send raw inputs (cut 0), so the server's work is
what is measured and the devices' is nothing. Everything runs on this machine over a local
Mosquitto with ``set_tcp_nodelay true``; the device processes run at the same time as the
service on the same cores, so this is a conservative setting for batching (on an edge PC the
devices are elsewhere). Settings alternate, ``--repeats`` times each; medians are reported.

    python bench/serve_batching.py [--devices 4] [--requests 40] [--repeats 3] [--out bench/results/serve_batching]

Writes OUT/serve_batching.json and OUT/serve_batching.md.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "mobilenetv2"


def client(args: argparse.Namespace) -> None:
    """One device: connect, wait for the common start, send ``--requests`` raw inputs at cut 0."""
    import numpy as np

    from firmware_agent.infer import InferConfig, InferenceClient
    from toolkit.inference.heads import HeadSet
    from toolkit.transport import parse_broker_url

    heads = HeadSet.open(Path(args.heads))
    config = InferConfig(
        parse_broker_url(args.broker), args.device_id, args.service, allow_raw_inputs=True, timeout_s=60.0
    )
    infer = InferenceClient(config, heads)
    assert infer.connect(), infer.service_problem()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    infer.infer(x, 0, record=False)  # the first request pays one-off costs: not timed
    time.sleep(max(0.0, args.start_at - time.time()))
    began, latencies = time.time(), []
    for _ in range(args.requests):
        outcome = infer.infer(x, 0)
        assert not outcome.fallback, "the service did not answer"
        latencies.append(outcome.latency_s)
    ended = time.time()
    infer.close()
    Path(args.out).write_text(json.dumps({"latencies": latencies, "began": began, "ended": ended}))


def one_setting(
    run_dir: Path, heads: Path, port: int, devices: int, requests: int, batching: bool, folder: Path, repeat: int
) -> dict:
    service = f"{'batching' if batching else 'single'}-{repeat}"  # a fresh name: no retained status of a past run
    broker = f"mqtt://127.0.0.1:{port}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "edge_server", "serve", str(run_dir), "--broker", broker, "--service", service]
        + ([] if batching else ["--no-batching"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in serve.stdout:  # it measures its part at every cut, then announces itself
            if line.startswith("serving "):
                break
        else:
            raise RuntimeError("the service ended before serving")
        start_at = time.time() + 20.0  # every device connected, warmed up and waiting by then
        outs = [folder / f"{service}-{i}.json" for i in range(devices)]
        clients = [
            subprocess.Popen(
                [
                    *(sys.executable, __file__, "client", "--broker", broker, "--heads", str(heads)),
                    *("--service", service, "--device-id", f"dev{i}", "--requests", str(requests)),
                    *("--start-at", str(start_at), "--out", str(outs[i])),
                ]
            )
            for i in range(devices)
        ]
        for process in clients:
            if process.wait(timeout=600) != 0:
                raise RuntimeError("a device failed")
    finally:
        serve.terminate()
        summary = serve.communicate(timeout=60)[0].strip().splitlines()[-1]
    reports = [json.loads(path.read_text()) for path in outs]
    latencies = sorted(x for r in reports for x in r["latencies"])
    late = max(r["began"] for r in reports) - start_at
    if late > 1.0:
        raise RuntimeError(f"a device started {late:.1f} s late: the machine is too busy for this setting")
    wall = max(r["ended"] for r in reports) - min(r["began"] for r in reports)
    return {
        "batching": batching,
        "requests_per_s": len(latencies) / wall,
        "latency_median_ms": 1e3 * statistics.median(latencies),
        "latency_p90_ms": 1e3 * latencies[int(0.9 * (len(latencies) - 1))],
        "service": summary,
    }


def main() -> None:
    if sys.argv[1:2] == ["client"]:
        parser = argparse.ArgumentParser()
        for flag in ("--broker", "--heads", "--service", "--device-id", "--out"):
            parser.add_argument(flag, required=True)
        parser.add_argument("--requests", type=int, required=True)
        parser.add_argument("--start-at", type=float, required=True)
        client(parser.parse_args(sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40, help="per device and run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_batching")
    args = parser.parse_args()

    from bench.inference import export, initial_run
    from toolkit.transport.mosquitto import MosquittoProcess

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.gettempdir()) / "cpsl-serve-batching"  # the model, its heads, the devices' reports
    run_dir = initial_run(work, MODEL)
    heads = export(run_dir)
    with socket.socket() as probe:  # a free loopback port for this run's broker
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = work / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
    broker = MosquittoProcess(config, port)
    broker.start()
    runs: dict[str, list[dict]] = {"batching": [], "single": []}
    try:
        for repeat in range(args.repeats):
            for batching in (True, False):
                result = one_setting(run_dir, heads, port, args.devices, args.requests, batching, work, repeat)
                runs["batching" if batching else "single"].append(result)
                print(
                    f"repeat {repeat + 1} {'batching' if batching else 'one by one'}: "
                    f"{result['requests_per_s']:.1f} requests/s, median {result['latency_median_ms']:.1f} ms, "
                    f"p90 {result['latency_p90_ms']:.1f} ms; service: {result['service']}",
                    flush=True,
                )
    finally:
        broker.stop()
    summary = {
        name: {
            key: statistics.median(r[key] for r in results)
            for key in ("requests_per_s", "latency_median_ms", "latency_p90_ms")
        }
        for name, results in runs.items()
    }
    document = {"devices": args.devices, "requests": args.requests, "model": MODEL, "runs": runs, "median": summary}
    (args.out / "serve_batching.json").write_text(json.dumps(document, indent=1))
    command = (
        f"python bench/serve_batching.py --devices {args.devices} --requests {args.requests} --repeats {args.repeats}"
    )
    lines = [
        f"`{command}`: {args.devices} devices sending raw inputs (cut 0) of {MODEL} back to back, "
        f"{args.requests} requests each; median of {args.repeats} runs per setting, alternating.",
        "",
        "| service | requests/s | latency median | latency p90 |",
        "|---|---|---|---|",
    ]
    for name, label in (("single", "one at a time (--no-batching)"), ("batching", "batching (default)")):
        row = summary[name]
        median, p90 = row["latency_median_ms"], row["latency_p90_ms"]
        lines.append(f"| {label} | {row['requests_per_s']:.1f} | {median:.1f} ms | {p90:.1f} ms |")
    (args.out / "serve_batching.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
