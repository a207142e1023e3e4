"""Hyperparameter tuning by Gaussian-process Bayesian optimization (BoTorch), with random
search and Optuna's TPE (the method authors' tuner, method §2.4) as baselines.

The search space is declared in YAML (:func:`load_space`): dotted keys of the solver's
config (``objective.w_reg``, ``lr``, ``iterations``, ...) with bounds and a log flag. Each
trial sets those keys on the base config and measures, on validation pairs,

* ``dice`` -- mean Dice (the objective, maximised),
* ``folding`` -- the largest %|J|≤0 over the pairs (outcome constraint ``folding ≤ τ``),
* ``sdlogj`` -- mean SDlogJ (the second objective in Pareto mode).

BoTorch loop (``method="botorch"``): a scrambled Sobol initial design, then per round a
``SingleTaskGP`` per outcome set on inputs normalised to the unit cube (log scale for
``log: true`` parameters) with standardised outcomes (``Standardize``), fitted by
``fit_gpytorch_mll``; candidates are a batch of ``q = batch_size`` points maximising
``qLogNoisyExpectedImprovement`` of Dice with the folding constraint, or in Pareto mode
``qLogNoisyExpectedHypervolumeImprovement`` of (Dice, −SDlogJ) with the same constraint. The
``q`` candidates are evaluated in parallel worker processes.

State: ``trials.json`` in the output folder is rewritten atomically after every finished
trial; candidates proposed but not finished are stored as ``pending`` and evaluated first
on ``resume``, so a killed run loses no finished trial and wastes no proposal.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import json
import math
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from .config import atomic_output, atomic_write_text, dump_yaml, from_dict, read_yaml, to_dict

__all__ = ["Parameter", "SearchSpace", "load_space", "space_from_dict", "run_tuning", "TuningResult", "apply_params",
           "best_trial", "pareto_front", "METHODS", "base_params"]

METHODS = ("botorch", "random", "tpe")

SOLVER_CONFIGS = {
    "instance": ("instance_opt", "InstanceOptConfig"),
    "learned": ("learned.train", "TrainConfig"),
}
"""Tuned solver → (module, config class). Modules are imported only when a space is used
(the core never imports a solver at import time)."""


@dataclass(frozen=True)
class Parameter:
    """One tuned value: ``key`` a dotted path into the solver config; ``low``/``high``
    bounds; ``log`` search on a log scale (for values spanning decades); ``integer`` round;
    ``step`` > 0 keeps only ``low + k·step`` (e.g. odd LNCC windows: low 5, step 2).
    For a list-valued key (``iterations``) the value sets the first entry and every other
    entry is scaled by the same factor (:func:`apply_params`)."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False
    step: float = 0.0

    def to_unit(self, value: float) -> float:
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)

    def from_unit(self, u: float) -> float:
        u = min(max(float(u), 0.0), 1.0)
        v = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))) if self.log else \
            self.low + u * (self.high - self.low)
        if self.step > 0:
            k = min(round((v - self.low) / self.step), math.floor((self.high - self.low) / self.step + 1e-9))
            v = self.low + k * self.step
        return float(round(v)) if self.integer else v


@dataclass(frozen=True)
class SearchSpace:
    """A tuning problem (the YAML file, :func:`load_space`).

    Attributes:
        solver: ``"instance"`` or ``"learned"``.
        parameters: the tuned values.
        base_config: the solver config the parameters are set on (a mapping in the
            config's YAML form; empty = the solver's defaults).
        mode: ``"single"`` (maximise Dice under the folding constraint) or ``"pareto"``
            (Dice against SDlogJ).
        folding_max: τ, the largest admissible %|J|≤0 (percent of voxels).
        batch_size: q, candidates per BO round (evaluated in parallel).
        initial_trials: Sobol points before the GP takes over.
        workers: parallel worker processes (1 = in process).
        seed: seeds the Sobol design, random search, TPE and the acquisition optimiser.
        resolution: bundled-data resolution of the validation pairs (mm).
        max_pairs: use only the first N validation pairs (0 = all).
        train_data: the learned solver's training data (``bundled`` or a manifest/folder).
    """

    solver: Literal["instance", "learned"] = "instance"
    parameters: tuple[Parameter, ...] = ()
    base_config: dict = field(default_factory=dict)
    mode: Literal["single", "pareto"] = "single"
    folding_max: float = 0.1
    batch_size: int = 1
    initial_trials: int = 6
    workers: int = 1
    seed: int = 0
    resolution: int = 2
    max_pairs: int = 0
    train_data: str = "bundled"

    def __post_init__(self) -> None:
        if not self.parameters:
            raise ValueError("search space: `parameters` must list at least one parameter")
        for name in ("batch_size", "initial_trials", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"search space: `{name}` must be >= 1, got {getattr(self, name)!r}")
        if self.folding_max < 0:
            raise ValueError(f"search space: `folding_max` must be >= 0, got {self.folding_max!r}")
        if self.solver not in SOLVER_CONFIGS:
            raise ValueError(f"search space: `solver` must be one of {sorted(SOLVER_CONFIGS)}, got {self.solver!r}")


