"""The registration methods the benchmark suite compares, in one registry.

Every method maps a pair to a :class:`MethodOutput` whose ``displacement`` follows the core
convention: ``(d, *shape)`` in voxels of the fixed grid, channels in array-axis order,
``warped(x) = moving(M(x + u(x)))`` with ``M`` the affine :attr:`MethodOutput.voxel_map`
(the identity for pre-aligned pairs). Metrics are computed from it by the same code for
every method (``benchmarks.suite``). Two kinds of pair:

* :class:`Pair` -- fixed and moving :class:`~hybridreg.data.sources.Volume` on the same grid,
  affinely pre-aligned (the bundled data): the methods register the arrays directly.
* :class:`FilePair` -- two scans as they come (``realworld``): image and label files, each
  on its own grid, orientation and intensity range, not aligned. The hybridreg solvers run
  through the stages of :func:`hybridreg.service.register_files` (its affine stage, then the
  solver on the fixed grid, then its metrics; no output files), the classical tools after
  their own or the same affine stage.

Each pair kind produces what the methods take from it (:meth:`Pair.files` /
:meth:`FilePair.files`: image files for ANTs; :meth:`Pair.on_fixed_grid` /
:meth:`FilePair.on_fixed_grid`: both images on the fixed grid for demons; ``prealigned``:
whether an affine stage is needed), so every method has one code path for both kinds except
the hybridreg solvers, which take the service's path on a :class:`FilePair`.

Methods:

* ``instance`` -- instance optimization with voxelwise λ (``InstanceOptConfig()`` defaults),
  with a Dice-against-time trace recorded as it runs.
* ``instance-uniform`` -- the same solver with one scalar λ and no hyperprior
  (``configs/instance_uniform_matched.yaml``: λ calibrated on the validation pairs so its
  SDlogJ matches the voxelwise solver's; ``python -m benchmarks calibrate-uniform``).
* ``learned`` / ``learned+refine`` -- the shipped network (half-grid U-Net plus the
  fine-tuned full-resolution velocity stage), alone and refined per case.
* ``learned-stage1`` / ``learned+refine-stage1`` -- stage 1 of the shipped network (the
  half-grid U-Net before fine-tuning, ``learned/weights/stage1/``): the voxelwise arm of the
  learned solver's paired comparison.
* ``learned-uniform`` / ``learned+refine-uniform`` -- its uniform arm: the same U-Net
  without the λ head, trained with the same data, schedule and seed as stage 1 on the
  uniform energy (``w_reg · λ`` = the calibrated 3.579 of the uniform instance solver;
  ``configs/learned_bundled_2mm_uniform.yaml``), alone and refined on that energy.
* ``ants-syn`` -- ANTs SyN (antspyx, optional): ``SyNOnly`` (no affine stage: the bundled
  images are already affinely aligned) with the CC metric (radius 2), 100/70/20 iterations
  at shrink factors 4/2/1 (fewer at full resolution than ANTs' scripts use, to keep the
  suite within an hour on 2 cores). On a :class:`FilePair`: ``SyN``, ANTs' own rigid +
  affine stages (mutual information) before the same SyN stage.
* ``sitk-demons`` -- SimpleITK's diffeomorphic demons, multi-resolution (4, 2, 1 shrink
  factors on the input grid), Gaussian smoothing of the update and of the field. On a
  :class:`FilePair`: after the service's affine stage (:func:`hybridreg.affine.align`, the
  same options), MOVING resampled through it onto FIXED's grid, both intensities normalised
  (:func:`hybridreg.io.normalize_intensity`) and MOVING's histogram matched to FIXED's
  (demons compares intensities directly).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import SimpleITK as sitk
import torch

from benchmarks.common import warm_up_device, warm_up_torch
from hybridreg.data.sources import Volume
from hybridreg.io import Geometry
from learned.regressor import REGRESSOR_WEIGHTS
from learned.solver import CONDITIONAL_WEIGHTS, NAMED_WEIGHTS, UNIFORM_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
UNIFORM_CONFIG = ROOT / "configs" / "instance_uniform_matched.yaml"
MAP_CONFIG = ROOT / "configs" / "instance_map.yaml"
REGIONS_CONFIG = ROOT / "configs" / "instance_regions.yaml"
FULL_RESOLUTION_CONFIG = ROOT / "configs" / "instance_full_resolution.yaml"
UNIFORM_TRAIN_CONFIG = "configs/learned_bundled_2mm_uniform.yaml"
STAGE1_WEIGHTS = NAMED_WEIGHTS["stage1"]
"""Stage 1 of the shipped weights (``--weights stage1``)."""
CONDITIONAL_SWEEP = (1.0, 2.0, 4.0, 8.0, 16.0)
"""The ``w_reg`` values at which the conditional network is compared with one network trained per
value (4: the shipped network and the methods' own entries; the others: ``FRONTS`` points)."""
FIXED_WREG_WEIGHTS = {w: NAMED_WEIGHTS[f"fixed-w{w:g}"] for w in CONDITIONAL_SWEEP if w != 4.0}
"""The conditional network's fixed-value baselines: the shipped network fine-tuned at one ``w_reg``
(``configs/learned_fixed_wreg.yaml``; ``--weights fixed-w1``, ``fixed-w2``, ``fixed-w8``, ``fixed-w16``)."""
MATCHED_CONFIG = ROOT / "configs" / "conditional_matched.yaml"
"""The conditional network at the instance solver's regularity (code w_reg 1) and its 5-iteration
refinement on the instance default energy: the methods ``learned-matched[+refine]``."""
REGION_LAMBDA = ROOT / "benchmarks" / "results" / "conditional" / "region_lambda.yaml"
"""The region weights tuned for the conditional network on the bundled validation pairs
(``hybridreg tune --solver learned-conditional``, ``configs/tune_conditional_regions.yaml``)."""


@dataclass
class OnFixedGrid:
    """Both images of a pair as SimpleITK float32 images on FIXED's grid.

    Attributes:
        fixed: FIXED. moving: MOVING resampled onto FIXED's grid (through the affine stage).
        voxel_map: ``(d, d + 1)`` affine map from FIXED voxel indices to MOVING's own voxel
            indices (:func:`hybridreg.affine.voxel_map`), ``None`` for a pre-aligned pair.
        seconds: wall seconds of the affine stage, the resampling and the histogram matching.
    """

    fixed: sitk.Image
    moving: sitk.Image
    voxel_map: np.ndarray | None = None
    seconds: float = 0.0


@dataclass
class Pair:
    """One benchmark pair: ``moving`` is registered to ``fixed`` (same grid)."""

    name: str
    kind: str  # "atlas" or "subject"
    fixed: Volume
    moving: Volume
    spacing: tuple[float, ...]  # mm per array axis
    geometry: Geometry

    prealigned: ClassVar[bool] = True  # the bundled images are affinely aligned, on one grid

    def files(self, folder: str | os.PathLike) -> tuple[str, str]:
        """Both images written as NIfTI into ``folder``: ``(fixed path, moving path)``."""
        from hybridreg.io import write_image

        paths = []
        for name, v in (("fixed", self.fixed), ("moving", self.moving)):
            p = str(Path(folder) / f"{name}.nii.gz")
            write_image(p, v.image, self.geometry)
            paths.append(p)
        return paths[0], paths[1]

    def on_fixed_grid(self) -> OnFixedGrid:
        """Both images as they are (already on one grid, aligned)."""
        return OnFixedGrid(_image(self.fixed.image, self.geometry), _image(self.moving.image, self.geometry))


@dataclass(frozen=True)
class FilePair:
    """One pair given as files, as the scans come: FIXED and MOVING on their own grids (size,
    spacing, orientation, physical frame, intensity range), not aligned; each label map on
    its own image's grid, holding the IDs ``labels`` (scored with
    :func:`hybridreg.metrics.score_dice` policy ``list(labels)``).

    Attributes:
        name: ``"<fixed><-<moving>"``. kind: the label set (``"aal-aseg"``, ``"tissue"``).
        fixed_image, moving_image, fixed_labels, moving_labels: file paths.
        labels: label IDs to score (empty: those both maps share, ``auto`` policy).
        label_names: ``{id: name}`` (for the report).
        fixed_landmarks, moving_landmarks: corresponding landmark files
            (:func:`hybridreg.io.read_landmarks`), scored by TRE, or ``None``.
    """

    name: str
    kind: str
    fixed_image: Path
    moving_image: Path
    fixed_labels: Path
    moving_labels: Path
    labels: tuple[int, ...]
    label_names: dict[int, str] = field(default_factory=dict, compare=False)
    fixed_landmarks: Path | None = None
    moving_landmarks: Path | None = None

    prealigned: ClassVar[bool] = False

    @classmethod
    def of(cls, pair: Any) -> "FilePair":
        """From any record with these attributes, e.g. :class:`benchmarks.realworld.RealPair`."""
        return cls(pair.name, pair.kind, Path(pair.fixed_image), Path(pair.moving_image), Path(pair.fixed_labels),
                   Path(pair.moving_labels), tuple(int(k) for k in pair.labels),
                   {int(k): str(v) for k, v in (getattr(pair, "label_names", None) or {}).items()})

    def fingerprint(self) -> list[str]:
        """The pair's files as absolute paths (images, label maps, landmarks; symbolic links
        kept, as ``hybridreg batch`` keeps them): what a stored suite row was made from
        (:func:`benchmarks.suite.run_suite` refuses to continue from rows of another file list
        under the same pair name, as ``hybridreg batch`` does)."""
        files = (self.fixed_image, self.moving_image, self.fixed_labels, self.moving_labels, self.fixed_landmarks,
                 self.moving_landmarks)
        return [os.path.abspath(f) if f is not None else "" for f in files]

    def files(self, folder: str | os.PathLike | None = None) -> tuple[str, str]:
        """The image files as given: ``(fixed path, moving path)``."""
        return str(self.fixed_image), str(self.moving_image)

    def on_fixed_grid(self) -> OnFixedGrid:
        """The affine stage of :func:`hybridreg.service.register_files` (:func:`hybridreg.affine.align`
        with its defaults: rigid then affine, centred by geometry, correlation), MOVING resampled
        through it onto FIXED's grid (linear, 0 outside), both intensities normalised
        (:func:`hybridreg.io.normalize_intensity`) and MOVING's histogram matched to FIXED's
        (``sitk.HistogramMatching``, 1024 levels, 7 match points, above-mean voxels)."""
        from hybridreg.affine import align, voxel_map
        from hybridreg.io import normalize_intensity, read_image

        (f, f_geo), (m, m_geo) = (read_image(p, arg=a) for p, a in ((self.fixed_image, "FIXED"), (self.moving_image, "MOVING")))
        fixed, moving = _image(f, f_geo), _image(m, m_geo)
        t0 = time.perf_counter()
        tx = align(fixed, moving).transform  # the register default
        fixed_n = _image(normalize_intensity(f), f_geo)
        moving_n = sitk.Resample(_image(normalize_intensity(m), m_geo), fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        moving_n = sitk.HistogramMatching(moving_n, fixed_n, numberOfHistogramLevels=1024, numberOfMatchPoints=7,
                                          thresholdAtMeanIntensity=True)
        return OnFixedGrid(fixed_n, moving_n, voxel_map(f_geo, m_geo, tx), time.perf_counter() - t0)


AnyPair = Pair | FilePair


@dataclass
class MethodOutput:
    """What a method returns.

    Attributes:
        displacement: ``(d, *shape)`` float, voxels of the fixed grid (core convention).
        seconds: wall seconds of the registration alone (no data loading, no metrics; the
            affine stage included on a :class:`FilePair`).
        lam: optional λ map (any grid) for the figures.
        trace: optional ``[(seconds, mean Dice), ...]`` recorded during the run.
        voxel_map: ``(d, d + 1)`` affine map from FIXED voxel indices to MOVING's own voxel
            indices, applied after the displacement (``None``: same grid, no affine stage).
        metrics: the ``metrics.json`` dictionary (:func:`hybridreg.service.measure`) when the
            method ran through the service's stages (then the suite takes the metrics from it).
    """

    displacement: np.ndarray
    seconds: float
    lam: np.ndarray | None = None
    trace: list[tuple[float, float]] | None = None
    voxel_map: np.ndarray | None = None
    metrics: dict | None = None


@dataclass(frozen=True)
class Method:
    """A registry entry: ``run(pair, dice_fn) -> MethodOutput``; ``requires`` names the
    optional module (or file) without which the method is skipped, with ``why``."""

    name: str
    label: str
    run: Callable[..., MethodOutput]  # run(pair, dice_fn, device="cpu"): hybridreg's solvers on ``device``, the tools on the CPU
    lambda_kind: str  # "voxelwise", "uniform", "map", "regions" or "-" (classical tools)
    solver: str  # "instance", "learned", "learned+refine", "classical" or an installed plug-in's name
    description: str = ""
    requires: str | None = None
    why: str = ""
    family: str = ""  # the method whose regularity sweep this entry belongs to ("" = its own)
    setting: str = ""  # its regularity setting, e.g. "w_reg 4" (the Pareto fronts of the report)


def _tensors(pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(v.image)[None, None] for v in (pair.fixed, pair.moving))


def _via_service(pair: FilePair, solver: str, config: Any, device: str = "cpu") -> MethodOutput:
    """Register a :class:`FilePair` through the stages of :func:`hybridreg.service.register_files`
    that make and score the result -- read and check the inputs, the affine stage
    and ``solver`` with ``config`` on FIXED's grid, then the metrics
    (:func:`hybridreg.service.align_solve_measure`) -- and
    not the output files, whose writing (the inverse at 1 mm, compressed NIfTI, the figure)
    took minutes per pair and is not part of any figure here. Seconds: the registration and
    affine stages; the metrics are kept (:attr:`MethodOutput.metrics`)."""
    from hybridreg import service
    from hybridreg.solvers import get_solver

    inputs = service.read_inputs(pair.fixed_image, pair.moving_image, pair.fixed_labels, pair.moving_labels,
                                 list(pair.labels) or "auto", fixed_landmarks=pair.fixed_landmarks,
                                 moving_landmarks=pair.moving_landmarks)
    pre, solved, metrics = service.align_solve_measure(inputs, get_solver(solver), config, torch.device(device))
    res = solved.result
    seconds = metrics["seconds"]["registration"] + metrics["seconds"].get("affine", 0.0)
    return MethodOutput(res.displacement[0].detach().cpu().numpy(), seconds, res.lambda_on_image_grid()[0, 0].cpu().numpy(),
                        voxel_map=pre.voxel_map, metrics=metrics)


def _regions(pair: Pair, cfg: Any) -> dict:
    """``{"regions": FIXED's label map (1, 1, *spatial)}`` for a config with ``lambda_mode``
    ``"regions"`` (one λ per structure), else ``{}``: the solver's ``regions`` keyword."""
    if getattr(cfg, "lambda_mode", None) != "regions":
        return {}
    return {"regions": torch.from_numpy(np.ascontiguousarray(pair.fixed.labels)).long()[None, None]}


def _instance(config_path: Path | None, w_reg: float | None = None, sets: tuple[str, ...] = ()):
    """The instance solver with the config at ``config_path`` (default: the defaults), its
    ``objective.w_reg`` replaced by ``w_reg`` when given and ``sets`` (``KEY=VALUE``,
    :func:`hybridreg.config.apply_overrides`) applied: a point of a Pareto front."""

    def run(pair: AnyPair, dice_fn, device: str = "cpu") -> MethodOutput:
        from hybridreg.config import apply_overrides, load_yaml
        from hybridreg.solvers import DivergenceError, divergence, get_solver, synchronize
        from hybridreg.spatial import resize_field, scaling_and_squaring
        from instance_opt import register_pair  # not the Solver interface: the trace needs its `callback`

        solver = get_solver("instance")
        cfg = replace(load_yaml(config_path, solver.config_class) if config_path else solver.default_config(), progress=False)
        if w_reg is not None:
            cfg = replace(cfg, objective=replace(cfg.objective, w_reg=w_reg))
        cfg = apply_overrides(cfg, sets)
        warm_up_torch()
        warm_up_device("instance", device, cfg)
        if not pair.prealigned:
            return _via_service(pair, "instance", cfg, device)
        f, m = _tensors(pair)
        points: list[tuple[float, float]] = []
        spent = [0.0]
        t0 = time.perf_counter()

        def callback(level, iteration, velocity, lam):
            t = time.perf_counter()
            disp = resize_field(scaling_and_squaring(velocity, cfg.objective.svf_steps), f.shape[2:])
            points.append((t - t0 - spent[0], dice_fn(disp[0].cpu().numpy())))
            spent[0] += time.perf_counter() - t

        # the time-to-accuracy trace (a Dice evaluation every `window` iterations) for the family's own entry only
        regions = _regions(pair, cfg)
        res = register_pair(f, m, cfg, spacing=pair.spacing, callback=callback if w_reg is None and not sets else None,
                            device=torch.device(device), **regions)
        synchronize(device)
        seconds = time.perf_counter() - t0 - spent[0]
        why = divergence(res)  # as the service refuses it: never a row
        if why:
            raise DivergenceError(f"{pair.name} diverged: {why}")
        lam = res.lam[0, 0].cpu().numpy() if res.lam.numel() > 1 else None
        return MethodOutput(res.displacement[0].cpu().numpy(), seconds, lam, points or None)

    return run


def _via_solver(name: str, weights: Path | None = None, half_grid: bool = False, sets: tuple[str, ...] = (),
             region_lambda: Path | None = None, config: Path | None = None):
    """The solver ``name`` through the service's path (the learned solvers ``learned``,
    ``learned+refine``, ``learned-lambda``, ``learned-conditional[+refine]``, or an installed
    plug-in: :func:`plugin_methods`) with ``config`` (a YAML file, ``--config``; default: the
    solver's defaults) and ``weights`` (default: the solver's shipped ones);
    ``half_grid``: refine with :func:`learned.solver.half_grid_refine` (networks without a
    full-resolution stage); ``sets``: ``KEY=VALUE`` overrides (the conditional network's
    ``objective.w_reg``: a point of its front); ``region_lambda``: a ``label: λ`` YAML file
    (the conditional network's region weights, ``--region-lambda``)."""

    def run(pair: AnyPair, dice_fn, device: str = "cpu") -> MethodOutput:
        from hybridreg.service import run_solver, solver_and_config

        solver, cfg = solver_and_config(name, config, weights=None if weights is None else str(weights), progress=False,
                                        overrides=sets, region_lambda=region_lambda)  # the CLI's path: --set, --region-lambda
        if half_grid:
            from learned.solver import half_grid_refine

            cfg = replace(cfg, refine_config=half_grid_refine())
        warm_up_torch()
        warm_up_device(name, device, cfg)
        if not pair.prealigned:
            return _via_service(pair, name, cfg, device)
        f, m = _tensors(pair)
        regions = _regions(pair, cfg)
        solved = run_solver(solver, cfg, f, m, pair.spacing, torch.device(device), fixed_direction=pair.geometry.direction,
                            **regions)
        lam = solved.result.lam
        return MethodOutput(solved.result.displacement[0].cpu().numpy(), solved.seconds,
                            lam[0, 0].cpu().numpy() if lam.numel() > 1 else None)

    return run


def _image(arr: np.ndarray, geo: Geometry) -> sitk.Image:
    return geo.apply(sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32)))


