"""The training CLIs as users run them: bad input is one line and a non-zero exit; the demo learns."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys

import psutil
import pytest
import torch

from tests.brokers import free_port
from tests.conftest import run_cli
from toolkit.protocol import Kind, topics
from toolkit.protocol.codec import decode
from toolkit.transport import MqttTransport, parse_broker_url

BAD_AGENT = [
    (["--data", "builtin:cifar"], "unknown data spec 'builtin:cifar'"),
    (["--data", "builtin:digits", "--partition", "4/4"], "partition '4/4' is out of range"),
    (["--data", "builtin:digits", "--non-iid", "dirichlet:-1"], "non-IID scheme"),
    (["--data", "builtin:digits", "--device-id", "bad/id"], "device id 'bad/id'"),
    (["--data", "builtin:digits", "--device", "gpu"], "'gpu' is not a device: choose cpu, cuda, cuda:N or auto"),
    pytest.param(
        ["--data", "builtin:digits", "--device", "cuda"],
        "--device cuda: torch",  # and why: a CPU-only build, or no GPU or driver reachable
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the device is usable"),
    ),
]


@pytest.mark.parametrize(("flags", "message"), BAD_AGENT)
@pytest.mark.slow
def test_agent_bad_input(flags, message) -> None:
    args = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--device-id", "d0", "--no-profile", *flags]
    result = run_cli("firmware_agent", *args, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_agent_unreachable_broker() -> None:
    result = run_cli(
        "firmware_agent",
        "--broker",
        f"mqtt://127.0.0.1:{free_port()}",
        "--device-id",
        "d0",
        "--data",
        "builtin:digits",
        "--no-profile",
        "--connect-timeout",
        "2",
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot reach broker" in result.stderr and "within 2 s" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cut", "pool9"], "cut 'pool9' does not exist"),
        (["--data", "nope:x"], "unknown data spec"),
        (["--model", "resnet"], "unknown model"),
        (["--broker", "http://x"], "give mqtt://HOST:PORT or mqtts://HOST:PORT"),
        (["--device", "gpu"], "choose cpu, cuda, cuda:N or auto"),
    ],
)
@pytest.mark.slow
def test_server_bad_input(flags, message) -> None:
    args = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--min-devices", "1", "--data", "builtin:digits", *flags]
    result = run_cli("edge_server", *args, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# the demo's full run is checked in tests/test_dashboard_browser.py, where a browser watches it


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_demo_interrupted_or_terminated_leaves_no_process(tmp_path, signum) -> None:
    import signal
    import subprocess
    import sys
    import time

    demo = subprocess.Popen(
        [sys.executable, "-m", "edge_server", "demo", "--run-dir", str(tmp_path / "d"), "--rounds", "50"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # as from a terminal: a suite started in the background (`pytest &`, nohup) ignores SIGINT,
        # its children inherit that, and Python then installs no KeyboardInterrupt at all
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "d" / "metrics.jsonl").exists():
        time.sleep(0.5)
    assert (tmp_path / "d" / "metrics.jsonl").exists(), "the demo did not start training"
    children = [p.pid for p in psutil.Process(demo.pid).children(recursive=True)]
    assert len(children) >= 4
    demo.send_signal(getattr(signal, signum))
    interrupted = time.monotonic()
    try:
        code = demo.wait(timeout=30)
    except subprocess.TimeoutExpired:
        demo.kill()
        _, errors = demo.communicate()
        raise AssertionError(f"the demo ran on 30 s after {signum}: {errors.decode()[-1500:]}") from None
    assert code == 130, f"exit code {code} after {time.monotonic() - interrupted:.1f} s"  # "interrupted", cleaned up
    time.sleep(1)
    alive = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == []


@pytest.mark.slow
def test_secure_demo_provisions_and_trains_over_tls_with_mosquitto(tmp_path) -> None:
    from toolkit.transport.mosquitto import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    before = {p.pid for p in psutil.process_iter()}
    run_dir = tmp_path / "secure"
    args = ("demo", "--secure", "--devices", "2", "--rounds", "2", "--local-iterations", "5", "--run-dir", str(run_dir))
    result = run_cli("edge_server", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TLS and per-device certificates" in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and not records[-1]["dropped"]
    assert sorted(p.name for p in (run_dir / "pki" / "devices").iterdir()) == ["dev0", "dev1"]
    for log in ("agent-0.log", "agent-1.log"):
        assert "registered at mqtts://127.0.0.1:" in (run_dir / "logs" / log).read_text()
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before
        and p.pid != os.getpid()
        and any(name in " ".join(p.info["cmdline"] or []) for name in ("firmware_agent", str(run_dir)))
    ]
    assert leftovers == []


@pytest.mark.slow
def test_an_agent_configured_for_auto_registers_where_it_trains(broker, tmp_path) -> None:
    """``device = "auto"`` in agent.toml: the agent trains on CUDA where torch sees it, else the CPU,
    and its retained registration says which -- what the server, fleet.json and dashboard show."""
    config = tmp_path / "agent.toml"
    config.write_text(
        f'broker = "{broker}"\ndevice-id = "j1"\ndata = "builtin:digits"\nno-profile = true\ndevice = "auto"\n'
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "firmware_agent", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    frames: queue.Queue[bytes] = queue.Queue()
    watcher = MqttTransport(parse_broker_url(broker), "watcher", lambda topic, payload: frames.put(payload))
    try:
        watcher.subscribe(topics.device_status("j1"))
        watcher.connect(10)
        register = None
        while register is None:
            message = decode(frames.get(timeout=60))  # retained: there as soon as the agent is up
            register = message.body if message.kind is Kind.REGISTER else None
    finally:
        watcher.close()
        agent.terminate()
        _, stderr = agent.communicate(timeout=30)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert register.capabilities.accelerator == expected, stderr[-2000:]
    assert register.capabilities.accelerator_name.startswith(expected)
    assert f"warmed up lenet5 on {register.capabilities.accelerator_name}" in stderr
