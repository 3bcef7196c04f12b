"""One command for the evidence of docs/testbed.md: run the benchmarks, then redraw their tables.

    sudo .venv/bin/python bench/evidence.py --quick     # default fleet, Wi-Fi and wired, one seed
    sudo .venv/bin/python bench/evidence.py --full      # three fleets, both media, three seeds
    .venv/bin/python bench/evidence.py --render         # only redraw the tables from the results

``--quick`` (31.5 minutes here on 2026-12-07, 5.5 of them the medium's validation at
three repeats, which it now runs at one: about 28): the Wi-Fi medium's validation against
Bianchi's model, the simulator's ablation (one seed), and on the testbed for the default
fleet on each medium cpsl-auto first, then at the cut it used most cpsl without resource
management, cpsl with both pieces, SL and SFL at that cut, and FL. ``--full`` (about 12
hours here, estimated from the heavy fleet on Wi-Fi: 2.3 hours for every variant but the
two single pieces; not yet run end to end): the same for the default, heavy and wide
fleets, three seeds, the clustering-only and slots-only ablations too, and SL and SFL at
every cut of the sweep -- every cut at seed 0, the remaining seeds at the cuts within 10%
of the best, a run stopped once it passes 3x cpsl-auto's slowest seed (bench/ablation.py);
the table names the best cut and the cuts swept. Everything resumes: each benchmark skips
what its folder already holds, so an interrupted invocation goes on where it stopped.

``--full`` ends with the held-out check (``bench/heldout.py check``) when its prediction is
committed (``bench/heldout.py predict``, by hand: a prediction is made once, before any run).

A table the three-seed ``full`` results hold is always drawn from them: ``--quick`` fills in
only the tables ``--full`` has not produced yet. Tables are redrawn between
``<!-- evidence:NAME -->`` and ``<!-- /evidence:NAME -->`` in docs/testbed.md; the commit each
result came from is written beside it (``OUT/provenance.json``). What it does not regenerate yet: the earlier tables of
docs/testbed.md (the default and heavy fleets' one-run comparisons, fidelity, the advisor
check), which come from bench/testbed_compare.py, bench/advisor_check.py and their JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "testbed.md"
RESULTS = ROOT / "bench" / "results" / "evidence"
HELDOUT = ROOT / "bench" / "results" / "heldout"  # one held-out check, whatever the mode
PYTHON = sys.executable
# the cuts each split baseline is swept over (--full), by model: its candidate cuts
SWEEP = {"lenet5": ("pool1", "pool2", "fc1", "fc2"), "widenet": ("pool1", "pool2", "pool3", "fc1")}
FLEET_MODEL = {"default": "lenet5", "heavy": "widenet", "wide": "widenet"}


def commit() -> str:
    """The commit the results come from; ``+dirty`` when the working tree had changes."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return head + ("+dirty" if dirty.stdout.strip() else "")


