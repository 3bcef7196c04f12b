"""``--metrics-port``: a real run scraped over HTTP mid-run and at the end, parsed with the client's own parser."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edge_server.prometheus import RunMetrics, chain
from edge_server.server import EdgeServer
from tests.agents import start_agents
from tests.scrape import scrape
from tests.servers import close, server_config
from toolkit.data import load_dataset
from toolkit.models import load_model


def test_a_run_is_scraped_while_it_trains_and_at_the_end(broker, tmp_path):
    data = load_dataset("builtin:digits", seed=0)
    agents, _ = start_agents(broker, data, 2)
    config = server_config(broker, tmp_path, rounds=3, min_devices=2)
    server = EdgeServer(config, load_model("lenet5", seed=0), data)
    metrics = RunMetrics(server, config.scheme)
    metrics.serve("127.0.0.1", 0)
    during: list[dict] = []
    server.on_round = chain(metrics.observe, lambda record: during.append(scrape(metrics.port)))
    try:
        server.run()
        final = scrape(metrics.port)
    finally:
        metrics.close()
        close(agents)
    last = server.history[-1]
    assert [d[("cpsl_rounds_total", (("scheme", "cpsl"),))] for d in during] == [1, 2, 3]  # live, round by round
    assert final[("cpsl_round", ())] == 2
    assert final[("cpsl_test_accuracy_ratio", ())] == pytest.approx(last["accuracy"])
    assert final[("cpsl_round_latency_seconds", ())] == pytest.approx(last["latency_s"])
    assert final[("cpsl_round_duration_seconds_count", ())] == 3
    assert final[("cpsl_round_duration_seconds_sum", ())] == pytest.approx(sum(r["latency_s"] for r in server.history))
    assert final[("cpsl_cut_layer", ())] == 6
    assert final[("cpsl_devices_online", ())] == 2
    # the traffic: weights down and gradients from the server, smashed data and weights up from the devices
    for kind in ("weights_down", "gradient"):
        assert final[("cpsl_sent_bytes_total", (("kind", kind),))] > 0
    for kind in ("smashed", "weights_up"):
        assert final[("cpsl_received_bytes_total", (("kind", kind),))] > 0
    sent = final[("cpsl_sent_bytes_total", (("kind", "weights_down"),))]
    assert sent >= 3 * 2 * 0.9 * sum(p.numel() * 4 for p in server.model.net[:6].parameters())  # 3 rounds, 2 devices


@pytest.mark.slow
def test_a_bad_metrics_port_is_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "edge_server", "demo", "--metrics-port", "localhost:99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "[HOST:]PORT with a port from 1 to 65535" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
