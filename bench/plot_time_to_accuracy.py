"""Time to accuracy of every scheme on both fleets and both media, in one figure (issue #10, item 7).

Reads the ``compare.json`` that ``bench/testbed_compare.py`` wrote for each fleet and medium
and draws test accuracy against wall time (the sum of round latencies), one panel per
run, every scheme in the same colour throughout, the target as a dotted line and each
scheme's time to it in the legend.

    python bench/plot_time_to_accuracy.py bench/results/testbed_heavy_wifi bench/results/testbed_heavy_wired \\
        bench/results/testbed_default_wifi bench/results/testbed_default_wired --out docs/figures/testbed_tta.png
"""

from __future__ import annotations

import argparse
import json
import math
from itertools import accumulate
from pathlib import Path

COLOURS = {
    "sl": "tab:gray",
    "sfl": "tab:purple",
    "fl": "tab:green",
    "cpsl-fixed": "tab:orange",
    "cpsl-auto": "tab:blue",
    "cpsl-auto-airtime": "tab:cyan",
}


def panel_title(report: dict) -> str:
    fleet = report.get("fleet", "default")
    return f"{fleet} fleet ({report.get('model', 'lenet5')}), {report.get('medium', 'wired')} medium"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders holding compare.json")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(args.runs))
    rows = math.ceil(len(args.runs) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(7.5 * columns, 4.6 * rows), squeeze=False)
    for axis, folder in zip(axes.flat, args.runs, strict=False):
        report = json.loads((folder / "compare.json").read_text())
        for scheme, result in report["results"].items():
            elapsed = list(accumulate(result["latency_s"]))
            reached = result.get("time_to_target_s")
            label = f"{scheme}: {reached:.0f} s" if reached else f"{scheme}: not in {len(elapsed)} rounds"
            axis.plot(elapsed, result["accuracy"], marker="o", ms=3, color=COLOURS.get(scheme), label=label)
        axis.axhline(args.target, color="gray", linestyle=":")
        axis.set_title(panel_title(report), fontsize=10)
        axis.set_xlabel("wall time [s] (sum of round latencies)")
        axis.set_ylabel("test accuracy")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, title=f"time to {args.target:.0%}", title_fontsize=8)
    for axis in list(axes.flat)[len(args.runs) :]:
        axis.set_visible(False)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
