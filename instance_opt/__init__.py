"""Solver 1: instance optimization of the hybridreg energy for one pair (method §2.1).

* :mod:`instance_opt.minimize` -- the optimisation loop of one level and its stopping rule.
* :mod:`instance_opt.solver` -- the configuration, the pyramid and :func:`register_pair`.
"""

from .minimize import MinimizeResult, RelativeChangeStopping, minimize
from .solver import SOLVER, InstanceOptConfig, InstanceSolver, register_pair

__all__ = ["InstanceOptConfig", "InstanceSolver", "MinimizeResult", "RelativeChangeStopping", "SOLVER", "minimize",
           "register_pair"]
