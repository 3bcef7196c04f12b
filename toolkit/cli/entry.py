"""Entry points of the toolkit's commands that need an extra when they are imported (cpsl-sim)."""

from toolkit.cli.extras import guarded_main


def sim() -> int:
    return guarded_main("cpsl-sim", "toolkit.cli.sim")


def testbed() -> int:
    return guarded_main("cpsl-testbed", "toolkit.cli.testbed")
