"""Evaluation metrics (method §4): Dice, HD95, Jacobian determinant statistics.

Label maps are integer arrays (numpy or torch) of identical shape in array order, with
``spacing`` in mm per array axis. Dice and HD95 follow Learn2Reg: per structure, then the
mean over structures. HD95 uses surface voxels (face-connected contours) and the
distance from each surface voxel of one map to the nearest surface voxel of the other;
the 95th percentile of each direction, then the larger of the two (as the DeepMind
``surface-distance`` package used by Learn2Reg). Distances come from SimpleITK's
Maurer distance transform with the image spacing.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .spatial import jacobian_determinant

__all__ = [
    "as_label_array",
    "common_labels",
    "dice",
    "hausdorff",
    "hd95",
    "jacobian_stats",
    "folding_percent",
    "sdlogj",
]


def as_label_array(labels, name: str = "labels") -> np.ndarray:
    """Convert a label map (numpy/torch, any leading size-1 dims) to an int64 numpy array.

    Raises:
        ValueError: non-integer values, NaN/Inf, or not 2D/3D after squeezing.
    """
    a = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (2, 3):
        raise ValueError(f"`{name}` must be a 2D or 3D label map, got shape {a.shape}")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError(f"`{name}` contains NaN or Inf values")
        if not np.array_equal(a, np.round(a)):
            raise ValueError(f"`{name}` must hold integer label values, found non-integer values")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"`{name}` must be an integer label map, got dtype {a.dtype}")
    return a.astype(np.int64)


def common_labels(a, b) -> tuple[int, ...]:
    """Labels (excluding 0) present in both maps."""
    la = set(np.unique(as_label_array(a, "a")).tolist())
    lb = set(np.unique(as_label_array(b, "b")).tolist())
    return tuple(sorted((la & lb) - {0}))


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = as_label_array(a, "a")
    b = as_label_array(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"label maps `a` {a.shape} and `b` {b.shape} must have the same shape")
    return a, b


def _labels_arg(labels: Iterable[int] | None, a: np.ndarray, b: np.ndarray) -> tuple[int, ...]:
    if labels is None:
        labels = common_labels(a, b)
    labels = tuple(int(x) for x in labels)
    if not labels:
        raise ValueError("`labels`: no label to score (the two maps share no non-zero label)")
    return labels


def dice(a, b, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice overlap ``2|A∩B| / (|A| + |B|)`` per label.

    Args:
        a, b: label maps of the same shape.
        labels: labels to score (``None`` = those present in both, excluding 0). A label
            absent from both maps scores NaN (excluded by ``np.nanmean``).

    Returns:
        ``{label: dice}``.

    Raises:
        ValueError: shape mismatch, non-integer values, or no label to score.
    """
    a, b = _pair(a, b)
    out = {}
    for lab in _labels_arg(labels, a, b):
        ma, mb = a == lab, b == lab
        denom = int(ma.sum()) + int(mb.sum())
        out[lab] = float(2.0 * np.logical_and(ma, mb).sum() / denom) if denom else float("nan")
    return out


def _to_sitk(mask: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    return img


def _surface_distances(ma: np.ndarray, mb: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    ia, ib = _to_sitk(ma, spacing), _to_sitk(mb, spacing)
    ca = sitk.GetArrayFromImage(sitk.LabelContour(ia, fullyConnected=False)) > 0
    cb = sitk.GetArrayFromImage(sitk.LabelContour(ib, fullyConnected=False)) > 0

    def dist_to(contour: np.ndarray) -> np.ndarray:
        img = _to_sitk(contour, spacing)
        dm = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
        return np.clip(sitk.GetArrayFromImage(dm), 0.0, None)

    return dist_to(cb)[ca], dist_to(ca)[cb]


def hausdorff(a, b, labels: Iterable[int] | None = None, spacing: Sequence[float] | None = None, percentile: float = 95.0) -> dict[int, float]:
    """Symmetric percentile Hausdorff distance (mm) between label surfaces, per label.

    ``max(P_q(d(∂A → ∂B)), P_q(d(∂B → ∂A)))`` with ``q = percentile``. A label missing from
    one of the two maps scores ``inf``; missing from both, NaN.

    Args:
        a, b: label maps of the same shape. labels: as in :func:`dice`.
        spacing: mm per array axis (``None`` = 1 mm). percentile: in (0, 100].
    """
    a, b = _pair(a, b)
    if not 0 < percentile <= 100:
        raise ValueError(f"`percentile` must be in (0, 100], got {percentile!r}")
    sp = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * a.ndim
    if len(sp) != a.ndim or not all(s > 0 for s in sp):
        raise ValueError(f"`spacing` must be {a.ndim} positive numbers, got {spacing!r}")
    out = {}
    for lab in _labels_arg(labels, a, b):
        ma, mb = a == lab, b == lab
        if not ma.any() and not mb.any():
            out[lab] = float("nan")
            continue
        if not ma.any() or not mb.any():
            out[lab] = float("inf")
            continue
        # crop to the pair's bounding box (+1 voxel): every surface voxel and nearest
        # surface point lies inside it, and the distance maps cost far less
        box = np.argwhere(ma | mb)
        lo = np.maximum(box.min(0) - 1, 0)
        hi = box.max(0) + 2
        crop = tuple(slice(a_, b_) for a_, b_ in zip(lo, hi))
        dab, dba = _surface_distances(ma[crop], mb[crop], sp)
        out[lab] = float(max(np.percentile(dab, percentile), np.percentile(dba, percentile)))
    return out


def hd95(a, b, labels: Iterable[int] | None = None, spacing: Sequence[float] | None = None) -> dict[int, float]:
    """95th-percentile Hausdorff distance in mm per label (see :func:`hausdorff`)."""
    return hausdorff(a, b, labels, spacing, 95.0)


def _jac(disp: torch.Tensor) -> torch.Tensor:
    if disp.dim() in (3, 4):  # (d, *spatial) without batch
        disp = disp.unsqueeze(0)
    return jacobian_determinant(disp.detach())


def folding_percent(disp: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Percentage of voxels with ``det J_φ ≤ 0`` (central differences), optionally in a mask."""
    j = _jac(disp)
    if mask is not None:
        j = j[mask.reshape(j.shape).bool()]
    return float((j <= 0).double().mean() * 100.0)


def sdlogj(disp: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Standard deviation of ``log det J_φ`` with J clipped to ``[1e-9, 1e9]`` (method §4)."""
    j = _jac(disp).double()
    if mask is not None:
        j = j[mask.reshape(j.shape).bool()]
    return float(torch.log(j.clamp(1e-9, 1e9)).std())


def jacobian_stats(disp: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """``{"folding_percent", "sdlogj", "jacobian_min", "jacobian_max"}`` of φ = id + disp.

    Args:
        disp: ``(B, d, *spatial)`` or ``(d, *spatial)`` voxel-unit displacement.
        mask: optional boolean mask of the spatial shape (e.g. the fixed brain mask).
    """
    j = _jac(disp).double()
    if mask is not None:
        j = j[mask.reshape(j.shape).bool()]
    return {
        "folding_percent": float((j <= 0).double().mean() * 100.0),
        "sdlogj": float(torch.log(j.clamp(1e-9, 1e9)).std()),
        "jacobian_min": float(j.min()),
        "jacobian_max": float(j.max()),
    }
