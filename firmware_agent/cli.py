"""``cpsl-agent``: run on each board; registers with the edge server and trains what it assigns.

    cpsl-agent [run] --config agent.toml [flags]     train (flags override the file)
    cpsl-agent service print|install|uninstall|status --config agent.toml
    cpsl-agent health --file HEALTH_FILE        exit 0 when alive and connected (a HEALTHCHECK)

It trains only the models its owner names here (``--model``, repeatable, or ``model`` in
the ``--config`` file): an assignment for anything else is refused.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.cli.common import OneLineArgumentParser, keepalive_seconds, positive_float, positive_int, run_cli
from toolkit.cli.connection import add_broker_flags, apply_config_file, broker_from_args
from toolkit.devices import device_name

if TYPE_CHECKING:
    import torch

# torch and everything that loads it (the agent, the data, the models) are imported by the
# run itself: `cpsl-agent health` is a container's HEALTHCHECK every 30 s and `service` runs
# once at install, and neither should pay torch's start-up (2 s of CPU here, more on a Pi)

PROG = "cpsl-agent"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cpsl-edge" / "profiles"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG,
        description="CPSL device agent: registers with the edge server "
        "over MQTT and runs the device-side training loop.",
    )
    parser.add_argument(
        "--config", type=Path, help="TOML file of settings (any long flag; e.g. a provisioned agent.toml)"
    )
    add_broker_flags(parser)
    parser.add_argument("--device-id", help="this device's id (with TLS: its certificate's name)")
    parser.add_argument("--data", help="builtin:mnist5k, builtin:digits, idx:FOLDER, folder:FOLDER")
    parser.add_argument("--partition", default="0/1", help="I/N: this device holds share I of N (default 0/1)")
    parser.add_argument("--non-iid", help="dirichlet:ALPHA or shards:K (default IID)")
    parser.add_argument("--seed", type=int, default=0, help="data split and partition seed (same as the server's)")
    parser.add_argument("--profile", type=Path, help="device profile JSON from cpsl-profile")
    parser.add_argument(
        "--model",
        action="append",
        help="a model this device may train (repeatable; built-in name or your file.py:function); "
        "the first is profiled when no profile is given (default: lenet5)",
    )
    parser.add_argument("--no-profile", action="store_true", help="register without a profile")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads for training")
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="where the device side trains: cpu (default), cuda (a Jetson's GPU), cuda:N, or auto "
        "(CUDA where torch sees it); the profile is measured there too",
    )
    parser.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    parser.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=10.0,
        help="seconds to keep trying the broker at start (default 10; a refused connection is tried again "
        "too, as a broker still starting refuses); once connected, the agent reconnects for ever",
    )
    parser.add_argument(
        "--keepalive",
        type=keepalive_seconds,
        default=60,
        help="MQTT keepalive in seconds (default 60): must exceed the longest single transfer, "
        "e.g. a whole model for FL over a slow shared link; see docs/protocol.md",
    )
    parser.add_argument(
        "--health-file",
        type=Path,
        help="refresh this file every heartbeat for `cpsl-agent health` (put it on a tmpfs, e.g. /dev/shm)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--debug", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


def _profile_bytes(args, model_name: str, threads: int, data, device: torch.device) -> tuple[bytes | None, str]:
    """The profile to register with: given, cached, or measured now on ``device`` (and cached)."""
    from toolkit.devices import accelerator_kind, cache_tag
    from toolkit.models import load_model
    from toolkit.profile_format import load_profile, save_profile

    log = logging.getLogger("cpsl.agent")
    if args.no_profile:
        return None, ""
    if args.profile is not None:
        profile = load_profile(args.profile)
        measured_on = profile.device.accelerator
        if measured_on != accelerator_kind(device):
            log.warning(
                "the profile %s was measured on %s, but this agent trains on %s: the server's plans for this "
                "device will be off until its rounds correct them (profile it with cpsl-profile --device %s)",
                args.profile,
                measured_on,
                device,
                args.device,
            )
        return args.profile.read_bytes(), profile.model.fingerprint
    model = load_model(model_name, data.input_shape, data.num_classes)
    cached = CACHE / f"{model.name}-{model.fingerprint()}-{cache_tag(device, threads)}.json"
    if not cached.is_file():
        from toolkit.profiler.runner import ProfileRequest, run_profile

        log.info("no profile given or cached: profiling %s on %s (about a minute)", model.name, device)
        profile = run_profile(
            ProfileRequest(
                model=model,
                batch_sizes=[16],
                repeats=10,
                passes=1,
                threads=threads,
                device_id=args.device_id,
                device=device,
            )
        )
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_profile(profile, cached)
    return cached.read_bytes(), load_profile(cached).model.fingerprint


def build_service_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=f"{PROG} service", description="Run the agent as a hardened systemd service (docs/deploy.md)."
    )
    actions = parser.add_subparsers(dest="action", required=True)
    for name, text in (
        ("print", "write the unit to stdout"),
        ("install", "install the unit and its system user, enable and start it"),
    ):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("--config", type=Path, required=True, help="the agent's TOML file")
        if name == "install":
            sub.add_argument("--root", type=Path, help="install into this image's root file system (offline)")
    uninstall = actions.add_parser("uninstall", help="stop, disable and remove the unit")
    uninstall.add_argument("--root", type=Path, help="remove from this image's root file system (offline)")
    actions.add_parser("status", help="systemctl status of the service")
    return parser


def _health(argv: list[str]) -> int:
    """Exit 0 if the agent writing ``--file`` is alive and connected, else 1; one line either way."""
    from firmware_agent.health import check_health

    parser = OneLineArgumentParser(prog=f"{PROG} health", description=_health.__doc__)
    parser.add_argument("--file", type=Path, required=True, help="the agent's --health-file")
    parser.add_argument("--max-age", type=float, default=30.0, help="seconds a heartbeat may be old (default 30)")
    args = parser.parse_args(argv)
    healthy, reason = check_health(args.file, args.max_age)
    print(reason)
    return 0 if healthy else 1


def _service(argv: list[str]) -> int:
    from firmware_agent import service

    args = build_service_parser().parse_args(argv)
    if args.action == "status":
        return service.status()
    if args.action == "uninstall":
        steps = service.uninstall(args.root)
    else:
        spec = service.ServiceSpec.for_config(args.config)
        _settings(["--config", str(spec.config)])  # a unit that would fail at its first start is refused now
        if args.action == "print":
            sys.stdout.write(service.render_unit(spec))
            return 0
        steps = service.install(spec, args.root)
    for step in steps:
        print(step)
    return 0


def _settings(argv: list[str]):
    """The flags over the config file's settings, the required ones checked."""
    parser = build_parser()
    apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    for flag, value in (("--device-id", args.device_id), ("--data", args.data)):
        if not value:
            parser.error(f"{flag} is required (on the command line or in --config)")
    return args


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["service"]:
        return _service(argv[1:])
    if argv[:1] == ["health"]:
        return _health(argv[1:])
    if argv[:1] == ["run"]:
        argv = argv[1:]
    args = _settings(argv)
    return _run(args)


