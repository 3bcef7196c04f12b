"""Make-up turns' bookkeeping (edge_server.owed_turns) and its place in the saved run state."""

from __future__ import annotations

import pytest
import torch

from edge_server.owed_turns import OwedTurn, OwedTurns
from edge_server.run_state import RunState, load_state, save_state
from toolkit.errors import UserError


def test_a_device_owes_its_first_lost_turn_until_it_is_made_up():
    owed = OwedTurns()
    owed.owe("dev1", 40, 2)
    owed.owe("dev1", 60, 3)  # dropped again before it was made up: the older debt stands
    owed.owe("dev0", 10, 3)
    assert owed.due(["dev2", "dev1"]) == {"dev1": OwedTurn(40, 2)}
    assert list(owed.due(["dev1", "dev0"])) == ["dev0", "dev1"]
    owed.settle(["dev1"])
    assert owed.due(["dev1", "dev0"]) == {"dev0": OwedTurn(10, 3)}


def test_owed_turns_survive_the_run_state_and_a_bad_record_is_refused(tmp_path):
    owed = OwedTurns()
    owed.owe("dev1", 40, 2)
    model = {"w": torch.zeros(2)}
    save_state(tmp_path, RunState("r", 3, "fp", model, stream_positions={"dev1": 80}, owed_turns=owed.state_dict()))
    state = load_state(tmp_path, "r", "fp")
    assert OwedTurns.from_state(state.owed_turns).due(["dev1"]) == {"dev1": OwedTurn(40, 2)}
    for bad in ({"dev1": [40]}, {"dev1": [-1, 2]}, {"dev1": [True, 2]}, ["dev1"]):
        save_state(tmp_path, RunState("r", 3, "fp", model, owed_turns=bad))
        with pytest.raises(UserError, match="owed turns"):
            load_state(tmp_path, "r", "fp")
