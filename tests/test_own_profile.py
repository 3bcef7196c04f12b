"""The edge server's own profile (issue #15, item 3): measured at start when --auto has none,
cached, used by the planner, and named in the first decision."""

from __future__ import annotations

import torch

from edge_server.own_profile import own_profile, pooled_batch_sizes
from edge_server.server import EdgeServer, ServerConfig
from toolkit.data import load_dataset
from toolkit.models import load_model
from toolkit.transport import parse_broker_url


def test_the_server_measures_itself_once_caches_it_and_leaves_the_runs_random_draws_alone(tmp_path):
    model = load_model("lenet5", seed=0)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    profile, source = own_profile(model, [8, 32], cache=tmp_path)
    assert source.startswith("measured here") and torch.equal(torch.rand(3), expected_next)
    assert profile.settings.batch_sizes == [8, 32] and profile.device.id == "edge-server"
    assert profile.model.fingerprint == model.fingerprint()
    again, source = own_profile(model, [8, 32], cache=tmp_path)
    assert source.startswith("cached") and again == profile
    (cached,) = tmp_path.glob("*.json")
    cached.write_text("{broken")
    _, source = own_profile(model, [8, 32], cache=tmp_path)  # a damaged entry is measured again
    assert source.startswith("measured")
    assert pooled_batch_sizes(32, 2) == [32, 128] and pooled_batch_sizes(16, 8) == [16, 128]


def test_auto_plans_with_the_servers_own_profile_and_says_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setattr("edge_server.own_profile.CACHE", tmp_path)
    config = ServerConfig(
        parse_broker_url("mqtt://127.0.0.1:1"), "cpsl", 1, 4, batch_size=8, auto=True, run_dir=tmp_path
    )
    server = EdgeServer(config, load_model("lenet5", seed=0), load_dataset("builtin:digits"))
    scheduler = server.scheduler
    assert scheduler.server_profile is not None and scheduler.server_profile.device.id == "edge-server"
    assert scheduler.server_profile.settings.batch_sizes == [8, 32]  # clusters of 2: pooled 16, at least 4x
    assert scheduler.server_profile_source.startswith(("measured here", "cached"))
