"""Validation of the Wi-Fi medium: saturated stations through the relay against 802.11's models.

Two sets of cases, each through the real relay (toolkit/testbed/wifi.py) with real TCP:

- contention-free (``--contention none``), against the airtime formula of equal transmit
  opportunities, ``8F / sum_j (8 (F + 34) / r_j + o)`` (the performance anomaly, Heusse et
  al. 2003): 1, 2, 4 and 8 stations of mixed PHY rates sending up, the access point sending
  to 4 stations (one contender: they share its turns), and 2 stations up while the access
  point sends to 2 others;
- with contention (``--contention dcf``, the testbed's default), against Bianchi's model of
  DCF's saturation throughput (toolkit/planning/contention.py): 1, 2, 4, 8 and 16 stations
  at 24 Mbit/s, and 8 stations of mixed rates.

Every station sends bulk TCP data as fast as it can to a sink behind the relay; the bytes
delivered in a measurement window (after a warm-up) give its throughput. Stations are told
apart by source address: each binds its own loopback address (127.0.0.10 + i), as each
testbed device has its own address. Bianchi's model is of the aggregate (DCF is fair only in
the long run: a station that collided sits in a wide window for a while), so a contention
case is judged on the stations' total and shows the per-station spread beside it.

    python bench/wifi_medium.py [--out bench/results/evidence/full/wifi] [--seconds 6] [--repeats 3]

Writes OUT/wifi_medium.json: per case, per station, measured (median of the repeats) and
predicted Mbit/s, the ratio, and per contention case the total's ratio; exits 1 if a
contention-free station or a contention case's total is off by more than 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.planning.contention import saturated_throughput_dcf  # noqa: E402
from toolkit.testbed.airtime import (  # noqa: E402
    DEFAULT_FRAME_BYTES,
    DEFAULT_OVERHEAD_S,
    saturated_mixed,
    saturated_throughput,
)
from toolkit.testbed.wifi import Station, WifiRelay  # noqa: E402

RATES_MBIT = [54.0, 6.0, 24.0, 12.0, 36.0, 18.0, 48.0, 9.0]  # 802.11a/g rates, mixed
BIANCHI_RATE_MBIT = 24.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def run_case(
    rates_mbit: list[float], directions: list[str], seconds: float, warmup: float, contention: str, seed: int
) -> list[float]:
    """Mbit/s each station got over ``seconds`` after ``warmup``, all of them saturated, each
    sending up to the sink or receiving from it (``directions``: "up" or "down" per station)."""
    sink_port, relay_port = free_port(), free_port()
    addresses = [f"127.0.0.{10 + i}" for i in range(len(rates_mbit))]
    stations = {
        a: Station(f"sta{i}", r * 1e6, r * 1e6) for i, (a, r) in enumerate(zip(addresses, rates_mbit, strict=True))
    }
    relay = WifiRelay(("127.0.0.1", sink_port), stations, contention=contention, seed=seed)
    received: dict[int, int] = {}
    payload = bytes(64 << 10)
    stop = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the first 8 bytes name the station; then the sink counts (uplink) or sends (downlink).
        # The case ends by cancelling everything: a cancelled handler returns quietly (asyncio
        # would print the cancellation of a connection's handler as a traceback).
        try:
            index = int((await reader.readexactly(8)).decode())
            received.setdefault(index, 0)
            if directions[index] == "up":
                while not stop.is_set():
                    data = await reader.read(1 << 20)
                    if not data:
                        break
                    received[index] += len(data)
            else:
                while not stop.is_set():
                    writer.write(payload)
                    await writer.drain()
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def station(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_port, local_addr=(addresses[index], 0))
        writer.write(f"{index:08d}".encode())
        if directions[index] == "up":
            while not stop.is_set():
                writer.write(payload)
                await writer.drain()
        else:
            while not stop.is_set():
                data = await reader.read(1 << 20)
                if not data:
                    break
                received[index] = received.get(index, 0) + len(data)
        writer.close()

    sink_server = await asyncio.start_server(sink, "127.0.0.1", sink_port)
    relay_task = asyncio.create_task(relay.serve("127.0.0.1", relay_port))
    await asyncio.sleep(0.2)
    senders = [asyncio.create_task(station(i)) for i in range(len(rates_mbit))]
    await asyncio.sleep(warmup)
    start = dict(received)
    started = time.monotonic()
    await asyncio.sleep(seconds)
    end = dict(received)
    elapsed = time.monotonic() - started
    stop.set()
    for task in [*senders, relay_task]:
        task.cancel()
    sink_server.close()
    await asyncio.gather(*senders, relay_task, return_exceptions=True)
    return [8 * (end.get(i, 0) - start.get(i, 0)) / elapsed / 1e6 for i in range(len(rates_mbit))]


def predict(rates_mbit: list[float], directions: list[str], contention: str) -> list[float]:
    """Mbit/s per station: Bianchi's model with contention (uplinks only), else the airtime rule
    (the access point is one contender for all downlinks)."""
    if contention == "dcf":
        return [rate / 1e6 for rate in saturated_throughput_dcf([r * 1e6 for r in rates_mbit])]
    up = [r * 1e6 for r, d in zip(rates_mbit, directions, strict=True) if d == "up"]
    down = [r * 1e6 for r, d in zip(rates_mbit, directions, strict=True) if d == "down"]
    if up and down:
        up_bps, down_bps = saturated_mixed(up, down)
    elif up:
        up_bps, down_bps = saturated_throughput(up), []
    else:  # the access point alone: its destinations share its turns, one frame each
        up_bps, down_bps = [], saturated_throughput(down)
    ups, downs = iter(up_bps), iter(down_bps)
    return [(next(ups) if d == "up" else next(downs)) / 1e6 for d in directions]


def cases() -> list[tuple[str, list[float], list[str]]]:
    """(contention, PHY rates, directions) of every case."""
    free = [["up"] * n for n in (1, 2, 4, 8)] + [["down"] * 4, ["up", "up", "down", "down"]]
    listed = [("none", RATES_MBIT[: len(d)], d) for d in free]
    listed += [("dcf", [BIANCHI_RATE_MBIT] * n, ["up"] * n) for n in (1, 2, 4, 8, 16)]
    listed.append(("dcf", RATES_MBIT, ["up"] * len(RATES_MBIT)))
    return listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "evidence" / "full" / "wifi")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args()
    results, worst = [], 0.0
    for number, (contention, rates, directions) in enumerate(cases()):
        count = len(directions)
        runs = [
            asyncio.run(run_case(rates, directions, args.seconds, args.warmup, contention, seed=number * 10 + repeat))
            for repeat in range(args.repeats)
        ]
        predicted = predict(rates, directions, contention)
        stations = []
        for index, rate in enumerate(rates):
            measured = statistics.median(run[index] for run in runs)
            ratio = measured / predicted[index]
            if contention == "none":
                worst = max(worst, abs(ratio - 1))
            stations.append(
                {
                    "station": f"sta{index}",
                    "direction": directions[index],
                    "phy_mbit": rate,
                    "measured_mbit": measured,
                    "predicted_mbit": predicted[index],
                    "ratio": ratio,
                    "runs_mbit": [run[index] for run in runs],
                }
            )
        direction = directions[0] if len(set(directions)) == 1 else "mixed"
        case = {"contention": contention, "stations": count, "direction": direction, "rows": stations}
        if contention == "dcf":
            total = statistics.median(sum(run) for run in runs)
            case["total_measured_mbit"] = total
            case["total_predicted_mbit"] = sum(predicted)
            case["total_ratio"] = total / sum(predicted)
            case["station_spread"] = [min(s["ratio"] for s in stations), max(s["ratio"] for s in stations)]
            worst = max(worst, abs(case["total_ratio"] - 1))
            line = (
                f"total {total:.2f}/{sum(predicted):.2f} Mbit/s (ratio {case['total_ratio']:.3f}), "
                f"stations at {case['station_spread'][0]:.2f}-{case['station_spread'][1]:.2f} of the model's share"
            )
        else:
            line = "PHY->measured/predicted Mbit/s " + ", ".join(
                f"{s['direction']} {s['phy_mbit']:g}->{s['measured_mbit']:.2f}/{s['predicted_mbit']:.2f}"
                for s in stations
            )
        results.append(case)
        print(f"{contention:>4} {count:2d} station(s) {direction:>5}: {line}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = f"python bench/wifi_medium.py --seconds {args.seconds:g} --repeats {args.repeats}"
    document = {
        "command": command,
        "frame_bytes": DEFAULT_FRAME_BYTES,
        "overhead_s": DEFAULT_OVERHEAD_S,
        "worst_relative_error": worst,
        "cases": results,
    }
    (args.out / "wifi_medium.json").write_text(json.dumps(document, indent=1) + "\n")
    print(f"worst case off its model by {100 * worst:.1f}%; wrote {args.out / 'wifi_medium.json'}")
    if worst > args.tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