def _ants_syn(flow_sigma: float = 3.0, total_sigma: float = 0.0):
    """antspyx SyN with ``flow_sigma`` (the smoothing of the update field, voxels; ANTs' default 3) and
    ``total_sigma`` (the smoothing of the total field after each iteration, voxels; ANTs' default 0):
    SyN[grad step, flow σ, total σ] in ``antsRegistration``'s terms."""
    return lambda pair, dice_fn, device="cpu": _run_ants_syn(pair, flow_sigma, total_sigma)  # CPU whatever `device`


def _run_ants_syn(pair: AnyPair, flow_sigma: float, total_sigma: float = 0.0) -> MethodOutput:
    import ants

    from hybridreg.affine import voxel_map
    from hybridreg.io import displacement_from_itk, read_displacement, read_image, read_transform

    with tempfile.TemporaryDirectory() as tmp:
        fixed_path, moving_path = pair.files(tmp)
        f, m = ants.image_read(fixed_path), ants.image_read(moving_path)
        t0 = time.perf_counter()
        r = ants.registration(f, m, type_of_transform="SyNOnly" if pair.prealigned else "SyN", syn_metric="CC",
                              syn_sampling=2, reg_iterations=(100, 70, 20), flow_sigma=flow_sigma,
                              total_sigma=total_sigma,
                              outprefix=str(Path(tmp) / "syn_"))
        seconds = time.perf_counter() - t0
        # fwdtransforms [warp, affine]: a FIXED point p maps to affine(p + warp(p)) (the warp on FIXED's grid)
        warp = [t for t in r["fwdtransforms"] if t.endswith(".nii.gz")][0]
        disp, f_geo = displacement_from_itk(read_displacement(warp, arg="ANTs warp"))
        mats = [t for t in r["fwdtransforms"] if t.endswith(".mat")]
        vm = voxel_map(f_geo, read_image(moving_path, arg="MOVING")[1], read_transform(mats[0])) if mats else None
    return MethodOutput(disp.astype(np.float32), seconds, voxel_map=vm)


