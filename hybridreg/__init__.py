"""hybridreg: diffeomorphic image registration with spatially varying regularization.

The model (``docs/method.md`` §1): stationary velocity fields integrated by scaling and
squaring, an image match (LNCC, MSE), a λ-weighted graph-Laplacian prior on the
displacement, a normal or beta hyperprior on λ and an optional smoothness prior on λ.
Solvers live in separate packages (``instance_opt``, ``learned``) and import this one. The model's
modules never import a solver; the application modules (``hybridreg.cli``, ``service``, ``tuning``,
``batch``) import them only where one is used: the solvers through their entry points
(:mod:`hybridreg.solvers`), ``learned``'s training inside the functions that train (the import
contracts in ``pyproject.toml``).
"""

__version__ = "0.1.0"

# The names below are imported on first use (PEP 562), so that ``hybridreg``'s entry point
# (:mod:`hybridreg.__main__`) starts without importing torch and can answer a Ctrl-C during
# that import in one line.
_OBJECTIVE = ("EnergyTerms", "Evaluation", "ObjectiveConfig", "RegistrationObjective", "evaluate")
_SPATIAL = ("ALIGN_CORNERS", "compose", "jacobian_determinant", "resize_field", "scaling_and_squaring", "warp")


def __getattr__(name: str):
    if name in _OBJECTIVE:
        from . import objective as module
    elif name in _SPATIAL:
        from . import spatial as module
    else:
        raise AttributeError(f"module 'hybridreg' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "__version__",
    "ALIGN_CORNERS",
    "EnergyTerms",
    "Evaluation",
    "ObjectiveConfig",
    "RegistrationObjective",
    "compose",
    "evaluate",
    "jacobian_determinant",
    "resize_field",
    "scaling_and_squaring",
    "warp",
]
