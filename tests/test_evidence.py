"""bench/evidence.py redraws docs/testbed.md's tables from results, between their markers only."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchscripts import load_bench_script

ROOT = Path(__file__).resolve().parents[1]


def evidence():
    return load_bench_script("evidence")


def ablation_document() -> dict:
    def spread(values):
        return {"median": sorted(values)[len(values) // 2], "min": min(values), "max": max(values), "n": len(values)}

    def row(wall, rounds, round_s, efficiency=None):
        return {
            "wall_to_target_s": spread(wall),
            "ready_to_target_s": spread([w - 100 for w in wall]),
            "rounds_to_target": spread(rounds),
            "mean_round_s": spread(round_s),
            "median_efficiency": spread(efficiency) if efficiency else None,
            "seeds": list(range(len(wall))),
        }

    return {
        "rows": {
            "cpsl-none": row([400, 390, 420], [6, 6, 7], [35.0, 35.5, 36.0]),
            "cpsl-both": row([370, 360, 380], [5, 5, 6], [31.0, 31.5, 32.0], [0.68, 0.7, 0.66]),
            "sl@pool2": row([900], [5], [120.0]),
            "sl@pool3": row([700], [5], [95.0]),
            "fl": row([1500], [11], [128.0]),
        },
        "claims": {
            "cpsl-both vs cpsl-none": {"ratio": 370 / 400, "holds": True},
            "cpsl-both vs sl@pool3": {"ratio": 370 / 700, "holds": True},
        },
        "ceiling_over_none": 1.64,
    }


def test_the_ablation_table_names_the_best_cut_of_a_sweep_and_states_the_claims():
    table = evidence().ablation_table(ablation_document())
    lines = table.splitlines()
    assert lines[2].startswith("| cpsl-none | 3 | 400.0 (390.0-420.0) | 300.0 (290.0-320.0) | 7 (7-8) | 35.50")
    assert any(line.startswith("| sl@pool3 (best of pool2, pool3) | 1 | 700.0 |") for line in lines)
    assert not any(line.startswith("| sl@pool2") for line in lines)
    assert "cpsl-both against cpsl-none: 0.93x the time, holds" in table
    assert "more than 1.64x shorter" in table


def test_render_replaces_only_what_lies_between_a_table_s_markers(tmp_path):
    doc = tmp_path / "testbed.md"
    doc.write_text(
        "# intro\n<!-- evidence:sim-ablation -->\nold table\n<!-- /evidence:sim-ablation -->\n"
        "kept\n<!-- evidence:contention -->\nold\n<!-- /evidence:contention -->\nend\n"
    )
    module = evidence()
    drawn = module.tables(ROOT / "bench" / "results" / "evidence" / "full")
    assert {"sim-ablation", "contention"} <= set(drawn)
    replaced = module.render({"sim-ablation": drawn["sim-ablation"], "missing": "x"}, doc)
    text = doc.read_text()
    assert replaced == ["sim-ablation"]
    assert "old table" not in text and "| heavy, wifi |" in text
    assert "<!-- evidence:contention -->\nold\n<!-- /evidence:contention -->\nend\n" in text
    sim = json.loads((ROOT / "bench/results/evidence/full/sim_ablation/sim_ablation.json").read_text())
    assert text.count("\n| ") == 1 + len(sim["table"])  # the header and one row per scenario


def test_a_claim_on_too_few_seeds_is_not_stated_as_holding():
    document = ablation_document()
    document["rows"]["cpsl-both"] = {**document["rows"]["cpsl-both"], "seeds": [2]}
    table = evidence().ablation_table(document)
    assert "cpsl-both against cpsl-none: 0.93x the time, no claim: too few seeds" in table
    full = evidence().ablation_table(ablation_document())
    assert "cpsl-both against sl@pool3: 0.53x the time, no claim: too few seeds" in full  # one seed, not 3x slower


def test_unequal_cluster_variants_are_drawn_after_the_fixed_ones_with_their_claims_and_round_gain():
    document = ablation_document()
    document["rows"]["cpsl-both-max7"] = document["rows"]["cpsl-both"] | {
        "mean_round_s": {"median": 28.4, "min": 28.0, "max": 29.0, "n": 3}
    }
    document["claims"]["cpsl-both-max7 vs cpsl-none"] = {"ratio": 0.9, "holds": True}
    table = evidence().ablation_table(document)
    names = [line.split(" | ")[0] for line in table.splitlines()[2:] if line.startswith("| ")]
    assert names[:3] == ["| cpsl-none", "| cpsl-both", "| cpsl-both-max7"]
    assert "cpsl-both-max7 against cpsl-none: 0.90x the time, holds" in table
    assert "Rounds shorter than cpsl-none's (medians): cpsl-both 1.13x, cpsl-both-max7 1.25x." in table


def test_the_ablation_bench_reads_a_cluster_cap_from_a_planned_variant_s_name():
    ablation = load_bench_script("ablation")
    spec = ablation.run_spec("cpsl-both-max7", "pool3")
    flags = spec.server_flags()
    assert spec.max_cluster_size == 7 and flags[flags.index("--max-cluster-size") + 1] == "7"
    assert "--cut" in flags and "--random-clusters" not in flags
    assert ablation.run_spec("cpsl-auto-max5", "pool3").max_cluster_size == 5
    assert "--max-cluster-size" not in ablation.run_spec("cpsl-both", "pool3").server_flags()
    for bad in ("cpsl-none-max7", "cpsl-both-max0", "cpsl-both-maxx", "sl-max3"):
        try:
            ablation.run_spec(bad, "pool3")
        except SystemExit as error:
            assert bad in str(error)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_a_baseline_over_3x_slower_than_every_cpsl_auto_variant_runs_one_seed():
    from types import SimpleNamespace

    ablation = load_bench_script("ablation")
    args = SimpleNamespace(all_seeds=False)
    results = {
        "cpsl-auto-max7": {0: {"wall_to_target_s": 300.0}, 1: {"wall_to_target_s": 340.0}},
        "fl": {0: {"wall_to_target_s": 1500.0}},
        "sl@pool3": {0: {"wall_to_target_s": 900.0}},
        "sfl@pool3": {},
    }
    assert ablation.skipped(args, results, "fl", 1)  # 1500 s > 3 x 340 s
    assert not ablation.skipped(args, results, "sl@pool3", 1)  # 900 s < 1020 s: every seed
    assert not ablation.skipped(args, results, "sfl@pool3", 0)  # nothing run yet
    assert not ablation.skipped(args, results, "cpsl-auto-max7", 2)
    assert not ablation.skipped(SimpleNamespace(all_seeds=True), results, "fl", 1)
    assert not ablation.skipped(args, {"fl": results["fl"]}, "fl", 1)  # no cpsl-auto to compare with


def test_one_seed_quick_results_never_replace_a_table_the_full_results_hold(tmp_path):
    module = evidence()
    quick = tmp_path / "quick"
    (quick / "sim_ablation").mkdir(parents=True)
    full_sim = ROOT / "bench/results/evidence/full/sim_ablation/sim_ablation.json"
    document = json.loads(full_sim.read_text())
    for entry in document["table"].values():
        entry["cut"] = "quick-cut"
    (quick / "sim_ablation" / "sim_ablation.json").write_text(json.dumps(document))
    (quick / "ablation_default_wifi").mkdir()
    (quick / "ablation_default_wifi" / "ablation.json").write_text(json.dumps(ablation_document()))
    drawn = module.drawing(quick)
    assert "quick-cut" not in drawn["sim-ablation"]  # the full folder's three seeds
    assert drawn["ablation-default-wifi"] == module.ablation_table(ablation_document())  # only quick has it


def test_time_from_the_fleet_s_registration_never_starts_before_the_server():
    ablation = load_bench_script("ablation")
    records = [{"latency_s": 10.0, "accuracy": a, "time": 1000.0 + 10 * i} for i, a in enumerate((0.5, 0.95))]
    booted_throttled = ablation.summarize(records, started_at=900.0, target=0.9, ready_at=950.0)
    assert booted_throttled["wall_to_target_s"] == 110.0 and booted_throttled["ready_to_target_s"] == 60.0
    registered_first = ablation.summarize(records, started_at=900.0, target=0.9, ready_at=880.0)
    assert registered_first["ready_to_target_s"] == registered_first["wall_to_target_s"] == 110.0


def test_render_fills_a_new_pair_of_markers_with_nothing_between_them(tmp_path):
    doc = tmp_path / "testbed.md"
    doc.write_text("a\n<!-- evidence:x -->\n<!-- /evidence:x -->\nb\n<!-- evidence:y -->\nold\n<!-- /evidence:y -->\n")
    assert evidence().render({"x": "| new |", "y": "| newer |"}, doc) == ["x", "y"]
    assert doc.read_text() == (
        "a\n<!-- evidence:x -->\n| new |\n<!-- /evidence:x -->\n"
        "b\n<!-- evidence:y -->\n| newer |\n<!-- /evidence:y -->\n"
    )


def test_a_swept_cut_that_lost_its_first_seed_clearly_runs_no_more_seeds():
    from types import SimpleNamespace

    ablation = load_bench_script("ablation")
    args = SimpleNamespace(all_seeds=False)
    results = {
        "cpsl-auto": {0: {"wall_to_target_s": 200.0}},
        "sl@pool2": {0: {"wall_to_target_s": 400.0}},
        "sl@pool3": {0: {"wall_to_target_s": 380.0}},
        "sl@fc1": {0: {"wall_to_target_s": 500.0}},
        "sl@pool1": {0: {"wall_to_target_s": None, "gave_up_after_s": 600.0}},
        "sfl@pool3": {0: {"wall_to_target_s": 500.0}},
    }
    assert not ablation.skipped(args, results, "sl@pool3", 1)  # the best cut
    assert not ablation.skipped(args, results, "sl@pool2", 1)  # within 10% of it
    assert ablation.skipped(args, results, "sl@fc1", 1)  # 500 s > 1.1 x 380 s
    assert ablation.skipped(args, results, "sl@pool1", 1)  # stopped at 3x cpsl-auto's slowest
    assert not ablation.skipped(args, results, "sfl@pool3", 1)  # a sweep of one cut: every seed
    assert not ablation.skipped(SimpleNamespace(all_seeds=True), results, "sl@fc1", 1)


def test_a_baseline_is_stopped_at_3x_cpsl_auto_s_slowest_seed_and_a_claim_against_it_is_an_upper_bound():
    from types import SimpleNamespace

    ablation = load_bench_script("ablation")
    args = SimpleNamespace(all_seeds=False)
    results = {"cpsl-auto": {0: {"wall_to_target_s": 180.0}, 1: {"wall_to_target_s": 190.0}}, "fl": {}}
    assert ablation.give_up_after(args, results, "fl") == 570.0
    assert ablation.give_up_after(args, results, "cpsl-auto") is None
    assert ablation.give_up_after(SimpleNamespace(all_seeds=True), results, "fl") is None
    assert ablation.give_up_after(args, {"fl": {}}, "fl") is None  # no cpsl-auto yet: runs to its end
    records = [{"latency_s": 100.0, "accuracy": a, "time": 1000.0 + 100 * i} for i, a in enumerate((0.3, 0.5))]
    stopped = ablation.summarize(records, started_at=900.0, target=0.9, gave_up_after_s=570.0)
    assert stopped["wall_to_target_s"] is None and stopped["gave_up_after_s"] == 570.0
    verdict = ablation.claim(list(results["cpsl-auto"].values()), [stopped])
    assert verdict["at_most"] and verdict["holds"] and verdict["theirs"] == 570.0
    rounds = ablation.claim([{"mean_round_s": 25.0}], [stopped], "mean_round_s")  # its rounds were measured
    assert rounds["ratio"] == 0.25 and "at_most" not in rounds
    reached = ablation.summarize(records, started_at=900.0, target=0.5, gave_up_after_s=570.0)
    assert reached["gave_up_after_s"] is None  # it reached the target before it was stopped


def test_the_table_shows_a_stopped_run_as_a_bound_and_ranks_a_sweep_by_its_first_seed():
    document = ablation_document()
    for name in ("cpsl-none", "cpsl-both"):
        document["rows"][name]["wall_to_target_s"]["max"] = 190.0
    document["rows"]["fl"] = {
        **document["rows"]["fl"],
        "wall_to_target_s": None,
        "gave_up_after_s": {"median": 570.0, "min": 570.0, "max": 570.0, "n": 1},
    }
    document["rows"]["sl@pool2"]["wall_to_target_s"]["median"] = 650.0  # its 3 seeds' median, below pool3's first
    document["runs"] = {"sl@pool2": {"0": {"wall_to_target_s": 900.0}}, "sl@pool3": {"0": {"wall_to_target_s": 700.0}}}
    document["claims"]["cpsl-both vs fl"] = {"ratio": 370 / 570, "holds": True, "at_most": True}
    table = evidence().ablation_table(document)
    assert "| fl | 1 | > 570.0 (stopped) |" in table
    assert "cpsl-both against fl: at most 0.65x the time, holds" in table  # stopped at 3x our slowest (190 s)
    assert any(line.startswith("| sl@pool3 (best of pool2, pool3)") for line in table.splitlines())
