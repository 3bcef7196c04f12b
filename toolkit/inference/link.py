"""The link as the device's own requests measured it: ``transit = base_s + bytes / rate``.

Every request is a sample: its frame's bytes on the wire and its transit (round trip minus
the time the service says it spent). Samples are kept per cut, the most recent few; the line is
fitted through each cut's median (bytes, transit), so one slow request does not move it and a
link that changes shows within a window. Two cuts of different sizes give base and rate; with
one size only, the base is the last fitted one (0 before any fit) and the rate what is left.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from toolkit.inference.planner import Link

WINDOW = 16  # samples kept per cut
MIN_SPREAD = 1.25  # the largest cut's bytes over the smallest's, for the slope to mean anything


class LinkEstimator:
    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._samples: dict[int, deque[tuple[float, float]]] = {}
        self._base_s = 0.0

    def add(self, cut: int, wire_bytes: float, transit_s: float) -> None:
        if not (wire_bytes >= 0 and math.isfinite(transit_s) and transit_s >= 0):
            return
        self._samples.setdefault(cut, deque(maxlen=self.window)).append((float(wire_bytes), float(transit_s)))

    @property
    def samples(self) -> int:
        return sum(len(kept) for kept in self._samples.values())

    def estimate(self) -> Link | None:
        """The fitted link, or None before any sample."""
        points = [
            (statistics.median(b for b, _ in kept), statistics.median(t for _, t in kept))
            for kept in self._samples.values()
            if kept
        ]
        if not points:
            return None
        sizes = [b for b, _ in points]
        if len(points) >= 2 and max(sizes) >= MIN_SPREAD * max(min(sizes), 1.0):
            mean_b = statistics.fmean(sizes)
            mean_t = statistics.fmean(t for _, t in points)
            spread = sum((b - mean_b) ** 2 for b in sizes)
            slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / spread
            if slope > 0:
                base = max(0.0, mean_t - slope * mean_b)
                self._base_s = base
                return Link(base, 1.0 / slope)
            self._base_s = max(0.0, min(t for _, t in points))
            return Link(self._base_s, math.inf)  # bigger requests were no slower: bytes cost nothing here
        # one size only: what the base does not explain is the bytes' (the newest cut's median)
        size, transit = points[-1]
        base = min(self._base_s, transit)
        extra = transit - base
        return Link(base, size / extra if extra > 0 and size > 0 else math.inf)
