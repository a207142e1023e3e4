"""Unsupervised training of :class:`RegistrationNetwork` on the shared energy (method §2.2),
with checkpoints that resume exactly.

Groundwork of the learned-solver issue: the loop, pair sampling, flip augmentation, AdamW
with polynomial decay, CSV logging and exact resume are here; validation Dice, smooth
random deformations, torchrun/DDP and the CLI are not yet.

Exact resume: a checkpoint holds the model, optimizer, scheduler, the step, the config and
every random state the loop uses (one ``torch.Generator`` for sampling and augmentation,
plus torch's global CPU state). On CPU with fixed seeds, a run interrupted at a checkpoint
and resumed ends with the same weights as an uninterrupted one (tested).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from hybridreg.config import atomic_output, dump_yaml, to_dict
from hybridreg.objective import ObjectiveConfig

from .loss import network_energy
from .network import NetworkConfig, RegistrationNetwork

__all__ = ["TrainConfig", "train", "latest_checkpoint"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings.

    Attributes:
        network, objective: the architecture and the energy.
        steps: optimizer steps in total. lr, weight_decay: AdamW. poly_power: exponent of
        the polynomial decay ``lr · (1 − step/steps)^power``.
        checkpoint_every: steps between checkpoints. seed: seeds the sampling generator
        and torch. flip_prob: probability of flipping a pair along each axis (both images).
        pairing: ``"atlas"`` (fixed = the atlas, moving = a subject) or ``"subject"``
        (two different subjects).
    """

    network: NetworkConfig = field(default_factory=NetworkConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 1e-5
    poly_power: float = 0.9
    checkpoint_every: int = 100
    seed: int = 0
    flip_prob: float = 0.5
    pairing: str = "atlas"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"TrainConfig: `steps` must be an int >= 1, got {self.steps!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ValueError(f"TrainConfig: `checkpoint_every` must be an int >= 1, got {self.checkpoint_every!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: `lr` must be > 0, got {self.lr!r}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"TrainConfig: `flip_prob` must be in [0, 1], got {self.flip_prob!r}")
        if self.pairing not in ("atlas", "subject"):
            raise ValueError(f"TrainConfig: `pairing` must be 'atlas' or 'subject', got {self.pairing!r}")


def _sample_pair(images: Sequence[torch.Tensor], atlas: torch.Tensor | None, cfg: TrainConfig, gen: torch.Generator):
    n = len(images)
    i = int(torch.randint(n, (1,), generator=gen))
    if cfg.pairing == "atlas":
        fixed, moving = atlas, images[i]
    else:
        j = int(torch.randint(n - 1, (1,), generator=gen))
        j = j + 1 if j >= i else j
        fixed, moving = images[j], images[i]
    dims = [k + 2 for k in range(fixed.dim() - 2) if float(torch.rand((), generator=gen)) < cfg.flip_prob]
    if dims:
        fixed, moving = fixed.flip(dims), moving.flip(dims)
    return fixed, moving


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint_*.pt`` in ``run_dir`` (by step), or ``None``."""
    cks = sorted(Path(run_dir).glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return cks[-1] if cks else None


def train(
    cfg: TrainConfig,
    images: Sequence[torch.Tensor],
    run_dir: str | os.PathLike,
    *,
    atlas: torch.Tensor | None = None,
    spacing: Sequence[float] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> RegistrationNetwork:
    """Train a network on pairs drawn from ``images`` (and ``atlas``); labels are never used.

    Args:
        cfg: :class:`TrainConfig`.
        images: ``(1, 1, *spatial)`` training images, all on one grid, intensities ~[0, 1].
        run_dir: folder for ``config.yaml``, ``log.csv`` and ``checkpoint_<step>.pt``.
        atlas: the fixed image for ``pairing="atlas"``.
        spacing: image voxel size in mm.
        resume: continue from the newest checkpoint in ``run_dir``.
        stop_after: stop after this global step (simulates an interruption; for tests).

    Returns:
        The trained network (on CPU).

    Raises:
        ValueError: no images, images on different grids, a missing atlas, or ``resume``
            without a checkpoint.
    """
    if not images:
        raise ValueError("train(): `images` is empty")
    shape = images[0].shape
    if any(im.shape != shape for im in images) or (atlas is not None and atlas.shape != shape):
        raise ValueError("train(): `images` (and `atlas`) must all have the same shape")
    if cfg.pairing == "atlas" and atlas is None:
        raise ValueError("train(): `atlas` is required with pairing='atlas'")
    if cfg.pairing == "subject" and len(images) < 2:
        raise ValueError("train(): pairing='subject' needs at least two `images`")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    net = RegistrationNetwork(cfg.network)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.steps) ** cfg.poly_power)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if resume:
        ck = latest_checkpoint(run)
        if ck is None:
            raise ValueError(f"train(): `resume` was requested but {run} holds no checkpoint")
        state = torch.load(ck, weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    else:
        dump_yaml(cfg, run / "config.yaml")
        with open(run / "log.csv", "w", newline="") as fh:
            csv.writer(fh).writerow(["step", "lr", "total", "similarity", "regularization", "hyperprior", "lambda_smoothness"])

    net.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start, end):
        fixed, moving = _sample_pair(images, atlas, cfg, gen)
        terms = network_energy(net(fixed, moving), fixed, moving, cfg.objective, spacing).terms
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        sched.step()
        with open(run / "log.csv", "a", newline="") as fh:
            csv.writer(fh).writerow([step + 1, sched.get_last_lr()[0], *(float(t.detach()) for t in terms)])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(run / f"checkpoint_{step + 1}.pt", {
                "step": step + 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "config": to_dict(cfg),
            })
    return net
