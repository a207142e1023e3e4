"""Amortized registration with a trained λ-head network, optionally refined per case by
instance optimization (method §2.2–2.3).

``register_pair(fixed, moving, LearnedConfig(...))`` has the instance solver's signature and
returns :class:`hybridreg.solvers.RegistrationResult`; :data:`LEARNED` and
:data:`LEARNED_REFINE` are the :class:`hybridreg.solvers.Solver` entry points:

* ``refine=False`` (``--solver learned``): one network pass. The network runs at the voxel
  size it was trained at: inputs on another grid are resampled to it (cell-centred linear
  interpolation over the same extent), and the predicted SVF and λ are used as a control grid
  of the input grid -- :func:`hybridreg.objective.evaluate` integrates the SVF there by scaling
  and squaring and up-samples the displacement to the input grid.
* ``refine=True`` (``--solver learned+refine``): the instance optimizer starts from the
  network's velocity and λ and runs the short schedule ``refine_config`` (same energy).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from hybridreg.objective import evaluate
from hybridreg.regularization import check_spacing
from hybridreg.solvers import LevelHistory, RegistrationResult, Status, check_images, final_terms_of
from hybridreg.spatial import resize_image, warp
from instance_opt import InstanceOptConfig
from instance_opt import register_pair as instance_register_pair

from .weights import load_weights

__all__ = ["DEFAULT_WEIGHTS", "UNIFORM_WEIGHTS", "NAMED_WEIGHTS", "weights_path", "LearnedConfig", "LearnedSolver",
           "LEARNED", "LEARNED_REFINE", "half_grid_refine", "register_pair"]

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "learned_bundled_2mm.pt"
"""Weights shipped with the package: trained on the bundled training split at 2 mm in three
stages (``configs/learned_bundled_2mm.yaml``, then ``..._fullres.yaml`` and
``..._fullres_mixed.yaml`` fine-tuning from the previous stage), then fine-tuned with scan-like
images drawn from the label maps on the LNCC-window-5 energy (stage 4,
``configs/learned_bundled_2mm_synth.yaml``); logs, figures and README in ``learned/weights/``,
the earlier stages in its ``stage*/`` folders (:data:`NAMED_WEIGHTS`)."""

UNIFORM_WEIGHTS = Path(__file__).parent / "weights" / "uniform" / "learned_bundled_2mm_uniform.pt"
"""The uniform-λ baseline network (no λ head, λ ≡ 0.89475 with ``w_reg`` 4): same data,
schedule and seed, ``configs/learned_bundled_2mm_uniform.yaml``; the weights at the end of
training (``model_final.pt``, step 5000; log and README next to the file)."""


_DIR = Path(__file__).parent / "weights"
NAMED_WEIGHTS = {
    "shipped": DEFAULT_WEIGHTS,
    "stage1": _DIR / "stage1" / "learned_bundled_2mm_stage1.pt",
    "stage2": _DIR / "stage2" / "learned_bundled_2mm_stage2.pt",
    "stage3": _DIR / "stage3" / "learned_bundled_2mm_stage3.pt",
    "uniform": UNIFORM_WEIGHTS,
}
"""Weight files that ship with the package, by the name ``--weights`` accepts: the default
(``shipped``), the earlier stages of its training (``learned/weights/stage*/``, kept for
comparison) and the uniform-λ baseline."""


def weights_path(weights: str | os.PathLike) -> Path:
    """The file of ``weights``: a name of :data:`NAMED_WEIGHTS`, a path, or empty (the shipped
    default).

    Raises:
        FileNotFoundError: no such file (the message names ``--weights`` and lists the names).
    """
    w = str(weights)
    p = DEFAULT_WEIGHTS if not w else NAMED_WEIGHTS.get(w, Path(w))
    if not p.is_file():
        raise FileNotFoundError(f"`--weights`: file not found: {w} (a weight file or one of {', '.join(NAMED_WEIGHTS)})")
    return p


def _refine_default() -> InstanceOptConfig:
    return InstanceOptConfig(level_spacing=(2.0,), iterations=(12,), tol=0.0, min_iterations=1, window=5)


def half_grid_refine() -> InstanceOptConfig:
    """The refinement schedule of networks whose SVF lives on the half grid (no
    full-resolution stage, e.g. stage 1 of the shipped weights and the uniform-λ network):
    20 iterations on a 4 mm level, then 12 on the 2 mm level, no early stop."""
    return replace(_refine_default(), level_spacing=(4.0, 2.0), iterations=(20, 12))


@dataclass(frozen=True)
class LearnedConfig:
    """Settings of the learned solver.

    Attributes:
        weights: weight file written by ``hybridreg train`` (``model_best.pt``), or a name of
            :data:`NAMED_WEIGHTS` (``stage3``, ``uniform``...); empty means the shipped
            :data:`DEFAULT_WEIGHTS`. :meth:`LearnedSolver.configure` replaces a name by its file.
        refine: refine the network's output by instance optimization.
        refine_config: the instance optimizer's schedule for refinement (its
            ``objective`` is replaced by the network's training energy unless
            ``refine_objective_from_weights`` is False). Default: 12 iterations on the
            2 mm level (the shipped network's velocity grid), no early stop; chosen for stage 2
            of the shipped weights on the bundled validation pairs (vxm ← synthseg_13..15, 2 mm),
            where it reached 0.769 mean Dice in 10.5 s, against 0.765 in 13.3 s for
            :func:`half_grid_refine` (a 4 mm level first, which discards the velocity's
            2 mm detail) and 0.771 for the full instance schedule in about 40 s.
        refine_objective_from_weights: refine the energy the network was trained on; for a
            uniform-λ network (``NetworkConfig.lambda_mode="uniform"``) that includes its
            fixed λ, so the refinement runs with ``lambda_mode="uniform"`` and
            ``lambda_init = lambda_uniform``.
        progress: tqdm bars during refinement.
    """

    weights: str = ""
    refine: bool = False
    refine_config: InstanceOptConfig = field(default_factory=_refine_default)
    refine_objective_from_weights: bool = True
    progress: bool = True


_load = lru_cache(maxsize=4)(load_weights)  # (path, device) -> load_weights(path, device), both str


def register_pair(fixed: torch.Tensor, moving: torch.Tensor, config: LearnedConfig | None = None, *,
                  spacing: Sequence[float] | None = None, device: torch.device | str | None = None,
                  moving_map: torch.Tensor | None = None, moving_spacing: Sequence[float] | None = None,
                  fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with the network (and optional refinement).

    Args:
        fixed, moving: ``(B, 1, *spatial)`` images on one grid, intensities about [0, 1]
            (:func:`hybridreg.io.normalize_intensity`), 2D or 3D matching the network.
        config: :class:`LearnedConfig`.
        spacing: voxel size in mm (array-axis order); default 1 mm.
        device: where to run (default: the inputs' device).
        moving_map, moving_spacing, fixed_mask, moving_mask: a moving image on its own grid
            and masks, as in :func:`instance_opt.register_pair`; the network sees the moving
            image resampled once onto the fixed grid through ``moving_map``, the energy and
            the refinement sample it on its own grid.

    Returns:
        :class:`hybridreg.solvers.RegistrationResult`: displacement (voxels, image grid),
        velocity and λ on the network's grid (or the refinement's finest control grid),
        warped image, history (the network pass, status ``network`` -- ``diverged`` when its
        output is not finite, and then nothing is refined -- then the refinement's levels),
        seconds (network + refinement), final energy terms on the image grid, config ``cfg``.

    Raises:
        FileNotFoundError: missing weights. ValueError: a corrupt weight file, images of
            the wrong dimension for the network, mismatched shapes, NaNs.
    """
    cfg = config or LearnedConfig()
    dev = torch.device(device) if device is not None else fixed.device
    check_images(fixed, moving, fn="register_pair", same_grid=moving_map is None)
    net, objective, train_spacing, _ = _load(str(weights_path(cfg.weights)), str(dev))
    d = net.config.ndim
    if fixed.dim() != d + 2:
        raise ValueError(f"register_pair(): the network is {d}D; `fixed` must be (B, 1, *{d} dims), got {tuple(fixed.shape)}")
    spatial = tuple(fixed.shape[2:])
    h = check_spacing(spacing, d, fn="register_pair")
    fixed, moving = fixed.to(dev), moving.to(dev)
    grids = dict(moving_map=moving_map, fixed_mask=fixed_mask, moving_mask=moving_mask)
    grids = {k: None if v is None else v.to(dev, fixed.dtype) for k, v in grids.items()}
    on_fixed = moving if moving_map is None else \
        warp(moving, fixed.new_zeros((fixed.shape[0], d, *fixed.shape[2:])), voxel_map=grids["moving_map"])

    t0 = time.perf_counter()
    net_shape = tuple(max(4, int(round(n * hk / tk))) for n, hk, tk in zip(spatial, h, train_spacing))
    with torch.no_grad():
        f_in = resize_image(fixed, net_shape) if net_shape != spatial else fixed
        m_in = resize_image(on_fixed, net_shape) if net_shape != spatial else on_fixed
        out = net(f_in, m_in)
    velocity, lam = out.velocity.to(fixed.dtype), out.lam.to(fixed.dtype)
    finite = bool(torch.isfinite(velocity).all() and torch.isfinite(lam).all())  # e.g. weights holding NaN
    net_level = LevelHistory(spacing=tuple(train_spacing), shape=net_shape, control_shape=tuple(velocity.shape[2:]),
                             terms={}, iterations=1, status=Status.NETWORK if finite else Status.DIVERGED,
                             seconds=time.perf_counter() - t0)
    if not cfg.refine or not finite:
        with torch.no_grad():
            ev = evaluate(fixed, moving, velocity, lam, objective, h, per_pair=True, **grids)
        final, pair_final = final_terms_of(ev.terms)
        return RegistrationResult(displacement=ev.displacement, velocity=velocity, lam=lam, warped=ev.warped,
                                  history=[net_level], seconds=time.perf_counter() - t0, config=cfg,
                                  final_terms=final, svf_steps=objective.svf_steps, pair_final_terms=pair_final)
    rcfg = cfg.refine_config
    if cfg.refine_objective_from_weights:
        rcfg = replace(rcfg, objective=objective)
        if net.config.lambda_mode == "uniform":
            rcfg = replace(rcfg, lambda_mode="uniform", lambda_init=net.config.lambda_uniform)
    res = instance_register_pair(fixed, moving, replace(rcfg, progress=cfg.progress), spacing=h, device=dev,
                                 init_velocity=velocity, init_lambda=lam, moving_spacing=moving_spacing, **grids)
    for history in [res.history, *(res.pair_histories or [])]:
        history.insert(0, net_level)  # the network pass is the batch's, shared by its pairs
    res.seconds += net_level.seconds
    res.config = cfg
    return res


@dataclass(frozen=True)
class LearnedSolver:
    """The learned solver as a :class:`hybridreg.solvers.Solver` (method §2.2–2.3): the
    network alone (``--solver learned``) or refined by instance optimization
    (``learned+refine``); the name fixes :attr:`LearnedConfig.refine`."""

    name: str
    refine: bool
    config_class = LearnedConfig

    def default_config(self) -> LearnedConfig:
        return LearnedConfig(refine=self.refine)

    def configure(self, config: LearnedConfig) -> LearnedConfig:
        """``config`` with ``refine`` set by the solver's name and a weights name replaced by
        its file (:func:`weights_path`; raises FileNotFoundError for a missing one)."""
        w = str(weights_path(config.weights)) if config.weights else ""
        return replace(config, refine=self.refine, weights=w)

    def register_pair(self, fixed: torch.Tensor, moving: torch.Tensor, config: LearnedConfig | None = None,
                      **kwargs) -> RegistrationResult:
        """:func:`register_pair` with ``config`` (default :meth:`default_config`) configured."""
        return register_pair(fixed, moving, self.configure(config or self.default_config()), **kwargs)


LEARNED, LEARNED_REFINE = LearnedSolver("learned", False), LearnedSolver("learned+refine", True)
"""The entry points ``learned`` and ``learned+refine`` of the ``hybridreg.solvers`` group."""

