"""Priors on the regularization weight field λ.

* Hyperpriors (method §1.4): independent per voxel, normal or beta, as negative log
  densities up to additive constants, per-voxel maps.
* λ parametrization (method §2.1): λ = sigmoid(θ) under the beta prior (support (0, 1)),
  softplus(θ) under the normal prior, with the reference clamps.
* Smoothness prior on λ itself (method §1.5), an addition of this toolkit: an edge-aware
  grid-graph Laplacian, and a non-local kernel version on a coarse node set computed as a
  KeOps kernel reduction (the N×N sum is never materialised).

λ maps are ``(B, 1, *spatial)`` tensors, dimensionless.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .regularization import check_spacing, edge_density
from .similarity import reduce_map
from .spatial import gaussian_smooth, resize_image

__all__ = [
    "LAMBDA_BOUNDS",
    "lambda_from_param",
    "param_from_lambda",
    "normal_hyperprior",
    "beta_hyperprior",
    "edge_weights",
    "grid_smoothness",
    "nonlocal_smoothness",
    "keops_build_folder",
    "paint_regions",
    "region_members",
    "paint_region_lambda",
]

LAMBDA_BOUNDS = {"beta": (1e-6, 1.0), "normal": (1e-6, 5.0)}
"""Clamp range of λ under each hyperprior (the authors' code, method §1.4)."""


def _check_kind(kind: str, fn: str) -> None:
    if kind not in LAMBDA_BOUNDS:
        raise ValueError(f"{fn}(): `kind` must be 'beta' or 'normal', got {kind!r}")


def lambda_from_param(theta: torch.Tensor, kind: str) -> torch.Tensor:
    """Map an unconstrained parameter θ to λ: sigmoid (beta) or softplus (normal), clamped
    to :data:`LAMBDA_BOUNDS` (the clamp passes gradients only inside the range). Elementwise:
    λ has θ's shape, dtype and device (``(B, 1, *grid)`` in the solvers). Source: method §2.1 (λ's
    parametrization) and §1.4 (its support under each hyperprior).

    Raises:
        ValueError: ``kind`` not ``"beta"`` or ``"normal"``.
    """
    _check_kind(kind, "lambda_from_param")
    lo, hi = LAMBDA_BOUNDS[kind]
    lam = torch.sigmoid(theta) if kind == "beta" else F.softplus(theta)
    return lam.clamp(lo, hi)


def param_from_lambda(lam: torch.Tensor | float, kind: str) -> torch.Tensor:
    """Inverse of :func:`lambda_from_param` within :data:`LAMBDA_BOUNDS` (λ is first clipped
    into the open support: below 1 under ``"beta"``; under ``"normal"`` a λ above the clamp of 5
    is kept, so ``lambda_from_param`` of the result gives 5, not λ).

    Raises:
        ValueError: unknown ``kind`` or non-finite / non-positive λ.
    """
    _check_kind(kind, "param_from_lambda")
    lam = torch.as_tensor(lam, dtype=torch.get_default_dtype()) if not isinstance(lam, torch.Tensor) else lam
    if not torch.isfinite(lam).all() or (lam <= 0).any():
        raise ValueError("param_from_lambda(): `lam` must be finite and > 0")
    if kind == "beta":
        lam = lam.clamp(1e-6, 1.0 - 1e-4)
        return torch.log(lam) - torch.log1p(-lam)
    lam = lam.clamp_min(1e-6)
    return lam + torch.log(-torch.expm1(-lam))  # softplus^{-1}


def normal_hyperprior(
    lam: torch.Tensor, mean: float = 1.0, sigma: float = 1.0, *, reduction: str = "mean"
) -> torch.Tensor:
    """Normal hyperprior ``−log N(λ; μ, σ²) = (λ − μ)² / (2σ²)`` + const, per voxel.

    The reference's strength ``inv_sigma2`` (method §1.4 table) corresponds to
    ``sigma = (2 · inv_sigma2) ** -0.5``.

    Args:
        lam: ``(B, 1, *spatial)`` λ map (any shape works).
        mean, sigma: μ and σ > 0 (dimensionless).
        reduction: ``"none"`` (``lam``'s shape), ``"mean"``, ``"sum"`` or ``"batch"`` (``(B,)``).

    Raises:
        ValueError: ``sigma`` ≤ 0, or an unknown ``reduction``.
    """
    if not sigma > 0:
        raise ValueError(f"normal_hyperprior(): `sigma` must be > 0, got {sigma!r}")
    return reduce_map((lam - mean) ** 2 / (2.0 * sigma * sigma), reduction, fn="normal_hyperprior")


def beta_hyperprior(
    lam: torch.Tensor, alpha: float, beta: float = 1.0, *, reduction: str = "mean"
) -> torch.Tensor:
    """Beta hyperprior ``−log Beta(λ; α, β) = −(α−1) log λ − (β−1) log(1−λ)`` + const.

    The reference uses β = 1 and α = 1 + a (method §1.4), i.e. ``−a · log λ``. Terms with a
    zero coefficient are skipped, so λ = 1 is allowed when β = 1.

    Args:
        lam: λ map with values in (0, 1] (clamped to ``[1e-6, 1 - 1e-6]`` inside the logs
            whose coefficient is non-zero).
        alpha, beta: shape parameters > 0.
        reduction: ``"none"`` (``lam``'s shape, e.g. ``(B, 1, *spatial)``), ``"mean"``, ``"sum"`` or
            ``"batch"`` (``(B,)``).

    Raises:
        ValueError: ``alpha`` or ``beta`` ≤ 0, or an unknown ``reduction``.
    """
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"beta_hyperprior(): `alpha` and `beta` must be > 0, got {alpha!r}, {beta!r}")
    out = torch.zeros_like(lam)
    if alpha != 1.0:
        out = out - (alpha - 1.0) * torch.log(lam.clamp_min(1e-6))
    if beta != 1.0:
        out = out - (beta - 1.0) * torch.log1p(-lam.clamp(max=1.0 - 1e-6))
    return reduce_map(out, reduction, fn="beta_hyperprior")