def _run(args) -> int:
    """Train: register, then serve the edge server's commands until stopped."""
    import torch

    from firmware_agent.agent import AgentConfig, DeviceAgent
    from toolkit.allocator import pin_malloc_thresholds
    from toolkit.data import load_dataset, parse_partition, parse_scheme, partition_indices
    from toolkit.devices import resolve_device
    from toolkit.protocol.topics import check_id

    models = args.model or ["lenet5"]
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {args.device_id} %(levelname)s %(message)s")
    check_id(args.device_id, "device id")
    broker = broker_from_args(args)
    index, count = parse_partition(args.partition)
    parse_scheme(args.non_iid)
    device = resolve_device(args.device)  # one line now, not after the data is loaded
    pin_malloc_thresholds()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, args.seed)
    indices = partition_indices(data.train_y.numpy(), count, args.non_iid or "iid", args.seed)[index]
    profile, fingerprint = _profile_bytes(args, models[0], args.threads, data, device)
    config = AgentConfig(
        broker=broker,
        device_id=args.device_id,
        partition=args.partition,
        seed=args.seed,
        heartbeat_s=args.heartbeat,
        keepalive_s=args.keepalive,
        threads=args.threads,
        models=tuple(models),
        model_fingerprint=fingerprint,
        health_file=args.health_file,
        device=str(device),
        connect_timeout_s=args.connect_timeout,
    )
    agent = DeviceAgent(config, data, indices, profile)

    def stop(signum: int, frame: object) -> None:
        """End now, whatever the agent is doing: warming up, connecting, training, waiting
        for a gradient or reconnecting. The interrupt unwinds the main thread from any wait
        or training step; the ``finally`` says goodbye within a bounded time."""
        if agent.stopping:  # a second signal while closing: let the goodbye finish
            return
        agent.stop()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        agent.start()
        agent.serve_forever()
    except KeyboardInterrupt:
        logging.getLogger("cpsl.agent").info("%s stopped", args.device_id)
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
