"""cpsl-profile as a user runs it: a real process, real files; bad input is one line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from toolkit.profile_format import load_profile

CLI = "toolkit.cli.profile"
FAST = ["--repeats", "2", "--warmup", "0", "--threads", "1"]

USER_MODEL = """
from torch import nn

def tiny(input_shape, num_classes):
    return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * (input_shape[1] - 2) ** 2, num_classes))

def explodes(input_shape):
    raise RuntimeError("model zoo is closed")
"""


@pytest.mark.slow
def test_lenet_profile_onnx_table_and_plot(tmp_path) -> None:
    out = tmp_path / "out" / "lenet.json"
    plot = tmp_path / "lenet.png"
    result = run_cli(
        CLI,
        "--model",
        "lenet5",
        "--batch-size",
        "4",
        "--batch-size",
        "8",
        "--input-shape",
        "1,28,28",
        "--out",
        str(out),
        "--onnx-dir",
        str(tmp_path / "onnx"),
        "--device-id",
        "pi-7",
        "--plot",
        str(plot),
        "--cuts",
        "pool2,fc1,3",
        *FAST,
    )
    assert result.returncode == 0, result.stderr
    profile = load_profile(out)
    assert profile.device.id == "pi-7"
    assert [cut.cut for cut in profile.cuts] == [3, 6, 8]
    assert [b.batch_size for b in profile.cuts[0].batches] == [4, 8]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "lenet5_cut03_pool1.onnx",
        "lenet5_cut06_pool2.onnx",
        "lenet5_cut08_fc1.onnx",
    ]
    assert (out.parent / profile.cuts[0].onnx.file).is_file()
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "lenet5 on pi-7" in result.stdout and "pool2" in result.stdout and "FL" in result.stdout


@pytest.mark.slow
def test_show_prints_an_existing_profile(tmp_path) -> None:
    out = tmp_path / "p.json"
    assert (
        run_cli(
            CLI, "--model", "lenet", "--batch-size", "4", "--out", str(out), "--no-onnx", "--cuts", "6", *FAST
        ).returncode
        == 0
    )
    shown = run_cli(CLI, "--show", str(out), "--plot", str(tmp_path / "p.svg"))
    assert shown.returncode == 0, shown.stderr
    assert "pool2" in shown.stdout and (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.slow
def test_user_model_file(tmp_path) -> None:
    source = tmp_path / "mine.py"
    source.write_text(USER_MODEL)
    out = tmp_path / "mine.json"
    result = run_cli(
        CLI, "--model", f"{source}:tiny", "--input-shape", "1,10,10", "--batch-size", "4", "--out", str(out), *FAST
    )
    assert result.returncode == 0, result.stderr
    profile = load_profile(out)
    assert profile.model.layer_names == ["conv2d0", "relu1", "flatten2", "linear3"]
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 3


def _bad(tmp_path, *args: str) -> str:
    result = run_cli(CLI, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("cpsl-profile: error: ")
    return lines[0]


def test_unknown_model(tmp_path) -> None:
    line = _bad(tmp_path, "--model", "resnet9000", "--batch-size", "4", "--out", str(tmp_path / "x.json"))
    assert "unknown model 'resnet9000'" in line


@pytest.mark.parametrize("shape", ["1,28", "a,b,c", "0,28,28"])
@pytest.mark.slow
def test_malformed_input_shape(tmp_path, shape) -> None:
    line = _bad(
        tmp_path, "--model", "lenet5", "--batch-size", "4", "--input-shape", shape, "--out", str(tmp_path / "x.json")
    )
    assert "input shape" in line or "C,H,W" in line


def test_input_shape_the_model_cannot_take(tmp_path) -> None:
    line = _bad(
        tmp_path, "--model", "lenet5", "--batch-size", "4", "--input-shape", "1,3,3", "--out", str(tmp_path / "x.json")
    )
    assert "1,3,3" in line


@pytest.mark.slow
def test_cut_that_does_not_exist(tmp_path) -> None:
    line = _bad(
        tmp_path, "--model", "lenet5", "--batch-size", "4", "--cuts", "pool9", "--out", str(tmp_path / "x.json")
    )
    assert "cut 'pool9' does not exist" in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "gpu"], "'gpu' is not a device: choose cpu, cuda, cuda:N or auto"),
        (["--cuda", "--device", "cuda:1"], "--cuda and --device cuda:1 disagree"),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda: torch",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the device is usable"),
        ),
    ],
)
def test_a_device_that_is_not_one_or_not_here(tmp_path, flags, message) -> None:
    line = _bad(tmp_path, "--model", "lenet5", "--batch-size", "4", "--out", str(tmp_path / "x.json"), *flags)
    assert message in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device on this machine")
def test_a_profile_on_the_gpu_says_so_and_times_every_cut(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    result = run_cli(
        CLI, "--model", "lenet5", "--batch-size", "16", "--device", "cuda", "--no-onnx", "--out", str(out), *FAST
    )
    assert result.returncode == 0, result.stderr
    profile = load_profile(out)
    assert profile.device.accelerator == "cuda" and profile.device.cuda_device
    assert all(c.batches[0].forward_s.median > 0 and c.batches[0].step_s.median > 0 for c in profile.cuts)


def test_unwritable_output(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = _bad(tmp_path, "--model", "lenet5", "--batch-size", "4", "--out", str(blocker / "p.json"))
    assert "cannot write profile" in line


@pytest.mark.slow
def test_user_model_that_raises(tmp_path) -> None:
    source = tmp_path / "mine.py"
    source.write_text(USER_MODEL)
    line = _bad(
        tmp_path,
        "--model",
        f"{source}:explodes",
        "--input-shape",
        "1,8,8",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "x.json"),
    )
    assert "raised RuntimeError: model zoo is closed" in line


def test_user_model_file_that_fails_to_import(tmp_path) -> None:
    source = tmp_path / "syntax.py"
    source.write_text("def broken(:\n")
    line = _bad(
        tmp_path,
        "--model",
        f"{source}:broken",
        "--input-shape",
        "1,8,8",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "x.json"),
    )
    assert "SyntaxError" in line


def test_corrupt_profile(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"format": "cpsl-profile", "version": 1, "model": {}}))
    line = _bad(tmp_path, "--show", str(path))
    assert "broken.json: field model.name: Field required" in line


def test_missing_required_flags(tmp_path) -> None:
    assert "missing --batch-size, --out" in _bad(tmp_path, "--model", "lenet5")


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path) -> None:
    result = run_cli(CLI, "--model", "resnet9000", "--batch-size", "4", "--out", str(tmp_path / "x.json"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr
