"""The registration methods the benchmark suite compares, in one registry.

Every method maps a :class:`Pair` (fixed and moving :class:`~hybridreg.data.sources.Volume`
on the same grid, its voxel size and physical geometry) to a :class:`MethodOutput` whose
``displacement`` follows the core convention: ``(d, *shape)`` in voxels of the fixed grid,
channels in array-axis order, ``warped(x) = moving(x + u(x))``. Metrics are computed from
it by the same code for every method (``benchmarks.suite``).

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
  suite within an hour on 2 cores).
* ``sitk-demons`` -- SimpleITK's diffeomorphic demons, multi-resolution (4, 2, 1 shrink
  factors on the input grid), Gaussian smoothing of the update and of the field.
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from hybridreg.data.sources import Volume
from hybridreg.io import Geometry
from learned.solver import UNIFORM_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
UNIFORM_CONFIG = ROOT / "configs" / "instance_uniform_matched.yaml"
UNIFORM_TRAIN_CONFIG = "configs/learned_bundled_2mm_uniform.yaml"
STAGE1_WEIGHTS = ROOT / "learned" / "weights" / "stage1" / "learned_bundled_2mm_stage1.pt"
"""Stage 1 of the shipped weights (a repository file, not installed with the package)."""


@dataclass
class Pair:
    """One benchmark pair: ``moving`` is registered to ``fixed`` (same grid)."""

    name: str
    kind: str  # "atlas" or "subject"
    fixed: Volume
    moving: Volume
    spacing: tuple[float, ...]  # mm per array axis
    geometry: Geometry


@dataclass
class MethodOutput:
    """What a method returns.

    Attributes:
        displacement: ``(d, *shape)`` float, voxels of the fixed grid (core convention).
        seconds: wall seconds of the registration alone (no data loading, no metrics).
        lam: optional λ map (any grid) for the figures.
        trace: optional ``[(seconds, mean Dice), ...]`` recorded during the run.
    """

    displacement: np.ndarray
    seconds: float
    lam: np.ndarray | None = None
    trace: list[tuple[float, float]] | None = None


@dataclass(frozen=True)
class Method:
    """A registry entry: ``run(pair, dice_fn) -> MethodOutput``; ``requires`` names the
    optional module (or file) without which the method is skipped, with ``why``."""

    name: str
    label: str
    run: Callable[[Pair, Callable[[np.ndarray], float]], MethodOutput]
    lambda_kind: str  # "voxelwise", "uniform" or "-" (classical tools)
    solver: str  # "instance", "learned", "learned+refine" or "classical"
    description: str = ""
    requires: str | None = None
    why: str = ""


def _tensors(pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(v.image)[None, None] for v in (pair.fixed, pair.moving))


def _instance(config_path: Path | None):
    def run(pair: Pair, dice_fn) -> MethodOutput:
        from hybridreg.config import load_yaml
        from hybridreg.solvers import get_solver
        from hybridreg.spatial import resize_field, scaling_and_squaring
        from instance_opt import register_pair  # not the Solver interface: the trace needs its `callback`

        solver = get_solver("instance")
        cfg = replace(load_yaml(config_path, solver.config_class) if config_path else solver.default_config(), progress=False)
        f, m = _tensors(pair)
        points: list[tuple[float, float]] = []
        spent = [0.0]
        t0 = time.perf_counter()

        def callback(level, iteration, velocity, lam):
            t = time.perf_counter()
            disp = resize_field(scaling_and_squaring(velocity, cfg.objective.svf_steps), f.shape[2:])
            points.append((t - t0 - spent[0], dice_fn(disp[0].numpy())))
            spent[0] += time.perf_counter() - t

        res = register_pair(f, m, cfg, spacing=pair.spacing, callback=callback)
        seconds = time.perf_counter() - t0 - spent[0]
        lam = res.lam[0, 0].numpy() if res.lam.numel() > 1 else None
        return MethodOutput(res.displacement[0].numpy(), seconds, lam, points or None)

    return run


def _learned(name: str, weights: Path | None = None, half_grid: bool = False):
    """The learned solver ``name`` (``learned`` or ``learned+refine``) with ``weights``
    (default: the shipped ones); ``half_grid``: refine with :func:`learned.solver.half_grid_refine`
    (networks without a full-resolution stage)."""

    def run(pair: Pair, dice_fn) -> MethodOutput:
        from hybridreg.service import run_solver
        from hybridreg.solvers import get_solver
        from learned.solver import half_grid_refine

        solver = get_solver(name)
        cfg = solver.configure(replace(solver.default_config(), progress=False, weights=str(weights or ""),
                                       **({"refine_config": half_grid_refine()} if half_grid else {})))
        f, m = _tensors(pair)
        solved = run_solver(solver, cfg, f, m, pair.spacing)
        return MethodOutput(solved.result.displacement[0].numpy(), solved.seconds, solved.result.lam[0, 0].numpy())

    return run


def _image(arr: np.ndarray, geo: Geometry) -> sitk.Image:
    return geo.apply(sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32)))


def _ants_syn(pair: Pair, dice_fn) -> MethodOutput:
    import ants

    from hybridreg.io import displacement_from_itk, read_displacement, write_image

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, v in (("fixed", pair.fixed), ("moving", pair.moving)):
            p = str(Path(tmp) / f"{name}.nii.gz")
            write_image(p, v.image, pair.geometry)
            paths.append(p)
        f, m = (ants.image_read(p) for p in paths)
        t0 = time.perf_counter()
        r = ants.registration(f, m, type_of_transform="SyNOnly", syn_metric="CC", syn_sampling=2,
                              reg_iterations=(100, 70, 20), outprefix=str(Path(tmp) / "syn_"))
        seconds = time.perf_counter() - t0
        warp = [t for t in r["fwdtransforms"] if t.endswith(".nii.gz")][0]
        disp, _ = displacement_from_itk(read_displacement(warp, arg="ANTs warp"))
    return MethodOutput(disp.astype(np.float32), seconds)


def _sitk_demons(pair: Pair, dice_fn) -> MethodOutput:
    from hybridreg.io import displacement_from_itk

    f = _image(pair.fixed.image, pair.geometry)
    m = _image(pair.moving.image, pair.geometry)
    t0 = time.perf_counter()
    field_img = None
    for shrink, iters in ((4, 100), (2, 60), (1, 30)):
        fs = sitk.Shrink(sitk.SmoothingRecursiveGaussian(f, 0.5 * shrink * min(pair.geometry.spacing)), [shrink] * f.GetDimension()) if shrink > 1 else f
        ms = sitk.Resample(sitk.SmoothingRecursiveGaussian(m, 0.5 * shrink * min(pair.geometry.spacing)), fs) if shrink > 1 else m
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iters)
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(1.5)
        demons.SetSmoothUpdateField(True)
        demons.SetUpdateFieldStandardDeviations(1.0)
        if field_img is None:
            field_img = demons.Execute(fs, ms)
        else:
            init = sitk.Resample(field_img, fs, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            field_img = demons.Execute(fs, ms, init)
    seconds = time.perf_counter() - t0
    disp, _ = displacement_from_itk(sitk.Cast(field_img, sitk.sitkVectorFloat64))
    return MethodOutput(disp.astype(np.float32), seconds)


_NEEDS_STAGE1_NET = {"requires": str(STAGE1_WEIGHTS),
                     "why": "train it: hybridreg train --data bundled --config configs/learned_bundled_2mm.yaml"}
_NEEDS_UNIFORM_NET = {"requires": str(UNIFORM_WEIGHTS),
                      "why": f"train it: hybridreg train --data bundled --config {UNIFORM_TRAIN_CONFIG}"}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("instance", "instance (voxelwise λ)", _instance(None), "voxelwise", "instance",
               "`InstanceOptConfig()` defaults: 8/4/2 mm levels, ≤200/120/30 Adam iterations, w_reg 4, beta hyperprior"),
        Method("instance-uniform", "instance (uniform λ)", _instance(UNIFORM_CONFIG), "uniform", "instance",
               "the same solver with one scalar λ (calibrated, no hyperprior)", requires=str(UNIFORM_CONFIG), why="run `python -m benchmarks calibrate-uniform` first"),
        Method("learned", "learned (voxelwise λ)", _learned("learned"), "voxelwise", "learned",
               "the shipped network (`learned_bundled_2mm.pt`: half-grid U-Net + full-resolution velocity stage), one forward pass"),
        Method("learned+refine", "learned + refine", _learned("learned+refine"), "voxelwise", "learned+refine",
               "the network's velocity and λ refined by 12 instance iterations at 2 mm"),
        Method("learned-stage1", "learned, stage 1 (voxelwise λ)", _learned("learned", STAGE1_WEIGHTS), "voxelwise", "learned",
               "stage 1 of the shipped network (half-grid U-Net, SVF on the 4 mm grid): the uniform network's pair",
               **_NEEDS_STAGE1_NET),
        Method("learned+refine-stage1", "learned + refine, stage 1", _learned("learned+refine", STAGE1_WEIGHTS, half_grid=True), "voxelwise",
               "learned+refine", "stage 1 refined by 20 (4 mm) + 12 (2 mm) instance iterations", **_NEEDS_STAGE1_NET),
        Method("learned-uniform", "learned (uniform λ)", _learned("learned", UNIFORM_WEIGHTS), "uniform", "learned",
               "the same U-Net without λ head, trained on the uniform energy (w_reg·λ = 3.579)", **_NEEDS_UNIFORM_NET),
        Method("learned+refine-uniform", "learned + refine (uniform λ)", _learned("learned+refine", UNIFORM_WEIGHTS, half_grid=True), "uniform",
               "learned+refine", "the uniform network refined on its own energy (20 + 12 iterations, λ fixed)",
               **_NEEDS_UNIFORM_NET),
        Method("ants-syn", "ANTs SyN", _ants_syn, "-", "classical",
               "antspyx `SyNOnly`, CC radius 2, iterations 100/70/20 (shrink 4/2/1)", requires="ants", why="pip install antspyx"),
        Method("sitk-demons", "SimpleITK diffeomorphic demons", _sitk_demons, "-", "classical",
               "`DiffeomorphicDemonsRegistrationFilter`, shrink 4/2/1 × 100/60/30 iterations, σ field 1.5, σ update 1.0 voxels"),
    )
}


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
