"""Benchmark (issue #14, item 4): split inference on the testbed, every cut measured against the plan.

Two emulated device classes, each with its own link, both on a 100 Mbit/s wired medium:

- ``slow-cpu``: 0.15 of a core, 50 Mbit/s each way (a weak board close to the access point);
- ``slow-link``: a whole core, 2 Mbit/s each way (a capable board at the edge of the cell).

Two models: LeNet-5 trained by the demo's CPSL run (``edge_server demo``), and MobileNetV2
(3x32x32, 23 blocks) whose weights are its seeded initial ones -- no 3x32x32 dataset ships
without a download, and latency does not depend on the weights' values. Each model's heads are
exported (``edge_server export-heads``) and served (``edge_server serve``) from the access
point. On each device, for each model and for batches of 1 and 8, ``cpsl-infer sweep`` plans
(heads timed in onnxruntime under the device's CPU quota, link fitted from its own requests)
and then times every candidate cut -- device-only, server-only (``--allow-raw-inputs``) and
every split -- with real requests. Reported: each cut's measured latency per request (median)
and throughput beside its prediction, the chosen cut, the best measured, and the chosen cut's
latency over the best's. Goal: within 10% in every case (median of ``--repeats`` sweeps).

    sudo python bench/inference.py [--requests 15] [--repeats 3] [--out bench/results/inference]

Writes OUT/inference.json, OUT/inference.md (the tables) and docs/figures/inference.png.
Needs root (the testbed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.testbed.topology import AP_ADDRESS, DeviceSpec, Testbed, TestbedSpec, require_root  # noqa: E402

PORT = 1883
DEVICES = (DeviceSpec("slow-cpu", 50.0, 50.0, 0.15), DeviceSpec("slow-link", 2.0, 2.0, 1.0))
MODELS = ("lenet5", "mobilenetv2")
BATCHES = (1, 8)


def trained_lenet(folder: Path) -> Path:
    """A real CPSL run of LeNet-5 (the demo: 4 agents, 5 rounds)."""
    run_dir = folder / "lenet5"
    if not (run_dir / "model.pt").exists():
        command = [sys.executable, "-m", "edge_server", "demo", "--rounds", "5", "--no-dashboard", "--run-dir"]
        subprocess.run([*command, str(run_dir)], check=True, stdout=subprocess.DEVNULL)
    return run_dir


def initial_run(folder: Path, model_name: str) -> Path:
    """A run folder (run.json + model.pt) holding ``model_name``'s seeded initial weights."""
    from edge_server.records import atomic_torch_save
    from edge_server.run_state import SETTINGS_FORMAT
    from toolkit.models import load_model

    run_dir = folder / model_name
    if not (run_dir / "model.pt").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        model = load_model(model_name, seed=0)
        atomic_torch_save(model.net.state_dict(), run_dir / "model.pt")
        settings = {
            "format": SETTINGS_FORMAT,
            "model": model_name,
            "data": "",
            "seed": 0,
            "broker": {"url": "mqtt://127.0.0.1:1883", "tls": None},
            "config": {"run_id": f"bench-{model_name}", "scheme": "cpsl"},
        }
        (run_dir / "run.json").write_text(json.dumps(settings, indent=1))
    return run_dir


def export(run_dir: Path) -> Path:
    if not (run_dir / "heads" / "heads.json").exists():
        subprocess.run(
            [sys.executable, "-m", "edge_server", "export-heads", str(run_dir)], check=True, stdout=subprocess.DEVNULL
        )
    return run_dir / "heads"


def sweep(testbed: Testbed, index: int, heads: Path, service: str, batch: int, requests: int, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "firmware_agent.infer_cli",
        "sweep",
        "--heads",
        str(heads),
        "--broker",
        f"mqtt://{AP_ADDRESS}:{PORT}",
        "--device-id",
        f"d{index}",
        "--service",
        service,
        "--batch",
        str(batch),
        "--requests",
        str(requests),
        "--allow-raw-inputs",
        "--json",
        str(out),
    ]
    if service == "lenet5":
        command += ["--data", "builtin:mnist5k"]
    result = subprocess.run(testbed.device_command(index, command), capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"cpsl-infer sweep on d{index} failed: {result.stderr[-800:]}")
    return json.loads(out.read_text())


