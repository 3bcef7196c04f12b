"""What every cpsl-edge CLI shares: one-line errors with exit code 2, and --debug for tracebacks."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from toolkit.cli.extras import missing_extra
from toolkit.errors import UserError

EXIT_USAGE = 2


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(prog: str, body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``body``; a UserError (or Ctrl-C) becomes one line on stderr. ``--debug`` keeps tracebacks."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    previous = _interrupt_on_sigterm()
    try:
        return body(argv)
    except UserError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        message = missing_extra(prog, exc)
        if message is None or debug:
            raise
        print(message, file=sys.stderr)
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt_on_sigterm() -> signal.Handlers | None:
    """Make SIGTERM (systemd, ``kill``, a parent stopping us) end the command as Ctrl-C does,
    so that every ``finally`` runs and every process the command started is stopped with it
    (left to its default, SIGTERM ends Python at once and orphans them). Only where nothing
    else handles SIGTERM yet, in the main thread; returns the handler to put back."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> (1, 28, 28); every dimension a positive integer."""
    parts = [part.strip() for part in text.replace("x", ",").split(",")]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"input shape {text!r} is not of the form C,H,W with positive integers")
    return tuple(int(part) for part in parts)


def listen_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``PORT`` or ``HOST:PORT`` (``[::1]:PORT`` for IPv6); loopback unless a host is named."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST:]PORT with a port from 1 to 65535")
    return host, int(port)


def encoding_name(text: str) -> str:
    """An encoding of what crosses the cut (toolkit.compression), by its canonical name."""
    from toolkit.compression import Encoding

    try:
        return Encoding.parse(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def keepalive_seconds(text: str) -> int:
    """An MQTT keepalive: a whole number of seconds from 1 to 65535 (the protocol's 16 bits)."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} exceeds MQTT's largest keepalive, 65535 s")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def progress_bar(console: Console, description_width: int = 0) -> Progress:
    """The one progress-bar look of every cpsl-edge CLI: description, bar, done/total, elapsed."""
    padding = f":<{description_width}" if description_width else ""
    description = f"[bold]{{task.description{padding}}}"
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def ensure_writable_file(path: Path, what: str) -> None:
    """Fail before long work starts if ``path`` cannot be written; creates its folder if missing."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {what} {path}: cannot create folder {folder}: {exc.strerror or exc}") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".cpsl-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc


def ensure_writable_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {what} {path}: {exc.strerror or exc}") from exc
    ensure_writable_file(path / "probe", what)
