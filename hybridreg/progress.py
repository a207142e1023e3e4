"""Progress: tqdm bars on a terminal (or a notebook), one line per finished unit in a log file.

A bar redraws itself with carriage returns. Written to a file or a pipe (``hybridreg register ...
2> run.log``, ``nohup``, a cluster job's log) that is one endless line with the energy terms
blanked at each level's end. So where stderr is not a terminal no bar is drawn, and the loops
that draw one (the instance solver's levels, ``batch``'s pairs, ``tune``'s trials, training)
write a line per finished unit instead (:func:`log`).
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["bar", "log", "on_terminal"]


def on_terminal() -> bool:
    """Whether a bar can redraw in place: stderr is a terminal, or tqdm draws a notebook's widget
    (``False`` where the process has no stderr, as under ``pythonw``)."""
    try:
        tty = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        tty = False
    return bool(tty) or any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # tqdm.auto's class in Jupyter


def bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (tqdm's keyword arguments as given), drawn when ``enabled``
    and :func:`on_terminal`; otherwise a disabled bar, which still iterates but does not count
    (its ``n`` stays 0: a caller that logs a count keeps its own)."""
    return tqdm(iterable, disable=not enabled or not on_terminal(), **kwargs)


def log(line: str, *, enabled: bool = True) -> None:
    """Write ``line`` to stderr where progress is ``enabled`` and no bar is drawn (not
    :func:`on_terminal`): the line that stands for a finished level, pair, trial or epoch."""
    if enabled and not on_terminal() and sys.stderr is not None:
        print(line, file=sys.stderr, flush=True)
