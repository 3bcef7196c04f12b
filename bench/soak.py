"""Memory over a long run: the demo's model for 1,000 rounds, the server's and every agent's
resident memory sampled as it goes, and the growth after the first 100 rounds.

    .venv/bin/python bench/soak.py --out bench/results/soak                # 1,000 rounds
    .venv/bin/python bench/soak.py --out /tmp/soak --rounds 150 --warmup 30   # a short look

It runs ``edge_server demo`` (embedded broker, the server in that process, the agents as its
children) with short rounds (``--local-iterations``, default 2: memory, not accuracy, is
measured; every round still hands out, trains, collects, averages, evaluates and records),
reads each process's VmRSS from /proc every ``--interval`` seconds and the round reached
from the run's metrics.jsonl. The claim (issue #25 item 3): no process grows by more than 5%
from the first sample at or past round ``--warmup`` (100) to the last. Writes
``OUT/samples.jsonl`` (as it goes), ``OUT/soak.json`` (the growth per process, the verdict,
the command) and ``OUT/soak.png``.

Resuming: memory growth is a property of one process's life, so a soak cut short is run
again from its start; a finished one (``soak.json`` present) is only summarised again.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.files import write_atomically  # noqa: E402

GROWTH_LIMIT = 0.05


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid``, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def agents_of(pid: int) -> list[int]:
    """The agent processes whose parent is ``pid`` (the demo's children running firmware_agent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"firmware_agent" in command:
            found.append(int(entry.name))
    return sorted(found)


def rounds_done(metrics: Path) -> int:
    try:
        with metrics.open("rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def growth(samples: list[dict], warmup: int) -> dict[str, dict]:
    """Per process: its memory at the first sample at or past ``warmup`` rounds, at the last
    sample, and the relative growth between them."""
    after = [s for s in samples if s["round"] >= warmup and s["rss"]]  # a process gone has no sample
    if len(after) < 2:
        return {}
    grown = {}
    for name in after[0]["rss"]:
        held = [s["rss"][name] for s in after if s["rss"].get(name)]
        if len(held) >= 2:
            grown[name] = {"from_bytes": held[0], "to_bytes": held[-1], "growth": held[-1] / held[0] - 1.0}
    return grown


def draw(samples: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(name for s in samples for name in s["rss"]):
        points = [(s["round"], s["rss"][name] / 2**20) for s in samples if name in s["rss"]]
        axis.plot([p[0] for p in points], [p[1] for p in points], label=name)
    axis.set_xlabel("round")
    axis.set_ylabel("resident memory [MiB]")
    axis.set_title("Resident memory over a long run (edge_server demo)")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def summarize(args, samples: list[dict], elapsed_s: float) -> dict:
    grown = growth(samples, args.warmup)
    worst = max((g["growth"] for g in grown.values()), default=None)
    document = {
        "command": ".venv/bin/python bench/soak.py " + " ".join(sys.argv[1:]),
        "rounds": samples[-1]["round"] if samples else 0,
        "warmup_rounds": args.warmup,
        "local_iterations": args.local_iterations,
        "devices": args.devices,
        "elapsed_s": elapsed_s,
        "growth": grown,
        "worst_growth": worst,
        "limit": GROWTH_LIMIT,
        "holds": worst is not None and worst <= GROWTH_LIMIT,
    }
    write_atomically(args.out / "soak.json", json.dumps(document, indent=1))
    if samples:
        draw(samples, args.out / "soak.png")
    return document


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100, help="rounds before memory is compared")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--local-iterations", type=int, default=2)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.rounds:
        parser.error("--warmup must be at least 1 and below --rounds")
    args.out.mkdir(parents=True, exist_ok=True)
    samples_file = args.out / "samples.jsonl"
    if (args.out / "soak.json").exists() and samples_file.exists():
        samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
        finished = json.loads((args.out / "soak.json").read_text())
        print(json.dumps(summarize(args, samples, finished.get("elapsed_s", 0.0)), indent=1))
        return
    run_dir = args.out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    samples_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "edge_server", "demo", "--no-dashboard", "--rounds", str(args.rounds)]
    command += ["--devices", str(args.devices), "--local-iterations", str(args.local_iterations)]
    command += ["--run-dir", str(run_dir)]
    started = time.monotonic()
    with (args.out / "demo.log").open("w") as log:
        demo = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    samples: list[dict] = []
    try:
        names: dict[int, str] = {demo.pid: "server"}  # the embedded broker runs in the same process
        while demo.poll() is None:
            time.sleep(args.interval)
            for pid in agents_of(demo.pid):
                names.setdefault(pid, f"agent-{len(names) - 1}")
            rss = {name: rss_bytes(pid) for pid, name in names.items()}
            sample = {
                "t_s": round(time.monotonic() - started, 2),
                "round": rounds_done(run_dir / "metrics.jsonl"),
                "rss": {k: v for k, v in rss.items() if v},
            }
            if not sample["rss"]:  # the demo has just ended
                continue
            samples.append(sample)
            with samples_file.open("a") as handle:
                handle.write(json.dumps(sample) + "\n")
            if len(samples) % 30 == 0:
                print(f"round {sample['round']}/{args.rounds}, {time.monotonic() - started:.0f} s", flush=True)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGTERM)
            demo.wait(timeout=30)
    if demo.returncode != 0:
        raise SystemExit(f"the demo exited with {demo.returncode}; see {args.out / 'demo.log'}")
    document = summarize(args, samples, time.monotonic() - started)
    for name, row in sorted(document["growth"].items()):
        before, after = row["from_bytes"] / 2**20, row["to_bytes"] / 2**20
        print(f"{name:10} {before:8.1f} MiB -> {after:8.1f} MiB  {row['growth']:+.1%}")
    verdict = "holds" if document["holds"] else "does not hold"
    print(f"growth after round {args.warmup}: at most {GROWTH_LIMIT:.0%} {verdict}; wrote {args.out / 'soak.json'}")


if __name__ == "__main__":
    main()
