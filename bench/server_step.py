"""Benchmark (issue #15, item 4): the server step of every built-in model at cluster sizes 1-16,
on the CPU and, where torch sees one, on a CUDA GPU.

One server step is what the edge server does per iteration of a cluster turn
(toolkit.training.server_step): forward, backward and SGD step of the server-side layers on
the pooled smashed data of the cluster (k devices x 32 samples), and the gradients back at
the cut. Each model is cut where its device side is small (LeNet-5 and the VGG-style model
after pool1, WideNet after pool1, MobileNetV2 after block 2), so the server carries most of
the model -- the case where the server step can become a round's bottleneck. Reported: the
median of ``--repeats`` timed steps after ``--warmup`` untimed ones, per model, cluster size and
device; on CUDA the step is bracketed by ``torch.cuda.synchronize``, and the smashed data is
moved to the GPU and the gradients back inside the timed region, as the server would.

    python bench/server_step.py [--repeats 5] [--threads N] [--out bench/results/server_step]

Writes OUT/server_step.json, OUT/server_step.md and OUT/server_step.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from toolkit.models import load_model  # noqa: E402
from toolkit.training import make_optimizer, server_step  # noqa: E402

CUTS = {"lenet5": "pool1", "vgg": "pool1", "widenet": "pool1", "mobilenetv2": "block2"}
CLUSTER_SIZES = (1, 2, 4, 8, 16)
BATCH = 32


def time_steps(model_name: str, cluster: int, device: torch.device, repeats: int, warmup: int) -> list[float]:
    model = load_model(model_name, seed=0)
    head, tail = model.split(CUTS[model_name])
    tail = tail.to(device).train()
    optimizer = make_optimizer(list(tail.parameters()), lr=0.01, momentum=0.9, weight_decay=0.0)
    with torch.no_grad():
        smashed = [head(torch.randn(BATCH, *model.input_shape)) for _ in range(cluster)]
    labels = [torch.randint(0, 10, (BATCH,)) for _ in range(cluster)]
    loss_fn = nn.CrossEntropyLoss()
    runs = []
    for repeat in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        gradients, _ = server_step(
            tail, optimizer, [s.to(device) for s in smashed], [y.to(device) for y in labels], loss_fn
        )
        gradients = [g.cpu() for g in gradients]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repeat >= warmup:
            runs.append(time.perf_counter() - started)
    return runs


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.2))
    for key, row in results.items():
        sizes = sorted(int(k) for k in row["median_s"])
        axis.plot(sizes, [row["median_s"][str(k)] * 1e3 for k in sizes], "o-", label=key, markersize=4)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel(f"cluster size (devices x {BATCH} samples)")
    axis.set_ylabel("server step, ms (median)")
    axis.set_title("One server step on the pooled batch")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default=",".join(CUTS))
    parser.add_argument("--sizes", default=",".join(map(str, CLUSTER_SIZES)))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server_step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    results: dict[str, dict] = {}
    for device in devices:
        for name in args.models.split(","):
            key = f"{name} @ {CUTS[name]} on {device.type}"
            row = {"model": name, "cut": CUTS[name], "device": device.type, "median_s": {}, "runs_s": {}}
            for size in map(int, args.sizes.split(",")):
                runs = time_steps(name, size, device, args.repeats, args.warmup)
                row["median_s"][str(size)] = statistics.median(runs)
                row["runs_s"][str(size)] = runs
                print(f"{key}, cluster {size:2d}: {statistics.median(runs) * 1e3:9.1f} ms", flush=True)
            results[key] = row
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": f"python bench/server_step.py --repeats {args.repeats} --threads {args.threads}",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "gpu": gpu,
        "results": results,
    }
    (args.out / "server_step.json").write_text(json.dumps(report, indent=1))
    sizes = list(map(int, args.sizes.split(",")))
    lines = ["| model @ cut, device | " + " | ".join(f"k={k}" for k in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for key, row in results.items():
        lines.append(f"| {key} | " + " | ".join(f"{row['median_s'][str(k)] * 1e3:.1f} ms" for k in sizes) + " |")
    (args.out / "server_step.md").write_text("\n".join(lines) + "\n")
    plot(results, args.out / "server_step.png")
    print("\n".join(lines))
    if gpu is None:
        print("no CUDA device here: CPU figures only")


if __name__ == "__main__":
    main()
