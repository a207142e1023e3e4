"""The one registration objective that every solver minimises (method §1.6).

``E = D(f, m∘φ) + w_reg · R(u; λ) + w_hyper · H(λ) + w_smooth · S(λ)`` with φ = exp(v).
With ``symmetric`` the image match is taken half-way, ``D(f∘exp(−v/2), m∘exp(v/2))``
(SyN's mid-space match, Avants et al., Med. Image Anal. 12(1), 2008, eq. 4), and is the same
energy with the images and the sign of v swapped; the prior still acts on φ's ``u``.

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

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import torch
from torch.profiler import record_function

from .config import bounded, check_bounds
from .priors import beta_hyperprior, edge_weights, grid_smoothness, nonlocal_smoothness, normal_hyperprior
from .regularization import check_spacing, diffusion_energy, diffusion_log_normalizer, reference_scale
from .similarity import LNCC_EPS, lncc, local_variance, mse
from .spatial import check_alike, check_field, check_mask, compose, resize_field, resize_image, scaling_and_squaring, warp

__all__ = ["ObjectiveConfig", "EnergyTerms", "Evaluation", "evaluate", "RegistrationObjective", "control_spacing",
           "map_lambda"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyperparameters of the energy (method §1.2–1.6). All weights are dimensionless; every
    number has a range (:func:`hybridreg.config.bounded`, listed in ``docs/configuration.md``)
    checked on construction (``ValueError`` naming the field).

    Attributes:
        similarity: ``"lncc"`` or ``"mse"``.
        lncc_window: odd LNCC box width in voxels of the level being evaluated. Default 5
            (was 9), chosen on real scans: on the four ``realworld`` pairs it raised the
            instance solver's Dice by 0.004 to 0.009 at equal or lower SDlogJ; 3 lay on or
            below 5's Dice-SDlogJ front. On the bundled 1 mm pairs, whose moving images are
            painted label maps without texture, it removed the folding of a subject pair
            (Dice +0.002) but cost an atlas pair 0.013 Dice at 0.017 lower SDlogJ
            (``docs/results.md``, "The LNCC window"). A window in mm would be the same at the
            last (2 mm) level and one voxel wide at the 8 mm level.
        lncc_eps: ε added to the product of the two local variances in LNCC's denominator
            (:func:`hybridreg.similarity.lncc`), in squared normalised intensity units. Default
            1e-6 (was 1e-5, VoxelMorph's value): on the ``realworld`` scans at the last 2 mm
            level, 7 % of the brain's windows have var_f·var_w below 1e-5 and a quarter below
            2e-4 (low-contrast tissue such as the deep grey matter), where 1e-5 damped the
            match; 1e-6 raised the instance solver's mean Dice there by 0.002 at 0.005 higher
            SDlogJ, 0.001–0.002 above the ε 1e-5 front (w_reg 8, 4, 2) in the same time
            (``docs/results.md``, "LNCC's ε"). Weight files written before this setting
            existed load with the 1e-5 they were trained with.
        mse_sigma: noise σ for MSE, in normalised intensity units.
        w_reg: weight of the λ-weighted diffusion energy (reference normalisation). The
            default ``w_reg`` 4 is both solvers' default.
        svf_steps: scaling-and-squaring steps K (method §1.1; the reference uses 7). Default
            4: on the bundled 1 mm pair 5 and 7 squarings gave the same Dice and SDlogJ; on two
            ``realworld`` pairs 4 gave the instance solver the same Dice (±0.0001) and SDlogJ
            (±0.0003) as 5 in 20% less time; 3 cost up to 0.0006 Dice on a third
            (``docs/results.md``, "Speed against demons").
        hyperprior: ``"beta"``, ``"normal"`` or ``"none"``.
        hyper_strength: ``a`` (beta, α = 1 + a) or ``inv_sigma2`` (normal).
        hyper_mean: μ of the normal hyperprior. hyper_beta: β of the beta hyperprior.
        lambda_smoothness: ``"none"``, ``"grid"`` (edge-aware grid graph) or ``"nonlocal"``.
        w_smooth: weight of the λ smoothness prior.
        smooth_sigma_intensity: σ_I of the edge-aware weights (normalised intensity units).
        smooth_sigma_space: σ_x of the non-local kernel, mm.
        smooth_node_factor: pooling factor from λ's grid to the non-local node grid.
        symmetric: take the image match in the mid-space, ``D(f∘exp(−v/2), m∘exp(v/2))``
            (inverse-consistent: swapping the images and negating v leaves it unchanged;
            Avants et al. 2008, eq. 4). exp(±v/2) use ``svf_steps − 1`` squarings each and
            φ = exp(v/2)∘exp(v/2), so φ is the same field as without it; one more
            integration and one more warp per evaluation. Off by default
            (``docs/results.md``, "The symmetric energy").
        log_det: the exact negative log posterior of a spatially uniform λ (method §1.3, §3.1;
            the MAP of a global λ, ``lambda_mode: map`` of the instance solver): the term
            ``normalizer`` adds the Gaussian prior's normaliser ``−½ log pdet(κ L)`` (analytic,
            :func:`hybridreg.regularization.diffusion_log_normalizer`; rank ``d(N−1)``, the
            constants being L's null space), and the image match becomes a Gaussian likelihood
            whose noise σ² is estimated jointly, profiled out at its closed-form MAP σ² = mean
            squared residual, so the match is ``½ + ½ log(2π σ²)`` per voxel (``mse_sigma`` is
            not used). The residual is ``(f − m∘φ)²`` for MSE; for LNCC it is
            ``var_f (1 − cc²)``, the squared residual of the least-squares linear map from the
            warped intensities to the fixed ones inside each window (so LNCC keeps its
            invariance to local contrast, and flat background, predicted exactly, weighs
            nothing; LNCC alone is no normalised likelihood, and this reading gives it the noise
            scale that the MAP of λ needs). Needs a uniform λ and ``w_reg`` > 0. Every term
            stays a mean per image voxel (nats / N).
    """

    similarity: Literal["lncc", "mse"] = "lncc"
    lncc_window: int = bounded(5, 1, 51)
    lncc_eps: float = bounded(LNCC_EPS, 1e-12, 1.0)
    mse_sigma: float = bounded(0.1, 1e-4, 10.0)
    w_reg: float = bounded(4.0, 0.0, 1e4)
    hyperprior: Literal["beta", "normal", "none"] = "beta"
    hyper_strength: float = bounded(0.175, 0.0, 1e4)
    hyper_mean: float = bounded(1.0, 1e-6, 5.0)
    hyper_beta: float = bounded(1.0, 1e-3, 1e3)
    lambda_smoothness: Literal["none", "grid", "nonlocal"] = "none"
    w_smooth: float = bounded(0.0, 0.0, 1e4)
    smooth_sigma_intensity: float = bounded(0.1, 1e-4, 10.0)
    smooth_sigma_space: float = bounded(10.0, 1e-2, 1e3)
    smooth_node_factor: int = bounded(4, 1, 64)
    svf_steps: int = bounded(4, 0, 20)
    symmetric: bool = False
    log_det: bool = False

    def __post_init__(self) -> None:
        for name, options in (("similarity", ("lncc", "mse")), ("hyperprior", ("beta", "normal", "none")),
                              ("lambda_smoothness", ("none", "grid", "nonlocal"))):
            if getattr(self, name) not in options:
                raise ValueError(f"ObjectiveConfig: `{name}` must be one of {list(options)}, got {getattr(self, name)!r}")
        for name in ("lncc_window", "smooth_node_factor", "svf_steps"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"ObjectiveConfig: `{name}` must be an int, got {getattr(self, name)!r}")
        check_bounds(self)
        if self.lncc_window % 2 == 0:
            raise ValueError(f"ObjectiveConfig: `lncc_window` must be odd, got {self.lncc_window!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"ObjectiveConfig: `symmetric` must be true or false, got {self.symmetric!r}")
        if not isinstance(self.log_det, bool):
            raise ValueError(f"ObjectiveConfig: `log_det` must be true or false, got {self.log_det!r}")
        if self.log_det and self.w_reg <= 0:
            raise ValueError("ObjectiveConfig: `w_reg` must be > 0 with `log_det` (the prior's precision is w_reg · λ)")
        if self.symmetric and self.svf_steps < 1:
            raise ValueError("ObjectiveConfig: `svf_steps` must be >= 1 with `symmetric` (φ = exp(v/2)∘exp(v/2))")


class EnergyTerms(NamedTuple):
    """Named terms of the energy, each a scalar tensor, or ``(B,)`` one per pair
    (:func:`evaluate` with ``per_pair``); weights already applied. ``normalizer`` is the
    prior's normaliser (``ObjectiveConfig.log_det``; zero otherwise)."""

    total: torch.Tensor
    similarity: torch.Tensor
    regularization: torch.Tensor
    hyperprior: torch.Tensor
    lambda_smoothness: torch.Tensor
    normalizer: torch.Tensor


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
    """Spacing (mm) of a grid of ``grid_size`` covering the same extent as the image grid.

    All three are in array (tensor-axis) order, one value per spatial axis: ``image_spacing`` in
    mm, the sizes in voxels. The extent is ``spacing × size`` (cell-centred grids, as
    :func:`hybridreg.spatial.resize_field`).

    Raises:
        ValueError: the three of different lengths, or a size below 1.
    """
    if not len(image_spacing) == len(image_size) == len(grid_size) or min(*image_size, *grid_size, 1) < 1:
        raise ValueError(f"control_spacing(): `image_spacing`, `image_size` and `grid_size` must give one value per axis"
                         f" (sizes >= 1), got {tuple(image_spacing)}, {tuple(image_size)}, {tuple(grid_size)}")
    return tuple(float(h) * n / m for h, n, m in zip(image_spacing, image_size, grid_size))


def _zero(lam: torch.Tensor, reduction: str) -> torch.Tensor:
    return lam.new_zeros((lam.shape[0],) if reduction == "batch" else ())


def _hyperprior(lam: torch.Tensor, cfg: ObjectiveConfig, reduction: str = "mean") -> torch.Tensor:
    if cfg.hyperprior == "none":
        return _zero(lam, reduction)
    if cfg.hyperprior == "beta":
        return beta_hyperprior(lam, 1.0 + cfg.hyper_strength, cfg.hyper_beta, reduction=reduction)
    if cfg.hyper_strength == 0:
        return _zero(lam, reduction)
    sigma = (2.0 * cfg.hyper_strength) ** -0.5
    return normal_hyperprior(lam, cfg.hyper_mean, sigma, reduction=reduction)


def _lambda_smoothness(lam: torch.Tensor, fixed: torch.Tensor, spacing: tuple, cfg: ObjectiveConfig,
                       reduction: str = "mean") -> torch.Tensor:
    if cfg.lambda_smoothness == "none" or cfg.w_smooth == 0 or all(n == 1 for n in lam.shape[2:]):
        return _zero(lam, reduction)
    guide = resize_image(fixed.mean(1, keepdim=True), lam.shape[2:])
    if cfg.lambda_smoothness == "grid":
        w = edge_weights(guide, cfg.smooth_sigma_intensity)
        return cfg.w_smooth * grid_smoothness(lam, w, spacing, reduction=reduction)
    f = cfg.smooth_node_factor
    nodes = tuple(max(1, n // f) for n in lam.shape[2:])
    node_spacing = control_spacing(spacing, lam.shape[2:], nodes)
    return cfg.w_smooth * nonlocal_smoothness(
        resize_image(lam, nodes),
        resize_image(guide, nodes),
        node_spacing,
        sigma_space=cfg.smooth_sigma_space,
        sigma_intensity=cfg.smooth_sigma_intensity,
        reduction=reduction,
    )


def _warp_with_mask(image: torch.Tensor, mask: torch.Tensor | None, disp: torch.Tensor,
                    voxel_map: torch.Tensor | None = None, field_of_view: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``image`` and its optional ``(B, 1, ...)`` ``mask`` warped by ``disp`` in one sampling
    of both (:func:`hybridreg.spatial.warp`), the mask times the image's field of view: 1 where
    the sampled point lies inside the image's grid (between its first and last voxel centres),
    0 outside, where the warped image holds only its zero padding. A scan of part of the
    head (a slab) is thus matched where it has data, as ITK's metrics do. With
    ``field_of_view`` false the field of view is left out: the warped mask alone, or ``1.0``
    without a mask.

    The warped mask is detached: it selects the voxels of the image match, as the masks of
    ITK's image metrics do, and no gradient flows through it. Differentiated, it lets the
    optimizer shrink the mask's weight over poorly matched voxels and lower the masked mean
    by folding the mask's edge onto them (a slab of NaN voxels left out of the match by a
    moving mask drove SDlogJ from 0.27 to 0.72, with folding, on the demo pair)."""
    if mask is None:
        return warp(image, disp, voxel_map=voxel_map, field_of_view=True) if field_of_view else \
            (warp(image, disp, voxel_map=voxel_map), 1.0)
    both, inside = warp(torch.cat([image, mask.to(image.dtype)], 1), disp, voxel_map=voxel_map, field_of_view=True)
    warped, warped_mask = both.split([image.shape[1], 1], 1)
    return warped, warped_mask.detach() * (inside if field_of_view else 1.0)


def evaluate(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    velocity: torch.Tensor,
    lam: torch.Tensor,
    config: ObjectiveConfig,
    spacing: Sequence[float] | None = None,
    *,
    moving_map: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    per_pair: bool = False,
) -> Evaluation:
    """Evaluate the energy of ``(velocity, λ)`` for one batch of pairs (method §1.6).

    Args:
        fixed, moving: ``(B, C, *spatial)`` images on the same grid (normalised
            intensities, roughly [0, 1]); with ``moving_map``, ``moving`` lies on its own
            grid ``(B, C, *moving_spatial)``.
        velocity: ``(B, d, *control)`` SVF in voxels of the control grid, which covers the
            image extent (``control`` may equal ``spatial``).
        lam: ``(B, 1, *control)``, ``(B, 1, *spatial)`` or uniform ``(B, 1, 1, ...)`` λ ≥ 0
            (checked on the CPU).
        config: the :class:`ObjectiveConfig`.
        spacing: image voxel size in mm per tensor axis (``None`` = 1 mm).
        moving_map: optional ``(B, d, d + 1)`` affine map from fixed voxel indices to
            moving voxel indices (an affine pre-alignment, :func:`hybridreg.affine.voxel_map`):
            the moving image is sampled on its own grid at ``M(x + u(x))``, one interpolation.
        fixed_mask: optional ``(B or 1, 1, *spatial)`` weights in [0, 1] on the fixed grid (not
            empty; :func:`hybridreg.spatial.check_mask`, whose pass over the values runs on the
            CPU only: on a GPU the solvers' entry checks them once);
            moving_mask: optional ``(B, 1, *moving_spatial)`` weights on the moving grid,
            warped with the moving image. The similarity is the sum of its per-voxel map
            weighted by the masks' product and the warped images' fields of view (a point
            mapped outside MOVING's grid, or FIXED's in the symmetric energy, meets only zero
            padding), divided by the number of voxels: a voxel outside adds nothing, one inside
            keeps its weight against the prior, so a mask does not change the balance of the
            two. With ``log_det`` (σ² profiled out) the per-voxel negative log-likelihood at
            σ²'s MAP (the mean squared residual over the weighted voxels) is scaled by their
            share of the voxels, and the fields of view are left out (a point mapped outside
            MOVING's grid meets its zero padding and counts as data): σ² is a mean over the
            match's voxels, and a domain that moved with the deformation made the estimate
            jump from one iteration to the next -- on a bundled 2 mm pair MAP's λ ran to 19
            and the result to a 15-voxel shift (Dice 0.026; ``docs/results.md``, "MAP's λ and
            the field of view"). A moving mask still moves with the deformation (it is zero
            outside MOVING's grid), so MAP with a moving mask keeps that weakness where the
            mask reaches the grid's edge. The warped weights are held fixed in the gradient
            (:func:`_warp_with_mask`), so the energy's value also moves with them where its
            gradient does not: a small mismatch for the stopping rule, none for Adam's steps.
            With ``config.symmetric`` both images and masks are warped half-way first.
        per_pair: ``False``: each term is a 0-dim tensor, the mean over the batch.
            ``True``: each term is ``(B,)``, pair ``b``'s energy exactly as if it were
            evaluated alone (batched instance optimization sums them: the pairs' gradients
            stay independent, and each pair's convergence is judged on its own).

    Returns:
        :class:`Evaluation` with the named terms, the image-grid displacement and the
        warped moving image. Nothing is stored on any object.

    Raises:
        TypeError: tensors that are not floating-point, half precision, or of mixed dtypes or
            devices (:func:`hybridreg.spatial.check_alike`).
        ValueError: shapes that do not fit together, a negative λ (checked on the CPU), a
            non-uniform λ with ``config.log_det``, a bad ``spacing``
            (:func:`hybridreg.regularization.check_spacing`), or a mask with values outside
            [0, 1], NaN or no voxel (:func:`hybridreg.spatial.check_mask`); each names the argument.
    """
    d = check_field(velocity, "velocity", fn="evaluate")
    for name, t in (("fixed", fixed), ("moving", moving)):
        if not isinstance(t, torch.Tensor) or t.dim() != d + 2:
            raise ValueError(f"evaluate(): `{name}` must be (B, C, *spatial) with {d} spatial dims")
    if moving_map is None and fixed.shape != moving.shape:
        raise ValueError(f"evaluate(): `fixed` {tuple(fixed.shape)} and `moving` {tuple(moving.shape)} differ in shape"
                         " (pass `moving_map` for a moving image on its own grid)")
    if velocity.shape[0] != fixed.shape[0]:
        raise ValueError("evaluate(): `velocity` and `fixed` must have the same batch size")
    check_alike("evaluate", velocity=velocity, fixed=fixed, moving=moving, lam=lam)
    for name, mask, image in (("fixed_mask", fixed_mask, fixed), ("moving_mask", moving_mask, moving)):
        if mask is not None:  # the values on the CPU only: on a GPU the pass would wait for it every iteration
            check_mask("evaluate", name, mask, image.shape, values=mask.device.type == "cpu")
    spatial = tuple(fixed.shape[2:])
    control = tuple(velocity.shape[2:])
    h = check_spacing(spacing, d, fn="evaluate")
    if not isinstance(lam, torch.Tensor) or lam.dim() != d + 2 or lam.shape[1] != 1:
        raise ValueError(f"evaluate(): `lam` must be (B, 1, *grid), got {getattr(lam, 'shape', lam)}")
    if lam.device.type == "cpu" and bool((lam.detach() < 0).any()):  # as the masks' values: free on the CPU only
        # (a NaN λ of a diverging run is left to the solver's divergence check)
        raise ValueError("evaluate(): `lam` must be ≥ 0 (a negative λ rewards a rough field)")
    lam_grid = tuple(lam.shape[2:])
    if lam_grid not in (control, spatial, (1,) * d):
        raise ValueError(
            f"evaluate(): `lam` grid {lam_grid} must be the control grid {control}, the image grid"
            f" {spatial}, or all ones (uniform λ)"
        )

    # named ranges for torch.profiler (benchmarks/instance_speed.py); free when no profiler runs
    with record_function("evaluate.integrate"):
        fixed_disp = None  # the match is taken on FIXED's grid (φ), or half-way (symmetric)
        if config.symmetric:  # exp(±v/2); exp(v) is their last squaring, from the same u_0 = v / 2^K
            half = scaling_and_squaring(0.5 * velocity, config.svf_steps - 1)
            disp_control = compose(half, half)
            fixed_disp = resize_field(scaling_and_squaring(-0.5 * velocity, config.svf_steps - 1), spatial)
        else:
            disp_control = scaling_and_squaring(velocity, config.svf_steps)
        disp = resize_field(disp_control, spatial)
        moving_disp = disp if fixed_disp is None else resize_field(half, spatial)
    with record_function("evaluate.warp"):
        # with log_det the fields of view are left out: σ² is a mean over the match's voxels, which
        # must not move with the deformation (see ``moving_mask`` in the docstring)
        matched, matched_mask = _warp_with_mask(moving, moving_mask, moving_disp, moving_map, not config.log_det)
        warped = matched if fixed_disp is None else warp(moving, disp, voxel_map=moving_map)
        target, target_mask = ((fixed, fixed_mask) if fixed_disp is None
                               else _warp_with_mask(fixed, fixed_mask, fixed_disp, field_of_view=not config.log_det))
    with record_function("evaluate.similarity"):
        reduction = "batch" if per_pair else "mean"
        profiled = config.log_det  # σ² profiled out: each pair's mean squared residual is its MAP
        if config.similarity == "lncc":
            sim = lncc(target, matched, config.lncc_window, eps=config.lncc_eps, reduction="none")
            if profiled:  # the squared residual of the least-squares local linear fit: var_f (1 − cc²)
                sim = local_variance(target, config.lncc_window) * (1.0 + sim)
        else:
            sim = mse(target, matched, sigma=0.5**0.5 if profiled else config.mse_sigma, reduction="none")
        # the voxels of the match: inside the masks and (without log_det) the fields of view. One outside
        # adds nothing; one inside keeps its weight against the prior (the sum is divided by all voxels)
        weight = torch.broadcast_to(torch.as_tensor((target_mask if target_mask is not None else 1.0) * matched_mask,
                                                    dtype=sim.dtype, device=sim.device), sim.shape)
        dims = tuple(range(1, sim.dim())) if per_pair or profiled else tuple(range(sim.dim()))
        if profiled:  # σ²'s MAP: the mean squared residual over the voxels of the match
            sigma2 = (sim * weight).sum(dims) / weight.sum(dims).clamp_min(1e-12)
            sim = weight.mean(dims) * (0.5 + 0.5 * torch.log(2.0 * math.pi * sigma2.clamp_min(1e-12)))
            sim = sim if per_pair else sim.mean()
        else:
            sim = (sim * weight).mean(dims)

    if lam_grid == spatial and spatial != control:
        reg_field, reg_spacing = disp, h
    else:
        reg_field, reg_spacing = disp_control, control_spacing(h, spatial, control)
    with record_function("evaluate.regularization"):
        reg = config.w_reg * reference_scale(d) * diffusion_energy(reg_field, lam, reg_spacing, reduction=reduction)
    with record_function("evaluate.priors"):
        hyper = _hyperprior(lam, config, reduction)
        smooth = _lambda_smoothness(lam, fixed, reg_spacing if lam_grid != spatial else h, config, reduction)
        if config.log_det:
            if lam_grid != (1,) * d:
                raise ValueError(f"evaluate(): `lam` must be uniform (B, 1, {', '.join(['1'] * d)}) with `log_det`, got {tuple(lam.shape)}")
            n_image, reg_shape = math.prod(spatial), tuple(reg_field.shape[2:])
            scale = n_image * config.w_reg * reference_scale(d) * lam.reshape(-1) / math.prod(reg_shape)
            normalizer = diffusion_log_normalizer(scale, reg_shape, reg_spacing, d) / n_image
            normalizer = normalizer if per_pair else normalizer.mean()
        else:
            normalizer = _zero(lam, reduction)
    total = sim + reg + hyper + smooth + normalizer
    return Evaluation(EnergyTerms(total, sim, reg, hyper, smooth, normalizer), disp, warped)


def map_lambda(lam: torch.Tensor, terms: EnergyTerms, image_shape: Sequence[int], reg_shape: Sequence[int]) -> torch.Tensor:
    """The closed-form MAP of a uniform λ given the displacement (method §1.3, §3.1).

    With ``log_det``, the energy's λ-dependent part per image voxel is
    ``c ρ − d(N_R − 1)/(2 N) log c`` (``c = w_reg · reference_scale(d) · λ``, ``ρ`` the mean
    diffusion density on the regularised grid of ``N_R`` nodes, ``N`` image voxels), which is
    smallest at ``c* = d(N_R − 1) / (2 N ρ)``. ``ρ`` is read off the evaluated
    ``terms.regularization`` (= ``c ρ``), so the update costs nothing: λ* = λ · d(N_R − 1) / (2 N R).

    Args:
        lam: ``(B, 1, 1, …)`` the uniform λ ``terms`` were evaluated with.
        terms: :func:`evaluate`'s terms (with ``log_det``) with ``per_pair`` (``(B,)``) or for one pair.
        image_shape: the image grid's size; reg_shape: the regularised grid's (the control
            grid for a uniform λ, :func:`evaluate`).

    Returns:
        λ* shaped like ``lam`` (detached); a pair whose displacement is zero keeps ``lam``.
    """
    d = len(image_shape)
    ratio = d * (math.prod(reg_shape) - 1) / (2.0 * math.prod(image_shape))
    reg = terms.regularization.detach().reshape(-1).to(lam.dtype)
    new = lam.detach().reshape(-1) * ratio / reg.clamp_min(torch.finfo(lam.dtype).tiny)
    return torch.where(reg > 0, new, lam.detach().reshape(-1)).reshape(lam.shape)


class RegistrationObjective(torch.nn.Module):
    """Thin module around :func:`evaluate` that holds an :class:`ObjectiveConfig`.

    ``forward(fixed, moving, velocity, lam, spacing=None) -> Evaluation``: ``fixed``, ``moving``
    ``(B, C, *spatial)`` on one grid, ``velocity`` ``(B, d, *control)`` SVF in control-grid
    voxels, ``lam`` ``(B, 1, *grid)``, ``spacing`` the image voxel size in mm (array order;
    ``None``: 1 mm). It is :func:`evaluate` with its defaults for everything else (no masks, no
    ``moving_map``, one energy for the batch); call :func:`evaluate` for those. Method §1.2–1.6;
    errors as :func:`evaluate`'s.
    """

    def __init__(self, config: ObjectiveConfig | None = None) -> None:
        super().__init__()
        self.config = config or ObjectiveConfig()

    def forward(self, fixed, moving, velocity, lam, spacing=None) -> Evaluation:  # noqa: D401
        return evaluate(fixed, moving, velocity, lam, self.config, spacing)
