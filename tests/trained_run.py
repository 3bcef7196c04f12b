"""A run folder as a finished training run leaves it (run.json written by the server's own writer,
model.pt), with LeNet-5 weights that a few real SGD steps moved from their seeded start, and
its heads exported at a few cuts: what split inference starts from, made in about a second."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_server.records import atomic_torch_save
from edge_server.run_state import write_settings
from edge_server.server import ServerConfig
from toolkit.inference.heads import export_heads
from toolkit.models import LayeredModel, load_model
from toolkit.transport import parse_broker_url

RUN_ID = "trained-run"
CUTS = (3, 6, 12)  # pool1, pool2 and the whole model (device-only)


def trained_lenet(seed: int = 0) -> LayeredModel:
    model = load_model("lenet5", seed=seed)
    optimiser = torch.optim.SGD(model.net.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(16, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model.net(x), y).backward()
        optimiser.step()
    return model


def make_run(folder: Path, seed: int = 0, cuts: tuple[int, ...] = CUTS, run_id: str = RUN_ID) -> LayeredModel:
    """``folder`` becomes a finished run of LeNet-5 with heads in ``folder/heads``; the model returned."""
    model = trained_lenet(seed)
    folder.mkdir(parents=True, exist_ok=True)
    broker = parse_broker_url("mqtt://127.0.0.1:1883")
    config = ServerConfig(broker, "cpsl", rounds=1, min_devices=1, run_dir=folder, model_spec="lenet5")
    write_settings(folder, config, run_id)
    atomic_torch_save(model.net.state_dict(), folder / "model.pt")
    export_heads(model, folder / "heads", run_id, cuts=list(cuts))
    return model
