"""The install profiles (pyproject's extras), and one line naming the missing one.

A board installs the core and the ``agent`` extra only, so a module of another role's extra
may be missing there: a command that needs it says which extra brings it instead of a
traceback. The entry points of the commands that need an extra at import time go through
:func:`guarded_main`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USAGE = 2

EXTRA_OF_MODULE = {
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "scipy": "server",
    "matplotlib": "server",
    "PIL": "agent",
    "amqtt": "demo",
    "prometheus_client": "server",
}


def missing_extra(prog: str, exc: ModuleNotFoundError) -> str | None:
    """The one-line error for a module that an install profile brings; None for any other."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return (
        f"{prog}: error: this needs the {extra!r} install profile ({module} is not installed): "
        f"pip install 'cpsl-edge[{extra}]'"
    )


def guarded_main(prog: str, load: Callable[[], Callable[[], int]]) -> int:
    """Import a command (``load`` imports it and returns its ``main``) and run it; a missing
    extra is one line, exit 2."""
    try:
        main = load()
    except ModuleNotFoundError as exc:
        message = missing_extra(prog, exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return EXIT_USAGE
    return main()
