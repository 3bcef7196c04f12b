"""``edge_server``'s entry point: a board's agent-only install gets one line naming the extra, not a traceback."""

from toolkit.cli.extras import guarded_main


def _load():
    from edge_server.cli import main

    return main


def main() -> int:
    return guarded_main("edge_server", _load)
