"""The CPSL paper's Fig. 1(b) view: per cut, what one round costs a device under SL versus FL.

Per round a device trains on its D local samples in batches of B:
- SL at cut l: compute D/B device-side training steps; traffic D samples of smashed
  data up and as many gradients down, the labels up, and the device-side model down
  and up once.
- FL: compute D/B whole-model training steps; traffic the whole model down and up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from toolkit.profile_format import Profile

LABEL_BYTES = 8  # labels travel as int64


@dataclass(frozen=True)
class RoundCost:
    label: str
    compute_s: float
    bytes: float


def round_costs(profile: Profile, samples: int, batch_size: int) -> tuple[list[RoundCost], RoundCost]:
    """Per-cut SL costs and the FL cost of one round over ``samples`` local samples."""
    position = profile.settings.batch_sizes.index(batch_size)
    steps = math.ceil(samples / batch_size)
    sl = [
        RoundCost(
            label=f"{cut.cut}:{cut.after}",
            compute_s=steps * cut.batches[position].step_s.median,
            bytes=samples * (2 * cut.smashed_bytes_per_sample + LABEL_BYTES) + 2 * cut.device_param_bytes,
        )
        for cut in profile.cuts
    ]
    fl = RoundCost(
        label="FL",
        compute_s=steps * profile.full_model.batches[position].step_s.median,
        bytes=2 * profile.full_model.param_bytes,
    )
    return sl, fl


def plot_sl_vs_fl(profile: Profile, path: Path, samples: int, batch_size: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: boards and CI have no display
    import matplotlib.pyplot as plt

    batch_size = batch_size or profile.settings.batch_sizes[0]
    sl, fl = round_costs(profile, samples, batch_size)
    labels = [cost.label for cost in sl]
    figure, (compute_axis, bytes_axis) = plt.subplots(2, 1, figsize=(max(7, 0.55 * len(sl) + 3), 7), sharex=True)
    compute_axis.bar(labels, [cost.compute_s for cost in sl], color="tab:blue", label="SL: device-side part")
    compute_axis.axhline(fl.compute_s, color="tab:red", linestyle="--", label="FL: whole model")
    compute_axis.set_ylabel("device compute per round [s]")
    compute_axis.legend()
    bytes_axis.bar(
        labels,
        [cost.bytes / 2**20 for cost in sl],
        color="tab:green",
        label="SL: smashed data, gradients, labels, model",
    )
    bytes_axis.axhline(fl.bytes / 2**20, color="tab:red", linestyle="--", label="FL: model down and up")
    bytes_axis.set_ylabel("bytes per round [MiB]")
    bytes_axis.set_yscale("log")
    bytes_axis.legend()
    bytes_axis.set_xlabel("cut (layers on the device : last device-side layer)")
    plt.setp(bytes_axis.get_xticklabels(), rotation=45, ha="right")
    figure.suptitle(
        f"{profile.model.name} on {profile.device.id}: one round over {samples} local samples, batch {batch_size}"
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
