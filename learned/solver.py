"""Amortized registration with a trained λ-head network, optionally refined per case by
instance optimization (method §2.2–2.3).

``register_pair(fixed, moving, LearnedConfig(...))`` has the instance solver's signature and
returns :class:`hybridreg.solvers.RegistrationResult`; :data:`LEARNED` and
:data:`LEARNED_REFINE` are the :class:`hybridreg.solvers.Solver` entry points:

* ``refine=False`` (``--solver learned``): one network pass (two with
  ``inverse_consistent``, the default: the swapped pair's negated SVF averaged in), then
  ``cascade`` recursive passes in the mid-space of the field so far (default one). The network runs at the voxel
  size it was trained at: inputs on another grid are resampled to it (cell-centred linear
  interpolation over the same extent), and the predicted SVF and λ are used as a control grid
  of the input grid -- :func:`hybridreg.objective.evaluate` integrates the SVF there by scaling
  and squaring and up-samples the displacement to the input grid.
* ``refine=True`` (``--solver learned+refine``): the instance optimizer starts from the
  network's velocity and λ and runs the short schedule ``refine_config`` on the instance
  solver's energy when the network was trained on its model (the shipped network), else on the
  network's own energy (``refine_objective_from_weights``; the conditional solvers refine their
  code's energy).

:data:`LEARNED_CONDITIONAL` and :data:`LEARNED_CONDITIONAL_REFINE` (``--solver
learned-conditional[+refine]``, :class:`ConditionalConfig`) run a conditional network (method
§3.2-3.3, HyperTMSPR / CSAIN) at the energy's hyperparameters given at test time
(``--set objective.w_reg=2.5``) and, with ``region_lambda`` (``--region-lambda FILE.yaml``
and ``--fixed-labels``), conditioned on a region-wise λ map that is also the energy's λ; the
refinement minimises the energy at the same values.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from hybridreg.config import bounded, check_bounds
from hybridreg.objective import evaluate
from hybridreg.priors import LAMBDA_BOUNDS, paint_regions
from hybridreg.regularization import check_spacing
from hybridreg.solvers import LevelHistory, RegistrationResult, Status, check_images, final_terms_of, synchronize
from hybridreg.spatial import resize_field, resize_image, scaling_and_squaring, warp
from instance_opt import InstanceOptConfig
from instance_opt import register_pair as instance_register_pair

from .network import CODE_KEYS
from .weights import hyperparameter_code, load_weights

__all__ = ["DEFAULT_WEIGHTS", "UNIFORM_WEIGHTS", "CONDITIONAL_WEIGHTS", "NAMED_WEIGHTS", "weights_path", "LearnedConfig",
           "Hyperparameters", "ConditionalConfig", "LearnedSolver", "LEARNED", "LEARNED_REFINE", "LEARNED_CONDITIONAL",
           "LEARNED_CONDITIONAL_REFINE", "half_grid_refine", "register_pair"]

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


CONDITIONAL_WEIGHTS = Path(__file__).parent / "weights" / "conditional" / "learned_conditional.pt"
"""The conditional network (``--solver learned-conditional``): the shipped weights made
conditional on ``objective.w_reg`` ∈ [1, 16] and ``objective.hyper_strength`` ∈ [0.02, 1]
(FiLM) and on a region-wise λ map (CSAIN), fine-tuned with ``configs/learned_conditional.yaml``;
log and README next to the file."""

_DIR = Path(__file__).parent / "weights"
NAMED_WEIGHTS = {
    "shipped": DEFAULT_WEIGHTS,
    "conditional": CONDITIONAL_WEIGHTS,
    "stage1": _DIR / "stage1" / "learned_bundled_2mm_stage1.pt",
    "stage2": _DIR / "stage2" / "learned_bundled_2mm_stage2.pt",
    "stage3": _DIR / "stage3" / "learned_bundled_2mm_stage3.pt",
    "uniform": UNIFORM_WEIGHTS,
    **{f"fixed-w{w}": _DIR / "fixed_wreg" / f"learned_fixed_w{w}.pt" for w in (1, 2, 8, 16)},
}
"""Weight files that ship with the package, by the name ``--weights`` accepts: the default
(``shipped``), the conditional network (``conditional``), the earlier stages of its training
(``learned/weights/stage*/``, kept for comparison), the uniform-λ baseline, and the shipped
network fine-tuned at one ``w_reg`` of 1, 2, 8, 16 (``fixed-w1`` ... ``fixed-w16``: the
conditional network's fixed-value baselines, ``configs/learned_fixed_wreg.yaml``)."""


def weights_path(weights: str | os.PathLike, default: Path = DEFAULT_WEIGHTS) -> Path:
    """The file of ``weights``: a name of :data:`NAMED_WEIGHTS`, a path, or empty (``default``:
    the shipped network).

    Raises:
        FileNotFoundError: no such file (the message names ``--weights`` and lists the names).
    """
    w = str(weights)
    p = default if not w else NAMED_WEIGHTS.get(w, Path(w))
    if not p.is_file():
        raise FileNotFoundError(f"`--weights`: file not found: {w} (a weight file or one of {', '.join(NAMED_WEIGHTS)})")
    return p


def _refine_default(iterations: int = 6) -> InstanceOptConfig:
    """``iterations`` Adam iterations at 2 mm, no early stop, on the whole grid (the conditional
    solvers' refinement, measured so)."""
    return InstanceOptConfig(level_spacing=(2.0,), iterations=(iterations,), tol=0.0, min_iterations=1, window=5, crop=False)


def _refine_learned() -> InstanceOptConfig:
    """``LearnedConfig``'s refinement: 7 Adam iterations at 2 mm, then 2 at 1.75 mm (on a 1 mm image;
    on a 2 mm one the 1.75 mm level's grids are the 2 mm level's and it is skipped,
    :func:`instance_opt.solver.levels_run`), on FIXED's foreground box (``crop``, as the instance
    default; docs/results.md, "learned + refine on the foreground box" and "A 1.75 mm last level")."""
    return replace(_refine_default(), level_spacing=(2.0, 1.75), iterations=(7, 2), crop=True)


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
            ``objective`` is replaced by the network's training energy when
            ``refine_objective_from_weights`` says so). Default: 7 Adam iterations on the
            2 mm level (the shipped network's velocity grid), then 2 on a 1.75 mm level, no early
            stop, on FIXED's foreground box (``crop``); on a 2 mm image the 1.75 mm level is
            skipped (its grids would be the 2 mm level's). On the four ``realworld`` pairs (1 mm)
            the shipped network refined so came 0.0071 Dice below the instance default on average
            (0.0056-0.0094 per pair), at the same SDlogJ (0.157), in 0.27-0.33 of its time
            measured in one run, the affine stage included (``docs/results.md``, "A 1.75 mm last
            level", which also lists the schedules tried before: 6 at 2 mm and 2 at 1.5 mm,
            0.0077 below in 0.32-0.36).
        refine_objective_from_weights: ``None`` (default): the network's own energy unless
            it was trained on the model of ``refine_config.objective`` (by default the instance
            solver's energy, ``InstanceOptConfig().objective``), that is on the same objective
            up to LNCC's ε and the number of squarings, with voxelwise λ -- then that energy,
            so that learned + refine approaches the instance solver's result. The shipped
            network is such a case (trained with ε 1e-5 and five squarings against the
            instance default's 1e-6 and four, which also make each iteration cheaper); the
            earlier stages (LNCC window 9), the ``fixed-w*`` networks (another w_reg) and the
            uniform-λ network keep their own energy. ``False``: always ``refine_config``'s
            objective; ``True``: always the network's energy -- for a uniform-λ network
            (``NetworkConfig.lambda_mode="uniform"``) that includes its fixed λ, so the
            refinement runs with ``lambda_mode="uniform"`` and ``lambda_init = lambda_uniform``.
        progress: tqdm bars during refinement.
        inverse_consistent: without refinement, average the network's SVF with the negated SVF
            of a second pass on the swapped pair, ``v = (v(F, M) − v(M, F)) / 2`` -- the
            log-domain symmetrisation of symmetric log-domain demons (Vercauteren et al.,
            MICCAI 2008): exp(−v(M, F)), the inverse of the swapped pass's transform, is a
            second estimate of exp(v(F, M)). λ stays the forward pass's (FIXED's frame); a
            region-conditioned swapped pass sees the region map carried into MOVING's frame by
            exp(−v(F, M)). Costs a second network pass; on the real pairs of the ``realworld``
            suite it gave the same Dice at an SDlogJ lower by 0.01–0.03 (``docs/results.md``,
            "Inverse-consistent inference"). Not used with ``refine``: the refinement reached
            the same Dice from either start.
        cascade: recursive passes after the first, without refinement (a recursive cascade,
            Zhao et al., ICCV 2019, at test time with one set of weights), each in the mid-space
            of the field so far: pass ``k`` registers FIXED ∘ exp(−v/2) to MOVING ∘ exp(v/2) and
            its SVF is added, ``v ← v + v_k`` (MOVING ∘ exp(v/2) ∘ exp(v_k) ∘ exp(v/2) ≈ FIXED,
            whose SVF is v + v_k by the first-order Baker–Campbell–Hausdorff term, so the result
            stays one SVF of the energy, method §1.1). With ``inverse_consistent`` the swapped
            pair sees the same images swapped, so the sum stays exactly inverse-consistent
            (|φ_MF ∘ φ_FM − id| 0.16 mm on the bundled test pairs, the scaling and squaring's
            discretisation; a pass on MOVING ∘ exp(v) alone gave 0.49 mm). The network under-fits
            its own energy (at w_reg 4 it stops at SDlogJ 0.12 on the ``realworld`` pairs where
            instance optimization reaches 0.17); one more pass lowered that energy on each of four
            bundled test pairs (2 mm; a second raised it again) and brings the learned solver to
            the instance solver's regularity on real scans (``docs/results.md``, "A recursive
            pass of the learned solver"). Not used with ``refine`` (the refinement reached the
            same Dice from either start).
    """

    weights: str = ""
    default_weights: ClassVar[Path] = DEFAULT_WEIGHTS  # the file an empty ``weights`` means
    refine: bool = False
    refine_config: InstanceOptConfig = field(default_factory=_refine_learned)
    refine_objective_from_weights: bool | None = None
    progress: bool = True
    inverse_consistent: bool = True
    cascade: int = bounded(1, 0, 4)

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class Hyperparameters:
    """The energy's hyperparameters a conditional network takes at test time (its code, method
    §3.3; :data:`learned.network.CODE_KEYS`): ``--set objective.w_reg=2.5``. Each must lie in
    the network's training range (``NetworkConfig.w_reg_range``, ``hyper_strength_range``;
    checked by :meth:`LearnedSolver.configure`). Defaults: the instance solver's."""

    w_reg: float = bounded(4.0, 1e-4, 1e4)
    hyper_strength: float = bounded(0.175, 1e-6, 1e4)

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True)
class ConditionalConfig(LearnedConfig):
    """Settings of the conditional solvers (``learned-conditional[+refine]``): those of
    :class:`LearnedConfig` (``weights`` empty = :data:`CONDITIONAL_WEIGHTS`), except that the
    refinement minimises the network's energy at the code's values
    (``refine_objective_from_weights`` True) with 12 iterations on the 2 mm level (the schedule
    of its regularity fronts), and

    Attributes:
        objective: the code, :class:`Hyperparameters`; the energy (and the refinement's) is the
            network's training energy at these values.
        region_lambda: ``{label: λ_k}`` of FIXED's label map (``--region-lambda FILE.yaml``,
            with ``--fixed-labels``): the network is conditioned on the painted and smoothed
            map Λ (CSAIN, method §3.2), which is also the energy's λ; labels not listed get
            ``region_default``. Empty: the λ head's voxelwise λ.
        region_default: λ of labels that ``region_lambda`` does not list.
        region_smoothing: σ of Λ's Gaussian smoothing in voxels of the network's grid (its
            training value, CSAIN's 0.8).
    """

    default_weights: ClassVar[Path] = CONDITIONAL_WEIGHTS
    refine_config: InstanceOptConfig = field(default_factory=partial(_refine_default, 12))
    refine_objective_from_weights: bool | None = True
    objective: Hyperparameters = field(default_factory=Hyperparameters)
    region_lambda: dict = field(default_factory=dict)
    region_default: float = bounded(1.0, 1e-6, 5.0)
    region_smoothing: float = bounded(0.8, 0.0, 10.0)

    def __post_init__(self) -> None:
        check_bounds(self)
        if not isinstance(self.region_lambda, dict):
            raise ValueError(f"`region_lambda` must be a mapping of label to λ, got {type(self.region_lambda).__name__}")
        values = {}
        for k, v in self.region_lambda.items():
            try:
                label = int(k)
            except (TypeError, ValueError):
                raise ValueError(f"`region_lambda`: labels must be integers, got {k!r}") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 5.0:
                raise ValueError(f"`region_lambda.{k}` must be a number in (0, 5] (the λ prior's range), got {v!r}")
            values[label] = float(v)
        object.__setattr__(self, "region_lambda", values)

    @property
    def lambda_mode(self) -> str:
        """``"regions"`` when ``region_lambda`` is given (FIXED's labels are then needed), else ``"voxelwise"``."""
        return "regions" if self.region_lambda else "voxelwise"


