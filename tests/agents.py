"""Real device agents in this process, against a real broker: the fleet most system tests train."""

from __future__ import annotations

import threading

import numpy as np

from firmware_agent.agent import AgentConfig, DeviceAgent
from toolkit.data import partition_indices
from toolkit.transport import parse_broker_url


def start_agents(
    broker: str, data, count: int, scheme: str = "iid", profile: bytes | None = None, device: str = "cpu"
) -> tuple[list[DeviceAgent], dict[str, np.ndarray]]:
    """``count`` agents dev0.. on ``scheme`` partitions of ``data``, each serving on a thread;
    returns them and each device's sample indices. Close them when done."""
    parts = partition_indices(data.train_y.numpy(), count, scheme, 0)
    agents, shares = [], {}
    for index in range(count):
        name = f"dev{index}"
        shares[name] = parts[index]
        config = AgentConfig(parse_broker_url(broker), name, f"{index}/{count}", heartbeat_s=0.5, device=device)
        agent = DeviceAgent(config, data, parts[index], profile)
        agent.start()
        threading.Thread(target=agent.serve_forever, daemon=True).start()
        agents.append(agent)
    return agents, shares
