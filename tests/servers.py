"""Helpers for tests that run the real edge server: its test configuration, the centralized
oracle, and weight comparison. Shared here, not imported from another test module."""

from __future__ import annotations

import torch

from edge_server.server import EdgeServer, ServerConfig
from toolkit.models import load_model
from toolkit.training import BatchStream, stream_seed
from toolkit.transport import parse_broker_url

DATA = "builtin:digits"


def server_config(broker: str, tmp_path, **overrides) -> ServerConfig:
    values = dict(
        broker=parse_broker_url(broker),
        scheme="cpsl",
        rounds=2,
        min_devices=1,
        batch_size=8,
        iterations=3,
        lr=0.05,
        momentum=0.0,
        clusters=1,
        cut=6,
        run_dir=tmp_path / "run",
        run_id="test-run",
        iteration_timeout_s=10,
        register_timeout_s=20,
    )
    values.update(overrides)
    return ServerConfig(**values)


def centralized(data, order: list[list[str]], shares: dict, config: ServerConfig) -> dict[str, torch.Tensor]:
    """The whole model trained in one place on the batches the devices would draw, in schedule order."""
    model = load_model("lenet5", seed=0)
    optimizer = torch.optim.SGD(model.net.parameters(), lr=config.lr)
    streams = {d: BatchStream(shares[d], config.batch_size, stream_seed(config.data_seed, d)) for d in shares}
    for _ in range(config.rounds):
        for cluster in order:
            for _ in range(config.iterations):
                batches = [streams[d].next() for d in sorted(cluster)]
                x = torch.cat([data.train_x[b] for b in batches])
                y = torch.cat([data.train_y[b] for b in batches])
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model.net(x), y).backward()
                optimizer.step()
    return model.net.state_dict()


def run_server(config: ServerConfig, data) -> EdgeServer:
    server = EdgeServer(config, load_model("lenet5", seed=0), data)
    server.run()
    return server


def close(agents) -> None:
    for agent in agents:
        agent.close()


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
