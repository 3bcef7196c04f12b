"""``--auto``: the cut, the clusters and every device's transmission slot, decided live.

Two timescales (docs/latency-model.md):
- every round: cluster the online devices and give each an upload slot inside its
  cluster's iteration, from the current estimates (:mod:`edge_server.estimates`);
- every ``reselect_every`` rounds, or when the estimated state drifts: choose the cut by
  sample average approximation over the states of the last rounds.

Moving the cut between rounds needs no weight surgery: the server holds the whole
current model (the averaged device-side layers and its own), and the next round splits
it at the new cut. The server-side optimiser is rebuilt for the new set of server layers
(with momentum, its state restarts; the log says so).

The plan also carries what the server needs to run the slots: when each cluster's first
upload slots open after the weights go down, and how long after the gradients go out the
next iteration's slots open (the predicted downlink phase: delivery in Jackson order,
longest backward pass first, plus that backward pass). Every message also pays a one-way
latency through the broker, half the probed round trip, which the prediction adds to
each phase; a 2 ms guard absorbs jitter.

The medium (``--medium``, :mod:`toolkit.planning.medium`): on an air-time medium (Wi-Fi)
every transfer gets a slot, one sender at a time; on a byte-shared one (a wired or shaped
link) the devices send as soon as they are ready and the prediction is water-filling
(:func:`toolkit.planning.allocation.concurrent_phase`), since overlapping transfers costs
nothing there and slots would only serialise them. ``auto`` probes all devices at once
against each alone and decides per direction; the round's decision logs the evidence.

The scheduler's jobs live apart, each in its module: the devices' profiles and the
model's costs (edge_server.fleet_profiles), the medium (edge_server.medium_choice), the
live estimates (edge_server.estimates), a turn's timing (edge_server.turn_plan), the
encodings (edge_server.encoding_choice) and the state for ``--resume``
(edge_server.auto_state); this module plans the rounds with them.

Cluster sizes: with ``--clusters K`` (the fewest clusters) and no explicit
``--max-cluster-size``, clusters hold at most ceil(N / K) devices, so the K sequential
hand-overs per round stay balanced -- an unbalanced last cluster of one device would pull
the model toward that device's data every round -- and the algorithm chooses who trains
with whom.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from edge_server.auto_state import SavedSchedule
from edge_server.calibration import FixedCosts
from edge_server.encoding_choice import rank_encodings
from edge_server.estimates import LiveEstimates
from edge_server.fleet_profiles import profile_speed, reference_costs
from edge_server.medium_choice import MediumChoice
from edge_server.probe import LinkMeasurement, TogetherMeasurement
from edge_server.registry import DeviceRecord
from edge_server.scheduler import ClusterTiming, RoundMeasurements, RoundPlan, Scheduler, dealt_clusters
from edge_server.turn_plan import GUARD_S, TurnTiming, plan_turn
from toolkit.compression import Encoding, Trial
from toolkit.planning.advice import advise, plan_schemes
from toolkit.planning.bound import round_bound
from toolkit.planning.clustering import ClusterBounds, cluster_devices
from toolkit.planning.costs import ModelCosts
from toolkit.planning.cut_selection import CutReselection, select_cut
from toolkit.planning.latency import FleetState, SplitProblem, TrainingSettings
from toolkit.planning.medium import MediumEvidence
from toolkit.planning.regrouping import regroup
from toolkit.planning.rounds import label_skew
from toolkit.profile_format import Profile
from toolkit.protocol import messages as m

log = logging.getLogger("cpsl.server")

BASELINE_CUT = "pool2"  # the baselines' cut when none is named (edge_server.launch), else the middle one


@dataclass(frozen=True)
class FleetView:
    """What the scheduler knows of a fleet, in the planner's terms: enough to plan every scheme."""

    ids: list[str]
    costs: ModelCosts
    state: FleetState
    settings: TrainingSettings
    bounds: ClusterBounds
    baseline_cut: int
    uplink_medium: MediumEvidence
    downlink_medium: MediumEvidence


