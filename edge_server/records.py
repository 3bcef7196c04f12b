"""Records of a run on disk: metrics.jsonl, the per-round checkpoint, the final model (state dict + ONNX).

Apart from the round loop so that what a run leaves behind is written in one place, and
every file atomically: a crash mid-write leaves the previous file, never half of a new one.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from edge_server.scheduler import RoundPlan
from toolkit.models import LayeredModel


class RunRecords:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics = run_dir / "metrics.jsonl"

    def open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def checkpoint(self, round_: int, model: LayeredModel) -> None:
        atomic_torch_save(
            {
                "round": round_,
                "model": model.name,
                "fingerprint": model.fingerprint(),
                "state_dict": model.net.state_dict(),
            },
            self.run_dir / "checkpoint.pt",
        )

    def save_final(self, model: LayeredModel) -> None:
        atomic_torch_save(model.net.state_dict(), self.run_dir / "model.pt")
        frozen = model.net.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                frozen,
                (torch.zeros(1, *model.input_shape),),
                str(self.run_dir / "model.onnx"),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        model.net.train()


def atomic_torch_save(obj: object, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def turn_record(
    cluster: int, plan: RoundPlan, started: float, smashed_in: list[float], last_gradient: float, ended: float
) -> dict:
    """A turn's phases as measured (monotonic seconds), next to the plan's prediction: where a
    prediction misses. Goes into the round's record under ``turns``."""
    gaps = len(smashed_in) - 1
    record = {
        "cluster": cluster,
        "measured_s": ended - started,
        "first_smashed_s": smashed_in[0] - started if smashed_in else None,
        "iteration_s": (smashed_in[-1] - smashed_in[0]) / gaps if gaps > 0 else None,
        "model_up_s": ended - last_gradient,
    }
    timing = plan.timing.get(cluster)
    if timing is not None:
        record.update(timing.to_dict())
    return record
