"""The ask/tell loop. A trial's objective returns ``dice`` (maximised), ``folding`` (constraint
``folding ≤ τ``) and ``sdlogj`` (the second objective in Pareto mode, and a constraint
``sdlogj ≤ sdlogj_max`` when the space sets one); the ``q = batch_size``
candidates of a round are evaluated in parallel worker processes.

BoTorch (``method="botorch"``): a scrambled Sobol initial design, then per round a
``SingleTaskGP`` on the unit cube (log scale for ``log: true`` parameters) with standardised
outcomes; candidates maximise ``qLogNoisyExpectedImprovement`` of Dice with the folding
constraint (modelled as the log slack :func:`folding_slack`, not the raw zero-inflated
percentage) and the SDlogJ bound if any (the slack ``sdlogj − sdlogj_max``), or in Pareto
mode ``qLogNoisyExpectedHypervolumeImprovement`` of (Dice, −SDlogJ) under the same constraints.
TuRBO (``method="turbo"``, for many parameters such as the conditional network's region weights):
the same GP and acquisition, maximised only inside a trust region around the best feasible trial,
TuRBO-1 of Eriksson et al. (NeurIPS 2019, §2): a box of side ``L`` scaled per dimension by the GP's
lengthscales (their geometric mean kept at 1), doubled after 3 successes in a row, halved after
``ceil(max(4/q, d/q))`` failures, restarted at 0.8 below 2⁻⁷; its state is replayed from the trial
history (:func:`turbo_length`), so a resumed run proposes what an uninterrupted one would.
Baselines: random search, Optuna's TPE. Draws are seeded by ``space.seed`` and the trial index (no global RNG).

State: ``trials.json`` in the output folder is rewritten atomically after every finished
trial; candidates proposed but not finished are stored as ``pending`` and evaluated first
on ``resume``, so a killed run loses no finished trial and wastes no proposal.
"""

import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import atomic_write_text, from_dict, to_dict
from ..solvers import get_solver
from .space import SearchSpace, apply_params

METHODS = ("botorch", "turbo", "random", "tpe")

RUN_FILES = ("trials.json", "summary.json", "pareto.json", "best_config.yaml", "best_so_far.png", "pareto.png",
             "partial_dependence.png")
"""The files a tuning run writes in its folder (:func:`run_tuning`, :func:`hybridreg.tuning.write_outputs`):
a fresh run refuses a folder that holds one."""
TURBO_INIT, TURBO_MIN, TURBO_MAX = 0.8, 0.5**7, 1.6  # TuRBO-1's trust-region side: start, restart below, cap


@dataclass
class TuningResult:
    """Trials of a run (``trials.json``) and its summary.

    Attributes:
        trials: every trial, in order: ``id``, ``params``, ``x`` (unit cube), ``status``
            (``done``, ``failed``, ``pending``), ``dice``, ``folding``, ``sdlogj``,
            ``seconds``.
        best: the best feasible finished trial (max Dice, :meth:`SearchSpace.feasible`) or ``None``.
        pareto: finished feasible trials on the Dice/SDlogJ Pareto front.
    """

    trials: list[dict]
    best: dict | None
    pareto: list[dict]


def _feasible(trials: list[dict], space: SearchSpace) -> list[dict]:
    return [t for t in trials if t["status"] == "done" and space.feasible(t)]


def best_trial(trials: list[dict], space: SearchSpace) -> dict | None:
    """Max Dice among finished feasible trials (:meth:`SearchSpace.feasible`; ties: lower SDlogJ)."""
    ok = _feasible(trials, space)
    return max(ok, key=lambda t: (t["dice"], -t["sdlogj"])) if ok else None


def pareto_front(trials: list[dict], space: SearchSpace) -> list[dict]:
    """Feasible finished trials not dominated in (max Dice, min SDlogJ), by Dice."""
    from botorch.utils.multi_objective.pareto import is_non_dominated

    ok = _feasible(trials, space)
    if not ok:
        return []
    mask = is_non_dominated(torch.tensor([[t["dice"], -t["sdlogj"]] for t in ok], dtype=torch.double)).tolist()
    return sorted((t for t, m in zip(ok, mask) if m), key=lambda t: t["dice"])


def best_so_far(trials: list[dict], space: SearchSpace) -> list[float]:
    """Best feasible Dice after each finished trial (NaN before the first feasible one)."""
    out, best = [], float("nan")
    for t in trials:
        if t["status"] == "done" and space.feasible(t) and not (t["dice"] <= best):
            best = t["dice"]
        if t["status"] != "pending":
            out.append(best)
    return out


