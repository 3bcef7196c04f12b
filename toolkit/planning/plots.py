"""Figures of ``cpsl-sim``: latency over rounds, and sweeps against devices or bandwidth."""

from __future__ import annotations

from pathlib import Path

COLORS = {"sl": "tab:gray", "sfl": "tab:purple", "fl": "tab:green", "cpsl-random": "tab:orange", "cpsl": "tab:blue"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: servers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(result: dict, path: Path) -> None:
    """Round latency per scheme over rounds, and the cut cpsl used."""
    plt = _pyplot()
    schemes = result["schemes"]
    figure, (latency_axis, cut_axis) = plt.subplots(
        2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for scheme, data in schemes.items():
        rounds = [r["round"] for r in data["rounds"]]
        latency_axis.plot(rounds, data["round_latency_s"], marker="o", ms=3, color=COLORS.get(scheme), label=scheme)
    latency_axis.set_yscale("log")
    latency_axis.set_ylabel("round latency [s]")
    latency_axis.grid(True, which="both", alpha=0.3)
    latency_axis.legend(ncol=3, fontsize=8)
    config = result["config"]
    latency_axis.set_title(
        f"{config['model']}: {config['devices']} devices, {config['bandwidth_mhz']} MHz, seed {config['seed']}"
    )
    if "cpsl" in schemes:
        rounds = [r["round"] for r in schemes["cpsl"]["rounds"]]
        cut_axis.step(rounds, [r["cut"] for r in schemes["cpsl"]["rounds"]], where="post", color=COLORS["cpsl"])
        names = {r["cut"]: r["cut_name"] for r in schemes["cpsl"]["rounds"]}
        cut_axis.set_yticks(sorted(names), [f"{c}:{names[c]}" for c in sorted(names)])
        cut_axis.set_ylabel("cpsl cut")
    cut_axis.set_xlabel("round")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_sweep(result: dict, path: Path) -> None:
    """Mean round latency per scheme against the swept parameter, and cpsl's chosen cut."""
    plt = _pyplot()
    sweep = result["sweep"]
    values = sweep["values"]
    label = {"devices": "number of devices", "bandwidth_mhz": "bandwidth [MHz]"}[sweep["parameter"]]
    figure, (latency_axis, cut_axis) = plt.subplots(
        2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for scheme, means in sweep["mean_latency_s"].items():
        latency_axis.plot(values, means, marker="o", color=COLORS.get(scheme), label=scheme)
    latency_axis.set_yscale("log")
    latency_axis.set_ylabel("mean round latency [s]")
    latency_axis.grid(True, which="both", alpha=0.3)
    latency_axis.legend(ncol=3, fontsize=8)
    latency_axis.set_title(f"{result['config']['model']}: {sweep['rounds']} rounds per point, seed {sweep['seed']}")
    if sweep.get("cpsl_cut"):
        cuts = sweep["cpsl_cut"]
        cut_axis.plot(values, [c["cut"] for c in cuts], marker="s", color=COLORS["cpsl"])
        names = {c["cut"]: c["name"] for c in cuts}
        cut_axis.set_yticks(sorted(names), [f"{c}:{names[c]}" for c in sorted(names)])
        cut_axis.set_ylabel("cpsl cut\n(most used)")
    if sweep["parameter"] == "bandwidth_mhz":
        cut_axis.set_xscale("log")
    cut_axis.set_xlabel(label)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