def _config_class(solver: str):
    module, name = SOLVER_CONFIGS[solver]
    return getattr(importlib.import_module(module), name)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _get_dotted(d: dict, key: str) -> Any:
    for p in key.split("."):
        d = d[p]
    return d


def _base_dict(space: SearchSpace) -> dict:
    """The base config, validated and completed with the solver's defaults, as a mapping."""
    return to_dict(from_dict(_config_class(space.solver), space.base_config, where="base_config"))


def apply_params(space: SearchSpace, params: dict[str, float]):
    """The solver config for one trial: the base config with ``params`` set.

    A parameter whose key holds a list (e.g. ``iterations``) scales every entry by
    ``value / first entry`` of the base, keeping the schedule's shape.

    Raises:
        ValueError: a key that the solver config does not have, or a value it rejects
            (the message names the key).
    """
    cls = _config_class(space.solver)
    full = _base_dict(space)
    for p in space.parameters:
        v = params[p.key]
        try:
            cur = _get_dotted(full, p.key)
        except (KeyError, TypeError):
            raise ValueError(f"search space: `{p.key}` is not a key of the {space.solver} solver's config") from None
        if isinstance(cur, list):
            base = cur[0] if cur and cur[0] else 1
            v = [int(round(c * v / base)) if isinstance(c, int) else c * v / base for c in cur]
        elif isinstance(cur, int) and not isinstance(cur, bool):
            v = int(round(v))
        _set_dotted(full, p.key, v)
    return from_dict(cls, full, where="config")


def base_params(space: SearchSpace) -> dict[str, float]:
    """The tuned keys' values in the base config (the solver's defaults unless the space
    sets ``base_config``; the first entry of a list key): the "default" trial, for which
    ``apply_params(space, base_params(space))`` is the base config itself."""
    full = _base_dict(space)
    out = {}
    for p in space.parameters:
        v = _get_dotted(full, p.key)
        out[p.key] = float(v[0] if isinstance(v, list) else v)
    return out


def space_from_dict(data: Any, where: str = "space") -> SearchSpace:
    """Build a :class:`SearchSpace` from its YAML mapping; ``parameters`` is a mapping
    ``key: {low, high[, log, integer, step]}``.

    Raises:
        ValueError: anything malformed, naming the key (bounds not ``0 < low < high`` on a
            log scale or ``low < high`` otherwise, unknown keys, a parameter the solver
            config does not have).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    raw = data.get("parameters")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}.parameters must be a mapping of config keys to {{low, high, log}}")
    params = []
    for key, spec in raw.items():
        p = from_dict(Parameter, {"key": key, **(spec if isinstance(spec, dict) else {"low": spec})}, where=f"{where}.parameters.{key}")
        if not p.low < p.high:
            raise ValueError(f"{where}.parameters.{key}: `low` must be below `high`, got {p.low} and {p.high}")
        if p.step < 0 or p.step > p.high - p.low:
            raise ValueError(f"{where}.parameters.{key}: `step` must be in [0, high - low], got {p.step}")
        if p.log and p.low <= 0:
            raise ValueError(f"{where}.parameters.{key}: a log-scale parameter needs low > 0, got {p.low}")
        params.append(p)
    rest = {k: v for k, v in data.items() if k != "parameters"}
    space = _build_space(rest, tuple(params), where)
    mid = {p.key: p.from_unit(0.5) for p in params}
    apply_params(space, mid)  # every key exists and the config accepts mid-range values
    return space


def _build_space(fields: dict, params: tuple[Parameter, ...], where: str) -> SearchSpace:
    import dataclasses

    known = {f.name for f in dataclasses.fields(SearchSpace)} - {"parameters"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known | {'parameters'})}")
    base = fields.get("base_config", {}) or {}
    if not isinstance(base, dict):
        raise ValueError(f"{where}.base_config must be a mapping")
    stripped = {k: v for k, v in fields.items() if k != "base_config"}
    tmp = from_dict(SearchSpace, {**stripped, "parameters": [{"key": "x", "low": 0, "high": 1}]}, where=where)
    return replace(tmp, parameters=params, base_config=base)


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Read a search-space YAML file (:func:`space_from_dict`).

    Raises:
        FileNotFoundError: missing file (names ``--space``). ValueError: invalid YAML or
            content.
    """
    return space_from_dict(read_yaml(path, arg="--space"), where="--space")


