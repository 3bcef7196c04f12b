"""Where each side computes (issue #15): the edge server's ``--device`` (item 1) and the agent's
(item 2). On the CPU everywhere; the CUDA cases run where torch sees a GPU and are skipped,
with the reason, elsewhere."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from edge_server.placement import SplitForward, place
from tests.agents import start_agents
from tests.servers import assert_same_weights, centralized, close, run_server, server_config
from toolkit.devices import device_name, resolve_device
from toolkit.errors import UserError
from toolkit.models import load_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device on this machine")


def test_device_names_resolve_or_fail_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="choose cpu, cuda, cuda:N or auto"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"--device cuda:0: torch \S+ sees no CUDA device here \("):
            resolve_device("cuda:0")
    else:
        with pytest.raises(UserError, match="CUDA devices"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_device_names_are_checked_as_flags_before_anything_runs():
    assert device_name(" CUDA:1 ") == "cuda:1" and device_name("auto") == "auto"
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a device"):
            device_name(bad)


def test_the_split_forward_computes_what_the_whole_model_computes():
    model = load_model("lenet5", seed=0)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = model.net(x)
        device = resolve_device("auto")
        place(model.net, 6, device)
        assert next(model.net[6:].parameters()).device.type == device.type
        assert next(model.net[:6].parameters()).device.type == "cpu"
        torch.testing.assert_close(SplitForward(model.net, 6, device)(x), expected, atol=1e-5, rtol=1e-5)
        place(model.net, None, device)
        assert {p.device.type for p in model.net.parameters()} == {"cpu"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_the_server_side_on_any_device_with_a_cpu_agent_trains_the_centralized_weights(
    broker, digits, tmp_path, device
):
    """A CPU agent, the server side on ``device``: the weights are those of the whole model trained
    centrally on the same batches (with one device a cpsl turn is exactly that). Stated tolerance: 1e-5 absolute on the
    CPU; 1e-4 on CUDA after 2 rounds of 4 iterations (its convolution and reduction orders
    differ from the CPU's)."""
    agents, shares = start_agents(broker, digits, 1)
    config = server_config(broker, tmp_path, rounds=2, iterations=4, device=device)
    server = run_server(config, digits)
    close(agents)
    assert {p.device.type for p in server.model.net.parameters()} == {"cpu"}  # all back for model.pt and ONNX
    expected = centralized(digits, [["dev0"]], shares, config)
    assert_same_weights(server.model.net.state_dict(), expected, atol=1e-5 if device == "cpu" else 1e-4)


@pytest.mark.parametrize("scheme", ["cpsl", "fl"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_an_agent_on_any_device_trains_the_centralized_weights_and_registers_where(
    broker, digits, tmp_path, device, scheme
):
    """The device side on ``device`` (cpsl: its layers up to the cut, with smashed data and
    gradients crossing as CPU tensors; fl: the whole model), the server on the CPU: the weights
    are centralized training's on the same batches. Tolerance as above: 1e-5 on the CPU, 1e-4
    on CUDA. The registration says where it trains, and the run's fleet.json keeps it."""
    agents, shares = start_agents(broker, digits, 1, device=device)
    config = server_config(broker, tmp_path, scheme=scheme, rounds=2, iterations=4)
    server = run_server(config, digits)
    close(agents)
    model = agents[0]._model
    assert {p.device.type for p in model.net.parameters()} == {device}
    expected = centralized(digits, [["dev0"]], shares, config)
    assert_same_weights(server.model.net.state_dict(), expected, atol=1e-5 if device == "cpu" else 1e-4)
    capabilities = server.registry.devices["dev0"].capabilities
    assert capabilities.accelerator == device
    assert capabilities.accelerator_name.startswith("cpu" if device == "cpu" else "cuda:0 (")
    (info,) = json.loads((config.run_dir / "fleet.json").read_text())["devices"]
    assert info["accelerator"] == capabilities.accelerator_name, info
