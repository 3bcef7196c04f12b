"""What people look at while a run trains: a live table of rounds, and the final summary."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def rounds_table(history: list[dict], title: str) -> Table:
    table = Table(title=title)
    for header in (
        "round",
        "acc",
        "loss",
        "latency s",
        "device",
        "uplink",
        "server",
        "downlink",
        "model",
        "wait",
        "clusters",
        "dropped",
        "rejected",
    ):
        table.add_column(header, justify="left" if header in ("clusters", "dropped") else "right")
    for record in history:
        b = record["breakdown"]
        table.add_row(
            str(record["round"]),
            f"{record['accuracy']:.2%}",
            f"{record['loss']:.3f}",
            f"{record['latency_s']:.2f}",
            f"{b['device_compute_s']:.2f}",
            f"{b['uplink_s']:.2f}",
            f"{b['server_compute_s']:.2f}",
            f"{b['downlink_s']:.2f}",
            f"{b['model_transfer_s']:.2f}",
            f"{b['waiting_s']:.2f}",
            " | ".join(",".join(c) for c in record["clusters"]),
            ",".join(record["dropped"]) or "-",
            str(sum(record.get("rejected_messages", {}).values())),
        )
    return table


def rejections_summary(record: dict) -> list[str]:
    """Lines on what was refused during the run: devices' refusals, then rejected messages by reason."""
    lines = [f"device {device} refused: {reason}" for device, reason in sorted(record.get("refusals", {}).items())]
    rejected = record.get("rejected_messages", {})
    if rejected:
        top = sorted(rejected.items(), key=lambda item: -item[1])[:8]
        lines.append("rejected messages: " + "; ".join(f"{reason} x{count}" for reason, count in top))
    return lines


def make_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=160)
