"""Weight files of the learned solver and inference with them (method §2.2): training writes
them, inference reads them without importing training. A :data:`WEIGHTS_FORMAT` file is a
``torch.save`` dict: ``format``, ``network`` and ``objective`` (the configs as dicts),
``spacing`` (training voxel size, mm per tensor axis), ``info``, ``state_dict`` (float32)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from hybridreg.config import atomic_output, existing_file, from_dict, to_dict
from hybridreg.objective import Evaluation, ObjectiveConfig

from .loss import network_energy
from .network import CODE_KEYS, NetOutput, NetworkConfig, RegistrationNetwork

__all__ = ["WEIGHTS_FORMAT", "LEGACY_LNCC_EPS", "save_weights", "read_weight_file", "load_weights", "hyperparameter_code", "predict"]

WEIGHTS_FORMAT = "hybridreg-learned-v1"
LEGACY_LNCC_EPS = 1e-5
"""LNCC's ε (``ObjectiveConfig.lncc_eps``) of every network trained before the setting existed
(its default then); a weight file without the key loads with it, so that the recorded energy (and
a refinement on the network's own energy, ``LearnedConfig.refine_objective_from_weights``) stays
the one the network was trained on."""


def save_weights(path: str | os.PathLike, net: RegistrationNetwork, objective: ObjectiveConfig,
                 spacing: Sequence[float], info: dict | None = None) -> None:
    """Write a weight file (atomically): the state dict in float32 plus everything inference
    needs (network config, the energy's config, the training voxel size in mm)."""
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu() for k, v in net.state_dict().items()}
    payload = {"format": WEIGHTS_FORMAT, "network": to_dict(net.config), "objective": to_dict(objective),
               "spacing": [float(s) for s in spacing], "info": info or {}, "state_dict": state}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def read_weight_file(path: str | os.PathLike, fmt: str, *, arg: str = "--weights") -> dict:
    """The dict a hybridreg weight file of format ``fmt`` holds (``torch.load``, tensors only).

    Raises:
        FileNotFoundError: missing file. ValueError: not a ``fmt`` weight file (both name ``arg``).
    """
    p = existing_file(path, arg, "weight file")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- torch raises many types (and advice about pickles) for foreign files
        raise ValueError(f"`{arg}`: {p} is not a hybridreg weight file (torch cannot read it as one)") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"`{arg}`: {p} is not a {fmt} weight file")
    return payload


def load_weights(path: str | os.PathLike, device: torch.device | str | None = None, *, arg: str = "--weights"):
    """Read a weight file written by :func:`save_weights`.

    Returns:
        ``(network in eval mode on device, ObjectiveConfig, training spacing in mm, info dict)``.

    Raises:
        FileNotFoundError: missing file. ValueError: not a hybridreg weight file, or one
            missing an entry or a weight (both name ``arg``, the option the path came from).
    """
    p = Path(path)
    payload = read_weight_file(p, WEIGHTS_FORMAT, arg=arg)
    try:
        net = RegistrationNetwork(from_dict(NetworkConfig, payload["network"], where="weights network"))
        net.load_state_dict(payload["state_dict"])
        stored = payload["objective"]
        if isinstance(stored, dict) and "lncc_eps" not in stored:  # written before the setting existed
            stored = {**stored, "lncc_eps": LEGACY_LNCC_EPS}
        objective = from_dict(ObjectiveConfig, stored, where="weights objective")
        spacing, info = tuple(payload["spacing"]), payload["info"]
    except (KeyError, RuntimeError, ValueError) as e:  # a missing entry, or a state dict that does not fit
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"`{arg}`: {p} is a damaged {WEIGHTS_FORMAT} weight file: {type(e).__name__}: {msg}") from None
    return net.eval().to(device or "cpu"), objective, spacing, info


def hyperparameter_code(objective: ObjectiveConfig, batch: int, like: torch.Tensor) -> torch.Tensor:
    """The code of a conditional network (:data:`learned.network.CODE_KEYS`) for ``objective``'s
    values: ``(batch, 2)`` on ``like``'s device and dtype."""
    values = [float(getattr(objective, k)) for k in CODE_KEYS]
    return torch.tensor([values] * batch, dtype=like.dtype, device=like.device)


def predict(net: RegistrationNetwork, fixed: torch.Tensor, moving: torch.Tensor, objective: ObjectiveConfig,
            spacing: Sequence[float], region: torch.Tensor | None = None) -> tuple[NetOutput, Evaluation]:
    """The network's output for ``(B, 1, *spatial)`` images on its grid (voxel size
    ``spacing`` mm) and its :class:`hybridreg.objective.Evaluation` (displacement in voxels
    on the image grid, warped image, energy terms), without gradients. A conditional network
    is conditioned on ``objective``'s ``w_reg`` and ``hyper_strength`` (the energy evaluated),
    and a region-conditioned one on ``region`` (a ``(B, 1, *spatial)`` λ map) when given."""
    with torch.no_grad():
        code = hyperparameter_code(objective, fixed.shape[0], fixed) if net.config.conditional else None
        out = net(fixed, moving, code, region)
        return out, network_energy(out, fixed, moving, objective, spacing)
