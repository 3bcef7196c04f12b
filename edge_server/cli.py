"""``edge_server``: train across registered devices, run the demo, or provision a deployment.

    edge_server --broker URL --model lenet5 --data builtin:mnist5k --min-devices 4 [...]   train
    edge_server --resume RUN_DIR [--broker URL]                                          go on after a crash
    edge_server demo [--devices 4] [--secure] [...]                                      everything here
    edge_server provision init --out DIR --server-host HOST[,IP...] [--port 8883]
    edge_server provision add-device ID [ID ...] [--dir DIR]
    edge_server provision renew ID|server|broker [...] [--dir DIR]
    edge_server provision revoke ID [ID ...] [--dir DIR]
    edge_server advise --profile REF.json --fleet FLEET.json [--data D --non-iid X]    which scheme to run
    edge_server advise --broker URL --min-devices N [--model M]                   ... on the registered devices
    edge_server report RUN_DIR --out report.html                                   a finished run, drawn
    edge_server export-heads RUN_DIR [--out DIR]                                   its ONNX heads, for cpsl-infer
    edge_server serve RUN_DIR --broker URL [--bundle DIR]                          its server side, for cpsl-infer

One parser: training flags at the top level (a run is what edge_server does most), the
other jobs as subcommands.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from edge_server.advise import add_advise, check_args, run_advise
from edge_server.inference_cli import add_inference_commands, run_export_heads, run_serve
from edge_server.launch import add_training_flags, make_config, resume_run, train
from toolkit.cli.common import OneLineArgumentParser, positive_float, positive_int, run_cli
from toolkit.cli.connection import add_broker_flags, broker_from_args
from toolkit.data import load_dataset
from toolkit.errors import UserError
from toolkit.files import write_atomically
from toolkit.models import load_model
from toolkit.profile_format import load_profile
from toolkit.protocol.topics import check_id

PROG = "edge_server"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG,
        description="CPSL edge server. Without a subcommand: train across the devices registered at --broker.",
    )
    add_broker_flags(parser)
    parser.add_argument(
        "--model", help="built-in name or FILE.py:FUNCTION (default lenet5; with --resume: the run's own code model)"
    )
    parser.add_argument("--data", default="builtin:mnist5k")
    parser.add_argument("--min-devices", type=positive_int)
    parser.add_argument("--wait-devices", type=positive_float, default=120.0, help="seconds to wait for them")
    parser.add_argument("--run-id", help="name of this run (default: run-DATE-TIME-XXXX)")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="go on with the run in RUN_DIR from its last completed round (its settings are read back; "
        "only --broker and its TLS flags may be given anew)",
    )
    add_training_flags(parser, {"run_dir": None})
    commands = parser.add_subparsers(
        dest="command",
        metavar="{demo,provision,advise,report,export-heads,serve}",
        parser_class=OneLineArgumentParser,
    )
    _add_demo(commands)
    _add_report(commands)
    _add_provision(commands)
    add_advise(commands)
    add_inference_commands(commands)
    return parser


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="a broker, N agents and the server on this machine",
        description="Start a broker, N agents and the server on this machine, and train LeNet-5 on builtin:mnist5k.",
    )
    demo.add_argument("--devices", type=positive_int, default=4)
    demo.add_argument("--non-iid", default="dirichlet:0.5")
    demo.add_argument("--broker", help="use this broker instead of the embedded one")
    demo.add_argument(
        "--secure",
        action="store_true",
        help="provision a CA and certificates into the run directory and run over TLS with Mosquitto",
    )
    add_training_flags(demo, {"rounds": 15, "run_dir": Path("runs/demo")})
    demo.add_argument(
        "--no-dashboard", action="store_true", help="no live dashboard (by default on a free loopback port)"
    )


def _add_report(commands) -> None:
    report = commands.add_parser(
        "report",
        help="a finished run as one self-contained HTML file",
        description="Draw a run directory's metrics.jsonl as one HTML file with the dashboard's charts "
        "(no network needed to open it).",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.add_argument("--out", type=Path, required=True, help="the HTML file to write")


def _add_provision(commands) -> None:
    provision = commands.add_parser("provision", help="certificates, broker configuration and ACL for a deployment")
    jobs = provision.add_subparsers(dest="job", required=True, parser_class=OneLineArgumentParser)
    init = jobs.add_parser("init", help="a new CA, the broker's and the server's certificates, mosquitto.conf")
    init.add_argument("--out", "--dir", dest="dir", type=Path, default=Path("pki"), help="deployment folder")
    init.add_argument(
        "--server-host",
        required=True,
        help="host names and addresses devices use to reach the broker, comma-separated (its certificate's SANs)",
    )
    init.add_argument("--port", type=positive_int, default=8883, help="the broker's TLS port (default 8883)")
    init.add_argument("--days", type=positive_int, default=825, help="validity of the certificates it issues")
    init.add_argument("--listen", help="address the broker listens on (default: every interface)")
    add = jobs.add_parser("add-device", help="issue devices their certificates and bundles")
    add.add_argument("devices", nargs="+", metavar="ID")
    add.add_argument("--dir", type=Path, default=Path("pki"), help="deployment folder (default ./pki)")
    add.add_argument("--days", type=positive_int, help="validity (default: the deployment's)")
    add.add_argument("--broker-host", help="host the device's agent.toml points at (default: the first server host)")
    add.add_argument("--data", help="the device's data in its agent.toml (folder:DIR, idx:DIR, builtin:NAME)")
    add.add_argument(
        "--broker",
        help="stand-alone, without a deployment: a plain mqtt://HOST:PORT broker on a trusted network (no TLS)",
    )
    first = add.add_argument_group("first boot (cloud-init user-data for Raspberry Pi OS / Ubuntu; docs/deploy.md)")
    first.add_argument("--cloud-init", action="store_true", help="also write DIR/devices/ID/user-data")
    first.add_argument("--torch", default="torch", help="the board's torch requirement (default: torch)")
    first.add_argument(
        "--torch-index",
        default="https://download.pytorch.org/whl/cpu",
        help="index for torch (default: PyTorch's CPU builds; 'none' for PyPI, e.g. JetPack's own index otherwise)",
    )
    first.add_argument(
        "--agent-package",
        default="cpsl-edge[agent]",
        help="the agent's pip requirement (default cpsl-edge[agent]; a wheel URL served from the edge PC works)",
    )
    renew = jobs.add_parser(
        "renew", help="rotate: new key and certificate for devices (old ones revoked), server, broker"
    )
    renew.add_argument("devices", nargs="+", metavar="ID", help="device ids, or 'server', or 'broker'")
    renew.add_argument("--dir", type=Path, default=Path("pki"), help="deployment folder (default ./pki)")
    renew.add_argument("--days", type=positive_int, help="validity (default: the deployment's)")
    renew.add_argument("--broker-host", help="host the device's agent.toml points at (default: the first server host)")
    revoke = jobs.add_parser("revoke", help="take devices out: CRL and ACL; the others are untouched")
    revoke.add_argument("devices", nargs="+", metavar="ID")
    revoke.add_argument("--dir", type=Path, default=Path("pki"), help="deployment folder (default ./pki)")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from edge_server.demo import run_demo

        return run_demo(args)
    if args.command == "provision":
        return _provision(args)
    if args.command == "report":
        from edge_server.dashboard.report import write_report

        size = write_report(args.run_dir, args.out)
        print(f"wrote {args.out} ({size / 1e6:.1f} MB): open it in any browser, no network needed")
        return 0
    if args.command == "export-heads":
        return run_export_heads(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "advise":
        check_args(args)
        args.model = args.model or (load_profile(args.profile).model.name if args.profile else "lenet5")
        return run_advise(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s server %(levelname)s %(message)s")
    if args.resume is not None:
        broker = broker_from_args(args) if args.broker else None
        return resume_run(args.resume, broker, args.metrics_port, args.dashboard, args.model)
    if args.min_devices is None:
        parser.error("--min-devices is required to train (or give a subcommand: demo, provision, advise, report)")
    broker = broker_from_args(args)
    if args.run_id:
        check_id(args.run_id, "run id")
    data = load_dataset(args.data, args.seed)
    # built for the data's shape and classes, as every agent builds it for its own data (the
    # VGG-style model on 1x28x28 digits, a user's model): else the fingerprints differ
    args.model = args.model or "lenet5"
    model = load_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=args.seed)
    config = make_config(args, broker, model, args.min_devices, args.run_id or "")
    config.register_timeout_s = args.wait_devices
    return train(config, model, data, metrics_address=args.metrics_port, dashboard_address=args.dashboard)


def _add_devices(args: argparse.Namespace) -> int:
    from edge_server import first_boot, provision

    if args.cloud_init and not args.data:
        raise UserError("--cloud-init needs --data: the agent the board starts refuses to run without its data")
    install = first_boot.Install(
        torch=args.torch,
        torch_index=None if args.torch_index == "none" else args.torch_index,
        agent=args.agent_package,
    )
    if args.broker and (args.broker_host or args.days):
        raise UserError("--broker is for a device without a deployment: --broker-host and --days do not apply")
    deployment = None if args.broker else provision.load(args.dir)
    for device in args.devices:
        if deployment is None:
            folder = provision.standalone_device(args.dir, device, args.broker, args.data)
            print(f"{device}: agent.toml in {folder} (plain MQTT, no certificate)")
        else:
            folder = provision.add_device(deployment, device, args.days, args.broker_host, args.data)
            print(f"{device}: bundle in {folder} (copy it to the board; run cpsl-agent --config agent.toml)")
        if args.cloud_init:
            write_atomically(folder / "user-data", first_boot.user_data(device, folder, install), 0o600)
            print(f"{device}: first-boot file {folder / 'user-data'} (put it on the SD card's boot partition)")
    return 0


def _provision(args: argparse.Namespace) -> int:
    from edge_server import provision

    if args.job == "init":
        hosts = [host.strip() for host in args.server_host.split(",") if host.strip()]
        deployment = provision.init(args.dir, hosts, args.port, args.days, args.listen)
        print(f"deployment in {deployment.root}: CA, broker certificate for {', '.join(hosts)}, server bundle")
        print(f"  start the broker:  mosquitto -c {deployment.root / 'mosquitto.conf'}")
        url = f"mqtts://{hosts[0]}:{args.port}"
        print(f"  start the server:  edge_server --broker {url} --bundle {deployment.server_bundle} ...")
        return 0
    if args.job == "add-device":
        return _add_devices(args)
    deployment = provision.load(args.dir)
    for device in args.devices:
        if args.job == "renew":
            folder = provision.renew(deployment, device, args.days, args.broker_host)
            print(f"{device}: new key and certificate in {folder}")
        else:
            provision.revoke(deployment, device)
            print(f"{device}: revoked (CRL and ACL updated)")
    if args.job in ("revoke", "renew"):
        print("reload the broker so it reads the new CRL and ACL: kill -HUP $(pidof mosquitto), or restart it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
