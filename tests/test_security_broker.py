"""Against a real Mosquitto started with the configuration `edge_server provision` writes:
identities, the ACL, revocation, one-line TLS errors, hostile assignments, and training over TLS."""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from edge_server import pki, provision
from edge_server.server import EdgeServer
from firmware_agent.agent import AgentConfig, DeviceAgent
from tests.brokers import free_port
from tests.conftest import run_cli
from tests.fuzzing import lenet_assign
from tests.servers import DATA, server_config
from toolkit.data import load_dataset, partition_indices
from toolkit.errors import UserError
from toolkit.models import load_model
from toolkit.protocol import Kind, decode, encode, make_header, topics
from toolkit.protocol import messages as m
from toolkit.transport import MqttTransport, parse_broker_url
from toolkit.transport.mosquitto import MosquittoProcess, mosquitto_binary
from toolkit.transport.tls import TlsFiles, bundle_files

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (.ci/run installs it)")


class Fleet:
    def __init__(self, root: Path, port: int, broker: MosquittoProcess) -> None:
        self.root, self.port, self.broker = root, port, broker
        self.deployment = provision.load(root)

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def address(self, who: str):
        folder = self.deployment.server_bundle if who == "server" else self.deployment.device_bundle(who)
        return parse_broker_url(self.url, bundle_files(folder))


@pytest.fixture
def fleet(tmp_path):
    port = free_port()
    deployment = provision.init(tmp_path / "pki", ["127.0.0.1", "localhost"], port, listen="127.0.0.1")
    for device in ("dev0", "dev1", "dev2"):
        provision.add_device(deployment, device)
    with MosquittoProcess(deployment.root / "mosquitto.conf", port) as broker:
        yield Fleet(deployment.root, port, broker)


def _client(address, name: str, seen: list) -> MqttTransport:
    transport = MqttTransport(address, name, lambda topic, payload: seen.append((topic, payload)))
    transport.connect(10)
    return transport


def test_a_client_without_a_certificate_is_refused(fleet) -> None:
    address = parse_broker_url(fleet.url, TlsFiles(fleet.root / "ca/ca.crt"))
    with pytest.raises(UserError, match="client certificate"):
        MqttTransport(address, "anon", lambda *a: None).connect(10)


def test_a_broker_signed_by_another_ca_is_refused(fleet, tmp_path) -> None:
    other = provision.init(tmp_path / "other", ["127.0.0.1"], 1)
    provision.add_device(other, "dev0")
    with pytest.raises(UserError, match="not signed by our CA"):
        MqttTransport(parse_broker_url(fleet.url, bundle_files(other.device_bundle("dev0"))), "x", print).connect(10)


def test_hostname_verification_is_on(tmp_path) -> None:
    port = free_port()
    deployment = provision.init(tmp_path / "pki", ["localhost"], port, listen="127.0.0.1")
    provision.add_device(deployment, "dev0")
    with MosquittoProcess(deployment.root / "mosquitto.conf", port):
        address = parse_broker_url(f"mqtts://127.0.0.1:{port}", bundle_files(deployment.device_bundle("dev0")))
        with pytest.raises(UserError, match=r"not valid for '127\.0\.0\.1'"):
            MqttTransport(address, "x", print).connect(10)


def test_an_expired_certificate_is_reported_before_connecting(fleet, tmp_path) -> None:
    ca = fleet.deployment.ca()
    old = pki.issue(ca, "dev0", days=1, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30))
    (tmp_path / "old.crt").write_bytes(old.cert_pem())
    (tmp_path / "old.key").write_bytes(old.key_pem())
    files = TlsFiles(fleet.root / "ca/ca.crt", tmp_path / "old.crt", tmp_path / "old.key")
    with pytest.raises(UserError, match="expired on"):
        MqttTransport(parse_broker_url(fleet.url, files), "x", print)


def test_a_plaintext_port_given_as_mqtts_is_one_clear_line(fleet, broker) -> None:
    port = broker.rsplit(":", 1)[1]
    address = parse_broker_url(f"mqtts://127.0.0.1:{port}", bundle_files(fleet.deployment.device_bundle("dev0")))
    with pytest.raises(UserError, match="TLS"):
        MqttTransport(address, "x", print).connect(10)


