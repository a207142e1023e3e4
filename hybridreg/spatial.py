"""Spatial transforms: warping, SVF integration by scaling and squaring, composition,
resampling of fields between grids, and the Jacobian determinant.

Frame and units (used by every function here and in the rest of the core):

* Images are ``(B, C, *spatial)`` tensors; ``spatial`` is ``(H, W)`` in 2D and
  ``(D, H, W)`` in 3D, in the array order that ``SimpleITK.GetArrayFromImage`` returns.
* Fields (velocity ``v``, displacement ``u``) are ``(B, d, *spatial)`` with ``d = 2`` or
  ``3``, in **voxel units** of their own grid: component ``k`` is a displacement along
  tensor axis ``k + 2``. The transformation is ``phi(x) = x + u(x)`` in voxel index
  coordinates. Physical units (mm, ITK's LPS frame) appear only at the I/O edge
  (:mod:`hybridreg.io`).

Source: ``docs/method.md`` §1.1 (SVF, scaling and squaring, inverse ``exp(-v)``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ALIGN_CORNERS",
    "check_field",
    "check_alike",
    "check_mask",
    "to_sampling_grid",
    "warp",
    "compose",
    "scaling_and_squaring",
    "svf_exp",
    "invert_displacement",
    "resize_field",
    "resize_image",
    "rescale_voxel_map",
    "jacobian_determinant",
    "gaussian_smooth",
]

ALIGN_CORNERS = True
"""``align_corners`` used by every ``grid_sample`` call of the toolkit.

