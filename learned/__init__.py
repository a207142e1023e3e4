"""Solver 2 (amortized): a registration network with a λ head (method §2.2), trained
without labels on the core energy, with optional per-case refinement by instance
optimization (method §2.3).

* :mod:`learned.network` -- ``g(fixed, moving) → (velocity, λ)``; U-Net (default) or
  TransMorph-style Swin-transformer backbone (MONAI, optional).
* :mod:`learned.loss` -- the training loss, which is :func:`hybridreg.objective.evaluate`.
* :mod:`learned.weights` -- the weight-file format and inference (``load_weights``, ``predict``).
* :mod:`learned.train` -- training (augmentation, validation Dice, logs, exact resume, DDP).
* :mod:`learned.solver` -- ``register_pair``, the solvers ``learned`` and ``learned+refine``
  (:data:`~learned.solver.LEARNED`, :data:`~learned.solver.LEARNED_REFINE`), the shipped weights.
* :mod:`learned.regressor` -- regularization prediction (method §3.1): a CNN regressing a pair's
  MAP λ, and the solver ``learned-lambda`` that registers at the predicted λ.
"""

from .network import BACKBONES, LambdaHead, NetOutput, NetworkConfig, RegistrationNetwork, SwinBackbone, UNetBackbone
from .loss import network_energy

__all__ = ["BACKBONES", "LambdaHead", "NetOutput", "NetworkConfig", "RegistrationNetwork", "SwinBackbone", "UNetBackbone",
           "network_energy"]
