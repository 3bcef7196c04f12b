"""Every partition of a small set, by the textbook recursion: the brute force that tests check a
search, a dynamic programme or a bound against (independent of what they check)."""

from __future__ import annotations

from collections.abc import Iterator


def every_partition(items: list[int]) -> Iterator[list[list[int]]]:
    """Each set partition of ``items`` once (Bell(n) of them), groups in no particular order."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in every_partition(rest):
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1 :]]
        yield [[first], *smaller]
