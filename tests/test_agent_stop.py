"""A device agent stops within 2 s of SIGTERM whatever it is doing, and waits cheaply while its
broker is away: a real ``cpsl-agent`` process, a real Mosquitto, and for the states inside a
turn a real edge server in this process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_server.server import EdgeServer, ServerConfig
from tests.brokers import free_port, mosquitto
from toolkit.data import load_dataset
from toolkit.models import load_model
from toolkit.protocol import Kind
from toolkit.transport import parse_broker_url
from toolkit.transport.mosquitto import mosquitto_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (.ci/run installs it)"),
]

STOP_WITHIN_S = 2.0
RECONNECTING_CPU = 0.01  # of one core


class Agent:
    """One ``cpsl-agent`` process with a fast heartbeat and a health file to read its state from."""

    def __init__(self, broker: str, folder: Path) -> None:
        self.health = folder / "health.json"
        self.log = folder / "agent.log"
        command = [sys.executable, "-m", "firmware_agent", "--broker", broker, "--device-id", "dev0"]
        command += ["--data", "builtin:digits", "--no-profile", "--heartbeat", "0.2", "--connect-timeout", "120"]
        command += ["--health-file", str(self.health)]
        with self.log.open("w") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)

    def state(self) -> dict:
        try:
            return json.loads(self.health.read_text())
        except (OSError, ValueError):
            return {}

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.process.poll() is None, f"the agent exited before {what}: {self.log.read_text()[-800:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s: {self.log.read_text()[-800:]}"
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def terminate(self) -> float:
        """SIGTERM; seconds until the process had exited."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def agent_in(tmp_path):
    started: list[Agent] = []

    def start(broker: str) -> Agent:
        agent = Agent(broker, tmp_path)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()


def assert_stopped_promptly(agent: Agent) -> None:
    took = agent.terminate()
    assert took < STOP_WITHIN_S, f"exited {took:.2f} s after SIGTERM: {agent.log.read_text()[-800:]}"
    assert agent.process.returncode == 0, agent.log.read_text()[-800:]


def connected(agent: Agent) -> Callable[[], bool]:
    return lambda: agent.state().get("connected") is True


def test_an_idle_agent_stops_within_2_s_and_says_goodbye(tmp_path, agent_in):
    with mosquitto(tmp_path) as url:
        agent = agent_in(url)
        agent.wait_for(connected(agent), "connection")
        assert_stopped_promptly(agent)
    assert "dev0 stopped" in agent.log.read_text()


def test_an_agent_still_looking_for_its_broker_stops_within_2_s(agent_in):
    agent = agent_in(f"mqtt://127.0.0.1:{free_port()}")  # nothing listens: it keeps trying
    agent.wait_for(lambda: "warmed up" in agent.log.read_text(), "warm-up")
    time.sleep(1.0)  # inside the connection wait
    assert_stopped_promptly(agent)


def test_a_reconnecting_agent_uses_under_1_percent_of_a_core_and_stops_within_2_s(tmp_path, agent_in):
    with mosquitto(tmp_path) as url:
        agent = agent_in(url)
        agent.wait_for(connected(agent), "connection")
    agent.wait_for(lambda: agent.state().get("connected") is False, "loss of the broker")
    time.sleep(2.0)  # into the backoff between attempts
    before, started = agent.cpu_seconds(), time.monotonic()
    time.sleep(5.0)
    share = (agent.cpu_seconds() - before) / (time.monotonic() - started)
    assert share < RECONNECTING_CPU, f"{share:.1%} of a core while reconnecting"
    assert_stopped_promptly(agent)


def server_config(url: str, folder: Path, scheme: str, iterations: int) -> ServerConfig:
    return ServerConfig(
        broker=parse_broker_url(url),
        scheme=scheme,
        rounds=1,
        min_devices=1,
        batch_size=8,
        iterations=iterations,
        clusters=1,
        cut=None if scheme == "fl" else 6,
        run_dir=folder / "run",
        run_id="stopping",
        iteration_timeout_s=10,
        register_timeout_s=60,
    )


class HeldServer(EdgeServer):
    """The real server, holding its first gradient until the test lets it go: the device waits for it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.holding = threading.Event()
        self.release = threading.Event()
        send = self.link.send

        def held(device, kind, body, round_, iteration=0, tensors=None) -> int:
            if kind is Kind.GRADIENT:
                self.holding.set()
                self.release.wait(60)
            return send(device, kind, body, round_, iteration, tensors)

        self.link.send = held


def serve(server: EdgeServer) -> threading.Thread:
    def quietly() -> None:
        with contextlib.suppress(Exception):  # the device it trained with is gone: this test's doing
            server.run()

    thread = threading.Thread(target=quietly, daemon=True)
    thread.start()
    return thread


def test_a_training_agent_stops_within_2_s(tmp_path, agent_in):
    data = load_dataset("builtin:digits", seed=0)
    with mosquitto(tmp_path) as url:
        agent = agent_in(url)
        agent.wait_for(connected(agent), "connection")
        # FL: the whole model trains on the device, a million iterations: it is computing when stopped
        server = EdgeServer(server_config(url, tmp_path, "fl", 1_000_000), load_model("lenet5", seed=0), data)
        serve(server)
        agent.wait_for(lambda: agent.state().get("state") == "training", "training")
        time.sleep(0.5)
        assert_stopped_promptly(agent)


def test_an_agent_waiting_for_its_gradient_stops_within_2_s(tmp_path, agent_in):
    data = load_dataset("builtin:digits", seed=0)
    with mosquitto(tmp_path) as url:
        agent = agent_in(url)
        agent.wait_for(connected(agent), "connection")
        server = HeldServer(server_config(url, tmp_path, "cpsl", 4), load_model("lenet5", seed=0), data)
        thread = serve(server)
        try:
            assert server.holding.wait(60), agent.log.read_text()[-800:]
            time.sleep(0.5)  # its smashed data went up; it waits for what the server holds
            assert agent.state().get("state") == "training"
            assert_stopped_promptly(agent)
        finally:
            server.release.set()
        thread.join(timeout=1)