With ``True`` the normalised coordinates -1 and +1 are the *centres* of the first and last
voxels, so voxel index ``i`` of an axis of size ``n`` sits at ``2 i / (n - 1) - 1`` and a
displacement of ``t`` voxels is ``2 t / (n - 1)`` normalised units, exactly, on every grid.
Resampling *between* grids of a pyramid (:func:`resize_field`, :func:`resize_image`) is a
different question and uses the cell-centred convention (``align_corners=False`` in
``F.interpolate``), because the coarse grids are made by averaging blocks of fine voxels.
"""


def _spatial_dims(x: torch.Tensor) -> int:
    return x.dim() - 2


def check_field(field: torch.Tensor, name: str, *, fn: str, finite: bool = False) -> int:
    """Validate a ``(B, d, *spatial)`` field and return ``d``.

    Args:
        finite: also reject NaN/Inf values. That is a pass over the data and, on a GPU, a
            device synchronisation, so it is for fields that enter from outside (a user's
            initial velocity, a displacement read from a file), not for the solvers' inner
            loops, which check the energy once per window instead.

    Raises:
        TypeError: ``field`` is not a floating-point tensor.
        ValueError: wrong number of dimensions, ``d`` not matching the spatial rank, or
            (with ``finite``) NaN/Inf values. The message names ``fn`` and ``name``.
    """
    if not isinstance(field, torch.Tensor) or not field.is_floating_point():
        raise TypeError(f"{fn}(): `{name}` must be a floating-point torch.Tensor")
    check_alike(fn, **{name: field})
    if field.dim() not in (4, 5):
        raise ValueError(
            f"{fn}(): `{name}` must have shape (B, d, *spatial) with d = 2 or 3 spatial dims,"
            f" got shape {tuple(field.shape)}"
        )
    d = field.dim() - 2
    if field.shape[1] != d:
        raise ValueError(
            f"{fn}(): `{name}` has {field.shape[1]} channels but {d} spatial dims; a field"
            f" needs one channel per spatial dimension, got shape {tuple(field.shape)}"
        )
    if finite and not bool(torch.isfinite(field).all()):
        raise ValueError(f"{fn}(): `{name}` contains NaN or Inf values")
    return d


FLOAT_DTYPES = (torch.float32, torch.float64)
"""The dtypes the toolkit computes in. Half precision is refused: LNCC's local variances and
the energy's sums lose their digits there (a bfloat16 LNCC of an image with itself gave −34
where its range is [−1, 0])."""


def check_alike(fn: str, **tensors: torch.Tensor | None) -> None:
    """Refuse floating-point tensors that cannot enter one computation: a half-precision dtype
    (not in :data:`FLOAT_DTYPES`), or a dtype or device other than the first tensor's. ``None``
    and non-floating tensors (label maps, integer masks) are skipped.

    Raises:
        TypeError: the message names ``fn`` and the argument, e.g. ``warp(): `image` is
            torch.float64 but `disp` is torch.float32``.
    """
    first = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}(): `{name}` is {t.dtype}: the toolkit computes in float32 or float64"
                            " (convert with .float())")
        if first is None:
            first = name, t
        elif (t.dtype, t.device) != (first[1].dtype, first[1].device):
            raise TypeError(f"{fn}(): `{name}` is {t.dtype} on {t.device} but `{first[0]}` is {first[1].dtype}"
                            f" on {first[1].device}: pass them in one dtype, on one device")


def check_mask(fn: str, name: str, mask: Any, image_shape: Sequence[int], *, values: bool = True) -> None:
    """Check a mask ``(B or 1, 1, *spatial)`` of an image of shape ``image_shape``
    ``(B, C, *spatial)``: a tensor on the image's grid and, with ``values``, finite weights in
    [0, 1] (bool, integer 0/1 or float) that select at least one voxel of each pair. The one
    check of every mask the toolkit takes (the solvers' images, the objective, the Jacobian
    metrics); ``values=False`` skips the pass over the values (the objective on a GPU, where
    it would wait for the device every iteration).

    Raises:
        TypeError: not a tensor. ValueError: off the grid, NaN/Inf, a weight outside [0, 1] (a
            0/255 mask) or an empty mask; the message names ``fn`` and ``name``.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}(): `{name}` must be a torch.Tensor")
    b, spatial = image_shape[0], tuple(image_shape[2:])
    if mask.dim() != len(image_shape) or mask.shape[0] not in (1, b) or mask.shape[1] != 1 \
            or tuple(mask.shape[2:]) != spatial:
        batch = "1" if b == 1 else f"{b} or 1"
        image = name[:-5] if name.endswith("_mask") else "the image"
        raise ValueError(f"{fn}(): `{name}` must be ({batch}, 1, {', '.join(map(str, spatial))}) on"
                         f" `{image}`'s grid, got {tuple(mask.shape)}")
    if not values:
        return
    v = mask.detach().to(torch.uint8) if mask.dtype == torch.bool else mask.detach()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{fn}(): `{name}` contains NaN or Inf values")
    if v.min() < 0 or v.max() > 1:
        raise ValueError(f"{fn}(): `{name}` must hold weights in [0, 1], got values from {v.min().item():g}"
                         f" to {v.max().item():g} (a 0/255 mask: pass mask > 0)")
    if not bool((v.flatten(1).amax(1) > 0).all()):
        raise ValueError(f"{fn}(): `{name}` is empty (all zero): it selects no voxel")


