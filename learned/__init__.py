"""Solver 2 (amortized): a registration network with a λ head (method §2.2), trained
without labels on the core energy, with optional per-case refinement by instance
optimization (method §2.3).

* :mod:`learned.network` -- ``g(fixed, moving) → (velocity, λ)``; U-Net (default) or
  TransMorph-style Swin-transformer backbone (MONAI, optional).
* :mod:`learned.loss` -- the training loss, which is :func:`hybridreg.objective.evaluate`.
* :mod:`learned.train` -- training (augmentation, validation Dice, logs, exact resume,
  torchrun/DDP) and weight files.
* :mod:`learned.solver` -- ``register_pair`` for ``--solver learned`` / ``learned+refine``
  and the shipped weights :data:`learned.solver.DEFAULT_WEIGHTS`.
"""

from .network import BACKBONES, LambdaHead, NetOutput, NetworkConfig, RegistrationNetwork, SwinBackbone, UNetBackbone
from .loss import network_energy

__all__ = ["BACKBONES", "LambdaHead", "NetOutput", "NetworkConfig", "RegistrationNetwork", "SwinBackbone", "UNetBackbone",
           "network_energy"]
