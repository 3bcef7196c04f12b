"""bench/heldout.py: the held-out check's pure parts (its runs need the testbed and an hour)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchscripts import load_bench_script
from toolkit.planning.advice import SCHEMES

ROOT = Path(__file__).resolve().parents[1]


def load_heldout():
    return load_bench_script("heldout")


def test_goodput_is_the_phy_rate_less_the_per_frame_air_time_the_other_fleet_files_used():
    heldout = load_heldout()
    fleet = json.loads((ROOT / "bench" / "fleets" / "testbed-heavy-wifi.json").read_text())
    assert heldout.wifi_goodput_mbit(16) == pytest.approx(fleet["devices"][0]["uplink_mbit"], abs=1e-3)
    assert heldout.wifi_goodput_mbit(2.5) == pytest.approx(fleet["devices"][2]["uplink_mbit"], abs=1e-3)


def test_every_scheme_the_advisor_plans_is_run_and_the_held_out_pair_is_new():
    heldout = load_heldout()
    assert set(heldout.VARIANT_OF) == set(SCHEMES)
    assert heldout.MODEL not in ("lenet5", "vgg", "widenet")  # what the planning code was fitted on
    spec = json.loads(heldout.SPEC.read_text())
    shares = {d["cpu_share"] for d in spec["devices"]}
    from toolkit.cli.testbed import FLEETS

    assert not shares & {s for fleet in FLEETS.values() for s in fleet[0]}  # no CPU class of another fleet


def test_the_report_sets_each_prediction_beside_the_median_of_its_seeds(tmp_path):
    heldout = load_heldout()
    advice = {
        "recommended": "cpsl-auto",
        "close": [],
        "schemes": [
            {"scheme": "cpsl-auto", "cut": "block3", "round_latency_s": 10.0, "rounds": 5, "time_to_target_s": 50.0},
            {"scheme": "fl", "cut": None, "round_latency_s": 5.0, "rounds": 12, "time_to_target_s": 60.0},
        ],
    }
    (tmp_path / "prediction.json").write_text(json.dumps({"made_utc": "t", "commit": "c", "advice": advice}))

    def run(summed, wall, rounds):
        return {"latency_sum_to_target_s": summed, "wall_to_target_s": wall, "round_to_target": rounds - 1}

    runs = {
        "cpsl-auto": {"0": run(40.0, 90.0, 4), "1": run(45.0, 100.0, 5), "2": run(70.0, 120.0, 6)},
        "fl": {"0": run(55.0, 80.0, 11)},
    }
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ablation.json").write_text(json.dumps({"runs": runs}))
    result = heldout.report(tmp_path)
    auto = result["schemes"]["cpsl-auto"]
    assert auto["measured"]["latency_sum_to_target_s"] == 45.0 and auto["measured"]["rounds"] == 5
    assert auto["error_vs_rounds_sum"] == pytest.approx(50 / 45 - 1)
    assert result["fastest_measured"] == "fl" and not result["names_the_fastest"]
    assert json.loads((tmp_path / "check.json").read_text())["recommended"] == "cpsl-auto"
    table = load_bench_script("evidence").heldout_table(result)
    assert "| cpsl-auto | 3 | block3, 10.0 s, 5, 50.0 s | -, -, 5, 45.0 s, 100.0 s | +11% / -50% |" in table
    assert "said **cpsl-auto**; the fastest measured (median wall clock) was **fl**: it does not name it" in table
