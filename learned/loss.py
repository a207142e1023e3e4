"""The learned solver's loss: the core objective evaluated on the network's output."""

from __future__ import annotations

from typing import Sequence

import torch

from hybridreg.objective import Evaluation, ObjectiveConfig, evaluate

from .network import NetOutput

__all__ = ["network_energy"]


def network_energy(
    output: NetOutput,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    config: ObjectiveConfig,
    spacing: Sequence[float] | None = None,
) -> Evaluation:
    """:func:`hybridreg.objective.evaluate` on ``(output.velocity, output.lam)``: the network's
    grid is the objective's control grid, so this is the instance optimizer's energy for the
    same (velocity, λ), batch-averaged. Labels never enter it (unsupervised).

    Args:
        output: the network's :class:`NetOutput`.
        fixed, moving: ``(B, 1, *spatial)`` images on the image grid.
        config: the energy's hyperparameters. spacing: image voxel size in mm, array order
            (``None``: 1 mm).

    Returns:
        :class:`hybridreg.objective.Evaluation` (method §2.2: the amortized solver minimises the
        instance solver's energy, §1.2–1.6, over the training pairs).

    Raises:
        TypeError, ValueError: as :func:`hybridreg.objective.evaluate`.
    """
    return evaluate(fixed, moving, output.velocity, output.lam, config, spacing)