def _sitk_demons(sigma: float = 1.5):
    """SimpleITK diffeomorphic demons with the displacement field smoothed by ``sigma`` voxels."""
    return lambda pair, dice_fn, device="cpu": _run_sitk_demons(pair, sigma)  # CPU whatever `device`


def _run_sitk_demons(pair: AnyPair, sigma: float) -> MethodOutput:
    from hybridreg.io import displacement_from_itk

    grid = pair.on_fixed_grid()
    f, m = grid.fixed, grid.moving
    sigma_mm = min(f.GetSpacing())
    t0 = time.perf_counter()
    field_img = None
    for shrink, iters in ((4, 100), (2, 60), (1, 30)):
        fs = sitk.Shrink(sitk.SmoothingRecursiveGaussian(f, 0.5 * shrink * sigma_mm), [shrink] * f.GetDimension()) if shrink > 1 else f
        ms = sitk.Resample(sitk.SmoothingRecursiveGaussian(m, 0.5 * shrink * sigma_mm), fs) if shrink > 1 else m
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iters)
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(sigma)
        demons.SetSmoothUpdateField(True)
        demons.SetUpdateFieldStandardDeviations(1.0)
        if field_img is None:
            field_img = demons.Execute(fs, ms)
        else:
            init = sitk.Resample(field_img, fs, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            field_img = demons.Execute(fs, ms, init)
    seconds = grid.seconds + time.perf_counter() - t0
    disp, _ = displacement_from_itk(sitk.Cast(field_img, sitk.sitkVectorFloat64))
    return MethodOutput(disp.astype(np.float32), seconds, voxel_map=grid.voxel_map)


_NEEDS_STAGE1_NET = {"requires": str(STAGE1_WEIGHTS),
                     "why": "train it: hybridreg train --data bundled --config configs/learned_bundled_2mm.yaml"}
_NEEDS_UNIFORM_NET = {"requires": str(UNIFORM_WEIGHTS),
                      "why": f"train it: hybridreg train --data bundled --config {UNIFORM_TRAIN_CONFIG}"}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("instance", "instance (voxelwise λ)", _instance(None), "voxelwise", "instance",
               "`InstanceOptConfig()` defaults: 8/4/2/1 mm levels, ≤150/80/30/1 Adam iterations (the 1 mm level on a 1 mm image only), 4 squarings, LNCC window 5 and ε 1e-6, w_reg 4, beta hyperprior",
               setting="w_reg 4"),
        Method("instance-fullres", "instance, 20 iterations at 1 mm", _instance(FULL_RESOLUTION_CONFIG), "voxelwise", "instance",
               "the defaults with 20 iterations instead of one at the 1 mm level (velocity and λ on the image grid)"
               " (`configs/instance_full_resolution.yaml`)", setting="w_reg 4"),
        Method("instance-uniform", "instance (uniform λ)", _instance(UNIFORM_CONFIG), "uniform", "instance",
               "the same solver with one scalar λ (calibrated, no hyperprior)", requires=str(UNIFORM_CONFIG), why="run `python -m benchmarks calibrate-uniform` first",
               setting="λ 0.892"),
        Method("instance-map", "instance (MAP global λ)", _instance(MAP_CONFIG), "map", "instance",
               "one λ per pair estimated by MAP with its log-determinant (`configs/instance_map.yaml`: velocity on a 4× coarser grid)",
               setting="MAP λ"),
        Method("instance-regions", "instance (region-wise λ)", _instance(REGIONS_CONFIG), "regions", "instance",
               "one λ per structure of FIXED's labels, smoothed, under the hyperprior (`configs/instance_regions.yaml`)",
               setting="w_reg 4"),
        Method("learned-lambda", "learned λ regressor (global λ)", _via_solver("learned-lambda"), "map", "learned",
               "λ predicted by the regressor trained on MAP estimates (`learned/weights/lambda_regressor/`), then instance"
               " optimization at that λ on the MAP energy (`configs/instance_map.yaml` with λ fixed)", requires=str(REGRESSOR_WEIGHTS),
               why="train it: python -m learned.regressor --out learned/weights/lambda_regressor"),
        Method("learned", "learned (voxelwise λ)", _via_solver("learned"), "voxelwise", "learned",
               "the shipped network (`learned_bundled_2mm.pt`, stage 4: half-grid U-Net + full-resolution velocity stage, trained with scan-like images), two forward passes (inverse-consistent: the swapped pair's SVF negated and averaged in), then two more in its mid-space (FIXED ∘ exp(−v/2) ← MOVING ∘ exp(v/2)), SVFs added (one recursive pass, still exactly inverse-consistent)",
               setting="w_reg 4 network"),
        Method("learned+refine", "learned + refine", _via_solver("learned+refine"), "voxelwise", "learned+refine",
               "the network's velocity and λ refined by 7 instance iterations at 2 mm, then 2 at 1.75 mm (1 mm images), on the instance solver's energy, on FIXED's foreground box"),
        Method("learned-conditional", "learned conditional (voxelwise λ)", _via_solver("learned-conditional"), "voxelwise",
               "learned", "one network conditioned on w_reg and the hyperprior strength (FiLM) and on a region-wise λ map"
               " (CSAIN), `learned/weights/conditional/`, at w_reg 4 (the λ head's voxelwise λ)", setting="w_reg 4",
               requires=str(CONDITIONAL_WEIGHTS), why="train it: configs/learned_conditional.yaml"),
        Method("learned-conditional+refine", "learned conditional + refine", _via_solver("learned-conditional+refine"),
               "voxelwise", "learned+refine", "the conditional network refined by 12 instance iterations at 2 mm on the"
               " energy at the same w_reg", setting="w_reg 4", requires=str(CONDITIONAL_WEIGHTS),
               why="train it: configs/learned_conditional.yaml"),
        Method("learned-matched", "learned conditional at the instance solver's regularity",
               _via_solver("learned-conditional", config=MATCHED_CONFIG), "voxelwise", "learned",
               "the conditional network at code w_reg 1, where its SDlogJ on the real pairs is the instance default's"
               " (`configs/conditional_matched.yaml`), two forward passes (inverse-consistent)", setting="w_reg 1",
               requires=str(CONDITIONAL_WEIGHTS), why="train it: configs/learned_conditional.yaml"),
        Method("learned-matched+refine", "learned conditional at the instance solver's regularity + refine",
               _via_solver("learned-conditional+refine", config=MATCHED_CONFIG), "voxelwise", "learned+refine",
               "the same network (code w_reg 1) refined by 5 instance iterations at 2 mm on the instance solver's default"
               " energy (w_reg 4; `configs/conditional_matched.yaml`)", setting="w_reg 1, refined at w_reg 4",
               requires=str(CONDITIONAL_WEIGHTS), why="train it: configs/learned_conditional.yaml"),
        Method("learned-conditional-regions", "learned conditional (region-wise λ, tuned)",
               _via_solver("learned-conditional", region_lambda=REGION_LAMBDA), "regions", "learned",
               "the conditional network at w_reg 4 conditioned on region weights tuned by TuRBO on the validation pairs"
               " (`benchmarks/results/conditional/region_lambda.yaml`); the energy's λ is the painted map",
               setting="w_reg 4", requires=str(REGION_LAMBDA), why="tune them: hybridreg tune --solver learned-conditional"),
        Method("learned-stage1", "learned, stage 1 (voxelwise λ)", _via_solver("learned", STAGE1_WEIGHTS), "voxelwise", "learned",
               "stage 1 of the shipped network (half-grid U-Net, SVF on the 4 mm grid): the uniform network's pair",
               **_NEEDS_STAGE1_NET),
        Method("learned+refine-stage1", "learned + refine, stage 1", _via_solver("learned+refine", STAGE1_WEIGHTS, half_grid=True), "voxelwise",
               "learned+refine", "stage 1 refined on its own energy by 20 (4 mm) + 12 (2 mm) instance iterations",
               **_NEEDS_STAGE1_NET),
        Method("learned-uniform", "learned (uniform λ)", _via_solver("learned", UNIFORM_WEIGHTS), "uniform", "learned",
               "the same U-Net without λ head, trained on the uniform energy (w_reg·λ = 3.579)", **_NEEDS_UNIFORM_NET),
        Method("learned+refine-uniform", "learned + refine (uniform λ)", _via_solver("learned+refine", UNIFORM_WEIGHTS, half_grid=True), "uniform",
               "learned+refine", "the uniform network refined on its own energy (20 + 12 iterations, λ fixed)",
               **_NEEDS_UNIFORM_NET),
        Method("ants-syn", "ANTs SyN", _ants_syn(), "-", "classical",
               "antspyx `SyNOnly` (scans as they come: `SyN`, ANTs' own rigid + affine first), CC radius 2, "
               "iterations 100/70/20 (shrink 4/2/1), flow σ 3", requires="ants", why="pip install antspyx", setting="flow σ 3"),
        Method("sitk-demons", "SimpleITK diffeomorphic demons", _sitk_demons(), "-", "classical",
               "`DiffeomorphicDemonsRegistrationFilter`, shrink 4/2/1 × 100/60/30 iterations, σ field 1.5, σ update 1.0 voxels"
               " (scans as they come: after hybridreg's affine stage, moving histogram matched to fixed)", setting="σ 1.5"),
    )
}

