"""Solver 2 (amortized): a registration network with a λ head (method §2.2).

Work in progress toward the learned-solver issue: the network and its loss are here;
training, inference from the CLI and shipped weights are not yet.
"""

from .network import BACKBONES, LambdaHead, NetOutput, NetworkConfig, RegistrationNetwork, UNetBackbone
from .loss import network_energy

__all__ = ["BACKBONES", "LambdaHead", "NetOutput", "NetworkConfig", "RegistrationNetwork", "UNetBackbone", "network_energy"]
