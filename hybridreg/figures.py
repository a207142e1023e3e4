"""Figures with object-oriented matplotlib (``matplotlib.figure.Figure``: no pyplot, no
global backend switch, no display needed)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .config import atomic_output

__all__ = ["registration_figure"]


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
) -> None:
    """Orthogonal slices through the centre: fixed, moving, warped, difference, λ, the
    deformed grid and det J (one row per plane; one row in 2D). Written atomically as PNG.

    Args:
        fixed, moving, warped, lam, jacobian: arrays of the image shape (array order).
        displacement: ``(d, *shape)`` voxel-unit displacement.
        spacing: mm per array axis (sets the aspect ratio).
    """
    from matplotlib.figure import Figure

    d = fixed.ndim
    idx = [n // 2 for n in fixed.shape]
    planes = [(1, 2), (0, 2), (0, 1)] if d == 3 else [(0, 1)]
    cols = ["fixed", "moving", "warped", "fixed − warped", "λ", "deformed grid", "det J"]
    fig = Figure(figsize=(2.3 * len(cols), 2.4 * len(planes)))
    axes = fig.subplots(len(planes), len(cols), squeeze=False)
    vmax = float(np.percentile(fixed, 99.5)) or 1.0
    lam_max = float(np.max(lam)) if np.max(lam) > 0 else 1.0
    data = {
        "fixed": (_slices(fixed, idx), dict(cmap="gray", vmin=0, vmax=vmax)),
        "moving": (_slices(moving, idx), dict(cmap="gray", vmin=0, vmax=vmax)),
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
            if name in ("λ", "det J") and r == len(planes) - 1:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
