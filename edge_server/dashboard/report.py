"""``edge_server report RUN_DIR --out report.html``: a finished run as one self-contained HTML file.

The same page and script as the live dashboard, with Chart.js, the style and the run's view
inlined, so the file opens anywhere with no server and no network (for mail, a wiki, an
issue). The view is built from what the run directory holds: metrics.jsonl (every round),
run.json (the run's settings) and fleet.json (each device's facts, when the server wrote it).

Inputs are bounded: metrics.jsonl up to MAX_METRICS_BYTES, each line a JSON object with a
round number (a line cut short by a crash ends the reading, as ``--resume`` does).
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_server.dashboard import view as v
from edge_server.dashboard.assets import page, static_text
from toolkit.errors import UserError
from toolkit.files import read_bounded, write_atomically

MAX_METRICS_BYTES = 256 * 2**20
MAX_SIDE_FILE_BYTES = 4 * 2**20


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no metrics.jsonl: not a run directory, or the run finished no round")
    text = read_bounded(path, MAX_METRICS_BYTES, "metrics.jsonl").decode("utf-8", errors="replace")
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # cut short by a crash: what came before stands
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            raise UserError(f"{path}:{number} is not a round record")
        records.append(record)
    if not records:
        raise UserError(f"{path} has no round records")
    return records


def _side_file(run_dir: Path, name: str) -> dict:
    """run.json or fleet.json as a dict; {} when absent or not an object (the report draws without it)."""
    path = run_dir / name
    if not path.is_file():
        return {}
    try:
        document = json.loads(read_bounded(path, MAX_SIDE_FILE_BYTES, name))
    except (ValueError, UserError):
        return {}
    return document if isinstance(document, dict) else {}


def report_view(run_dir: Path) -> dict:
    records = read_records(run_dir)
    settings = _side_file(run_dir, "run.json")
    config = settings.get("config") if isinstance(settings.get("config"), dict) else {}
    fleet = _side_file(run_dir, "fleet.json").get("devices")
    infos = {str(d["id"]): d for d in fleet if isinstance(d, dict) and "id" in d} if isinstance(fleet, list) else {}
    run = {
        "id": records[-1].get("run") or config.get("run_id") or run_dir.name,
        "scheme": records[-1].get("scheme") or config.get("scheme"),
        "model": settings.get("model"),
        "rounds_planned": config.get("rounds"),
        "state": "report",
        "rounds_done": len(records),
    }
    return v.run_view(run, records, infos)


def _inline_script(text: str) -> str:
    return "<script>" + text.replace("</script", "<\\/script") + "</script>"


def render_report(run_dir: Path) -> str:
    view_json = v.to_json(report_view(run_dir))
    # "</" cannot close the script element from inside a JSON string once escaped
    embedded = "window.CPSL_VIEW = " + view_json.replace("</", "<\\/") + ";"
    scripts = "".join(
        _inline_script(text) for text in (embedded, static_text("chart.umd.min.js"), static_text("dashboard.js"))
    )
    return page(scripts, "<style>" + static_text("dashboard.css") + "</style>")


def write_report(run_dir: Path, out: Path) -> int:
    html = render_report(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, html)
    return len(html.encode())
