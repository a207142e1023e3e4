"""Image match terms D(f, m∘φ) (method §1.2), as per-voxel maps.

Every function takes ``(B, C, *spatial)`` images on the same grid and a ``reduction``:
``"none"`` returns the per-voxel map ``(B, C, *spatial)`` (so a λ map or mask can weight
it), ``"mean"`` its mean over voxels, channels and batch (a scalar tensor), ``"sum"`` their
sum, ``"batch"`` each pair's mean over its voxels and channels (``(B,)``: batched instance
optimization, one energy per pair).
"""

from __future__ import annotations

import torch

__all__ = ["LNCC_EPS", "box_mean", "lncc", "local_variance", "mse", "reduce_map"]

LNCC_EPS = 1e-6
"""Default ε of :func:`lncc` and of the energy (``ObjectiveConfig.lncc_eps``), in squared
normalised intensity units (``docs/results.md``, "LNCC's ε")."""


def reduce_map(value: torch.Tensor, reduction: str, *, fn: str) -> torch.Tensor:
    """Apply ``reduction`` to a ``(B, ...)`` per-voxel map: ``"none"`` (the map), ``"mean"``
    or ``"sum"`` (a scalar over the whole batch), ``"batch"`` (``(B,)``: each pair's mean)."""
    if reduction == "none":
        return value
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    if reduction == "batch":
        return value.flatten(1).mean(1)
    raise ValueError(f"{fn}(): `reduction` must be 'none', 'mean', 'sum' or 'batch', got {reduction!r}")


def _check_pair(fixed: torch.Tensor, warped: torch.Tensor, fn: str) -> None:
    for name, t in (("fixed", fixed), ("warped", warped)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}(): `{name}` must be a floating-point torch.Tensor")
        if t.dim() not in (4, 5):
            raise ValueError(f"{fn}(): `{name}` must be (B, C, *spatial) in 2D or 3D, got {tuple(t.shape)}")
    if fixed.shape[2:] != warped.shape[2:] or fixed.shape[1] != warped.shape[1]:
        raise ValueError(
            f"{fn}(): `fixed` {tuple(fixed.shape)} and `warped` {tuple(warped.shape)} must share"
            " channels and spatial shape"
        )


