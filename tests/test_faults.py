"""Faults mid-round with a real Mosquitto, real agents and a real server (issue #11): the broker
stopped and restarted at three points of a round, with and without its persistence."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from edge_server.server import EdgeServer, ServerConfig
from tests.agents import start_agents
from tests.brokers import free_port
from toolkit.data import load_dataset
from toolkit.models import load_model
from toolkit.protocol import Kind
from toolkit.transport import parse_broker_url
from toolkit.transport.mosquitto import MosquittoProcess, mosquitto_binary

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (.ci/run installs it)")


def broker_config(folder, port: int, persistence: bool) -> MosquittoProcess:
    config = folder / f"mosquitto-{port}.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_type error"]
    if persistence:
        lines += ["persistence true", f"persistence_location {folder}/", "autosave_interval 1"]
    else:
        lines += ["persistence false"]
    config.write_text("\n".join(lines) + "\n")
    return MosquittoProcess(config, port)


class WatchedServer(EdgeServer):
    """The real server, telling the test when it sends a chosen message: the outages hit the
    points of a round they are meant to, whatever this machine's speed."""

    def __init__(self, *args, triggers: dict[tuple, threading.Event], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.triggers = triggers
        send = self.link.send

        def watched(device, kind, body, round_, iteration=0, tensors=None) -> int:
            sent = send(device, kind, body, round_, iteration, tensors)
            event = self.triggers.get((kind, round_, iteration))
            if event is not None:
                event.set()
            return sent

        self.link.send = watched


ITERATIONS = 8


def three_device_config(url: str, folder, run_id: str, iteration_timeout_s: float = 20) -> ServerConfig:
    """Five rounds of one cluster of three devices, short turns."""
    return ServerConfig(
        broker=parse_broker_url(url),
        scheme="cpsl",
        rounds=5,
        min_devices=3,
        batch_size=8,
        iterations=ITERATIONS,
        clusters=1,
        cut=6,
        run_dir=folder / "run",
        run_id=run_id,
        iteration_timeout_s=iteration_timeout_s,
        register_timeout_s=20,
    )


POINTS = {  # where in which round the broker goes away
    "weights down (start of round 1)": (Kind.WEIGHTS_DOWN, 1, 0),
    "gradients, mid-turn (round 2)": (Kind.GRADIENT, 2, 3),
    "before the weights go up (round 3)": (Kind.GRADIENT, 3, ITERATIONS - 1),
}


@pytest.mark.parametrize("persistence", [False, True], ids=["no-persistence", "persistence"])
@pytest.mark.slow
def test_a_broker_restarted_at_three_points_of_rounds_loses_no_round(tmp_path, tmp_path_factory, persistence):
    """Stopped (SIGTERM; SIGKILL with persistence on, so no final save) as the weights go
    down, mid-turn, and just before the weights go up, and started again a second later on
    the same port. Both ends reconnect, announce themselves and send again what was in
    flight; every round completes once, in order, with every device."""
    fault_free = fault_free_accuracy(tmp_path_factory)
    faulty = run_with_outages(tmp_path / "stormy", persistence, outages=True)
    assert [r["round"] for r in faulty.history] == [0, 1, 2, 3, 4]
    for record in faulty.history:
        assert record["dropped"] == [], record
        assert sorted(record["clusters"][0]) == ["dev0", "dev1", "dev2"]
    # nothing lost, nothing trained twice: the same batches in the same order as without outages
    assert [r["accuracy"] for r in faulty.history] == pytest.approx(fault_free)


_FAULT_FREE: list[float] = []


def fault_free_accuracy(tmp_path_factory) -> list[float]:
    """The accuracies of the same run without outages: one run serves both parametrisations
    (persistence changes nothing while the broker stays up)."""
    if not _FAULT_FREE:
        server = run_with_outages(tmp_path_factory.mktemp("calm"), persistence=False, outages=False)
        _FAULT_FREE.extend(r["accuracy"] for r in server.history)
    return _FAULT_FREE


def run_with_outages(folder, persistence: bool, outages: bool) -> EdgeServer:
    folder.mkdir(exist_ok=True)
    port = free_port()
    broker = broker_config(folder, port, persistence).start()
    url = f"mqtt://127.0.0.1:{port}"
    data = load_dataset("builtin:digits", seed=0)
    agents, _ = start_agents(url, data, 3)
    config = three_device_config(url, folder, "faults")
    triggers = {point: threading.Event() for point in POINTS.values()}
    server = WatchedServer(config, load_model("lenet5", seed=0), data, triggers=triggers)
    failure: list[BaseException] = []

    def train() -> None:
        try:
            server.run()
        except BaseException as exc:  # reported below
            failure.append(exc)

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        for name, point in POINTS.items() if outages else ():
            assert triggers[point].wait(timeout=120), f"the run never reached {name}"
            broker.restart(kill=persistence)
        trainer.join(timeout=180)
    finally:
        for agent in agents:
            agent.close()
        broker.stop()
    assert not trainer.is_alive(), "the server did not finish"
    assert not failure, failure
    return server


@pytest.mark.slow
def test_an_agent_killed_mid_turn_and_restarted_gets_its_turn_started_again(broker, tmp_path):
    """dev1's process dies mid-turn (its socket closes without a goodbye: the broker delivers
    its will) and a new agent for dev1 starts a second later. When it registers, the server
    starts the turn again with the server side as it was and every device on the same batches:
    nothing is dropped and the run ends with the weights of a run without the fault."""
    from firmware_agent.agent import AgentConfig, DeviceAgent

    data = load_dataset("builtin:digits", seed=0)
    twin_agents, _ = start_agents(broker, data, 3)
    twin = EdgeServer(three_device_config(broker, tmp_path / "twin", "twin"), load_model("lenet5", seed=0), data)
    try:
        twin.run()
    finally:
        for agent in twin_agents:
            agent.close()

    agents, shares = start_agents(broker, data, 3)
    config = three_device_config(broker, tmp_path, "restarts", iteration_timeout_s=30)
    kill_point = (Kind.GRADIENT, 2, 2)
    triggers = {kill_point: threading.Event()}
    server = WatchedServer(config, load_model("lenet5", seed=0), data, triggers=triggers)
    trainer = threading.Thread(target=server.run, daemon=True)
    trainer.start()
    reborn = None
    turns: list[tuple[int, int | None]] = []  # (round, stream position) of each turn the new life trains
    try:
        assert triggers[kill_point].wait(timeout=120)
        victim = agents[1]
        victim.stop()
        victim.endpoint.transport._client._sock.close()  # the process is gone: no DISCONNECT, no goodbye
        victim.endpoint.transport._client.loop_stop()
        time.sleep(1.0)
        reborn = DeviceAgent(
            AgentConfig(parse_broker_url(broker), "dev1", "1/3", heartbeat_s=0.5), data, shares["dev1"], None
        )
        train_turn = reborn._train_turn

        def counted_turn(weights, agent=reborn):
            turns.append((weights.header.round, agent.assignment.stream_position))
            train_turn(weights)

        reborn._train_turn = counted_turn
        reborn.start()
        threading.Thread(target=reborn.serve_forever, daemon=True).start()
        trainer.join(timeout=180)
    finally:
        for agent in [*agents, *([reborn] if reborn else [])]:
            agent.close()
    assert not trainer.is_alive()
    history = server.history
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    assert all(r["dropped"] == [] for r in history)
    assert history[2]["restarted_turns"] == [{"cluster": 0, "device": "dev1"}]
    # the timeline keeps the abandoned attempt (the server's stamps of it) before the one that completed
    rows = history[2]["timeline"]
    abandoned = [r for r in rows if r.get("abandoned")]
    assert abandoned and rows.index(abandoned[-1]) < rows.index(next(r for r in rows if not r.get("abandoned")))
    assert all("forward_start" not in r for r in abandoned)  # no device reported on it
    assert any("server_step" in r for r in abandoned)  # the server stepped before dev1 died
    completed = [r for r in rows if not r.get("abandoned")]
    assert {(r["device"], r["iteration"]) for r in completed} == {
        (d, i) for d in ("dev0", "dev1", "dev2") for i in range(ITERATIONS)
    }
    assert [t.get("abandoned", False) for t in history[2]["transfers"]].count(True) == 3
    assert history[2]["latency_s"] < config.iteration_timeout_s  # started again when it came back, not at a deadline
    assert all("restarted_turns" not in r for r in history[:2] + history[3:])
    assert turns == [(2, 2 * ITERATIONS), (3, 3 * ITERATIONS), (4, 4 * ITERATIONS)]  # round 2 again, from its start
    assert [r["accuracy"] for r in history] == [r["accuracy"] for r in twin.history]
    got, want = server.model.net.state_dict(), twin.model.net.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)