def test_the_acl_confines_each_device_to_its_own_topics(fleet) -> None:
    server_saw, device_saw = [], []
    server = _client(fleet.address("server"), "server", server_saw)
    device = _client(fleet.address("dev0"), "dev0", device_saw)
    server.subscribe("cpsl/v1/#")
    device.subscribe(topics.all_down_for("dev0"))
    device.subscribe(topics.all_down_for("dev1"))  # another device's commands: the broker delivers none
    device.subscribe(topics.infer_reply("svc", "dev0"))
    device.subscribe(topics.infer_reply("svc", "dev1"))  # another device's predictions: none either
    time.sleep(0.5)
    device.publish(topics.device_heartbeat("dev0"), b"own")
    device.publish(topics.infer_request("svc", "dev0"), b"own request")
    for topic in (
        topics.device_heartbeat("dev1"),
        topics.device_status("dev1"),
        topics.up("run", "dev1"),
        topics.down("run", "dev1"),
        topics.server_status(),
        topics.run_metrics("run"),
        topics.infer_request("svc", "dev1"),
        topics.infer_reply("svc", "dev0"),
        topics.infer_status("svc"),
    ):
        device.publish(topic, b"forged")
    server.publish(topics.down("run", "dev0"), b"for dev0")
    server.publish(topics.down("run", "dev1"), b"for dev1")
    server.publish(topics.infer_reply("svc", "dev0"), b"answer for dev0")
    server.publish(topics.infer_reply("svc", "dev1"), b"answer for dev1")
    device.flush(5)
    server.flush(5)
    time.sleep(0.5)
    assert [p for _, p in server_saw if not p.startswith((b"for dev", b"answer for"))] == [b"own", b"own request"]
    assert device_saw == [
        (topics.down("run", "dev0"), b"for dev0"),
        (topics.infer_reply("svc", "dev0"), b"answer for dev0"),
    ]
    server.close()
    device.close()


def test_revoking_one_device_leaves_the_others_connected(fleet) -> None:
    provision.revoke(provision.load(fleet.root), "dev1")
    acl = (fleet.root / "acl").read_text()
    assert "user dev1" not in acl and "user dev0" in acl
    fleet.broker.stop()
    fleet.broker.start()  # Mosquitto reads the CRL when its listener starts
    assert not fleet.deployment.device_bundle("dev1").exists()  # its bundle is gone from the folder too
    good = _client(fleet.address("dev0"), "dev0", [])  # the others are untouched
    good.close()


def test_a_revoked_certificate_is_refused_with_a_clear_line(tmp_path) -> None:
    port = free_port()
    deployment = provision.init(tmp_path / "pki", ["127.0.0.1"], port, listen="127.0.0.1")
    folder = provision.add_device(deployment, "dev1")
    kept = tmp_path / "board"  # what the board still holds after the revocation
    kept.mkdir()
    for name in ("ca.crt", "client.crt", "client.key"):
        (kept / name).write_bytes((folder / name).read_bytes())
    provision.revoke(deployment, "dev1")
    with MosquittoProcess(deployment.root / "mosquitto.conf", port), pytest.raises(UserError, match="revoked"):
        MqttTransport(parse_broker_url(f"mqtts://127.0.0.1:{port}", bundle_files(kept)), "x", print).connect(10)


