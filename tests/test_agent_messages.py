"""What a device agent does with a server's messages that it cannot or need not act on: it says
so instead of going quiet, and it keeps what belongs to another run. Fed through the agent's
public ``handle`` with frames recorded from a real run; nothing travels."""

from __future__ import annotations

import dataclasses
import time

from firmware_agent.agent import MAX_STREAMS, AgentConfig, DeviceAgent
from tests.frames import KeptFrames
from tests.fuzzing import recorded_frames
from toolkit.data import load_dataset, partition_indices
from toolkit.protocol import Kind
from toolkit.protocol.codec import Message, decode
from toolkit.protocol.endpoint import Received
from toolkit.transport import BrokerAddress


def recorded(kind: Kind, device: str = "dev0") -> Message:
    return next(m for m in (decode(r.frame) for r in recorded_frames() if r.kind is kind) if m.header.device == device)


def agent_with_transport() -> tuple[DeviceAgent, KeptFrames]:
    data = load_dataset("builtin:digits", seed=0)
    indices = partition_indices(data.train_y.numpy(), 2, "iid", 0)[0]
    agent = DeviceAgent(AgentConfig(BrokerAddress("127.0.0.1", 1), "dev0", "0/2"), data, indices, None)
    transport = KeptFrames()
    agent.endpoint.attach(transport)
    return agent, transport


def deliver(agent: DeviceAgent, message: Message) -> None:
    agent.handle(
        Received(
            topic=f"cpsl/v1/runs/{message.header.run}/devices/dev0/down",
            message=message,
            size=0,
            received_at=time.monotonic(),
        )
    )


def test_weights_that_do_not_fit_the_model_are_refused_at_once():
    agent, transport = agent_with_transport()
    deliver(agent, recorded(Kind.ASSIGN))
    weights = recorded(Kind.WEIGHTS_DOWN)
    missing = dict(list(weights.tensors.items())[1:])  # the first layer's weight left out
    deliver(agent, dataclasses.replace(weights, tensors=missing))
    [reject] = transport.sent(Kind.REJECT)
    assert reject.body.refused == "WEIGHTS_DOWN" and "do not fit the model" in reject.body.reason
    assert reject.header.run == weights.header.run and agent.state == "idle"
    assert not transport.sent(Kind.SMASHED)  # nothing was trained


def test_a_stop_for_another_run_leaves_the_assignment_and_one_for_ours_clears_it():
    agent, _ = agent_with_transport()
    assign = recorded(Kind.ASSIGN)
    deliver(agent, assign)
    stop = recorded(Kind.STOP)
    deliver(agent, dataclasses.replace(stop, header=stop.header.model_copy(update={"run": "another"})))
    assert agent.assigned_run == assign.header.run and agent.assignment is not None
    deliver(agent, stop)
    assert agent.assigned_run == "" and agent.assignment is None


def test_an_agent_serving_run_after_run_keeps_a_bounded_number_of_batch_streams():
    agent, _ = agent_with_transport()
    assign = recorded(Kind.ASSIGN)
    weights = recorded(Kind.WEIGHTS_DOWN)
    agent.stop()  # each turn ends at its first wait for the server
    for number in range(MAX_STREAMS + 5):
        run = f"run-{number}"
        deliver(agent, dataclasses.replace(assign, header=assign.header.model_copy(update={"run": run})))
        deliver(agent, dataclasses.replace(weights, header=weights.header.model_copy(update={"run": run})))
    batch = agent.assignment.hyper.batch_size
    assert agent.batch_streams == [(f"run-{number}", batch) for number in range(5, MAX_STREAMS + 5)]