FOLDING_FLOOR = 1e-3  # % of voxels: about one voxel in 10⁵, below any folding that matters


def folding_slack(folding: torch.Tensor, tau: float) -> torch.Tensor:
    """The folding constraint as the GP models it: ``log((folding + ε) / (τ + ε))``, ε =
    :data:`FOLDING_FLOOR`; feasible (``folding ≤ τ``) iff ≤ 0.

    %|J|≤0 is zero-inflated: most trials fold nowhere, the others by orders of magnitude
    more. Modelled raw, an all-zero column is a constant whose standardised scale falls back
    to 1 (ten times τ = 0.1): the GP's noise then puts half the posterior samples above τ,
    BoTorch finds "all training points infeasible" in some samples and the constraint
    weights the acquisition by chance. In the log slack zero sits ``log(τ/ε + 1)`` (4.6 for
    τ = 0.1) below the bound, and 0.5 % and 5 % are as far apart as 0.05 % and 0.5 %.
    """
    return torch.log((folding + FOLDING_FLOOR) / (tau + FOLDING_FLOOR))


def fit_gp(X: torch.Tensor, Y: torch.Tensor):
    """A ``SingleTaskGP`` of ``Y`` (standardised) on unit-cube inputs ``X``, fitted by marginal likelihood."""
    from botorch.exceptions.warnings import InputDataWarning
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    with warnings.catch_warnings():
        # an outcome can be constant (no trial folds): Standardize then keeps its scale at 1
        warnings.simplefilter("ignore", InputDataWarning)
        model = SingleTaskGP(X, Y, outcome_transform=Standardize(m=Y.shape[-1]))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model


def turbo_length(space: SearchSpace, trials: list[dict]) -> float:
    """TuRBO-1's trust-region side after ``trials`` (module docstring), replayed trial by trial
    (a batch of q counts as q trials): a trial after the initial design succeeds when its
    feasible Dice beats the best so far by 10⁻³ of its size."""
    d, q = len(space.parameters), space.batch_size
    fail_tol = math.ceil(max(4 / q, d / q))
    length, succ, fail, best = TURBO_INIT, 0, 0, -math.inf
    for i, t in enumerate(t for t in trials if t["status"] != "pending"):
        val = t["dice"] if t["status"] == "done" and space.feasible(t) else -math.inf
        if i >= space.initial_trials:
            better = val > best + 1e-3 * abs(best) if math.isfinite(best) else val > best
            succ, fail = (succ + 1, 0) if better else (0, fail + 1)
            if succ == 3:
                length, succ = min(2 * length, TURBO_MAX), 0
            elif fail == fail_tol:
                length, fail = length / 2, 0
            if length < TURBO_MIN:
                length = TURBO_INIT
        best = max(best, val)
    return length


def _trust_region(model, X: torch.Tensor, done: list[dict], space: SearchSpace, length: float) -> torch.Tensor:
    """TuRBO's box ``(2, d)`` in the unit cube: centred on the best feasible trial (the best
    Dice when none is), side ``length`` scaled by the Dice GP's lengthscales."""
    ok = [i for i, t in enumerate(done) if space.feasible(t)] or list(range(len(done)))
    centre = X[max(ok, key=lambda i: done[i]["dice"])]
    ls = model.covar_module.lengthscale.detach().reshape(-1, X.shape[-1])[0].to(X)
    w = ls / ls.log().mean().exp()
    return torch.stack([(centre - w * length / 2).clamp(0, 1), (centre + w * length / 2).clamp(0, 1)])


