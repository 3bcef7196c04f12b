"""The scheme advisor: per-scheme plans on one fleet, and `edge_server advise`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toolkit.planning.advice import SCHEMES, advise, plan_schemes
from toolkit.planning.clustering import ClusterBounds
from toolkit.planning.costs import model_costs
from toolkit.planning.latency import FleetState, TrainingSettings
from toolkit.planning.rates import LinearRates, SharedRates
from toolkit.profile_format import load_profile

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "profiles" / "epyc-vm-2vcpu" / "lenet5.json"
COSTS = model_costs(load_profile(LENET))
SETTINGS = TrainingSettings(32, 20)
UP = np.array([14.0, 5.6, 2.4, 5.6]) * 1e6


def fleet(rates) -> FleetState:
    return FleetState(np.array([1.0, 0.5, 0.25, 1.0]), rates(UP), rates(2 * UP))


def test_every_scheme_is_planned_as_the_server_runs_it():
    plans = plan_schemes(COSTS, fleet(LinearRates), SETTINGS, ClusterBounds(2, 2), COSTS.resolve("pool2").cut)
    assert list(plans) == list(SCHEMES)
    assert plans["sl"].clusters == ((0,), (1,), (2,), (3,))
    assert plans["sfl"].clusters == ((0, 1, 2, 3),)
    assert plans["cpsl-fixed"].clusters == ((0, 2), (1, 3))
    assert plans["fl"].cut is None and plans["sl"].cut_name == "pool2"
    assert sorted(d for c in plans["cpsl-auto"].clusters for d in c) == [0, 1, 2, 3]
    assert all(p.round_latency_s > 0 for p in plans.values())
    # SL's devices take turns, so each has the medium alone: its round is the sum of solo turns
    assert plans["sl"].round_latency_s > plans["cpsl-fixed"].round_latency_s


def test_on_a_byte_shared_medium_overlap_makes_the_parallel_schemes_faster_than_on_air_time():
    cut = COSTS.resolve("pool2").cut
    air = plan_schemes(COSTS, fleet(LinearRates), SETTINGS, ClusterBounds(2, 2), cut)
    wired = plan_schemes(COSTS, fleet(lambda r: SharedRates(r, float(r.sum()))), SETTINGS, ClusterBounds(2, 2), cut)
    for scheme in ("sfl", "fl", "cpsl-fixed"):
        assert wired[scheme].round_latency_s < air[scheme].round_latency_s
    # SL never overlaps anything: one device at a time is the same on both media
    assert wired["sl"].round_latency_s == pytest.approx(air["sl"].round_latency_s, rel=1e-9)


def test_advice_takes_the_shortest_time_to_target_and_says_what_it_rests_on():
    plans = plan_schemes(COSTS, fleet(LinearRates), SETTINGS, ClusterBounds(2, 2), COSTS.resolve("pool2").cut)
    by_latency = advise(plans)
    assert by_latency.recommended == min(plans, key=lambda s: plans[s].round_latency_s)
    assert "rounds to the target unknown" in by_latency.basis
    rounds = {"sl": 6.0, "sfl": 19.0, "fl": None, "cpsl-fixed": 8.0, "cpsl-auto": 12.0}
    advice = advise(plans, rounds)
    times = {s: plans[s].round_latency_s * r for s, r in rounds.items() if r is not None}
    assert advice.recommended == min(times, key=times.get)
    assert "fl did not reach it" in advice.basis
    lines = advice.lines()
    assert lines[0].startswith("scheme") and len(lines) == len(SCHEMES) + 2 + bool(advice.close)
    assert lines[len(SCHEMES) + 1].startswith(f"run {advice.recommended}")
    assert advice.to_dict()["schemes"][2]["time_to_target_s"] is None


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_server", "advise", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


WIFI_FLEET = ("--profile", str(LENET), "--fleet", str(ROOT / "bench" / "fleets" / "testbed-wifi.json"))
# a rehearsal short enough for the quick tier: iid digits to 80% within 6 rounds of 5 iterations
SHORT_REHEARSAL = ("--data", "builtin:digits", "--non-iid", "iid", "--target", "0.8", "--max-rounds", "6")
SHORT_REHEARSAL += ("--local-iterations", "5")


@pytest.mark.slow
def test_advise_rehearses_each_scheme_and_prints_and_writes_the_table(tmp_path):
    out = tmp_path / "advice.json"
    result = cli(*WIFI_FLEET, *SHORT_REHEARSAL, "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "airtime medium" in result.stdout and "run " in result.stdout
    advice = json.loads(out.read_text())
    assert [row["scheme"] for row in advice["schemes"]] == list(SCHEMES)
    assert advice["recommended"] in SCHEMES and advice["skew"] < 0.2
    assert any(row["rounds"] for row in advice["schemes"])
    # no --server-profile: the server side planned on this machine's own measurement, and said so
    assert advice["server"]["device"] == "cpu"
    assert advice["server"]["profile"].startswith(("measured here", "cached")), advice["server"]
    assert f"server side on cpu: profile {advice['server']['profile']}" in result.stdout


def _scaled(document, factor: float):
    """The profile with every timing summary scaled: a machine ``1/factor`` times as fast."""
    if isinstance(document, dict):
        if {"median", "p10", "p90", "n"} <= document.keys():
            return {k: v * factor if k != "n" else v for k, v in document.items()}
        return {k: _scaled(v, factor) for k, v in document.items()}
    if isinstance(document, list):
        return [_scaled(v, factor) for v in document]
    return document


@pytest.mark.slow
def test_the_advice_plans_the_server_side_on_the_servers_profile(tmp_path):
    """The same fleet and reference, the server's profile 10x faster: every split scheme's
    round is predicted shorter, FL's (no server side) is not."""
    fast = tmp_path / "fast-server.json"
    fast.write_text(json.dumps(_scaled(json.loads(LENET.read_text()), 0.1)))
    latency = {}
    for name, server in (("same", LENET), ("fast", fast)):
        out = tmp_path / f"{name}.json"
        fleet_file = str(ROOT / "bench" / "fleets" / "testbed-wifi.json")
        result = cli(
            "--profile", str(LENET), "--fleet", fleet_file, "--server-profile", str(server), "--json", str(out)
        )
        assert result.returncode == 0, result.stderr
        assert f"profile given ({server})" in result.stdout
        latency[name] = {row["scheme"]: row["round_latency_s"] for row in json.loads(out.read_text())["schemes"]}
    assert all(latency["fast"][s] < latency["same"][s] for s in ("sl", "sfl", "cpsl-fixed")), latency
    assert latency["fast"]["fl"] == latency["same"]["fl"]


