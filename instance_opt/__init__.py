"""Solver 1: instance optimization of the hybridreg energy for one pair (method §2.1)."""

from .solver import InstanceOptConfig, InstanceResult, LevelHistory, RelativeChangeStopping, register_pair

__all__ = ["InstanceOptConfig", "InstanceResult", "LevelHistory", "RelativeChangeStopping", "register_pair"]