@dataclass
class AutoScheduler(Scheduler):
    model_fingerprint: str
    batch_size: int
    iterations: int
    bounds: ClusterBounds
    server_profile: Profile | None = None
    # where ``server_profile`` came from (--server-profile, measured at start, cached), for the record
    server_profile_source: str = "none: the reference device's stands for the server"
    reselect_every: int = 10
    drift_threshold: float = 0.3
    saa_window: int = 10
    fixed_cut: int | None = None  # pinned by the user: no SAA, clusters and slots still live
    medium: str = "auto"  # "auto" (from probes), "airtime" or "shared"
    compression: tuple[str, str] = ("fp32", "fp32")  # smashed data, gradients (toolkit.compression)
    # --compress auto: fp32 until the first split round's batches have been tried with every
    # candidate, then the encodings with the least predicted round within the error budget
    compression_auto: bool = False
    compression_budget: float = 0.01  # the largest relative RMS error an encoding may add
    compression_chosen: bool = False
    # on air time, plan the gradients and the next uploads as one stretch (devices compute while
    # others use the air); False: two phases with a barrier, as the latency model's iteration has
    iteration_flow: bool = True
    # ablations of the fast timescale: clusters drawn at random (as cpsl without resource management
    # draws them, from ``cluster_seed``), and no slots (the devices contend for the medium)
    random_clusters: bool = False
    cluster_seed: int = 0
    slots: bool = True
    # the clustering's partition improved by swapping and moving devices between clusters, each
    # candidate scored by the turn plan that will run (flow plan, slots or not); the clustering
    # itself scores the latency model's barrier iteration (docs/latency-model.md)
    regroup: bool = True
    regroup_budget_s: float = 0.5
    estimates: LiveEstimates = field(default_factory=LiveEstimates)
    costs: ModelCosts | None = None
    cut: int | None = None
    history: list[FleetState] = field(default_factory=list)
    media: MediumChoice = field(init=False)  # from ``medium`` and the probes
    advised: bool = False  # the per-scheme table went into the first round's decision
    fixed_costs: FixedCosts = field(default_factory=FixedCosts)
    label_counts: dict[str, np.ndarray] = field(default_factory=dict)  # every label each device trained on
    skew_threshold: float = 0.1  # label skew moved this much since the last cut choice: choose again
    selected_skew: float | None = None
    _solo_senders: set[str] = field(default_factory=set)
    _restored_speeds: dict[str, float] = field(default_factory=dict)  # measured before a --resume

    def __post_init__(self) -> None:
        self.media = MediumChoice(self.medium)
        self.reselection = CutReselection(self.reselect_every, self.drift_threshold)
        self._last_round: tuple[list[str], list[list[int]], FleetState] | None = None
        smashed, gradient = (Encoding.parse(text) for text in self.compression)
        if not (smashed.is_identity and gradient.is_identity):
            # the encodings' nominal sizes until the first turns measure what they do to this model's data
            self.estimates.compressed = True
            self.estimates.uplink_ratio = smashed.nominal_ratio
            self.estimates.downlink_ratio = gradient.nominal_ratio

    # the medium ------------------------------------------------------------------------------
    def needs_medium_probe(self, devices: list[str]) -> bool:
        """Probe these devices together? Once two or more are known, and again when the fleet grows."""
        return self.media.needs_probe(sum(d in self.estimates.devices for d in devices))

    def set_medium(self, together: TogetherMeasurement) -> None:
        alone = {d: self.estimates.devices[d] for d in together.up_bps if d in self.estimates.devices}
        self.media.decide(together, {d: e.up_bps for d, e in alone.items()}, {d: e.down_bps for d, e in alone.items()})

    def _advice(self, view: FleetView) -> dict:
        """What ``edge_server advise`` would say for this fleet, logged once at the start: each
        scheme's predicted round on the probed medium (rounds to the target need data the server
        does not hold; ``edge_server advise --data`` rehearses them)."""
        self.advised = True
        plans = plan_schemes(
            view.costs, view.state, view.settings, view.bounds, view.baseline_cut, self.bounds.min_clusters
        )
        advice = advise(plans)
        for line in advice.lines():
            log.warning("advice: %s", line)
        return advice.to_dict()

    def view(self, devices: list[DeviceRecord]) -> FleetView | None:
        """The probed devices among ``devices`` as the planner sees them (None: none probed yet)."""
        self._ensure_costs(devices)
        ids = [d.id for d in devices if d.id in self.estimates.devices]
        if not ids:
            return None
        uplink_medium, downlink_medium = self._media(ids)
        bounds = self.bounds
        if bounds.max_cluster_size is None:
            bounds = ClusterBounds(
                -(-len(ids) // max(1, bounds.min_clusters)), bounds.min_clusters, bounds.max_clusters
            )
        named = [c for c in self.costs.cuts if c.name == BASELINE_CUT]
        baseline = (named[0] if named else self.costs.middle_cut()).cut
        return FleetView(
            ids,
            self.costs,
            self.estimates.fleet_state(ids, uplink_medium, downlink_medium),
            self._settings(),
            bounds,
            baseline,
            uplink_medium,
            downlink_medium,
        )

    def label_skew(self, devices: list[str]) -> float:
        """Label skew of these devices from the labels they have trained on (0 before any)."""
        rows = [self.label_counts[d] for d in devices if d in self.label_counts]
        if len(rows) < 2:
            return 0.0
        width = max(len(r) for r in rows)
        return label_skew(np.array([np.pad(r, (0, width - len(r))) for r in rows]))

    def _media(self, ids: list[str]) -> tuple[MediumEvidence, MediumEvidence]:
        rows = {d: self.estimates.devices[d] for d in ids}
        return self.media.current({d: e.up_bps for d, e in rows.items()}, {d: e.down_bps for d, e in rows.items()})

    # setup ---------------------------------------------------------------------------------
    def needs_probe(self, device: str) -> bool:
        return device not in self.estimates.devices

    def state_dict(self) -> dict:
        """What ``--resume`` restores (edge_server.auto_state): links, clock offsets and the
        medium are not among it -- they are probed again when the devices come back."""
        reference = self.reselection.reference
        measured = {d: e.speed for d, e in self.estimates.devices.items() if e.speed_measured}
        return SavedSchedule(
            cut=self.cut,
            selected_skew=self.selected_skew,
            label_counts=self.label_counts,
            last_selection_round=self.reselection.last_round,
            selection_reference=reference,
            device_speeds={**self._restored_speeds, **measured},
            server_speed=self.estimates.server_speed if self.estimates.server_measured else None,
            fixed_costs=self.fixed_costs.to_dict(),
            compression=tuple(self.compression) if self.compression_chosen else None,
        ).to_dict()

    def load_state_dict(self, state: dict) -> None:
        saved = SavedSchedule.parse(state)
        self._restored_speeds = dict(saved.device_speeds)
        if saved.server_speed is not None:
            self.estimates.server_speed, self.estimates.server_measured = saved.server_speed, True
        for key in ("iteration_s", "turn_s", "between_turns_s"):
            if key in saved.fixed_costs:
                setattr(self.fixed_costs, key, saved.fixed_costs[key])
        self.fixed_costs.observed_rounds = int(saved.fixed_costs.get("observed_rounds", 0))
        self.cut = saved.cut
        self.selected_skew, self.label_counts = saved.selected_skew, saved.label_counts
        self.reselection.last_round = saved.last_selection_round
        self.reselection.reference = saved.selection_reference
        if self.compression_auto and saved.compression is not None:
            smashed, gradient = saved.compression
            self.compression, self.compression_chosen = (smashed, gradient), True
            if (smashed, gradient) != ("fp32", "fp32"):
                self.estimates.compressed = True
                self.estimates.uplink_ratio = Encoding.parse(smashed).nominal_ratio
                self.estimates.downlink_ratio = Encoding.parse(gradient).nominal_ratio

    def forget(self, device: str) -> None:
        """A device came back (after going offline, or restarted): what was measured of it --
        link, clock offset, speed -- may no longer hold, so it is probed again before it is
        planned, and the medium is probed again with it."""
        if self.estimates.devices.pop(device, None) is not None:
            self.media.forget_one(len(self.estimates.devices))
            log.warning("auto: %s came back: its link and clock will be measured again", device)

    def _ensure_costs(self, devices: list[DeviceRecord]) -> None:
        if self.costs is None:
            self.costs = reference_costs(
                devices, self.model_fingerprint, self.server_profile, self.server_profile_source, self.fixed_cut
            )
            if self.fixed_cut is not None:
                self.cut = self.fixed_cut

    def add_device(self, record: DeviceRecord, link: LinkMeasurement, devices: list[DeviceRecord]) -> None:
        """A newly probed device: its speed from its own profile if it sent one, else 1."""
        self._ensure_costs(devices)
        speed = profile_speed(record, self.model_fingerprint, self.costs, self.batch_size)
        restored = self._restored_speeds.pop(record.id, None)  # measured in the rounds before a --resume
        self.estimates.add(record.id, restored or speed, link)
        if restored is not None:
            self.estimates.devices[record.id].speed_measured = True
        log.info(
            "auto: %s speed %.2f, uplink %.1f Mbit/s, downlink %.1f Mbit/s, rtt %.1f ms, clock offset %+.1f ms",
            record.id,
            speed,
            link.up_bps / 1e6,
            link.down_bps / 1e6,
            1e3 * link.rtt_s,
            1e3 * link.clock_offset_s,
        )

    # per round -----------------------------------------------------------------------------
    def _settings(self) -> TrainingSettings:
        e = self.estimates
        return TrainingSettings(
            self.batch_size,
            self.iterations,
            e.server_speed,
            e.uplink_ratio,
            e.downlink_ratio,
            e.server_codec_s_per_byte,
        )

    def plan(self, round_: int, devices: list[DeviceRecord]) -> RoundPlan:
        view = self.view(devices)
        if view is None:
            return RoundPlan(cut=self.cut, clusters=[])
        ids, state, bounds = view.ids, view.state, view.bounds
        uplink_medium, downlink_medium = view.uplink_medium, view.downlink_medium
        decision: dict = {
            "estimates": {d: self.estimates.devices[d].to_dict() for d in ids},
            "server_speed": self.estimates.server_speed,
            "medium": {"uplink": uplink_medium.kind, "downlink": downlink_medium.kind},
        }
        if self.estimates.compressed:
            e = self.estimates
            decision["compression"] = {
                "encodings": list(self.compression),
                "uplink_ratio": e.uplink_ratio,
                "downlink_ratio": e.downlink_ratio,
                "codec_s_per_mb": {d: 1e6 * e.devices[d].codec_s_per_byte for d in ids},
                "server_codec_s_per_mb": 1e6 * e.server_codec_s_per_byte,
            }
        if not self.advised:
            decision["advice"] = self._advice(view)
            decision["server_profile"] = self.server_profile_source
        evidence = self.media.unlogged_evidence()  # in the round it was decided
        if evidence is not None:
            decision["medium_evidence"] = evidence
        skew = self.label_skew(ids)
        reason = self.reselection.due(round_, state) if self.fixed_cut is None else None
        moved = self.selected_skew is not None and abs(skew - self.selected_skew) > self.skew_threshold
        if reason is None and self.fixed_cut is None and moved:
            reason = f"label skew {skew:.2f} (was {self.selected_skew:.2f} at the last choice)"
        if reason is not None:
            samples = [*self.history[-(self.saa_window - 1) :], state] if self.history else [state]
            samples = [s for s in samples if s.size == state.size] or [state]
            choice = select_cut(self.costs, samples, self._settings(), bounds, seed=round_, skew=skew)
            self.reselection.selected(round_, samples)
            self.selected_skew = skew
            decision["cut_selection"] = {"reason": reason, "samples": len(samples), **choice.to_dict()}
            if choice.cut != self.cut:
                log.warning("auto: cut %s -> %d:%s (%s)", self.cut, choice.cut, choice.name, reason)
                self.cut = choice.cut
        self.history.append(state)
        del self.history[: -max(1, self.saa_window)]  # what the next cut choice samples, no more
        cut = self.costs.cut(self.cut)
        problem = SplitProblem.build(cut, state, self._settings())
        one_air = uplink_medium.kind == "airtime" and downlink_medium.kind == "airtime"
        limit = round_bound(problem, one_air, cap=bounds.resolve(state.size)[0])
        decision["bound"] = limit.to_dict()
        if self.random_clusters:
            row = {device: i for i, device in enumerate(ids)}
            dealt = dealt_clusters(ids, self.bounds.min_clusters, self.cluster_seed, round_)
            groups = [[row[device] for device in group] for group in dealt]
        latency = np.array([self.estimates.devices[d].rtt_s / 2 for d in ids])  # one way, per message
        if not self.random_clusters:
            groups = cluster_devices(problem, bounds, seed=round_)
            if self.regroup:
                groups, decision["regrouping"] = self._regroup(state, problem, groups, latency, bounds)
        self._last_round = (ids, [list(group) for group in groups], state)
        clusters, grants, timing = [], {}, {}
        turns: list[float] = []
        slot_choices: list[dict] = []
        self._solo_senders = set()
        for index, group in enumerate(groups):
            members = [ids[i] for i in group]
            clusters.append(members)
            rows = np.asarray(group)
            one_way = latency[rows]
            turn = self._plan_turn(state, problem, rows, one_way, self.slots)
            if turn.slotted:  # slots that buy nothing on this medium are skipped (docs/latency-model.md)
                free = self._plan_turn(state, problem, rows, one_way, slots=False)
                slot_choices.append({"slotted_s": float(turn.turn_s), "unslotted_s": float(free.turn_s)})
                if free.turn_s < turn.turn_s:
                    turn = free
            uplink, model_up, turn_s = turn.uplink, turn.model_up, turn.turn_s
            turns.append(turn_s)
            if uplink.offsets is not None or len(members) == 1:
                self._solo_senders.update(members)
            for row in group:
                device = ids[row]
                estimate = self.estimates.devices[device]
                slotted = uplink.offsets is not None and uplink.durations is not None and row in uplink.offsets
                grants[device] = m.Grant(
                    slot_offset_s=uplink.offsets[row] if slotted else 0.0,
                    slot_duration_s=max(uplink.durations[row], 1e-6) if slotted else None,
                    rate_bps=estimate.up_bps if slotted else None,
                    clock_offset_s=estimate.clock_offset_s,
                    weights_slot_offset_s=(
                        model_up.offsets[row] + turn.last_gradients_s if model_up.offsets is not None else None
                    ),
                )
            timing[index] = ClusterTiming(
                model_down_s=turn.model_down.finish_s + GUARD_S + turn.handout_shift_s,
                downlink_s=turn.epoch_s,
                predicted_turn_s=turn_s,
                predicted_iteration_s=turn.iteration_s,
                predicted_model_up_s=turn.downlink.finish_s + model_up.finish_s + one_way.max(),
                weights_down_offsets={ids[r]: t for r, t in (turn.model_down.offsets or {}).items()},
                gradient_offsets={ids[r]: t for r, t in (turn.gradients.offsets or {}).items()},
            )
        decision["plan"] = {
            "clusters": "random" if self.random_clusters else "planned",
            "slots": self.slots,
            "iteration_flow": self.slots and self.iteration_flow,
        }
        if slot_choices:  # per cluster, the turn predicted with slots and without: slots kept where they pay
            decision["slots"] = slot_choices
        decision["grants"] = {d: g.model_dump() for d, g in grants.items()}
        decision["fixed_costs"] = self.fixed_costs.to_dict()
        decision["predicted_turn_s"] = [timing[i].predicted_turn_s for i in range(len(clusters))]
        return RoundPlan(
            cut=self.cut,
            clusters=clusters,
            grants=grants,
            timing=timing,
            predicted_latency_s=self.fixed_costs.round(turns),
            bound_s=limit.bound_s,
            decision=decision,
        )

    def predicted_turn_s(
        self, state: FleetState, problem: SplitProblem, rows: np.ndarray, one_way: np.ndarray
    ) -> float:
        """A cluster's predicted turn as it will run: slotted where that is shorter."""
        turn = self._plan_turn(state, problem, rows, one_way, self.slots).turn_s
        if self.slots:
            turn = min(turn, self._plan_turn(state, problem, rows, one_way, slots=False).turn_s)
        return float(turn)

    def _regroup(
        self,
        state: FleetState,
        problem: SplitProblem,
        groups: list[list[int]],
        one_way: np.ndarray,
        bounds: ClusterBounds,
    ) -> tuple[list[list[int]], dict]:
        """The partition whose turns, as they will be planned, sum to the least, with as many
        clusters as the clustering's, within the bounds (toolkit/planning/regrouping.py: every
        partition of a small fleet, else a local search). The clustering scores the latency
        model's barrier iteration, which cannot see that a device computing while others use
        the air costs nothing; the turn plan can (docs/latency-model.md, "Regrouping by the turn
        plan")."""
        cache: dict[tuple[int, ...], float] = {}

        def turn(group: tuple[int, ...]) -> float:
            if group not in cache:
                rows = np.asarray(group)
                cache[group] = self.predicted_turn_s(state, problem, rows, one_way[rows])
            return cache[group]

        by_compute = sorted(range(state.size), key=lambda n: (problem.forward_s[n] + problem.backward_s[n], n))
        cap = bounds.resolve(state.size)[0]
        best, info = regroup(groups, by_compute, cap, turn, self.regroup_budget_s)
        return best, {**info, "plans": len(cache)}

    def _plan_turn(
        self, state: FleetState, problem: SplitProblem, rows: np.ndarray, one_way: np.ndarray, slots: bool
    ) -> TurnTiming:
        return plan_turn(state, problem, rows, one_way, slots, self.fixed_costs, self.iterations, self.iteration_flow)

    @property
    def wants_encoding_trials(self) -> bool:
        return self.compression_auto and not self.compression_chosen

    def choose_encodings(self, trials: list[Trial]) -> dict:
        """``--compress auto``: predict the last round's plan under each trial's sizes and codec
        time, keep the trials within the error budget, take the fastest; the table for the record.

        The trials ran on the edge server; a device's codec time is taken as the server's
        scaled by their compute speeds (``server_speed / device speed``) until its own turns
        report it."""
        if self._last_round is None or self.costs is None or self.cut is None:
            raise ValueError("no split round has been planned yet")
        ids, groups, state = self._last_round
        rows, best = rank_encodings(
            trials,
            self.costs.cut(self.cut),
            state,
            groups,
            self._settings(),
            self.compression_budget,
        )
        self.compression = (best["smashed"], best["gradient"])
        self.compression_chosen = True
        chosen = next(t for t in trials if (t.smashed, t.gradient) == self.compression)
        compressed = not (chosen.smashed == "fp32" and chosen.gradient == "fp32")
        self.estimates.compressed = compressed
        self.estimates.uplink_ratio = chosen.uplink_ratio if compressed else 1.0
        self.estimates.downlink_ratio = chosen.downlink_ratio if compressed else 1.0
        self.estimates.server_codec_s_per_byte = chosen.codec_s_per_byte if compressed else 0.0
        for index, device in enumerate(ids):
            if compressed and device in self.estimates.devices:
                self.estimates.devices[device].codec_s_per_byte = float(
                    chosen.codec_s_per_byte * self.estimates.server_speed / state.speed[index]
                )
        log.warning(
            "auto: encodings %s for smashed data, %s for gradients (predicted round %.2f s; fp32 %.2f s)",
            *self.compression,
            best["predicted_round_s"],
            rows[0]["predicted_round_s"],
        )
        return {"budget": self.compression_budget, "chosen": list(self.compression), "trials": rows}

    def encodings(self) -> tuple[str, str]:
        return tuple(self.compression)

    def known_links(self, devices: list[str]) -> dict[str, LinkMeasurement]:
        return {d: self.estimates.devices[d].link() for d in devices if d in self.estimates.devices}

    def observe(self, measured: RoundMeasurements) -> None:
        """Fold a round's measurements into the estimates (the arrivals give each device's
        upload times; the turns, measured beside their predictions, calibrate the fixed costs)."""
        if self.costs is None:
            return
        cut, timings, server_steps = measured.cut, measured.timings, measured.server_steps
        arrivals, turns, round_latency_s = measured.arrivals, measured.turns, measured.latency_s
        label_counts, server_codec = measured.label_counts, measured.server_codec
        # the figures this round was planned on that were still the profiles', not measurements
        prior_devices = {
            d for d in timings if d in self.estimates.devices and not self.estimates.devices[d].speed_measured
        }
        prior_server = not self.estimates.server_measured
        planned_on_priors = prior_server or bool(prior_devices)
        if turns and round_latency_s is not None and not planned_on_priors:
            # a round planned on profile figures misses by their error, not by fixed costs:
            # calibrating on it would carry that error into the next, measured, rounds
            self.fixed_costs.observe(turns, round_latency_s, self.iterations)
        for device, counts in (label_counts or {}).items():
            self.label_counts[device] = self.label_counts.get(device, 0) + np.asarray(counts, dtype=float)
        cost = self.costs.cut(cut) if any(c.cut == cut for c in self.costs.cuts) else None
        if cost is None:
            return
        for device, report in timings.items():
            self.estimates.observe_turn(
                device,
                cost,
                self.batch_size,
                report,
                (arrivals or {}).get(device),
                sent_alone=device in self._solo_senders,
            )
            step = self.estimates.devices[device].clock_step_s if device in self.estimates.devices else None
            if step is not None:
                log.warning("auto: the clock of %s stepped by about %+.3f s: measuring it again", device, step)
                self.forget(device)
        if server_steps:
            samples = sorted(server_steps)[len(server_steps) // 2]
            self.estimates.observe_server(cost, samples[0], samples[1])
        if server_codec is not None:
            self.estimates.observe_server_codec(*server_codec)
        newly = {d for d in prior_devices if d in self.estimates.devices and self.estimates.devices[d].speed_measured}
        if newly or (prior_server and self.estimates.server_measured):
            # the states sampled so far held profile figures where there are measurements now:
            # they are not states of this fleet, and would keep the SAA window (and the drift
            # reference, its mean) away from it for saa_window rounds
            self.history.clear()
