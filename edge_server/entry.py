"""``edge_server``'s entry point: a board's agent-only install gets one line naming the extra, not a traceback."""

from toolkit.cli.extras import guarded_main


def main() -> int:
    return guarded_main("edge_server", "edge_server.cli")
