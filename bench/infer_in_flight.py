"""Benchmark: one board's throughput with `cpsl-infer run --in-flight N` against one request at a time.

The demo's trained LeNet-5 (``edge_server demo`` is run first if ``--run-dir`` has no model),
its heads exported, served by ``edge_server serve`` on a local Mosquitto (``set_tcp_nodelay
true``); ``cpsl-infer run --cut pool1 --batch 1`` classifies ``--limit`` test digits of
builtin:mnist5k with 1 request in flight and with ``--in-flight``, alternating, ``--repeats``
times each. Reported: inputs per second and the median latency of an input, each the median
over the runs. Board, broker and service share this machine's cores, so the overlap the
pipeline buys is what is left after they compete.

    python bench/infer_in_flight.py [--in-flight 4] [--limit 400] [--repeats 3] [--out bench/results/infer_in_flight]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-dir", type=Path, default=Path(tempfile.gettempdir()) / "cpsl-infer-in-flight" / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "infer_in_flight")
    args = parser.parse_args()

    from toolkit.transport.mosquitto import MosquittoProcess

    python = sys.executable
    if not (args.run_dir / "model.pt").exists():
        subprocess.run([python, "-m", "edge_server", "demo", "--run-dir", str(args.run_dir)], check=True)
    heads = args.run_dir / "heads"
    if not (heads / "heads.json").exists():
        subprocess.run([python, "-m", "edge_server", "export-heads", str(args.run_dir)], check=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    work = args.run_dir.parent
    config = work / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
    broker_url = f"mqtt://127.0.0.1:{port}"
    broker = MosquittoProcess(config, port).start()
    serve = subprocess.Popen(
        [python, "-m", "edge_server", "serve", str(args.run_dir), "--broker", broker_url, "--service", "bench"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    runs: dict[int, list[dict]] = {1: [], args.in_flight: []}
    try:
        for line in serve.stdout:
            if line.startswith("serving "):
                break
        for repeat in range(args.repeats):
            for in_flight in (1, args.in_flight):
                report = work / f"run-{in_flight}-{repeat}.json"
                command = [
                    *(python, "-m", "firmware_agent.infer_cli", "run", "--heads", str(heads)),
                    *("--broker", broker_url, "--service", "bench", "--device-id", "dev0", "--cut", "pool1"),
                    *("--data", "builtin:mnist5k", "--limit", str(args.limit), "--in-flight", str(in_flight)),
                    *("--json", str(report)),
                ]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                result = json.loads(report.read_text())["run"]
                runs[in_flight].append(result)
                print(
                    f"repeat {repeat + 1}, {in_flight} in flight: {result['throughput_per_s']:.1f} inputs/s, "
                    f"median latency {1e3 * result['latency_median_s']:.2f} ms, fallbacks {result['fallbacks']}",
                    flush=True,
                )
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        broker.stop()
    summary = {
        str(n): {
            "inputs_per_s": statistics.median(r["throughput_per_s"] for r in results),
            "latency_median_ms": 1e3 * statistics.median(r["latency_median_s"] for r in results),
        }
        for n, results in runs.items()
    }
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"limit": args.limit, "runs": {str(n): r for n, r in runs.items()}, "median": summary}
    (args.out / "infer_in_flight.json").write_text(json.dumps(document, indent=1))
    command = (
        f"python bench/infer_in_flight.py --in-flight {args.in_flight} --limit {args.limit} --repeats {args.repeats}"
    )
    lines = [
        f"`{command}`: LeNet-5 cut after pool1, batch 1, {args.limit} digits; median of {args.repeats} runs each.",
        "",
        "| in flight | inputs/s | median latency |",
        "|---|---|---|",
    ]
    for n, row in summary.items():
        lines.append(f"| {n} | {row['inputs_per_s']:.1f} | {row['latency_median_ms']:.2f} ms |")
    (args.out / "infer_in_flight.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