# ----------------------------------------------------------------------------- results

@dataclass
class TuningResult:
    """Trials of a run (``trials.json``) and its summary.

    Attributes:
        trials: every trial, in order: ``id``, ``params``, ``x`` (unit cube), ``status``
            (``done``, ``failed``, ``pending``), ``dice``, ``folding``, ``sdlogj``,
            ``seconds``.
        best: the best feasible finished trial (max Dice with folding ≤ τ) or ``None``.
        pareto: finished feasible trials on the Dice/SDlogJ Pareto front.
    """

    trials: list[dict]
    best: dict | None
    pareto: list[dict]


def _feasible(trials: list[dict], tau: float) -> list[dict]:
    return [t for t in trials if t["status"] == "done" and t["folding"] <= tau]


def best_trial(trials: list[dict], tau: float) -> dict | None:
    """Max Dice among finished trials with folding ≤ τ (ties: lower SDlogJ)."""
    ok = _feasible(trials, tau)
    return max(ok, key=lambda t: (t["dice"], -t["sdlogj"])) if ok else None


def pareto_front(trials: list[dict], tau: float) -> list[dict]:
    """Feasible finished trials not dominated in (max Dice, min SDlogJ), by Dice."""
    from botorch.utils.multi_objective.pareto import is_non_dominated

    ok = _feasible(trials, tau)
    if not ok:
        return []
    y = torch.tensor([[t["dice"], -t["sdlogj"]] for t in ok], dtype=torch.double)
    mask = is_non_dominated(y)
    return sorted((t for t, m in zip(ok, mask.tolist()) if m), key=lambda t: t["dice"])


def best_so_far(trials: list[dict], tau: float) -> list[float]:
    """Best feasible Dice after each finished trial (NaN before the first feasible one)."""
    out, best = [], float("nan")
    for t in trials:
        if t["status"] == "done" and t["folding"] <= tau and not (t["dice"] <= best):
            best = t["dice"]
        if t["status"] != "pending":
            out.append(best)
    return out


# ----------------------------------------------------------------------------- proposals

def _sobol(d: int, n: int, seed: int) -> torch.Tensor:
    return torch.quasirandom.SobolEngine(d, scramble=True, seed=seed).draw(n, dtype=torch.double)


def _fit_models(X: torch.Tensor, Y: torch.Tensor):
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    import warnings

    from botorch.exceptions.warnings import InputDataWarning

    with warnings.catch_warnings():
        # an outcome can be constant (no trial folds): Standardize then keeps its scale at 1
        warnings.simplefilter("ignore", InputDataWarning)
        model = SingleTaskGP(X, Y, outcome_transform=Standardize(m=Y.shape[-1]))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
    return model


