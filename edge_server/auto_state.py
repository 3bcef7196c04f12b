"""What ``--resume`` restores of ``--auto``'s scheduler, as JSON, checked on the way in.

The cut, the last cut choice (its round and the state it was made on), the labels each
device trained on, and what the rounds measured: each device's compute speed, the
server's, the calibrated fixed costs, and the encodings ``--compress auto`` chose. Links,
clock offsets and the medium are not kept: the devices are probed again when they come
back (the server was down, boards may have rebooted or moved, and a probe is the freshest
measurement there is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from toolkit.compression import Encoding
from toolkit.errors import UserError

FIXED_COSTS = ("iteration_s", "turn_s", "between_turns_s")


@dataclass
class SavedSchedule:
    cut: int | None = None
    selected_skew: float | None = None
    label_counts: dict[str, np.ndarray] = field(default_factory=dict)
    last_selection_round: int | None = None
    selection_reference: np.ndarray | None = None
    device_speeds: dict[str, float] = field(default_factory=dict)
    server_speed: float | None = None
    fixed_costs: dict = field(default_factory=dict)  # edge_server.calibration.FixedCosts.to_dict()
    compression: tuple[str, str] | None = None

    def to_dict(self) -> dict:
        reference = self.selection_reference
        return {
            "cut": self.cut,
            "selected_skew": self.selected_skew,
            "label_counts": {d: [float(v) for v in counts] for d, counts in self.label_counts.items()},
            "last_selection_round": self.last_selection_round,
            "selection_reference": None if reference is None else [float(v) for v in reference],
            "device_speeds": dict(self.device_speeds),
            "server_speed": self.server_speed,
            "fixed_costs": dict(self.fixed_costs),
            "compression": list(self.compression) if self.compression is not None else None,
        }

    @classmethod
    def parse(cls, state: dict) -> SavedSchedule:
        """The saved state, or a one-line UserError saying what in it is not --auto's."""
        try:
            cut, skew, last = state["cut"], state["selected_skew"], state["last_selection_round"]
            if not all(v is None or isinstance(v, int | float) for v in (cut, skew, last)):
                raise TypeError("cut, skew and round must be numbers")
            counts = {str(d): np.asarray(c, dtype=float) for d, c in dict(state["label_counts"]).items()}
            reference = state["selection_reference"]
            reference = None if reference is None else np.asarray(reference, dtype=float)
            speeds = {str(d): float(v) for d, v in dict(state.get("device_speeds") or {}).items()}
            server_speed = state.get("server_speed")
            server_speed = None if server_speed is None else float(server_speed)
            costs = dict(state.get("fixed_costs") or {})
            fixed = {k: float(costs[k]) for k in FIXED_COSTS if k in costs}
            fixed["observed_rounds"] = int(costs.get("observed_rounds", 0))
            if not all(math.isfinite(v) and v > 0 for v in [*speeds.values(), server_speed or 1.0]):
                raise ValueError("speeds must be finite and positive")
            if not all(math.isfinite(v) for v in fixed.values()):
                raise ValueError("fixed costs must be finite")
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"the saved scheduler state is not --auto's: {exc}") from None
        chosen = state.get("compression")
        compression = None
        if chosen is not None:
            try:
                smashed, gradient = (Encoding.parse(str(text)).name for text in chosen)
            except (TypeError, ValueError) as exc:
                raise UserError(f"the saved scheduler state is not --auto's: compression {exc}") from None
            compression = (smashed, gradient)
        return cls(
            cut=None if cut is None else int(cut),
            selected_skew=skew,
            label_counts=counts,
            last_selection_round=None if last is None else int(last),
            selection_reference=reference,
            device_speeds=speeds,
            server_speed=server_speed,
            fixed_costs=fixed,
            compression=compression,
        )
