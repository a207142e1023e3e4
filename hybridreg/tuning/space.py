"""The search space, declared in YAML (:func:`load_space`): dotted keys of the tuned config
(``objective.w_reg``, ``lr``, ``iterations``, ...) with bounds and a log flag, and the loop's
settings; :func:`apply_params` builds a trial's config. The tuned config is the instance
solver's (``get_solver("instance").config_class``) or the learned solver's training config.
"""

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..config import bounded, check_bounds, from_dict, mapping_key, read_yaml, to_dict
from ..solvers import get_solver

SOLVERS = ("instance", "learned", "learned-conditional")  # the tuned config of each: :func:`_config_class`


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
        solver: ``"instance"``, ``"learned"`` (each trial trains a network) or
            ``"learned-conditional"`` (each trial is a forward pass of the conditional network at
            the trial's ``objective.w_reg``, ``objective.hyper_strength`` and region weights
            ``region_lambda.<label>``: test-time tuning, method §3.3).
        parameters: the tuned values.
        base_config: the solver config the parameters are set on (a mapping in the
            config's YAML form; empty = the solver's defaults).
        mode: ``"single"`` (maximise Dice under the folding constraint) or ``"pareto"``
            (Dice against SDlogJ).
        folding_max: τ, the largest admissible %|J|≤0 (percent of voxels).
        sdlogj_max: the largest admissible mean SDlogJ (0: no bound), a second constraint:
            Dice under a regularity bound, so that no setting buys Dice with an irregular
            deformation (issue 17; the suite compares methods at equal SDlogJ).
        batch_size: q, candidates per BO round (evaluated in parallel).
        initial_trials: Sobol points before the GP takes over.
        workers: parallel worker processes (1 = in process).
        seed: seeds the Sobol design, random search, TPE and the acquisition optimiser.
        resolution: bundled-data resolution of the validation pairs (mm).
        max_pairs: use only the first N validation pairs (0 = all).
        synth_contrasts: each of those pairs is also scored this many times with both images
            drawn from their label maps (:func:`hybridreg.synthesis.synthesize`, SynthMorph's
            random contrasts, seeded by ``seed``), so that the tuned settings do not fit the
            bundled images' one contrast (0: the bundled images only).
        train_data: the learned solver's training data (``bundled`` or a manifest/folder).
    """

    solver: Literal["instance", "learned", "learned-conditional"] = "instance"
    parameters: tuple[Parameter, ...] = ()
    base_config: dict = field(default_factory=dict)
    mode: Literal["single", "pareto"] = "single"
    folding_max: float = bounded(0.1, 0.0, 100.0)
    sdlogj_max: float = bounded(0.0, 0.0, 10.0)
    batch_size: int = bounded(1, 1, 64)
    initial_trials: int = bounded(6, 1, 1000)
    workers: int = bounded(1, 1, 64)
    seed: int = bounded(0, 0, 2**31 - 1)
    resolution: int = bounded(2, 1, 2)
    max_pairs: int = bounded(0, 0, 10_000)
    synth_contrasts: int = bounded(1, 0, 16)
    train_data: str = "bundled"

    def __post_init__(self) -> None:
        if not self.parameters:
            raise ValueError("search space: `parameters` must list at least one parameter")
        check_bounds(self)
        if self.solver not in SOLVERS:
            raise ValueError(f"search space: `solver` must be one of {list(SOLVERS)}, got {self.solver!r}")

    def feasible(self, trial: dict) -> bool:
        """Whether a finished trial (``{"folding", "sdlogj", ...}``) meets the constraints:
        %|J|≤0 ≤ ``folding_max`` and, when ``sdlogj_max`` > 0, SDlogJ ≤ ``sdlogj_max``."""
        return trial["folding"] <= self.folding_max and (self.sdlogj_max == 0 or trial["sdlogj"] <= self.sdlogj_max)

    def why_infeasible(self, trials: list[dict]) -> str:
        """Why none of ``trials`` is feasible, for a run that has no best trial: how many
        failed (with the first error) and how many broke each bound, e.g. ``"SDlogJ > 0.01 in
        2 of 2 finished trials"``."""
        done = [t for t in trials if t["status"] == "done"]
        failed = [t for t in trials if t["status"] == "failed"]
        parts = []
        if failed:
            parts.append(f"{len(failed)} of {len(done) + len(failed)} trials failed (the first: {failed[0]['error']})")
        if done:
            folding = sum(t["folding"] > self.folding_max for t in done)
            sdlogj = sum(self.sdlogj_max > 0 and t["sdlogj"] > self.sdlogj_max for t in done)
            for n, bound in ((folding, f"%|J|≤0 > {self.folding_max:g}"), (sdlogj, f"SDlogJ > {self.sdlogj_max:g}")):
                if n:
                    parts.append(f"{bound} in {n} of {len(done)} finished trials")
        return "; ".join(parts) or "no trial finished"


