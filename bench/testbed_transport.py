"""Benchmark (issue #5c): smashed-data throughput through Mosquitto against the shaped link.

For each capacity, one emulated device sends ``--count`` SMASHED frames (our protocol:
header + raw float32 tensor + int64 labels, QoS 1, chunked above 1 MiB) through Mosquitto
in the access point's namespace to a subscriber there. Effective throughput = payload
bits / (first send to last complete arrival); the ratio to the tbf rate is what the
protocol, MQTT, TCP/IP and the broker keep for themselves. Median of ``--repeats``.

    sudo python bench/testbed_transport.py [--rates 5,10,20,50] [--sizes 51200,602112]
    sudo python bench/testbed_transport.py --tls      # plaintext and TLS side by side (issue #9)

Writes bench/results/testbed_transport/transport.json and transport.png (with ``--tls``:
transport_tls.json, each case measured over plaintext and over TLS with provisioned
certificates, alternating, in one invocation). Needs root.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "cpsl/v1/runs/bench/devices/dev0/up"


def _address(broker: str, bundle: Path | None):
    from toolkit.transport import parse_broker_url
    from toolkit.transport.tls import bundle_files

    return parse_broker_url(broker, bundle_files(bundle) if bundle else None)


def publisher(broker: str, count: int, size: int, out: Path, bundle: Path | None = None) -> None:
    import torch

    from toolkit.protocol import Kind
    from toolkit.protocol import messages as m
    from toolkit.protocol.endpoint import Endpoint
    from toolkit.transport import MqttTransport

    endpoint = Endpoint("dev0")
    transport = MqttTransport(_address(broker, bundle), client_id="bench-pub", on_message=endpoint.on_frame)
    endpoint.attach(transport)
    transport.connect(10.0)
    smashed = torch.zeros(32, size // 4 // 32)
    labels = torch.zeros(32, dtype=torch.int64)
    time.sleep(0.5)
    started = time.time()
    sent = 0
    for index in range(count):
        sent += endpoint.send(
            TOPIC,
            Kind.SMASHED,
            m.Smashed(),
            run="bench",
            device="dev0",
            iteration=index,
            tensors={"smashed": smashed, "labels": labels},
        )
        transport.flush(60.0)
    out.write_text(
        json.dumps(
            {
                "started": started,
                "wire_bytes": sent,
                "payload_bytes": count * (smashed.numel() * 4 + labels.numel() * 8),
            }
        )
    )
    transport.close()


def subscriber(broker: str, count: int, out: Path, bundle: Path | None = None) -> None:
    from toolkit.protocol import Kind
    from toolkit.protocol.endpoint import Endpoint
    from toolkit.transport import MqttTransport

    endpoint = Endpoint("server")
    transport = MqttTransport(_address(broker, bundle), client_id="bench-sub", on_message=endpoint.on_frame)
    endpoint.attach(transport)
    transport.subscribe(TOPIC, qos=1)
    transport.connect(10.0)
    arrivals = []
    deadline = time.monotonic() + 300
    while len(arrivals) < count and time.monotonic() < deadline:
        item = endpoint.receive(1.0)
        if item is not None and item.message.kind is Kind.SMASHED:
            arrivals.append(item.arrived_wall)
    out.write_text(json.dumps({"arrivals": arrivals}))
    transport.close()


def _tls_deployment(work: Path) -> Path:
    """Certificates and a Mosquitto configuration from edge_server provision, for the AP's address."""
    from edge_server import provision
    from toolkit.testbed.runner import BROKER_PORT
    from toolkit.testbed.topology import AP_ADDRESS

    folder = Path(tempfile.mkdtemp(prefix="cpsl-bench-pki-")) / "pki"  # keys never land in the results folder
    deployment = provision.init(folder, [AP_ADDRESS], BROKER_PORT, listen=AP_ADDRESS)
    provision.add_device(deployment, "dev0")
    return deployment.root


