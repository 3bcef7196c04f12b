"""Benchmark (issue #10, item 5): does ``edge_server advise`` name the scheme the testbed found fastest?

For each medium, ``edge_server advise`` runs on the testbed's default fleet
(bench/fleets/testbed-{wifi,wired}.json: the default classes' rates, Wi-Fi rates less
802.11's per-frame overhead, the measured CPU-class profiles) with the testbed's data
(builtin:mnist5k, Dirichlet 0.5), and its predictions sit beside what
``bench/testbed_compare.py`` measured on that medium (each scheme's latest run).

    python bench/advisor_check.py [--out DIR]

Writes DIR/advisor_check.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURED = {  # latest testbed run of each scheme per medium; later entries override earlier ones
    "wifi": ["bench/results/testbed_wifi/compare.json", "bench/results/testbed_wifi_auto/compare.json"],
    "wired": ["bench/results/testbed/compare.json", "bench/results/testbed_wired_media/compare.json"],
}


def measured(paths: list[str]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for path in paths:
        for scheme, row in json.loads((ROOT / path).read_text())["results"].items():
            if scheme in ("sl", "sfl", "fl", "cpsl-fixed", "cpsl-auto"):
                results[scheme] = {
                    "time_to_target_s": row["time_to_target_s"],
                    "mean_round_latency_s": row["mean_round_latency_s"],
                    "rounds": row["round_to_target"] + 1 if row["round_to_target"] is not None else None,
                    "source": path,
                }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "advisor")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python bench/advisor_check.py", "media": {}}
    for medium, paths in MEASURED.items():
        advice_path = args.out / f"advice-{medium}.json"
        command = [
            sys.executable,
            "-m",
            "edge_server",
            "advise",
            "--profile",
            "profiles/epyc-vm-2vcpu/lenet5.json",
            "--fleet",
            f"bench/fleets/testbed-{medium}.json",
            "--data",
            "builtin:mnist5k",
            "--non-iid",
            "dirichlet:0.5",
            "--json",
            str(advice_path),
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        print(done.stdout, flush=True)
        advice = json.loads(advice_path.read_text())
        truth = measured(paths)
        fastest = min((s for s in truth if truth[s]["time_to_target_s"]), key=lambda s: truth[s]["time_to_target_s"])
        rows = {
            row["scheme"]: {
                "predicted": {k: row[k] for k in ("cut", "round_latency_s", "rounds", "time_to_target_s")},
                "measured": truth.get(row["scheme"]),
            }
            for row in advice["schemes"]
        }
        predicted_order = sorted(rows, key=lambda s: rows[s]["predicted"]["time_to_target_s"] or float("inf"))
        measured_order = sorted(truth, key=lambda s: truth[s]["time_to_target_s"] or float("inf"))
        report["media"][medium] = {
            "advice_command": " ".join(command[2:]),
            "recommended": advice["recommended"],
            "fastest_measured": fastest,
            "names_the_fastest": advice["recommended"] == fastest,
            "predicted_order": predicted_order,
            "measured_order": measured_order,
            "schemes": rows,
        }
        print(f"{medium}: advised {advice['recommended']}, fastest measured {fastest}", flush=True)
    (args.out / "advisor_check.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'advisor_check.json'}")


if __name__ == "__main__":
    main()