def summarize(reports: list[dict]) -> dict:
    """Per cut: median over the repeats of each sweep's median latency; the chosen cut per repeat."""
    cuts = [row["cut"] for row in reports[0]["sweep"]["rows"]]
    rows = []
    for cut in cuts:
        mine = [next(r for r in rep["sweep"]["rows"] if r["cut"] == cut) for rep in reports]
        rows.append(
            {
                "cut": cut,
                "after": mine[0]["after"],
                "where": mine[0]["where"],
                "predicted_s": statistics.median(r["predicted_s"] for r in mine),
                "measured_s": statistics.median(r["measured_s"] for r in mine),
                "throughput_per_s": statistics.median(r["throughput_per_s"] for r in mine),
            }
        )
    best = min(rows, key=lambda row: row["measured_s"])
    overs = []
    for rep in reports:
        chosen = rep["sweep"]["chosen"]
        chosen_s = next(r["measured_s"] for r in rows if r["cut"] == chosen)
        overs.append(chosen_s / best["measured_s"] - 1.0)
    chosen_cuts = [rep["sweep"]["chosen"] for rep in reports]
    device = next(r for r in rows if r["where"] == "device")
    server = next((r for r in rows if r["where"] == "server"), None)
    return {
        "rows": rows,
        "chosen": chosen_cuts,
        "best": best["cut"],
        "best_s": best["measured_s"],
        "chosen_over_best": statistics.median(overs),
        "chosen_over_best_worst": max(overs),
        "device_only_s": device["measured_s"],
        "server_only_s": server["measured_s"] if server else None,
        "link": [rep["plan"]["link"] for rep in reports],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    columns = 4
    rows_n = (len(keys) + columns - 1) // columns
    fig, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 3.3 * rows_n), squeeze=False)
    for axis, key in zip(axes.flat, keys, strict=False):
        summary = results[key]
        cuts = [row["cut"] for row in summary["rows"]]
        measured = [row["measured_s"] * 1e3 for row in summary["rows"]]
        predicted = [row["predicted_s"] * 1e3 for row in summary["rows"]]
        axis.plot(cuts, measured, "o-", color="#2563eb", label="measured", markersize=3)
        axis.plot(cuts, predicted, "--", color="#9ca3af", label="predicted")
        chosen = statistics.mode(summary["chosen"])
        chosen_s = next(row["measured_s"] for row in summary["rows"] if row["cut"] == chosen) * 1e3
        axis.plot([chosen], [chosen_s], "*", color="#dc2626", markersize=14, label="chosen")
        axis.set_yscale("log")
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("cut (0: server-only; last: device-only)", fontsize=8)
        axis.set_ylabel("ms per request", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(keys) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(results: dict) -> str:
    lines = [
        "| device | model | batch | device-only ms | server-only ms | best cut | best ms | chosen cut "
        "| chosen vs best |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, summary in results.items():
        device, model, batch = key.split(" / ")
        after = {row["cut"]: row["after"] for row in summary["rows"]}
        server = f"{summary['server_only_s'] * 1e3:.2f}" if summary["server_only_s"] else "-"
        chosen = ", ".join(f"{c} ({after[c]})" for c in sorted(set(summary["chosen"])))
        lines.append(
            f"| {device} | {model} | {batch.removeprefix('batch ')} | {summary['device_only_s'] * 1e3:.2f} | {server} "
            f"| {summary['best']} ({after[summary['best']]}) | {summary['best_s'] * 1e3:.2f} | {chosen} "
            f"| {summary['chosen_over_best']:+.1%} (worst {summary['chosen_over_best_worst']:+.1%}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference")
    parser.add_argument("--requests", type=int, default=15, help="requests timed per cut per sweep")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per case (the figures are their medians)")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    require_root()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs"
    models = args.models.split(",")
    heads = {}
    for name in models:
        run_dir = trained_lenet(runs) if name == "lenet5" else initial_run(runs, name)
        heads[name] = export(run_dir)
        print(f"{name}: heads in {heads[name]}", flush=True)
    testbed = Testbed(TestbedSpec(DEVICES, medium_up_mbit=100.0, medium_down_mbit=100.0))
    processes: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    results: dict[str, dict] = {}
    started = time.monotonic()
    try:
        testbed.create()
        config = args.out / "mosquitto.conf"
        config.write_text(
            f"listener {PORT} {AP_ADDRESS}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        )
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        broker_log = (args.out / "mosquitto.log").open("w")
        broker = testbed.ap_command([mosquitto, "-c", str(config)])
        processes.append(subprocess.Popen(broker, stdout=broker_log, stderr=subprocess.STDOUT))
        time.sleep(0.5)
        for name in models:
            serve = [sys.executable, "-m", "edge_server", "serve", str(heads[name].parent), "--service", name]
            serve += ["--broker", f"mqtt://{AP_ADDRESS}:{PORT}", "--log-level", "WARNING"]
            log = (args.out / f"serve-{name}.log").open("w")
            processes.append(subprocess.Popen(testbed.ap_command(serve), stdout=log, stderr=subprocess.STDOUT))
        time.sleep(20)  # the services measure their parts before they announce themselves
        for index, device in enumerate(DEVICES):
            for name in models:
                for batch in BATCHES:
                    key = f"{device.name} / {name} / batch {batch}"
                    reports = []
                    for repeat in range(args.repeats):
                        out = args.out / f"sweep-{device.name}-{name}-b{batch}-{repeat}.json"
                        reports.append(sweep(testbed, index, heads[name], name, batch, args.requests, out))
                    results[key] = summarize(reports)
                    summary = results[key]
                    print(
                        f"[{time.monotonic() - started:6.0f} s] {key}: chosen {summary['chosen']}, best "
                        f"{summary['best']}, chosen vs best {summary['chosen_over_best']:+.1%}",
                        flush=True,
                    )
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        testbed.destroy()
    (args.out / "inference.json").write_text(json.dumps(results, indent=1))
    (args.out / "inference.md").write_text(markdown(results))
    plot(results, ROOT / "docs" / "figures" / "inference.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