def _propose_botorch(space: SearchSpace, done: list[dict], q: int, seed: int, trust_length: float | None = None) -> torch.Tensor:
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.acquisition.multi_objective.objective import IdentityMCMultiOutputObjective
    from botorch.acquisition.objective import GenericMCObjective
    from botorch.optim import optimize_acqf
    from botorch.sampling import SobolQMCNormalSampler

    d = len(space.parameters)
    X = torch.tensor([t["x"] for t in done], dtype=torch.double)
    Y, constraints = _outcomes(space, done)
    model = fit_gp(X, Y)
    bounds = (torch.stack([torch.zeros(d, dtype=torch.double), torch.ones(d, dtype=torch.double)]) if trust_length is None
              else _trust_region(model, X, done, space, trust_length))
    # Seeded MC samplers and start points. The baseline is not pruned (BoTorch's pruning draws unseeded): a
    # pruned point is one never best in 2048 posterior samples, keeping it changes the acquisition by MC noise only.
    if space.mode == "single":
        acq = qLogNoisyExpectedImprovement(
            model, X_baseline=X, sampler=SobolQMCNormalSampler(torch.Size([512]), seed=seed),
            objective=GenericMCObjective(lambda Z, X=None: Z[..., 0]), constraints=constraints,
            prune_baseline=False,
        )
    else:
        ref = Y[:, :2].min(dim=0).values - 0.1 * (Y[:, :2].max(dim=0).values - Y[:, :2].min(dim=0).values).clamp_min(1e-3)
        acq = qLogNoisyExpectedHypervolumeImprovement(
            model, ref_point=ref.tolist(), X_baseline=X, sampler=SobolQMCNormalSampler(torch.Size([128]), seed=seed),
            objective=IdentityMCMultiOutputObjective(outcomes=[0, 1]), constraints=constraints,
            prune_baseline=False,
        )
    cand, _ = optimize_acqf(acq, bounds=bounds, q=q, num_restarts=8,
                            batch_initial_conditions=_start_points(acq, bounds, q, 8, seed))
    return cand.detach()


def _outcomes(space: SearchSpace, done: list[dict]) -> tuple[torch.Tensor, list[Callable]]:
    """The GP's outcome columns for ``done`` trials: the objectives (Dice; and −SDlogJ in Pareto
    mode), then one slack per constraint, feasible iff ≤ 0 (:func:`folding_slack`; ``sdlogj −
    sdlogj_max`` when the space bounds SDlogJ), and BoTorch's constraint callables on them."""
    k = 2 if space.mode == "pareto" else 1
    Y = torch.tensor([[t["dice"]] + ([-t["sdlogj"]] if k == 2 else []) + [t["folding"]]
                      + ([t["sdlogj"] - space.sdlogj_max] if space.sdlogj_max > 0 else []) for t in done], dtype=torch.double)
    Y[:, k] = folding_slack(Y[:, k], space.folding_max)
    return Y, [lambda Z, i=i: Z[..., i] for i in range(k, Y.shape[1])]


def _start_points(acq, bounds: torch.Tensor, q: int, n: int, seed: int, raw: int = 256, eta: float = 2.0) -> torch.Tensor:
    """``optimize_acqf``'s default start points, seeded: ``n`` of ``raw`` Sobol q-batches inside
    ``bounds`` ``(2, d)`` drawn ∝ exp(η·z(acq)), the best kept."""
    d = bounds.shape[-1]
    Xr = torch.quasirandom.SobolEngine(q * d, scramble=True, seed=seed).draw(raw, dtype=torch.double).view(raw, q, d)
    Xr = bounds[0] + (bounds[1] - bounds[0]) * Xr
    with torch.no_grad():
        v = acq(Xr)
    w = torch.exp(eta * (v - v.mean()) / v.std().clamp_min(1e-9))
    idx = torch.multinomial(w, n, generator=torch.Generator().manual_seed(seed))
    if not bool((idx == v.argmax()).any()):
        idx[-1] = v.argmax()
    return Xr[idx]


class _TPE:
    """Optuna's TPE sampler driven by ask/tell (re-told from the trial list on resume)."""

    def __init__(self, space: SearchSpace, done: list[dict]):
        try:
            import optuna
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("method 'tpe' needs Optuna: pip install optuna") from e

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.space = optuna, space
        self.dist = {p.key: optuna.distributions.FloatDistribution(p.low, p.high, log=p.log) for p in space.parameters}
        self.study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=space.seed))
        for t in done:
            self.tell(t)

    def tell(self, t: dict) -> None:
        """Add a finished trial; an infeasible one (:meth:`SearchSpace.feasible`) counts as Dice 0."""
        val = t["dice"] if self.space.feasible(t) else 0.0
        self.study.add_trial(self.optuna.trial.create_trial(params=dict(t["params"]), distributions=self.dist, value=val))

    def ask(self, space: SearchSpace) -> list[float]:
        tr = self.study.ask(self.dist)
        x = [p.to_unit(tr.params[p.key]) for p in space.parameters]
        self.study.tell(tr, state=self.optuna.trial.TrialState.FAIL)  # the real result is added by tell()
        return x


