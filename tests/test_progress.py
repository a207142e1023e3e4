"""Progress in a log file: lines, not a bar's carriage returns (hybridreg.progress)."""

import torch

from hybridreg import progress
from instance_opt.solver import InstanceOptConfig, register_pair


def _register(enabled: bool):
    torch.manual_seed(0)
    f = torch.rand(1, 1, 12, 12, 12)
    register_pair(f, torch.roll(f, 1, 2), InstanceOptConfig(level_spacing=(2.0, 1.0), iterations=(4, 2), progress=enabled))


def test_levels_write_one_line_each_where_stderr_is_not_a_terminal(capsys, monkeypatch):
    _register(True)  # pytest's captured stderr is not a terminal, as a log file is not
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("level 1/2 6x6x6: 4 iterations") and "similarity" in lines[0]
    assert lines[1].startswith("level 2/2 12x12x12: 2 iterations") and "max_iterations" in lines[1]
    _register(False)  # progress off: nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "on_terminal", lambda: True)  # a terminal: the bar redraws, no log lines
    _register(True)
    err = capsys.readouterr().err
    assert "\r" in err and "level 2/2" in err and "iterations," not in err


def test_log_and_bar_follow_the_terminal(capsys, monkeypatch):
    progress.log("pair a done", enabled=False)
    progress.log("pair b done")
    assert capsys.readouterr().err == "pair b done\n"
    assert progress.bar(range(3)).disable and list(progress.bar(range(3))) == [0, 1, 2]
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    assert not progress.bar(range(3)).disable and progress.bar(range(3), enabled=False).disable
    progress.log("pair c done")
    assert "pair c done" not in capsys.readouterr().err


def test_a_process_without_stderr_draws_no_bar_and_logs_nothing(monkeypatch, capsys):
    """Under pythonw or a daemon sys.stderr is None (or closed): no bar, no line, no AttributeError."""
    monkeypatch.setattr("sys.stderr", None)
    assert not progress.on_terminal()
    progress.log("pair a done")
    assert capsys.readouterr().out == ""


def test_a_notebook_draws_its_widget_whatever_stderr_is(monkeypatch):
    """In Jupyter tqdm.auto's class derives from tqdm.notebook's (its own module is tqdm.auto): bars stay on."""
    import types

    widget = types.new_class("tqdm_notebook")
    widget.__module__ = "tqdm.notebook"
    monkeypatch.setattr(progress, "tqdm", types.new_class("tqdm", (widget,)))
    assert progress.on_terminal()