@pytest.mark.parametrize(
    ("fleet_json", "message"),
    [
        ('{"medium": "ether", "devices": []}', "medium"),
        ('{"medium": "airtime", "devices": [{"name": "a", "uplink_mbit": 1, "downlink_mbit": 1}]}', "exactly one"),
        (
            '{"medium": "airtime", "devices": [{"name": "a", "uplink_mbit": -1, "downlink_mbit": 1, "speed": 1}]}',
            "uplink",
        ),
        ("[" * 100000, "fleet"),
    ],
)
@pytest.mark.slow
def test_a_bad_fleet_file_gets_one_line(tmp_path, fleet_json, message):
    path = tmp_path / "fleet.json"
    path.write_text(fleet_json)
    result = cli("--profile", str(LENET), "--fleet", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


@pytest.mark.slow
def test_advise_against_a_broker_plans_on_the_registered_devices_and_leaves_them_idle(broker, tmp_path):
    """Real Mosquitto, real agents: the advisor waits for them, reads their profiles, probes
    their links and the medium, prints the table, and the agents are still there to train."""
    from tests.agents import start_agents
    from toolkit.data import load_dataset

    agents, _ = start_agents(broker, load_dataset("builtin:digits", seed=0), 3, profile=LENET.read_bytes())
    out = tmp_path / "advice.json"
    try:
        result = cli("--broker", broker, "--min-devices", "3", "--wait-devices", "30", "--json", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
        advice = json.loads(out.read_text())
        assert sorted(advice["devices"]) == ["dev0", "dev1", "dev2"]
        assert all(row["up_bps"] > 0 and row["speed"] > 0 for row in advice["devices"].values())
        assert "(probed)" in advice["medium"] and "(probed)" in result.stdout
        assert [row["scheme"] for row in advice["schemes"]] == list(SCHEMES)
        assert all(row["round_latency_s"] > 0 for row in advice["schemes"])
        assert result.stdout.strip().splitlines()[-1] == f"run {advice['recommended']} ({advice['basis']})"
        assert all(agent.state == "idle" and agent.assignment is None for agent in agents)
        assert advice["server"]["profile"].startswith(("measured here", "cached")), advice["server"]
    finally:
        for agent in agents:
            agent.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--broker", "mqtt://127.0.0.1:1"), "--min-devices"),
        (("--broker", "mqtt://127.0.0.1:1", "--min-devices", "2", "--fleet", "f.json"), "not both"),
        (("--min-devices", "2"), "--fleet"),
    ],
)
@pytest.mark.slow
def test_advise_needs_one_fleet_source(args, message):
    result = cli(*args)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_schemes_within_one_round_of_the_best_are_called_too_close():
    """Rounds are whole numbers and a rehearsal and a live run differ by one: a gap smaller than
    a round cannot be called from a plan, and the advice says so instead of naming one."""
    from toolkit.planning.advice import SCHEMES, SchemePlan, advise

    latency = {"sl": 30.0, "sfl": 25.0, "fl": 6.0, "cpsl-fixed": 26.0, "cpsl-auto": 12.5}
    plans = {s: SchemePlan(s, None if s == "fl" else 6, None, ((0,),), latency[s]) for s in SCHEMES}
    rounds = {"sl": 6, "sfl": 10, "fl": 11, "cpsl-fixed": 6, "cpsl-auto": 5}  # fl 66 s, cpsl-auto 62.5 s
    advice = advise(plans, rounds)
    assert advice.recommended == "cpsl-auto" and advice.close == ("fl",)  # 3.5 s apart, a round is 12.5 s
    assert "fl: within one round of it" in advice.lines()[-1]
    assert advice.to_dict()["close"] == ["fl"]
    rounds["fl"] = 13  # 78 s: more than a round behind
    assert advise(plans, rounds).close == ()


