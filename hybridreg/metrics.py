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

import itertools
import math
from typing import Iterable, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .regularization import check_spacing
from .spatial import check_mask, jacobian_determinant

__all__ = [
    "as_label_array",
    "common_labels",
    "dice",
    "hausdorff",
    "hd95",
    "jacobian_stats",
    "folding_percent",
    "sdlogj",
    "non_diffeomorphic_volume",
    "LabelPolicy",
    "scored_labels",
    "score_dice",
    "score_registration",
    "warp_labels",
    "dice_through",
    "target_registration_error",
    "tre_stages",
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
    """The labels present in both label maps, background 0 excluded, ascending.

    ``a`` and ``b`` are integer label maps (numpy arrays or tensors) of any shape; they need not
    share a shape. Raises ``ValueError`` (naming ``a`` or ``b``) if either holds non-integer values."""
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
    given = labels is not None
    labels = tuple(int(x) for x in (labels if given else common_labels(a, b)))
    if not labels:
        raise ValueError("`labels` is empty: no label to score" if given else
                         "`labels`: no label to score (the two maps share no non-zero label)")
    return _check_label_list(labels)


def _check_label_list(labels: tuple[int, ...]) -> tuple[int, ...]:
    """A label list given to score: each label once, never the background 0."""
    repeated = sorted({lab for lab in labels if labels.count(lab) > 1})
    if repeated:
        raise ValueError(f"`labels`: label(s) {repeated} given more than once")
    if 0 in labels:
        raise ValueError("`labels`: 0 is the background, never scored")
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
        ValueError: shape mismatch, non-integer values, no label to score, a label given twice,
            or the background 0.
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


def hausdorff(a, b, labels: Iterable[int] | None = None, spacing: Sequence[float] | None = None, percentile: float = 95.0,
              *, fn: str = "hausdorff") -> dict[int, float]:
    """Symmetric percentile Hausdorff distance (mm) between label surfaces, per label.

    ``max(P_q(d(∂A → ∂B)), P_q(d(∂B → ∂A)))`` with ``q = percentile``. A label missing from
    one of the two maps scores ``inf``; missing from both, NaN. A structure's voxels on the
    grid's edge are surface voxels (the grid is padded with background, as in the DeepMind
    ``surface-distance`` package).

    Args:
        a, b: label maps of the same shape. labels: as in :func:`dice`.
        spacing: mm per array axis (``None`` = 1 mm). percentile: in (0, 100].
        fn: the function the messages name (:func:`hd95` passes its own).

    Raises:
        ValueError: shape mismatch, non-integer values, ``labels`` as :func:`dice` refuses them,
            a ``spacing`` that is not one positive finite number per axis, or ``percentile``
            outside (0, 100].
    """
    a, b = _pair(a, b)
    if not 0 < percentile <= 100:
        raise ValueError(f"`percentile` must be in (0, 100], got {percentile!r}")
    sp = check_spacing(spacing, a.ndim, fn=fn)
    out = {}
    for lab in _labels_arg(labels, a, b):
        ma, mb = a == lab, b == lab
        if not ma.any() and not mb.any():
            out[lab] = float("nan")
            continue
        if not ma.any() or not mb.any():
            out[lab] = float("inf")
            continue
        # crop to the pair's bounding box plus one voxel of background on every side, padded
        # where the box meets the grid's edge: every surface voxel and nearest surface point
        # lies inside it, the distance maps cost far less, and a structure cut by the field of
        # view has a surface there (as the DeepMind package, which pads by one voxel)
        box = np.argwhere(ma | mb)
        lo, hi = box.min(0) - 1, box.max(0) + 2
        crop = tuple(slice(max(a_, 0), b_) for a_, b_ in zip(lo, hi))
        pad = [(max(-a_, 0), max(b_ - n, 0)) for a_, b_, n in zip(lo, hi, a.shape)]
        dab, dba = _surface_distances(np.pad(ma[crop], pad), np.pad(mb[crop], pad), sp)
        out[lab] = float(max(np.percentile(dab, percentile), np.percentile(dba, percentile)))
    return out


def hd95(a, b, labels: Iterable[int] | None = None, spacing: Sequence[float] | None = None) -> dict[int, float]:
    """95th-percentile Hausdorff distance in mm per label (see :func:`hausdorff`)."""
    return hausdorff(a, b, labels, spacing, 95.0, fn="hd95")


def _batched(disp: torch.Tensor) -> torch.Tensor:
    """``disp`` as ``(B, d, *spatial)``: a 3-dim field is one 2D field ``(2, H, W)``; a 4-dim
    field is a batch of 2D fields ``(B, 2, H, W)`` when its second size is 2 (so
    ``(3, 2, H, W)`` is three 2D fields), else one 3D field ``(3, D, H, W)``. Raises
    ``ValueError`` for any other shape."""
    if disp.dim() == 3 and disp.shape[0] == 2:
        return disp.unsqueeze(0)
    if disp.dim() == 4 and disp.shape[1] != 2 and disp.shape[0] == 3:
        return disp.unsqueeze(0)
    if (disp.dim() == 4 and disp.shape[1] == 2) or (disp.dim() == 5 and disp.shape[1] == 3):
        return disp
    raise ValueError(f"`disp` must be a (B, d, *spatial) or (d, *spatial) displacement with d = 2 or 3, got shape"
                     f" {tuple(disp.shape)}")


def _jac(disp: torch.Tensor, mask: torch.Tensor | None = None, fn: str = "jacobian_stats") -> torch.Tensor:
    """det J of every voxel of every field, as ``(B, *spatial)``; with ``mask`` (the spatial
    shape, or ``(B, *spatial)`` / ``(B, 1, *spatial)``), the masked voxels' values, flattened."""
    j = jacobian_determinant(_batched(disp).detach())
    if mask is None:
        return j
    m = torch.as_tensor(mask, device=j.device)
    spatial = j.shape[1:]
    if tuple(m.shape[-len(spatial):]) != tuple(spatial) or m.numel() not in (math.prod(spatial), j.numel()):
        raise ValueError(f"`mask` must have the spatial shape {tuple(spatial)} (or one per field), got {tuple(m.shape)}")
    m = m.reshape(-1, 1, *spatial)
    check_mask(fn, "mask", m, (j.shape[0], 1, *spatial))  # finite, in [0, 1], not empty
    return j[(m[:, 0] > 0).expand_as(j)]


def folding_percent(disp: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Percentage of voxels with ``det J_φ ≤ 0`` (central differences), optionally in a mask.
    A NaN determinant counts as folded: it is no positive volume change. ``disp``, ``mask`` and
    errors as :func:`jacobian_stats`'s."""
    j = _jac(disp, mask, "folding_percent")
    return float((~(j > 0)).double().mean() * 100.0)


def sdlogj(disp: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Standard deviation of ``log det J_φ`` with J clipped to ``[1e-9, 1e9]`` (method §4) over
    the voxels (in ``mask``) of every field of the batch. ``disp``, ``mask`` and errors as
    :func:`jacobian_stats`'s."""
    j = _jac(disp, mask, "sdlogj").double()
    return float(torch.log(j.clamp(1e-9, 1e9)).std())


def _simplices(d: int) -> list[tuple[tuple[int, ...], ...]]:
    """The simplices of both decompositions of the unit cell: vertices as corner bit tuples.

    Every corner with its ``d`` axis neighbours (a corner simplex; 2D: the 4 triangles of the
    square's two triangulations; 3D: the 8 corner tetrahedra of its two 5-tetrahedra
    decompositions) and, in 3D, the two central tetrahedra (the corners of even and of odd
    parity)."""
    corners = list(itertools.product((0, 1), repeat=d))
    out = [(c, *(tuple(b ^ (a == k) for k, b in enumerate(c)) for a in range(d))) for c in corners]
    if d == 3:
        out += [tuple(c for c in corners if sum(c) % 2 == parity) for parity in (0, 1)]
    return out


def non_diffeomorphic_volume(disp: torch.Tensor) -> float:
    """Non-diffeomorphic volume (NDV; NDA in 2D) of φ = id + disp, in percent of the image domain.

    Each cell between 2^d neighbouring voxel centres is cut into simplices in both of the ways
    the digital-diffeomorphism criterion uses (3D: two decompositions into 5 tetrahedra; 2D: the
    square's two triangulations); a simplex whose image under φ (piecewise linear between voxel
    centres) has negative signed volume contributes that volume, and the two decompositions are
    averaged. NDV is 0 exactly when every simplex keeps its orientation, and it measures *how
    much* space folds where %|J|≤0 counts voxels of one finite-difference scheme. Source: Liu et
    al., "On finite difference Jacobian computation in deformable image registration", IJCV
    2024 (the LUMIR challenge's NDV); method §4.

    Args:
        disp: ``(B, d, *spatial)`` or ``(d, *spatial)`` voxel-unit displacement (2D or 3D), array
            order, on the fixed grid.

    Returns:
        ``100 · Σ folded volume / number of voxels`` over the batch (voxel units, so spacing
        cancels), the denominator of the reference implementation (Liu et al.'s
        ``digital_diffeomorphism``, whose padded border cells fold nothing).
    """
    disp = _batched(disp)
    d = disp.shape[1]
    shape = disp.shape[2:]
    u = disp.detach().float()

    def at(corner: tuple[int, ...], i: int) -> torch.Tensor:  # a view: component i of u at this corner of every cell
        return u[(slice(None), i, *(slice(b, n - 1 + b) for b, n in zip(corner, shape)))]

    folded = 0.0
    for simplex in _simplices(d):
        # each edge of φ's image, component by component: the identity's edge (a constant) plus the difference of u
        ref = [np.subtract(v, simplex[0]) for v in simplex[1:]]
        e = [[at(v, i) - at(simplex[0], i) + float(r[i]) for i in range(d)] for v, r in zip(simplex[1:], ref)]
        orient = math.copysign(1.0, np.linalg.det(np.array(ref, dtype=float)))  # orientation under the identity
        if d == 2:
            det = e[0][0] * e[1][1] - e[0][1] * e[1][0]
        else:
            det = (e[0][0] * (e[1][1] * e[2][2] - e[1][2] * e[2][1]) - e[0][1] * (e[1][0] * e[2][2] - e[1][2] * e[2][0])
                   + e[0][2] * (e[1][0] * e[2][1] - e[1][1] * e[2][0]))
        folded += float(torch.clamp(-orient * det, min=0).sum(dtype=torch.float64)) / math.factorial(d)
    voxels = disp.shape[0] * math.prod(shape)
    return float(0.5 * folded / voxels * 100.0)


def jacobian_stats(disp: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """``{"folding_percent", "sdlogj", "jacobian_min", "jacobian_max", "ndv_percent"}`` of
    φ = id + disp (``ndv_percent``: :func:`non_diffeomorphic_volume`, whole domain).

    Args:
        disp: ``(B, d, *spatial)`` or ``(d, *spatial)`` voxel-unit displacement
            (``(3, 2, H, W)`` is three 2D fields: :func:`_batched`; a 3D field of two slices
            is passed batched, ``(1, 3, 2, H, W)``).
        mask: optional mask of the spatial shape, applied to every field of the batch, or one
            per field (e.g. the fixed brain mask; not applied to the NDV): bool, or weights in
            [0, 1] of which the voxels above 0 are taken.

    Raises:
        ValueError: a ``disp`` that is no 2D or 3D field, or a ``mask`` off its grid, with NaN,
            weights outside [0, 1], or empty.
    """
    j = _jac(disp, mask).double()
    return {
        "folding_percent": float((~(j > 0)).double().mean() * 100.0),
        "sdlogj": float(torch.log(j.clamp(1e-9, 1e9)).std()),
        "jacobian_min": float(j.min()),
        "jacobian_max": float(j.max()),
        "ndv_percent": non_diffeomorphic_volume(disp),
    }


LabelPolicy = Union[str, Sequence[int]]
"""Which labels a pair is scored on (:func:`scored_labels`): ``"auto"``, ``"all"`` or an
explicit sequence of label IDs."""

AUTO_MIN_STANDARD = 20
"""``"auto"`` uses the standard FreeSurfer structures when at least this many are present (and they
are at least half the labels under 1000 the maps share: an atlas of another numbering, such as AAL's
116 regions, holds 20 or more of FreeSurfer's numbers by chance, while FreeSurfer's aparc+aseg adds
its cortical parcels from 1000 up)."""


def scored_labels(fixed_labels, moving_labels, policy: LabelPolicy = "auto") -> tuple[int, ...]:
    """The labels a pair is scored on, by an explicit policy.

    Args:
        fixed_labels, moving_labels: the pair's label maps (any shapes; only their label
            sets are read).
        policy: ``"auto"``: the 30 standard FreeSurfer structures
            (:func:`hybridreg.data.evaluation_labels`, voxelmorph's ``labels.npz``) present in
            both maps, or every label the maps share when fewer than
            :data:`AUTO_MIN_STANDARD` of them are present or they are fewer than half the
            shared labels under 1000 (an atlas of another numbering); ``"all"``: every non-zero label
            the maps share; a sequence of ints: exactly those, each present in both maps.

    Returns:
        Label IDs, in evaluation-label order for ``"auto"``, sorted for ``"all"``.

    Raises:
        ValueError: the maps share no non-zero label, an unknown policy string, or an
            explicit list with a label missing from either map, a repeated label or the
            background 0 (the message names ``labels``).
    """
    common = common_labels(fixed_labels, moving_labels)
    if not common:
        raise ValueError("the fixed and moving label maps share no non-zero label: nothing to score")
    if isinstance(policy, str):
        if policy == "all":
            return common
        if policy != "auto":
            raise ValueError(f"`policy` must be 'auto', 'all' or a list of label IDs, got {policy!r}")
        from .data import evaluation_labels_in

        standard = evaluation_labels_in(common)
        below_1000 = [lab for lab in common if lab < 1000]  # FreeSurfer's cortical parcels (aparc+aseg) are 1000 and up
        return tuple(standard) if len(standard) >= AUTO_MIN_STANDARD and 2 * len(standard) >= len(below_1000) else common
    chosen = _check_label_list(tuple(int(v) for v in policy))
    missing = [lab for lab in chosen if lab not in common]
    if missing or not chosen:
        raise ValueError(f"`labels`: labels {missing or '[]'} are not present in both label maps")
    return chosen


def score_dice(fixed_labels, warped_labels, moving_labels=None, policy: LabelPolicy = "auto") -> dict:
    """Dice of a registration: the one scoring function of the CLI, tuning, training and
    the benchmarks.

    Args:
        fixed_labels: the fixed image's label map. warped_labels: the moving label map
            warped onto the fixed grid (nearest neighbour), same shape.
        moving_labels: the moving label map before warping; its label set (with the fixed
            one) decides which labels are scored (default: ``warped_labels``).
        policy: which labels, see :func:`scored_labels`.

    Returns:
        ``{"labels": (ids...), "per_label": {id: dice}, "mean": mean over the scored labels}``
        (a label absent from both maps after warping scores NaN and is left out of the mean).

    Raises:
        ValueError: as :func:`scored_labels` and :func:`dice`.
    """
    labels = scored_labels(fixed_labels, warped_labels if moving_labels is None else moving_labels, policy)
    per = dice(fixed_labels, warped_labels, labels)
    vals = [v for v in per.values() if np.isfinite(v)]
    return {"labels": labels, "per_label": per, "mean": float(np.mean(vals)) if vals else float("nan")}


def warp_labels(moving_labels, displacement: torch.Tensor, voxel_map: torch.Tensor | None = None) -> np.ndarray:
    """``moving_labels ∘ M ∘ (id + displacement)`` by nearest neighbour, on the fixed grid.

    Args:
        moving_labels: label map (on the fixed grid, or on its own with ``voxel_map``).
        displacement: ``(1, d, *spatial)`` voxel-unit displacement on the fixed grid.
        voxel_map: optional ``(1, d, d + 1)`` fixed → moving voxel-index map M.

    Returns:
        The warped label map, int64, of the fixed grid's shape (computed on ``displacement``'s
        device; ``voxel_map`` follows it).

    Raises:
        ValueError: ``moving_labels`` not an integer label map (:func:`as_label_array`), or a
            malformed ``displacement`` or ``voxel_map`` (:func:`hybridreg.spatial.warp`).
    """
    from .spatial import warp

    ml = torch.as_tensor(as_label_array(moving_labels, "moving_labels"))[None, None].to(displacement.device)
    return warp(ml, displacement.detach(), mode="nearest", voxel_map=voxel_map)[0, 0].cpu().numpy()


def dice_through(fixed_labels, moving_labels, voxel_map: torch.Tensor, policy: LabelPolicy = "auto") -> dict:
    """Dice of the moving labels mapped onto the fixed grid by an affine voxel map alone (the
    scans as they lie, or after the affine stage): :func:`score_dice` of :func:`warp_labels`
    with a zero displacement, without the Jacobian statistics of a registration.

    Args:
        fixed_labels: label map of the fixed grid. moving_labels: label map on its own grid.
        voxel_map: ``(1, d, d + 1)`` fixed → moving voxel-index map.

    Returns:
        ``{"mean", "per_label" ({"id": dice} with string keys, as ``metrics.json`` has them)}``.

    Raises:
        ValueError: label maps or ``policy`` as :func:`score_dice` refuses them, or a malformed
            ``voxel_map`` (:func:`warp_labels`).
    """
    zero = torch.zeros((1, len(np.shape(fixed_labels)), *np.shape(fixed_labels)))
    r = score_dice(fixed_labels, warp_labels(moving_labels, zero, voxel_map), moving_labels, policy)
    return {"mean": r["mean"], "per_label": {str(k): v for k, v in r["per_label"].items()}}


def score_registration(fixed_labels, moving_labels, displacement: torch.Tensor, policy: LabelPolicy = "auto", *,
                       spacing: Sequence[float] | None = None, with_hd95: bool = False,
                       voxel_map: torch.Tensor | None = None) -> dict:
    """Every standard metric of one registration (method §4): the moving labels warped by
    nearest neighbour, Dice by :func:`score_dice`, optionally HD95, and the Jacobian statistics.

    Args:
        fixed_labels: label map on the fixed image grid. moving_labels: label map on the same
            grid, or (with ``voxel_map``) on the moving image's own grid.
        displacement: ``(1, d, *spatial)`` or ``(d, *spatial)`` voxel-unit displacement on the
            fixed grid (``warped = moving ∘ M ∘ (id + displacement)``), numpy or torch.
        policy: which labels, see :func:`scored_labels`.
        spacing: voxel size in mm per array axis (HD95 only). with_hd95: compute HD95.
        voxel_map: optional ``(1, d, d + 1)`` map M from fixed to moving voxel indices
            (:func:`hybridreg.spatial.to_sampling_grid`).

    Returns:
        ``{"labels", "dice" (per label), "dice_mean", "dice_before_mean" (the maps as they
        are; ``None`` on two grids), "hd95" (per label, with ``with_hd95``), "hd95_mean" (over the
        labels whose HD95 is finite), "hd95_lost" (the scored labels that the warped moving map no
        longer holds: HD95 ``inf``, Dice 0, left out of "hd95_mean"), "warped_labels", **jacobian_stats}``.

    Raises:
        ValueError: a batch of displacements (score pair by pair), a displacement off the fixed
            labels' grid, labels as :func:`scored_labels` refuses them, or a bad ``spacing``.
    """
    disp = torch.as_tensor(displacement)
    disp = disp[None] if disp.dim() == len(np.shape(fixed_labels)) + 1 else disp
    if disp.dim() == len(np.shape(fixed_labels)) + 2 and disp.shape[0] != 1:
        raise ValueError(f"`displacement` must be one registration (1, d, *spatial) or (d, *spatial), got a batch of"
                         f" {disp.shape[0]} {tuple(disp.shape)}: score each pair with its own label maps")
    if tuple(disp.shape[2:]) != tuple(np.shape(fixed_labels)):
        raise ValueError(f"`displacement` must be on the fixed labels' grid {tuple(np.shape(fixed_labels))}, got shape"
                         f" {tuple(disp.shape)}")
    warped = warp_labels(moving_labels, disp, voxel_map)
    after = score_dice(fixed_labels, warped, moving_labels, policy)
    same_grid = voxel_map is None and np.shape(fixed_labels) == np.shape(moving_labels)
    out = {"labels": after["labels"], "dice": after["per_label"], "dice_mean": after["mean"],
           "dice_before_mean": score_dice(fixed_labels, moving_labels, policy=after["labels"])["mean"] if same_grid else None,
           "warped_labels": warped, **jacobian_stats(disp)}
    if with_hd95:
        out["hd95"] = hd95(fixed_labels, warped, after["labels"], spacing)
        vals = [v for v in out["hd95"].values() if np.isfinite(v)]
        out["hd95_mean"] = float(np.mean(vals)) if vals else float("nan")
        out["hd95_lost"] = [k for k, v in out["hd95"].items() if v == float("inf")]
    return out


def target_registration_error(fixed_points: np.ndarray, moving_points: np.ndarray,
                              transform: sitk.Transform | None = None) -> dict:
    """Target registration error (TRE) of corresponding landmarks: ``‖T(p_f) − p_m‖`` per point,
    mm, with ``T`` the transform from FIXED physical points to MOVING ones (LPS mm; the
    transforms hybridreg writes, applied by SimpleITK's ``TransformPoint``; ``None``: the
    identity, the error before registration). Learn2Reg's / LUMIR's landmark metric.

    Args:
        fixed_points, moving_points: ``(n, d)`` corresponding points, LPS mm
            (:func:`hybridreg.io.read_landmarks`).

    Returns:
        ``{"n", "mean", "std", "median", "max", "per_point"}`` in mm.

    Raises:
        ValueError: point sets of different shapes, or not ``(n, d)``.
    """
    pf, pm = np.asarray(fixed_points, dtype=float), np.asarray(moving_points, dtype=float)
    if pf.ndim != 2 or pf.shape != pm.shape or not len(pf):
        raise ValueError(f"target_registration_error(): the landmark sets must be (n, d) of equal n, got {pf.shape}"
                         f" and {pm.shape}")
    mapped = pf if transform is None else np.array([transform.TransformPoint(tuple(map(float, p))) for p in pf])
    err = np.linalg.norm(mapped - pm, axis=1)
    return {"n": int(len(err)), "mean": float(err.mean()), "std": float(err.std()), "median": float(np.median(err)),
            "max": float(err.max()), "per_point": err.tolist()}


def tre_stages(fixed_points: np.ndarray, moving_points: np.ndarray, affine: sitk.Transform, displacement: np.ndarray,
               geometry) -> dict:
    """:func:`target_registration_error` before registration (the scans as they lie), after the
    affine stage, and after the whole registration ``p ↦ affine(p + D(p))`` (the composite
    transform ``transform.h5`` holds, :func:`hybridreg.affine.composite`).

    Args:
        fixed_points, moving_points: ``(n, d)`` corresponding points, LPS mm.
        affine: the affine stage's FIXED → MOVING transform. displacement: ``(d, *shape)``
            voxel-unit displacement on FIXED's grid ``geometry`` (:class:`hybridreg.io.Geometry`).

    Returns:
        ``{"before", "after_affine", "after"}``, each as :func:`target_registration_error`.
    """
    from .affine import composite
    from .io import displacement_to_itk

    whole = composite(affine, displacement_to_itk(displacement, geometry))
    return {"before": target_registration_error(fixed_points, moving_points),
            "after_affine": target_registration_error(fixed_points, moving_points, affine),
            "after": target_registration_error(fixed_points, moving_points, whole)}

