"""One training run on the emulated testbed: broker, agents and edge server as real processes.

Mosquitto and the edge server run in the access point's namespace; every agent runs in
its device's namespace and CPU group, with a profile measured *inside* that CPU group (so
the server starts from what the emulated device really does). Events change the testbed
mid-run: a device's uplink slows, or its agent is killed. Every process started is
stopped when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.errors import UserError
from toolkit.files import write_atomically
from toolkit.processes import stop_process_groups
from toolkit.testbed.topology import AP_ADDRESS, Testbed

log = logging.getLogger("cpsl.testbed")

BROKER_PORT = 1883
MODEL, DATA = "lenet5", "builtin:mnist5k"
DATA_SHAPE = "1,28,28"  # builtin:mnist5k's digits: what every device profiles the model for


@dataclass(frozen=True)
class Event:
    """After round ``after_round`` completes: ``throttle`` a device's uplink to ``mbit``, ``drop``
    it, or take its link ``down`` for ``seconds``."""

    kind: str  # "throttle" | "drop" | "down"
    device: int
    after_round: int
    mbit: float = 0.0
    seconds: float = 0.0

    @classmethod
    def parse(cls, kind: str, text: str, devices: int) -> Event:
        parts = text.split(":")
        try:
            if kind == "throttle" and len(parts) == 3:
                event = cls(kind, int(parts[0].removeprefix("dev")), int(parts[1]), float(parts[2]))
            elif kind == "drop" and len(parts) == 2:
                event = cls(kind, int(parts[0].removeprefix("dev")), int(parts[1]))
            elif kind == "down" and len(parts) == 3:
                event = cls(kind, int(parts[0].removeprefix("dev")), int(parts[1]), seconds=float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            form = {"throttle": "devI:ROUND:MBIT", "down": "devI:ROUND:SECONDS"}.get(kind, "devI:ROUND")
            flag = "link-down" if kind == "down" else kind
            raise UserError(f"--{flag} {text!r}: expected {form}") from None
        if kind == "down" and not 0 < event.seconds <= 3600:
            raise UserError(f"--link-down {text!r}: the outage must last between 0 and 3600 s")
        if not 0 <= event.device < devices:
            raise UserError(f"--{kind} {text!r}: there is no device {event.device} among {devices}")
        if kind == "throttle" and not event.mbit > 0:
            raise UserError(f"--{kind} {text!r}: the rate must be positive")
        return event


@dataclass
class RunSpec:
    scheme: str = "cpsl"
    auto: bool | None = None
    random_clusters: bool = False
    cut: str | None = None
    clusters: int = 2
    max_cluster_size: int | None = None  # the server's --max-cluster-size (cpsl --auto)
    rounds: int = 30
    target_accuracy: float | None = 0.9
    batch_size: int = 32
    local_iterations: int = 20
    lr: float = 0.05
    seed: int = 0
    non_iid: str = "dirichlet:0.5"
    timeout_s: float = 60.0
    planner_medium: str = "auto"  # the server's --medium: how cpsl --auto models the medium
    slots: bool = True  # cpsl --auto: --no-slots when False (the devices contend)
    iteration_flow: bool = True  # cpsl --auto: --no-iteration-flow when False
    model: str = MODEL  # a built-in model; every agent is configured to train it and only it
    compress: str = "fp32"  # the server's --compress (toolkit.compression)
    compress_gradients: str | None = None  # its --compress-gradients (None: as --compress)
    events: list[Event] = field(default_factory=list)
    # Stop the run this many seconds after the server started if it has not finished: a
    # baseline known to be that slow need not be timed to its end (bench/ablation.py)
    give_up_after_s: float | None = None
    # The broker as provisioned (set_tcp_nodelay true); False: Mosquitto's default, Nagle's
    # algorithm on its sockets (docs/testbed.md compares the two)
    broker_nodelay: bool = True

    def server_flags(self) -> list[str]:
        flags = [
            "--scheme",
            self.scheme,
            "--rounds",
            str(self.rounds),
            "--clusters",
            str(self.clusters),
            "--batch-size",
            str(self.batch_size),
            "--local-iterations",
            str(self.local_iterations),
            "--lr",
            str(self.lr),
            "--seed",
            str(self.seed),
            "--timeout",
            str(self.timeout_s),
        ]
        if self.auto is not None:
            flags.append("--auto" if self.auto else "--no-auto")
        if self.planner_medium != "auto":
            flags += ["--medium", self.planner_medium]
        if self.random_clusters:
            flags.append("--random-clusters")
        if self.max_cluster_size is not None:
            flags += ["--max-cluster-size", str(self.max_cluster_size)]
        if not self.slots:
            flags.append("--no-slots")
        if not self.iteration_flow:
            flags.append("--no-iteration-flow")
        if self.cut:
            flags += ["--cut", self.cut]
        if self.target_accuracy is not None:
            flags += ["--target-accuracy", str(self.target_accuracy)]
        if self.compress != "fp32":
            flags += ["--compress", self.compress]
        if self.compress_gradients is not None:
            flags += ["--compress-gradients", self.compress_gradients]
        return ["--model", self.model, "--data", DATA, *flags]

    def agent_flags(self, index: int, devices: int, profile: Path) -> list[str]:
        """Device ``index``'s agent: its partition of the data, the one model it may train, its profile."""
        return [
            "--device-id",
            f"dev{index}",
            "--model",
            self.model,
            "--data",
            DATA,
            "--partition",
            f"{index}/{devices}",
            "--non-iid",
            self.non_iid,
            "--seed",
            str(self.seed),
            "--profile",
            str(profile),
            "--threads",
            "1",
            "--heartbeat",
            "1",
            # a whole WideNet (5.5 MB) from each of 8 devices at once takes about 76 s of air on the
            # heavy Wi-Fi fleet: the keepalive must outlast the longest single transfer
            "--keepalive",
            "120",
        ]


