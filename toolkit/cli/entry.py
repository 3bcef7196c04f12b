"""Entry points of the toolkit's commands that need an extra when they are imported (cpsl-sim, cpsl-testbed)."""

from toolkit.cli.extras import guarded_main


def _sim():
    from toolkit.cli.sim import main

    return main


def _testbed():
    from toolkit.cli.testbed import main

    return main


def sim() -> int:
    return guarded_main("cpsl-sim", _sim)


def testbed() -> int:
    return guarded_main("cpsl-testbed", _testbed)
