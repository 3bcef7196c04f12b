"""Flags every networked CLI shares: the broker URL with its TLS files, and a TOML config file.

``--broker mqtts://HOST:PORT`` with ``--ca/--cert/--key`` or ``--bundle DIR`` (a folder
made by ``edge_server provision``: ca.crt, client.crt, client.key). ``--config FILE``
reads any long flag from a TOML file (``device-id = "pi3"``, ``model = ["lenet5"]``);
flags on the command line win, and relative paths in the file are relative to it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from toolkit.errors import UserError
from toolkit.files import read_bounded
from toolkit.transport import BrokerAddress, parse_broker_url
from toolkit.transport.tls import TlsFiles, bundle_files

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib

MAX_CONFIG_BYTES = 64 << 10
PATH_KEYS = ("bundle", "ca", "cert", "key", "profile")


def add_broker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker", required=False, help="mqtt://HOST:PORT, or mqtts://HOST:PORT with --bundle or --ca/--cert/--key"
    )
    parser.add_argument(
        "--bundle", type=Path, help="folder with ca.crt, client.crt, client.key (edge_server provision)"
    )
    parser.add_argument("--ca", type=Path, help="CA certificate that signed the broker's certificate (PEM)")
    parser.add_argument("--cert", type=Path, help="this client's certificate (PEM)")
    parser.add_argument("--key", type=Path, help="this client's private key (PEM)")


def broker_from_args(args: argparse.Namespace) -> BrokerAddress:
    if not args.broker:
        raise UserError("--broker is required (mqtt://HOST:PORT or mqtts://HOST:PORT)")
    tls = None
    if args.bundle is not None:
        if args.ca or args.cert or args.key:
            raise UserError("give either --bundle or --ca/--cert/--key, not both")
        tls = bundle_files(args.bundle)
    elif args.ca is not None:
        tls = TlsFiles(args.ca, args.cert, args.key)
    elif args.cert is not None or args.key is not None:
        raise UserError("--cert and --key need --ca (the CA that signed the broker's certificate)")
    return parse_broker_url(args.broker, tls)


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Read ``--config FILE`` (if in ``argv``) into the parser's defaults; unknown keys are errors."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return
    path: Path = known.config
    values = read_config_values(path)
    options = {
        action.option_strings[0][2:]: action
        for action in parser._actions
        if action.option_strings and action.option_strings[0].startswith("--")
    }
    defaults = {}
    for key, value in values.items():
        action = options.get(key)
        if action is None or key in ("config", "help"):
            raise UserError(f"config file {path}: unknown setting {key!r}")
        if isinstance(value, dict):
            raise UserError(f"config file {path}: {key} must be a value, not a table")
        if key in PATH_KEYS:
            value = path.parent / Path(str(value))
        elif isinstance(value, list):
            if not isinstance(action, argparse._AppendAction):
                raise UserError(f"config file {path}: {key} takes one value, not a list")
            value = [_typed(action, str(item), path) for item in value]
        elif isinstance(value, bool):
            if action.nargs != 0:
                raise UserError(f"config file {path}: {key} is not an on/off setting")
        else:
            value = _typed(action, str(value), path)
            if isinstance(action, argparse._AppendAction):
                value = [value]
        defaults[action.dest] = value
    parser.set_defaults(**defaults)


def read_config_values(path: Path) -> dict:
    """The TOML file's settings, bounded in size; one line naming what is wrong otherwise."""
    raw = read_bounded(path, MAX_CONFIG_BYTES, "config file")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise UserError(f"config file {path} nests too deep to be a config file") from None


def _typed(action: argparse.Action, text: str, path: Path):
    if action.choices is not None and text not in action.choices:
        raise UserError(f"config file {path}: {action.dest} must be one of {', '.join(map(str, action.choices))}")
    if action.type is None:
        return text
    try:
        return action.type(text)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise UserError(f"config file {path}: {action.dest}: {exc}") from None
