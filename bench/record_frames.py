"""Record real frames of every message kind from a short run, for the fuzzing tests and benchmark.

A real Mosquitto, two real agents and the edge server with live resource management (so
probes and their echoes happen) train one round of LeNet-5 on builtin:digits while a
sniffer subscribed to ``cpsl/v1/#`` keeps the first frames of each kind, the topic each
came on included. A forbidden ASSIGN provokes a REJECT; a large upload split with the
protocol's own ``split`` gives CHUNK frames.

    python bench/record_frames.py [--out tests/frames]
    python bench/record_frames.py --inference-only     add the split-inference kinds to OUT, keep the rest

The split-inference kinds (SERVICE_STATUS, INFER, PREDICTION) come from an inference
service (edge_server.serve) answering a device's client (firmware_agent.infer) on the same
broker: requests at several cuts and encodings, and one the service refuses.

Writes OUT/NN-KIND.bin (frames) and OUT/index.json (kind, topic, size of each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PER_KIND = 3
MAX_FRAME = 96 << 10  # keep the committed corpus small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "frames")
    parser.add_argument(
        "--inference-only", action="store_true", help="record only the split-inference kinds and add them to OUT"
    )
    args = parser.parse_args()
    if args.inference_only:
        add_inference_frames(args.out)
        return

    from edge_server.server import EdgeServer, ServerConfig
    from firmware_agent.agent import AgentConfig, DeviceAgent
    from tests.brokers import free_port
    from tests.fuzzing import lenet_assign
    from toolkit.data import load_dataset, partition_indices
    from toolkit.models import load_model
    from toolkit.protocol import Kind, decode, encode, make_header, split, topics
    from toolkit.transport import MqttTransport, parse_broker_url
    from toolkit.transport.mosquitto import MosquittoProcess

    kept: dict[Kind, list[tuple[str, bytes]]] = defaultdict(list)

    def sniff(topic: str, payload: bytes) -> None:
        try:
            kind = decode(payload).kind
        except Exception:
            return
        if len(kept[kind]) < PER_KIND and len(payload) <= MAX_FRAME:
            kept[kind].append((topic, bytes(payload)))

    work = Path(tempfile.mkdtemp(prefix="cpsl-record-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    data = load_dataset("builtin:digits", seed=0)
    parts = partition_indices(data.train_y.numpy(), 2, "iid", 0)
    with MosquittoProcess(work / "mosquitto.conf", port):
        url = f"mqtt://127.0.0.1:{port}"
        sniffer = MqttTransport(parse_broker_url(url), "sniffer", sniff)
        sniffer.subscribe("cpsl/v1/#")
        sniffer.connect(10)
        agents = []
        for index in range(2):
            config = AgentConfig(parse_broker_url(url), f"dev{index}", f"{index}/2", heartbeat_s=0.5)
            agent = DeviceAgent(config, data, parts[index], (ROOT / "profiles/epyc-vm-2vcpu/lenet5.json").read_bytes())
            agent.start()
            threading.Thread(target=agent.serve_forever, daemon=True).start()
            agents.append(agent)
        time.sleep(1.0)
        server_config = ServerConfig(
            broker=parse_broker_url(url),
            scheme="cpsl",
            rounds=1,
            min_devices=2,
            batch_size=8,
            iterations=3,
            clusters=1,
            cut=None,
            run_dir=work / "run",
            run_id="recorded",
            auto=True,
            iteration_timeout_s=10,
            register_timeout_s=20,
        )
        server = EdgeServer(server_config, load_model("lenet5", seed=0), data)
        server.run()
        forbidden = lenet_assign("os:abort")
        sniffer.publish(
            topics.down("recorded", "dev0"), encode(Kind.ASSIGN, make_header("recorded", "dev0"), forbidden)
        )
        sniffer.flush(5)
        time.sleep(2.0)
        for agent in agents:
            agent.close()
        time.sleep(1.0)
        sniffer.close()
    upload_topic, upload = kept[Kind.WEIGHTS_UP][0]
    message = decode(upload)
    for piece in split(upload, message.header, len(upload) // PER_KIND + 1100)[:PER_KIND]:  # at least 2 chunks
        kept[Kind.CHUNK].append((upload_topic, piece))
    missing = [kind.name for kind in Kind if not kept[kind]]
    if missing:
        raise SystemExit(f"no frame recorded for {', '.join(missing)}")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    index = []
    for kind in Kind:
        for number, (topic, frame) in enumerate(kept[kind]):
            name = f"{int(kind):02d}-{kind.name.lower()}-{number}.bin"
            (args.out / name).write_bytes(frame)
            index.append({"file": name, "kind": kind.name, "topic": topic, "bytes": len(frame)})
    (args.out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"recorded {len(index)} frames of {len(Kind)} kinds in {args.out}")


INFERENCE_KINDS = ("SERVICE_STATUS", "INFER", "PREDICTION")


def record_inference(url: str, work: Path, kept: dict) -> None:
    """A service for LeNet-5 and a device's client exchanging real requests while ``kept`` fills."""
    import numpy as np
    import torch

    from edge_server.serve import ServeConfig, TailService
    from firmware_agent.infer import InferConfig, InferenceClient
    from toolkit.inference.heads import HeadSet, export_heads
    from toolkit.models import load_model
    from toolkit.protocol import Kind, topics
    from toolkit.transport import parse_broker_url

    model = load_model("lenet5", seed=0)
    heads = HeadSet.open(work / "heads") if (work / "heads").exists() else None
    if heads is None:
        export_heads(model, work / "heads", "recorded", cuts=[3, 6, 12])
        heads = HeadSet.open(work / "heads")
    config = ServeConfig(parse_broker_url(url), work, service="recorded", tail_repeats=1, tail_batch_sizes=(1, 4))
    service = TailService(config, model, "recorded")
    service.start()
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    sample = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    for encoding in ("fp16", "int8+zstd"):
        settings = InferConfig(parse_broker_url(url), "dev0", "recorded", 2, encoding, allow_raw_inputs=True)
        client = InferenceClient(settings, heads)
        client.connect()
        # first a request at a cut the service does not serve, for its refusal
        body = client._body(99, 1)
        topic = topics.infer_request("recorded", "dev0")
        tensors = {"x": torch.zeros(2, 1, 28, 28)}
        client.endpoint.send(topic, Kind.INFER, body, run="recorded", device="dev0", tensors=tensors)
        time.sleep(0.5)
        for cut in (0, 3, 6):
            client.infer(sample, cut)
        client.close()
    service.stop()
    thread.join(5)
    service.close()