REGISTER_TIMEOUT_S = 300.0
REGISTERED = " registered at "  # what an agent logs once its registration is out (firmware_agent/agent.py)


def profile_devices(testbed: Testbed, folder: Path, batch_size: int, model: str = MODEL) -> dict[int, Path]:
    """A short profile of ``model`` per distinct CPU share, measured inside that device's CPU group.

    The CPU classes are profiled at the same time: each process is held to its own quota (a
    fraction of a core; together well under the host's cores), so they do not slow each
    other, and the testbed starts in the time of its slowest class instead of their sum."""
    folder.mkdir(parents=True, exist_ok=True)
    by_share: dict[float, Path] = {}
    running: list[tuple[int, subprocess.Popen]] = []
    result = {}
    for index, device in enumerate(testbed.spec.devices):
        if device.cpu_share not in by_share:
            prefix = "" if model == MODEL else f"{model}-"
            path = folder / f"{prefix}cpu{device.cpu_share:g}.json"
            if not path.exists():
                name = f"testbed-cpu{device.cpu_share:g}"
                command = [
                    sys.executable,
                    "-m",
                    "toolkit.cli.profile",
                    "--model",
                    model,
                    "--input-shape",
                    DATA_SHAPE,
                    "--batch-size",
                    str(batch_size),
                    "--repeats",
                    "6",
                    "--warmup",
                    "2",
                    "--passes",
                    "1",
                    "--threads",
                    "1",
                    "--no-onnx",
                    "--device-id",
                    name,
                    "--out",
                    str(path),
                ]
                process = subprocess.Popen(
                    testbed.device_command(index, command),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                running.append((index, process))
            by_share[device.cpu_share] = path
        result[index] = by_share[device.cpu_share]
    failures = []
    for index, process in running:
        _, errors = process.communicate()
        if process.returncode != 0:
            failures.append(f"profiling device {index} failed: {errors.strip()[-400:]}")
    if failures:
        raise RuntimeError("; ".join(failures))
    return result


def run(testbed: Testbed, spec: RunSpec, run_dir: Path, profiles: dict[int, Path]) -> list[dict]:
    """Train once; returns the metrics records (also in ``run_dir/metrics.jsonl``)."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        raise UserError("the testbed needs mosquitto (apt-get install mosquitto)")
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    config = run_dir / "mosquitto.conf"
    wifi = testbed.spec.medium == "wifi"
    # wifi: devices reach the broker's address through the airtime relay; the broker listens on the
    # access point's loopback, where the edge server (wired to the access point) reaches it directly
    broker_listen = "127.0.0.1" if wifi else AP_ADDRESS
    nodelay = "set_tcp_nodelay true\n" if spec.broker_nodelay else ""
    config.write_text(f"listener {BROKER_PORT} {broker_listen}\nallow_anonymous true\npersistence false\n{nodelay}")
    processes: list[subprocess.Popen] = []

    def start(command: list[str], log_name: str) -> subprocess.Popen:
        handle = (logs / log_name).open("w")
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(process)
        return process

    broker_url = f"mqtt://{AP_ADDRESS}:{BROKER_PORT}"
    server_broker_url = f"mqtt://{broker_listen}:{BROKER_PORT}"
    devices = len(testbed.spec.devices)
    try:
        start(testbed.ap_command([mosquitto, "-c", str(config)]), "mosquitto.log")
        if wifi:
            relay = [
                sys.executable,
                "-m",
                "toolkit.testbed.wifi",
                "--listen",
                f"{AP_ADDRESS}:{BROKER_PORT}",
                "--target",
                f"127.0.0.1:{BROKER_PORT}",
                "--contention",
                testbed.spec.contention,
                "--seed",
                str(spec.seed),
            ]
            for station in testbed.wifi_stations():
                relay += ["--station", station]
            start(testbed.ap_command(relay), "wifi.log")
        time.sleep(0.5)
        agents = {}
        for index in range(devices):
            command = [
                sys.executable,
                "-m",
                "firmware_agent",
                "--broker",
                broker_url,
                *spec.agent_flags(index, devices, profiles[index]),
            ]
            agents[index] = start(testbed.device_command(index, command, throttled=False), f"agent-{index}.log")
        _throttle_when_registered(testbed, agents, logs)
        server_command = [
            sys.executable,
            "-m",
            "edge_server",
            "--broker",
            server_broker_url,
            "--min-devices",
            str(devices),
            "--wait-devices",  # the agents registered before it started: this only bounds a reconnect
            "60",
            "--run-dir",
            str(run_dir),
            "--run-id",
            f"testbed-{spec.scheme}",
            "--log-level",
            "WARNING",
            *spec.server_flags(),
        ]
        # time to a target counts from here: the server's own profiling, probes and planning included
        started_at = time.time()
        write_atomically(run_dir / "testbed.json", json.dumps({"server_started_at": started_at}).encode())
        server = start(testbed.ap_command(server_command), "server.log")
        watcher = threading.Thread(
            target=_apply_events, args=(testbed, spec.events, metrics, agents, server), daemon=True
        )
        watcher.start()
        deadline = time.monotonic() + 60 * 60
        give_up = time.monotonic() + spec.give_up_after_s if spec.give_up_after_s else None
        gave_up = False
        while server.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the edge server ran for more than an hour")
            if give_up is not None and time.monotonic() > give_up:
                stop_process_groups([server])  # SIGTERM: the server stops as on Ctrl-C
                record = {"server_started_at": started_at, "gave_up_after_s": spec.give_up_after_s}
                write_atomically(run_dir / "testbed.json", json.dumps(record).encode())
                gave_up = True
                break
            time.sleep(0.5)
        if server.returncode != 0 and not gave_up:
            tail = (logs / "server.log").read_text()[-600:]
            raise RuntimeError(f"edge server exited with {server.returncode}: {tail}")
    finally:
        stop_process_groups(list(reversed(processes)))
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


def _throttle_when_registered(testbed: Testbed, agents: dict[int, subprocess.Popen], logs: Path) -> None:
    """Move each agent into its CPU group once it has registered; return when all have.

    An agent boots unthrottled: importing torch and warming up on a twentieth of a core
    takes 60-130 s here, which is neither what a board takes (seconds) nor what any scheme
    is measured for, and its spread across runs was larger than what a plan moves. Nothing
    before registration is measured (the profile was made throttled beforehand), and the
    edge server starts only when every agent is in its group, so each device trains at its
    quota from the server's first message on."""
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    waiting = dict(agents)
    while waiting:
        for index, process in list(waiting.items()):
            log_text = (logs / f"agent-{index}.log").read_text(errors="replace")
            if REGISTERED in log_text:
                testbed.throttle(index, process.pid)
                del waiting[index]
            elif process.poll() is not None:
                code = process.returncode
                raise RuntimeError(f"agent {index} exited with {code} before registering: {log_text[-600:]}")
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"agents {sorted(waiting)} did not register within {REGISTER_TIMEOUT_S:g} s")
        time.sleep(0.2)


def _apply_events(testbed: Testbed, events: list[Event], metrics: Path, agents: dict, server) -> None:
    pending = sorted(events, key=lambda e: e.after_round)
    while pending and server.poll() is None:
        done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        while pending and done > pending[0].after_round:
            event = pending.pop(0)
            if event.kind == "down":
                testbed.set_link(event.device, up=False)
                timer = threading.Timer(event.seconds, testbed.set_link, args=(event.device, True))
                timer.daemon = True
                timer.start()
                log.warning("after round %d: dev%d link down for %g s", event.after_round, event.device, event.seconds)
            elif event.kind == "throttle":
                testbed.set_uplink(event.device, event.mbit)
                log.warning(
                    "after round %d: dev%d uplink throttled to %g Mbit/s", event.after_round, event.device, event.mbit
                )
            else:  # vanish without a goodbye: the broker publishes its last will
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(agents[event.device].pid, signal.SIGKILL)
                log.warning("after round %d: dev%d dropped (agent killed)", event.after_round, event.device)
        time.sleep(0.2)
