"""``cpsl-sim`` as a user runs it: results, determinism, sweeps, figures, bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from toolkit.profile_format import save_profile

CLI = "toolkit.cli.sim"


@pytest.mark.slow
def test_single_run_writes_json_with_every_scheme_and_a_figure(tmp_path):
    out, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    args = ("--devices", "8", "--rounds", "4", "--seed", "3", "--json", str(out), "--plot", str(plot))
    result = run_cli(CLI, *args)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert set(data["schemes"]) == {"sl", "sfl", "fl", "cpsl-random", "cpsl"}
    for scheme, body in data["schemes"].items():
        assert len(body["round_latency_s"]) == 4
        assert body["mean_latency_s"] == pytest.approx(sum(body["round_latency_s"]) / 4)
        for record in body["rounds"]:
            members = sorted(d for cluster in record["clusters"] for d in cluster)
            assert members == list(range(8)), scheme
    assert all(len(r["clusters"]) == 8 for r in data["schemes"]["sl"]["rounds"])
    assert all(max(map(len, r["clusters"])) <= 5 for r in data["schemes"]["cpsl"]["rounds"])
    assert data["schemes"]["cpsl"]["mean_latency_s"] < data["schemes"]["cpsl-random"]["mean_latency_s"]
    assert {d["class"] for d in data["devices"]} == {"raspberry-pi-4", "jetson-nano", "jetson-orin-nano"}
    assert plot.stat().st_size > 10_000
    assert "cpsl" in result.stdout and "vs cpsl" in result.stdout

    again = run_cli(CLI, *args[:-2], "--json", str(tmp_path / "again.json"))
    assert again.returncode == 0
    assert _same_but_timing(json.loads((tmp_path / "again.json").read_text()), data), "not deterministic by seed"


def _same_but_timing(a: dict, b: dict) -> bool:
    """Same latencies and decisions; only the measured decision time may differ."""
    for scheme in a["schemes"]:
        if a["schemes"][scheme]["round_latency_s"] != b["schemes"][scheme]["round_latency_s"]:
            return False
        if [r["clusters"] for r in a["schemes"][scheme]["rounds"]] != [
            r["clusters"] for r in b["schemes"][scheme]["rounds"]
        ]:
            return False
    return True


@pytest.mark.slow
def test_sweep_over_bandwidth_records_means_and_the_chosen_cut(tmp_path):
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.svg"
    result = run_cli(
        CLI,
        "--devices",
        "6",
        "--bandwidth-mhz",
        "0.5,50",
        "--rounds",
        "2",
        "--schemes",
        "sl,cpsl",
        "--model",
        "vgg",
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert result.returncode == 0, result.stderr
    sweep = json.loads(out.read_text())["sweep"]
    assert sweep["parameter"] == "bandwidth_mhz" and sweep["values"] == [0.5, 50.0]
    assert set(sweep["mean_latency_s"]) == {"sl", "cpsl"}
    narrow, wide = sweep["mean_latency_s"]["cpsl"]
    assert narrow > wide
    assert len(sweep["cpsl_cut"]) == 2
    assert plot.read_text().startswith("<?xml")


@pytest.mark.slow
def test_measured_profiles_become_device_classes(tmp_path, lenet_profile):
    profile, _ = lenet_profile
    fast, slow = tmp_path / "fast.json", tmp_path / "slow.json"
    save_profile(profile, fast)
    data = json.loads(fast.read_text())
    data["device"]["id"] = "half-speed-board"
    for batch in data["full_model"]["batches"]:
        for key in ("median", "p10", "p90"):
            batch["step_s"][key] *= 2
    slow.write_text(json.dumps(data))
    out = tmp_path / "p.json"
    result = run_cli(
        CLI,
        "--profile",
        str(fast),
        str(slow),
        "--devices",
        "4",
        "--rounds",
        "1",
        "--schemes",
        "cpsl",
        "--batch-size",
        "8",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    classes = json.loads(out.read_text())["device_classes"]
    assert classes[f"profile:{profile.device.id}"]["speed"] == pytest.approx(1.0)
    assert classes["profile:half-speed-board"]["speed"] == pytest.approx(0.5)


def test_list_classes_shows_speeds_and_sources():
    result = run_cli(CLI, "--list-classes")
    assert result.returncode == 0
    for name in ("raspberry-pi-4", "jetson-nano", "jetson-orin-nano", "reference"):
        assert name in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--schemes", "cpsl,magic"), "unknown scheme"),
        (("--devices", "5,10", "--bandwidth-mhz", "1,2"), "one parameter at a time"),
        (("--devices", "0"), "must be at least 1"),
        (("--bandwidth-mhz", "-3"), "positive number"),
        (("--model", "nosuchmodel"), "no profile of model 'nosuchmodel'"),
        (("--profile", "/nonexistent/p.json"), "cannot read profile"),
        (("--fleet", "raspberry-pi-4,toaster"), "unknown device class 'toaster'"),
        (("--devices", "3", "--clusters", "4"), "more than the 3 devices"),
        (("--plot", "/tmp/x.txt"), "use a .png, .svg or .pdf"),
        (("--cpsl-cut", "relu1"), "'relu1' is not a candidate cut of lenet5"),
        (("--json", "/proc/cpsl/nope.json"), "cannot write JSON output"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run_cli(CLI, *args, "--rounds", "1")
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bad_device_class_file_is_named(tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps([{"name": "pi5", "speed": -1}]))
    result = run_cli(CLI, "--device-classes", str(classes), "--rounds", "1")
    assert result.returncode == 2 and "field 'speed' must be a positive number" in result.stderr
    classes.write_text(json.dumps([{"name": "pi5", "speed": 0.9, "source": "my bench"}]))
    result = run_cli(
        CLI, "--device-classes", str(classes), "--fleet", "pi5", "--devices", "3", "--rounds", "1", "--schemes", "sl"
    )
    assert result.returncode == 0, result.stderr


def test_a_pinned_cpsl_cut_is_kept_every_round(tmp_path):
    out = tmp_path / "pinned.json"
    result = run_cli(
        CLI, "--devices", "6", "--rounds", "3", "--schemes", "cpsl", "--cpsl-cut", "pool2", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    rounds = json.loads(out.read_text())["schemes"]["cpsl"]["rounds"]
    assert {(r["cut"], r["cut_name"]) for r in rounds} == {(6, "pool2")}


def test_the_ablation_runs_at_cpsl_s_cut_and_the_split_baselines_at_theirs(tmp_path):
    out = tmp_path / "ablation.json"
    schemes = "sl,cpsl-random,cpsl-none,cpsl-clusters,cpsl-slots,cpsl"
    args = ("--devices", "8", "--rounds", "3", "--medium", "wifi", "--cpsl-cut", "pool1", "--split-cut", "pool2")
    result = run_cli(CLI, *args, "--schemes", schemes, "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["config"]["radio"]["medium"] == "wifi"
    runs = data["schemes"]
    for scheme in ("cpsl-none", "cpsl-clusters", "cpsl-slots", "cpsl"):
        assert {r["cut_name"] for r in runs[scheme]["rounds"]} == {"pool1"}, scheme
    for scheme in ("sl", "cpsl-random"):
        assert {r["cut_name"] for r in runs[scheme]["rounds"]} == {"pool2"}, scheme
    # the same random draw for the ablations without planned clusters; planned ones for the others
    clusters = {s: [r["clusters"] for r in runs[s]["rounds"]] for s in runs}
    assert clusters["cpsl-none"] == clusters["cpsl-slots"]
    assert clusters["cpsl-clusters"] == clusters["cpsl"]
    # planned clusters never lose to a random draw on the same medium plan
    assert runs["cpsl-clusters"]["mean_latency_s"] <= runs["cpsl-none"]["mean_latency_s"] * 1.001


@pytest.mark.parametrize("medium", ["cell", "wifi", "wired"])
@pytest.mark.slow
def test_every_medium_runs_the_default_schemes(tmp_path, medium):
    out = tmp_path / f"{medium}.json"
    result = run_cli(CLI, "--devices", "5", "--rounds", "2", "--medium", medium, "--json", str(out))
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["schemes"]
    assert set(runs) == {"sl", "sfl", "fl", "cpsl-random", "cpsl"}
    assert all(body["mean_latency_s"] > 0 for body in runs.values())
