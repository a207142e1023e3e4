"""The optimisation loop of one pyramid level (method §2.1), after BoTorch's
``botorch/optim/core.py::torch_minimize``; it knows nothing of images or grids."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from hybridreg.solvers import Status

__all__ = ["RelativeChangeStopping", "MinimizeResult", "minimize"]


@dataclass
class RelativeChangeStopping:
    """Stop when the loss stops decreasing: ``(mean_prev − mean_last) / |mean_prev| < tol``
    over two consecutive windows of ``window`` iterations, after ``min_iterations``."""

    tol: float = 1e-4
    window: int = 10
    min_iterations: int = 20

    def __call__(self, losses: Sequence[float]) -> bool:
        n = len(losses)
        if self.tol <= 0 or n < max(self.min_iterations, 2 * self.window):
            return False
        last = sum(losses[-self.window :]) / self.window
        prev = sum(losses[-2 * self.window : -self.window]) / self.window
        return (prev - last) / max(abs(prev), 1e-12) < self.tol


@dataclass
class MinimizeResult:
    """What :func:`minimize` ran: ``status`` (``CONVERGED`` when the stopping rule fired,
    ``DIVERGED`` when the energy stopped being finite, else ``MAX_ITERATIONS``), optimizer steps taken, ``terms`` (``{field: [value per
    iteration]}`` of the closure's terms, empty when none ran), wall time in seconds."""

    status: Status
    iterations: int
    terms: dict[str, list[float]]
    seconds: float


def minimize(closure: Callable[[], NamedTuple], optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None, stopping: Callable[[Sequence[float]], bool],
             max_iterations: int, *, window: int, callback: Callable[[int], None] | None = None,
             progress_bar=None) -> MinimizeResult:
    """Minimise ``closure().total`` by at most ``max_iterations`` optimizer steps.

    Each iteration: ``terms = closure()``, zero the gradients, back-propagate
    ``terms.total``, ``optimizer.step()``, ``scheduler.step()``. The terms stay on their
    device; every ``window`` iterations they are read in one transfer (one device sync per
    window), then the progress bar's postfix is set, ``callback(iterations_done)`` runs
    without gradients, a non-finite ``total`` ends the run as ``DIVERGED``, and
    ``stopping(totals so far)`` may end it as ``CONVERGED``. After a last
    iteration off the window, ``callback`` runs once more (the stopping rule does not).

    Args:
        closure: ``() -> terms``, a NamedTuple of 0-dim tensors (e.g.
            :class:`hybridreg.objective.EnergyTerms`) whose ``total`` field is the loss.
        optimizer: steps the parameters ``closure`` depends on.
        scheduler: learning-rate schedule stepped after each optimizer step, or ``None``.
        stopping: ``stopping(totals) -> bool`` on every ``total`` so far (e.g.
            :class:`RelativeChangeStopping`).
        max_iterations: the iteration budget (0 runs nothing).
        window: iterations between reads, callbacks and stopping checks (>= 1).
        callback: optional ``callback(iteration)``.
        progress_bar: optional tqdm-like bar, advanced once per iteration.

    Returns: :class:`MinimizeResult`.
    """
    t0 = time.perf_counter()
    status, it, names = Status.MAX_ITERATIONS, 0, ()
    pending: list[torch.Tensor] = []
    rows: list[list[float]] = []
    for it in range(1, max_iterations + 1):
        terms = closure()
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        names = terms._fields
        pending.append(torch.stack([t.detach() for t in terms]))
        if progress_bar is not None:
            progress_bar.update()
        if it % window == 0:
            rows += torch.stack(pending).tolist()
            pending = []
            if progress_bar is not None:
                progress_bar.set_postfix({k[:5]: f"{v:.4f}" for k, v in zip(names, rows[-1])}, refresh=False)
            if callback is not None:
                with torch.no_grad():
                    callback(it)
            if not math.isfinite(rows[-1][names.index("total")]):
                status = Status.DIVERGED  # the energy overflowed: stop, never return it as a result
                break
            if stopping([r[names.index("total")] for r in rows]):
                status = Status.CONVERGED
                break
    if pending:
        rows += torch.stack(pending).tolist()
    if callback is not None and it % window != 0:
        with torch.no_grad():
            callback(it)
    return MinimizeResult(status, it, {k: [r[i] for r in rows] for i, k in enumerate(names)}, time.perf_counter() - t0)