@pytest.mark.slow
def test_agent_with_the_wrong_ca_exits_2_with_one_line(fleet, tmp_path) -> None:
    other = provision.init(tmp_path / "other", ["127.0.0.1"], 1)
    provision.add_device(other, "dev0")
    result = run_cli(
        "firmware_agent",
        "--config",
        str(other.device_bundle("dev0") / "agent.toml"),
        "--broker",
        fleet.url,
        "--data",
        DATA,
        "--no-profile",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "not signed by our CA" in lines[0], result.stderr


def _run_fleet(address_of, data, tmp_path, tag: str) -> list[float]:
    parts = partition_indices(data.train_y.numpy(), 3, "iid", 0)
    agents = []
    for index in range(3):
        agent = DeviceAgent(
            AgentConfig(address_of(f"dev{index}"), f"dev{index}", f"{index}/3", heartbeat_s=0.5),
            data,
            parts[index],
            None,
        )
        agent.start()
        threading.Thread(target=agent.serve_forever, daemon=True).start()
        agents.append(agent)
    try:
        config = server_config(
            "mqtt://x:1", tmp_path / tag, rounds=3, iterations=20, lr=0.05, momentum=0.9, min_devices=3
        )
        config.broker = address_of("server")
        server = EdgeServer(config, load_model("lenet5", seed=0), data)
        server.run()
        return [record["accuracy"] for record in server.history]
    finally:
        for agent in agents:
            agent.close()


@pytest.mark.slow
def test_training_over_tls_matches_plaintext_with_the_same_seed(fleet, broker, tmp_path) -> None:
    data = load_dataset(DATA, seed=0)
    secure = _run_fleet(fleet.address, data, tmp_path, "tls")
    plain = _run_fleet(lambda who: parse_broker_url(broker), data, tmp_path, "plain")
    assert secure == plain and secure[-1] > 0.5


def test_hostile_assignments_are_refused_and_the_agent_serves_on(fleet, tmp_path) -> None:
    """An ASSIGN naming code, sent by the one identity allowed to send it (a compromised server)."""
    data = load_dataset(DATA, seed=0)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.py"
    evil.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\ndef net(**kw):\n    pass\n")
    agent = DeviceAgent(
        AgentConfig(fleet.address("dev0"), "dev0", "0/1", heartbeat_s=0.5), data, torch.arange(50).numpy(), None
    )
    agent.start()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    modules = set(sys.modules)
    server_saw: list = []
    server = _client(fleet.address("server"), "server", server_saw)
    server.subscribe(topics.up("evil-run", "dev0"))
    time.sleep(0.5)
    specs = ["os:abort", "subprocess:getoutput", f"{evil}:net", "builtins:exec", "vgg"]
    for seq, spec in enumerate(specs, start=1):
        body = lenet_assign(spec)
        server.publish(
            topics.down("evil-run", "dev0"), encode(Kind.ASSIGN, make_header("evil-run", "dev0", seq=seq), body)
        )
    server.flush(5)
    deadline = time.monotonic() + 20
    while len(server_saw) < len(specs) and time.monotonic() < deadline:
        time.sleep(0.1)
    refusals = [decode(payload) for _, payload in server_saw]
    assert [r.kind for r in refusals] == [Kind.REJECT] * len(specs)
    assert all("not one this device is configured to train" in r.body.reason for r in refusals)
    assert not marker.exists()
    assert set(sys.modules) - modules == set()
    assert thread.is_alive() and agent.assignment is None
    server.close()
    agent.close()


def _registered_server(fleet, tmp_path) -> EdgeServer:
    config = server_config("mqtt://x:1", tmp_path / "server", min_devices=2)
    config.broker = fleet.address("server")
    server = EdgeServer(config, load_model("lenet5", seed=0), load_dataset(DATA, seed=0))
    server.connect()
    return server


def _poll_until(server: EdgeServer, condition, timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        server.serve_intake(0.1)
    return condition()


def test_forged_offline_and_heartbeats_about_another_device_change_nothing(fleet, tmp_path) -> None:
    data = load_dataset(DATA, seed=0)
    agents = []
    for index in range(2):
        agent = DeviceAgent(
            AgentConfig(fleet.address(f"dev{index}"), f"dev{index}", f"{index}/2", heartbeat_s=0.5),
            data,
            torch.arange(40).numpy(),
            None,
        )
        agent.start()
        agents.append(agent)
    server = _registered_server(fleet, tmp_path)
    try:
        assert _poll_until(server, lambda: len(server.registry.online()) == 2)
        victim = server.registry.devices["dev1"]
        session, samples = victim.session, victim.num_samples
        attacker = _client(fleet.address("dev0"), "dev0-attacker", [])
        forged_offline = m.Offline(session=session, reason="forged")
        for seq, (topic, kind, body) in enumerate(
            [
                (topics.device_status("dev1"), Kind.OFFLINE, forged_offline),  # the broker drops it
                (topics.device_status("dev0"), Kind.OFFLINE, forged_offline),  # our topic, their name
                (topics.device_heartbeat("dev1"), Kind.HEARTBEAT, m.Heartbeat(state="idle", uptime_s=1)),
            ],
            start=1,
        ):
            attacker.publish(topic, encode(kind, make_header("idle", "dev1", seq=seq), body))
        attacker.flush(5)
        _poll_until(server, lambda: False, timeout_s=1.5)
        assert server.registry.is_online("dev1") and server.registry.devices["dev1"].session == session
        assert server.registry.devices["dev1"].num_samples == samples
        assert server.endpoint.rejected["header names another device than the topic"] == 1
        attacker.close()
    finally:
        server.endpoint.transport.close()
        for agent in agents:
            agent.close()


@pytest.mark.slow
def test_a_killed_agent_is_dropped_by_its_last_will(fleet, tmp_path) -> None:
    import signal
    import subprocess

    bundle = fleet.deployment.device_bundle("dev2")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_agent",
            "--config",
            str(bundle / "agent.toml"),
            "--broker",
            fleet.url,
            "--data",
            DATA,
            "--no-profile",
            "--heartbeat",
            "30",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = _registered_server(fleet, tmp_path)
    try:
        assert _poll_until(server, lambda: server.registry.is_online("dev2"), timeout_s=60)
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        # heartbeats come every 30 s here and expire after 10 s: only the will can say it this soon
        assert _poll_until(server, lambda: not server.registry.devices["dev2"].online, timeout_s=5)
    finally:
        server.endpoint.transport.close()
        if agent.poll() is None:
            agent.kill()


def test_a_device_that_refuses_the_run_is_counted_shown_and_left_out(broker, tmp_path) -> None:
    """A real server assigns LeNet-5; dev1's owner configured only VGG: dev1 refuses, the run goes on without it."""
    data = load_dataset(DATA, seed=0)
    parts = partition_indices(data.train_y.numpy(), 2, "iid", 0)
    agents = []
    for index, models in enumerate((("lenet5",), ("vgg",))):
        config = AgentConfig(parse_broker_url(broker), f"dev{index}", f"{index}/2", heartbeat_s=0.5, models=models)
        agent = DeviceAgent(config, data, parts[index], None)
        agent.start()
        threading.Thread(target=agent.serve_forever, daemon=True).start()
        agents.append(agent)
    try:
        server = EdgeServer(
            server_config(broker, tmp_path, rounds=2, min_devices=2), load_model("lenet5", seed=0), data
        )
        server.run()
    finally:
        for agent in agents:
            agent.close()
    last = server.history[-1]
    assert "not one this device is configured to train (vgg)" in last["refusals"]["dev1"]
    assert last["refused_messages"] == {"ASSIGN": 1}
    assert not any("refused" in reason for reason in last["rejected_messages"])  # a refusal is not a dropped frame
    assert [r["clusters"] for r in server.history] == [[["dev0", "dev1"]], [["dev0"]]]
    assert agents[1].assignment is None and agents[0].failures == agents[1].failures == 0


def test_a_running_client_reconnects_over_tls_after_the_broker_restarts(fleet) -> None:
    seen: list = []
    device = _client(fleet.address("dev0"), "dev0", seen)
    device.subscribe(topics.all_down_for("dev0"))
    fleet.broker.stop()
    deadline = time.monotonic() + 10
    while device.connected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not device.connected
    fleet.broker.start()
    assert device.wait_connected(30)
    server = _client(fleet.address("server"), "server", [])
    time.sleep(0.3)
    server.publish(topics.down("run", "dev0"), b"after the restart")
    server.flush(5)
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen == [(topics.down("run", "dev0"), b"after the restart")]  # subscriptions renewed too
    server.close()
    device.close()


def test_split_inference_runs_over_tls_with_each_sides_certificate(fleet, tmp_path) -> None:
    """The same protocol and security as training: the service with the server's bundle, the
    device's client with its own; the answers are the trained model's."""
    import numpy as np

    from edge_server.serve import ServeConfig, TailService, load_trained
    from firmware_agent.infer import InferConfig, InferenceClient
    from tests.trained_run import RUN_ID, make_run
    from toolkit.inference.heads import HeadSet

    make_run(tmp_path / "run", cuts=(6, 12))
    model, run_id = load_trained(tmp_path / "run")
    service = TailService(ServeConfig(fleet.address("server"), tmp_path / "run", tail_repeats=1), model, run_id)
    service.start()
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    settings = InferConfig(fleet.address("dev0"), "dev0", RUN_ID, batch_size=2, timeout_s=5.0, head_time_s=0.01)
    client = InferenceClient(settings, HeadSet.open(tmp_path / "run" / "heads"))
    try:
        assert client.connect(), client.service_problem()
        x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
        outcome = client.infer(x, 6)
        with torch.no_grad():
            expected = model.net(torch.from_numpy(x)).numpy()
        assert not outcome.fallback and outcome.cut == 6
        np.testing.assert_allclose(outcome.logits, expected, atol=0.02 * float(np.abs(expected).max()))
        assert service.served[6] == 1
    finally:
        client.close()
        service.stop()
        thread.join(5)
        service.close()
