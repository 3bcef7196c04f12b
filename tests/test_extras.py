"""A command whose install profile is missing says which, in one line; any other import error stays a bug."""

from __future__ import annotations

import pytest

from toolkit.cli.extras import EXIT_USAGE, guarded_main


def missing(name: str):
    def load():
        raise ModuleNotFoundError(f"No module named '{name}'", name=name)

    return load


def test_a_missing_extra_is_named_in_one_line(capsys):
    assert guarded_main("edge_server", missing("scipy.optimize")) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == (
        "edge_server: error: this needs the 'server' install profile (scipy is not installed): "
        "pip install 'cpsl-edge[server]'\n"
    )
    assert guarded_main("cpsl-profile", missing("onnxruntime")) == EXIT_USAGE
    assert "pip install 'cpsl-edge[onnx]'" in capsys.readouterr().err


def test_any_other_missing_module_is_a_bug_and_keeps_its_traceback():
    with pytest.raises(ModuleNotFoundError):
        guarded_main("edge_server", missing("toolkit.nonexistent"))


def test_a_loaded_command_runs():
    assert guarded_main("x", lambda: lambda: 7) == 7
