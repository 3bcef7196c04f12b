"""Validation of the Wi-Fi medium (issue #10): saturated stations against the 802.11 airtime formula.

For 1, 2, 4 and 8 stations with mixed PHY rates, every station sends bulk TCP data as
fast as it can through the relay (toolkit/testbed/wifi.py) to a sink behind it; the bytes
each station delivered in a measurement window (after a warm-up) give its throughput,
side by side with the prediction ``8F / sum_j (8 (F + 34) / r_j + o)``
(toolkit/testbed/airtime.py). Stations are told apart by source address: each binds its
own loopback address (127.0.0.10 + i), as each testbed device has its own address.
Also a downlink case (the access point sending to 4 stations: it is one contender, so they
share its turns) and a mixed one (2 stations up, the access point down to 2 others).

    python bench/wifi_medium.py [--out bench/results/wifi] [--seconds 6] [--repeats 3]

Writes OUT/wifi_medium.json: per case, per station, measured (median of the repeats) and
predicted Mbit/s, and the ratio; exits 1 if any station is off by more than 5%.
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

from toolkit.testbed.airtime import (  # noqa: E402
    DEFAULT_FRAME_BYTES,
    DEFAULT_OVERHEAD_S,
    saturated_mixed,
    saturated_throughput,
)
from toolkit.testbed.wifi import Station, WifiRelay  # noqa: E402

RATES_MBIT = [54.0, 6.0, 24.0, 12.0, 36.0, 18.0, 48.0, 9.0]  # 802.11a/g rates, mixed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def run_case(rates_mbit: list[float], directions: list[str], seconds: float, warmup: float) -> list[float]:
    """Mbit/s each station got over ``seconds`` after ``warmup``, all of them saturated, each
    sending up to the sink or receiving from it (``directions``: "up" or "down" per station)."""
    sink_port, relay_port = free_port(), free_port()
    addresses = [f"127.0.0.{10 + i}" for i in range(len(rates_mbit))]
    stations = {
        a: Station(f"sta{i}", r * 1e6, r * 1e6) for i, (a, r) in enumerate(zip(addresses, rates_mbit, strict=True))
    }
    relay = WifiRelay(("127.0.0.1", sink_port), stations)
    received: dict[int, int] = {}
    payload = bytes(64 << 10)
    stop = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the first 8 bytes name the station; then the sink counts (uplink) or sends (downlink)
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


def predict(rates_mbit: list[float], directions: list[str]) -> list[float]:
    """Mbit/s per station by the airtime rule (the access point is one contender for all downlinks)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wifi")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args()
    cases = [["up"] * n for n in (1, 2, 4, 8)] + [["down"] * 4, ["up", "up", "down", "down"]]
    results, worst = [], 0.0
    for directions in cases:
        count = len(directions)
        rates = RATES_MBIT[:count]
        runs = [asyncio.run(run_case(rates, directions, args.seconds, args.warmup)) for _ in range(args.repeats)]
        predicted = predict(rates, directions)
        stations = []
        for index, rate in enumerate(rates):
            measured = statistics.median(run[index] for run in runs)
            ratio = measured / predicted[index]
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
        results.append({"stations": count, "direction": direction, "rows": stations})
        line = ", ".join(
            f"{s['direction']} {s['phy_mbit']:g}->{s['measured_mbit']:.2f}/{s['predicted_mbit']:.2f}" for s in stations
        )
        print(f"{count} station(s) {direction:>5}: PHY->measured/predicted Mbit/s {line}", flush=True)
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
    print(f"worst station off the formula by {100 * worst:.1f}%; wrote {args.out / 'wifi_medium.json'}")
    if worst > args.tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