def to_sampling_grid(disp: torch.Tensor, voxel_map: torch.Tensor | None = None,
                     source_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Convert a voxel-unit displacement to a ``grid_sample`` sampling grid.

    This is the only place where the toolkit converts between its channels-first,
    voxel-unit, axis-ordered fields and ``grid_sample``'s normalised, channels-last grid
    whose last dimension lists coordinates in *reversed* axis order (x = last tensor axis
    first). The reversal is ``flip(-1)`` below.

    Args:
        disp: ``(B, d, *spatial)`` displacement in voxels (see module docstring).
        voxel_map: optional ``(B, d, d + 1)`` affine map from voxel indices of ``disp``'s
            grid to voxel indices of another grid (the moving image's own grid, array axis
            order): the sampled point is ``A (x + disp(x)) + b`` with ``A = voxel_map[:, :, :d]``
            and ``b = voxel_map[:, :, d]`` (:func:`hybridreg.affine.voxel_map`).
        source_shape: the spatial shape of the grid sampled (required with ``voxel_map``).

    Returns:
        ``(B, *spatial, d)`` grid of normalised coordinates of ``x + disp(x)`` (or of its
        image under ``voxel_map``, normalised on ``source_shape``) under :data:`ALIGN_CORNERS`.
    """
    spatial = tuple(disp.shape[2:])
    if voxel_map is None:
        identity, scale = _identity_grid(spatial, disp.dtype, disp.device)
        # channels-last and reversed axis order (x first) is what grid_sample reads
        return torch.addcmul(identity, disp.movedim(1, -1).flip(-1), scale)
    # one batched matrix product per pair: the axis reversal and the normalisation are folded
    # into the d×d map (rows reversed and scaled), so the full-size field is written once
    # (at 1 mm, forward and backward of a warp through the map 1.7x faster than an einsum
    # followed by a flip and an affine rescaling of the points)
    B, d = disp.shape[:2]
    index = _index_grid(spatial, disp.dtype, disp.device)
    _, source_scale = _identity_grid(tuple(source_shape), disp.dtype, disp.device)
    voxel_map = voxel_map.to(device=disp.device, dtype=disp.dtype)  # a (B, d, d + 1) map made on the CPU follows disp
    a = voxel_map[:, :, :d].flip(1) * source_scale[:, None]
    c = voxel_map[:, :, d].flip(1) * source_scale - 1.0
    grid = torch.baddbmm(c[:, :, None], a, (index + disp).flatten(2))
    return grid.movedim(1, -1).reshape(B, *spatial, d)


_GRID_CACHE: dict = {}


def _identity_grid(spatial: tuple, dtype: torch.dtype, device: torch.device):
    """Normalised identity grid ``(1, *spatial, d)`` (reversed axis order) and the
    per-coordinate scale from voxels to normalised units, cached per grid/dtype/device."""
    key = (spatial, dtype, str(device))
    hit = _GRID_CACHE.get(key)
    if hit is None:
        axes = [
            torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device) if n > 1
            else torch.zeros(1, dtype=dtype, device=device)
            for n in spatial
        ]
        identity = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1).unsqueeze(0)
        scale = torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in spatial[::-1]], dtype=dtype, device=device)
        if len(_GRID_CACHE) >= 16:
            _GRID_CACHE.pop(next(iter(_GRID_CACHE)))
        hit = _GRID_CACHE[key] = (identity, scale)
    return hit


def _index_grid(spatial: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Voxel indices ``(d, *spatial)`` in axis order, cached like :func:`_identity_grid` (the
    voxel-map path of :func:`to_sampling_grid` runs once per evaluation of the energy)."""
    key = ("index", spatial, dtype, str(device))
    hit = _GRID_CACHE.get(key)
    if hit is None:
        if len(_GRID_CACHE) >= 16:
            _GRID_CACHE.pop(next(iter(_GRID_CACHE)))
        hit = _GRID_CACHE[key] = torch.stack(torch.meshgrid(
            *[torch.arange(n, dtype=dtype, device=device) for n in spatial], indexing="ij"))
    return hit


def warp(
    image: torch.Tensor,
    disp: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    voxel_map: torch.Tensor | None = None,
    field_of_view: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Resample ``image`` at ``x + disp(x)``: returns ``image ∘ (id + disp)``.

    Args:
        image: ``(B, C, *spatial_in)`` tensor on the grid whose voxel units ``disp`` uses
            (or, with ``voxel_map``, on its own grid). ``B`` must equal ``disp``'s batch
            size or be 1 (broadcast).
        disp: ``(B, d, *spatial)`` displacement in voxels of ``disp``'s grid; the output
            lives on this grid. Without ``voxel_map``, ``spatial == spatial_in``.
        mode: ``"bilinear"`` (linear / trilinear) for images and fields, ``"nearest"`` for
            label maps.
        padding_mode: ``"zeros"`` for images with a zero background, ``"border"`` for
            fields (used by scaling and squaring and :func:`compose`), or ``"reflection"``
            (``F.grid_sample``'s modes).
        voxel_map: optional ``(B, d, d + 1)`` map from ``disp``'s voxel indices to
            ``image``'s (an affine pre-alignment between two grids,
            :func:`to_sampling_grid`): ``image ∘ M ∘ (id + disp)``, one interpolation.

        field_of_view: also return, from the same sampling grid, ``(B, 1, *spatial)``: 1 where
            the sampled point lies inside ``image``'s grid (between its first and last voxel
            centres), 0 where it meets only the padding; detached, ``image``'s float dtype.

    Returns:
        ``(B, C, *spatial)`` warped image, same dtype and device as ``image`` (with
        ``field_of_view``: ``(warped, inside)``).

    Raises:
        TypeError: ``disp`` not a floating-point tensor, half precision, or a floating ``image``
            of another dtype or device (:func:`check_field`, :func:`check_alike`).
        ValueError: mismatched dimensions or batch sizes, an unknown ``mode`` or
            ``padding_mode``, or a ``voxel_map`` that is not ``(B, d, d + 1)``.
    """
    d = check_field(disp, "disp", fn="warp")
    check_alike("warp", disp=disp, image=image)  # a voxel_map may be float64 on the CPU (the affine stage)
    if image.dim() != d + 2:
        raise ValueError(
            f"warp(): `image` must have shape (B, C, *spatial) with {d} spatial dims to match"
            f" `disp`, got {tuple(image.shape)}"
        )
    if voxel_map is None and image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"warp(): `image` grid {tuple(image.shape[2:])} is not `disp`'s {tuple(disp.shape[2:])}:"
                         " without `voxel_map` the displacement samples the image on its own grid")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"warp(): `mode` must be 'bilinear' or 'nearest', got {mode!r}")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise ValueError(f"warp(): `padding_mode` must be 'zeros', 'border' or 'reflection', got {padding_mode!r}")
    if voxel_map is not None and tuple(voxel_map.shape) != (disp.shape[0], d, d + 1):
        raise ValueError(f"warp(): `voxel_map` must be (B={disp.shape[0]}, {d}, {d + 1}), got {tuple(voxel_map.shape)}")
    if image.shape[0] != disp.shape[0]:
        if image.shape[0] != 1:
            raise ValueError(
                f"warp(): batch sizes of `image` ({image.shape[0]}) and `disp`"
                f" ({disp.shape[0]}) differ"
            )
        image = image.expand(disp.shape[0], *image.shape[1:])
    grid = to_sampling_grid(disp, voxel_map, image.shape[2:])
    is_int = not image.is_floating_point()
    src = image.to(disp.dtype) if is_int else image
    out = _grid_sample(src, grid, mode, padding_mode)
    out = out.round().to(image.dtype) if is_int else out
    if not field_of_view:
        return out
    with torch.no_grad():
        inside = (grid.abs() <= 1.0 + 1e-6).all(-1)[:, None].to(src.dtype)
    return out, inside


def _grid_sample(src: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``F.grid_sample`` that uses every CPU thread in 3-D.

    PyTorch's 3-D CPU sampler (forward and backward) is parallel over the batch only, so a
    one-pair registration ran it on one core. On CPU with ``T > 1`` threads and ``B < T``,
    the sample points are cut along their first spatial axis into ``k = T // B`` slabs
    handed to the sampler as batch entries (``src`` expanded, not copied, when ``B == 1``):
    the same values (the points are independent), ``src``'s gradient summed over the slabs.
    Measured on 2 cores at 112×96×80: forward and backward 1.6–1.9× faster.
    """
    B, n = grid.shape[0], grid.shape[1]
    k = min(torch.get_num_threads() // B, n) if src.device.type == "cpu" and grid.dim() == 5 else 1
    if k <= 1:
        return F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
    m = -(-n // k)  # slab thickness; the last slab is padded by repeating the last plane
    if m * k > n:
        grid = torch.cat([grid, grid[:, -1:].expand(B, m * k - n, *grid.shape[2:])], dim=1)
    src = src[:, None].expand(B, k, *src.shape[1:]).reshape(B * k, *src.shape[1:])
    out = F.grid_sample(src, grid.reshape(B * k, m, *grid.shape[2:]), mode=mode, padding_mode=padding_mode,
                        align_corners=ALIGN_CORNERS)
    out = out.reshape(B, k, out.shape[1], m, *out.shape[3:]).transpose(1, 2)
    return out.reshape(B, out.shape[1], k * m, *out.shape[4:])[:, :, :n]


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``(id + outer) ∘ (id + inner)``, i.e. ``inner + outer ∘ (id + inner)``.

    Both are ``(B, d, *spatial)`` voxel-unit displacements on the same grid (channel ``k``
    along tensor axis ``k + 2``); the result is too. Outside the grid ``outer`` is extended by its
    border values. Source: method §1.1 (composition of transformations).

    Raises:
        TypeError: not floating-point tensors, or two dtypes or devices (:func:`check_alike`).
        ValueError: a malformed field (:func:`check_field`) or two shapes.
    """
    check_field(outer, "outer", fn="compose")
    check_field(inner, "inner", fn="compose")
    check_alike("compose", outer=outer, inner=inner)
    if outer.shape != inner.shape:
        raise ValueError(
            f"compose(): `outer` {tuple(outer.shape)} and `inner` {tuple(inner.shape)} must"
            " have the same shape"
        )
    return inner + warp(outer, inner, padding_mode="border")


def scaling_and_squaring(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Exponential of a stationary velocity field by scaling and squaring.

    ``u_0 = v / 2^K``, ``u_{k+1} = u_k + u_k ∘ (id + u_k)``; returns ``u_K`` so that
    ``exp(v) = id + u_K``. The inverse transformation is ``scaling_and_squaring(-v)``.

    Args:
        velocity: ``(B, d, *spatial)`` SVF in voxels.
        steps: number of squarings ``K >= 0`` (method §1.1, reference 7).

    Returns:
        ``(B, d, *spatial)`` displacement in voxels, differentiable in ``velocity``.

    Raises:
        TypeError: ``velocity`` not a floating-point tensor, or half precision (:func:`check_field`).
        ValueError: bad field shape or ``steps`` negative / not an integer.
    """
    check_field(velocity, "velocity", fn="scaling_and_squaring")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"scaling_and_squaring(): `steps` must be an integer >= 0, got {steps!r}")
    disp = velocity / (2**steps)
    for _ in range(steps):
        disp = disp + warp(disp, disp, padding_mode="border")
    return disp


svf_exp = scaling_and_squaring


def invert_displacement(disp: torch.Tensor, initial: torch.Tensor | None = None, iterations: int = 10,
                        refine_iterations: int = 20, relaxation: float = 0.5, tolerance: float = 0.02,
                        fixed_point_tolerance: float = 0.0) -> torch.Tensor:
    """Displacement ``w`` of the inverse of ``id + disp`` on the same grid.

    Two steps, both on ``disp``'s device:

    1. fixed point ``w ← −disp ∘ (id + w)`` (Chen et al. 2008, "A simple fixed-point approach
       to invert a deformation field", Med. Phys. 35(1), eq. 4; ITK's
       ``InvertDisplacementFieldImageFilter``), relaxed: ``w ← (1 − α) w + α (−disp ∘ (id + w))``
       with ``α = relaxation``, at most ``iterations`` times, from ``initial`` (e.g. ``exp(−v)``,
       method §1.1) or zero, stopping early once the mean error of ``(id + disp) ∘ (id + w)``
       before a step (the step's size over α) is at most ``fixed_point_tolerance``. The plain
       iteration (α = 1) converges only where ``∇disp`` has
       all eigenvalues in (−1, 1); α = 0.5 also where the field stretches up to 4× (on a real
       1 mm registration, colin27 ← vxm, α = 1 left a 4.6-voxel error where α = 0.5 leaves 0.06).
       It makes ``(id + disp) ∘ (id + w) = id`` at the grid points, but
       ``(id + w) ∘ (id + disp) = id`` then holds only up to the linear interpolation of ``w``
       between them (mean 0.17 mm on a 2 mm grid, 0.014 mm on that 1 mm one);
    2. least squares on both, when the fixed point leaves the larger of the two compositions'
       mean errors above ``tolerance`` voxels: ``refine_iterations`` L-BFGS iterations (strong
       Wolfe line search, history 5) on ``mean |w ∘ (id + disp) + disp|² + mean |disp ∘ (id +
       w) + w|²``, the inverse-consistency error of both compositions (Christensen & Johnson
       2001, "Consistent image registration", IEEE TMI 20(7), eq. 9): 0.087 and 0.070 mm on the
       2 mm grid. On 1 mm grids the fixed point is usually within ``tolerance`` already and the
       step, which costs about 40 s there on two CPU cores (``docs/results.md``), is skipped.

    Args:
        disp: ``(B, d, *spatial)`` voxel-unit displacement to invert.
        initial: optional ``(B, d, *spatial)`` first estimate (zeros if omitted).
        iterations: the most fixed-point iterations, ``>= 0``; refine_iterations: L-BFGS iterations, ``>= 0``.
        relaxation: the fixed point's step α in (0, 1].
        tolerance: mean error (voxels, over the grid and the batch) of both compositions below
            which the least-squares step is skipped, ``>= 0`` (0: run it unless the fixed point is exact).
        fixed_point_tolerance: mean error (voxels, over the grid and the batch) of
            ``(id + disp) ∘ (id + w)`` at which the fixed point stops before ``iterations``,
            ``>= 0`` (0, the default: it runs them all).

    Returns:
        ``(B, d, *spatial)`` voxel-unit displacement of ``(id + disp)⁻¹``, same dtype and device,
        without gradient.

    Raises:
        TypeError: ``disp`` or ``initial`` not a floating-point tensor, half precision, or the two
            in other dtypes or devices (:func:`check_field`, :func:`check_alike`).
        ValueError: bad field shapes, a negative iteration count, ``relaxation`` outside (0, 1]
            or a negative ``tolerance``.
    """
    check_field(disp, "disp", fn="invert_displacement")
    for name, n in (("iterations", iterations), ("refine_iterations", refine_iterations)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"invert_displacement(): `{name}` must be an integer >= 0, got {n!r}")
    if not 0.0 < relaxation <= 1.0:
        raise ValueError(f"invert_displacement(): `relaxation` must lie in (0, 1], got {relaxation!r}")
    for name, t in (("tolerance", tolerance), ("fixed_point_tolerance", fixed_point_tolerance)):
        if not t >= 0.0:
            raise ValueError(f"invert_displacement(): `{name}` must be >= 0, got {t!r}")
    disp = disp.detach()
    w = torch.zeros_like(disp) if initial is None else initial.detach()
    if w.shape != disp.shape:
        raise ValueError(f"invert_displacement(): `initial` {tuple(w.shape)} must match `disp` {tuple(disp.shape)}")
    with torch.no_grad():
        for _ in range(iterations):
            step = -compose(disp, w)  # minus the error of (id + disp) ∘ (id + w); w ← w + α step is the relaxed update
            w = w + relaxation * step
            if fixed_point_tolerance > 0 and float(step.square().sum(1).sqrt().mean()) <= fixed_point_tolerance:
                break  # the check below still judges both compositions against `tolerance`
        # |.| as sqrt(sum of squares): Tensor.norm(dim=1) took 1.4 s on a 1 mm field on CPU, this 0.03 s
        if refine_iterations == 0 or max(float(compose(w, disp).square().sum(1).sqrt().mean()),
                                         float(compose(disp, w).square().sum(1).sqrt().mean())) <= tolerance:
            return w
    w = w.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=refine_iterations, history_size=5, line_search_fn="strong_wolfe")

    def residual() -> torch.Tensor:
        opt.zero_grad()
        loss = compose(w, disp).pow(2).sum(1).mean() + compose(disp, w).pow(2).sum(1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(residual)
    return w.detach()


def _check_size(size: Sequence[int], d: int, fn: str) -> tuple[int, ...]:
    size = tuple(int(s) for s in size)
    if len(size) != d or any(s < 1 for s in size):
        raise ValueError(f"{fn}(): `size` must list {d} positive ints, got {size}")
    return size


def resize_field(field: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a voxel-unit field to another grid covering the same physical extent.

    The grids are cell-centred (a coarse voxel is a block of fine voxels), so linear
    interpolation uses ``align_corners=False`` and component ``k`` is multiplied by
    ``size[k] / field.shape[k + 2]`` to stay in voxel units of the new grid.

    Args:
        field: ``(B, d, *spatial)`` displacement or velocity in voxels.
        size: target spatial size (``d`` ints).

    Returns:
        ``(B, d, *size)`` field in voxels of the target grid.

    Raises:
        TypeError, ValueError: a malformed field (:func:`check_field`) or ``size`` not ``d``
            positive integers.
    """
    d = check_field(field, "field", fn="resize_field")
    size = _check_size(size, d, "resize_field")
    if tuple(field.shape[2:]) == size:
        return field
    mode = "bilinear" if d == 2 else "trilinear"
    out = F.interpolate(field, size=size, mode=mode, align_corners=False)
    scale = torch.tensor(
        [size[k] / field.shape[k + 2] for k in range(d)], dtype=field.dtype, device=field.device
    ).view(1, d, *([1] * d))
    return out * scale


def rescale_voxel_map(voxel_map: torch.Tensor, fixed: tuple[Sequence[int], Sequence[int]],
                      moving: tuple[Sequence[int], Sequence[int]]) -> torch.Tensor:
    """A voxel map (:func:`to_sampling_grid`) between two grids, carried to resized versions
    of both (the cell-centred grids of :func:`resize_image`, over the same extents).

    Args:
        voxel_map: ``(B, d, d + 1)`` map from fixed to moving voxel indices (array order).
        fixed, moving: ``(size the map was made for, new size)`` of each grid.

    Returns:
        ``(B, d, d + 1)``: ``j' = S_m⁻¹(A (S_f i' + c_f) + b + ½) − ½`` with ``S = diag(n / n')``
        and ``c_f = ½ S_f − ½`` (index ``i'`` of the new grid is ``S i' + c`` of the old).
    """
    d = voxel_map.shape[1]
    like = dict(dtype=voxel_map.dtype, device=voxel_map.device)
    r_f = torch.tensor([n / m for n, m in zip(*fixed)], **like)
    r_m = torch.tensor([n / m for n, m in zip(*moving)], **like)
    a, b = voxel_map[:, :, :d], voxel_map[:, :, d]
    a_new = a * r_f / r_m[:, None]
    b_new = (a @ (0.5 * r_f - 0.5) + b + 0.5) / r_m - 0.5
    return torch.cat([a_new, b_new[..., None]], dim=-1)


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample an image (or λ map) to ``size`` over the same physical extent.

    Down-sampling averages blocks (``mode="area"``, which anti-aliases); up-sampling is
    linear with cell-centred grids (``align_corners=False``). Values are not rescaled.

    Args:
        image: ``(B, C, *spatial)`` floating-point tensor (2D or 3D).
        size: target spatial size (``d`` positive integers).

    Returns:
        ``(B, C, *size)`` tensor of ``image``'s dtype and device.

    Raises:
        TypeError: not a floating-point tensor (resample a label map by nearest neighbour:
            :func:`warp` with ``mode="nearest"``). ValueError: not 2D or 3D, or a bad ``size``.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(f"resize_image(): `image` must be a floating-point torch.Tensor, got"
                        f" {getattr(image, 'dtype', type(image).__name__)}")
    d = image.dim() - 2
    if d not in (2, 3):
        raise ValueError(f"resize_image(): `image` must be (B, C, *spatial) in 2D or 3D, got {tuple(image.shape)}")
    size = _check_size(size, d, "resize_image")
    if tuple(image.shape[2:]) == size:
        return image
    if all(s <= n for s, n in zip(size, image.shape[2:])):
        return F.interpolate(image, size=size, mode="area")
    mode = "bilinear" if d == 2 else "trilinear"
    return F.interpolate(image, size=size, mode=mode, align_corners=False)


def jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of ``phi = id + disp``, by central finite differences.

    Derivatives use ``torch.gradient`` (second-order central differences inside, one-sided
    at the border). Because ``disp`` is in voxel units the determinant needs no spacing:
    for spacing matrix ``S`` the physical Jacobian is ``S (I + ∇u) S^{-1}``, which has the
    same determinant. Source: method §4 (central differences).

    Args:
        disp: ``(B, d, *spatial)`` displacement in voxels.

    Returns:
        ``(B, *spatial)`` determinant map (dimensionless; ``<= 0`` marks folding).

    Raises:
        TypeError, ValueError: a malformed field (:func:`check_field`). An unbatched
            ``(d, *spatial)`` field is refused or, when its first spatial axis has 2 voxels,
            read as a batch of 2D fields: pass ``(1, d, *spatial)``
            (:func:`hybridreg.metrics.jacobian_stats` takes both forms).
    """
    d = check_field(disp, "disp", fn="jacobian_determinant")
    grads = torch.gradient(disp, dim=tuple(range(2, 2 + d)))  # grads[j][:, i] = d u_i / d x_j
    # J = I + ∇u, expanded by cofactors elementwise: a batched torch.linalg.det over one
    # d x d matrix per voxel is several times slower on CPU and needs the stacked copy
    j = [[grads[c][:, r] + (1.0 if r == c else 0.0) for c in range(d)] for r in range(d)]
    if d == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def _axis_pad(d: int, axis: int, width: int) -> list[int]:
    """``F.pad``'s list (last axis first) that pads ``axis`` of a ``d``-D field by ``width`` on both sides."""
    pad = [0] * (2 * d)
    pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = width
    return pad


class _AxisConv(torch.autograd.Function):
    """Depthwise convolution of ``(B, C, *spatial)`` with a 1-D kernel along one axis ("valid":
    the input is already padded). Its backward is the transposed convolution written as the
    same forward convolution of the zero-padded gradient with the flipped kernel: PyTorch's
    depthwise ``convolution_backward`` on CPU took 4x the forward (48 of 445 ms of an
    instance iteration at 2 mm); this one costs one forward."""

    @staticmethod
    def forward(ctx, x, kernel, axis):  # type: ignore[override]
        ctx.save_for_backward(kernel)
        ctx.axis = axis
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        return conv(x, kernel, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (kernel,) = ctx.saved_tensors
        width = kernel.shape[2 + ctx.axis] - 1  # the kernel's length - 1: the full convolution's padding
        padded = F.pad(grad, _axis_pad(grad.dim() - 2, ctx.axis, width))
        return _AxisConv.apply(padded, kernel.flip(2 + ctx.axis), ctx.axis), None, None


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float], truncate: float = 2.0) -> torch.Tensor:
    """Separable Gaussian smoothing of every channel (border values replicated).

    Args:
        x: ``(B, C, *spatial)`` tensor (2D or 3D).
        sigma: standard deviation in voxels, one value or one per axis (0 skips an axis).
        truncate: kernel half-width in standard deviations.

    Returns:
        Tensor of the same shape; linear in ``x`` (differentiable, twice included: the
        backward is the same operator).

    Raises:
        ValueError: ``sigma`` negative, or not one value or one per spatial axis.
    """
    d = x.dim() - 2
    sig = [float(sigma)] * d if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sig) != d or any(s < 0 for s in sig):
        raise ValueError(f"gaussian_smooth(): `sigma` must be >= 0, one value or {d} values, got {sigma!r}")
    c = x.shape[1]
    out = x
    for k, s in enumerate(sig):
        if s == 0:
            continue
        r = max(1, int(truncate * s + 0.5))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        kern = torch.exp(-0.5 * (t / s) ** 2)
        kern = kern / kern.sum()
        shape = [1, 1] + [1] * d
        shape[2 + k] = 2 * r + 1
        out = _AxisConv.apply(F.pad(out, _axis_pad(d, k, r), mode="replicate"), kern.view(shape).expand(c, *shape[1:]).contiguous(), k)
    return out