def _box_sum_1d(x: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    # zero-padded window sum along `dim` by one cumulative sum S: O(1) per voxel in the width.
    # out[i] = S[min(i + r, n - 1)] - S[i - r - 1] (S[-1] = 0), written into one buffer: no
    # padded copy of x, no strided difference of two views (25 % faster, the same values)
    n = x.shape[dim]
    r = min(radius, n - 1)
    s = x.cumsum(dim)
    out = torch.empty_like(s)
    out.narrow(dim, 0, n - r).copy_(s.narrow(dim, r, n - r))
    if r > 0:
        tail = out.narrow(dim, n - r, r)
        tail.copy_(s.narrow(dim, n - 1, 1).expand_as(tail))
    if n - r - 1 > 0:
        out.narrow(dim, r + 1, n - r - 1).sub_(s.narrow(dim, 0, n - r - 1))
    return out


def _box_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    out = x
    for k in range(x.dim() - 2):
        out = _box_sum_1d(out, k + 2, radius)
    return out


class _BoxSum(torch.autograd.Function):
    """Zero-padded centred box sum. The operator is symmetric (self-adjoint), so its
    backward is the same box sum applied to the incoming gradient: no intermediate
    cumulative sums are kept for autograd."""

    @staticmethod
    def forward(ctx, x, radius):  # type: ignore[override]
        ctx.radius = radius
        return _box_sum(x, radius)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _BoxSum.apply(grad, ctx.radius), None


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a centred ``window``-wide box (per axis) around each voxel.

    The box is truncated at the image border and the mean is over the voxels inside it.
    Separable cumulative sums make the cost independent of ``window``; the backward pass
    reuses the same operator (it is self-adjoint), so it costs one more forward.

    Args:
        x: ``(B, C, *spatial)`` tensor.
        window: odd positive int, in voxels.

    Returns:
        ``(B, C, *spatial)``, like ``x``.

    Raises:
        ValueError: ``window`` not an odd positive int.
    """
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"box_mean(): `window` must be an odd positive int, got {window!r}")
    r = window // 2
    d = x.dim() - 2
    count = None
    for k in range(d):
        dim = k + 2
        ones_shape = [1] * x.dim()
        ones_shape[dim] = x.shape[dim]
        c1 = _box_sum_1d(x.new_ones(ones_shape), dim, r)
        count = c1 if count is None else count * c1
    return _BoxSum.apply(x, r) / count


def local_variance(x: torch.Tensor, window: int) -> torch.Tensor:
    """Variance of ``x`` over the same centred box as :func:`lncc` (``(B, C, *spatial)`` →
    same shape, squared intensity units, ≥ 0)."""
    c = x.shape[1]
    m, mm = box_mean(torch.cat([x, x * x], dim=1), window).split(c, dim=1)
    return (mm - m * m).clamp_min(0.0)


def lncc(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = 9,
    *,
    eps: float = LNCC_EPS,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative squared local normalised cross-correlation (method §1.2).

    ``-cc(x) = -cov(f, w)^2 / (var(f) var(w) + eps)`` with local moments over a centred
    box of ``window`` voxels per axis (truncated at the border). Values lie in ``[-1, 0]``;
    ``-1`` is a perfect local linear match. Box sums use cumulative sums, so the cost does
    not grow with the window.

    Args:
        fixed, warped: ``(B, C, *spatial)`` images on the same grid (intensity units are
            irrelevant: LNCC is invariant to local affine intensity changes).
        window: odd box width in voxels (reference 9).
        eps: added to the variance product, in squared intensity units (the energy passes
            ``ObjectiveConfig.lncc_eps``; default :data:`LNCC_EPS`, for intensities in about [0, 1]).
        reduction: ``"none"`` → ``(B, C, *spatial)`` map, ``"mean"``, ``"sum"`` or ``"batch"``
            (``(B,)``; module docstring).

    Raises:
        TypeError, ValueError: non-tensor input, mismatched shapes, bad ``window`` or ``reduction``.
    """
    _check_pair(fixed, warped, "lncc")
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"lncc(): `window` must be an odd positive int, got {window!r}")
    c = fixed.shape[1]
    # the fixed image's local moments need no gradient in registration: keep them out of
    # the autograd graph unless `fixed` itself requires grad
    with torch.set_grad_enabled(torch.is_grad_enabled() and fixed.requires_grad):
        mf, mff = box_mean(torch.cat([fixed, fixed * fixed], dim=1), window).split(c, dim=1)
    mw, mww, mfw = box_mean(torch.cat([warped, warped * warped, fixed * warped], dim=1), window).split(c, dim=1)
    cov = mfw - mf * mw
    var_f = (mff - mf * mf).clamp_min(0.0)
    var_w = (mww - mw * mw).clamp_min(0.0)
    cc = cov * cov / (var_f * var_w + eps)
    return reduce_map(-cc, reduction, fn="lncc")


def mse(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    *,
    sigma: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Gaussian-noise image match ``(f - w)^2 / (2 sigma^2)`` per voxel (method §1.2).

    Args:
        fixed, warped: ``(B, C, *spatial)`` images on the same grid.
        sigma: noise standard deviation in intensity units (> 0).
        reduction: ``"none"`` → ``(B, C, *spatial)`` map, ``"mean"``, ``"sum"`` or ``"batch"``
            (``(B,)``; module docstring).

    Raises:
        TypeError, ValueError: non-tensor input, mismatched shapes, ``sigma`` ≤ 0, bad ``reduction``.
    """
    _check_pair(fixed, warped, "mse")
    if not sigma > 0:
        raise ValueError(f"mse(): `sigma` must be > 0, got {sigma!r}")
    return reduce_map((fixed - warped) ** 2 / (2.0 * sigma * sigma), reduction, fn="mse")
