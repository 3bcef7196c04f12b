"""``edge_server --resume``: a server killed with SIGKILL and resumed trains what an uninterrupted
run trains, over a real Mosquitto with real agents and a real server process (issue #11)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.agents import start_agents

ROOT = Path(__file__).resolve().parents[1]


def server(broker: str, run_dir: Path, run_id: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edge_server",
        "--broker",
        broker,
        "--model",
        "lenet5",
        "--data",
        "builtin:digits",
        "--min-devices",
        "2",
        "--scheme",
        "cpsl",
        "--no-auto",
        "--clusters",
        "2",
        "--rounds",
        "4",
        "--local-iterations",
        "3",
        "--batch-size",
        "8",
        "--momentum",
        "0.9",  # the server optimiser has state to carry over
        "--timeout",
        "10",
        "--run-dir",
        str(run_dir),
        "--run-id",
        run_id,
    ]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_run_killed_after_a_round_and_resumed_ends_with_the_uninterrupted_weights(broker, digits, tmp_path):
    agents, _ = start_agents(broker, digits, 2)
    try:
        whole = tmp_path / "whole"
        done = subprocess.run(server(broker, whole, "whole"), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

        broken = tmp_path / "broken"
        process = subprocess.Popen(server(broker, broken, "broken"), cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(records(broken)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # mid-way through round 2, no goodbye
        process.wait(timeout=10)
        assert len(records(broken)) >= 2 and not (broken / "model.pt").exists()

        resumed = subprocess.run(
            [sys.executable, "-m", "edge_server", "--resume", str(broken), "--broker", broker],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    finally:
        for agent in agents:
            agent.close()
    assert [r["round"] for r in records(broken)] == [0, 1, 2, 3]  # none lost, none counted twice
    assert {r["run"] for r in records(broken)} == {"broken"}
    expected = torch.load(whole / "model.pt", weights_only=True)
    got = torch.load(broken / "model.pt", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)
    assert [r["accuracy"] for r in records(broken)] == pytest.approx([r["accuracy"] for r in records(whole)], abs=1e-9)


@pytest.mark.slow
def test_resuming_needs_a_run_of_this_model_and_says_what_is_wrong(tmp_path):
    def resume(folder: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "edge_server", "--resume", str(folder)]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)

    empty = resume(tmp_path)
    assert empty.returncode == 2 and "run.json" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1
    settings = {
        "format": "cpsl-run-settings/1",
        "model": "lenet5",
        "data": "builtin:digits",
        "seed": 0,
        "broker": {"url": "mqtt://127.0.0.1:1", "tls": None},
        "config": {"scheme": "cpsl", "rounds": 3, "min_devices": 1, "run_id": "r"},
    }
    (tmp_path / "run.json").write_text(json.dumps(settings))
    missing = resume(tmp_path)
    assert missing.returncode == 2 and "completed no round" in missing.stderr
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage" * 100)
    corrupt = resume(tmp_path)
    assert corrupt.returncode == 2 and "not a readable run state" in corrupt.stderr
    torch.save({"format": "cpsl-run-state/1", "run_id": "someone-else"}, tmp_path / "checkpoint.pt")
    foreign = resume(tmp_path)
    assert foreign.returncode == 2 and "belongs to run 'someone-else'" in foreign.stderr
    assert all(len(p.stderr.strip().splitlines()) == 1 for p in (missing, corrupt, foreign))


def test_a_run_folder_that_names_code_is_refused_until_the_operator_names_it(tmp_path):
    """A copied run folder whose run.json names a module of code (here one that would write a
    marker when imported) is not imported by --resume, serve or export-heads."""
    marker = tmp_path / "imported"
    (tmp_path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef build(**kw):\n    raise SystemExit\n"
    )
    settings = {
        "format": "cpsl-run-settings/1",
        "model": f"{tmp_path / 'evil.py'}:build",
        "data": "builtin:digits",
        "seed": 0,
        "broker": {"url": "mqtt://127.0.0.1:1", "tls": None},
        "config": {"scheme": "cpsl", "rounds": 3, "min_devices": 1, "run_id": "r"},
    }
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(settings))
    serve = ["serve", str(run), "--broker", "mqtt://127.0.0.1:1"]
    for args in (["--resume", str(run)], serve, ["export-heads", str(run)]):
        result = subprocess.run(
            [sys.executable, "-m", "edge_server", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2 and "a run folder never names code" in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_every_value_a_run_folder_sets_is_checked_for_its_type_and_bounds(tmp_path):
    from edge_server.launch import resumed_config
    from edge_server.run_state import read_settings, write_settings
    from edge_server.server import ServerConfig
    from toolkit.errors import UserError
    from toolkit.transport import parse_broker_url

    broker = parse_broker_url("mqtt://127.0.0.1:1883")
    written = ServerConfig(broker=broker, scheme="cpsl", rounds=5, min_devices=2, run_dir=tmp_path, model_spec="lenet5")
    write_settings(tmp_path, written, "r")
    values = {**read_settings(tmp_path).config, "run_dir": tmp_path}
    assert resumed_config(values, broker, "run.json") == dataclasses.replace(written, run_id="r")
    for key, value, message in (
        ("batch_size", -5, "batch_size is -5; it must lie between 1"),
        ("norm_factor", 0.0, "norm_factor is 0.0; it must lie between 1"),
        ("lr", {"a": [[[1]]]}, "lr: Input should be a valid number"),
        ("rounds", "many", "rounds: Input should be a valid integer"),
        ("scheme", "evil", "scheme is 'evil'; choose among"),
        ("exec", "os:abort", "unknown setting 'exec'"),
    ):
        with pytest.raises(UserError, match=message):
            resumed_config({**values, key: value}, broker, "run.json")