def test_a_device_out_of_memory_mid_turn_says_so_and_is_dropped_at_once(broker, tmp_path, caplog):
    """dev1's first forward of the turn fails as a Jetson's GPU out of memory would (torch's own
    exception, raised by a hook on its first layer): the agent tells the server why (a REJECT
    of the weights) instead of going silent, the server drops it from the run at once -- long
    before its iteration timeout -- and the round completes with dev0; the agent serves on."""
    data = load_dataset("builtin:digits", seed=0)
    agents, _ = start_agents(broker, data, 2)

    def out_of_memory(module, inputs):
        if module.training:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    agents[1]._build("lenet5").net[0].register_forward_pre_hook(out_of_memory)
    config = dataclasses.replace(three_device_config(broker, tmp_path, "oom", 30), rounds=3, min_devices=2)
    server = EdgeServer(config, load_model("lenet5", seed=0), data)
    started = time.monotonic()
    try:
        with caplog.at_level("WARNING", logger="cpsl.server"):
            server.run()
    finally:
        for agent in agents:
            agent.close()
    assert time.monotonic() - started < config.iteration_timeout_s  # not one timeout waited out
    first = server.history[0]
    assert first["dropped"] == ["dev1"], first["dropped"]
    assert first["refusals"]["dev1"].startswith("WEIGHTS_DOWN: out of memory on cpu at batch 8 ")
    assert all(r["clusters"] == [["dev0"]] for r in server.history[1:])  # out for the rest of the run
    assert agents[1].failures == 1  # counted and logged; its serve loop went on
    assert any("could not carry out WEIGHTS_DOWN: out of memory" in r.getMessage() for r in caplog.records)