def test_schemes_whose_ranges_over_the_seeds_overlap_the_best_s_are_called_too_close():
    """The held-out check's lesson: one rehearsal seed named cpsl-fixed (3 rounds) and the
    testbed took 9. Over seeds, a scheme whose range of times overlaps the best's cannot be
    told apart from it, however far the medians are."""
    from toolkit.planning.advice import SCHEMES, SchemePlan, advise

    latency = {"sl": 30.0, "sfl": 25.0, "fl": 10.0, "cpsl-fixed": 20.0, "cpsl-auto": 12.0}
    plans = {s: SchemePlan(s, None if s == "fl" else 6, None, ((0,),), latency[s]) for s in SCHEMES}
    rounds = {"sl": 6, "sfl": 8, "fl": 14, "cpsl-fixed": 5, "cpsl-auto": 6}  # medians: 72 s best, fl 140 s
    ranges = {"sl": (5, 7), "sfl": (7, 9), "fl": (6, None), "cpsl-fixed": (3, 9), "cpsl-auto": (5, 8)}
    advice = advise(plans, rounds, ranges)
    # cpsl-auto 60-96 s; cpsl-fixed 60-180 s and fl 60 s-never overlap it; sl 150-210 s and sfl 175-225 s do not
    assert advice.recommended == "cpsl-auto" and advice.close == ("fl", "cpsl-fixed")
    row = {r.plan.scheme: r for r in advice.rows}
    assert row["fl"].time_range_s == (60.0, float("inf")) and row["cpsl-auto"].time_range_s == (60.0, 96.0)
    assert advice.to_dict()["schemes"][2]["rounds_range"] == [6, None]
    lines = advice.lines()
    assert "14 (6-)" in lines[3] and "6 (5-8)" in lines[5]
    assert "within one round of it or of its range over the seeds" in lines[-1]
    # one seed: no ranges, only the one-round rule, and fl is far behind
    assert advise(plans, rounds).close == ()
    # rehearsed, nobody reached the target: said so, not "no data rehearsed"
    nowhere = advise(plans, dict.fromkeys(SCHEMES))
    assert (
        nowhere.recommended == "fl" and nowhere.basis == "shortest round; no scheme reached the target in the rehearsal"
    )
    assert "no data rehearsed" in advise(plans).basis