def measure(rate: float, size: int, count: int, work: Path, pki: Path | None = None) -> dict:
    from toolkit.testbed.runner import BROKER_PORT
    from toolkit.testbed.topology import AP_ADDRESS, DeviceSpec, Testbed, TestbedSpec

    testbed = Testbed(TestbedSpec((DeviceSpec("dev0", rate, rate, 1.0),), rate, rate))
    broker = f"{'mqtts' if pki else 'mqtt'}://{AP_ADDRESS}:{BROKER_PORT}"
    config = work / "mosquitto.conf"
    # set_tcp_nodelay as the provisioned TLS configuration has it, so that only TLS differs in --tls
    config.write_text(
        f"listener {BROKER_PORT} {AP_ADDRESS}\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
    )
    if pki is not None:
        config = pki / "mosquitto.conf"
    sub_tls = ["--bundle", str(pki / "server")] if pki else []
    pub_tls = ["--bundle", str(pki / "devices" / "dev0")] if pki else []
    processes = []
    try:
        testbed.create()
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        processes.append(
            subprocess.Popen(
                testbed.ap_command([mosquitto, "-c", str(config)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        time.sleep(0.5)
        me = [sys.executable, str(Path(__file__).resolve())]
        sub = subprocess.Popen(
            testbed.ap_command(
                [
                    *me,
                    "--role",
                    "sub",
                    "--broker",
                    broker,
                    "--count",
                    str(count),
                    "--result",
                    str(work / "sub.json"),
                    *sub_tls,
                ]
            )
        )
        processes.append(sub)
        time.sleep(1.0)
        subprocess.run(
            testbed.device_command(
                0,
                [
                    *me,
                    "--role",
                    "pub",
                    "--broker",
                    broker,
                    "--count",
                    str(count),
                    "--size",
                    str(size),
                    "--result",
                    str(work / "pub.json"),
                    *pub_tls,
                ],
            ),
            check=True,
            timeout=600,
        )
        sub.wait(timeout=300)
        pub = json.loads((work / "pub.json").read_text())
        arrivals = json.loads((work / "sub.json").read_text())["arrivals"]
        if len(arrivals) < count:
            raise RuntimeError(f"only {len(arrivals)} of {count} frames arrived")
        elapsed = max(arrivals) - pub["started"]
        return {
            "rate_mbit": rate,
            "frame_payload_bytes": pub["payload_bytes"] // count,
            "payload_mbit_s": 8 * pub["payload_bytes"] / elapsed / 1e6,
            "wire_mbit_s": 8 * pub["wire_bytes"] / elapsed / 1e6,
        }
    finally:
        for process in processes:
            process.kill()
            process.wait()
        testbed.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("bench", "pub", "sub"), default="bench")
    parser.add_argument("--broker")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", type=int, default=602112)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--rates", default="5,10,20,50")
    parser.add_argument("--sizes", default="51200,602112", help="smashed bytes per frame: LeNet pool2, conv1 at B=32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "testbed_transport")
    parser.add_argument("--bundle", type=Path, help="(pub/sub roles) the TLS bundle to connect with")
    parser.add_argument("--tls", action="store_true", help="plaintext and TLS side by side, alternating")
    args = parser.parse_args()
    if args.role == "pub":
        return publisher(args.broker, args.count, args.size, args.result, args.bundle)
    if args.role == "sub":
        return subscriber(args.broker, args.count, args.result, args.bundle)

    from toolkit.testbed.topology import require_root

    require_root()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tls:
        return compare_tls(args)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for rate in (float(r) for r in args.rates.split(",")):
            runs = [measure(rate, size, args.count, args.out) for _ in range(args.repeats)]
            payload = statistics.median(r["payload_mbit_s"] for r in runs)
            row = {
                **runs[0],
                "payload_mbit_s": payload,
                "runs": [r["payload_mbit_s"] for r in runs],
                "efficiency": payload / rate,
            }
            rows.append(row)
            print(
                f"smashed {size:>7d} B/frame, link {rate:5.1f} Mbit/s: payload {payload:6.2f} Mbit/s "
                f"({100 * payload / rate:.0f}% of the link; runs {[round(x, 2) for x in row['runs']]})",
                flush=True,
            )
    (args.out / "transport.json").write_text(
        json.dumps(
            {
                "command": "python bench/testbed_transport.py "
                f"--rates {args.rates} --sizes {args.sizes} --count "
                f"{args.count} --repeats {args.repeats}",
                "rows": rows,
            },
            indent=1,
        )
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for size in sorted({r["frame_payload_bytes"] for r in rows}):
        points = [r for r in rows if r["frame_payload_bytes"] == size]
        axis.plot(
            [r["rate_mbit"] for r in points],
            [r["payload_mbit_s"] for r in points],
            marker="o",
            label=f"{size / 1024:.0f} KiB frames",
        )
    top = max(r["rate_mbit"] for r in rows)
    axis.plot([0, top], [0, top], color="gray", linestyle=":", label="link capacity")
    axis.set_xlabel("shaped link [Mbit/s]")
    axis.set_ylabel("smashed data through Mosquitto [Mbit/s]")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out / "transport.png")
    print(f"wrote {args.out / 'transport.json'} and transport.png")


def compare_tls(args: argparse.Namespace) -> None:
    """Each case over plaintext and over TLS (provisioned certificates), alternating, ``--repeats`` each."""
    pki = _tls_deployment(args.out)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for rate in (float(r) for r in args.rates.split(",")):
            plain, tls = [], []
            for _ in range(args.repeats):
                plain.append(measure(rate, size, args.count, args.out)["payload_mbit_s"])
                tls.append(measure(rate, size, args.count, args.out, pki)["payload_mbit_s"])
            row = {
                "rate_mbit": rate,
                "smashed_bytes": size,
                "plain_mbit_s": statistics.median(plain),
                "tls_mbit_s": statistics.median(tls),
                "plain_runs": plain,
                "tls_runs": tls,
            }
            row["tls_over_plain"] = row["tls_mbit_s"] / row["plain_mbit_s"]
            rows.append(row)
            print(
                f"smashed {size:>7d} B/frame, link {rate:5.1f} Mbit/s: plaintext {row['plain_mbit_s']:6.2f}, "
                f"TLS {row['tls_mbit_s']:6.2f} Mbit/s ({100 * (row['tls_over_plain'] - 1):+.1f}%)",
                flush=True,
            )
    shutil.rmtree(pki.parent)
    command = (
        f"python bench/testbed_transport.py --tls --rates {args.rates} --sizes {args.sizes} "
        f"--count {args.count} --repeats {args.repeats}"
    )
    (args.out / "transport_tls.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
