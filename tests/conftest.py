"""Shared fixtures: a fast LeNet profile made once per session with real torch and onnxruntime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.brokers import mosquitto, mosquitto_binary
from toolkit.data import load_dataset
from toolkit.models import load_model
from toolkit.profiler.runner import ProfileRequest, run_profile


@pytest.fixture(scope="session")
def lenet_profile(tmp_path_factory: pytest.TempPathFactory):
    """A real profile of LeNet-5 at batch 8 with few repeats (seconds, not minutes)."""
    folder = tmp_path_factory.mktemp("lenet_profile")
    request = ProfileRequest(
        model=load_model("lenet5", seed=0),
        batch_sizes=[8],
        repeats=3,
        warmup=1,
        threads=1,
        onnx_dir=folder / "onnx",
        profile_dir=folder,
    )
    (folder / "onnx").mkdir()
    return run_profile(request), folder


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of our CLIs as a real process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def digits():
    """The built-in digits data set (1,797 images), loaded once per module."""
    return load_dataset("builtin:digits", seed=0)


@pytest.fixture
def broker(tmp_path) -> str:
    """A fresh Mosquitto on a free loopback port for one test."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; .ci/run installs it with apt-get")
    with mosquitto(tmp_path) as url:
        yield url
