"""``edge_server advise``: which scheme to run on a fleet, before running any.

    edge_server advise --profile REF.json --fleet FLEET.json [--data builtin:mnist5k --non-iid dirichlet:0.5]
    edge_server advise --broker URL [--bundle DIR] --min-devices N [--model lenet5] [--data ...]

With ``--broker`` the fleet is the devices registered there: the advisor connects as the
edge server would, waits for ``--min-devices`` (up to ``--wait-devices`` seconds), takes
each device's profile from its registration, probes every link alone and then all at once
(the medium, as ``edge_server --medium auto`` decides it), plans every scheme on what it
measured, and leaves the devices idle (they go on serving the next run).

The fleet file (JSON, at most 1 MiB and 10,000 devices) names the medium and each device::

    {"medium": "airtime",                 # or "shared" (wired: caps plus a common capacity)
     "capacity_up_mbit": 20, "capacity_down_mbit": 40,   # shared only (default: the caps' sum)
     "devices": [{"name": "pi-1", "uplink_mbit": 14.4, "downlink_mbit": 28.8,
                  "profile": "pi-1.json"},               # or "speed": 0.4 (relative to REF)
                 ...]}

Round latencies come from the latency model (:mod:`toolkit.planning.advice`). Rounds to
the target come from rehearsing each scheme on ``--data`` (the same training the live
system does, in one process, :mod:`edge_server.rehearsal`): pass the data the devices hold,
or data like it. Without ``--data`` the advice ranks by round latency and says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console

from toolkit.cli.common import encoding_name
from toolkit.cli.connection import add_broker_flags, broker_from_args
from toolkit.compression import Encoding
from toolkit.devices import device_name
from toolkit.errors import UserError
from toolkit.files import read_bounded
from toolkit.planning.advice import SCHEMES, advise, plan_schemes
from toolkit.planning.clustering import ClusterBounds
from toolkit.planning.costs import ModelCosts, model_costs, relative_speed
from toolkit.planning.latency import FleetState, TrainingSettings
from toolkit.planning.medium import MEDIUM_CHOICES
from toolkit.planning.rates import LinearRates, SharedRates
from toolkit.planning.rounds import label_histograms, label_skew
from toolkit.profile_format import Profile, load_profile

MAX_FLEET_BYTES = 1 << 20
MAX_DEVICES = 10_000
Mbit = Annotated[float, Field(gt=0, le=1e6)]


class FleetDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    uplink_mbit: Mbit
    downlink_mbit: Mbit
    speed: float | None = Field(default=None, gt=0, le=1e4)
    profile: str | None = Field(default=None, max_length=4096)

    @model_validator(mode="after")
    def _speed_or_profile(self) -> FleetDevice:
        if (self.speed is None) == (self.profile is None):
            raise ValueError(f"device {self.name}: give exactly one of speed and profile")
        return self


class FleetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    medium: Literal["airtime", "shared"]
    capacity_up_mbit: Mbit | None = None
    capacity_down_mbit: Mbit | None = None
    devices: list[FleetDevice] = Field(min_length=1, max_length=MAX_DEVICES)


def load_fleet(path: Path) -> FleetSpec:
    raw = read_bounded(path, MAX_FLEET_BYTES, "fleet")
    try:
        return FleetSpec.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"fleet {path}: {where}: {first['msg']}") from None


def fleet_state(spec: FleetSpec, reference: Profile, batch: int, base: Path) -> FleetState:
    """Speeds (from each device's profile of the same model, or given) and the medium's rate law."""
    speeds = []
    for device in spec.devices:
        if device.speed is not None:
            speeds.append(device.speed)
            continue
        path = Path(device.profile)
        own = load_profile(path if path.is_absolute() else base / path)
        speeds.append(relative_speed(own, reference, batch))
    up = np.array([d.uplink_mbit for d in spec.devices]) * 1e6
    down = np.array([d.downlink_mbit for d in spec.devices]) * 1e6
    if spec.medium == "airtime":  # stations contend when they send at once, as the live server plans it
        return FleetState(np.array(speeds), LinearRates(up, contention=True), LinearRates(down))
    up_capacity = (spec.capacity_up_mbit or up.sum() / 1e6) * 1e6
    down_capacity = (spec.capacity_down_mbit or down.sum() / 1e6) * 1e6
    return FleetState(np.array(speeds), SharedRates(up, up_capacity), SharedRates(down, down_capacity))


def partitioned(args, devices: int):
    """``--data`` split over the devices as ``--non-iid`` says: (data, parts, label skew)."""
    from toolkit.data import load_dataset, partition_indices

    data = load_dataset(args.data, args.seed)
    parts = partition_indices(data.train_y.numpy(), devices, args.non_iid, args.seed)
    skew = label_skew(label_histograms([data.train_y.numpy()[p] for p in parts], data.num_classes))
    return data, parts, skew


def rehearsed_rounds(
    args, plans, data, parts, console: Console
) -> tuple[dict[str, float | None], dict[str, tuple[float, float | None]] | None]:
    """Rounds each scheme needs to ``--target`` on the partitioned ``--data``, as planned:
    on ``--rehearse-seeds`` seeds from ``--seed`` (each its own partition, initial weights and
    batch order), the median (None: at least half the seeds never got there) and, over
    several seeds, the range (fewest, most; most None: some seed never got there)."""
    import statistics

    from edge_server.rehearsal import RehearsalConfig, rehearse
    from toolkit.data import partition_indices
    from toolkit.models import load_model

    seeds = [args.seed + k for k in range(args.rehearse_seeds)]
    reached: dict[str, list[float]] = {scheme: [] for scheme in SCHEMES}
    for seed in seeds:
        seed_parts = (
            parts if seed == args.seed else partition_indices(data.train_y.numpy(), len(parts), args.non_iid, seed)
        )
        for scheme in SCHEMES:
            plan = plans[scheme]
            config = RehearsalConfig(
                scheme=scheme.split("-")[0],
                cut=plan.cut,
                clusters=len(plan.clusters),
                iterations=args.local_iterations,
                batch_size=args.batch_size,
                lr=args.lr,
                data_seed=seed,
                rounds=args.max_rounds,
                target_accuracy=args.target,
            )
            groups = [[f"dev{i}" for i in group] for group in plan.clusters]
            model = load_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=seed)
            label = f"rehearsing {scheme} on {args.data} ({args.non_iid}), seed {seed}"
            with console.status(label):
                history = rehearse(
                    model, data, seed_parts, config, clusters_for_round=lambda round_, ids, groups=groups: groups
                )
            hit = next((i + 1 for i, r in enumerate(history) if r.accuracy >= args.target), None)
            reached[scheme].append(float(hit) if hit is not None else math.inf)
            console.print(
                f"  {scheme}, seed {seed}: {hit if hit else f'not in {args.max_rounds}'} rounds to {args.target:.0%}",
                highlight=False,
            )
    rounds: dict[str, float | None] = {}
    ranges: dict[str, tuple[float, float | None]] = {}
    for scheme, counts in reached.items():
        median = statistics.median(counts)  # inf where at least half the seeds never got there
        rounds[scheme] = median if math.isfinite(median) else None
        if min(counts) < math.inf:
            ranges[scheme] = (min(counts), max(counts) if max(counts) < math.inf else None)
    return rounds, (ranges if len(seeds) > 1 else None)


@dataclass(frozen=True)
class FleetPlanInput:
    """One fleet in the planner's terms, from a fleet file or from the devices at a broker."""

    model: str
    costs: ModelCosts
    state: FleetState
    settings: TrainingSettings
    bounds: ClusterBounds
    medium: str  # as printed: "airtime", "shared", or each direction's kind when probed
    devices: dict  # name -> what is known of it, for the JSON
    server: str  # where the server side's costs come from, as printed


def server_side(args, reference: Profile, batch_sizes: list[int]) -> tuple[Profile | None, str]:
    """The server's profile for planning from a fleet file: ``--server-profile``, or measured
    here on ``--device`` as edge_server measures itself at start (run the advisor on the edge
    PC, or give its profile). None -- the reference device stands for the server -- only
    where the reference's model cannot be built here (a user model not named by ``--model``)."""
    from edge_server.own_profile import own_profile
    from toolkit.devices import resolve_device
    from toolkit.models import load_model

    if args.server_profile:
        return load_profile(args.server_profile, reference.model.fingerprint), f"given ({args.server_profile})"
    info = reference.model
    try:
        model = load_model(
            args.model or info.name,
            input_shape=tuple(info.input_shape),
            num_classes=reference.layers[-1].output_shape[-1],
        )
    except (UserError, ValueError) as exc:
        return None, f"the reference device's (cannot build {info.name} here to measure it: {exc})"
    if model.fingerprint() != info.fingerprint:
        return None, f"the reference device's ({info.name} here is not the profile's model: give --server-profile)"
    profile, source = own_profile(model, batch_sizes, device=resolve_device(args.device))
    return profile, source


def from_fleet_file(args) -> FleetPlanInput:
    from edge_server.own_profile import pooled_batch_sizes

    reference = load_profile(args.profile)
    spec = load_fleet(args.fleet)
    state = fleet_state(spec, reference, args.batch_size, args.fleet.parent)
    size = args.max_cluster_size or math.ceil(len(spec.devices) / args.clusters)
    devices = {d.name: {"uplink_mbit": d.uplink_mbit, "downlink_mbit": d.downlink_mbit} for d in spec.devices}
    server_profile, server = server_side(args, reference, pooled_batch_sizes(args.batch_size, size))
    return FleetPlanInput(
        reference.model.name,
        model_costs(reference, server_profile),
        state,
        TrainingSettings(args.batch_size, args.local_iterations),
        ClusterBounds(size, args.clusters),
        f"{spec.medium} medium",
        devices,
        server,
    )


def from_broker(args, console: Console) -> FleetPlanInput:
    """Connect as the edge server, wait for the devices, probe them; nothing is trained."""
    from edge_server.server import EdgeServer, ServerConfig
    from toolkit.data import load_dataset
    from toolkit.models import load_model

    model = load_model(args.model, seed=args.seed)
    config = ServerConfig(
        broker=broker_from_args(args),
        scheme="cpsl",
        rounds=1,
        min_devices=args.min_devices,
        batch_size=args.batch_size,
        iterations=args.local_iterations,
        clusters=args.clusters,
        cut=None,
        auto=True,
        max_cluster_size=args.max_cluster_size,
        server_profile=args.server_profile,
        device=args.device,
        medium=args.medium,
        run_id=f"advise-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
        register_timeout_s=args.wait_devices,
    )
    # the server needs a dataset's shape for assignments it will not send here: the smallest built-in
    server = EdgeServer(config, model, load_dataset("builtin:digits", args.seed))
    server.connect()
    try:
        with console.status(f"waiting for {args.min_devices} devices at {config.broker.url}"):
            server.wait_for_devices()
        devices = server.registry.online()
        with console.status(f"probing {len(devices)} links, alone and together"):
            server.probe_new_devices(0, devices)
        view = server.scheduler.view(devices)
    finally:
        server.close()
    if view is None:
        raise UserError(f"no device at {config.broker.url} answered the link probes")
    estimates = server.scheduler.estimates.devices
    known = {d: estimates[d].to_dict() for d in view.ids}
    for device, row in known.items():
        console.print(
            f"  {device}: speed {row['speed']:.2f}, up {row['up_bps'] / 1e6:.1f} Mbit/s, "
            f"down {row['down_bps'] / 1e6:.1f} Mbit/s, rtt {1e3 * row['rtt_s']:.1f} ms",
            highlight=False,
        )
    medium = f"uplink {view.uplink_medium.kind}, downlink {view.downlink_medium.kind} (probed)"
    server_source = server.scheduler.server_profile_source
    return FleetPlanInput(model.name, view.costs, view.state, view.settings, view.bounds, medium, known, server_source)


def run_advise(args) -> int:
    console = Console(stderr=True)
    fleet = from_broker(args, console) if args.broker else from_fleet_file(args)
    baseline = fleet.costs.resolve(args.cut).cut
    settings = fleet.settings
    if args.compress != "fp32":  # before a run has measured it, the quantiser's width (docs/compression.md)
        ratio = Encoding.parse(args.compress).nominal_ratio
        settings = dataclasses.replace(settings, uplink_ratio=ratio, downlink_ratio=ratio)
        print(f"split schemes planned with {args.compress} across the cut ({ratio:g} of fp32's bytes; FL as is)")
    data = parts = None
    skew = args.skew
    if args.data:  # the cut cpsl-auto takes depends on the data's skew: measure it before planning
        data, parts, skew = partitioned(args, fleet.state.size)
    plans = plan_schemes(fleet.costs, fleet.state, settings, fleet.bounds, baseline, args.clusters, skew=skew)
    rounds, ranges = rehearsed_rounds(args, plans, data, parts, console) if args.data else (None, None)
    advice = advise(plans, rounds, ranges)
    print(f"{fleet.model} on {fleet.state.size} devices, {fleet.medium}, label skew {skew:.2f}")
    print(f"server side on {args.device}: profile {fleet.server}")
    for line in advice.lines():
        print(line)
    if args.json:
        document = {
            "skew": skew,
            "medium": fleet.medium,
            "devices": fleet.devices,
            "server": {"device": args.device, "profile": fleet.server},
            **advice.to_dict(),
        }
        args.json.write_text(json.dumps(document, indent=1))
    return 0


def add_advise(commands) -> None:
    from toolkit.cli.common import positive_float, positive_int

    advise_parser = commands.add_parser(
        "advise",
        help="predict each scheme's round latency and time to the target on a fleet; say which to run",
        description=__doc__.split("\n\n")[0],
    )
    advise_parser.add_argument("--profile", type=Path, help="with --fleet: cpsl-profile of the model (reference)")
    advise_parser.add_argument("--fleet", type=Path, help="fleet JSON (see the module docs)")
    add_broker_flags(advise_parser)  # instead of --fleet: the devices registered at this broker
    advise_parser.add_argument("--min-devices", type=positive_int, help="with --broker: devices to wait for")
    advise_parser.add_argument("--wait-devices", type=positive_float, default=120.0, help="seconds to wait for them")
    advise_parser.add_argument(
        "--medium", choices=MEDIUM_CHOICES, default="auto", help="with --broker: as edge_server --medium"
    )
    advise_parser.add_argument(
        "--server-profile",
        type=Path,
        help="the edge PC's profile of the model, as edge_server --server-profile (default: measured here on "
        "--device, as edge_server does at start: run the advisor on the edge PC)",
    )
    advise_parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="where the edge server will train its side: cpu (default), cuda, cuda:N, auto (as edge_server --device)",
    )
    advise_parser.add_argument(
        "--model", default=None, help="built-in model to plan and rehearse (default: the profile's, or lenet5)"
    )
    advise_parser.add_argument("--data", help="rehearse every scheme on this dataset for its rounds to the target")
    advise_parser.add_argument(
        "--rehearse-seeds",
        type=positive_int,
        default=1,
        help="rehearse on this many seeds from --seed (partition, initial weights, batches): the median rounds, "
        "and schemes whose ranges overlap the best's called too close (default 1)",
    )
    advise_parser.add_argument("--non-iid", default="dirichlet:0.5", help="how --data is split over the devices")
    advise_parser.add_argument("--skew", type=float, default=0.0, help="label skew when no --data is given (0-1)")
    advise_parser.add_argument("--target", type=positive_float, default=0.9)
    advise_parser.add_argument("--max-rounds", type=positive_int, default=40)
    advise_parser.add_argument("--cut", default="pool2", help="the baselines' cut (sl, sfl, cpsl-fixed)")
    advise_parser.add_argument("--clusters", type=positive_int, default=2)
    advise_parser.add_argument("--max-cluster-size", type=positive_int)
    advise_parser.add_argument("--batch-size", type=positive_int, default=32)
    advise_parser.add_argument("--local-iterations", type=positive_int, default=20)
    advise_parser.add_argument("--lr", type=positive_float, default=0.05)
    advise_parser.add_argument("--seed", type=int, default=0)
    advise_parser.add_argument(
        "--compress",
        type=encoding_name,
        default="fp32",
        metavar="ENC",
        help="plan the split schemes with smashed data (and gradients) in this encoding, at its nominal size",
    )
    advise_parser.add_argument("--json", type=Path, help="also write the advice here")


def check_args(args) -> None:
    if args.broker:
        if args.fleet or args.profile:
            raise UserError("give either --broker (the registered devices) or --fleet and --profile, not both")
        if args.min_devices is None:
            raise UserError("advise --broker needs --min-devices: how many registered devices to wait for")
    elif args.fleet is None or args.profile is None:
        raise UserError("advise needs --fleet FLEET.json and --profile REF.json, or --broker URL --min-devices N")
    if args.rehearse_seeds > 20:
        raise UserError(f"--rehearse-seeds {args.rehearse_seeds}: at most 20 (each seed rehearses every scheme)")
    if args.rehearse_seeds > 1 and not args.data:
        raise UserError("--rehearse-seeds needs --data: the seeds are rehearsals on it")
    if not 0 <= args.skew <= 1:
        raise UserError(f"--skew {args.skew:g} is a fraction: give a number in [0, 1]")
    if args.target > 1:
        raise UserError(f"--target {args.target:g} is a fraction: give a number in (0, 1]")