def _propose_botorch(space: SearchSpace, done: list[dict], q: int, seed: int) -> torch.Tensor:
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.acquisition.multi_objective.objective import IdentityMCMultiOutputObjective
    from botorch.acquisition.objective import GenericMCObjective
    from botorch.optim import optimize_acqf

    d = len(space.parameters)
    X = torch.tensor([t["x"] for t in done], dtype=torch.double)
    tau = space.folding_max
    bounds = torch.stack([torch.zeros(d, dtype=torch.double), torch.ones(d, dtype=torch.double)])
    torch.manual_seed(seed)
    if space.mode == "single":
        Y = torch.tensor([[t["dice"], t["folding"]] for t in done], dtype=torch.double)
        model = _fit_models(X, Y)
        acq = qLogNoisyExpectedImprovement(
            model, X_baseline=X, objective=GenericMCObjective(lambda Z, X=None: Z[..., 0]),
            constraints=[lambda Z: Z[..., 1] - tau], prune_baseline=True,
        )
    else:
        Y = torch.tensor([[t["dice"], -t["sdlogj"], t["folding"]] for t in done], dtype=torch.double)
        model = _fit_models(X, Y)
        ref = Y[:, :2].min(dim=0).values - 0.1 * (Y[:, :2].max(dim=0).values - Y[:, :2].min(dim=0).values).clamp_min(1e-3)
        acq = qLogNoisyExpectedHypervolumeImprovement(
            model, ref_point=ref.tolist(), X_baseline=X, objective=IdentityMCMultiOutputObjective(outcomes=[0, 1]),
            constraints=[lambda Z: Z[..., 2] - tau], prune_baseline=True,
        )
    cand, _ = optimize_acqf(acq, bounds=bounds, q=q, num_restarts=8, raw_samples=256)
    return cand.detach()


class _TPE:
    """Optuna's TPE sampler driven by ask/tell (re-told from the trial list on resume)."""

    def __init__(self, space: SearchSpace, done: list[dict]):
        try:
            import optuna
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("method 'tpe' needs Optuna: pip install optuna") from e

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.tau = optuna, space.folding_max
        self.dist = {p.key: optuna.distributions.FloatDistribution(p.low, p.high, log=p.log) for p in space.parameters}
        self.study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=space.seed))
        for t in done:
            self.tell(t)

    def tell(self, t: dict) -> None:
        """Add a finished trial; an infeasible one (folding > τ) counts as Dice 0."""
        val = t["dice"] if t["folding"] <= self.tau else 0.0
        self.study.add_trial(self.optuna.trial.create_trial(params=dict(t["params"]), distributions=self.dist, value=val))

    def ask(self, space: SearchSpace) -> list[float]:
        tr = self.study.ask(self.dist)
        x = [p.to_unit(tr.params[p.key]) for p in space.parameters]
        self.study.tell(tr, state=self.optuna.trial.TrialState.FAIL)  # the real result is added by tell()
        return x


