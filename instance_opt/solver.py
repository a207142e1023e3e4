"""Instance optimization: Adam over (velocity, λ parameter) for one pair (method §2.1).

The energy is :func:`hybridreg.objective.evaluate` and nothing else. A resolution pyramid
runs coarse to fine; on each level the velocity lives on a control grid (the level's grid
divided by ``control_factor``) and λ = sigmoid(θ) (beta hyperprior) or softplus(θ)
(normal hyperprior) lives on the same control grid. ``lambda_mode="uniform"`` is the
spatially uniform baseline on the same code path: λ ≡ ``lambda_init``, not optimised, no
hyperprior. ``lambda_mode="map"`` estimates one global λ per pair by MAP from the exact
negative log posterior (``ObjectiveConfig.log_det``, method §1.3 and §3.1);
``lambda_mode="regions"`` optimises one λ per region of a label map (CSAIN's region-wise λ,
method §3.2) under the hyperprior.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Sequence

import torch

from hybridreg import progress
from hybridreg.config import bounded, check_bounds
from hybridreg.objective import EnergyTerms, ObjectiveConfig, evaluate, map_lambda
from hybridreg.priors import lambda_from_param, paint_region_lambda, param_from_lambda, region_members
from hybridreg.regularization import check_spacing
from hybridreg.solvers import LevelHistory, RegistrationResult, Status, check_images, final_terms_of
from hybridreg.spatial import gaussian_smooth, rescale_voxel_map, resize_field, resize_image, warp

from .minimize import RelativeChangeStopping, minimize

__all__ = ["FOREGROUND", "InstanceOptConfig", "InstanceSolver", "SOLVER", "foreground_box", "level_grids", "levels_run", "register_pair"]


@dataclass(frozen=True)
class InstanceOptConfig:
    """Settings of the instance optimizer (method §2.1).

    Attributes:
        objective: the energy's hyperparameters (default: the objective's defaults).
        level_spacing: voxel size (mm) of each pyramid level, coarse to fine. A level finer
            than the image runs on the image grid, and a level whose image and control
            grids are the previous level's is skipped (it would repeat it), so the same
            schedule serves 1 mm and 2 mm inputs: the default's 1 mm level runs on every image
            finer than 2 mm, on the image grid (one Adam step with the velocity and λ there,
            about 6.5 s at 1 mm on 2 CPU cores; docs/results.md, "One step at 1 mm"; it trades
            regularity for Dice, docs/configuration.md), and a 2 mm image ends at the 2 mm level.
        iterations: maximum Adam iterations per level (same length as ``level_spacing``).
        control_factor: velocity/λ grid = level grid / this factor, per level (1 = the
            level's own grid). A single value applies to every level.
        lr: Adam learning rate of the velocity (voxels of the control grid per step).
        lr_lambda: Adam learning rate of θ (λ's unconstrained parameter).
        lambda_mode: ``"voxelwise"`` (λ optimised per control voxel), ``"uniform"`` (λ fixed
            at ``lambda_init``), ``"map"``: one λ per pair estimated with the velocity by MAP
            from the exact negative log posterior (``objective.log_det`` is switched on, the
            hyperprior off: a flat prior on log λ; the image match is a Gaussian likelihood
            whose noise σ² is estimated jointly), the prior acting on the control-grid
            displacement, rank d(N_c − 1); the estimate is ``RegistrationResult.lam``
            (``metrics.json``: ``lambda.mean``); or ``"regions"``: one λ_k per region of the
            ``regions`` label map (the fixed image's labels; every label value, 0 included, is a
            region), painted and smoothed (``region_smoothing``) into the control-grid λ map,
            optimised with the velocity under the hyperprior (as ``"voxelwise"``, with
            ``lr_lambda``; method §3.2, CSAIN).
        map_update: how ``"map"`` updates λ: ``"closed_form"`` sets it to its exact optimum
            given the displacement (:func:`hybridreg.objective.map_lambda`) every ``window``
            iterations (block-coordinate descent); ``"gradient"`` runs Adam on log λ with
            ``lr_lambda`` together with the velocity. Both minimise the same energy.
        region_smoothing: σ (control-grid voxels) of the Gaussian that smooths the painted
            region-wise λ (CSAIN: 0.8, a 5-voxel window); 0 keeps sharp region borders.
        lambda_init: initial λ (voxelwise, map; each region's under ``regions``) or the fixed λ
            (uniform). With a λ map (voxelwise, regions) at most 5 under the normal hyperprior
            (λ = softplus(θ) is clamped to 5) and below 1 under the beta one (λ = sigmoid(θ)).
        velocity_smoothing: σ (control-grid voxels) of a Gaussian that parametrises the
            velocity, ``v = v₀ + G_σ * w``, with Adam on ``w`` from 0 and ``v₀`` the level's start
            (``init_velocity`` exactly; on a finer level the coarser level's result, smoothed
            once by the same Gaussian). This is a preconditioner (as
            the gradient smoothing of FireANTs): the energy minimised is unchanged, but Adam's
            per-voxel steps no longer inject high frequencies. 0 disables it.
        lr_final_fraction: both learning rates decay linearly within each level to this
            fraction of their value at the level's last iteration (1 = constant).
        tol: stop a level when the relative decrease of the mean loss over the last
            ``window`` iterations, against the ``window`` before, is below ``tol``.
        window: iterations per window of the stopping rule (also the logging period).
        min_iterations: never stop a level before this many iterations.
        crop: optimise on FIXED's foreground box only: the smallest box of the image grid
            holding every voxel of ``fixed_mask`` (> 0), or without a mask every voxel brighter
            than :data:`FOREGROUND` (normalised intensity), widened by ``crop_margin`` mm on each
            side (:func:`foreground_box`). Outside it FIXED is background, where LNCC has no
            signal; skull-stripped scans fill about half their grid. The result is on the whole
            grid: the velocity and λ are extended by their values on the box's faces, at the last
            control grid's resolution, and integrated there (a diffeomorphism everywhere). A
            pair whose foreground fills the grid runs as without the crop.
        crop_margin: margin of the foreground box, mm.
        progress: show tqdm progress bars.

    Every number has a range (:func:`hybridreg.config.bounded`; ``docs/configuration.md``),
    checked on construction.

    Raises:
        ValueError: on construction, a value outside its range or of the wrong type, an unknown
            mode, per-level lists of the wrong length, or a ``lambda_init`` the λ map cannot hold.
    """

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    level_spacing: tuple[float, ...] = bounded(lambda: (8.0, 4.0, 2.0, 1.0), 0.05, 100.0, factory=True)
    iterations: tuple[int, ...] = bounded(lambda: (150, 80, 30, 1), 0, 100_000, factory=True)
    control_factor: tuple[int, ...] = bounded(lambda: (1,), 1, 16, factory=True)
    lr: float = bounded(0.5, 1e-6, 100.0)
    lr_lambda: float = bounded(0.05, 1e-6, 10.0)
    lambda_mode: Literal["voxelwise", "uniform", "map", "regions"] = "voxelwise"
    map_update: Literal["closed_form", "gradient"] = "closed_form"
    region_smoothing: float = bounded(0.8, 0.0, 10.0)
    lambda_init: float = bounded(0.5, 1e-6, 1e3)
    velocity_smoothing: float = bounded(1.5, 0.0, 10.0)
    lr_final_fraction: float = bounded(1.0, 1e-6, 1.0)
    tol: float = bounded(1e-4, 0.0, 1.0)
    window: int = bounded(10, 1, 1000)
    min_iterations: int = bounded(20, 0, 100_000)
    crop: bool = True
    crop_margin: float = bounded(8.0, 0.0, 1000.0)
    progress: bool = True

    def __post_init__(self) -> None:
        check_bounds(self)  # lists given for the tuples become tuples here
        for name in ("iterations", "control_factor", "window", "min_iterations"):
            v = getattr(self, name)
            if any(isinstance(x, bool) or not isinstance(x, int) for x in (v if isinstance(v, tuple) else (v,))):
                raise ValueError(f"InstanceOptConfig: `{name}` must hold ints, got {v!r}")
        for name, options in (("lambda_mode", ("voxelwise", "uniform", "map", "regions")), ("map_update", ("closed_form", "gradient"))):
            if getattr(self, name) not in options:
                raise ValueError(f"InstanceOptConfig: `{name}` must be one of {list(options)}, got {getattr(self, name)!r}")
        n = len(self.level_spacing)
        if not n:
            raise ValueError("InstanceOptConfig: `level_spacing` must list at least one level (its grid spacing in mm),"
                             " got []")
        for name, sizes in (("level_spacing", (n,)), ("iterations", (n,)), ("control_factor", (1, n))):
            if len(getattr(self, name)) not in sizes:
                raise ValueError(f"InstanceOptConfig: `{name}` must list {' or '.join(map(str, sizes))} values (one per"
                                 f" level), got {getattr(self, name)!r}")
        if self.lambda_mode == "map" and self.objective.w_reg <= 0:
            raise ValueError("InstanceOptConfig: `objective.w_reg` must be > 0 with lambda_mode 'map'")
        if self.lambda_mode in ("voxelwise", "regions") and self.objective.hyperprior != "beta" and self.lambda_init > 5:
            raise ValueError(f"InstanceOptConfig: `lambda_init` must be <= 5 with a λ map (λ = softplus(θ) is clamped to 5), got"
                             f" {self.lambda_init!r}")
        if self.lambda_mode in ("voxelwise", "regions") and self.objective.hyperprior == "beta" and self.lambda_init >= 1:
            raise ValueError(f"InstanceOptConfig: `lambda_init` must be < 1 under the beta hyperprior (λ = sigmoid(θ)), got"
                             f" {self.lambda_init!r}")

    def control_factors(self) -> tuple[int, ...]:
        cf = self.control_factor
        return cf * len(self.level_spacing) if len(cf) == 1 else cf


KEEP_START_ITERATIONS = 20
"""A level of at least this many iterations that ends with a higher energy than at its start (both
evaluated under the level's final λ) hands on its start, not its end (``LevelHistory.kept_start``):
Adam's first steps of ``lr`` voxels can only leave an optimum it starts at (an exactly aligned pair),
and a level that ended uphill has failed (``docs/results.md``, "A level that ends uphill keeps its
start"). Shorter levels (a refinement's few steps, the default's one step at 1 mm) are left as they end."""


def level_grids(
    spatial: Sequence[int], spacing: Sequence[float], level_spacing: float, control_factor: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]:
    """Grids of one pyramid level: ``(shape, control_shape, level_voxel_size_mm)``.

    The level grid has voxels of ``level_spacing`` mm (never finer than the image) over the
    image's extent; the control grid (velocity and λ) is that grid divided by
    ``control_factor``.
    """
    shape = tuple(max(4, int(round(n * h / max(level_spacing, h)))) for n, h in zip(spatial, spacing))
    control = tuple(max(4, int(round(n / control_factor))) for n in shape)
    level_h = tuple(h * n / m for h, n, m in zip(spacing, spatial, shape))
    return shape, control, level_h


def levels_run(spatial: Sequence[int], spacing: Sequence[float], config: InstanceOptConfig) -> list[int]:
    """Indices of ``config``'s pyramid levels that run on an image of ``spatial`` voxels of
    ``spacing`` mm: every level but one whose :func:`level_grids` (image and control grid) are
    the previous level's, which would only repeat it (a level finer than the image, or levels
    clamped to the 4-voxel minimum)."""
    run, last = [], None
    for level, (lev_mm, cf) in enumerate(zip(config.level_spacing, config.control_factors())):
        grids = level_grids(spatial, spacing, lev_mm, cf)[:2]
        if grids != last:
            run.append(level)
        last = grids
    return run


#: Normalised intensity above which a voxel of FIXED counts as foreground for ``crop``
#: (:func:`foreground_box`): 1 % of the range :func:`hybridreg.io.normalize_intensity` maps to [0, 1].
FOREGROUND = 0.01


def foreground_box(fixed: torch.Tensor, spacing: Sequence[float], margin: float,
                   mask: torch.Tensor | None = None) -> tuple[slice, ...] | None:
    """The box of the image grid that ``crop`` optimises on (:class:`InstanceOptConfig`).

    Args:
        fixed: ``(B, C, *spatial)`` normalised FIXED images (the box is their union's).
        spacing: voxel size, mm per tensor axis. margin: mm added on each side of the box.
        mask: optional ``(B, 1, *spatial)`` mask on FIXED's grid: its voxels > 0 are the
            foreground (instead of the voxels brighter than :data:`FOREGROUND`).

    Returns:
        One ``slice`` per spatial axis (voxel indices, clipped to the grid), or ``None`` when
        the box is the whole grid or nothing is foreground.
    """
    fg = (mask > 0) if mask is not None else (fixed > FOREGROUND)
    fg = fg.flatten(0, 1).any(0)
    if not bool(fg.any()):
        return None
    box = []
    for k, (n, h) in enumerate(zip(fg.shape, spacing)):
        hit = torch.nonzero(fg.movedim(k, 0).flatten(1).any(1)).flatten()
        pad = int(-(-margin // h))  # whole voxels covering the margin
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, n)))
    return None if all(b.start == 0 and b.stop == n for b, n in zip(box, fg.shape)) else tuple(box)


def _resample(t: torch.Tensor, src: Sequence[tuple[float, float]], dst: Sequence[tuple[float, float]],
              field: bool) -> torch.Tensor:
    """``t`` ``(B, C, *grid)``, whose grid covers the extent ``src`` (``(start, stop)`` in image
    voxels, per axis), sampled once (linear, cell centres) on a grid of its own resolution over the
    extent ``dst`` (at least one voxel per axis); a point outside ``src`` takes the value of the
    nearest face (border padding). A ``field`` is in voxels of its grid; a uniform
    ``(B, C, 1, ...)`` tensor is returned as it is."""
    if all(n == 1 for n in t.shape[2:]):
        return t
    d = t.dim() - 2
    size = [max(1, round((d1 - d0) * n / (s1 - s0))) for (s0, s1), (d0, d1), n in zip(src, dst, t.shape[2:])]
    scale = [(s1 - s0) / n for (s0, s1), n in zip(src, t.shape[2:])]  # image voxels per voxel of t
    step = [(d1 - d0) / m / sc for (d0, d1), m, sc in zip(dst, size, scale)]  # t's voxels per new voxel
    vm = torch.zeros(t.shape[0], d, d + 1, dtype=t.dtype, device=t.device)
    for k, ((s0, _), (d0, d1), m, sc) in enumerate(zip(src, dst, size, scale)):  # new index j -> t's index
        vm[:, k, k], vm[:, k, d] = step[k], (d0 + 0.5 * (d1 - d0) / m - s0) / sc - 0.5
    out = warp(t, t.new_zeros((t.shape[0], d, *size)), padding_mode="border", voxel_map=vm)
    return out / torch.tensor(step, dtype=t.dtype, device=t.device).view(1, d, *(1,) * d) if field else out


def _crop(t: torch.Tensor | None, box: tuple[slice, ...], spatial: Sequence[int], field: bool) -> torch.Tensor | None:
    """``t`` (on any grid over the whole image extent ``spatial``) on a grid of its own
    resolution over ``box`` (one sampling: a coarse initial velocity is not blurred by a round
    trip through the image grid)."""
    if t is None:
        return None
    return _resample(t, [(0, n) for n in spatial], [(b.start, b.stop) for b in box], field)


def _uncrop(t: torch.Tensor, box: tuple[slice, ...], spatial: Sequence[int], field: bool) -> torch.Tensor:
    """``t`` (on any grid over ``box``) over the whole image extent ``spatial`` on a grid of its
    own resolution (the grid it was optimised on, as without the box), extended by its values on
    the box's faces."""
    return _resample(t, [(b.start, b.stop) for b in box], [(0, n) for n in spatial], field)


def register_pair(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    config: InstanceOptConfig | None = None,
    *,
    spacing: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    init_velocity: torch.Tensor | None = None,
    init_lambda: torch.Tensor | None = None,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    moving_map: torch.Tensor | None = None,
    moving_spacing: Sequence[float] | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    regions: torch.Tensor | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` by instance optimization (method §2.1).

    Args:
        fixed, moving: ``(B, C, *spatial)`` images on the same grid (2D or 3D), intensities
            normalised to about [0, 1].
        config: :class:`InstanceOptConfig` (defaults if ``None``).
        spacing: voxel size in mm per tensor axis of the image grid (``None`` = 1 mm).
        device: where to optimise (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); ``None`` keeps the
            inputs' device. Results are returned on that device.
        init_velocity: optional ``(B, d, *any)`` SVF in voxels of its own grid (e.g. a
            network's output) to start from; resampled to the first level's control grid.
        init_lambda: optional ``(B, 1, *any)`` λ map to start from (voxelwise mode; its
            mean per pair in map mode; its mean over each region in regions mode).
        callback: optional ``callback(level, iteration, velocity, lam)``, called every
            ``config.window`` iterations (and after a level's last one) with the current
            detached SVF ``(B, d, *control)`` (voxels of the level's control grid, after the
            preconditioner) and λ -- with ``config.crop``, both over the whole image extent at the
            control grid's resolution, extended from the box -- for time-to-accuracy curves (its
            run time counts in ``seconds``).
        moving_map: optional ``(B, d, d + 1)`` map from fixed to moving voxel indices (an
            affine pre-alignment, :func:`hybridreg.affine.voxel_map`); ``moving`` then lies
            on its own grid with voxel size ``moving_spacing`` (mm per tensor axis; ``None``:
            ``spacing``, as every solver takes it; given without a map, it is refused) and
            is sampled through the map on every level (one interpolation; its pyramid is
            made on its own grid).
        fixed_mask, moving_mask: optional ``(B, 1, *grid)`` masks on each image's grid that
            restrict the image match (:func:`hybridreg.objective.evaluate`).
        regions: ``(B, 1, *spatial)`` integer label map on FIXED's grid, required by (and
            only used with) ``lambda_mode="regions"``: one λ per label value.

    A level of at least :data:`KEEP_START_ITERATIONS` iterations whose energy ends above its
    start's (both under its final λ) hands on its start velocity (``LevelHistory.kept_start``).

    A batch of B > 1 pairs is B independent registrations in one optimization (batched
    instance optimization, ``hybridreg batch --batch-size``): the energy minimised is the sum
    of the pairs' energies (:func:`hybridreg.objective.evaluate` with ``per_pair``), so Adam,
    elementwise, takes each pair's own steps, and each pair stops on its own
    (:func:`instance_opt.minimize.minimize`). With ``crop=False`` the pairs' results equal
    one-pair runs' up to floating-point order; with ``crop`` (the default) the pairs share one
    foreground box, the union of theirs (:func:`foreground_box`), so a pair whose own box is
    smaller is optimised on a larger grid than alone, and its result differs from its one-pair
    run's (by up to 2.6 voxels, 0.28 on average, on one 2D pair). The pairs share the grids:
    same image shapes and spacing.

    Returns:
        :class:`hybridreg.solvers.RegistrationResult`: displacement (voxels, image grid),
        velocity and λ on the finest control grid (with ``config.crop`` and a foreground box
        smaller than the grid: over the whole image extent at that grid's resolution, extended
        from the box), warped image,
        one history entry per level run (its grids the box's with ``crop``; coarse to fine; a
        skipped level has none), seconds, final energy terms on the image grid (for B > 1
        the batch's, with each pair's in ``pair_histories`` / ``pair_final_terms``:
        :meth:`~hybridreg.solvers.RegistrationResult.pair`).

    Raises:
        TypeError, ValueError: malformed images (shape, NaN/Inf), spacing, inits or ``regions``.
    """
    cfg = config or InstanceOptConfig()
    check_images(fixed, moving, fn="register_pair", same_grid=moving_map is None, fixed_mask=fixed_mask,
                 moving_mask=moving_mask, moving_map=moving_map, moving_spacing=moving_spacing)
    d = fixed.dim() - 2
    h = check_spacing(spacing, d, fn="register_pair")
    dev = torch.device(device) if device is not None else fixed.device
    fixed, moving = fixed.to(dev), moving.to(dev)
    dtype = fixed.dtype
    spatial, m_spatial = tuple(fixed.shape[2:]), tuple(moving.shape[2:])
    h_m = check_spacing(moving_spacing, d, fn="register_pair") if moving_spacing is not None else h
    B = fixed.shape[0]
    # a (1, 1, ...) mask serves every pair of a batch: expanded, so that the running pairs can be indexed
    moving_map, fixed_mask, moving_mask = (None if t is None else t.to(dev, dtype) for t in (moving_map, fixed_mask, moving_mask))
    fixed_mask, moving_mask = (None if t is None else t.expand(B, *t.shape[1:]) for t in (fixed_mask, moving_mask))
    kind = cfg.objective.hyperprior if cfg.objective.hyperprior != "none" else "normal"
    mode = cfg.lambda_mode
    obj = (cfg.objective if mode in ("voxelwise", "regions")
           else replace(cfg.objective, hyperprior="none", log_det=cfg.objective.log_det or mode == "map"))
    if mode == "regions":
        if regions is None or regions.is_floating_point() or tuple(regions.shape) != (B, 1) + spatial:
            raise ValueError(f"register_pair(): `regions` must be an integer (B={B}, 1, *{spatial}) label map on FIXED's grid with"
                             f" lambda_mode 'regions', got {None if regions is None else (regions.dtype, tuple(regions.shape))}")
        regions = regions.to(dev)
    if init_velocity is not None and (init_velocity.dim() != d + 2 or init_velocity.shape[:2] != (B, d)):
        raise ValueError(f"register_pair(): `init_velocity` must be (B={B}, d={d}, *grid), got {tuple(init_velocity.shape)}")
    if init_lambda is not None and (init_lambda.dim() != d + 2 or init_lambda.shape[:2] != (B, 1)):
        raise ValueError(f"register_pair(): `init_lambda` must be (B={B}, 1, *grid), got {tuple(init_lambda.shape)}")

    for name, init in (("init_velocity", init_velocity), ("init_lambda", init_lambda)):
        if init is not None and not bool(torch.isfinite(init).all()):
            raise ValueError(f"register_pair(): `{name}` contains NaN or Inf values")
    if init_lambda is not None and not bool((init_lambda > 0).all()):
        raise ValueError(f"register_pair(): `init_lambda` must be > 0, its smallest value is {init_lambda.min().item():g}")
    whole = None  # with `crop`: what the box replaces (FIXED's grid and MOVING's map), for the result
    box = foreground_box(fixed, h, cfg.crop_margin, fixed_mask) if cfg.crop else None
    if box is not None:
        whole = (fixed, moving_map, fixed_mask, spatial)
        if moving_map is None:  # MOVING stays whole, sampled through the box's shift
            moving_map = torch.eye(d, d + 1, dtype=dtype, device=dev).expand(B, d, d + 1)
        origin = torch.tensor([b.start for b in box], dtype=dtype, device=dev)
        moving_map = torch.cat([moving_map[:, :, :d], (moving_map[:, :, d] + moving_map[:, :, :d] @ origin)[..., None]], -1)
        fixed, fixed_mask, regions = (None if t is None else t[(..., *box)] for t in (fixed, fixed_mask, regions))
        init_velocity, init_lambda = _crop(init_velocity, box, spatial, True), _crop(init_lambda, box, spatial, False)
        spatial = tuple(fixed.shape[2:])
    velocity = init_velocity.detach().to(dev, dtype) if init_velocity is not None else None
    theta = None  # λ's parameter: θ with λ = sigmoid/softplus(θ) (voxelwise), log λ (map)
    if mode == "voxelwise" and init_lambda is not None:
        theta = param_from_lambda(init_lambda.detach().to(dev, dtype), kind)
    elif mode == "regions" and init_lambda is not None:  # each region starts at init_lambda's mean over it
        members = region_members(regions, init_lambda.shape[2:], dtype)[1]
        lam_k = (members * init_lambda.detach().to(dev, dtype)).flatten(2).sum(-1) / members.flatten(2).sum(-1).clamp_min(1e-12)
        theta = param_from_lambda(lam_k, kind).reshape((B, members.shape[1]) + (1,) * d)
    elif mode == "regions":
        theta = param_from_lambda(torch.tensor(float(cfg.lambda_init)), kind).to(dev, dtype).expand(
            (B, len(torch.unique(regions))) + (1,) * d).clone()
    elif mode == "map":
        start = (init_lambda.detach().to(dev, dtype).flatten(1).mean(1) if init_lambda is not None
                 else torch.full((B,), float(cfg.lambda_init), dtype=dtype, device=dev))
        theta = start.clamp_min(1e-12).log().view((B, 1) + (1,) * d)
    uniform_lam = torch.full((B, 1) + (1,) * d, float(cfg.lambda_init), dtype=dtype, device=dev)

    def smooth(w: torch.Tensor) -> torch.Tensor:
        return gaussian_smooth(w, cfg.velocity_smoothing) if cfg.velocity_smoothing > 0 else w

    level_members: dict = {}  # regions: the membership on the current level's control grid

    def lam_of(th: torch.Tensor | None) -> torch.Tensor:
        if th is None:
            return uniform_lam
        if mode == "regions":
            return paint_region_lambda(level_members["grid"], lambda_from_param(th, kind), cfg.region_smoothing)
        return th.exp() if mode == "map" else lambda_from_param(th, kind)

    stopping = RelativeChangeStopping(cfg.tol, cfg.window, cfg.min_iterations)
    history: list[LevelHistory] = []
    pair_histories: list[list[LevelHistory]] = [[] for _ in range(B)] if B > 1 else []
    t_start = time.perf_counter()
    names = EnergyTerms._fields
    run_levels = levels_run(spatial, h, cfg)
    for k_run, level in enumerate(run_levels):
        lev_mm, n_iter, cf = cfg.level_spacing[level], cfg.iterations[level], cfg.control_factors()[level]
        shape, control, level_h = level_grids(spatial, h, lev_mm, cf)
        # MOVING on its own grid keeps its full resolution at the image-resolution level: its
        # down-sampled copy would be blurred twice (block average, then linear sampling)
        m_shape = (shape if moving_map is None else m_spatial if shape == spatial
                   else level_grids(m_spatial, h_m, lev_mm, 1)[0])
        f_l, m_l = resize_image(fixed, shape), resize_image(moving, m_shape)
        grids = dict(moving_map=None if moving_map is None else rescale_voxel_map(moving_map, (spatial, shape), (m_spatial, m_shape)),
                     fixed_mask=None if fixed_mask is None else resize_image(fixed_mask, shape),
                     moving_mask=None if moving_mask is None else resize_image(moving_mask, m_shape))
        # the SVF is base + G_σ * w with Adam on w from 0: the first level starts exactly at
        # `init_velocity`; a finer level at the coarser one's result smoothed once more by G_σ.
        # (Until stop 68 the SVF was G_σ * w from w = the start, which smoothed `init_velocity`
        # too. Starting finer levels unsmoothed gave colin27 <- vxm the same Dice at a rougher
        # field, 0.706 at SDlogJ 0.182 against 0.163: docs/results.md, stop 68.)
        base = (resize_field(velocity, control) if velocity is not None
                else torch.zeros((B, d) + control, dtype=dtype, device=dev))
        if k_run > 0:
            base = smooth(base)
        w = torch.zeros_like(base, requires_grad=True)

        def svf(u: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
            return (base if idx is None else base[idx]) + smooth(u if idx is None else u[idx])

        params = [{"params": [w], "lr": cfg.lr}]
        th = None
        if mode == "regions":
            level_members["grid"] = region_members(regions, control, dtype)[1]
        if mode in ("map", "regions"):
            th = theta.clone()
            if mode == "regions" or cfg.map_update == "gradient":
                th.requires_grad_(True)
                params.append({"params": [th], "lr": cfg.lr_lambda})
        elif mode == "voxelwise":
            if theta is not None:
                th = resize_image(theta, control).clone()
            else:
                th = param_from_lambda(torch.tensor(float(cfg.lambda_init)), kind).to(dev, dtype)
                th = th.expand((B, 1) + control).clone()
            th.requires_grad_(True)
            params.append({"params": [th], "lr": cfg.lr_lambda})
        opt = torch.optim.Adam(params)
        # kept if the level ends uphill of it (below); only a level that will be judged needs a copy
        frac = cfg.lr_final_fraction
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - (1.0 - frac) * i / max(n_iter - 1, 1))

        # which pairs of a batch still run; iterations of this level so far (the closed-form λ update's clock)
        running: dict = {"index": None, "inputs": (f_l, m_l, grids), "last": None, "calls": 0}
        closed_form = mode == "map" and cfg.map_update == "closed_form"

        def closure() -> EnergyTerms:
            idx, (f_r, m_r, g_r) = running["index"], running["inputs"]
            lam = lam_of(th) if idx is None else lam_of(th)[idx]
            part = evaluate(f_r, m_r, svf(w, idx), lam, obj, level_h, per_pair=True, **g_r).terms
            running["calls"] += 1
            if closed_form and running["calls"] % cfg.window == 0:  # λ given u, exactly (block-coordinate descent)
                with torch.no_grad():
                    th[slice(None) if idx is None else idx] = map_lambda(lam, part, shape, control).log()
            # the stopped pairs are not evaluated: their terms stay at their last values
            terms = part if idx is None else EnergyTerms(*(last.index_put((idx,), t) for last, t in zip(running["last"], part)))
            running["last"] = [t.detach() for t in terms]
            return terms

        def on_stop(stopped: list[int]) -> None:
            idx = torch.tensor([b for b in range(B) if b not in set(stopped)], device=dev)
            running["index"] = idx
            running["inputs"] = (f_l[idx], m_l[idx], {k: None if t is None else t[idx] for k, t in grids.items()})

        def report(it: int) -> None:
            vel, lam = svf(w).detach(), lam_of(th).detach()
            if whole is not None:  # the callback sees the whole extent, at the control grid's resolution
                vel, lam = _uncrop(vel, box, whole[3], True), _uncrop(lam, box, whole[3], False)
            callback(level, it, vel, lam)

        desc = f"level {k_run + 1}/{len(run_levels)} {'x'.join(map(str, shape))}"
        with progress.bar(total=n_iter, desc=desc, enabled=cfg.progress, leave=False, dynamic_ncols=True) as bar:
            run = minimize(closure, opt, sched, stopping, n_iter, window=cfg.window,
                           callback=report if callback is not None else None, progress_bar=bar, on_stop=on_stop)
        progress.log(f"{desc}: {run.iterations} iterations, {run.seconds:.1f} s, {run.status.value}"
                     + "".join(f", {k} {v[-1]:.4f}" for k, v in run.terms.items() if v), enabled=cfg.progress)
        kept = [False] * B  # pairs whose level ended uphill of its start: the start is kept
        if run.iterations >= KEEP_START_ITERATIONS:
            with torch.no_grad():
                lam = lam_of(th)
                end, start = (evaluate(f_l, m_l, svf(u), lam, obj, level_h, per_pair=True, **grids).terms.total
                              for u in (w, torch.zeros_like(w)))
                uphill = end > start
                if bool(uphill.any()):
                    w[uphill] = 0.0
                    kept = uphill.tolist()
        level_of = lambda terms, iterations, status, keep: LevelHistory(  # noqa: E731
            spacing=level_h, shape=shape, control_shape=control, terms={k: terms.get(k, []) for k in names},
            iterations=iterations, status=status, seconds=run.seconds, kept_start=keep)
        history.append(level_of(run.terms, run.iterations, run.status, any(kept)))
        for b, pair in enumerate(pair_histories):
            if not (pair and pair[-1].status == Status.DIVERGED):  # a pair's history ends where it diverged
                pair.append(level_of(run.pair_terms[b], run.pair_iterations[b], run.pair_status[b], kept[b]))
        velocity = svf(w).detach()
        if th is not None:
            theta = th.detach()
        if all(s == Status.DIVERGED for s in run.pair_status):
            break  # the finer levels would start from NaN; the result reports the divergence

    with torch.no_grad():
        lam = lam_of(theta)
        if velocity is None:  # no levels ran: identity
            velocity = torch.zeros((B, d) + spatial, dtype=dtype, device=dev)
        if whole is not None:
            fixed, moving_map, fixed_mask, spatial = whole
            # at the control grid's resolution: the SVF is integrated on the grid it was optimised on
            velocity, lam = _uncrop(velocity, box, spatial, True), _uncrop(lam, box, spatial, False)
        ev = evaluate(fixed, moving, velocity, lam, obj, h, moving_map=moving_map, fixed_mask=fixed_mask,
                      moving_mask=moving_mask, per_pair=True)
    final, pair_final = final_terms_of(ev.terms)
    return RegistrationResult(displacement=ev.displacement, velocity=velocity, lam=lam, warped=ev.warped, history=history,
                              seconds=time.perf_counter() - t_start, config=cfg, final_terms=final, svf_steps=obj.svf_steps,
                              pair_histories=pair_histories or None, pair_final_terms=pair_final)


class InstanceSolver:
    """The instance optimizer as a :class:`hybridreg.solvers.Solver` (``--solver instance``,
    method §2.1): configured by :class:`InstanceOptConfig`, run by :func:`register_pair`."""

    name = "instance"
    config_class = InstanceOptConfig

    def default_config(self) -> InstanceOptConfig:
        return InstanceOptConfig()

    def configure(self, config: InstanceOptConfig) -> InstanceOptConfig:
        return config

    def register_pair(self, fixed: torch.Tensor, moving: torch.Tensor, config: InstanceOptConfig | None = None, *,
                      fixed_direction: Sequence[float] | None = None, **kwargs) -> RegistrationResult:
        """:func:`register_pair` (same arguments, shapes, units and errors); the energy does not
        depend on the grid's orientation, so ``fixed_direction`` is not used."""
        return register_pair(fixed, moving, config, **kwargs)


SOLVER = InstanceSolver()
"""The entry point ``instance`` of the ``hybridreg.solvers`` group."""
