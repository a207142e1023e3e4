"""The one registration objective that every solver minimises (method §1.6).

``E = D(f, m∘φ) + w_reg · R(u; λ) + w_hyper · H(λ) + w_smooth · S(λ)`` with φ = exp(v).

* ``D``: LNCC or MSE, mean over voxels (:mod:`hybridreg.similarity`).
* ``R``: λ-weighted diffusion energy in the authors' normalisation
  (``reference_scale(d) · mean density``, :mod:`hybridreg.regularization`).
* ``H``: the hyperprior's negative log density, mean over λ's voxels (:mod:`hybridreg.priors`).
  Its strength is inside ``H`` (α = 1 + a for beta, ``inv_sigma2`` for normal), as in
  the reference, so there is no separate ``w_hyper`` weight.
* ``S``: optional smoothness of λ (grid or non-local), mean over nodes, times ``w_smooth``.

The instance optimizer and the learned solver both call :func:`evaluate`; its
:class:`EnergyTerms` fields are what logs, tests and the tuner read.

Grids. The velocity may live on a control grid coarser than the images; it is integrated
there and the displacement is up-sampled to the image grid. λ lives either on the
control grid (the regulariser then acts on the control-grid displacement, which is cheap)
or on the image grid (it acts on the up-sampled displacement), or is uniform
(shape ``(B, 1, 1, ...)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import torch

from .priors import beta_hyperprior, edge_weights, grid_smoothness, nonlocal_smoothness, normal_hyperprior
from .regularization import check_spacing, diffusion_energy, reference_scale
from .similarity import lncc, mse
from .spatial import check_field, resize_field, resize_image, scaling_and_squaring, warp

__all__ = ["ObjectiveConfig", "EnergyTerms", "Evaluation", "evaluate", "RegistrationObjective", "control_spacing"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyperparameters of the energy (method §1.2–1.6). All weights are dimensionless.

    Attributes:
        similarity: ``"lncc"`` or ``"mse"``.
        lncc_window: odd LNCC box width in voxels of the level being evaluated.
        mse_sigma: noise σ for MSE, in normalised intensity units.
        w_reg: weight of the λ-weighted diffusion energy (reference normalisation).
        hyperprior: ``"beta"``, ``"normal"`` or ``"none"``.
        hyper_strength: ``a`` (beta, α = 1 + a) or ``inv_sigma2`` (normal).
        hyper_mean: μ of the normal hyperprior. hyper_beta: β of the beta hyperprior.
        lambda_smoothness: ``"none"``, ``"grid"`` (edge-aware grid graph) or ``"nonlocal"``.
        w_smooth: weight of the λ smoothness prior.
        smooth_sigma_intensity: σ_I of the edge-aware weights (normalised intensity units).
        smooth_sigma_space: σ_x of the non-local kernel, mm.
        smooth_node_factor: pooling factor from λ's grid to the non-local node grid.
        svf_steps: scaling-and-squaring steps K.
    """

    similarity: Literal["lncc", "mse"] = "lncc"
    lncc_window: int = 9
    mse_sigma: float = 0.1
    w_reg: float = 1.0
    hyperprior: Literal["beta", "normal", "none"] = "beta"
    hyper_strength: float = 0.175
    hyper_mean: float = 1.0
    hyper_beta: float = 1.0
    lambda_smoothness: Literal["none", "grid", "nonlocal"] = "none"
    w_smooth: float = 0.0
    smooth_sigma_intensity: float = 0.1
    smooth_sigma_space: float = 10.0
    smooth_node_factor: int = 4
    svf_steps: int = 7

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ObjectiveConfig: `{name}` {why}, got {getattr(self, name)!r}")

        if self.similarity not in ("lncc", "mse"):
            raise bad("similarity", "must be 'lncc' or 'mse'")
        if not isinstance(self.lncc_window, int) or self.lncc_window < 1 or self.lncc_window % 2 == 0:
            raise bad("lncc_window", "must be an odd positive int")
        if self.hyperprior not in ("beta", "normal", "none"):
            raise bad("hyperprior", "must be 'beta', 'normal' or 'none'")
        if self.lambda_smoothness not in ("none", "grid", "nonlocal"):
            raise bad("lambda_smoothness", "must be 'none', 'grid' or 'nonlocal'")
        for name in ("w_reg", "w_smooth", "hyper_strength"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (v >= 0) or v == float("inf"):
                raise bad(name, "must be a finite number >= 0")
        for name in ("mse_sigma", "hyper_beta", "smooth_sigma_intensity", "smooth_sigma_space"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (v > 0) or v == float("inf"):
                raise bad(name, "must be a finite number > 0")
        if not isinstance(self.smooth_node_factor, int) or self.smooth_node_factor < 1:
            raise bad("smooth_node_factor", "must be an int >= 1")
        if not isinstance(self.svf_steps, int) or isinstance(self.svf_steps, bool) or not 0 <= self.svf_steps <= 20:
            raise bad("svf_steps", "must be an int in [0, 20]")


class EnergyTerms(NamedTuple):
    """Named terms of the energy, each a scalar tensor (weights already applied)."""

    total: torch.Tensor
    similarity: torch.Tensor
    regularization: torch.Tensor
    hyperprior: torch.Tensor
    lambda_smoothness: torch.Tensor


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` computed: the terms and the quantities behind them.

    Attributes:
        terms: the :class:`EnergyTerms`.
        displacement: ``(B, d, *image_spatial)`` voxel-unit displacement of φ = exp(v) on
            the image grid.
        warped: ``(B, C, *image_spatial)`` moving image warped by φ (linear).
    """

    terms: EnergyTerms
    displacement: torch.Tensor
    warped: torch.Tensor


def control_spacing(image_spacing: Sequence[float], image_size: Sequence[int], grid_size: Sequence[int]) -> tuple[float, ...]:
    """Spacing (mm) of a grid of ``grid_size`` covering the same extent as the image grid."""
    return tuple(float(h) * n / m for h, n, m in zip(image_spacing, image_size, grid_size))


def _hyperprior(lam: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    if cfg.hyperprior == "none":
        return lam.new_zeros(())
    if cfg.hyperprior == "beta":
        return beta_hyperprior(lam, 1.0 + cfg.hyper_strength, cfg.hyper_beta)
    if cfg.hyper_strength == 0:
        return lam.new_zeros(())
    sigma = (2.0 * cfg.hyper_strength) ** -0.5
    return normal_hyperprior(lam, cfg.hyper_mean, sigma)


def _lambda_smoothness(lam: torch.Tensor, fixed: torch.Tensor, spacing: tuple, cfg: ObjectiveConfig) -> torch.Tensor:
    if cfg.lambda_smoothness == "none" or cfg.w_smooth == 0 or all(n == 1 for n in lam.shape[2:]):
        return lam.new_zeros(())
    guide = resize_image(fixed.mean(1, keepdim=True), lam.shape[2:])
    if cfg.lambda_smoothness == "grid":
        w = edge_weights(guide, cfg.smooth_sigma_intensity)
        return cfg.w_smooth * grid_smoothness(lam, w, spacing, reduction="mean")
    f = cfg.smooth_node_factor
    nodes = tuple(max(1, n // f) for n in lam.shape[2:])
    node_spacing = control_spacing(spacing, lam.shape[2:], nodes)
    return cfg.w_smooth * nonlocal_smoothness(
        resize_image(lam, nodes),
        resize_image(guide, nodes),
        node_spacing,
        sigma_space=cfg.smooth_sigma_space,
        sigma_intensity=cfg.smooth_sigma_intensity,
    )


def evaluate(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    velocity: torch.Tensor,
    lam: torch.Tensor,
    config: ObjectiveConfig,
    spacing: Sequence[float] | None = None,
) -> Evaluation:
    """Evaluate the energy of ``(velocity, λ)`` for one batch of pairs (method §1.6).

    Args:
        fixed, moving: ``(B, C, *spatial)`` images on the same grid (normalised
            intensities, roughly [0, 1]).
        velocity: ``(B, d, *control)`` SVF in voxels of the control grid, which covers the
            image extent (``control`` may equal ``spatial``).
        lam: ``(B, 1, *control)``, ``(B, 1, *spatial)`` or uniform ``(B, 1, 1, ...)`` λ.
        config: the :class:`ObjectiveConfig`.
        spacing: image voxel size in mm per tensor axis (``None`` = 1 mm).

    Returns:
        :class:`Evaluation` with the named terms, the image-grid displacement and the
        warped moving image. Nothing is stored on any object.

    Raises:
        TypeError, ValueError: shapes that do not fit together, naming the argument.
    """
    d = check_field(velocity, "velocity", fn="evaluate")
    for name, t in (("fixed", fixed), ("moving", moving)):
        if not isinstance(t, torch.Tensor) or t.dim() != d + 2:
            raise ValueError(f"evaluate(): `{name}` must be (B, C, *spatial) with {d} spatial dims")
    if fixed.shape != moving.shape:
        raise ValueError(f"evaluate(): `fixed` {tuple(fixed.shape)} and `moving` {tuple(moving.shape)} differ in shape")
    if velocity.shape[0] != fixed.shape[0]:
        raise ValueError("evaluate(): `velocity` and `fixed` must have the same batch size")
    spatial = tuple(fixed.shape[2:])
    control = tuple(velocity.shape[2:])
    h = check_spacing(spacing, d, fn="evaluate")
    if not isinstance(lam, torch.Tensor) or lam.dim() != d + 2 or lam.shape[1] != 1:
        raise ValueError(f"evaluate(): `lam` must be (B, 1, *grid), got {getattr(lam, 'shape', lam)}")
    lam_grid = tuple(lam.shape[2:])
    if lam_grid not in (control, spatial, (1,) * d):
        raise ValueError(
            f"evaluate(): `lam` grid {lam_grid} must be the control grid {control}, the image grid"
            f" {spatial}, or all ones (uniform λ)"
        )

    disp_control = scaling_and_squaring(velocity, config.svf_steps)
    disp = resize_field(disp_control, spatial)
    warped = warp(moving, disp)
    if config.similarity == "lncc":
        sim = lncc(fixed, warped, config.lncc_window)
    else:
        sim = mse(fixed, warped, sigma=config.mse_sigma)

    if lam_grid == spatial and spatial != control:
        reg_field, reg_spacing = disp, h
    else:
        reg_field, reg_spacing = disp_control, control_spacing(h, spatial, control)
    reg = config.w_reg * reference_scale(d) * diffusion_energy(reg_field, lam, reg_spacing, reduction="mean")
    hyper = _hyperprior(lam, config)
    smooth = _lambda_smoothness(lam, fixed, reg_spacing if lam_grid != spatial else h, config)
    total = sim + reg + hyper + smooth
    return Evaluation(EnergyTerms(total, sim, reg, hyper, smooth), disp, warped)


class RegistrationObjective(torch.nn.Module):
    """Thin module around :func:`evaluate` that holds an :class:`ObjectiveConfig`.

    ``forward(fixed, moving, velocity, lam, spacing=None) -> Evaluation``.
    """

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        super().__init__()
        self.config = config or ObjectiveConfig()

    def forward(self, fixed, moving, velocity, lam, spacing=None) -> Evaluation:  # noqa: D401
        return evaluate(fixed, moving, velocity, lam, self.config, spacing)
