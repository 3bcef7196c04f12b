"""Benchmark (issue #10, item 5): does ``edge_server advise`` name the scheme the testbed found fastest?

For each fleet and medium the testbed measured (``bench/testbed_compare.py``: the default
fleet with LeNet-5 and the heavy fleet with WideNet, each on the wired and the Wi-Fi
medium), ``edge_server advise`` runs on the matching fleet file (bench/fleets/: the
testbed's rates, Wi-Fi rates less 802.11's per-frame overhead, the CPU-class profiles that
run measured) with the testbed's data (builtin:mnist5k, Dirichlet 0.5), and its
predictions sit beside what was measured.

    python bench/advisor_check.py [--scenarios default-wifi,...] [--out DIR]

Writes DIR/advisor_check.json and DIR/advice-SCENARIO.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {  # name: (reference profile, fleet file, the testbed run it is checked against)
    "default-wifi": ("profiles/epyc-vm-2vcpu/lenet5.json", "testbed-wifi.json", "testbed_default_wifi"),
    "default-wired": ("profiles/epyc-vm-2vcpu/lenet5.json", "testbed-wired.json", "testbed_default_wired"),
    "heavy-wifi": ("profiles/epyc-vm-2vcpu/widenet.json", "testbed-heavy-wifi.json", "testbed_heavy_wifi"),
    "heavy-wired": ("profiles/epyc-vm-2vcpu/widenet.json", "testbed-heavy-wired.json", "testbed_heavy_wired"),
}


def measured(path: str) -> dict[str, dict]:
    """Each scheme's time to the target, mean round and rounds, as the testbed measured them."""
    results: dict[str, dict] = {}
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
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--max-rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "advisor")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python " + " ".join(["bench/advisor_check.py", *sys.argv[1:]]), "scenarios": {}}
    for name in args.scenarios.split(","):
        profile, fleet, run = SCENARIOS[name]
        advice_path = args.out / f"advice-{name}.json"
        command = [
            sys.executable,
            "-m",
            "edge_server",
            "advise",
            "--profile",
            profile,
            "--fleet",
            f"bench/fleets/{fleet}",
            "--data",
            "builtin:mnist5k",
            "--non-iid",
            "dirichlet:0.5",
            "--max-rounds",
            str(args.max_rounds),
            "--json",
            str(advice_path),
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        print(done.stdout, flush=True)
        advice = json.loads(advice_path.read_text())
        truth = measured(f"bench/results/{run}/compare.json")
        reached = [s for s in truth if truth[s]["time_to_target_s"]]
        fastest = min(reached, key=lambda s: truth[s]["time_to_target_s"]) if reached else None
        rows = {
            row["scheme"]: {
                "predicted": {k: row[k] for k in ("cut", "round_latency_s", "rounds", "time_to_target_s")},
                "measured": truth.get(row["scheme"]),
            }
            for row in advice["schemes"]
        }
        predicted_order = sorted(rows, key=lambda s: rows[s]["predicted"]["time_to_target_s"] or float("inf"))
        measured_order = sorted(truth, key=lambda s: truth[s]["time_to_target_s"] or float("inf"))
        report["scenarios"][name] = {
            "advice_command": " ".join(["edge_server", *command[3:]]),
            "recommended": advice["recommended"],
            "fastest_measured": fastest,
            "names_the_fastest": advice["recommended"] == fastest,
            # the fastest is the one named, or one the advice says is too close to call
            "close": advice.get("close", []),
            "fastest_named_or_close": fastest in [advice["recommended"], *advice.get("close", [])],
            "predicted_order": predicted_order,
            "measured_order": measured_order,
            "schemes": rows,
        }
        close = f" (too close to call: {', '.join(advice['close'])})" if advice.get("close") else ""
        print(f"{name}: advised {advice['recommended']}{close}, fastest measured {fastest}", flush=True)
        (args.out / "advisor_check.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'advisor_check.json'}")


if __name__ == "__main__":
    main()
