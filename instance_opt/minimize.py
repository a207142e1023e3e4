"""The optimisation loop of one pyramid level (method §2.1), after BoTorch's
``botorch/optim/core.py::torch_minimize``; it knows nothing of images or grids."""

from __future__ import annotations

import math
import numbers
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
    """What :func:`minimize` ran, for the batch and for each of its pairs.

    Attributes:
        status: ``DIVERGED`` when some pair's energy stopped being finite, ``CONVERGED`` when
            the stopping rule fired for every pair, else ``MAX_ITERATIONS``.
        iterations: optimizer steps taken. terms: ``{field: [value per iteration]}`` of the
            closure's terms, averaged over the pairs (empty when none ran). seconds: wall time.
        pair_status, pair_iterations, pair_terms: the same for each pair on its own: a pair
            stops (its parameters are held from then on) at the window where it converged or
            diverged, exactly where a run of that pair alone would have stopped.
    """

    status: Status
    iterations: int
    terms: dict[str, list[float]]
    seconds: float
    pair_status: list[Status]
    pair_iterations: list[int]
    pair_terms: list[dict[str, list[float]]]


def minimize(closure: Callable[[], NamedTuple], optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None, stopping: Callable[[Sequence[float]], bool],
             max_iterations: int, *, window: int, callback: Callable[[int], None] | None = None,
             progress_bar=None, on_stop: Callable[[list[int]], None] | None = None) -> MinimizeResult:
    """Minimise ``closure().total`` by at most ``max_iterations`` optimizer steps, for one pair
    or for a batch of independent pairs.

    Each iteration: ``terms = closure()``, zero the gradients, back-propagate
    ``terms.total.sum()``, ``optimizer.step()``, ``scheduler.step()``. The terms stay on their
    device; every ``window`` iterations they are read in one transfer (one device sync per
    window), then the progress bar's postfix is set, ``callback(iterations_done)`` runs
    without gradients, and each pair still running is judged on its own totals: a non-finite
    ``total`` stops it as ``DIVERGED``, ``stopping(its totals so far)`` as ``CONVERGED``. On the
    CPU a running pair's non-finite ``total`` is also caught before the backward: the pair stops
    as ``DIVERGED`` at once (PyTorch's CPU ``grid_sample`` backward crashes on a NaN sampling
    grid) and the others, re-evaluated without it, take the iteration's step as they would alone. A
    stopped pair's slice of every parameter is held at its value from then on; the run ends
    when every pair has stopped. After a last iteration off the window, ``callback`` runs once
    more (the stopping rule does not).

    Args:
        closure: ``() -> terms``, a NamedTuple of tensors (e.g.
            :class:`hybridreg.objective.EnergyTerms`) whose ``total`` field is the loss:
            0-dim for one problem, or ``(B,)`` for B independent pairs (each parameter of
            ``optimizer`` then holds the pairs along its dim 0; a sum of independent energies
            under an elementwise optimizer such as Adam gives each pair the steps it would
            take alone).
        optimizer: steps the parameters ``closure`` depends on.
        scheduler: learning-rate schedule stepped after each optimizer step, or ``None``.
        stopping: ``stopping(totals) -> bool`` on every ``total`` of one pair so far (e.g.
            :class:`RelativeChangeStopping`).
        max_iterations: the iteration budget (0 runs nothing).
        window: iterations between reads, callbacks and stopping checks (>= 1).
        callback: optional ``callback(iteration)``.
        progress_bar: optional tqdm-like bar, advanced once per iteration.
        on_stop: optional ``on_stop(stopped_pairs)``, called when some pairs of a batch have
            stopped and others go on, with every stopped pair's index: the closure may then
            evaluate the running pairs only (and return the stopped ones' last terms).

    Returns: :class:`MinimizeResult`.

    Raises:
        ValueError: ``window`` not an integer >= 1, or ``max_iterations`` negative.
    """
    for name, n, low in (("window", window, 1), ("max_iterations", max_iterations, 0)):
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < low:
            raise ValueError(f"minimize(): `{name}` must be an integer >= {low}, got {n!r}")
    t0 = time.perf_counter()
    it, names, n_pairs = 0, (), 1
    pending: list[torch.Tensor] = []
    rows: list[list[list[float]]] = []  # per iteration: [term][pair]
    stopped: dict[int, tuple[Status, int]] = {}  # pair -> (status, iterations)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    held: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # stopped pairs' indices and their parameter values
    # on the CPU the totals are also read before each backward: PyTorch's CPU grid_sample
    # backward crashes the process (segfault) on a NaN sampling grid, which a diverged velocity
    # gives; the read costs nothing there, while on a GPU it would be a sync per iteration
    each = bool(params) and params[0].device.type == "cpu"

    def hold_stopped() -> None:  # the stopped pairs' parameters are held from now on; the closure is told
        nonlocal held
        index = torch.tensor(sorted(stopped), device=params[0].device if params else None)
        held = (index, [p.detach()[index].clone() for p in params])
        if on_stop is not None:
            on_stop(sorted(stopped))

    for it in range(1, max_iterations + 1):
        terms = closure()
        names, n_pairs = terms._fields, terms.total.numel()
        if each:  # a running pair whose energy is not finite stops now, before any backward through it
            bad = [b for b in torch.nonzero(~torch.isfinite(terms.total.detach().reshape(-1))).flatten().tolist()
                   if b not in stopped]
            if bad:
                stopped.update({b: (Status.DIVERGED, it) for b in bad})
                if len(stopped) == n_pairs:
                    pending.append(torch.stack([t.detach().reshape(-1).expand(n_pairs) for t in terms]))
                    break
                hold_stopped()
                terms = closure()  # the running pairs take this iteration's step as they would alone
        optimizer.zero_grad(set_to_none=True)
        terms.total.sum().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if held is not None:
            with torch.no_grad():
                for p, value in zip(params, held[1]):
                    p[held[0]] = value
        pending.append(torch.stack([t.detach().reshape(-1).expand(n_pairs) for t in terms]))
        if progress_bar is not None:
            progress_bar.update()
        if it % window == 0:
            rows += torch.stack(pending).tolist()
            pending = []
            if progress_bar is not None:
                progress_bar.set_postfix({k[:5]: f"{sum(v) / n_pairs:.4f}" for k, v in zip(names, rows[-1])}, refresh=False)
            if callback is not None:
                with torch.no_grad():
                    callback(it)
            i_total = names.index("total")
            for b in range(n_pairs):
                if b in stopped:
                    continue
                if not math.isfinite(rows[-1][i_total][b]):
                    stopped[b] = (Status.DIVERGED, it)  # the energy overflowed: stop, never return it as a result
                elif stopping([r[i_total][b] for r in rows]):
                    stopped[b] = (Status.CONVERGED, it)
            if len(stopped) == n_pairs:
                break
            if stopped and (held is None or len(held[0]) != len(stopped)):
                hold_stopped()
    if pending:
        rows += torch.stack(pending).tolist()
    if callback is not None and it % window != 0:
        with torch.no_grad():
            callback(it)
    pair_status = [stopped.get(b, (Status.MAX_ITERATIONS, it))[0] for b in range(n_pairs)]
    pair_iterations = [stopped.get(b, (Status.MAX_ITERATIONS, it))[1] for b in range(n_pairs)]
    pair_terms = [{k: [r[i][b] for r in rows[:n]] for i, k in enumerate(names)}
                  for b, n in enumerate(pair_iterations)]
    status = (Status.DIVERGED if Status.DIVERGED in pair_status
              else Status.CONVERGED if all(s is Status.CONVERGED for s in pair_status) else Status.MAX_ITERATIONS)
    terms = {k: [sum(r[i]) / n_pairs for r in rows] for i, k in enumerate(names)}
    return MinimizeResult(status, it, terms, time.perf_counter() - t0, pair_status, pair_iterations, pair_terms)
