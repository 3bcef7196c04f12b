"""Rendering a profile for people: one rich table per batch size, cuts as rows, FL as the last row."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from toolkit.profile_format import Profile


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _kib(num_bytes: float) -> str:
    return f"{num_bytes / 1024:.1f}"


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f}"


def cut_tables(profile: Profile) -> list[Table]:
    tables = []
    for position, batch_size in enumerate(profile.settings.batch_sizes):
        table = Table(
            title=f"{profile.model.name} on {profile.device.id} ({profile.device.board}), batch {batch_size}",
            caption="fwd, bwd: device-side part timed whole; Σ: its layers timed alone, summed; "
            "Δ: (Σ - whole)/whole of fwd+bwd; step: fwd+bwd+optimizer",
        )
        for header in (
            "cut",
            "after",
            "smashed KiB/smp",
            "params KiB",
            "fwd ms",
            "Σ",
            "bwd ms",
            "Σ",
            "Δ",
            "step ms",
            "peak MiB",
            "onnx ms",
        ):
            table.add_column(header, justify="left" if header == "after" else "right")
        for cut in profile.cuts:
            batch = cut.batches[position]
            whole = batch.forward_s.median + batch.backward_s.median
            summed = batch.forward_layer_sum_s + batch.backward_layer_sum_s
            table.add_row(
                str(cut.cut),
                cut.after,
                _kib(cut.smashed_bytes_per_sample),
                _kib(cut.device_param_bytes),
                _ms(batch.forward_s.median),
                _ms(batch.forward_layer_sum_s),
                _ms(batch.backward_s.median),
                _ms(batch.backward_layer_sum_s),
                f"{(summed - whole) / whole:+.0%}" if whole > 0 else "-",
                _ms(batch.step_s.median),
                _mib(batch.peak_memory_bytes),
                _ms(batch.onnx_inference_s.median) if batch.onnx_inference_s else "-",
            )
        full = profile.full_model.batches[position]
        table.add_row(
            "FL",
            "all",
            "-",
            _kib(profile.full_model.param_bytes),
            _ms(full.forward_s.median),
            "",
            _ms(full.backward_s.median),
            "",
            "",
            _ms(full.step_s.median),
            _mib(full.peak_memory_bytes),
            "-",
            style="bold",
        )
        tables.append(table)
    return tables


def print_report(profile: Profile, console: Console) -> None:
    for table in cut_tables(profile):
        console.print(table)
