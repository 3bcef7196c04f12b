"""Which scheme to run on a fleet: each scheme's round latency, rounds and time to the target.

Every scheme is planned on the same fleet state and medium, the way the server runs it:

- ``sl``, ``sfl``, ``fl`` and ``cpsl-fixed`` (cpsl without resource management) send
  whenever they are ready, so each phase is :func:`allocation.concurrent_phase` on the
  medium's own sharing rule (equal throughput on air time, water-filling on shared bytes);
  the split ones at the baseline cut (pool2 unless told), cpsl-fixed in ``clusters``
  clusters dealt round-robin;
- ``cpsl-auto`` takes the cut SAA chooses by time to accuracy, the clusters the search
  finds, and slots on an air-time medium (the optimal shares) or overlapping transfers on
  a byte-shared one.

Rounds to the target are not a latency question: they come from the caller (the advisor
rehearses each scheme on data it is given, :mod:`edge_server.rehearsal`, on one seed or
several). Without them the advice ranks by round latency and says so. With several seeds
the rounds are the median and a range; schemes whose times to the target, over those
ranges, overlap the recommended one's are called too close, as are those within one round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from toolkit.planning.allocation import allocate_shares, concurrent_phase
from toolkit.planning.clustering import ClusterBounds, cluster_devices
from toolkit.planning.costs import ModelCosts
from toolkit.planning.cut_selection import select_cut
from toolkit.planning.latency import FleetState, SplitProblem, TrainingSettings, plan_fl_round, plan_split_round

SCHEMES = ("sl", "sfl", "fl", "cpsl-fixed", "cpsl-auto")


@dataclass(frozen=True)
class SchemePlan:
    scheme: str
    cut: int | None  # None: FL trains the whole model
    cut_name: str | None
    clusters: tuple[tuple[int, ...], ...]  # device indices, in turn order
    round_latency_s: float


@dataclass(frozen=True)
class SchemeAdvice:
    plan: SchemePlan
    rounds: float | None  # to the target; None when unknown or not reached
    time_to_target_s: float | None
    # over several rehearsal seeds: the fewest and the most rounds (None: some seed did not
    # reach the target); None when one seed or none was rehearsed
    rounds_range: tuple[float, float | None] | None = None

    @property
    def time_range_s(self) -> tuple[float, float] | None:
        """The time to the target over the seeds' range of rounds (inf: some seed never got
        there); None without a range."""
        if self.rounds_range is None:
            return None
        fewest, most = self.rounds_range
        latency = self.plan.round_latency_s
        return (fewest * latency, most * latency if most is not None else float("inf"))

    def to_dict(self) -> dict:
        return {
            "scheme": self.plan.scheme,
            "cut": self.plan.cut_name,
            "clusters": len(self.plan.clusters),
            "round_latency_s": self.plan.round_latency_s,
            "rounds": self.rounds,
            "rounds_range": list(self.rounds_range) if self.rounds_range is not None else None,
            "time_to_target_s": self.time_to_target_s,
        }


@dataclass(frozen=True)
class Advice:
    rows: tuple[SchemeAdvice, ...]
    recommended: str
    basis: str  # what the recommendation rests on
    # schemes whose time to the target is within one round of the recommended one's (rounds
    # come in whole numbers and a rehearsal and a live run can differ by one: docs/testbed.md,
    # "The advisor against the testbed"), or whose range over the rehearsal seeds overlaps
    # its range: a plan cannot tell these apart
    close: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """The table as text, one scheme per line (printed by ``edge_server advise``, logged by the server)."""
        width = 14 if any(row.rounds_range for row in self.rows) else 8
        header = f"{'scheme':<11}{'cut':>7}{'clusters':>10}{'round [s]':>11}{'rounds':>{width}}{'to target [s]':>15}"
        out = [header]
        for row in self.rows:
            rounds = f"{row.rounds:g}" if row.rounds is not None else "-"
            if row.rounds_range is not None:
                fewest, most = row.rounds_range
                rounds += f" ({fewest:g}-{'' if most is None else f'{most:g}'})"
            total = f"{row.time_to_target_s:.1f}" if row.time_to_target_s is not None else "-"
            out.append(
                f"{row.plan.scheme:<11}{row.plan.cut_name or 'whole':>7}{len(row.plan.clusters):>10}"
                f"{row.plan.round_latency_s:>11.2f}{rounds:>{width}}{total:>15}"
            )
        out.append(f"run {self.recommended} ({self.basis})")
        if self.close:
            out.append(
                f"  {', '.join(self.close)}: within one round of it or of its range over the seeds, too close for a "
                "plan to call; either will do"
            )
        return out

    def to_dict(self) -> dict:
        return {
            "recommended": self.recommended,
            "basis": self.basis,
            "close": list(self.close),
            "schemes": [r.to_dict() for r in self.rows],
        }


def plan_schemes(
    costs: ModelCosts,
    state: FleetState,
    settings: TrainingSettings,
    bounds: ClusterBounds,
    baseline_cut: int,
    clusters: int = 2,
    skew: float = 0.0,
) -> dict[str, SchemePlan]:
    """Every scheme's plan for one round on this fleet and medium."""
    devices = list(range(state.size))
    baseline = costs.cut(baseline_cut)
    problem = SplitProblem.build(baseline, state, settings)
    count = max(1, min(clusters, state.size))

    def split(scheme: str, groups: list[list[int]], cut_problem: SplitProblem, cut: int, allocator) -> SchemePlan:
        latency = plan_split_round(cut_problem, groups, allocator).latency_s
        return SchemePlan(scheme, cut, costs.cut(cut).name, tuple(tuple(g) for g in groups), latency)

    plans = {
        "sl": split("sl", [[d] for d in devices], problem, baseline_cut, concurrent_phase),
        "sfl": split("sfl", [devices], problem, baseline_cut, concurrent_phase),
        "fl": SchemePlan(
            "fl", None, None, (tuple(devices),), plan_fl_round(costs, state, settings, concurrent_phase).latency_s
        ),
        "cpsl-fixed": split(
            "cpsl-fixed", [devices[k::count] for k in range(count)], problem, baseline_cut, concurrent_phase
        ),
    }
    choice = select_cut(costs, [state], settings, bounds, skew=skew)
    auto_problem = SplitProblem.build(costs.cut(choice.cut), state, settings)
    groups = [list(g) for g in cluster_devices(auto_problem, bounds)]
    allocator = allocate_shares if state.uplink.is_linear() else concurrent_phase
    plans["cpsl-auto"] = split("cpsl-auto", groups, auto_problem, choice.cut, allocator)
    return plans