def _save_state(path: Path, space: SearchSpace, method: str, trials: list[dict]) -> None:
    atomic_write_text(path, json.dumps({"method": method, "space": to_dict(space), "trials": trials}, indent=2,
                                       allow_nan=True))


def _run_one(fn: Callable[[SearchSpace, dict], dict], space: SearchSpace, params: dict) -> dict:
    t0 = time.perf_counter()
    try:
        r = fn(space, params)
        out = {"status": "done", **{k: float(r[k]) for k in ("dice", "folding", "sdlogj")}}
        if not all(math.isfinite(out[k]) for k in ("dice", "folding", "sdlogj")):
            out = {"status": "failed", "error": f"non-finite result {r}"}
    except Exception as e:  # noqa: BLE001 -- a failed trial is recorded, the run goes on
        out = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    out["seconds"] = time.perf_counter() - t0
    return out


MAX_INTEGER_VALUES = 64
"""An integer parameter spanning at most this many values has each of them checked by the solver before
any trial (:func:`run_tuning`)."""


def run_tuning(
    space: SearchSpace,
    objective: Callable[[SearchSpace, dict], dict],
    n_trials: int,
    out_dir: str | os.PathLike,
    *,
    method: str = "botorch",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | None = None,
) -> TuningResult:
    """Run (or resume) a tuning loop until ``n_trials`` trials have finished.

    Args:
        space: the :class:`SearchSpace`.
        objective: ``objective(space, params) -> {"dice", "folding", "sdlogj"}``; picklable
            (a module-level function or a ``functools.partial`` of one) when ``space.workers > 1``
            (it runs in worker processes).
        n_trials: finished trials (done or failed) to reach.
        out_dir: folder of ``trials.json`` (and the caller's outputs).
        method: ``"botorch"``, ``"turbo"`` (trust-region BO), ``"random"`` or ``"tpe"``
            (Optuna, optional dependency).
        resume: continue from ``out_dir/trials.json``: finished trials are kept, pending
            candidates are evaluated first.
        stop_after: stop once this many trials have finished (an interruption, for tests).
        device: where ``objective`` runs (``hybridreg tune --device``), recorded with each trial
            this call evaluates (``trials.json``): a run resumed on another device says so per trial.
        progress: show a bar of the finished trials (a terminal) or log one line per trial
            (:mod:`hybridreg.progress`).

    Returns:
        :class:`TuningResult`.

    Raises:
        ValueError: unknown ``method``, ``n_trials < 1``, ``train_data`` in a space whose
            solver is not ``learned`` (its trials score the bundled pairs) or that does not open
            (:func:`hybridreg.data.sources.load_dataset`), a space the solver refuses at
            its lowest or highest values (a conditional network's training ranges) or at any value of a short
            integer range (:data:`MAX_INTEGER_VALUES`), a fresh run into a folder that
            already holds one of :data:`RUN_FILES`, or a resume whose saved space or method differs.
        ImportError: ``method="tpe"`` without Optuna installed.
    """
    from ..progress import bar as progress_bar, log

    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}")
    if n_trials < 1:
        raise ValueError(f"`n_trials` (`--trials`) must be >= 1, got {n_trials}")
    if space.train_data != "bundled" and space.solver != "learned":
        raise ValueError(f"search space: `train_data` is the learned solver's training data; the {space.solver} solver's"
                         " trials score the bundled validation pairs (`resolution`, `max_pairs`, `synth_contrasts`)")
    if space.train_data != "bundled":  # opened once before any trial: a bad path fails here, not in every trial
        from ..data.sources import load_dataset

        try:
            load_dataset(space.train_data, arg="train_data")
        except (OSError, ValueError) as e:
            raise ValueError(f"search space: {e}") from None
    if space.solver != "learned":  # the solver's own checks (a conditional network's ranges) at both corners
        solver = get_solver(space.solver)

        def check(params: dict, what: str) -> None:
            try:
                solver.configure(apply_params(space, params))
            except ValueError as e:
                raise ValueError(f"search space: {what}: {e}") from None

        for corner, u in (("low", 0.0), ("high", 1.0)):  # the values trials can take (an integer step's last one)
            check({p.key: p.from_unit(u) for p in space.parameters}, f"every `{corner}` of the parameters together")
        mid = {p.key: p.from_unit(0.5) for p in space.parameters}
        for p in space.parameters:  # every value of a short integer range (an even LNCC window among odd ones)
            if p.integer and p.high - p.low <= MAX_INTEGER_VALUES:
                for v in sorted({p.from_unit(k / (8 * MAX_INTEGER_VALUES)) for k in range(8 * MAX_INTEGER_VALUES + 1)}):
                    check({**mid, p.key: v}, f"`{p.key}` can take {v:g}, which the solver refuses (narrow its range or"
                          " give it a `step`)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    state = Path(out_dir) / "trials.json"
    trials: list[dict] = []
    if resume and state.is_file():
        try:
            saved = json.loads(state.read_text(encoding="utf-8"))
            saved["method"], saved["space"], saved["trials"]  # noqa: B018 -- the keys a resume reads
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
            raise ValueError(f"`resume` (`--resume`): {state} cannot be read as a tuning run's state ({type(e).__name__});"
                             " it is left as it is: restore it, or start a new run in another `out_dir` (`--out`)") from None
        # compare as dataclasses, so that fields added later with defaults do not break a resume
        if saved["method"] != method or from_dict(SearchSpace, saved["space"], where=str(state)) != space:
            raise ValueError(f"`resume` (`--resume`): {state} was written with another method or search space")
        trials = saved["trials"]
    elif resume:
        raise ValueError(f"`resume` (`--resume`): {state} does not exist")
    elif held := sorted(n for n in RUN_FILES if (Path(out_dir) / n).exists()):
        raise ValueError(f"{out_dir} already holds a tuning run's files ({', '.join(held)}); pass `resume` (`--resume`) to"
                         " continue that run or choose a new `out_dir` (`--out`)")

    d = len(space.parameters)
    sobol = torch.quasirandom.SobolEngine(d, scramble=True, seed=space.seed).draw(space.initial_trials, dtype=torch.double)
    tpe = None
    limit = n_trials if stop_after is None else min(n_trials, stop_after)
    finished = lambda: sum(t["status"] != "pending" for t in trials)  # noqa: E731
    bar = progress_bar(total=n_trials, initial=finished(), desc=f"tune ({method})", enabled=progress, dynamic_ncols=True)
    pool = cf.ProcessPoolExecutor(space.workers, mp_context=mp.get_context("spawn")) if space.workers > 1 else None
    try:
        while finished() < limit:
            pending = [t for t in trials if t["status"] == "pending"]
            if not pending:
                q = min(space.batch_size, n_trials - finished())
                done = [t for t in trials if t["status"] == "done"]
                n_prop = len(trials)
                if method == "tpe":
                    tpe = tpe or _TPE(space, done)
                    xs = torch.tensor([tpe.ask(space) for _ in range(q)], dtype=torch.double)
                elif method in ("botorch", "turbo") and n_prop < space.initial_trials:
                    xs = sobol[n_prop:n_prop + q]
                elif method in ("botorch", "turbo") and len(done) >= 2:
                    xs = _propose_botorch(space, done, q, space.seed + n_prop,
                                          turbo_length(space, trials) if method == "turbo" else None)
                else:  # random search (one generator per trial index: the same draws after a resume)
                    xs = torch.stack([torch.rand(d, generator=torch.Generator().manual_seed(space.seed * 100_003 + n_prop + i),
                                                 dtype=torch.double) for i in range(q)])
                for x in xs.tolist():
                    params = {p.key: p.from_unit(u) for p, u in zip(space.parameters, x)}
                    trials.append({"id": len(trials), "params": params, "x": [p.to_unit(params[p.key]) for p in space.parameters],
                                   "status": "pending", "method": method})
                _save_state(state, space, method, trials)
                pending = [t for t in trials if t["status"] == "pending"]
            if pool is None:
                results = ((t, _run_one(objective, space, t["params"])) for t in pending)
            else:
                futs = {pool.submit(_run_one, objective, space, t["params"]): t for t in pending}
                results = ((futs[f], f.result()) for f in cf.as_completed(futs))
            for t, r in results:
                t.update(r, **({"device": device} if device else {}))
                _save_state(state, space, method, trials)
                if tpe is not None and t["status"] == "done":
                    tpe.tell(t)
                bar.update(1)
                b = best_trial(trials, space)
                bar.set_postfix(best=f"{b['dice']:.4f}" if b else "-", refresh=False)
                log(f"trial {t['id']} {t['status']} ({finished()} of {n_trials})"
                    + (f", best Dice {b['dice']:.4f}" if b else ""), enabled=progress)
                if finished() >= limit:
                    break
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return TuningResult(trials, best_trial(trials, space), pareto_front(trials, space))
