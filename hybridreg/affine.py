"""Affine pre-alignment of two scans on any grids, its voxel map, and ITK transform export.

Frames. Physical points are ITK's: LPS, mm. Every transform here follows ITK's resampling
convention: it maps a point ``p`` of FIXED's space to the point of MOVING's space sampled
there (``sitk.Resample(moving, fixed, transform)``). Voxel indices are in *array* axis order
(``sitk.GetArrayFromImage``: ``(z, y, x)`` in 3D), the reverse of ITK's index order, except
where a docstring says "ITK order". Composite transforms apply the last-added transform first.

Source: SimpleITK's registration framework (``sitk.ImageRegistrationMethod``) running ANTs'
default chain, rigid then affine, each over a multi-resolution pyramid, from a centred
initialisation (``sitk.CenteredTransformInitializer``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from .config import atomic_output
from .io import Geometry

__all__ = ["AffineResult", "align", "voxel_map", "transform_of_voxel_map", "write_affine", "composite", "inverse_composite", "write_transform"]

_KINDS, _INITS, _METRICS = ("none", "rigid", "affine"), ("geometry", "moments"), ("mi", "ncc")


@dataclass
class AffineResult:
    """Result of :func:`align`.

    Attributes:
        transform: ``sitk.AffineTransform`` mapping FIXED physical points to MOVING physical
            points (LPS, mm; ITK's resampling convention).
        kind, init, metric: the options used. metric_value: the final metric value (negative
            Mattes MI or negative correlation: lower is better; ``None`` for ``kind="none"``).
        seconds: wall time per stage (``init``, ``rigid``, ``affine``).
        threads: ITK's threads during the optimisation (the transform's last digits depend
            on it with correlation; 0 for ``kind="none"``).

    ``matrix`` (row-major d×d), ``translation`` and ``center`` (mm, ITK order) are plain lists,
    ``T(p) = matrix·(p − center) + center + translation``; :meth:`to_dict` for metrics.json.
    """

    transform: sitk.AffineTransform
    kind: str
    init: str
    metric: str
    metric_value: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    threads: int = 0

    @property
    def matrix(self) -> list[list[float]]:
        d = self.transform.GetDimension()
        return np.asarray(self.transform.GetMatrix()).reshape(d, d).tolist()

    @property
    def translation(self) -> list[float]:
        return list(self.transform.GetTranslation())

    @property
    def center(self) -> list[float]:
        return list(self.transform.GetCenter())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "init": self.init, "metric": self.metric, "metric_value": self.metric_value,
                "matrix": self.matrix, "translation": self.translation, "center": self.center,
                "determinant": float(np.linalg.det(np.asarray(self.matrix))), "seconds": dict(self.seconds),
                "threads": self.threads}


def _linear_part(tx: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """``(L, b)`` with ``tx(p) = L p + b`` (ITK order, mm), read off ``tx`` at ``d + 1`` points;
    ValueError if ``tx`` is not affine (checked at four more points)."""
    d = tx.GetDimension()
    b = np.asarray(tx.TransformPoint([0.0] * d))
    lin = np.stack([np.asarray(tx.TransformPoint(np.eye(d)[k].tolist())) - b for k in range(d)], axis=1)
    for p in np.random.default_rng(0).uniform(-200, 200, (4, d)):
        if not np.allclose(tx.TransformPoint(p.tolist()), lin @ p + b, atol=1e-6):
            raise ValueError(f"`transform`: {tx.GetName()} is not an affine transform")
    return lin, b


def _as_affine(tx: sitk.Transform) -> sitk.AffineTransform:
    """Any linear transform (Euler, similarity, affine, their composites) as an ``AffineTransform``."""
    lin, b = _linear_part(tx)
    c = np.asarray(tx.GetCenter()) if hasattr(tx, "GetCenter") else np.zeros(len(b))
    return sitk.AffineTransform(lin.ravel().tolist(), (lin @ c + b - c).tolist(), c.tolist())


def voxel_map(fixed_geo: Geometry, moving_geo: Geometry, transform: sitk.Transform) -> np.ndarray:
    """The ``(d, d+1)`` float64 matrix ``M`` of an affine ``transform`` in voxel units:
    ``j = M[:, :d] @ i + M[:, d]`` maps a FIXED voxel index ``i`` to the MOVING continuous
    index ``j`` it samples, both in array axis order.

    The exact composition FIXED index → physical (``origin + direction·diag(spacing)·i``, ITK
    order) → ``transform`` (FIXED → MOVING, LPS mm) → MOVING continuous index, axes reversed.

    Raises:
        ValueError: ``transform`` not affine, or dimensions that differ.
    """
    d = fixed_geo.dim
    if moving_geo.dim != d or transform.GetDimension() != d:
        raise ValueError(f"voxel_map(): dimensions differ (fixed {d}D, moving {moving_geo.dim}D,"
                         f" transform {transform.GetDimension()}D)")
    f_to_phys, m_to_phys = (np.asarray(g.direction).reshape(d, d) @ np.diag(g.spacing) for g in (fixed_geo, moving_geo))
    lin, b = _linear_part(transform)
    m_inv = np.linalg.inv(m_to_phys)
    m_lin = m_inv @ lin @ f_to_phys
    m_off = m_inv @ (lin @ np.asarray(fixed_geo.origin) + b - np.asarray(moving_geo.origin))
    return np.concatenate([m_lin[::-1, ::-1], m_off[::-1, None]], axis=1)


def transform_of_voxel_map(fixed_geo: Geometry, moving_geo: Geometry, matrix: np.ndarray) -> sitk.AffineTransform:
    """The physical affine transform (FIXED → MOVING, LPS mm) whose :func:`voxel_map` is
    ``matrix`` (``(d, d + 1)``, array axis order): the inverse of :func:`voxel_map`, for
    methods that report a voxel map only (the benchmarks' peers).

    Raises:
        ValueError: ``matrix`` not ``(d, d + 1)`` for the grids' dimension.
    """
    d = fixed_geo.dim
    m = np.asarray(matrix, dtype=float)
    if m.shape != (d, d + 1) or moving_geo.dim != d:
        raise ValueError(f"transform_of_voxel_map(): `matrix` must be {(d, d + 1)} for {d}D grids, got {m.shape}")
    f_to_phys, m_to_phys = (np.asarray(g.direction).reshape(d, d) @ np.diag(g.spacing) for g in (fixed_geo, moving_geo))
    m_lin, m_off = m[::-1, :d][:, ::-1], m[::-1, d]  # back to ITK axis order
    lin = m_to_phys @ m_lin @ np.linalg.inv(f_to_phys)
    offset = m_to_phys @ m_off + np.asarray(moving_geo.origin) - lin @ np.asarray(fixed_geo.origin)
    tx = sitk.AffineTransform(d)
    tx.SetMatrix(lin.ravel().tolist())
    tx.SetTranslation(offset.tolist())
    return tx


def _check_mask(mask: sitk.Image | None, image: sitk.Image, name: str, image_name: str) -> sitk.Image | None:
    if mask is None:
        return None
    if not Geometry.of(mask).matches(Geometry.of(image)):
        raise ValueError(f"`{name}` must be on {image_name}'s grid (size {mask.GetSize()} vs {image.GetSize()},"
                         f" spacing {mask.GetSpacing()} vs {image.GetSpacing()}, or origin/direction differ)")
    arr = sitk.GetArrayViewFromImage(mask)
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"`{name}` must be a binary mask (0 and 1), found values {np.unique(arr)[:6].tolist()}")
    if not arr.any():
        raise ValueError(f"`{name}` is empty (no voxel is 1)")
    return sitk.Cast(mask, sitk.sitkUInt8)


def _check_det(tx: sitk.AffineTransform, names: tuple[str, str]) -> None:
    d = tx.GetDimension()
    det = float(np.linalg.det(np.asarray(tx.GetMatrix()).reshape(d, d)))
    if not np.isfinite(det) or not 0.2 <= abs(det) <= 5.0:
        raise ValueError(f"the affine stage failed (singular matrix): det = {det:.3g} is outside [0.2, 5];"
                         f" check that `{names[0]}` and `{names[1]}` show the same anatomy, or use kind='rigid'")


def _overlap(fixed: sitk.Image, moving: sitk.Image, fg: np.ndarray, tx: sitk.Transform,
             moving_mask: sitk.Image | None = None) -> float:
    """Fraction of FIXED foreground voxels ``fg`` (bool array) that ``tx`` maps inside MOVING (onto
    ``moving_mask``'s voxels, nearest voxel, if given)."""
    idx = np.argwhere(fg)
    idx = idx[:: max(1, len(idx) // 50_000)].T  # a regular subsample is plenty for a fraction
    m = voxel_map(Geometry.of(fixed), Geometry.of(moving), tx)
    j = m[:, :-1] @ idx + m[:, -1:]
    inside = np.all((j >= -0.5) & (j <= np.asarray(moving.GetSize()[::-1])[:, None] - 0.5), axis=0)
    if moving_mask is not None:
        k = np.clip(np.rint(j[:, inside]).astype(np.int64), 0, np.asarray(moving.GetSize()[::-1])[:, None] - 1)
        inside[inside] = sitk.GetArrayViewFromImage(moving_mask)[tuple(k)] > 0
    return float(np.mean(inside))


def _check_moving_mask(fixed: sitk.Image, moving: sitk.Image, fg: np.ndarray, tx: sitk.Transform,
                       moving_mask: sitk.Image | None, names: tuple[str, str, str, str], init: str) -> None:
    """Refuse a MOVING mask onto which no FIXED foreground voxel ``fg`` maps through ``tx`` (nearest
    voxel): the image match would have nothing to compare. Every foreground voxel is tried (a small
    mask falls between the points of a subsample), in chunks, stopping at the first that lands on it."""
    if moving_mask is None:
        return
    m = voxel_map(Geometry.of(fixed), Geometry.of(moving), tx)
    size = np.asarray(moving.GetSize()[::-1])[:, None]
    region = sitk.GetArrayViewFromImage(moving_mask)
    flat = np.flatnonzero(fg)
    for start in range(0, len(flat), 1_000_000):
        idx = np.stack(np.unravel_index(flat[start:start + 1_000_000], fg.shape))
        j = np.rint(m[:, :-1] @ idx + m[:, -1:]).astype(np.int64)
        j = j[:, np.all((j >= 0) & (j < size), axis=0)]
        if region[tuple(j)].any():
            return
    f_name, m_name, _, mm_name = names
    raise ValueError(f"`{mm_name}` leaves nothing to match: none of {f_name}'s foreground maps onto its voxels of 1"
                     f" (init={init!r}); check that it marks {m_name}'s anatomy")


def _box_centre(image: sitk.Image, mask: sitk.Image | None) -> np.ndarray:
    """The physical centre (LPS, mm) of ``mask``'s bounding box, or of ``image``'s grid without a mask:
    ``init="geometry"``'s centre for a masked image, whose field of view (a head and neck, a whole
    body) may be centred far from the masked anatomy."""
    size = np.asarray(image.GetSize(), float)
    lo, hi = np.zeros_like(size), size - 1
    if mask is not None:
        idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]  # ITK index order
        lo, hi = idx.min(0).astype(float), idx.max(0).astype(float)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(((lo + hi) / 2).tolist()))


def _coarsen(image: sitk.Image, mm: float) -> sitk.Image:
    """Block averages (``sitk.BinShrink``, same physical extent) by the whole factor per axis
    nearest ``mm / spacing``: the finest pyramid level computed once, so 1 mm scans align about
    as fast as 2 mm ones. (``sitk.Shrink`` would shift even factors by half a voxel.)"""
    factors = [max(1, round(mm / s)) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _mass(image: sitk.Image, mask: sitk.Image | None) -> sitk.Image:
    """The intensity above the image's lowest value, inside ``mask`` if given: the mass whose
    centre ``init="moments"`` takes (ITK's initialiser weighs raw intensities and ignores
    masks, so a background or a no-data fill above 0 would pull the centre to the grid's)."""
    mass = image - float(sitk.GetArrayViewFromImage(image).min())
    return mass * sitk.Cast(mask > 0, mass.GetPixelID()) if mask is not None else mass


LEVELS_MM = (8.0, 4.0, 2.0)
"""The affine stage's pyramid (voxel sizes, mm) for human anatomy; :func:`hybridreg.service.prealign`
scales it for an image under :data:`hybridreg.io.SMALL_EXTENT_MM` across (:func:`hybridreg.io.physical_scale`)."""


def align(fixed: sitk.Image, moving: sitk.Image, *, kind: str = "affine", init: str = "geometry", metric: str = "ncc",
          fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None,
          levels_mm: tuple[float, ...] = LEVELS_MM, iterations: int = 100, samples: int = 50_000,
          seed: int = 1, threads: int | None = None,
          names: tuple[str, str, str, str] = ("FIXED", "MOVING", "--fixed-mask", "--moving-mask")) -> AffineResult:
    """Affine pre-alignment of MOVING to FIXED: scalar 2D/3D images, same dimension, any grids.

    ``init``: ``sitk.CenteredTransformInitializer`` by the image centres (``"geometry"``; with a
    mask, also the start from the centres of the masks' bounding boxes, :func:`_box_centre`, and
    the one of the two whose metric is better on the finest level is kept) or
    centres of mass (``"moments"``: of the intensity above each image's lowest value, inside
    its mask if given). ``kind``: ``"none"`` (identity), ``"rigid"`` (Euler) or
    ``"affine"`` (rigid, then affine: ANTs' default chain). Each stage runs regular-step
    gradient descent (scales and first step from physical shift, step halved when the gradient
    turns, ≤ ``iterations`` per level) over a pyramid whose voxel sizes approach ``levels_mm``
    (both images block-averaged once to about the finest level's voxel size, then ITK's shrink
    factors and smoothing, σ = half the level's voxel size).
    ``metric``: normalised cross-correlation over the whole image (``"ncc"``, default: one
    modality, any linear intensity scale; it found the better affine on 3 of the 4
    ``realworld`` pairs and keeps the bundled pre-aligned pairs where they are, see
    ``docs/results.md``) or Mattes mutual information, 32 bins (``"mi"``: different
    modalities or contrasts), on about ``samples`` random points
    per level drawn with ``seed``, inside the binary masks ``fixed_mask`` / ``moving_mask`` (on
    FIXED's / MOVING's grid) if given. ``threads``: ITK's threads; ``None`` (default) picks the
    fastest bit-reproducible choice: torch's intra-op thread count (``torch.get_num_threads()``,
    which ``OMP_NUM_THREADS`` and torchrun set) with ``"ncc"``, whose per-thread sums ITK adds
    in a fixed order (the same transform run after run for one thread count; within 3e-8 of
    one thread's parameters on the ``realworld`` pairs, in half the time on two threads), and 1
    with ``"mi"``, whose threaded joint histograms change from run to run (up to 8e-4 in the
    parameters on two threads). (Measured with ITK's default thread pool; another threader,
    ``ITK_GLOBAL_DEFAULT_THREADER``, may split the work otherwise.)

    Returns:
        :class:`AffineResult`; its ``transform`` maps FIXED physical points to MOVING physical
        points (LPS, mm), ITK's convention for resampling MOVING onto FIXED.

    Raises:
        ValueError, one line naming the argument (``names``: FIXED, MOVING, fixed and moving
        mask): unknown option or a ``threads`` that is not a positive integer; images not
        scalar 2D/3D or of different dimensions; a mask not on its image's grid, empty, or not
        binary; a ``moving_mask`` onto which none of FIXED's foreground maps after the
        initialisation (nothing left to match); images that do not overlap after the initialisation (< 10 % of FIXED's
        foreground, its mask or voxels above its minimum, maps inside MOVING; with ``kind``
        ``"none"``: none of it, as the headers place the images) or during the optimisation;
        an image with fewer than 4 voxels along an axis (``kind`` other than ``"none"``); a
        failed affine stage (|det| of the linear part outside [0.2, 5]: "singular matrix"; or under
        10 % of FIXED's foreground mapped inside MOVING, onto ``moving_mask`` if given, at its end,
        under half of what was at its start, and a metric no better than the start's: it ran off).
    """
    for arg, value, allowed in (("kind", kind, _KINDS), ("init", init, _INITS), ("metric", metric, _METRICS)):
        if value not in allowed:
            raise ValueError(f"align(): `{arg}` must be one of {allowed}, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"align(): `threads` must be a positive integer or None, got {threads!r}")
    n_threads = threads if threads is not None else (max(1, torch.get_num_threads()) if metric == "ncc" else 1)
    f_name, m_name, fm_name, mm_name = names
    d = fixed.GetDimension()
    for image, name in ((fixed, f_name), (moving, m_name)):
        if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
            raise ValueError(f"`{name}` must be a scalar 2D or 3D image")
    if moving.GetDimension() != d:
        raise ValueError(f"`{m_name}` is {moving.GetDimension()}D but `{f_name}` is {d}D")
    fixed_mask = _check_mask(fixed_mask, fixed, fm_name, f_name)
    moving_mask = _check_mask(moving_mask, moving, mm_name, m_name)
    f_arr = sitk.GetArrayViewFromImage(fixed)
    fg = sitk.GetArrayViewFromImage(fixed_mask) > 0 if fixed_mask is not None else f_arr > f_arr.min()
    fg = fg if fg.any() else np.ones_like(fg)
    if kind == "none":
        if _overlap(fixed, moving, fg, sitk.AffineTransform(d)) == 0:  # the deformable stage would see no MOVING at all
            raise ValueError(f"`{f_name}` and `{m_name}` do not overlap: none of {f_name}'s foreground lies inside"
                             f" {m_name} as their headers place them (kind 'none', the CLI's --affine none); check their"
                             " origins and directions, or run the affine stage")
        _check_moving_mask(fixed, moving, fg, sitk.AffineTransform(d), moving_mask, names, init)
        return AffineResult(sitk.AffineTransform(d), kind, init, metric, None, {})
    for image, name in ((fixed, f_name), (moving, m_name)):
        if min(image.GetSize()) < 4:  # ITK's smoothing of the metric's gradient
            raise ValueError(f"`{name}` has fewer than 4 voxels along an axis (size {'x'.join(map(str, image.GetSize()))}):"
                             " the affine stage needs at least 4 along every axis (kind 'none', the CLI's --affine none,"
                             " skips it)")

    t0 = time.perf_counter()
    fixed, moving = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    mode = getattr(sitk.CenteredTransformInitializerFilter, init.upper())
    rigid = sitk.Euler2DTransform() if d == 2 else sitk.Euler3DTransform()
    starts = [type(rigid)(sitk.CenteredTransformInitializer(_mass(fixed, fixed_mask), _mass(moving, moving_mask), rigid, mode))]
    if init == "geometry" and (fixed_mask is not None or moving_mask is not None):  # also: the centres of what is matched
        box, centre = type(rigid)(), _box_centre(fixed, fixed_mask)
        box.SetCenter(centre.tolist())
        box.SetTranslation((_box_centre(moving, moving_mask) - centre).tolist())
        starts.append(box)
    full = fixed, moving
    fixed, moving = _coarsen(fixed, min(levels_mm)), _coarsen(moving, min(levels_mm))  # masks act in physical space
    fine, cap = min(fixed.GetSpacing()), max(1, min(fixed.GetSize()) // 16)  # a level keeps >= 16 voxels per axis
    shrinks = [int(min(cap, max(1, round(mm / fine)))) for mm in levels_mm]
    inside = float(np.mean(fg)) if fixed_mask is not None else 1.0  # samples outside the mask are dropped
    percent = [float(min(1.0, samples / (inside * np.prod([-(-n // s) for n in fixed.GetSize()])))) for s in shrinks]

    def method() -> sitk.ImageRegistrationMethod:
        reg = sitk.ImageRegistrationMethod()
        if metric == "mi":
            reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        else:
            reg.SetMetricAsCorrelation()
        if fixed_mask is not None:
            reg.SetMetricFixedMask(fixed_mask)
        if moving_mask is not None:
            reg.SetMetricMovingMask(moving_mask)
        reg.SetInterpolator(sitk.sitkLinear)
        return reg

    def threaded(call):
        default_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        try:  # reg.SetNumberOfThreads(1) misses some of the filters' threads
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n_threads)
            return call()
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default_threads)

    def evaluate(tx: sitk.Transform) -> float:
        """The metric of ``tx`` on every voxel of the finest level (+inf where it cannot be evaluated)."""
        reg = method()
        reg.SetInitialTransform(tx, inPlace=False)
        try:
            return float(threaded(lambda: reg.MetricEvaluate(fixed, moving)))
        except RuntimeError:  # no sample maps inside MOVING
            return math.inf

    rigid = starts[int(np.argmin([evaluate(tx) for tx in starts]))] if len(starts) > 1 else starts[0]  # lower: better
    frac = _overlap(*full, fg, rigid)
    if frac < 0.1:
        raise ValueError(f"`{f_name}` and `{m_name}` do not overlap after the initial alignment (init={init!r}):"
                         f" {100 * frac:.1f} % of {f_name}'s foreground maps inside {m_name}; check their fields of"
                         " view, origins and directions")
    _check_moving_mask(*full, fg, rigid, moving_mask, names, init)
    start_overlap = frac if moving_mask is None else _overlap(*full, fg, rigid, moving_mask)
    start_tx = type(rigid)(rigid)  # run() moves rigid itself
    seconds = {"init": time.perf_counter() - t0}

    def run(tx: sitk.Transform, stage: str) -> float:
        reg = method()
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentagePerLevel(percent, seed)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=3e-3, numberOfIterations=iterations,
                                                     relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8,
                                                     estimateLearningRate=reg.Once)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(shrinks)
        reg.SetSmoothingSigmasPerLevel([0.5 * s * fine if s > 1 else 0.0 for s in shrinks])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(tx, inPlace=True)
        t = time.perf_counter()
        try:
            threaded(lambda: reg.Execute(fixed, moving))
        except RuntimeError as e:
            msg = (str(e).strip().splitlines() or ["failed"])[-1].strip()
            raise ValueError(f"the {stage} stage failed: `{f_name}` and `{m_name}` may not overlap"
                             f" or show the same anatomy ({msg})") from None
        seconds[stage] = time.perf_counter() - t
        return float(reg.GetMetricValue())

    value = run(rigid, "rigid")
    result = _as_affine(rigid)
    if kind == "affine":
        value = run(result, "affine")
        _check_det(result, (f_name, m_name))
    end_overlap = _overlap(*full, fg, result, moving_mask)
    # it ran off (a local optimum beside the anatomy, at the edge of a large field of view): little overlap left, and a
    # metric no better than its start's (a slab's true place may overlap little, but it matches better)
    if end_overlap < 0.1 and end_overlap < 0.5 * start_overlap and not evaluate(result) < evaluate(start_tx):
        onto = f"onto `{mm_name}`" if moving_mask is not None else f"inside {m_name}"
        raise ValueError(f"the affine stage failed: {100 * end_overlap:.1f} % of {f_name}'s foreground maps {onto} after it,"
                         f" against {100 * start_overlap:.1f} % at its start (init={init!r}), and it matches no better; check"
                         " that they show the same anatomy, or try init='moments' (the CLI's --init moments)")
    return AffineResult(result, kind, init, metric, value, seconds, n_threads)


def write_affine(path: str | os.PathLike, transform: sitk.Transform) -> None:
    """Write an affine (or rigid) FIXED → MOVING transform as ITK's ``AffineTransform``,
    atomically: ``affine.mat`` (ITK/ANTs binary MATLAB format) or ``.txt``/``.tfm`` (text)."""
    with atomic_output(path) as tmp:
        sitk.WriteTransform(_as_affine(transform), str(tmp))


def _field_transform(field_image: sitk.Image) -> sitk.DisplacementFieldTransform:
    # the transform takes its image over (leaves it empty): give it a float64 copy
    return sitk.DisplacementFieldTransform(sitk.Image(sitk.Cast(field_image, sitk.sitkVectorFloat64)))


def composite(affine: sitk.Transform, displacement_field: sitk.Image) -> sitk.CompositeTransform:
    """FIXED → MOVING transform ``p ↦ affine(p + D(p))``: the displacement field ``D`` (mm,
    LPS, a vector image on FIXED's grid as :func:`hybridreg.io.displacement_to_itk` makes and
    :func:`hybridreg.io.write_displacement` writes it) first, then ``affine``."""
    return sitk.CompositeTransform([_as_affine(affine), _field_transform(displacement_field)])


def inverse_composite(affine: sitk.Transform, inverse_field: sitk.Image) -> sitk.CompositeTransform:
    """MOVING → FIXED transform ``q ↦ r + Dinv(r)``, ``r = affine⁻¹(q)``: the inverse of
    :func:`composite` when ``Dinv`` (mm, on FIXED's grid) inverts ``p ↦ p + D(p)``.

    Raises:
        ValueError: ``affine`` is not invertible.
    """
    inv = _as_affine(affine)
    if not inv.SetInverse():
        raise ValueError("inverse_composite(): `affine` is not invertible")
    return sitk.CompositeTransform([_field_transform(inverse_field), inv])


def write_transform(path: str | os.PathLike, transform: sitk.Transform) -> None:
    """Write any ITK transform, composites included, atomically (``.h5``: ITK's HDF5 format,
    read by ``sitk.ReadTransform``, ANTs' antsApplyTransforms and 3D Slicer). The file keeps
    ITK's direction: the transform maps FIXED's physical points to MOVING's (LPS, mm).

    Raises:
        OSError: ``path`` cannot be written (nothing is left at ``path``).
    """
    with atomic_output(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
