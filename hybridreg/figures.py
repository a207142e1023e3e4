"""Figures with object-oriented matplotlib (``matplotlib.figure.Figure``: no pyplot, no
global backend switch, no display needed)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .config import atomic_output

__all__ = ["centre_slices", "display_orientation", "for_display", "layout_note", "oriented_slices", "registration_figure"]


def display_orientation(direction: Sequence[float] | None, d: int) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """How to lay out an array for display: ``(perm, flips)`` such that
    ``np.flip(vol.transpose(perm), [a for a, f in enumerate(flips) if f])`` runs superior →
    inferior, anterior → posterior and the patient's right → left along its three axes (the
    radiological convention: axial slices with anterior up and the patient's right on the
    left, coronal and sagittal slices with superior up), whatever order and signs the file
    stores its axes in. A 2-D image is shown as an axial slice: anterior → posterior down its
    rows (physical y, LPS) and right → left along them (x); an image with the identity
    direction (a PNG, most 2-D files) keeps its array order.

    Args:
        direction: the grid's row-major d×d direction cosines (ITK order, LPS physical
            space: :class:`hybridreg.io.Geometry`), or ``None``.
        d: spatial dimension (2 or 3). Without a direction, or for an oblique grid whose
            nearest physical axes are not a permutation, the array order is kept.
    """
    keep = (tuple(range(d)), (False,) * d)
    phys = _nearest_axes(direction, d)
    if phys is None:
        return keep
    D = np.asarray(direction, dtype=float).reshape(d, d)  # D[p, i]: physical component p of ITK index axis i
    # array axis a is ITK axis d-1-a; display axis b shows physical axis d-1-b ((z,) y, x), running
    # against LPS's z (superior up) and along its y (posterior) and x (left)
    perm = tuple(d - 1 - int(np.flatnonzero(phys == d - 1 - b)[0]) for b in range(d))
    signs = [np.sign(D[d - 1 - b, d - 1 - perm[b]]) for b in range(d)]
    return perm, tuple(bool(s > 0) if d - 1 - b == 2 else bool(s < 0) for b, s in enumerate(signs))


def _nearest_axes(direction: Sequence[float] | None, d: int) -> np.ndarray | None:
    """The physical axis nearest each ITK index axis, where they are a permutation (2-D or 3-D
    with a direction); ``None`` otherwise (no direction, an oblique grid)."""
    if direction is None or d not in (2, 3):
        return None
    phys = np.abs(np.asarray(direction, dtype=float).reshape(d, d)).argmax(0)
    return phys if sorted(phys.tolist()) == list(range(d)) else None


def layout_note(direction: Sequence[float] | None, d: int) -> str:
    """The line a figure states its layout in (:func:`display_orientation`): the radiological
    convention, 2-D as an axial slice, or the array order (no direction, an oblique grid)."""
    if direction is None:
        return "array order"
    if _nearest_axes(direction, d) is None:
        return "array order (an oblique grid)"
    if d == 2:
        return "as an axial slice: anterior up, the patient's right on the left"
    return "radiological: the patient's right on the left; axial anterior up, coronal and sagittal superior up"


def for_display(direction: Sequence[float] | None, images: Sequence[np.ndarray], displacement: np.ndarray,
                spacing: Sequence[float]) -> tuple[list[np.ndarray], np.ndarray, list[float]]:
    """``images`` (array order, one shape), the ``(d, *shape)`` voxel-unit ``displacement`` and
    the mm ``spacing`` per array axis laid out by :func:`display_orientation`: the arrays
    permuted and flipped, the displacement's channels permuted with them and negated along
    the flipped axes, the spacing permuted."""
    perm, flips = display_orientation(direction, displacement.shape[0])
    flipped = [a for a, f in enumerate(flips) if f]

    def shown(vol: np.ndarray) -> np.ndarray:
        return np.flip(vol.transpose(perm), flipped)

    disp = np.stack([shown(displacement[a]) * (-1.0 if flips[b] else 1.0) for b, a in enumerate(perm)])
    return [shown(v) for v in images], disp, [float(spacing[a]) for a in perm]


def oriented_slices(slices: Sequence[np.ndarray], direction: Sequence[float] | None) -> list[np.ndarray]:
    """Three 2-D slices of a 3-D array, ``slices[a]`` taken across array axis ``a`` (its two
    other axes in array order), laid out by :func:`display_orientation`: returned as
    ``[axial, coronal, sagittal]``, rows superior → inferior or anterior → posterior and
    columns the patient's right → left (or anterior → posterior), for ``imshow`` with its
    default ``origin="upper"``. Without a direction (or for an oblique grid) the array
    order is kept.

    Raises:
        ValueError: not three 2-D slices.
    """
    if len(slices) != 3 or any(np.ndim(s) != 2 for s in slices):
        raise ValueError(f"slices: expected three 2-D slices of a 3-D array, got shapes {[np.shape(s) for s in slices]}")
    perm, flips = display_orientation(direction, 3)
    out = []
    for b in range(3):
        shown = [c for c in range(3) if c != b]  # the display axes this slice spans
        others = [perm[c] for c in shown]  # their array axes, in display order
        s = np.transpose(slices[perm[b]], np.argsort(np.argsort(others)))
        out.append(np.flip(s, [i for i, c in enumerate(shown) if flips[c]]))
    return out


def centre_slices(vol: np.ndarray, direction: Sequence[float] | None) -> list[np.ndarray]:
    """The slices through the centre voxel (index ``n // 2`` of each array axis) of a 3-D
    array, laid out for display in the radiological convention: :func:`oriented_slices`."""
    if np.ndim(vol) != 3:
        raise ValueError(f"vol: expected a 3-D array, got shape {np.shape(vol)}")
    return oriented_slices([np.take(vol, n // 2, axis=a) for a, n in enumerate(vol.shape)], direction)


def _slices(vol: np.ndarray, idx: Sequence[int]) -> list[np.ndarray]:
    if vol.ndim == 2:
        return [vol]
    return [vol[idx[0]], vol[:, idx[1]], vol[:, :, idx[2]]]


def registration_figure(
    path: str | os.PathLike,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    lam: np.ndarray,
    displacement: np.ndarray,
    jacobian: np.ndarray,
    spacing: Sequence[float],
    *,
    title: str = "",
    grid_step: int = 4,
    direction: Sequence[float] | None = None,
    moving_title: str = "moving",
) -> None:
    """Orthogonal slices through the centre: fixed, moving, warped, difference, λ, the
    deformed grid and det J (one row per plane: axial, coronal, sagittal; one row in 2D),
    with the layout stated under the title (:func:`layout_note`), colour bars for the
    difference, λ and det J (arrows where det J runs past 0–2). Written atomically as PNG.

    Args:
        fixed, moving, warped, lam, jacobian: arrays of the image shape (array order).
        displacement: ``(d, *shape)`` voxel-unit displacement.
        spacing: mm per array axis (sets the aspect ratio).
        direction: the grid's direction cosines (:class:`hybridreg.io.Geometry`): the slices
            are shown in the radiological convention (:func:`display_orientation`); ``None``
            shows the array order.
        moving_title: the moving column's title (the service's: "moving, affine only" after an
            affine stage, as the column shows MOVING through it).
    """
    from matplotlib.figure import Figure

    d = fixed.ndim
    note = layout_note(direction, d)
    (fixed, moving, warped, lam, jacobian), displacement, spacing = for_display(
        direction, (fixed, moving, warped, lam, jacobian), displacement, spacing)
    idx = [n // 2 for n in fixed.shape]
    planes = [(1, 2), (0, 2), (0, 1)] if d == 3 else [(0, 1)]
    cols = ["fixed", moving_title, "warped", "fixed − warped", "λ", "deformed grid", "det J"]
    fig = Figure(figsize=(2.3 * len(cols), 2.4 * len(planes)))
    axes = fig.subplots(len(planes), len(cols), squeeze=False)
    vmax = float(np.percentile(fixed, 99.5)) or 1.0
    lam_max = float(np.max(lam)) if np.max(lam) > 0 else 1.0
    data = {
        "fixed": (_slices(fixed, idx), dict(cmap="gray", vmin=0, vmax=vmax)),
        moving_title: (_slices(moving, idx), dict(cmap="gray", vmin=0, vmax=vmax)),
        "warped": (_slices(warped, idx), dict(cmap="gray", vmin=0, vmax=vmax)),
        "fixed − warped": (_slices(fixed - warped, idx), dict(cmap="RdBu_r", vmin=-vmax / 2, vmax=vmax / 2)),
        "λ": (_slices(lam, idx), dict(cmap="viridis", vmin=0, vmax=lam_max)),
        "det J": (_slices(jacobian, idx), dict(cmap="RdBu_r", vmin=0, vmax=2)),
    }
    disp_slices = [_slices(displacement[k], idx) for k in range(d)]
    for r, (a0, a1) in enumerate(planes):
        aspect = spacing[a0] / spacing[a1]
        for c, name in enumerate(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if name == "deformed grid":
                ax.imshow(_slices(fixed, idx)[r], cmap="gray", vmin=0, vmax=vmax, aspect=aspect, alpha=0.35)
                ua = disp_slices[a0][r]
                ub = disp_slices[a1][r]
                ii, jj = np.meshgrid(np.arange(ua.shape[0]), np.arange(ua.shape[1]), indexing="ij")
                yy, xx = ii + ua, jj + ub
                for k in range(0, ua.shape[0], grid_step):
                    ax.plot(xx[k], yy[k], color="tab:orange", lw=0.4)
                for k in range(0, ua.shape[1], grid_step):
                    ax.plot(xx[:, k], yy[:, k], color="tab:orange", lw=0.4)
                ax.set_xlim(-0.5, ua.shape[1] - 0.5)
                ax.set_ylim(ua.shape[0] - 0.5, -0.5)
                continue
            sl, kw = data[name]
            im = ax.imshow(sl[r], aspect=aspect, **kw)
            if name in ("fixed − warped", "λ", "det J") and r == len(planes) - 1:
                extend = "neither"
                if name == "det J":  # the colour scale is 0–2: say where the values run past it
                    extend = {(False, False): "neither", (True, False): "min", (False, True): "max",
                              (True, True): "both"}[(bool(np.min(jacobian) < 0), bool(np.max(jacobian) > 2))]
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, extend=extend)
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=10 if title else 8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
