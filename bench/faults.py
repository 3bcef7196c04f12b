"""Benchmark (issue #11, item 5): a seeded fault-injection campaign against real processes.

Each run trains LeNet-5 on builtin:digits with a real Mosquitto, a real ``edge_server``
process and one real ``cpsl-agent`` process per device (fixed schedule: cpsl, one cluster,
no ``--auto``), first without faults, then with the same seed and ``--faults`` random
faults at random moments:

- ``broker``: Mosquitto stopped and started again a second later (persistence on or off,
  drawn per run);
- ``server``: the edge server killed with SIGKILL and started again with ``--resume``;
- ``agent``: one agent killed with SIGKILL and started again a second later;
- ``link``: one device's link held for 10 s -- every device reaches the broker through its
  own TCP relay here, which stops carrying bytes both ways and then goes on (the
  connections stay open, as they do when Wi-Fi drops out; no root needed).

Reported per run: rounds completed out of planned, rounds lost or counted twice, the final
accuracy against the fault-free run's with the same seed, and the faults with their times.
Goal: every run completes every planned round, none lost, final accuracy within 1
percentage point of the fault-free run.

    python bench/faults.py [--runs 20] [--faults 2] [--rounds 15] [--devices 3] [--seed 0] [--out DIR]

Writes DIR/faults.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.brokers import free_port  # noqa: E402
from toolkit.transport.mosquitto import MosquittoProcess  # noqa: E402

KINDS = ("broker", "server", "agent", "link")
LINK_DOWN_S = 10.0


class HeldRelay:
    """A TCP relay for one device that can be held: while held, no byte moves either way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._open = None  # asyncio.Event, made on the relay's loop
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._open = asyncio.Event()
            self._open.set()
            server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            started.set()
            async with server:
                await server.serve_forever()

        self.loop.run_until_complete(main())

    async def _serve(self, reader, writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(source, sink) -> None:
            try:
                while data := await source.read(65536):
                    await self._open.wait()
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def hold(self, seconds: float) -> None:
        self.loop.call_soon_threadsafe(self._open.clear)
        self.loop.call_later(seconds, self._open.set)


def broker_process(folder: Path, port: int, persistence: bool) -> MosquittoProcess:
    config = folder / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_type error"]
    lines += [f"persistence {'true' if persistence else 'false'}", f"persistence_location {folder}/"]
    config.write_text("\n".join(lines) + "\n")
    return MosquittoProcess(config, port)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def one_run(folder: Path, seed: int, args, faults: list[tuple[float, str, int]], persistence: bool) -> dict:
    """Train once; inject ``faults`` ((seconds after the first round, kind, device)); returns the outcome."""
    folder.mkdir(parents=True)
    port = free_port()
    broker = broker_process(folder, port, persistence).start()
    relays = [HeldRelay(port) for _ in range(args.devices)]
    logs = folder / "logs"
    logs.mkdir()

    def agent(index: int) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "firmware_agent",
            "--broker",
            f"mqtt://127.0.0.1:{relays[index].port}",
            "--device-id",
            f"dev{index}",
            "--data",
            "builtin:digits",
            "--partition",
            f"{index}/{args.devices}",
            "--seed",
            str(seed),
            "--no-profile",
            "--heartbeat",
            "0.5",
        ]
        handle = (logs / f"agent-{index}.log").open("a")
        return subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)

    run_dir = folder / "run"
    server_command = [
        sys.executable,
        "-m",
        "edge_server",
        "--broker",
        f"mqtt://127.0.0.1:{port}",
        "--model",
        "lenet5",
        "--data",
        "builtin:digits",
        "--min-devices",
        str(args.devices),
        "--scheme",
        "cpsl",
        "--no-auto",
        "--clusters",
        "1",
        "--rounds",
        str(args.rounds),
        "--local-iterations",
        "20",
        "--batch-size",
        "16",
        "--seed",
        str(seed),
        "--timeout",
        "30",
        "--run-dir",
        str(run_dir),
        "--run-id",
        f"faults-{seed}",
    ]

    def server(command: list[str]) -> subprocess.Popen:
        handle = (logs / "server.log").open("a")
        return subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)

    agents = [agent(i) for i in range(args.devices)]
    edge = server(server_command)
    injected = []
    started = time.monotonic()
    after_first_round = 0.0
    try:
        deadline = time.monotonic() + 300
        while not records(run_dir) and edge.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        first_round = time.monotonic()
        after_first_round = first_round - started
        for at, kind, device in sorted(faults):
            while time.monotonic() < first_round + at and edge.poll() is None:
                time.sleep(0.05)
            if edge.poll() is not None:
                break
            injected.append({"at_s": round(time.monotonic() - started, 2), "kind": kind, "device": device})
            if kind == "broker":
                broker.restart(kill=persistence)
            elif kind == "server":
                edge.send_signal(signal.SIGKILL)
                edge.wait(timeout=10)
                time.sleep(1.0)
                edge = server([sys.executable, "-m", "edge_server", "--resume", str(run_dir)])
            elif kind == "agent":
                agents[device].send_signal(signal.SIGKILL)
                agents[device].wait(timeout=10)
                time.sleep(1.0)
                agents[device] = agent(device)
            else:
                relays[device].hold(LINK_DOWN_S)
        edge.wait(timeout=900)
    finally:
        for process in [edge, *agents]:
            if process.poll() is None:
                process.kill()
                process.wait()
        broker.stop()
    done = records(run_dir)
    rounds = [r["round"] for r in done]
    return {
        "seed": seed,
        "training_s": round(time.monotonic() - started - after_first_round, 1),
        "persistence": persistence,
        "faults": injected,
        "exit_code": edge.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "rounds_completed": len(set(rounds)),
        "rounds_planned": args.rounds,
        "rounds_lost": args.rounds - len(set(rounds)),
        "rounds_counted_twice": len(rounds) - len(set(rounds)),
        "dropped": {r["round"]: r["dropped"] for r in done if r["dropped"]},
        "final_accuracy": done[-1]["accuracy"] if done else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--faults", type=int, default=2, help="faults per run")
    # 15 rounds: digits is learned to a plateau by then. At 6 rounds (the first campaign) the
    # fault-free runs ended between 57% and 91% by seed, on the steep part of the curve, where
    # one device missing one round moved the end by 8.6 points (seed 18): that measured the
    # noise of an unfinished run, not what the fault cost.
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / "runs"
    report = {"command": "python " + " ".join(["bench/faults.py", *sys.argv[1:]]), "runs": []}
    for index in range(args.runs):
        seed = args.seed + index
        draw = random.Random(seed)
        persistence = draw.random() < 0.5
        calm = one_run(scratch / f"{seed}-calm", seed, args, [], persistence)
        span = max(1.0, calm["training_s"] * 0.8)
        # from half a second after the first round (its state is saved by then: a server killed
        # before any checkpoint has nothing to resume) to 80% of the way through the rounds after
        # it in the fault-free run, so that every fault lands while the run is training
        faults = [
            (draw.uniform(0.5, span), draw.choice(KINDS), draw.randrange(args.devices)) for _ in range(args.faults)
        ]
        stormy = one_run(scratch / f"{seed}-faults", seed, args, faults, persistence)
        gap = (
            abs(stormy["final_accuracy"] - calm["final_accuracy"])
            if stormy["final_accuracy"] is not None and calm["final_accuracy"] is not None
            else None
        )
        row = {**stormy, "fault_free_accuracy": calm["final_accuracy"], "accuracy_gap_pp": gap and 100 * gap}
        report["runs"].append(row)
        kinds = ", ".join(f"{f['kind']}@{f['at_s']}s" for f in row["faults"])
        print(
            f"run {index + 1}/{args.runs} seed {seed}: {row['rounds_completed']}/{args.rounds} rounds, "
            f"{row['rounds_lost']} lost, accuracy {row['final_accuracy']} vs {calm['final_accuracy']} ({kinds})",
            flush=True,
        )
        (args.out / "faults.json").write_text(json.dumps(report, indent=1))
    runs = report["runs"]
    report["summary"] = {
        "runs": len(runs),
        "complete": sum(r["rounds_lost"] == 0 and r["rounds_counted_twice"] == 0 for r in runs),
        "rounds_lost": sum(r["rounds_lost"] for r in runs),
        "within_1pp": sum(r["accuracy_gap_pp"] is not None and r["accuracy_gap_pp"] <= 1.0 for r in runs),
        "worst_accuracy_gap_pp": max((r["accuracy_gap_pp"] or 0.0 for r in runs), default=0.0),
    }
    (args.out / "faults.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"]))


if __name__ == "__main__":
    main()
