"""Where the edge server computes (issue #15, item 1). On the CPU everywhere; the CUDA cases run
where torch sees a GPU and are skipped, with the reason, elsewhere."""

from __future__ import annotations

import pytest
import torch

from edge_server.placement import SplitForward, place, resolve_device
from tests.agents import start_agents
from tests.test_system import DATA, assert_same_weights, centralized, close, run_server, server_config
from toolkit.data import load_dataset
from toolkit.errors import UserError
from toolkit.models import load_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DATA, seed=0)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device on this machine")


def test_device_names_resolve_or_fail_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="choose cpu, cuda, cuda:N or auto"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="torch sees no CUDA device"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(UserError, match="CUDA devices"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


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