# The other points of each regularity sweep (the default is the family's own entry above):
# the Pareto fronts of the suite report compare the methods at equal SDlogJ.
FRONTS = {"instance": [(f"w_reg={w:g}", f"w_reg {w:g}", _instance(None, w_reg=w)) for w in (2.0, 8.0)],
          "instance-uniform": [(f"w_reg={w:g}", f"λ 0.892, w_reg {w:g}", _instance(UNIFORM_CONFIG, w_reg=w)) for w in (2.0, 8.0)],
          "instance-regions": [(f"w_reg={w:g}", f"w_reg {w:g}", _instance(REGIONS_CONFIG, w_reg=w)) for w in (2.0, 8.0)],
          # where the MAP estimate falls: the uniform-λ front of the same energy (the profiled likelihood, the velocity on
          # the same coarse grid; with λ fixed the log-determinant is a constant)
          "instance-map": [(f"uniform={lam:g}", f"uniform λ {lam:g}",
                            _instance(MAP_CONFIG, sets=("lambda_mode=uniform", f"lambda_init={lam:g}", "objective.log_det=true")))
                           for lam in (0.25, 0.5, 1.0, 2.0)],
          # one network per value (the shipped one is w_reg 4) against one conditional network at every value
          "learned": [(f"w_reg={w:g}", f"w_reg {w:g} network", _via_solver("learned", p)) for w, p in FIXED_WREG_WEIGHTS.items()],
          "learned-conditional": [(f"w_reg={w:g}", f"w_reg {w:g}", _via_solver("learned-conditional", sets=(f"objective.w_reg={w:g}",)))
                                  for w in FIXED_WREG_WEIGHTS],
          "learned-conditional+refine": [(f"w_reg={w:g}", f"w_reg {w:g}",
                                          _via_solver("learned-conditional+refine", sets=(f"objective.w_reg={w:g}",)))
                                         for w in (2.0, 8.0)],
          "sitk-demons": [(f"sigma={s:g}", f"σ {s:g}", _sitk_demons(s)) for s in (0.75, 1.0, 2.5)],
          "ants-syn": [(f"flow_sigma={s:g}", f"flow σ {s:g}", _ants_syn(s)) for s in (2.0, 5.0)]
          + [(f"total_sigma={s:g}", f"total σ {s:g}", _ants_syn(3.0, s)) for s in (0.5, 1.0, 2.0)]}