_load = lru_cache(maxsize=4)(load_weights)  # (path, device) -> load_weights(path, device), both str


def register_pair(fixed: torch.Tensor, moving: torch.Tensor, config: LearnedConfig | None = None, *,
                  spacing: Sequence[float] | None = None, device: torch.device | str | None = None,
                  moving_map: torch.Tensor | None = None, moving_spacing: Sequence[float] | None = None,
                  fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None,
                  regions: torch.Tensor | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with the network (and optional refinement).

    Args:
        fixed, moving: ``(B, 1, *spatial)`` images on one grid, intensities about [0, 1]
            (:func:`hybridreg.io.normalize_intensity`), 2D or 3D matching the network; float32
            or float64: the network runs in its weights' dtype (float32), the result (and the
            refinement) in ``fixed``'s.
        config: :class:`LearnedConfig`.
        spacing: voxel size in mm (array-axis order); default 1 mm.
        device: where to run (default: the inputs' device).
        moving_map, moving_spacing, fixed_mask, moving_mask: a moving image on its own grid
            and masks, as in :func:`instance_opt.register_pair`; the network sees the moving
            image resampled once onto the fixed grid through ``moving_map``, the energy and
            the refinement sample it on its own grid.
        regions: ``(B, 1, *spatial)`` integer label map on FIXED's grid, required by (and only
            used with) a :class:`ConditionalConfig` with ``region_lambda``.

    Returns:
        :class:`hybridreg.solvers.RegistrationResult`: displacement (voxels, image grid),
        velocity and λ on the network's grid (or, refined, at the refinement's last control grid's
        resolution over the whole image extent),
        warped image, history (the network pass -- ``iterations`` counts its passes, 2 with
        ``inverse_consistent``, twice that with one ``cascade`` pass -- status ``network`` -- ``diverged`` when its
        output is not finite, and then nothing is refined -- then the refinement's levels),
        seconds (network + refinement), final energy terms on the image grid, config ``cfg``.

    Raises:
        FileNotFoundError: missing weights. ValueError: a corrupt weight file, images of
            the wrong dimension for the network, mismatched shapes, NaNs; for a
            :class:`ConditionalConfig`: weights of a network that is not conditional, a value
            outside its range, ``region_lambda`` without ``regions``; for a plain
            :class:`LearnedConfig`: the weights of a conditional network.
    """
    cfg = config or LearnedConfig()
    dev = torch.device(device) if device is not None else fixed.device
    check_images(fixed, moving, fn="register_pair", same_grid=moving_map is None, fixed_mask=fixed_mask,
                 moving_mask=moving_mask, moving_map=moving_map, moving_spacing=moving_spacing)
    conditional = isinstance(cfg, ConditionalConfig)
    net, objective, train_spacing, _ = _load(str(weights_path(cfg.weights, cfg.default_weights)), str(dev))
    if conditional:
        _check_conditional(cfg, net.config)
        objective = replace(objective, **{k: getattr(cfg.objective, k) for k in CODE_KEYS})
    elif net.config.conditional or net.config.region_condition:
        raise ValueError("`--weights`: a conditional network runs with --solver learned-conditional[+refine]")
    d = net.config.ndim
    if fixed.dim() != d + 2:
        raise ValueError(f"`--solver`/`--weights`: the network registers {d}D images, FIXED and MOVING are {fixed.dim() - 2}D"
                         f" (register_pair(): `fixed` must be (B, 1, *{d} dims), got {tuple(fixed.shape)}); `--solver instance`"
                         " registers 2D and 3D images")
    spatial = tuple(fixed.shape[2:])
    h = check_spacing(spacing, d, fn="register_pair")
    fixed, moving = fixed.to(dev), moving.to(dev)
    grids = dict(moving_map=moving_map, fixed_mask=fixed_mask, moving_mask=moving_mask)
    grids = {k: None if v is None else v.to(dev, fixed.dtype) for k, v in grids.items()}
    on_fixed = moving if moving_map is None else \
        warp(moving, fixed.new_zeros((fixed.shape[0], d, *fixed.shape[2:])), voxel_map=grids["moving_map"])

    synchronize(dev)  # the clock starts once the copies and the warp above have run
    t0 = time.perf_counter()
    net_shape = tuple(max(4, int(round(n * hk / tk))) for n, hk, tk in zip(spatial, h, train_spacing))
    region = None
    if conditional and cfg.region_lambda:
        if regions is None or regions.is_floating_point() or tuple(regions.shape) != (fixed.shape[0], 1) + spatial:
            raise ValueError("register_pair(): `regions` (on the CLI, `--fixed-labels`) is required with `region_lambda`:"
                             " an integer (B, 1, *spatial) label map on FIXED's grid")
        region = paint_regions(regions.to(dev), cfg.region_lambda, default=cfg.region_default,  # on the network's grid
                               smooth_sigma=cfg.region_smoothing, dtype=fixed.dtype, shape=net_shape)
    ndt = next(net.parameters()).dtype  # the network runs in its weights' dtype; its results return in fixed's
    with torch.no_grad():
        f_in = (resize_image(fixed, net_shape) if net_shape != spatial else fixed).to(ndt)
        m_in = (resize_image(on_fixed, net_shape) if net_shape != spatial else on_fixed).to(ndt)
        code = hyperparameter_code(objective, fixed.shape[0], fixed).to(ndt) if conditional else None
        region = None if region is None else region.to(ndt)
        out = net(f_in, m_in, code, region)
        velocity, passes = _network_pass(net, f_in, m_in, code, region, out.velocity, cfg, objective.svf_steps)
        for _ in range(0 if cfg.refine else cfg.cascade):
            step, n = _midpoint_pass(net, f_in, m_in, code, region, velocity, cfg, objective.svf_steps)
            velocity, passes = velocity + step, passes + n
    velocity, lam = velocity.to(fixed.dtype), out.lam.to(fixed.dtype)
    finite = bool(torch.isfinite(velocity).all() and torch.isfinite(lam).all())  # e.g. weights holding NaN
    net_level = LevelHistory(spacing=tuple(train_spacing), shape=net_shape, control_shape=tuple(velocity.shape[2:]),
                             terms={}, iterations=passes, status=Status.NETWORK if finite else Status.DIVERGED,
                             seconds=time.perf_counter() - t0)
    if not cfg.refine or not finite:
        with torch.no_grad():
            ev = evaluate(fixed, moving, velocity, lam, objective, h, per_pair=True, **grids)
        final, pair_final = final_terms_of(ev.terms)
        return RegistrationResult(displacement=ev.displacement, velocity=velocity, lam=lam, warped=ev.warped,
                                  history=[net_level], seconds=time.perf_counter() - t0, config=cfg,
                                  final_terms=final, svf_steps=objective.svf_steps, pair_final_terms=pair_final)
    rcfg = cfg.refine_config
    own = cfg.refine_objective_from_weights
    if own is None:  # the network's energy unless it was trained on the refinement's model (numerics aside)
        own = net.config.lambda_mode == "uniform" or \
            replace(objective, lncc_eps=rcfg.objective.lncc_eps, svf_steps=rcfg.objective.svf_steps) != rcfg.objective
    if own:
        rcfg = replace(rcfg, objective=objective)
        if net.config.lambda_mode == "uniform":
            rcfg = replace(rcfg, lambda_mode="uniform", lambda_init=net.config.lambda_uniform)
    if region is not None:  # refine one λ_k per region, starting from the given values
        rcfg = replace(rcfg, lambda_mode="regions", region_smoothing=cfg.region_smoothing)
        grids["regions"] = regions.to(dev)
    res = instance_register_pair(fixed, moving, replace(rcfg, progress=cfg.progress), spacing=h, device=dev,
                                 init_velocity=velocity, init_lambda=lam, moving_spacing=moving_spacing, **grids)
    for history in [res.history, *(res.pair_histories or [])]:
        history.insert(0, net_level)  # the network pass is the batch's, shared by its pairs
    res.seconds += net_level.seconds
    res.config = cfg
    return res


def _network_pass(net, fixed: torch.Tensor, moving: torch.Tensor, code: torch.Tensor | None,
                  region: torch.Tensor | None, forward: torch.Tensor | None, cfg: LearnedConfig,
                  svf_steps: int) -> tuple[torch.Tensor, int]:
    """The network's SVF ``(B, d, *control)`` for FIXED ← MOVING (inputs on its grid) and the
    number of passes it took: ``forward`` (or one pass) averaged with the swapped pass by
    :func:`_inverse_consistent` when ``cfg.inverse_consistent`` and not ``cfg.refine``."""
    if forward is None:
        forward = net(fixed, moving, code, region).velocity
    if cfg.inverse_consistent and not cfg.refine:
        return _inverse_consistent(net, fixed, moving, code, region, forward, svf_steps), 2
    return forward, 1


def _midpoint_pass(net, fixed: torch.Tensor, moving: torch.Tensor, code: torch.Tensor | None,
                   region: torch.Tensor | None, velocity: torch.Tensor, cfg: LearnedConfig,
                   svf_steps: int) -> tuple[torch.Tensor, int]:
    """A recursive pass in the mid-space (:attr:`LearnedConfig.cascade`): the SVF ``(B, d,
    *control)`` of :func:`_network_pass` on FIXED ∘ exp(−v/2) ← MOVING ∘ exp(v/2) (inputs and
    ``region`` on the network's grid; the region map carried into the mid-space with FIXED), and
    the number of passes it took. MOVING ∘ exp(v/2) ∘ exp(w) ≈ FIXED ∘ exp(−v/2) means MOVING ∘
    exp(v/2) ∘ exp(w) ∘ exp(v/2) ≈ FIXED, whose SVF is v + w to first order
    (Baker–Campbell–Hausdorff); the swapped pair (−v) sees the same two images swapped, so the
    sum stays exactly inverse-consistent when each pass is."""
    grid = fixed.shape[2:]
    half, back = (resize_field(scaling_and_squaring(s * velocity, svf_steps), grid) for s in (0.5, -0.5))
    if region is not None:
        region = warp(region, back, padding_mode="border")
    return _network_pass(net, warp(fixed, back), warp(moving, half), code, region, None, cfg, svf_steps)


def _inverse_consistent(net, fixed: torch.Tensor, moving: torch.Tensor, code: torch.Tensor | None,
                        region: torch.Tensor | None, forward: torch.Tensor, svf_steps: int) -> torch.Tensor:
    """``(forward − v(MOVING, FIXED)) / 2`` (:attr:`LearnedConfig.inverse_consistent`): the
    forward SVF ``(B, d, *control)`` averaged in the log domain with the negated SVF of the
    network's pass on the swapped pair (inputs on the network's grid); a region map
    ``(B, 1, *grid)`` on FIXED's frame is carried into MOVING's by exp(−forward) first."""
    if region is not None:
        back_map = resize_field(scaling_and_squaring(-forward, svf_steps), region.shape[2:])
        region = warp(region, back_map, padding_mode="border")
    return 0.5 * (forward - net(moving, fixed, code, region).velocity)


def _check_conditional(cfg: ConditionalConfig, net_cfg) -> None:
    """Raise ValueError (naming the key) unless the network is conditional and every value of
    the code lies in its training range."""
    if not net_cfg.conditional:
        raise ValueError("`--weights`: --solver learned-conditional needs a conditional network (network.conditional)")
    for key in CODE_KEYS:
        lo, hi = getattr(net_cfg, f"{key}_range")
        v = getattr(cfg.objective, key)
        if not lo <= v <= hi:
            raise ValueError(f"`objective.{key}` must lie in the conditional network's range [{lo:g}, {hi:g}], got {v!r}")
    if cfg.region_lambda:
        if not net_cfg.region_condition:
            raise ValueError("`region_lambda` (`--region-lambda`): the network is not conditioned on regions"
                             " (network.region_condition)")
        lo, hi = LAMBDA_BOUNDS[net_cfg.lambda_prior]
        bad = {k: v for k, v in {**cfg.region_lambda, "default": cfg.region_default}.items() if not lo <= v <= hi}
        if bad:
            raise ValueError(f"`region_lambda` (`--region-lambda`): λ must lie in [{lo:g}, {hi:g}] under the network's"
                             f" {net_cfg.lambda_prior} prior, got {bad}")


@dataclass(frozen=True)
class LearnedSolver:
    """The learned solvers as :class:`hybridreg.solvers.Solver` (method §2.2–2.3): the
    network alone (``--solver learned``) or refined by instance optimization
    (``learned+refine``); the name fixes :attr:`LearnedConfig.refine`. With
    ``config_class`` :class:`ConditionalConfig`, the conditional network (§3.2–3.3)."""

    name: str
    refine: bool
    config_class: type = LearnedConfig

    def default_config(self) -> LearnedConfig:
        return self.config_class(refine=self.refine)

    def configure(self, config: LearnedConfig) -> LearnedConfig:
        """``config`` with ``refine`` set by the solver's name and a weights name replaced by
        its file (:func:`weights_path`; raises FileNotFoundError for a missing one); for a
        conditional config, the network and the code's ranges are checked (ValueError naming
        the key). A config with ``refine: true`` (a ``+refine`` solver's ``config.yaml``) given to
        a solver that does not refine is refused (ValueError), not run without its refinement."""
        if type(config) is not self.config_class:
            raise ValueError(f"--solver {self.name} takes a {self.config_class.__name__}, got {type(config).__name__}")
        if config.refine and not self.refine:
            raise ValueError(f"`--config` has refine: true, the setting of --solver {self.name}+refine: give that solver, or"
                             " refine: false for the network alone")
        w = str(weights_path(config.weights, config.default_weights)) if config.weights else ""
        if isinstance(config, ConditionalConfig):
            _check_conditional(config, _load(w or str(config.default_weights), "cpu")[0].config)
        return replace(config, refine=self.refine, weights=w)

    def register_pair(self, fixed: torch.Tensor, moving: torch.Tensor, config: LearnedConfig | None = None, *,
                      fixed_direction: Sequence[float] | None = None, **kwargs) -> RegistrationResult:
        """:func:`register_pair` with ``config`` (default :meth:`default_config`) configured;
        ``fixed_direction`` is not used (the network sees the tensor axes as they are)."""
        return register_pair(fixed, moving, self.configure(config or self.default_config()), **kwargs)


LEARNED, LEARNED_REFINE = LearnedSolver("learned", False), LearnedSolver("learned+refine", True)
"""The entry points ``learned`` and ``learned+refine`` of the ``hybridreg.solvers`` group."""

LEARNED_CONDITIONAL = LearnedSolver("learned-conditional", False, ConditionalConfig)
LEARNED_CONDITIONAL_REFINE = LearnedSolver("learned-conditional+refine", True, ConditionalConfig)
"""The entry points ``learned-conditional`` and ``learned-conditional+refine``."""