@pytest.mark.slow
def test_advise_rehearses_on_several_seeds_and_gives_each_scheme_a_range(tmp_path):
    out = tmp_path / "advice.json"
    result = cli(*WIFI_FLEET, *SHORT_REHEARSAL, "--rehearse-seeds", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    said = result.stdout + result.stderr  # the progress goes where the console writes
    assert "cpsl-auto, seed 0:" in said and "cpsl-auto, seed 1:" in said
    advice = json.loads(out.read_text())
    reached = [row for row in advice["schemes"] if row["rounds_range"]]
    assert reached, advice
    for row in reached:
        fewest, most = row["rounds_range"]
        assert 1 <= fewest <= 6 and (most is None or fewest <= most <= 6)
    for flags, message in ((["--rehearse-seeds", "21"], "at most 20"), (["--rehearse-seeds", "2"], "needs --data")):
        refused = cli(*WIFI_FLEET, *flags)
        assert refused.returncode == 2 and message in refused.stderr


def test_advise_plans_the_split_schemes_with_compression_and_fl_as_is(tmp_path, capsys):
    from edge_server.cli import main

    rounds = {}
    for encoding in ("fp32", "int8"):  # in this process: the CLI's own path, without a second torch import
        out = tmp_path / f"{encoding}.json"
        fleet = str(ROOT / "bench" / "fleets" / "testbed-wifi.json")
        args = ["advise", "--profile", str(LENET), "--fleet", fleet, "--cut", "pool1", "--compress", encoding]
        assert main([*args, "--json", str(out)]) == 0
        rounds[encoding] = {row["scheme"]: row["round_latency_s"] for row in json.loads(out.read_text())["schemes"]}
    assert "planned with int8 across the cut" in capsys.readouterr().out
    assert rounds["int8"]["fl"] == rounds["fp32"]["fl"]  # FL moves whole models: not compressed
    for scheme in ("sl", "sfl", "cpsl-fixed"):  # pool1: most of a split round is the cut's traffic
        assert rounds["int8"][scheme] < 0.6 * rounds["fp32"][scheme], scheme


def test_an_airtime_fleet_file_charges_contention_on_the_uplink_as_the_live_server_does():
    from edge_server.advise import FleetSpec, fleet_state

    spec = FleetSpec.model_validate(
        {
            "medium": "airtime",
            "devices": [{"name": f"d{i}", "uplink_mbit": 10, "downlink_mbit": 20, "speed": 1.0} for i in range(4)],
        }
    )
    state = fleet_state(spec, load_profile(LENET), 32, ROOT)
    everyone = np.arange(4)
    heusse = 10e6 / 4  # four stations at 10 Mbit/s taking equal turns for free
    assert state.uplink.concurrent_bps(everyone)[0] < 0.95 * heusse  # backoff and collisions cost air
    assert state.downlink.concurrent_bps(everyone)[0] == pytest.approx(20e6 / 4)  # the access point sends alone
