"""hybridreg: diffeomorphic image registration with spatially varying regularization.

The model (``docs/method.md`` §1): stationary velocity fields integrated by scaling and
squaring, an image match (LNCC, MSE), a λ-weighted graph-Laplacian prior on the
displacement, a normal or beta hyperprior on λ and an optional smoothness prior on λ.
Solvers live in separate packages (``instance_opt``, ``learned``) and import this one, never the
reverse.
"""

__version__ = "0.1.0"

from .objective import EnergyTerms, Evaluation, ObjectiveConfig, RegistrationObjective, evaluate  # noqa: E402
from .spatial import ALIGN_CORNERS, compose, jacobian_determinant, resize_field, scaling_and_squaring, warp  # noqa: E402

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