def edge_weights(image: torch.Tensor, sigma_intensity: float) -> list[torch.Tensor]:
    """Edge-aware weights ``w = exp(−(f_i − f_j)² / (2 σ_I²))`` for the backward edges of
    each axis (method §1.5).

    Args:
        image: ``(B, C, *spatial)`` guide image (the fixed image); channels are summed.
        sigma_intensity: σ_I > 0 in the image's intensity units.

    Returns:
        One tensor per axis ``k``, shape ``(B, 1, *spatial)`` with size ``n_k − 1`` along
        axis ``k``: the weight of the edge between ``x − e_k`` and ``x``.

    Raises:
        ValueError: ``sigma_intensity`` ≤ 0.
    """
    if not sigma_intensity > 0:
        raise ValueError(f"edge_weights(): `sigma_intensity` must be > 0, got {sigma_intensity!r}")
    out = []
    for k in range(image.dim() - 2):
        dim = k + 2
        n = image.shape[dim]
        diff = image.narrow(dim, 1, n - 1) - image.narrow(dim, 0, n - 1)
        out.append(torch.exp(-(diff * diff).sum(1, keepdim=True) / (2.0 * sigma_intensity**2)))
    return out


def grid_smoothness(
    lam: torch.Tensor,
    weights: Sequence[torch.Tensor] | None = None,
    spacing: Sequence[float] | None = None,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """Edge-aware smoothness of λ on the face-neighbour grid graph (method §1.5).

    Per-voxel density ``s(x) = ½ Σ_k w_k(x) (λ(x) − λ(x − e_k))² / h_k²`` (units mm⁻²), whose
    sum is ``½ λᵀ L_w λ``, the graph Laplacian quadratic form with edge weights ``w / h²``.

    Args:
        lam: ``(B, 1, *spatial)`` λ map.
        weights: per-axis edge weights from :func:`edge_weights` (``None`` = all ones).
        spacing: voxel size in mm per axis.
        reduction: ``"none"`` → ``(B, 1, *spatial)``, ``"sum"``, ``"mean"`` or ``"batch"`` (``(B,)``).

    Raises:
        ValueError: ``lam`` not ``(B, 1, *spatial)``, ``weights`` not one per axis, a bad
            ``spacing`` or ``reduction``.
    """
    d = lam.dim() - 2
    h = check_spacing(spacing, d, fn="grid_smoothness")
    if weights is not None and len(weights) != d:
        raise ValueError(f"grid_smoothness(): `weights` must hold {d} tensors, got {len(weights)}")
    if lam.shape[1] != 1:
        raise ValueError(f"grid_smoothness(): `lam` must be (B, 1, *spatial), got {tuple(lam.shape)}")
    return reduce_map(edge_density(lam, h, weights), reduction, fn="grid_smoothness")


def keops_build_folder() -> Path:
    """Folder where KeOps caches compiled formulas: ``$HYBRIDREG_KEOPS_CACHE`` or
    ``~/.cache/hybridreg/keops-<pykeops version>``. It is not named after the host, so a
    machine that keeps its home folder compiles each formula once."""
    import pykeops

    env = os.environ.get("HYBRIDREG_KEOPS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hybridreg" / f"keops-{pykeops.__version__}"


_KEOPS_READY = False


def _lazy_tensor_class():
    global _KEOPS_READY
    from pykeops.torch import LazyTensor
    import pykeops

    if not _KEOPS_READY:
        folder = keops_build_folder()
        folder.mkdir(parents=True, exist_ok=True)
        pykeops.set_build_folder(str(folder))
        _KEOPS_READY = True
    return LazyTensor


def nonlocal_smoothness(
    lam: torch.Tensor,
    guide: torch.Tensor,
    spacing: Sequence[float] | None = None,
    *,
    sigma_space: float = 10.0,
    sigma_intensity: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Non-local edge-aware smoothness of λ over all pairs of nodes (method §1.5).

    ``s_i = ½ Σ_j K_ij (λ_i − λ_j)²`` with
    ``K_ij = exp(−‖x_i − x_j‖² / (2σ_x²) − (f_i − f_j)² / (2σ_I²))``, so ``Σ_i s_i`` is
    ``½ Σ_{i,j} K_ij (λ_i − λ_j)²`` (each unordered pair counted twice, as in a symmetric
    graph Laplacian form ``λᵀ L_K λ``). The sum over ``j`` is a KeOps ``LazyTensor``
    reduction: memory is O(N), never O(N²). Call it on a coarse node set (e.g. λ and the
    guide image pooled by 4) — the cost is O(N²) time.

    Args:
        lam: ``(B, 1, *spatial)`` λ on the node grid.
        guide: ``(B, 1, *spatial)`` guide intensities on the same grid (the fixed image).
        spacing: node spacing in mm (positions ``x`` are in mm).
        sigma_space: σ_x in mm (> 0). sigma_intensity: σ_I in intensity units (> 0).
        reduction: ``"none"`` → ``(B, 1, *spatial)`` map of ``s_i``, ``"mean"`` or ``"sum"``.

    Raises:
        ValueError: mismatched shapes or non-positive bandwidths.
    """
    d = lam.dim() - 2
    h = check_spacing(spacing, d, fn="nonlocal_smoothness")
    if guide.shape[0] != lam.shape[0] or guide.shape[2:] != lam.shape[2:] or lam.shape[1] != 1 or guide.shape[1] != 1:
        raise ValueError(
            f"nonlocal_smoothness(): `lam` {tuple(lam.shape)} and `guide` {tuple(guide.shape)}"
            " must both be (B, 1, *spatial) on the same grid"
        )
    if not (sigma_space > 0 and sigma_intensity > 0):
        raise ValueError("nonlocal_smoothness(): `sigma_space` and `sigma_intensity` must be > 0")
    LazyTensor = _lazy_tensor_class()
    spatial = lam.shape[2:]
    axes = [torch.arange(n, dtype=lam.dtype, device=lam.device) * (h[k] / sigma_space) for k, n in enumerate(spatial)]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, d)
    out = []
    for b in range(lam.shape[0]):
        feat = torch.cat([pos, guide[b].reshape(-1, 1) / sigma_intensity], dim=1).contiguous()
        lv = lam[b].reshape(-1, 1).contiguous()
        x_i, x_j = LazyTensor(feat[:, None, :]), LazyTensor(feat[None, :, :])
        l_i, l_j = LazyTensor(lv[:, None, :]), LazyTensor(lv[None, :, :])
        kern = (-0.5 * ((x_i - x_j) ** 2).sum(-1)).exp()
        s = 0.5 * (kern * (l_i - l_j) ** 2).sum(dim=1)  # (N, 1)
        out.append(s.reshape(1, 1, *spatial))
    return reduce_map(torch.cat(out, dim=0), reduction, fn="nonlocal_smoothness")


def paint_regions(
    labels: torch.Tensor,
    values: dict[int, float],
    *,
    default: float = 1.0,
    smooth_sigma: float = 0.0,
    dtype: torch.dtype = torch.float32,
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Region-wise λ map: ``values[k]`` painted over label ``k`` (method §3.2).

    Labels not in ``values`` get ``default``. With ``smooth_sigma > 0`` (voxels of the
    result's grid; the reference uses 0.8) the map is Gaussian-smoothed so λ changes gradually
    across region borders. ``shape``: paint on this grid (each region's share resampled,
    :func:`region_members`) instead of the labels'. The result is a ``(B, 1, *spatial)`` λ map that :func:`hybridreg.objective.evaluate`
    accepts like any other.

    Args:
        labels: ``(B, 1, *spatial)`` integer label map.
        values: ``{label: λ}`` (λ > 0).

    Raises:
        ValueError: non-integer labels, empty ``values`` or non-positive λ.
    """
    if labels.is_floating_point() or labels.dim() not in (4, 5) or labels.shape[1] != 1:
        raise ValueError(f"paint_regions(): `labels` must be an integer (B, 1, *spatial) tensor, got {labels.dtype} {tuple(labels.shape)}")
    if not values or any(not (v > 0) for v in values.values()) or not default > 0:
        raise ValueError("paint_regions(): `values` must be a non-empty {label: λ > 0} mapping and `default` > 0")
    ids, members = region_members(labels, shape, dtype=dtype)
    lam_k = torch.tensor([float(values.get(k, default)) for k in ids.tolist()], dtype=dtype, device=labels.device)
    return paint_region_lambda(members, lam_k.expand(labels.shape[0], -1), smooth_sigma)


def region_members(labels: torch.Tensor, shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each region's share of every voxel of a grid: the label map's one-hot channels, each
    resampled to ``shape`` (:func:`hybridreg.spatial.resize_image`, one region at a time), for
    the region-wise λ of method §3.2.

    Args:
        labels: ``(B, 1, *spatial)`` integer label map; every value present in the batch
            (0 included) is a region. shape: the grid to resample to (default: ``spatial``,
            where the result is exactly one-hot).

    Returns:
        ``(ids, members)``: the K label values in increasing order, and ``(B, K, *shape)``
        shares in [0, 1] that sum to 1 at every voxel.

    Raises:
        ValueError: ``labels`` is not an integer ``(B, 1, *spatial)`` tensor.
    """
    if labels.is_floating_point() or labels.dim() not in (4, 5) or labels.shape[1] != 1:
        raise ValueError(f"region_members(): `labels` must be an integer (B, 1, *spatial) tensor, got {labels.dtype} {tuple(labels.shape)}")
    ids = torch.unique(labels)
    shape = tuple(labels.shape[2:]) if shape is None else tuple(shape)
    members = [resize_image((labels == k).to(dtype), shape) for k in ids.tolist()]
    return ids, torch.cat(members, 1)


def paint_region_lambda(members: torch.Tensor, values: torch.Tensor, smooth_sigma: float = 0.0) -> torch.Tensor:
    """Region-wise λ map ``Λ = G_σ * Σ_k members_k λ_k`` (method §3.2, CSAIN: λ_k painted over
    region k, then Gaussian-smoothed with σ 0.8 voxels and a 5-voxel window); differentiable
    in ``values``, so the λ_k can be optimised.

    Args:
        members: ``(B, K, *spatial)`` from :func:`region_members`.
        values: ``(B, K)`` or ``(B, K, 1, …)`` λ_k per pair and region (dimensionless, > 0).
        smooth_sigma: σ in voxels of ``members``' grid (0: no smoothing).

    Returns:
        ``(B, 1, *spatial)`` λ map.

    Raises:
        ValueError: ``values`` not ``(B, K)`` for ``members``' ``B`` and ``K``, or a negative
            ``smooth_sigma`` (:func:`hybridreg.spatial.gaussian_smooth`).
    """
    if values.shape[:2] != members.shape[:2]:
        raise ValueError(f"paint_region_lambda(): `values` {tuple(values.shape)} must be (B, K) for members {tuple(members.shape)}")
    lam = (members * values.reshape(values.shape[:2] + (1,) * (members.dim() - 2))).sum(1, keepdim=True)
    return gaussian_smooth(lam, smooth_sigma) if smooth_sigma > 0 else lam
