"""bench/soak.py: memory growth is measured from the first sample past the warm-up to the last."""

from __future__ import annotations

from tests.benchscripts import load_bench_script


def test_growth_counts_from_the_first_sample_past_the_warmup_to_the_last():
    soak = load_bench_script("soak")
    samples = [
        {"round": 10, "rss": {"server": 50, "agent-0": 40}},  # before the warm-up: left out
        {"round": 100, "rss": {"server": 100, "agent-0": 80}},
        {"round": 500, "rss": {"server": 103, "agent-0": 90}},
        {"round": 1000, "rss": {"server": 104, "agent-0": 80}},
        {"round": 1000, "rss": {}},  # sampled as the demo ended: left out
    ]
    grown = soak.growth(samples, warmup=100)
    assert abs(grown["server"]["growth"] - 0.04) < 1e-12
    assert grown["agent-0"]["growth"] == 0.0
    assert soak.growth(samples[:2], warmup=100) == {}  # one sample past the warm-up: nothing to compare