def _config_class(solver: str) -> type:
    """The tuned config: the instance solver's own, or the learned solver's training config."""
    if solver == "learned":
        from learned.train import TrainConfig

        return TrainConfig
    return get_solver(solver).config_class


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(mapping_key(d, p), {})
    d[mapping_key(d, parts[-1])] = value


def _get_dotted(d: dict, key: str) -> Any:
    for p in key.split("."):
        d = d[mapping_key(d, p)]
    return d


def _current(full: dict, key: str, solver: str) -> Any:
    """The base value of ``key``; ``None`` for a new label of a label → λ mapping
    (``region_lambda.<label>``: the labels are the data's, not the config's).

    Raises:
        ValueError: a key the solver config does not have.
    """
    parent, _, last = key.rpartition(".")
    try:
        return _get_dotted(full, key)
    except (KeyError, TypeError):
        if parent and last.lstrip("-").isdigit() and isinstance(_get_dotted_or_none(full, parent), dict):
            return None
        raise ValueError(f"search space: `{key}` is not a key of the {solver} solver's config") from None


def _get_dotted_or_none(d: dict, key: str) -> Any:
    try:
        return _get_dotted(d, key)
    except (KeyError, TypeError):
        return None


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
        cur = _current(full, p.key, space.solver)
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
    values = [_current(full, p.key, space.solver) for p in space.parameters]
    default = full.get("region_default", 1.0)  # a label the base does not list has the mapping's default
    return {p.key: float(default if v is None else v[0] if isinstance(v, list) else v) for p, v in zip(space.parameters, values)}


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
        if not isinstance(spec, dict):
            raise ValueError(f"{where}.parameters.{key} must be a mapping {{low, high[, log, integer, step]}}, got {spec!r}"
                             " (a fixed value belongs in base_config)")
        p = from_dict(Parameter, {"key": key, **spec}, where=f"{where}.parameters.{key}")
        if not p.low < p.high:
            raise ValueError(f"{where}.parameters.{key}: `low` must be below `high`, got {p.low} and {p.high}")
        if p.step < 0 or p.step > p.high - p.low:
            raise ValueError(f"{where}.parameters.{key}: `step` must be in [0, high - low], got {p.step}")
        if p.log and p.low <= 0:
            raise ValueError(f"{where}.parameters.{key}: a log-scale parameter needs low > 0, got {p.low}")
        params.append(p)
    base = data.get("base_config") or {}
    if not isinstance(base, dict):
        raise ValueError(f"{where}.base_config must be a mapping")
    # the other keys are checked by from_dict (it names unknown ones), with a placeholder for the checked parameters
    space = from_dict(SearchSpace, {**data, "base_config": base, "parameters": [{"key": "x", "low": 0, "high": 1}]}, where=where)
    space = replace(space, parameters=tuple(params))
    apply_params(space, {p.key: p.from_unit(0.5) for p in params})  # every key exists and the config accepts mid-range values
    return space


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Read a search-space YAML file (:func:`space_from_dict`).

    Raises:
        FileNotFoundError: missing file (names ``--space``). ValueError: invalid YAML or
            content.
    """
    return space_from_dict(read_yaml(path, arg="--space"), where="--space")
