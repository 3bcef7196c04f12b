"""First boot: ``provision add-device --cloud-init`` writes a valid cloud-config that carries the bundle
byte for byte and a configuration the agent accepts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SERVER = [sys.executable, "-m", "edge_server"]
AGENT = [sys.executable, "-m", "firmware_agent"]


def provision(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVER, "provision", *args], capture_output=True, text=True, timeout=120)


def write_files(user_data: Path) -> dict[str, dict]:
    document = yaml.safe_load(user_data.read_text())
    return {entry["path"]: entry for entry in document["write_files"]}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fleet") / "pki"
    done = provision("init", "--dir", str(root), "--server-host", "edge.local")
    assert done.returncode == 0, done.stderr
    return root


@pytest.mark.slow
def test_the_user_data_carries_the_bundle_and_a_config_the_agent_accepts(deployment, tmp_path):
    done = provision("add-device", "pi-01", "--dir", str(deployment), "--data", "folder:/srv/cpsl-data", "--cloud-init")
    assert done.returncode == 0, done.stderr
    folder = deployment / "devices" / "pi-01"
    user_data = folder / "user-data"
    assert user_data.read_text().startswith("#cloud-config\n") and user_data.stat().st_mode & 0o077 == 0
    document = yaml.safe_load(user_data.read_text())
    assert document["hostname"] == "pi-01" and "python3-venv" in document["packages"]
    files = write_files(user_data)
    for name, mode in (("agent.toml", "0600"), ("ca.crt", "0644"), ("client.crt", "0644"), ("client.key", "0600")):
        entry = files[f"/etc/cpsl-edge/{name}"]
        assert entry["content"] == (folder / name).read_text(), name  # byte for byte
        assert entry["permissions"] == mode
    commands = document["runcmd"]
    assert commands[2][-3:] == ["--index-url", "https://download.pytorch.org/whl/cpu", "torch"]  # not PyPI's CUDA
    assert commands[3][-1] == "cpsl-edge[agent]"
    assert commands[-1] == [
        "/opt/cpsl-edge/bin/cpsl-agent",
        "service",
        "install",
        "--config",
        "/etc/cpsl-edge/agent.toml",
    ]
    # what the board will have in /etc/cpsl-edge is a configuration the agent (and its unit) accept
    etc = tmp_path / "etc" / "cpsl-edge"
    etc.mkdir(parents=True)
    for path, entry in files.items():
        (etc / Path(path).name).write_text(entry["content"])
    unit = subprocess.run(
        [*AGENT, "service", "print", "--config", str(etc / "agent.toml")], capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stderr
    assert f"--config {etc / 'agent.toml'}" in unit.stdout


@pytest.mark.skipif(shutil.which("cloud-init") is None, reason="cloud-init is not installed")
def test_cloud_init_validates_the_user_data_with_and_without_tls(deployment, tmp_path):
    done = provision("add-device", "pi-02", "--dir", str(deployment), "--data", "builtin:mnist5k", "--cloud-init")
    assert done.returncode == 0, done.stderr
    plain = provision(
        "add-device",
        "pi-03",
        "--dir",
        str(tmp_path / "plain"),
        "--broker",
        "mqtt://edge.local:1883",
        "--data",
        "idx:/srv/mnist",
        "--cloud-init",
        "--torch",
        "torch==2.5.1",
        "--torch-index",
        "none",
    )
    assert plain.returncode == 0, plain.stderr
    for user_data in (deployment / "devices/pi-02/user-data", tmp_path / "plain/devices/pi-03/user-data"):
        check = subprocess.run(
            ["cloud-init", "schema", "--config-file", str(user_data)], capture_output=True, text=True, timeout=120
        )
        assert check.returncode == 0 and "Valid" in check.stdout, check.stdout + check.stderr
    files = write_files(tmp_path / "plain/devices/pi-03/user-data")
    assert list(files) == ["/etc/cpsl-edge/agent.toml"]  # no certificate, no key
    assert 'broker = "mqtt://edge.local:1883"' in files["/etc/cpsl-edge/agent.toml"]["content"]
    torch = yaml.safe_load((tmp_path / "plain/devices/pi-03/user-data").read_text())["runcmd"][2]
    assert torch == ["/opt/cpsl-edge/bin/pip", "install", "torch==2.5.1"]


@pytest.mark.slow
def test_a_renewed_device_keeps_its_data_setting(deployment):
    assert provision("add-device", "pi-04", "--dir", str(deployment), "--data", "idx:/srv/a").returncode == 0
    renewed = provision("renew", "pi-04", "--dir", str(deployment))
    assert renewed.returncode == 0, renewed.stderr
    assert 'data = "idx:/srv/a"' in (deployment / "devices/pi-04/agent.toml").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add-device", "pi-9", "--cloud-init"], "--cloud-init needs --data"),
        (["add-device", "pi-9", "--data", "idx:/x", "--cloud-init", "--torch", 'torch"; rm -rf /'], "cannot go into"),
        (["add-device", "pi-9", "--broker", "mqtts://edge:8883"], "only a plain mqtt:// broker"),
        (["add-device", "pi-9", "--data", 'idx:/x"\nbroker = "mqtt://evil"'], "cannot go into agent.toml"),
    ],
)
@pytest.mark.slow
def test_bad_first_boot_requests_get_one_line(deployment, args, message):
    args = [*args, "--dir", str(deployment)] if "--broker" not in args else [*args, "--dir", str(deployment.parent)]
    done = provision(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