def add_inference_frames(out: Path) -> None:
    """Record the split-inference kinds and add them to the corpus in ``out`` (the rest kept)."""
    from tests.brokers import free_port
    from toolkit.protocol import Kind, decode
    from toolkit.transport import MqttTransport, parse_broker_url
    from toolkit.transport.mosquitto import MosquittoProcess

    kept: dict = defaultdict(list)

    def sniff(topic: str, payload: bytes) -> None:
        try:
            kind = decode(payload).kind
        except Exception:
            return
        if kind.name in INFERENCE_KINDS and len(kept[kind]) < PER_KIND and len(payload) <= MAX_FRAME:
            kept[kind].append((topic, bytes(payload)))

    work = Path(tempfile.mkdtemp(prefix="cpsl-record-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    with MosquittoProcess(work / "mosquitto.conf", port):
        url = f"mqtt://127.0.0.1:{port}"
        sniffer = MqttTransport(parse_broker_url(url), "sniffer", sniff)
        sniffer.subscribe("cpsl/v1/#")
        sniffer.connect(10)
        record_inference(url, work, kept)
        time.sleep(1.0)
        sniffer.close()
    missing = [name for name in INFERENCE_KINDS if not kept[Kind[name]]]
    if missing:
        raise SystemExit(f"no frame recorded for {', '.join(missing)}")
    index = [row for row in json.loads((out / "index.json").read_text()) if row["kind"] not in INFERENCE_KINDS]
    for name in INFERENCE_KINDS:
        kind = Kind[name]
        for number, (topic, frame) in enumerate(kept[kind]):
            file = f"{int(kind):02d}-{kind.name.lower()}-{number}.bin"
            (out / file).write_bytes(frame)
            index.append({"file": file, "kind": kind.name, "topic": topic, "bytes": len(frame)})
    index.sort(key=lambda row: (int(Kind[row["kind"]]), row["file"]))
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"added {sum(len(kept[Kind[n]]) for n in INFERENCE_KINDS)} split-inference frames to {out}")


if __name__ == "__main__":
    main()