def step(name: str, command: list[str], out: Path) -> None:
    """One benchmark; its provenance (command, commit) recorded beside its results."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    provenance = out / "provenance.json"
    out.mkdir(parents=True, exist_ok=True)
    shown = [str(Path(part).relative_to(ROOT)) if part.startswith(f"{ROOT}/") else part for part in command[1:]]
    provenance.write_text(json.dumps({"command": shown, "commit": commit()}, indent=1))


def modal_cut(folder: Path) -> str:
    """The cut cpsl-auto used most over its rounds and seeds."""
    cuts: Counter[str] = Counter()
    for metrics in folder.glob("cpsl-auto/seed-*/metrics.jsonl"):
        cuts.update(json.loads(line).get("cut_name") for line in metrics.read_text().splitlines())
    cuts.pop(None, None)
    if not cuts:
        raise SystemExit(f"no cpsl-auto round in {folder}: run it first")
    return cuts.most_common(1)[0][0]


def run_testbed(fleet: str, medium: str, seeds: str, full: bool, out: Path) -> None:
    folder = out / f"ablation_{fleet}_{medium}"
    base = [PYTHON, "bench/ablation.py", "--fleet", fleet, "--medium", medium, "--seeds", seeds, "--out", str(folder)]
    step(f"{fleet} {medium}: cpsl-auto", [*base, "--variants", "cpsl-auto"], folder)
    cut = modal_cut(folder)
    variants = ["cpsl-none", "cpsl-both", "fl"]
    if full:
        variants += ["cpsl-clusters", "cpsl-slots"]
        variants += [f"{scheme}@{c}" for scheme in ("sl", "sfl") for c in SWEEP[FLEET_MODEL[fleet]]]
    else:
        variants += [f"sl@{cut}", f"sfl@{cut}"]
    step(f"{fleet} {medium}: at {cut}", [*base, "--cut", cut, "--variants", ",".join(variants)], folder)


# -- tables -----------------------------------------------------------------------------------


def _cell(value: dict | None, digits: int = 1) -> str:
    if not value:
        return "-"
    if value["n"] == 1:
        return f"{value['median']:.{digits}f}"
    return f"{value['median']:.{digits}f} ({value['min']:.{digits}f}-{value['max']:.{digits}f})"


def _wall_cell(row: dict) -> str:
    """Time to target; a run stopped short of it (bench/ablation.py) shows the bound it passed."""
    stopped = row.get("gave_up_after_s")
    if stopped and not row["wall_to_target_s"]:
        return f"> {_cell(stopped)} (stopped)"
    return _cell(row["wall_to_target_s"])


def _enough_seeds(ours: dict, theirs: dict) -> bool:
    """Issue #24 item 4: three seeds a side, except that a baseline over 3x slower than our
    slowest seed may have run one (or was stopped once it passed 3x)."""
    if len(ours["seeds"]) < 3:
        return False
    if len(theirs["seeds"]) >= 3:
        return True
    slowest = (ours["wall_to_target_s"] or {}).get("max")
    their_wall, stopped = theirs["wall_to_target_s"], theirs.get("gave_up_after_s")
    if slowest and stopped and not their_wall:
        return stopped["median"] >= 3 * slowest * 0.999  # stopped at 3x our slowest, as it was then
    return bool(slowest and their_wall and their_wall["median"] > 3 * slowest)


def _sweep_rank(document: dict, variant: str) -> tuple[int, float]:
    """How a swept cut ranks: by its first seed's time to target (every cut of a sweep runs
    that seed; only the best ones run more), a run stopped short of the target after any
    that reached it."""
    row = document["rows"][variant]
    runs = document.get("runs", {}).get(variant)
    if runs:
        first = runs[min(runs, key=int)]
        if first.get("wall_to_target_s") is not None:
            return 0, first["wall_to_target_s"]
        return 1, first.get("gave_up_after_s") or float("inf")
    if row["wall_to_target_s"]:
        return 0, row["wall_to_target_s"]["median"]
    return 1, (row.get("gave_up_after_s") or {}).get("median", float("inf"))


ABLATION_ORDER = ("cpsl-none", "cpsl-clusters", "cpsl-slots", "cpsl-both", "cpsl-auto")


def ablation_table(document: dict) -> str:
    """The testbed ablation: every variant's medians and ranges, the best cut of each split
    baseline's sweep, the claims under the rule."""
    rows = document["rows"]
    best: dict[str, str] = {}
    label: dict[str, str] = {}
    for scheme in ("sl", "sfl"):
        finished = {v: r for v, r in rows.items() if r["wall_to_target_s"] or r.get("gave_up_after_s")}
        swept = {v: r for v, r in finished.items() if v.startswith(f"{scheme}@")}
        if swept:
            best[scheme] = min(swept, key=lambda v: _sweep_rank(document, v))
            cuts = ", ".join(v.partition("@")[2] for v in sorted(swept))
            label[best[scheme]] = f" (best of {cuts})" if len(swept) > 1 else " (one cut, not swept)"
    planned = [v for v in ABLATION_ORDER if v in rows]
    planned += sorted(v for v in rows if v.startswith("cpsl-") and v not in ABLATION_ORDER)  # e.g. cpsl-both-max7
    shown = planned + [v for v in (*best.values(), "fl") if v in rows]
    lines = [
        "| variant | seeds | wall to target [s] | from fleet ready [s] | rounds to target | round [s] | efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in shown:
        row = rows[variant]
        reached = row["rounds_to_target"]
        rounds = "-"
        if reached:
            rounds = f"{reached['median'] + 1:g}"
            if reached["n"] > 1:
                rounds += f" ({reached['min'] + 1:g}-{reached['max'] + 1:g})"
        name = variant + label.get(variant, "")
        lines.append(
            f"| {name} | {len(row['seeds'])} | {_wall_cell(row)} | "
            f"{_cell(row.get('ready_to_target_s'))} | {rounds} | {_cell(row['mean_round_s'], 2)} | "
            f"{_cell(row['median_efficiency'], 2)} |"
        )
    claims, shorter = [], []
    for ours in [v for v in planned if v not in ("cpsl-none", "cpsl-clusters", "cpsl-slots")]:
        for theirs in ("cpsl-none", *best.values(), "fl"):
            claim = document["claims"].get(f"{ours} vs {theirs}")
            if claim:
                verdict = "holds" if claim["holds"] else "does not hold"
                if not _enough_seeds(rows[ours], rows[theirs]):
                    verdict = "no claim: too few seeds"
                at_most = "at most " if claim.get("at_most") else ""
                claims.append(f"{ours} against {theirs}: {at_most}{claim['ratio']:.2f}x the time, {verdict}")
        none, mine = rows.get("cpsl-none", {}).get("mean_round_s"), rows[ours]["mean_round_s"]
        if none and mine and ours != "cpsl-none":  # issue #24's goal is on rounds: 1.25x shorter than cpsl-none's
            shorter.append(f"{ours} {none['median'] / mine['median']:.2f}x")
    text = "\n".join(lines)
    if claims:
        text += (
            "\n\nClaims (our median below theirs, and our slowest seed below their median): " + "; ".join(claims) + "."
        )
    if shorter:
        text += " Rounds shorter than cpsl-none's (medians): " + ", ".join(shorter) + "."
    if document.get("ceiling_over_none"):
        text += (
            f" No plan at this cut could make a round more than {document['ceiling_over_none']:.2f}x shorter than"
            " cpsl-none's (its round over the round's lower bound)."
        )
    return text


SIM_ORDER = ("cpsl-none", "cpsl-clusters", "cpsl-slots", "cpsl-both", "sl", "sfl", "fl")


def sim_table(document: dict) -> str:
    lines = [
        "| fleet, medium | cut | "
        + " | ".join(SIM_ORDER)
        + " | both over none (paired) | clusters / slots over none |",
        "|" + "---|" * (len(SIM_ORDER) + 4),
    ]
    for key, entry in document["table"].items():
        rows, claims = entry["rows"], entry["claims"]
        cells = []
        for variant in SIM_ORDER:
            cell = f"{rows[variant]['median']:.1f}"
            if variant in ("sl", "sfl"):
                cell += f" ({entry[f'{variant}_cut']})"
            cells.append(cell)
        both = claims["cpsl-both vs cpsl-none"]
        lines.append(
            f"| {key.replace('-', ', ')} | {entry['cut']} | "
            + " | ".join(cells)
            + f" | **{both['ratio']:.2f}x** ({both['paired_min']:.2f}-{both['paired_max']:.2f})"
            + f" | {claims['cpsl-clusters vs cpsl-none']['ratio']:.2f}x"
            + f" / {claims['cpsl-slots vs cpsl-none']['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def contention_table(document: dict) -> str:
    lines = [
        "| stations | PHY rates (Mbit/s) | measured total (Mbit/s) | Bianchi's model | ratio "
        "| stations, of the model's share |",
        "|---|---|---|---|---|---|",
    ]
    for case in document["cases"]:
        if case["contention"] != "dcf":
            continue
        rates = [row["phy_mbit"] for row in case["rows"]]
        shown = (
            f"{rates[0]:g}"
            if len(rates) == 1
            else (f"{rates[0]:g} each" if len(set(rates)) == 1 else ", ".join(f"{r:g}" for r in rates))
        )
        low, high = case["station_spread"]
        lines.append(
            f"| {case['stations']} | {shown} | {case['total_measured_mbit']:.2f} | "
            f"{case['total_predicted_mbit']:.2f} | {case['total_ratio']:.3f} | {low:.2f}-{high:.2f} |"
        )
    return "\n".join(lines)


def _number(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.1f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def heldout_table(check: dict) -> str:
    """The held-out check (bench/heldout.py): each scheme's prediction beside its seeds' medians."""
    lines = [
        "| scheme | seeds | predicted: cut, round, rounds, time to target | measured: cut, round, rounds, "
        "rounds' sum, wall clock | error (rounds' sum / wall) |",
        "|---|---|---|---|---|",
    ]
    for scheme, row in check["schemes"].items():
        p, m = row["predicted"], row["measured"]
        errors = [row["error_vs_rounds_sum"], row["error_vs_wall"]]
        shown = " / ".join("-" if e is None else f"{e:+.0%}" for e in errors)
        lines.append(
            f"| {scheme} | {len(row['seeds'])} | {p['cut'] or '-'}, {_number(p['round_latency_s'], ' s')}, "
            f"{_number(p['rounds'])}, {_number(p['time_to_target_s'], ' s')} | {m['cut'] or '-'}, "
            f"{_number(m['mean_round_s'], ' s')}, {_number(m['rounds'])}, "
            f"{_number(m['latency_sum_to_target_s'], ' s')}, {_number(m['wall_to_target_s'], ' s')} | {shown} |"
        )
    close = f" (too close to call: {', '.join(check['close'])})" if check["close"] else ""
    verdict = "names it" if check["names_the_fastest"] else "does not name it"
    lines.append("")
    lines.append(
        f"The advisor said **{check['recommended']}**{close}; the fastest measured (median wall clock) was "
        f"**{check['fastest_measured']}**: it {verdict}. Prediction made {check['prediction_made_utc']} on the code of "
        f"commit {check['prediction_commit'][:10]}, before the first run."
    )
    return "\n".join(lines)


def tables(out: Path) -> dict[str, str]:
    """Every table the results in ``out`` (and the committed ones) can draw, by marker name."""
    drawn = {}
    wifi = out / "wifi" / "wifi_medium.json"
    if wifi.exists():
        drawn["contention"] = contention_table(json.loads(wifi.read_text()))
    sim = out / "sim_ablation" / "sim_ablation.json"
    if sim.exists():
        drawn["sim-ablation"] = sim_table(json.loads(sim.read_text()))
    for path in sorted(out.glob("ablation_*/ablation.json")):
        drawn[path.parent.name.replace("_", "-")] = ablation_table(json.loads(path.read_text()))
    heldout = HELDOUT / "check.json"
    if heldout.exists():
        drawn["heldout"] = heldout_table(json.loads(heldout.read_text()))
    return drawn


def drawing(out: Path) -> dict[str, str]:
    """The tables to draw from ``out``: where the three-seed (``full``) results hold a table,
    it is drawn from them, so that a one-seed ``--quick`` run fills in what ``--full`` has not
    run yet and never replaces a table with a weaker one."""
    drawn = tables(out)
    full = RESULTS / "full"
    if out.resolve() != full.resolve() and full.exists():
        drawn |= tables(full)
    return drawn


def render(drawn: dict[str, str], doc: Path = DOC) -> list[str]:
    """Replace each marked table of ``doc`` by its new drawing; the names it replaced."""
    text = doc.read_text()
    replaced = []
    for name, table in drawn.items():
        pattern = re.compile(
            rf"(<!-- evidence:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /evidence:{re.escape(name)} -->)", re.S
        )  # a new pair of markers may have nothing between them yet
        if pattern.search(text):
            text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
            replaced.append(name)
    doc.write_text(text)
    return replaced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    mode.add_argument("--render", action="store_true", help="only redraw the tables from the results present")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/evidence/MODE)")
    args = parser.parse_args()
    name = "quick" if args.quick else "full" if args.full else None
    out = args.out or RESULTS / (name or "full")
    if name:
        out.mkdir(parents=True, exist_ok=True)
        repeats = "1" if args.quick else "3"  # the medium's validation: 2 minutes at one repeat, 6 at three
        wifi = [PYTHON, "bench/wifi_medium.py", "--repeats", repeats, "--out", str(out / "wifi")]
        step("wifi medium", wifi, out / "wifi")
        seeds = "0" if args.quick else "0,1,2"
        step(
            "sim ablation",
            [PYTHON, "bench/sim_ablation.py", "--seeds", seeds, "--out", str(out / "sim_ablation")],
            out / "sim_ablation",
        )
        fleets = ("default",) if args.quick else ("default", "heavy", "wide")
        for fleet in fleets:
            for medium in ("wifi", "wired"):
                run_testbed(fleet, medium, seeds, args.full, out)
        if args.full and (HELDOUT / "prediction.json").exists():  # the prediction is committed first, by hand
            step("held-out check", [PYTHON, "bench/heldout.py", "check", "--out", str(HELDOUT)], HELDOUT)
    if not out.exists():
        raise SystemExit(f"{out}: no results to draw from; run --quick or --full first")
    replaced = render(drawing(out))
    print(f"redrew {', '.join(replaced) or 'no table'} in {DOC.relative_to(ROOT)} from {out}")


if __name__ == "__main__":
    main()
