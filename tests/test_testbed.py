"""The emulated testbed as a user runs it: refuses without root, trains, and leaves nothing behind.

The runs need root, iproute2, the cgroup v1 cpu controller and Mosquitto; they are skipped
where any is missing. They build the testbed instance ``cpsltest`` (cpsltest-ap, cpsltest-d0,
...), so they run beside a benchmark on the default instance cpsl-* and never touch it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.testbed import topology
from toolkit.testbed.topology import (
    AP_ADDRESS,
    CGROUP_CPU,
    INSTANCE_ENV,
    DeviceSpec,
    instance_prefix,
    leftovers,
)

CLI = [sys.executable, "-m", "toolkit.cli.testbed"]


def _can_make_namespaces() -> bool:
    """Root in a container without CAP_NET_ADMIN cannot: try, rather than trust the uid."""
    name = f"capcheck-{os.getpid()}"  # not cpsl-*: never mistaken for a leftover
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=10).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return made


NO_ROOT = pytest.mark.skipif(
    os.geteuid() != 0
    or shutil.which("tc") is None
    or shutil.which("ip") is None
    or not CGROUP_CPU.is_dir()
    or (shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists())
    or not _can_make_namespaces(),
    reason="needs root with CAP_NET_ADMIN, iproute2, tc, cgroup v1 cpu and mosquitto",
)


def ROOT_ONLY(test):  # noqa: N802 - used as a decorator, like pytest's marks
    """The root tier (``-m root``), skipped where the testbed cannot be built."""
    return pytest.mark.root(NO_ROOT(test))


TEST_INSTANCE = "cpsltest"


@pytest.fixture(autouse=True)
def own_testbed_instance(monkeypatch):
    """Every run here (and every leftover check) on the instance ``cpsltest``, not the default."""
    monkeypatch.setenv(INSTANCE_ENV, TEST_INSTANCE)


@pytest.fixture(scope="module")
def profile_cache(tmp_path_factory) -> Path:
    """The device profiles the first run measured, for the runs after it.

    Profiling one CPU class under its quota takes 15-30 s (importing torch at a tenth of a
    core is most of it) and every run here uses the same two classes: measuring them once
    per session keeps the runs about what they test. The first run still profiles for real.
    """
    return tmp_path_factory.mktemp("testbed-profiles")


@pytest.fixture
def run_dir(tmp_path, profile_cache):
    """A run folder seeded with the cached profiles; what the run profiled goes back to the cache."""
    folder = tmp_path / "run"
    (folder / "profiles").mkdir(parents=True)
    for profile in profile_cache.glob("*.json"):
        shutil.copy(profile, folder / "profiles")
    yield folder
    for profile in (folder / "profiles").glob("*.json"):
        if not (profile_cache / profile.name).exists():
            shutil.copy(profile, profile_cache)


def quick_spec(folder: Path) -> Path:
    """The default fleet's two links (16 and 6 Mbit/s up, twice that down), both devices at the
    fast CPU class: a device at 0.15 core takes some 30 s to import torch and register, which
    the runs that test links and media need not wait for (and that class's profile is cached)."""
    devices = [
        {"name": f"dev{i}", "uplink_mbit": up, "downlink_mbit": 2 * up, "cpu_share": 0.3}
        for i, up in enumerate((16.0, 6.0))
    ]
    path = folder / "quick.json"
    path.write_text(json.dumps({"devices": devices}))
    return path


def assert_nothing_left() -> None:
    namespaces, groups = leftovers()
    assert namespaces == [] and groups == [], (namespaces, groups)


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs setpriv, run as root")
@pytest.mark.root
def test_without_root_it_says_so_and_creates_nothing(tmp_path):
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            *CLI,
            "run",
            "--devices",
            "2",
            "--run-dir",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cpsl-testbed: error: the testbed creates network namespaces, tc shapers and cgroups: run it as root"
    ]
    assert_nothing_left()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--throttle", "dev9:1:2"], "there is no device 9 among 2"),
        (["--throttle", "dev0:1"], "expected devI:ROUND:MBIT"),
        (["--drop", "nonsense"], "expected devI:ROUND"),
        (["--medium", "wifi", "--throttle", "dev0:1:2"], "--throttle needs --medium wired"),
        (["--link-down", "dev1:0"], "expected devI:ROUND:SECONDS"),
        (["--link-down", "dev1:0:-3"], "between 0 and 3600 s"),
    ],
)
@ROOT_ONLY
def test_bad_events_are_refused_before_anything_is_built(tmp_path, args, message):
    result = subprocess.run(
        [*CLI, "run", "--devices", "2", "--run-dir", str(tmp_path), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and message in result.stderr
    assert_nothing_left()


def _reaches_its_access_point(testbed: topology.Testbed, port: int) -> str:
    """What device 0 of ``testbed`` reads from a one-line server in that testbed's access point."""
    serve = (
        "import socket,sys\n"
        f"s=socket.create_server(('{AP_ADDRESS}',{port}))\n"
        "print('listening',flush=True)\n"
        "c,_=s.accept();c.sendall(sys.argv[1].encode());c.close()"
    )
    server = subprocess.Popen(
        testbed.ap_command([sys.executable, "-c", serve, testbed.prefix]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout.readline().strip() == "listening"
        fetch = f"import socket;print(socket.create_connection(('{AP_ADDRESS}',{port}),timeout=10).recv(64).decode())"
        command = ["ip", "netns", "exec", testbed.device_namespace(0), sys.executable, "-c", fetch]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    finally:
        server.kill()
        server.wait(timeout=10)


@ROOT_ONLY
def test_two_instances_run_side_by_side_each_on_its_own_network_and_clean_up_only_their_own():
    spec = topology.TestbedSpec((DeviceSpec("dev0", 8.0, 8.0, 0.5),))
    first = topology.Testbed(spec, prefix=instance_prefix("cpsltesta"))
    second = topology.Testbed(spec, prefix=instance_prefix("cpsltestb"))
    try:
        first.create()
        second.create()  # the same device names, veths and addresses: nothing clashes
        assert _reaches_its_access_point(first, 18830) == "cpsltesta-"
        assert _reaches_its_access_point(second, 18830) == "cpsltestb-"
        refused = subprocess.run(
            [*CLI, "run", "--instance", "cpsltesta", "--devices", "1", "--run-dir", "/nonexistent"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 2
        assert "`cpsl-testbed cleanup --instance cpsltesta` removes it" in refused.stderr
        cleaned = subprocess.run(
            [*CLI, "cleanup", "--instance", "cpsltesta"], capture_output=True, text=True, timeout=60, check=True
        )
        assert cleaned.stdout.strip() == "removed 3 namespaces and 1 CPU groups"
        assert leftovers(first.prefix) == ([], [])
        assert _reaches_its_access_point(second, 18831) == "cpsltestb-"  # untouched
    finally:
        first.destroy()
        second.destroy()
    assert leftovers(second.prefix) == ([], [])


@pytest.mark.parametrize("name", ["CPSL", "1bench", "bench-x", "a" * 13, ""])
@pytest.mark.slow
def test_a_bad_instance_name_is_a_one_line_usage_error(name):
    result = subprocess.run([*CLI, "cleanup", "--instance", name], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "1-12 lowercase letters and digits, starting with a letter" in line


@ROOT_ONLY
def test_a_short_auto_run_trains_predicts_and_cleans_up(run_dir):
    result = subprocess.run(
        [
            *CLI,
            "run",
            "--devices",
            "2",
            "--rounds",
            "2",
            "--local-iterations",
            "4",
            "--target-accuracy",
            "0.999",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(r["predicted_latency_s"] > 0 and r["cut"] for r in records)
    assert sorted(d for c in records[-1]["clusters"] for d in c) == ["dev0", "dev1"]
    # tbf shares bytes: probed together the two devices kept far more than one air time,
    # so the planner lets their transfers overlap (no slots) and says why in round 0
    evidence = records[0]["decision"]["medium_evidence"]
    for direction in ("uplink", "downlink"):
        assert evidence[direction]["kind"] == "shared", evidence
        assert evidence[direction]["utilisation"] > 1.4
    assert all(r["decision"]["medium"] == {"uplink": "shared", "downlink": "shared"} for r in records)
    assert not any("slots" in r for r in records)
    assert all(g["slot_duration_s"] is None for g in records[-1]["decision"]["grants"].values())
    estimates = records[-1]["decision"]["estimates"]
    # dev0 is capped at 16 Mbit/s up, dev1 at 6: the probes must see the difference
    assert estimates["dev0"]["up_bps"] > 1.5 * estimates["dev1"]["up_bps"]
    assert_nothing_left()


@ROOT_ONLY
def test_sigterm_mid_run_removes_everything(tmp_path):
    process = subprocess.Popen(
        [
            *CLI,
            "run",
            "--devices",
            "2",
            "--rounds",
            "50",
            "--target-accuracy",
            "0.999",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not leftovers()[0]:
        time.sleep(0.2)
    time.sleep(8)  # into profiling or training
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert_nothing_left()


@ROOT_ONLY
def test_the_wifi_medium_carries_a_slotted_run_through_its_relay_and_cleans_up(run_dir):
    result = subprocess.run(
        [
            *CLI,
            "run",
            "--medium",
            "wifi",
            "--spec",
            str(quick_spec(run_dir.parent)),
            "--scheme",
            "cpsl",
            "--cut",
            "pool2",
            "--clusters",
            "1",
            "--rounds",
            "1",
            "--local-iterations",
            "3",
            "--target-accuracy",
            "0.999",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and not records[0]["dropped"]
    # the relay shares air time: probed together the devices kept about one device's worth,
    # so the planner gives the cluster of two slots (a device alone would contend with nobody)
    evidence = records[0]["decision"]["medium_evidence"]
    for direction in ("uplink", "downlink"):
        assert evidence[direction]["kind"] == "airtime", evidence
        assert 0.7 < evidence[direction]["utilisation"] <= 1.4
    assert records[0]["slots"]["iterations"] == 6
    broker_config = (run_dir / "mosquitto.conf").read_text()
    assert "listener 1883 127.0.0.1" in broker_config  # devices reach it via the relay
    assert "set_tcp_nodelay true" in broker_config  # as provisioned (--broker-nagle leaves it out)
    assert all(
        "registered at mqtt://10.77.0.1:1883" in (run_dir / "logs" / f"agent-{i}.log").read_text() for i in (0, 1)
    )
    assert_nothing_left()


def test_the_heavy_fleet_is_widenet_on_weak_devices_and_every_process_is_told_the_model(tmp_path):
    from toolkit.cli.testbed import FLEETS, HEAVY_CPU_CLASSES, default_spec
    from toolkit.testbed.runner import RunSpec

    spec = default_spec(8, fleet="heavy")
    assert [d.cpu_share for d in spec.devices] == [HEAVY_CPU_CLASSES[i % 3] for i in range(8)]
    assert [d.uplink_mbit for d in spec.devices] == [d.uplink_mbit for d in default_spec(8).devices]
    run = RunSpec(model=FLEETS["heavy"][1])
    server = run.server_flags()
    assert server[server.index("--model") + 1] == "widenet"
    agent = run.agent_flags(3, 8, tmp_path / "p.json")
    assert agent[agent.index("--model") + 1] == "widenet" and agent[agent.index("--partition") + 1] == "3/8"
    assert agent[agent.index("--device-id") + 1] == "dev3"
    assert "--compress" not in server  # fp32 unless asked
    packed = RunSpec(compress="int8+zstd", compress_gradients="fp16").server_flags()
    assert packed[packed.index("--compress") + 1] == "int8+zstd"
    assert packed[packed.index("--compress-gradients") + 1] == "fp16"


@ROOT_ONLY
def test_fl_survives_model_uploads_longer_than_the_heartbeat_window(tmp_path, run_dir):
    """LeNet-5's 247 kB over a 0.12 Mbit/s uplink takes about 16 s, longer than the server's 10 s
    heartbeat window, and the heartbeats wait behind it on the device's one connection. The
    devices must stay in the round (the deadline allows for the transfer) and be averaged."""
    spec = tmp_path / "slow.json"
    devices = [{"name": f"dev{i}", "uplink_mbit": 0.12, "downlink_mbit": 1.0, "cpu_share": 0.3} for i in range(2)]
    spec.write_text(json.dumps({"devices": devices}))
    result = subprocess.run(
        [
            *CLI,
            "run",
            "--spec",
            str(spec),
            "--scheme",
            "fl",
            "--rounds",
            "1",
            "--local-iterations",
            "2",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["dropped"] == [] and sorted(record["clusters"][0]) == ["dev0", "dev1"], record
    assert record["latency_s"] > 12.0  # the uploads really outlasted the heartbeat window
    assert record["breakdown"]["device_compute_s"] > 0  # both timings reports arrived with their weights
    assert_nothing_left()


@ROOT_ONLY
def test_a_device_whose_link_is_down_for_10_s_catches_up_and_no_round_is_lost(run_dir):
    """dev1's veth goes down for 10 s right after round 0 (issue #11): its TCP connection stays
    open, what was in flight is retransmitted when the link is back, and every round completes
    once; dev1 trains in the rounds after."""
    result = subprocess.run(
        [
            *CLI,
            "run",
            "--spec",
            str(quick_spec(run_dir.parent)),
            "--scheme",
            "cpsl",
            "--no-auto",
            "--rounds",
            "3",
            "--local-iterations",
            "4",
            "--target-accuracy",
            "0.999",
            "--link-down",
            "dev1:0:10",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dev1 link down for 10 s" in result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[1]["latency_s"] > 8  # the outage was felt
    assert "dev1" in records[2]["clusters"][0] + records[2]["clusters"][-1] and records[2]["dropped"] == []
    assert_nothing_left()


def test_the_wide_fleet_spreads_compute_and_links_tenfold():
    from toolkit.cli.testbed import FLEETS, default_spec

    spec = default_spec(8, fleet="wide", medium="wifi")
    shares = [d.cpu_share for d in spec.devices]
    uplinks = [d.uplink_mbit for d in spec.devices]
    assert max(shares) / min(shares) == pytest.approx(10.0)
    assert max(uplinks) / min(uplinks) == pytest.approx(10.0)
    assert all(d.downlink_mbit == 2 * d.uplink_mbit for d in spec.devices)
    # compute and channel classes do not line up: a fast CPU may sit on a poor link
    assert any(d.cpu_share == max(shares) and d.uplink_mbit < max(uplinks) for d in spec.devices)
    assert FLEETS["wide"][1] == "widenet"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _cores_used(pid: int, seconds: float = 1.0) -> float:
    before = _cpu_seconds(pid)
    time.sleep(seconds)
    return (_cpu_seconds(pid) - before) / seconds


@ROOT_ONLY
def test_an_agent_boots_unthrottled_and_runs_at_its_quota_once_moved_into_its_group():
    spec = topology.TestbedSpec((DeviceSpec("dev0", 8.0, 8.0, 0.05),))
    testbed = topology.Testbed(spec, prefix=instance_prefix(TEST_INSTANCE))
    spinner = None
    try:
        testbed.create()
        command = testbed.device_command(0, [sys.executable, "-c", "while True: pass"], throttled=False)
        spinner = subprocess.Popen(command)
        time.sleep(0.3)
        group = f"{TEST_INSTANCE}-d0"
        assert group not in Path(f"/proc/{spinner.pid}/cgroup").read_text()
        assert _cores_used(spinner.pid) > 0.5  # booting: as fast as the host allows
        testbed.throttle(0, spinner.pid)
        assert f"/{group}\n" in Path(f"/proc/{spinner.pid}/cgroup").read_text()
        time.sleep(0.2)
        assert _cores_used(spinner.pid) < 0.1  # the device's quota, 0.05 of a core
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        testbed.destroy()
    assert_nothing_left()