def advise(
    plans: Mapping[str, SchemePlan],
    rounds: Mapping[str, float | None] | None = None,
    ranges: Mapping[str, tuple[float, float | None] | None] | None = None,
) -> Advice:
    """Rows in :data:`SCHEMES` order and the scheme to run: the shortest time to the target
    when rounds are known for at least one scheme, else the shortest round. ``rounds``: the
    rounds to the target (the median over the rehearsal seeds); ``ranges``: over several
    seeds, the fewest and the most (None: some seed did not reach it)."""
    rows = []
    for scheme in SCHEMES:
        plan = plans[scheme]
        count = (rounds or {}).get(scheme)
        total = plan.round_latency_s * count if count is not None else None
        rows.append(SchemeAdvice(plan, count, total, (ranges or {}).get(scheme)))
    timed = [row for row in rows if row.time_to_target_s is not None]
    if timed:
        best = min(timed, key=lambda row: row.time_to_target_s)
        missing = [row.plan.scheme for row in rows if row.time_to_target_s is None]
        basis = "shortest time to the target" + (f"; {', '.join(missing)} did not reach it" if missing else "")

        def too_close(row: SchemeAdvice) -> bool:
            gap_s = row.time_to_target_s - best.time_to_target_s
            if gap_s < max(row.plan.round_latency_s, best.plan.round_latency_s):  # within a round
                return True
            theirs, ours = row.time_range_s, best.time_range_s
            return theirs is not None and ours is not None and theirs[0] <= ours[1]  # the seeds' ranges overlap

        close = tuple(row.plan.scheme for row in timed if row is not best and too_close(row))
        return Advice(tuple(rows), best.plan.scheme, basis, close)
    best = min(rows, key=lambda row: row.plan.round_latency_s)
    if rounds is not None:  # rehearsed, and no scheme got there
        return Advice(tuple(rows), best.plan.scheme, "shortest round; no scheme reached the target in the rehearsal")
    return Advice(tuple(rows), best.plan.scheme, "shortest round; rounds to the target unknown (no data rehearsed)")
