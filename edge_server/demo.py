"""``edge_server demo``: a broker, N agent processes and the server, all on this machine.

The agents are real ``cpsl-agent`` processes with their own data partitions, talking
MQTT to an embedded amqtt broker (or ``--broker``). With ``--secure`` the demo provisions
a CA and one certificate per device into RUN_DIR/pki, starts Mosquitto with the generated
configuration (TLS, certificates required, the ACL), and every process connects with its
own bundle, as a deployment on real boards does. Every child runs in its own
process group and is terminated, then killed if it lingers, when the demo ends,
fails or is interrupted, so no process is left behind.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from edge_server.launch import make_config, train
from toolkit.data import load_dataset, parse_scheme
from toolkit.errors import UserError
from toolkit.models import load_model
from toolkit.processes import stop_process_groups
from toolkit.profile_format import save_profile
from toolkit.transport import BrokerAddress, parse_broker_url
from toolkit.transport.embedded_broker import EmbeddedBroker, free_loopback_port
from toolkit.transport.mosquitto import MosquittoProcess
from toolkit.transport.tls import bundle_files

MODEL, DATA = "lenet5", "builtin:mnist5k"


def _quick_profile(run_dir: Path, batch_size: int) -> Path:
    """One short profile of this machine, shared by all demo agents (they run on it too)."""
    from toolkit.profiler.runner import ProfileRequest, run_profile

    path = run_dir / "device-profile.json"
    profile = run_profile(
        ProfileRequest(
            model=load_model(MODEL),
            batch_sizes=[batch_size],
            repeats=5,
            warmup=1,
            passes=1,
            threads=1,
            device_id="demo-device",
        )
    )
    save_profile(profile, path)
    return path


def _spawn_agents(
    count: int, broker_url: str, args: argparse.Namespace, profile: Path, logs: Path, bundles: Path | None = None
) -> list:
    processes = []
    for index in range(count):
        log = (logs / f"agent-{index}.log").open("w")
        command = [
            sys.executable,
            "-m",
            "firmware_agent",
            "--broker",
            broker_url,
            "--device-id",
            f"dev{index}",
            "--data",
            DATA,
            "--partition",
            f"{index}/{count}",
            "--non-iid",
            args.non_iid,
            "--seed",
            str(args.seed),
            "--profile",
            str(profile),
            "--threads",
            "1",
        ]
        if bundles is not None:
            command += ["--bundle", str(bundles / f"dev{index}")]
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return processes


def _secure_broker(stack: ExitStack, run_dir: Path, devices: int) -> tuple[BrokerAddress, Path]:
    """Provision RUN_DIR/pki afresh, start Mosquitto on it; the server's address and the device bundles."""
    from edge_server import provision

    folder = run_dir / "pki"
    if folder.exists():
        shutil.rmtree(folder)
    port = free_loopback_port()
    deployment = provision.init(folder, ["127.0.0.1", "localhost"], port, listen="127.0.0.1")
    for index in range(devices):
        provision.add_device(deployment, f"dev{index}")
    stack.enter_context(MosquittoProcess(deployment.root / "mosquitto.conf", port))
    print(f"secure demo: Mosquitto with TLS and per-device certificates on 127.0.0.1:{port} ({folder})")
    return BrokerAddress("127.0.0.1", port, bundle_files(deployment.server_bundle)), deployment.root / "devices"


def run_demo(args: argparse.Namespace) -> int:
    parse_scheme(args.non_iid)
    model = load_model(MODEL, seed=args.seed)
    data = load_dataset(DATA, args.seed)
    run_dir: Path = args.run_dir
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    with ExitStack() as stack:
        bundles = None
        if args.secure:
            if args.broker:
                raise UserError("--secure starts its own Mosquitto; drop --broker")
            broker, bundles = _secure_broker(stack, run_dir, args.devices)
        elif args.broker:
            broker = parse_broker_url(args.broker)
        else:
            broker = stack.enter_context(EmbeddedBroker())
        profile = _quick_profile(run_dir, args.batch_size)
        processes = _spawn_agents(args.devices, broker.url, args, profile, logs, bundles)
        stack.callback(stop_process_groups, processes)
        config = make_config(args, broker, model, args.devices, "")
        config.register_timeout_s = 120.0
        for process in processes:
            if process.poll() is not None:
                raise UserError(f"an agent exited at start (code {process.returncode}); see {logs}")
        dashboard = None if args.no_dashboard else (args.dashboard or ("127.0.0.1", 0))  # a free loopback port
        return train(config, model, data, metrics_address=args.metrics_port, dashboard_address=dashboard)
