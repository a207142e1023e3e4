"""Hyperparameter tuning: Gaussian-process Bayesian optimization (BoTorch), with random search
and Optuna's TPE (the method authors' tuner, method §2.4) as baselines. Application layer (it
runs solvers); each module imports only those listed before it:

* :mod:`.space` -- the search space (YAML, :func:`load_space`) and a trial's config (:func:`apply_params`);
* :mod:`.loop` -- the ask/tell loop (:func:`run_tuning`): proposals, ``trials.json`` state, resume;
* :mod:`.objectives` -- what a trial measures (:data:`OBJECTIVES`) on the bundled pairs;
* :mod:`.report` -- ``best_config.yaml``, ``summary.json``, ``pareto.json``, figures (:func:`write_outputs`).

BoTorch, GPyTorch and Optuna are imported only inside the functions that use them.
"""

from .loop import METHODS, RUN_FILES, TuningResult, best_so_far, best_trial, pareto_front, run_tuning
from .objectives import OBJECTIVES, solver_objective, learned_objective
from .report import partial_dependence, tuning_figures, write_outputs
from .space import Parameter, SearchSpace, apply_params, base_params, load_space, space_from_dict

__all__ = ["Parameter", "SearchSpace", "load_space", "space_from_dict", "apply_params", "base_params", "run_tuning",
           "TuningResult", "best_trial", "pareto_front", "best_so_far", "METHODS", "RUN_FILES", "OBJECTIVES", "solver_objective",
           "learned_objective", "partial_dependence", "tuning_figures", "write_outputs"]
