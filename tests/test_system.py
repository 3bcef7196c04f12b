"""The training system over a real Mosquitto, real torch: oracles against centralized training,
raw data never on the wire, malformed messages, a device killed mid-round that rejoins."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from edge_server.dashboard.view import BREAKDOWN_PARTS
from edge_server.scheduler import Scheduler
from edge_server.server import EdgeServer
from tests.agents import start_agents
from tests.servers import DATA, assert_same_weights, centralized, close, run_server, server_config
from toolkit.models import load_model
from toolkit.protocol import Kind, decode, encode, make_header, topics
from toolkit.protocol import messages as m
from toolkit.training import weighted_average
from toolkit.transport import MqttTransport, parse_broker_url


def test_cpsl_with_one_device_equals_centralized_training(broker, digits, tmp_path) -> None:
    agents, shares = start_agents(broker, digits, 1)
    config = server_config(broker, tmp_path, rounds=2, iterations=4)
    server = run_server(config, digits)
    close(agents)
    assert_same_weights(server.model.net.state_dict(), centralized(digits, [["dev0"]], shares, config))


def test_sl_over_three_devices_equals_centralized_training_in_turn(broker, digits, tmp_path) -> None:
    agents, shares = start_agents(broker, digits, 3)
    config = server_config(broker, tmp_path, scheme="sl", min_devices=3, rounds=2, iterations=3)
    server = run_server(config, digits)
    close(agents)
    assert [r["clusters"] for r in server.history] == [[["dev0"], ["dev1"], ["dev2"]]] * 2
    expected = centralized(digits, [["dev0"], ["dev1"], ["dev2"]], shares, config)
    assert_same_weights(server.model.net.state_dict(), expected)


@pytest.mark.parametrize("scheme", ["cpsl", "fl"])
def test_the_in_process_rehearsal_computes_what_the_live_system_computes(broker, digits, tmp_path, scheme) -> None:
    """edge_server.rehearsal is what the cut-selection benchmark trusts for rounds to accuracy:
    four devices on non-IID shards, two clusters averaged per turn (or FL), two rounds."""
    from edge_server.rehearsal import RehearsalConfig, rehearse

    agents, shares = start_agents(broker, digits, 4, "dirichlet:0.5")
    cut = None if scheme == "fl" else 4
    config = server_config(broker, tmp_path, scheme=scheme, min_devices=4, clusters=2, cut=cut, momentum=0.5)
    server = run_server(config, digits)
    close(agents)
    model = load_model("lenet5", seed=0)
    rehearsal = RehearsalConfig(
        scheme=scheme,
        cut=cut,
        clusters=2,
        iterations=config.iterations,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=0.5,
        rounds=config.rounds,
    )
    rounds = rehearse(model, digits, [shares[f"dev{i}"] for i in range(4)], rehearsal)
    assert [r.accuracy for r in rounds] == pytest.approx([r["accuracy"] for r in server.history], abs=1e-9)
    assert_same_weights(server.model.net.state_dict(), model.net.state_dict())


def test_fedavg_weights_by_sample_count_by_hand() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}
    averaged = weighted_average([a, b], [100, 300])
    # (1*100 + 4*300)/400 = 3.25 ; (2*100 + 8*300)/400 = 6.5 ; integer buffers are not averaged
    assert torch.equal(averaged["w"], torch.tensor([3.25, 6.5])) and int(averaged["n"]) == 3


def test_every_scheme_trains_and_writes_its_files(broker, digits, tmp_path) -> None:
    agents, _ = start_agents(broker, digits, 2)
    for scheme in ("cpsl", "sfl", "fl"):
        config = server_config(
            broker,
            tmp_path / scheme,
            scheme=scheme,
            min_devices=2,
            rounds=2,
            clusters=2,
            iterations=15,
            batch_size=16,
            cut=None if scheme == "fl" else 3,
            run_id=f"r-{scheme}",
        )
        server = run_server(config, digits)
        records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [0, 1] and records[-1]["scheme"] == scheme
        for key in ("accuracy", "loss", "latency_s", "clusters", "cut", "breakdown"):
            assert key in records[-1]
        assert records[-1]["accuracy"] > 0.2, scheme  # 10 classes: well above chance after two rounds
        assert set(BREAKDOWN_PARTS) <= records[-1]["breakdown"].keys()  # every part the dashboard draws
        for name in ("checkpoint.pt", "model.pt", "model.onnx"):
            assert (config.run_dir / name).stat().st_size > 1000
        state = torch.load(config.run_dir / "model.pt", weights_only=True)
        assert_same_weights(state, server.model.net.state_dict(), atol=0)
    close(agents)


def test_no_message_ever_carries_raw_inputs(broker, digits, tmp_path) -> None:
    wire: queue.Queue = queue.Queue()
    sniffer = MqttTransport(parse_broker_url(broker), "sniffer", lambda topic, data: wire.put(data))
    sniffer.subscribe("cpsl/#")
    sniffer.connect(5)
    agents, shares = start_agents(broker, digits, 2)
    run_server(server_config(broker, tmp_path, min_devices=2, cut=1), digits)
    close(agents)
    sniffer.close()
    frames = []
    while not wire.empty():
        frames.append(wire.get())
    assert len(frames) > 20
    raw = [digits.train_x[i].numpy().tobytes() for share in shares.values() for i in share[:50]]
    for frame in frames:
        for image in raw:
            assert image[1000:1256] not in frame
        message = decode(frame)
        for tensor in message.tensors.values():
            assert tuple(tensor.shape[1:]) != (1, 28, 28)


def _publish_raw(broker: str, topic: str, path) -> None:
    port = broker.rsplit(":", 1)[1]
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1", "-t", topic, "-f", str(path)],
        check=True,
        timeout=20,
    )


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients is not installed")
def test_malformed_messages_are_logged_and_training_finishes(broker, digits, tmp_path, caplog) -> None:
    agents, _ = start_agents(broker, digits, 2)
    config = server_config(broker, tmp_path, min_devices=2, rounds=3, iterations=4, max_frame_bytes=1 << 20)
    server = EdgeServer(config, load_model("lenet5", seed=0), digits)
    thread = threading.Thread(target=server.run)
    thread.start()
    up = topics.up("test-run", "dev0")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00garbage that is not a frame" * 10)
    wrong_shape = tmp_path / "wrong_shape"
    wrong_shape.write_bytes(
        encode(
            Kind.SMASHED,
            make_header("test-run", "dev0", 1, 0, seq=1),
            m.Smashed(),
            {"smashed": torch.randn(8, 3, 3), "labels": torch.zeros(8, dtype=torch.int64)},
        )
    )
    wrong_run = tmp_path / "wrong_run"
    wrong_run.write_bytes(
        encode(
            Kind.SMASHED,
            make_header("other-run", "dev0", 1, 0, seq=2),
            m.Smashed(),
            {"smashed": torch.randn(8, 16, 5, 5), "labels": torch.zeros(8, dtype=torch.int64)},
        )
    )
    huge = tmp_path / "huge"
    huge.write_bytes(b"CPSL" + bytes(2 << 20))
    # publish only once the server is subscribed (it has seen both devices register): under load,
    # a fixed sleep let the first frame reach the broker before the server's subscription did
    deadline = time.monotonic() + 60
    while len(server.registry.online()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    for path in (garbage, wrong_shape, wrong_run, huge):
        _publish_raw(broker, up, path)
    thread.join(timeout=120)
    close(agents)
    assert not thread.is_alive()
    assert [r["round"] for r in server.history] == [0, 1, 2]
    assert all(not r["dropped"] for r in server.history)
    rejected = server.endpoint.rejected
    assert rejected["not a cpsl frame (bad magic)"] == 1
    # the endpoint sees that the header's run is not the topic's before the server's intake does
    assert rejected["header names another run than the topic"] == 1
    assert any(reason.startswith("frame of") for reason in rejected)
    # the wrong-shape frame is refused for its shape, or for its round if it arrived at another time
    assert any(reason.startswith(("smashed shape", "unexpected SMASHED")) for reason in rejected), rejected


def _agent_process(broker: str, index: int, count: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_agent",
            "--broker",
            broker,
            "--device-id",
            f"dev{index}",
            "--data",
            DATA,
            "--partition",
            f"{index}/{count}",
            "--no-profile",
            "--heartbeat",
            "0.5",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_agent_killed_mid_round_is_dropped_and_rejoins(broker, digits, tmp_path) -> None:
    log = (tmp_path / "agents.log").open("w")
    processes = {i: _agent_process(broker, i, 3, log) for i in range(3)}
    killed = threading.Event()

    def on_round(record: dict) -> None:
        if record["round"] == 0:

            def kill_then_restart() -> None:
                time.sleep(0.3)
                processes[1].kill()  # mid round 1: no goodbye, as if the board lost power
                killed.set()
                time.sleep(3.0)
                processes[3] = _agent_process(broker, 1, 3, log)

            threading.Thread(target=kill_then_restart, daemon=True).start()
        if record["round"] == 1:
            # hold the next round until the restarted agent is back (on a loaded machine its
            # start-up can outlast the remaining rounds), the server's intake still running
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not (killed.is_set() and server.registry.is_online("dev1")):
                server.serve_intake(0.1)

    config = server_config(
        broker,
        tmp_path,
        scheme="cpsl",
        min_devices=3,
        rounds=5,
        iterations=10,
        clusters=3,
        iteration_timeout_s=4,
        heartbeat_timeout_s=2,
    )
    server = EdgeServer(config, load_model("lenet5", seed=0), digits, on_round=on_round)
    try:
        server.run()
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
    assert killed.is_set()
    history = server.history
    assert len(history) == 5
    assert "dev1" in history[1]["dropped"]
    assert any(any("dev1" in c for c in r["clusters"]) and "dev1" not in r["dropped"] for r in history[2:]), [
        (r["clusters"], r["dropped"], r["time"]) for r in history
    ]


class MovingCutScheduler(Scheduler):
    """A different cut every round: the live scheduler may move the cut between rounds."""

    def __init__(self, cuts: list[int]):
        self.cuts = cuts

    def plan(self, round_, devices):
        from edge_server.scheduler import RoundPlan

        return RoundPlan(cut=self.cuts[round_], clusters=[[d.id for d in devices]])


def test_moving_the_cut_between_rounds_keeps_training_exact(broker, digits, tmp_path) -> None:
    """The server holds the whole model, so a new cut just splits it elsewhere: with the cut
    moving every round, one device still trains exactly what centralized training does."""
    agents, shares = start_agents(broker, digits, 1)
    config = server_config(broker, tmp_path, rounds=3, iterations=3)
    server = EdgeServer(config, load_model("lenet5", seed=0), digits, scheduler=MovingCutScheduler([6, 3, 10]))
    server.run()
    close(agents)
    assert [r["cut"] for r in server.history] == [6, 3, 10]
    assert_same_weights(server.model.net.state_dict(), centralized(digits, [["dev0"]], shares, config))


def test_agents_and_server_announce_themselves_again_after_a_broker_restart(tmp_path, digits) -> None:
    """Mosquitto without persistence forgets every retained message when it restarts: the
    agents' registrations and the server's status must come back by themselves, so a server
    started afterwards still sees the whole fleet (issue #11)."""
    from tests.brokers import free_port, mosquitto
    from toolkit.transport.mosquitto import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; .ci/run installs it with apt-get")
    port = free_port()
    with mosquitto(tmp_path, port) as url:
        agents, _ = start_agents(url, digits, 2)
        server = EdgeServer(server_config(url, tmp_path, min_devices=2), load_model("lenet5", seed=0), digits)
        server.connect()
    with mosquitto(tmp_path, port) as url:  # the same address, nothing retained
        try:
            inbox: queue.Queue = queue.Queue()
            watcher = MqttTransport(parse_broker_url(url), "watcher", lambda t, d: inbox.put((t, d)))
            deadline = time.monotonic() + 30
            while not all(agent.endpoint.transport.connected for agent in agents) and time.monotonic() < deadline:
                time.sleep(0.2)
            watcher.connect(5)
            watcher.subscribe(topics.ALL_DEVICE_STATUS)
            watcher.subscribe(topics.server_status())
            seen: dict[str, str] = {}
            while len(seen) < 3 and time.monotonic() < deadline:
                try:
                    topic, frame = inbox.get(timeout=1)
                except queue.Empty:
                    continue
                message = decode(frame)
                seen[topic] = message.body.state if message.kind is Kind.SERVER_STATUS else message.kind.name
            assert seen == {
                topics.device_status("dev0"): "REGISTER",
                topics.device_status("dev1"): "REGISTER",
                topics.server_status(): "online",
            }
            watcher.close()
            # and a server that starts now finds both devices
            later = EdgeServer(
                server_config(url, tmp_path, min_devices=2, register_timeout_s=10),
                load_model("lenet5", seed=0),
                digits,
            )
            later.connect()
            later.wait_for_devices()
            assert [d.id for d in later.registry.online()] == ["dev0", "dev1"]
            later.endpoint.transport.close()
        finally:
            server.endpoint.transport.close()
            for agent in agents:
                agent.close()


def test_an_agent_registers_again_when_an_edge_server_comes_online(broker, digits, tmp_path) -> None:
    """A server that (re)starts finds every agent freshly announced, whatever happened to the
    retained registrations meanwhile (issue #11)."""
    agents, _ = start_agents(broker, digits, 1)
    inbox: queue.Queue = queue.Queue()
    watcher = MqttTransport(parse_broker_url(broker), "watcher", lambda t, d: inbox.put(decode(d).kind))
    try:
        watcher.connect(5)
        watcher.subscribe(topics.device_status("dev0"))
        assert inbox.get(timeout=5) is Kind.REGISTER  # the retained one
        time.sleep(1.2)  # past the agent's re-registration limit
        server = EdgeServer(server_config(broker, tmp_path), load_model("lenet5", seed=0), digits)
        server.connect()
        assert inbox.get(timeout=5) is Kind.REGISTER  # announced again to the new server
        server.endpoint.transport.close()
    finally:
        watcher.close()
        for agent in agents:
            agent.close()
