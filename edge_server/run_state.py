"""What a run needs to go on after a crash: its settings (once) and its state (every round).

- ``run.json``: the settings the run was started with -- the server configuration, the
  model and data specs, the broker's address and TLS files -- written when the run
  starts. ``edge_server --resume RUN_DIR`` reads them back; only the broker may be given
  anew.
- ``checkpoint.pt``: after every completed round, atomically (a temporary file renamed
  over the old one): the model's weights, the server optimiser's state, the cut the
  optimiser belongs to, each device's batch-stream position, the scheduler's state and
  the round. Tensors and plain values only, read back with ``torch.load(...,
  weights_only=True)`` (no pickle of code); the scheduler's state travels as a JSON string.

Nothing here comes from the network: the run directory is the operator's. It is still
checked like any input -- bounded, typed, and a foreign or corrupt file gets one clear
line, never a traceback or a half-restored run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edge_server.records import atomic_torch_save
from toolkit.errors import UserError
from toolkit.files import read_bounded, write_atomically
from toolkit.transport import BrokerAddress, parse_broker_url
from toolkit.transport.tls import TlsFiles

STATE_FORMAT = "cpsl-run-state/1"
SETTINGS_FORMAT = "cpsl-run-settings/1"
SETTINGS_FILE = "run.json"
STATE_FILE = "checkpoint.pt"
MAX_SETTINGS_BYTES = 1 << 20
MAX_STATE_BYTES = 4 << 30
PATH_FIELDS = ("run_dir", "server_profile")


@dataclass
class RunState:
    run_id: str
    round: int  # the last completed round
    fingerprint: str  # of the model the weights belong to
    model: dict[str, torch.Tensor]
    server_optimizer: dict | None = None
    server_cut: int | None = None
    stream_positions: dict[str, int] = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)


def write_settings(run_dir: Path, config, run_id: str) -> None:
    """``run.json``, atomically: everything ``--resume`` needs to rebuild the run but its state."""
    values = {}
    for item in dataclasses.fields(config):
        if item.name == "broker":
            continue
        value = getattr(config, item.name)
        values[item.name] = str(value) if isinstance(value, Path) else value
    values["run_id"] = run_id
    broker: BrokerAddress = config.broker
    tls = None
    if broker.tls is not None:
        tls = {name: str(path) if path else None for name, path in dataclasses.asdict(broker.tls).items()}
    document = {
        "format": SETTINGS_FORMAT,
        "model": config.model_spec,
        "data": config.data_spec,
        "seed": config.data_seed,
        "broker": {"url": broker.url, "tls": tls},
        "config": values,
    }
    write_atomically(run_dir / SETTINGS_FILE, json.dumps(document, indent=1))


@dataclass(frozen=True)
class RunSettings:
    model: str
    data: str
    seed: int
    broker: BrokerAddress
    config: dict


def read_settings(run_dir: Path) -> RunSettings:
    path = run_dir / SETTINGS_FILE
    raw = read_bounded(path, MAX_SETTINGS_BYTES, "the settings of the run to resume,")
    try:
        document = json.loads(raw)
        if document.get("format") != SETTINGS_FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {SETTINGS_FORMAT!r}")
        tls = document["broker"]["tls"]
        files = None
        if tls is not None:
            files = TlsFiles(*(Path(tls[name]) if tls.get(name) else None for name in ("ca", "cert", "key")))
        broker = parse_broker_url(str(document["broker"]["url"]), files)
        config = dict(document["config"])
        if not isinstance(document["seed"], int) or not isinstance(config.get("scheme"), str):
            raise ValueError("seed or scheme missing")
        for name in PATH_FIELDS:
            if config.get(name) is not None:
                config[name] = Path(config[name])
        return RunSettings(str(document["model"]), str(document["data"]), document["seed"], broker, config)
    except (ValueError, KeyError, TypeError, AttributeError, UserError) as exc:
        raise UserError(f"{path} is not a cpsl-edge run's settings: {exc}") from None


def save_state(run_dir: Path, state: RunState) -> None:
    document = {
        "format": STATE_FORMAT,
        "run_id": state.run_id,
        "round": state.round,
        "fingerprint": state.fingerprint,
        "state_dict": state.model,  # the name earlier checkpoints used
        "server_optimizer": state.server_optimizer,
        "server_cut": state.server_cut,
        "stream_positions": dict(state.stream_positions),
        "scheduler": json.dumps(state.scheduler),
    }
    atomic_torch_save(document, run_dir / STATE_FILE)


def load_state(run_dir: Path, run_id: str, fingerprint: str) -> RunState:
    """The run's last saved state; one clear error for a missing, corrupt or foreign file."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise UserError(f"cannot resume from {run_dir}: no {STATE_FILE} (the run completed no round)")
    if path.stat().st_size > MAX_STATE_BYTES:
        raise UserError(f"{path} is larger than {MAX_STATE_BYTES} bytes: not a run state")
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: whatever torch raises, one line
        raise UserError(f"{path} is not a readable run state ({type(exc).__name__}: {str(exc)[:200]})") from None
    try:
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            got = document.get("format") if isinstance(document, dict) else type(document).__name__
            raise ValueError(f"format {got!r}, expected {STATE_FORMAT!r}")
        if document["run_id"] != run_id:
            raise ValueError(f"it belongs to run {document['run_id']!r}, not {run_id!r}")
        if document["fingerprint"] != fingerprint:
            raise ValueError(f"its weights are of model {document['fingerprint']}, the run's is {fingerprint}")
        model = document["state_dict"]
        if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
            raise ValueError("its weights are not a state dict of tensors")
        positions = document["stream_positions"]
        if not all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in positions.items()):
            raise ValueError("its stream positions are not device -> batches")
        round_, cut = document["round"], document["server_cut"]
        if not isinstance(round_, int) or round_ < 0 or not (cut is None or isinstance(cut, int)):
            raise ValueError("its round or cut is not a number")
        scheduler = json.loads(document["scheduler"])
        if not isinstance(scheduler, dict):
            raise ValueError("its scheduler state is not an object")
        return RunState(
            run_id, round_, fingerprint, model, document["server_optimizer"], cut, dict(positions), scheduler
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot resume from {path}: {exc}") from None


def capture(server, round_: int) -> RunState:
    """The state of ``server`` (an EdgeServer) after ``round_`` completed."""
    rounds = server.rounds
    optimizer = rounds.server_optimizer
    return RunState(
        run_id=server.run_id,
        round=round_,
        fingerprint=server.model.fingerprint(),
        model=server.model.net.state_dict(),
        server_optimizer=optimizer.state_dict() if optimizer is not None else None,
        server_cut=rounds.server_cut,
        stream_positions=dict(rounds.stream_positions),
        scheduler=server.scheduler.state_dict(),
    )


def restore(server, state: RunState) -> int:
    """Put ``state`` into ``server`` (an EdgeServer built from the run's settings); returns the
    round to train next. A state that does not fit the model is one clear error."""
    try:
        server.model.net.load_state_dict(state.model, strict=True)
        if state.server_cut is not None:
            server.rounds.ensure_server_optimizer(state.server_cut)
            if state.server_optimizer is not None:
                server.rounds.server_optimizer.load_state_dict(state.server_optimizer)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"the saved state does not fit the run's model: {str(exc).splitlines()[0][:200]}") from None
    server.rounds.stream_positions = dict(state.stream_positions)
    server.scheduler.load_state_dict(state.scheduler)
    return state.round + 1