for _family, _points in FRONTS.items():
    _base = METHODS[_family]
    for _key, _setting, _run in _points:
        _name = f"{_family}@{_key}"
        METHODS[_name] = replace(_base, name=_name, label=f"{_base.label}, {_setting}", run=_run, family=_family, setting=_setting,
                                 description=f"{_base.label} with {_setting} (a point of its regularity sweep)")


def plugin_methods() -> dict[str, Method]:
    """A method for every installed solver (:func:`hybridreg.solvers.available_solvers`) that the
    registry does not hold: a third-party plug-in, run with its defaults through the service's
    path as the learned solvers are (``docs/development.md``, "Plugging in a solver")."""
    from hybridreg.solvers import available_solvers

    return {n: Method(n, f"{n} (installed solver)", _via_solver(n), "-", n,
                      f"the installed solver `{n}` with its default config (a plug-in of the `hybridreg.solvers` group)")
            for n in available_solvers() if n not in BUILT_IN}


BUILT_IN = frozenset(METHODS)
METHODS.update(plugin_methods())


def front_methods(methods: list[str]) -> list[str]:
    """``methods`` and the other points of the regularity sweeps of those among them that have one."""
    return list(methods) + [m for m in METHODS if METHODS[m].family in methods and m not in methods]


def available(method: Method) -> tuple[bool, str]:
    """Whether ``method`` can run here, and the message when it cannot."""
    if method.requires is None:
        return True, ""
    if "/" in method.requires:
        ok = Path(method.requires).is_file()
    else:
        ok = importlib.util.find_spec(method.requires) is not None
    what = method.requires
    if "/" in what and Path(what).is_relative_to(ROOT):
        what = Path(what).relative_to(ROOT)
    return ok, "" if ok else f"skipped {method.name}: {what} not found ({method.why})"