# ----------------------------------------------------------------------------- the loop

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
) -> TuningResult:
    """Run (or resume) a tuning loop until ``n_trials`` trials have finished.

    Args:
        space: the :class:`SearchSpace`.
        objective: ``objective(space, params) -> {"dice", "folding", "sdlogj"}``; a
            module-level function when ``space.workers > 1`` (it runs in worker processes).
        n_trials: finished trials (done or failed) to reach.
        out_dir: folder of ``trials.json`` (and the caller's outputs).
        method: ``"botorch"``, ``"random"`` or ``"tpe"`` (Optuna, optional dependency).
        resume: continue from ``out_dir/trials.json``: finished trials are kept, pending
            candidates are evaluated first.
        stop_after: stop once this many trials have finished (an interruption, for tests).

    Returns:
        :class:`TuningResult`.

    Raises:
        ValueError: unknown ``method``, ``n_trials < 1``, a fresh run into a folder that
            already holds ``trials.json``, or a resume whose saved space or method differs.
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}")
    if n_trials < 1:
        raise ValueError(f"`--trials` must be >= 1, got {n_trials}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = out / "trials.json"
    trials: list[dict] = []
    if resume and state.is_file():
        saved = json.loads(state.read_text())
        # compare as dataclasses, so that fields added later with defaults do not break a resume
        if saved["method"] != method or from_dict(SearchSpace, saved["space"], where=str(state)) != space:
            raise ValueError(f"`--resume`: {state} was written with another method or search space")
        trials = saved["trials"]
    elif resume:
        raise ValueError(f"`--resume`: {state} does not exist")
    elif state.exists():
        raise ValueError(f"{state} exists; pass --resume to continue that run or choose a new --out")

    d = len(space.parameters)
    sobol = _sobol(d, space.initial_trials, space.seed)
    tpe = None
    limit = n_trials if stop_after is None else min(n_trials, stop_after)
    finished = lambda: sum(t["status"] != "pending" for t in trials)  # noqa: E731
    bar = tqdm(total=n_trials, initial=finished(), desc=f"tune ({method})", disable=not progress, dynamic_ncols=True)
    ctx = mp.get_context("spawn")
    pool = cf.ProcessPoolExecutor(space.workers, mp_context=ctx) if space.workers > 1 else None
    try:
        while finished() < limit:
            pending = [t for t in trials if t["status"] == "pending"]
            if not pending:
                room = n_trials - finished()
                q = min(space.batch_size, room)
                done = [t for t in trials if t["status"] == "done"]
                n_prop = len(trials)
                if method == "tpe":
                    tpe = tpe or _TPE(space, done)
                    xs = torch.tensor([tpe.ask(space) for _ in range(q)], dtype=torch.double)
                elif method == "botorch" and n_prop < space.initial_trials:
                    xs = sobol[n_prop:n_prop + q]
                elif method == "botorch" and len(done) >= 2:
                    xs = _propose_botorch(space, done, q, space.seed + n_prop)
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
                t.update(r)
                _save_state(state, space, method, trials)
                if tpe is not None and t["status"] == "done":
                    tpe.tell(t)
                bar.update(1)
                b = best_trial(trials, space.folding_max)
                bar.set_postfix(best=f"{b['dice']:.4f}" if b else "-", refresh=False)
                if finished() >= limit:
                    break
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return TuningResult(trials, best_trial(trials, space.folding_max), pareto_front(trials, space.folding_max))


# ----------------------------------------------------------------------------- objectives

def _score_pairs(register: Callable, pairs: list, spacing) -> dict:
    """Mean Dice (standard structures present in both maps), max %|J|≤0, mean SDlogJ."""
    from .data import evaluation_labels_in
    from .metrics import common_labels, dice, jacobian_stats
    from .spatial import warp

    dices, folds, sds = [], [], []
    for f, m in pairs:
        disp = register(f, m)
        wl = warp(torch.from_numpy(m.labels)[None, None], disp, mode="nearest")[0, 0].numpy()
        common = common_labels(f.labels, m.labels)
        labs = list(evaluation_labels_in(common)) or list(common)
        dices.append(float(np.mean(list(dice(f.labels, wl, labs).values()))))
        js = jacobian_stats(disp)
        folds.append(js["folding_percent"])
        sds.append(js["sdlogj"])
    return {"dice": float(np.mean(dices)), "folding": float(np.max(folds)), "sdlogj": float(np.mean(sds))}


def _pairs(space: SearchSpace, split: str):
    from .data.sources import bundled

    ds = bundled(space.resolution)
    pairs = ds.pairs(split)
    return (pairs[: space.max_pairs] if space.max_pairs else pairs), ds


def instance_objective(space: SearchSpace, params: dict, split: str = "val") -> dict:
    """Trial of the instance solver: register every bundled pair of ``split`` (atlas ←
    subject, ``space.resolution`` mm; ``"val"`` while tuning, ``"test"`` to check the
    chosen configuration) with the trial's config; returns mean Dice, max %|J|≤0 and mean
    SDlogJ."""
    register_pair = importlib.import_module("instance_opt").register_pair
    cfg = replace(apply_params(space, params), progress=False)
    pairs, ds = _pairs(space, split)

    def reg(f, m):
        ft, mt = (torch.from_numpy(v.image)[None, None] for v in (f, m))
        return register_pair(ft, mt, cfg, spacing=ds.spacing).displacement

    return _score_pairs(reg, pairs, ds.spacing)


def learned_objective(space: SearchSpace, params: dict, split: str = "val") -> dict:
    """Trial of the learned solver: train with the trial's config (its ``steps`` is the
    per-trial training budget) on ``space.train_data``, then score the network on the
    bundled pairs of ``split``."""
    import tempfile

    train_mod = importlib.import_module("learned.train")
    from .data.sources import load_dataset

    cfg = apply_params(space, params)
    data = load_dataset(space.train_data)
    pairs, ds = _pairs(space, split)
    with tempfile.TemporaryDirectory() as tmp:
        net = train_mod.train(cfg, data, Path(tmp) / "run", progress=False)
    net.eval()

    def reg(f, m):
        ft, mt = (torch.from_numpy(v.image)[None, None] for v in (f, m))
        return train_mod.predict(net, ft, mt, cfg.objective, ds.spacing)[1].displacement

    return _score_pairs(reg, pairs, ds.spacing)


OBJECTIVES = {"instance": instance_objective, "learned": learned_objective}


# ----------------------------------------------------------------------------- outputs

def partial_dependence(space: SearchSpace, trials: list[dict], n: int = 41) -> dict[str, tuple[list, list, list]]:
    """GP partial dependence of Dice on each parameter: a ``SingleTaskGP`` on the finished
    trials; for each parameter its value sweeps the range while the others take the
    observed trials' values, and the posterior mean (and sd) is averaged over them.

    Returns:
        ``{key: (values, mean, sd)}``; empty with fewer than 3 finished trials.
    """
    done = [t for t in trials if t["status"] == "done"]
    if len(done) < 3:
        return {}
    X = torch.tensor([t["x"] for t in done], dtype=torch.double)
    Y = torch.tensor([[t["dice"]] for t in done], dtype=torch.double)
    model = _fit_models(X, Y)
    grid = torch.linspace(0, 1, n, dtype=torch.double)
    out = {}
    with torch.no_grad():
        for k, p in enumerate(space.parameters):
            means, sds = [], []
            for u in grid:
                Xk = X.clone()
                Xk[:, k] = u
                post = model.posterior(Xk)
                means.append(float(post.mean.mean()))
                sds.append(float(post.variance.clamp_min(0).sqrt().mean()))
            out[p.key] = ([p.from_unit(float(u)) for u in grid], means, sds)
    return out


def tuning_figures(space: SearchSpace, trials: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """``best_so_far.png``, ``pareto.png`` (Dice against SDlogJ, feasible and infeasible
    trials, the front) and ``partial_dependence.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths = []
    tau = space.folding_max

    def save(fig, name):
        with atomic_output(out / name) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bsf = best_so_far(trials, tau)
    ax.plot(range(1, len(bsf) + 1), bsf, "o-", ms=3)
    ax.set(xlabel="finished trials", ylabel="best validation Dice", title=f"best so far (folding ≤ {tau:g}%)")
    fig.tight_layout()
    save(fig, "best_so_far.png")

    fig, ax = plt.subplots(figsize=(5, 3.8))
    done = [t for t in trials if t["status"] == "done"]
    ok = [t for t in done if t["folding"] <= tau]
    bad = [t for t in done if t["folding"] > tau]
    ax.scatter([t["sdlogj"] for t in ok], [t["dice"] for t in ok], s=18, label="feasible")
    if bad:
        ax.scatter([t["sdlogj"] for t in bad], [t["dice"] for t in bad], s=18, marker="x", color="C3", label=f"folding > {tau:g}%")
    front = pareto_front(trials, tau)
    if front:
        ax.step([t["sdlogj"] for t in front], [t["dice"] for t in front], "k-", where="post", lw=1, label="Pareto front")
    ax.set(xlabel="SDlogJ (lower = smoother)", ylabel="mean validation Dice", title="Dice against regularity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, "pareto.png")

    pd = partial_dependence(space, trials)
    if pd:
        fig, axes = plt.subplots(1, len(pd), figsize=(4 * len(pd), 3.3), squeeze=False)
        for ax, p in zip(axes[0], space.parameters):
            xs, m, s = pd[p.key]
            m, s = np.array(m), np.array(s)
            ax.plot(xs, m)
            ax.fill_between(xs, m - s, m + s, alpha=0.2)
            ax.scatter([t["params"][p.key] for t in done], [t["dice"] for t in done], s=8, color="0.4")
            if p.log:
                ax.set_xscale("log")
            ax.set(xlabel=p.key, ylabel="Dice (GP mean)")
        fig.suptitle("GP partial dependence")
        fig.tight_layout()
        save(fig, "partial_dependence.png")
    return paths


def write_outputs(space: SearchSpace, result: TuningResult, out_dir: str | os.PathLike) -> dict:
    """Write ``best_config.yaml`` (the solver config of the best trial; ``hybridreg
    register --config`` / ``hybridreg train --config`` accept it), ``pareto.json``,
    ``summary.json`` and the figures. Returns the summary."""
    out = Path(out_dir)
    if result.best is not None:
        dump_yaml(apply_params(space, result.best["params"]), out / "best_config.yaml")
    atomic_write_text(out / "pareto.json", json.dumps(result.pareto, indent=2))
    summary = {
        "finished": sum(t["status"] in ("done", "failed") for t in result.trials),
        "failed": sum(t["status"] == "failed" for t in result.trials),
        "best": result.best,
        "best_so_far": best_so_far(result.trials, space.folding_max),
        "pareto_size": len(result.pareto),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=True))
    tuning_figures(space, result.trials, out)
    return summary
