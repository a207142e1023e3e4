"""Analytic truths and gradchecks for warping and SVF integration."""

import itertools

import numpy as np
import pytest
import torch

from hybridreg.spatial import (
    check_field,
    compose,
    gaussian_smooth,
    invert_displacement,
    jacobian_determinant,
    resize_field,
    scaling_and_squaring,
    to_sampling_grid,
    warp,
)



def smooth_field(shape, d, amplitude, seed, dtype=torch.float32, device="cpu"):
    """Random smooth field: Gaussian-filtered noise scaled to a max of `amplitude` voxels."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    f = np.stack([gaussian_filter(rng.standard_normal(shape), 3.0) for _ in range(d)])
    f = f / np.abs(f).max() * amplitude
    return torch.tensor(f[None], dtype=dtype, device=device)


@pytest.mark.parametrize("shape", [(12, 14), (8, 10, 12)])
def test_exp_zero_is_identity(device, shape):
    v = torch.zeros(1, len(shape), *shape, device=device)
    u = scaling_and_squaring(v, 7)
    assert torch.equal(u, torch.zeros_like(u))
    img = torch.rand(1, 1, *shape, device=device)
    assert torch.allclose(warp(img, u), img, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 18), (10, 12, 14)])
def test_constant_velocity_is_translation(shape):
    d = len(shape)
    t = torch.tensor([0.75, -1.25, 0.5][:d])
    v = t.view(1, d, *([1] * d)).expand(1, d, *shape).clone()
    u = scaling_and_squaring(v, 7)
    # border padding keeps a constant field constant everywhere
    assert torch.allclose(u, v, atol=1e-5)


def test_translation_warp_moves_content():
    img = torch.zeros(1, 1, 9, 10, 11)
    img[0, 0, 4, 5, 5] = 1.0
    u = torch.zeros(1, 3, 9, 10, 11)
    u[:, 2] = 2.0  # sample 2 voxels further along the last axis
    out = warp(img, u)
    assert out[0, 0, 4, 5, 3] == pytest.approx(1.0)
    assert out.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("d,shape", [(2, (48, 52)), (3, (28, 30, 32))])
def test_exp_v_composed_with_exp_minus_v_is_identity(d, shape):
    v = smooth_field(shape, d, 3.0, seed=1)
    fwd = scaling_and_squaring(v, 7)
    inv = scaling_and_squaring(-v, 7)
    err = compose(fwd, inv).norm(dim=1)  # voxels
    interior = err[(slice(None),) + tuple(slice(6, -6) for _ in range(d))]
    # tolerances in voxels for a field of max 3 voxels: mean and max inside (6 voxels from
    # the border), and max anywhere (near the border the inverse samples outside the grid)
    assert interior.mean() < 0.02
    assert interior.max() < 0.1
    assert err.max() < 0.5  # near the border the field leaves the grid


@pytest.mark.parametrize("d,shape", [(2, (48, 52)), (3, (24, 26, 28))])
def test_inverse_field_undoes_the_field_both_ways_better_than_exp_minus_v(d, shape):
    # the situation of a written result: exp(±v) integrated on a half-resolution grid, resized
    v = smooth_field(tuple(n // 2 for n in shape), d, 2.0, seed=2)
    fwd = resize_field(scaling_and_squaring(v, 5), shape)
    start = resize_field(scaling_and_squaring(-v, 5), shape)
    inside = (slice(None),) + tuple(slice(6, -6) for _ in range(d))

    def errors(w):  # mean voxels of w ∘ φ − id (left) and φ ∘ w − id (right) inside
        return compose(w, fwd).norm(dim=1)[inside].mean(), compose(fwd, w).norm(dim=1)[inside].mean()

    fixed_point = invert_displacement(fwd, initial=start, refine_iterations=0)
    refined = invert_displacement(fwd, initial=start, tolerance=0.0)  # the least-squares step always
    assert errors(fixed_point)[1] < 1e-3  # the fixed point: a right inverse at the grid points
    # least squares on both compositions: the worse of the two errors falls
    assert max(errors(refined)) < 0.7 * min(max(errors(start)), max(errors(fixed_point)))
    # from zero it converges too (the field is small): the same answer
    assert torch.allclose(invert_displacement(fwd, iterations=30)[inside], refined[inside], atol=1e-2)


def test_fixed_point_inverse_of_a_translation_is_the_opposite_translation():
    u = torch.full((1, 3, 8, 9, 10), 0.5)
    assert torch.allclose(invert_displacement(u, iterations=1, relaxation=1.0), -u)
    # relaxed by α: the error shrinks by (1 − α) per iteration
    assert torch.allclose(invert_displacement(u, iterations=1, refine_iterations=0), -0.5 * u)
    assert torch.allclose(invert_displacement(u, iterations=20, refine_iterations=0), -u, atol=1e-5)
    # with fixed_point_tolerance it stops after the step taken at an error of at most that: the
    # error 0.866 (|u|) halves per iteration, is 0.0017 after 9 and the 10th step leaves 0.00085
    early = invert_displacement(u, iterations=20, refine_iterations=0, fixed_point_tolerance=0.002)
    assert float((early + u).square().sum(1).sqrt().mean()) == pytest.approx(0.75**0.5 * 0.5**10, rel=1e-4)


def test_relaxed_fixed_point_converges_where_the_field_stretches():
    # 1D stretch along one axis, u(x) = s · (x − c) · g(x): ∂u/∂x from −0.65 to 1.48, so the plain
    # iteration w ← −u ∘ (id + w) needs |∂u/∂x| < 1 and diverges; α = 0.5 contracts for −1 < ∂u/∂x < 3
    n = 64
    x = torch.arange(n, dtype=torch.float64)
    bump = torch.exp(-0.5 * ((x - n / 2) / 6.0) ** 2)
    u = torch.zeros(1, 2, n, 8, dtype=torch.float64)
    u[:, 0] = (1.5 * (x - n / 2) * bump)[:, None]
    assert float(jacobian_determinant(u).min()) > 0  # a diffeomorphism
    right = lambda w: compose(u, w).norm(dim=1)[:, 4:-4].max()  # noqa: E731  φ ∘ w − id
    plain = invert_displacement(u, iterations=60, refine_iterations=0, relaxation=1.0)
    relaxed = invert_displacement(u, iterations=60, refine_iterations=0)
    assert right(relaxed) < 1e-3 < 1.0 < right(plain)


def test_least_squares_step_runs_only_above_the_tolerance():
    v = smooth_field((12, 13, 14), 3, 1.0, seed=3)
    fwd = resize_field(scaling_and_squaring(v, 5), (24, 26, 28))
    fixed_point = invert_displacement(fwd, refine_iterations=0)
    assert torch.equal(invert_displacement(fwd, tolerance=10.0), fixed_point)  # within it: skipped
    assert not torch.equal(invert_displacement(fwd, tolerance=0.0), fixed_point)


def test_the_results_inverse_takes_the_tolerance_it_is_given():
    """``RegistrationResult.inverse_displacement(tolerance)``: the service gives it
    ``INVERSE_TOLERANCE_MM`` over the voxel size, so a 1 mm grid skips the least-squares step
    where a 2 mm one runs it for the same error in mm."""
    from hybridreg.solvers import FIXED_POINT_SHARE, RegistrationResult

    v = smooth_field((12, 13, 14), 3, 1.0, seed=3)
    fwd = resize_field(scaling_and_squaring(v, 5), (24, 26, 28))
    res = RegistrationResult(fwd, v, torch.ones(1, 1, 1, 1, 1), torch.zeros(1, 1, 24, 26, 28), [], 0.0, None, {}, svf_steps=5)
    start = resize_field(scaling_and_squaring(-v, 5), (24, 26, 28))
    stopped = invert_displacement(fwd, initial=start, refine_iterations=0, fixed_point_tolerance=FIXED_POINT_SHARE * 10.0)
    assert torch.equal(res.inverse_displacement(10.0), stopped)  # the fixed point stops at that share of the tolerance
    assert not torch.equal(stopped, invert_displacement(fwd, initial=start, refine_iterations=0))
    assert not torch.equal(res.inverse_displacement(0.0), res.inverse_displacement(10.0))


def test_sampling_grid_axis_order():
    u = torch.zeros(1, 3, 5, 6, 7)
    u[:, 0] = 1.0  # one voxel along tensor axis 2 (depth) = grid_sample's z (last coord)
    g = to_sampling_grid(u)
    assert g.shape == (1, 5, 6, 7, 3)
    assert torch.allclose(g[..., 2] - to_sampling_grid(torch.zeros_like(u))[..., 2], torch.full((1, 5, 6, 7), 2 / 4))


@pytest.mark.parametrize("spatial,source", [((5, 6, 7), (9, 4, 8)), ((6, 5), (7, 9))])
def test_sampling_grid_through_a_voxel_map(spatial, source):
    """With a voxel map the grid holds, per voxel x, ``A (x + u(x)) + b`` normalised on the
    source grid, in reversed axis order: checked voxel by voxel for a batch of two maps, and
    its derivative in ``u`` by gradcheck."""
    gen = torch.Generator().manual_seed(3)
    d = len(spatial)
    u = torch.randn(2, d, *spatial, generator=gen, dtype=torch.float64)
    vm = torch.cat([torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(2, d, d, generator=gen, dtype=torch.float64),
                    torch.randn(2, d, 1, generator=gen, dtype=torch.float64)], dim=2)
    g = to_sampling_grid(u, vm, source)
    assert g.shape == (2, *spatial, d)
    for b in range(2):
        for x in itertools.product(*(range(n) for n in spatial)):
            p = vm[b, :, :d] @ (torch.tensor(x, dtype=torch.float64) + u[(b, slice(None)) + x]) + vm[b, :, d]
            want = torch.stack([2 * p[k] / (source[k] - 1) - 1 for k in range(d)]).flip(0)
            assert torch.allclose(g[(b,) + x], want, atol=1e-12)
    small = u[(slice(None), slice(None)) + tuple(slice(0, 3) for _ in spatial)].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: to_sampling_grid(w, vm, source), (small,))


def test_warp_through_a_cpu_voxel_map_follows_the_displacements_device(device):
    """The affine stage makes its voxel map on the CPU (numpy); a displacement on the GPU warps
    through it there, with the CPU's result (found on a GPU: the metrics of every scan pair
    on two grids failed with a device mismatch)."""
    from hybridreg.spatial import warp

    gen = torch.Generator().manual_seed(5)
    image = torch.rand(1, 1, 9, 8, 7, generator=gen)
    disp = 0.5 * torch.randn(1, 3, 6, 5, 4, generator=gen)
    vm = torch.cat([torch.eye(3) * 1.2, torch.tensor([[0.5], [0.3], [0.2]])], dim=1)[None].double()  # float64, CPU
    want = warp(image, disp, voxel_map=vm)
    got = warp(image.to(device), disp.to(device), voxel_map=vm)
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_resize_field_keeps_voxel_units():
    shape = (8, 10, 12)
    v = torch.zeros(1, 3, *shape)
    v[:, 1] = 1.5  # 1.5 coarse voxels
    up = resize_field(v, (16, 20, 24))
    assert torch.allclose(up[:, 1], torch.full((1, 16, 20, 24), 3.0))


def test_jacobian_of_affine_map():
    shape = (12, 13, 14)
    A = torch.tensor([[1.1, 0.2, 0.0], [0.05, 0.9, 0.1], [0.0, -0.1, 1.2]], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    u = torch.einsum("ij,j...->i...", A - torch.eye(3, dtype=torch.float64), grid)[None]
    j = jacobian_determinant(u)
    assert torch.allclose(j, torch.full_like(j, float(torch.linalg.det(A))), atol=1e-10)


@pytest.mark.parametrize("shape", [(9, 11), (7, 8, 9)])
def test_jacobian_matches_dense_det(shape):
    # the cofactor expansion against torch.linalg.det of I + ∇u (torch.gradient's differences)
    torch.manual_seed(0)
    d = len(shape)
    u = torch.randn(2, d, *shape, dtype=torch.float64)
    grads = torch.gradient(u, dim=tuple(range(2, 2 + d)))
    jac = torch.stack([torch.stack([g[:, i] for g in grads], dim=-1) for i in range(d)], dim=-2)
    ref = torch.linalg.det(jac + torch.eye(d, dtype=torch.float64))
    assert torch.allclose(jacobian_determinant(u), ref, atol=1e-12)


def test_warp_gradcheck():
    torch.manual_seed(0)
    img = torch.rand(1, 2, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    u = (torch.rand(1, 3, 5, 6, 4, dtype=torch.float64) * 0.6 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: warp(a, b), (img, u), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape, sigma", [((9, 7), 1.5), ((6, 8, 5), (1.0, 0.0, 2.0))])
def test_gaussian_smooth_matches_scipy_and_gradcheck(shape, sigma):
    from scipy.ndimage import gaussian_filter

    torch.manual_seed(0)
    x = torch.rand(2, 3, *shape, dtype=torch.float64)
    got = gaussian_smooth(x, sigma)
    # the same truncation (radius int(2 σ + 0.5)) and border rule (replicate = scipy's "nearest")
    want = np.stack([[gaussian_filter(c, sigma, mode="nearest", truncate=2.0) for c in b] for b in x.numpy()])
    assert np.allclose(got.numpy(), want, atol=1e-12)
    xg = x[:1, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gaussian_smooth(t, sigma), (xg,))
    assert torch.autograd.gradgradcheck(lambda t: gaussian_smooth(t, sigma), (xg,))


def test_svf_gradcheck():
    torch.manual_seed(0)
    v = (torch.rand(1, 2, 6, 7, dtype=torch.float64) - 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: scaling_and_squaring(x, 3), (v,), eps=1e-6, atol=1e-5)


def test_nearest_warp_keeps_labels():
    lab = torch.randint(0, 5, (1, 1, 8, 9, 10))
    u = smooth_field((8, 9, 10), 3, 1.5, seed=3)
    out = warp(lab, u, mode="nearest")
    assert out.dtype == lab.dtype
    assert set(out.unique().tolist()) <= set(lab.unique().tolist())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: scaling_and_squaring(torch.zeros(1, 2, 4, 4, 4)), "velocity"),
        (lambda: scaling_and_squaring(torch.zeros(4, 4)), "velocity"),
        (lambda: scaling_and_squaring(torch.zeros(1, 3, 4, 4, 4), steps=-1), "steps"),
        (lambda: warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4, 4)), "image"),
        (lambda: warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), mode="cubic"), "mode"),
        (lambda: warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), padding_mode="reflect"), "warp.*padding_mode"),
        (lambda: compose(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 5, 4, 4)), "outer"),
        (lambda: invert_displacement(torch.zeros(1, 3, 4, 4, 4), iterations=-1), "iterations"),
        (lambda: invert_displacement(torch.zeros(1, 3, 4, 4, 4), refine_iterations=1.5), "refine_iterations"),
        (lambda: invert_displacement(torch.zeros(1, 3, 4, 4, 4), relaxation=0.0), "relaxation"),
        (lambda: invert_displacement(torch.zeros(1, 3, 4, 4, 4), tolerance=-1.0), "tolerance"),
        (lambda: invert_displacement(torch.zeros(1, 3, 4, 4, 4), fixed_point_tolerance=-1.0), "fixed_point_tolerance"),
        (lambda: invert_displacement(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 5)), "initial"),
    ],
)
def test_bad_input_names_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_field_rejects_non_finite_values_when_asked(device, dtype, bad):
    field = torch.zeros(1, 3, 4, 5, 6, device=device, dtype=dtype)
    assert check_field(field, "velocity", fn="f", finite=True) == 3
    field[0, 1, 2, 3, 4] = bad
    assert check_field(field, "velocity", fn="f") == 3  # shape-only check in the inner loops
    with pytest.raises(ValueError, match=r"f\(\): `velocity` contains NaN or Inf"):
        check_field(field, "velocity", fn="f", finite=True)


@pytest.mark.parametrize("batch,threads", [(1, 2), (1, 3), (2, 4), (3, 2)])
@pytest.mark.parametrize("mode,padding", [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")])
def test_warp_cut_into_slabs_for_cpu_threads_equals_one_sampler_call(batch, threads, mode, padding):
    """3-D warps on CPU are cut into per-thread slabs (the sampler is parallel over the batch
    only): values and both gradients equal the uncut call (one thread), including a slab
    count that does not divide the first axis (7 planes)."""
    torch.manual_seed(0)
    img = torch.rand(batch, 2, 7, 6, 5, dtype=torch.float64, requires_grad=True)
    u = (torch.randn(batch, 3, 7, 6, 5, dtype=torch.float64) * 1.5).requires_grad_()
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            out = warp(img, u, mode=mode, padding_mode=padding)
            grads = torch.autograd.grad((out * torch.linspace(0, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                        (img, u), allow_unused=True)
            outs.append((out, grads))
    finally:
        torch.set_num_threads(before)
    (a, ga), (b, gb) = outs
    assert a.shape == b.shape == (batch, 2, 7, 6, 5)
    assert torch.equal(a, b)
    for x, y in zip(ga, gb):
        assert (x is None and y is None) or torch.allclose(x, y, atol=1e-12)


def test_warp_and_compose_refuse_another_grid_or_dtype_naming_the_argument():
    """An (8, 9, 9) image and a zero (8, 9, 10) displacement gave a stretched image, not the
    identity; two dtypes gave torch's "expected scalar type" error."""
    from hybridreg.spatial import warp

    with pytest.raises(ValueError, match=r"warp\(\): `image` grid \(8, 9, 9\) is not `disp`'s \(8, 9, 10\)"):
        warp(torch.rand(1, 1, 8, 9, 9), torch.zeros(1, 3, 8, 9, 10))
    with pytest.raises(TypeError, match=r"compose\(\): `inner` is torch.float64 on cpu but `outer` is torch.float32"):
        compose(torch.zeros(1, 2, 6, 6), torch.zeros(1, 2, 6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"warp\(\): `disp` is torch.float16"):
        warp(torch.rand(1, 1, 6, 6).half(), torch.zeros(1, 2, 6, 6).half())
