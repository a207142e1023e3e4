"""Solver 2 (amortized): a registration network with a λ head (method §2.2).

Work in progress toward the learned-solver issue: the network, its loss and a training loop
with exact checkpoint resume (:mod:`learned.train`) are here; validation Dice, deformation
augmentation, torchrun/DDP, data sources, CLI training/inference and shipped weights are
not yet.
"""

from .network import BACKBONES, LambdaHead, NetOutput, NetworkConfig, RegistrationNetwork, UNetBackbone
from .loss import network_energy

__all__ = ["BACKBONES", "LambdaHead", "NetOutput", "NetworkConfig", "RegistrationNetwork", "UNetBackbone", "network_energy"]
