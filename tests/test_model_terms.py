"""Similarity, regularizer and priors: gradchecks and independent cross-checks."""

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats as st
import torch

from hybridreg.objective import ObjectiveConfig, evaluate
from hybridreg.priors import (
    beta_hyperprior,
    edge_weights,
    grid_smoothness,
    lambda_from_param,
    nonlocal_smoothness,
    normal_hyperprior,
    param_from_lambda,
    paint_regions,
)
from hybridreg.regularization import diffusion_energy, edge_density, reference_scale
from hybridreg.similarity import box_mean, lncc, mse


def grid_laplacian(shape, spacing, edge_weight):
    """Explicit weighted graph Laplacian of the face-neighbour grid graph (scipy.sparse).

    `edge_weight(k, i, j)` gives the weight of the edge between flat voxels i and j along
    axis k (j = i + stride_k); the edge length is spacing[k]."""
    n = int(np.prod(shape))
    idx = np.arange(n).reshape(shape)
    rows, cols, vals = [], [], []
    for k in range(len(shape)):
        a = np.take(idx, np.arange(shape[k] - 1), axis=k).ravel()
        b = np.take(idx, np.arange(1, shape[k]), axis=k).ravel()
        w = edge_weight(k, a, b) / spacing[k] ** 2
        rows += [a, b, a, b]
        cols += [a, b, b, a]
        vals += [w, w, -w, -w]
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


@pytest.mark.parametrize("shape,spacing", [((5, 6), (1.0, 2.0)), ((4, 5, 6), (1.5, 1.0, 2.5))])
def test_diffusion_energy_equals_sparse_laplacian_quadratic_form(shape, spacing):
    rng = np.random.default_rng(0)
    d = len(shape)
    u = rng.standard_normal((d, *shape))
    lam = rng.random(shape) + 0.1
    flat_lam = lam.ravel()
    L = grid_laplacian(shape, spacing, lambda k, a, b: flat_lam[b])  # λ at the edge's second voxel
    u_mm = u * np.array(spacing).reshape(d, *([1] * d))
    expected = 0.5 * sum(float(c @ (L @ c)) for c in u_mm.reshape(d, -1))
    got = diffusion_energy(torch.tensor(u)[None], torch.tensor(lam)[None, None], spacing, reduction="sum")
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_uniform_lambda_is_the_special_case():
    rng = np.random.default_rng(1)
    u = torch.tensor(rng.standard_normal((1, 3, 4, 5, 6)))
    full = diffusion_energy(u, torch.full((1, 1, 4, 5, 6), 0.7, dtype=torch.float64), reduction="sum")
    uni = diffusion_energy(u, torch.full((1, 1, 1, 1, 1), 0.7, dtype=torch.float64), reduction="sum")
    assert float(full) == pytest.approx(float(uni), rel=1e-12)
    assert float(uni) == pytest.approx(0.7 * float(diffusion_energy(u, None, reduction="sum")), rel=1e-12)


def test_reference_normalisation():
    # authors' code: (1/d) Σ_axes mean over (components, voxels) of λ (forward difference)²
    rng = np.random.default_rng(2)
    u = torch.tensor(rng.standard_normal((1, 3, 6, 7, 8)))
    lam = torch.ones(1, 1, 6, 7, 8, dtype=torch.float64)
    ref = sum(float(((u.narrow(k + 2, 1, u.shape[k + 2] - 1) - u.narrow(k + 2, 0, u.shape[k + 2] - 1)) ** 2).sum()) for k in range(3))
    ref_mean_style = ref / (3 * u[0, 0].numel()) / 3  # averaged over all N voxels, components and axes
    ours = reference_scale(3) * float(diffusion_energy(u, lam, reduction="mean"))
    assert ours == pytest.approx(ref_mean_style, rel=1e-12)


def test_grid_smoothness_equals_sparse_laplacian():
    rng = np.random.default_rng(3)
    shape, spacing = (5, 4, 6), (1.0, 2.0, 1.5)
    lam = rng.random(shape)
    img = rng.random(shape)
    w = edge_weights(torch.tensor(img)[None, None], 0.3)
    flat = img.ravel()
    L = grid_laplacian(shape, spacing, lambda k, a, b: np.exp(-((flat[a] - flat[b]) ** 2) / (2 * 0.3**2)))
    expected = 0.5 * lam.ravel() @ (L @ lam.ravel())
    got = grid_smoothness(torch.tensor(lam)[None, None], w, spacing, reduction="sum")
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_nonlocal_keops_matches_dense_torch():
    torch.manual_seed(0)
    shape, spacing = (5, 6, 4), (2.0, 2.0, 3.0)
    lam = torch.rand(2, 1, *shape, dtype=torch.float64)
    guide = torch.rand(2, 1, *shape, dtype=torch.float64)
    got = nonlocal_smoothness(lam, guide, spacing, sigma_space=4.0, sigma_intensity=0.2, reduction="none")
    pos = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) * h for n, h in zip(shape, spacing)], indexing="ij"), -1).reshape(-1, 3)
    for b in range(2):
        f = guide[b].reshape(-1)
        lv = lam[b].reshape(-1)
        K = torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * 16.0) - (f[:, None] - f[None]) ** 2 / (2 * 0.04))
        dense = 0.5 * (K * (lv[:, None] - lv[None]) ** 2).sum(1)
        assert torch.allclose(got[b].reshape(-1), dense, rtol=1e-10, atol=1e-12)


def test_nonlocal_keops_gradient_matches_dense():
    torch.manual_seed(1)
    lam = torch.rand(1, 1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    guide = torch.rand(1, 1, 4, 5, 3, dtype=torch.float64)
    nonlocal_smoothness(lam, guide, (1.0, 1.0, 1.0), sigma_space=2.0, sigma_intensity=0.5, reduction="sum").backward()
    g_keops = lam.grad.clone()
    lam2 = lam.detach().clone().requires_grad_()
    pos = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (4, 5, 3)], indexing="ij"), -1).reshape(-1, 3)
    f = guide.reshape(-1)
    K = torch.exp(-torch.cdist(pos, pos) ** 2 / 8.0 - (f[:, None] - f[None]) ** 2 / 0.5)
    lv = lam2.reshape(-1)
    (0.5 * (K * (lv[:, None] - lv[None]) ** 2).sum()).backward()
    assert torch.allclose(g_keops, lam2.grad, rtol=1e-9)


def test_box_mean_matches_brute_force():
    torch.manual_seed(0)
    x = torch.rand(1, 2, 7, 8, 9, dtype=torch.float64)
    got = box_mean(x, 5)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2, 2, 2))
    ones = torch.nn.functional.pad(torch.ones_like(x), (2, 2, 2, 2, 2, 2))
    k = torch.ones(2, 1, 5, 5, 5, dtype=torch.float64)
    s = torch.nn.functional.conv3d(xp, k, groups=2)
    c = torch.nn.functional.conv3d(ones, k, groups=2)
    assert torch.allclose(got, s / c, atol=1e-12)
    # a window wider than an axis (9 > 3, 2) averages that whole axis; along the 6-voxel axis the box is truncated at both borders
    narrow = torch.rand(1, 1, 3, 2, 6, dtype=torch.float64)
    want = torch.stack([narrow[..., max(0, i - 4):i + 5].mean(-1) for i in range(6)], -1).mean((2, 3), keepdim=True)
    assert torch.allclose(box_mean(narrow, 9), want.expand_as(narrow), atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: box_mean(t, 3), (x.clone().requires_grad_(),))


def test_lncc_properties():
    torch.manual_seed(0)
    f = torch.rand(1, 1, 12, 13, 14, dtype=torch.float64)
    assert float(lncc(f, f, 5)) < -0.99
    assert float(lncc(f, 3.0 * f + 2.0, 5)) < -0.99  # invariant to affine intensity change
    other = torch.rand(1, 1, 12, 13, 14, dtype=torch.float64)
    assert -0.2 < float(lncc(f, other, 5)) <= 0.0
    assert lncc(f, other, 5, reduction="none").shape == f.shape


def test_energy_uses_the_configured_lncc_eps():
    """``ObjectiveConfig.lncc_eps`` is the ε of the energy's LNCC: the similarity term equals
    :func:`lncc` with it; on a low-contrast pair (var_f · var_w ~ 1e-6) ε = 1e-5 hides most of
    the local correlation that a small ε sees, on a high-contrast one ε does not matter."""
    v = torch.zeros(1, 3, 12, 14, 10, dtype=torch.float64)
    lam = torch.full((1, 1, 1, 1, 1), 0.7, dtype=torch.float64)
    sims = {}
    for contrast in (0.3, 3.0):
        torch.manual_seed(1)
        f, m = (0.5 + contrast * torch.nn.functional.avg_pool3d(torch.rand(1, 1, 12, 14, 10, dtype=torch.float64), 3, 1, 1)
                for _ in range(2))
        for eps in (1e-5, 1e-9):
            cfg = ObjectiveConfig(lncc_eps=eps)
            sims[contrast, eps] = float(evaluate(f, m, v, lam, cfg).terms.similarity)
            assert sims[contrast, eps] == pytest.approx(float(lncc(f, m, cfg.lncc_window, eps=eps)), rel=1e-12)
    assert sims[0.3, 1e-9] < 5 * sims[0.3, 1e-5] < 0
    assert sims[3.0, 1e-9] == pytest.approx(sims[3.0, 1e-5], rel=0.01)
    assert ObjectiveConfig().lncc_eps == 1e-6


def test_lncc_and_mse_gradcheck():
    torch.manual_seed(0)
    f = torch.rand(1, 1, 6, 5, 7, dtype=torch.float64)
    w = torch.rand(1, 1, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lncc(f, x, 3, eps=1e-3, reduction="sum"), (w,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda x: mse(f, x, sigma=0.5, reduction="sum"), (w,))


def test_regularizer_and_priors_gradcheck():
    torch.manual_seed(0)
    u = torch.randn(1, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    lam = (torch.rand(1, 1, 4, 5, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: diffusion_energy(a, b, (1.0, 2.0, 1.5), reduction="sum"), (u, lam))
    assert torch.autograd.gradcheck(lambda b: beta_hyperprior(b, 1.3, 2.0, reduction="sum"), (lam,))
    assert torch.autograd.gradcheck(lambda b: normal_hyperprior(b, 1.0, 0.7, reduction="sum"), (lam,))
    w = edge_weights(torch.rand(1, 1, 4, 5, 3, dtype=torch.float64), 0.2)
    assert torch.autograd.gradcheck(lambda b: grid_smoothness(b, w, (1.0, 1.0, 2.0), reduction="sum"), (lam,))
    theta = torch.randn(1, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lambda_from_param(t, "beta"), (theta,))
    assert torch.autograd.gradcheck(lambda t: lambda_from_param(t, "normal"), (theta,))


def test_edge_density_backward_matches_autograd_of_the_formula():
    # edge_density's gradient is written out (_EdgeDensity): against autograd through the
    # formula itself, for the field and for edge weights that require grad, on a grid with a
    # one-voxel axis (no edges there); then its first and second derivatives numerically
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 1, 4, dtype=torch.float64, requires_grad=True)
    w = [torch.rand(2, 1, 4, 1, 4, dtype=torch.float64, requires_grad=True), None,
         torch.rand(2, 1, 5, 1, 3, dtype=torch.float64, requires_grad=True)]
    h = (1.0, 2.0, 1.5)

    def formula(x, w):
        out = torch.zeros(2, 1, 5, 1, 4, dtype=torch.float64)
        for k in (0, 2):
            n, dim = x.shape[k + 2], k + 2
            sq = ((x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)) ** 2).sum(1, keepdim=True) / h[k] ** 2
            out = out + torch.cat([torch.zeros_like(sq.narrow(dim, 0, 1)), sq * w[k]], dim)
        return 0.5 * out

    weights = [w[0], torch.ones(2, 1, 5, 0, 4, dtype=torch.float64), w[2]]  # the one-voxel axis has no edges
    g = torch.randn(2, 1, 5, 1, 4, dtype=torch.float64)
    ours = torch.autograd.grad((edge_density(x, h, weights) * g).sum(), (x, w[0], w[2]))
    ref = torch.autograd.grad((formula(x, w) * g).sum(), (x, w[0], w[2]))
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(edge_density(x, h, weights), formula(x, w), atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b, c: edge_density(a, h, [b, weights[1], c]), (x, w[0], w[2]))
    assert torch.autograd.gradgradcheck(lambda a, b, c: edge_density(a, h, [b, weights[1], c]), (x, w[0], w[2]))


def test_hyperpriors_match_scipy_log_densities_up_to_constants():
    lam = np.linspace(0.05, 0.95, 17)
    t = torch.tensor(lam)
    ours_beta = beta_hyperprior(t, 2.3, 1.7, reduction="none").numpy()
    ref_beta = -st.beta(2.3, 1.7).logpdf(lam)
    assert np.allclose(ours_beta - ref_beta, (ours_beta - ref_beta)[0], atol=1e-10)
    ours_norm = normal_hyperprior(t, 1.0, 0.4, reduction="none").numpy()
    ref_norm = -st.norm(1.0, 0.4).logpdf(lam)
    assert np.allclose(ours_norm - ref_norm, (ours_norm - ref_norm)[0], atol=1e-10)


@pytest.mark.parametrize("kind", ["beta", "normal"])
def test_lambda_parametrisation_round_trip(kind):
    lam = torch.tensor([0.01, 0.3, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(lambda_from_param(param_from_lambda(lam, kind), kind), lam, atol=1e-9)


def test_objective_terms_and_grids():
    torch.manual_seed(0)
    f = torch.rand(1, 1, 16, 18, 20)
    m = torch.rand(1, 1, 16, 18, 20)
    v = torch.zeros(1, 3, 8, 9, 10, requires_grad=True)
    cfg = ObjectiveConfig(w_reg=2.0, hyperprior="beta", hyper_strength=0.2, lambda_smoothness="grid", w_smooth=0.1)
    for lam in (torch.full((1, 1, 8, 9, 10), 0.5), torch.full((1, 1, 16, 18, 20), 0.5), torch.full((1, 1, 1, 1, 1), 0.5)):
        ev = evaluate(f, m, v, lam, cfg, (2.0, 2.0, 2.0))
        t = ev.terms
        assert torch.allclose(t.total, t.similarity + t.regularization + t.hyperprior + t.lambda_smoothness)
        assert float(t.hyperprior) == pytest.approx(-0.2 * np.log(0.5), rel=1e-5)
        assert ev.displacement.shape == (1, 3, 16, 18, 20)
    with pytest.raises(ValueError, match="lam"):
        evaluate(f, m, v, torch.ones(1, 1, 5, 5, 5), cfg)


@pytest.mark.parametrize(
    "kwargs,name",
    [({"w_reg": -1.0}, "w_reg"), ({"lncc_window": 4}, "lncc_window"), ({"hyperprior": "gamma"}, "hyperprior"),
     ({"lambda_smoothness": "tv"}, "lambda_smoothness"), ({"svf_steps": -2}, "svf_steps"), ({"mse_sigma": 0.0}, "mse_sigma"),
     ({"symmetric": True, "svf_steps": 0}, "svf_steps"), ({"symmetric": "yes"}, "symmetric")],
)
def test_objective_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ObjectiveConfig(**kwargs)


def _smooth_field(shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn((1, 3, *shape[2:]), generator=g, dtype=torch.float64)
    v = torch.nn.functional.avg_pool3d(v, 5, stride=1, padding=2, count_include_pad=False)
    return scale * v / v.abs().max()


def test_symmetric_energy_is_the_mid_space_match():
    """``symmetric``: φ is the same field as without it; the match is D(f∘exp(−v/2), m∘exp(v/2)),
    unchanged when the images are swapped and v negated; at v = 0 it is the plain energy."""
    from hybridreg.spatial import scaling_and_squaring, to_sampling_grid, warp

    torch.manual_seed(0)
    f, m = (torch.nn.functional.avg_pool3d(torch.rand(1, 1, 14, 16, 12, dtype=torch.float64), 3, 1, 1) for _ in range(2))
    v = _smooth_field(f.shape, 2.0, 1)
    lam = torch.full((1, 1, 1, 1, 1), 0.7, dtype=torch.float64)
    plain, sym = ObjectiveConfig(), ObjectiveConfig(symmetric=True)
    a, b = evaluate(f, m, v, lam, plain), evaluate(f, m, v, lam, sym)
    assert torch.allclose(a.displacement, b.displacement, atol=1e-12)  # exp(v/2)∘exp(v/2) is S&S's last squaring
    assert torch.allclose(a.warped, b.warped, atol=1e-12) and torch.allclose(a.terms.regularization, b.terms.regularization)
    half, back = scaling_and_squaring(0.5 * v, sym.svf_steps - 1), scaling_and_squaring(-0.5 * v, sym.svf_steps - 1)
    match = lncc(warp(f, back), warp(m, half), sym.lncc_window, eps=sym.lncc_eps, reduction="none")
    # the points of the match: inside both images' fields of view
    both = ((to_sampling_grid(back).abs() <= 1.0).all(-1) & (to_sampling_grid(half).abs() <= 1.0).all(-1))[:, None]
    assert 0.5 < float(both.double().mean()) < 1.0
    assert float(b.terms.similarity) == pytest.approx(float((match * both).mean()), rel=1e-12)
    assert float(b.terms.similarity) != pytest.approx(float(a.terms.similarity), rel=1e-3)
    swapped = evaluate(m, f, -v, lam, sym)
    assert float(swapped.terms.similarity) == pytest.approx(float(b.terms.similarity), rel=1e-10)
    zero = torch.zeros_like(v)
    assert torch.allclose(evaluate(f, m, zero, lam, plain).terms.total, evaluate(f, m, zero, lam, sym).terms.total)
    # masks follow their image half-way; gradients reach v
    mask = torch.zeros_like(f)
    mask[..., 3:11, 3:13, 2:10] = 1
    vg = v.clone().requires_grad_()
    t = evaluate(f, m, vg, lam, sym, fixed_mask=mask, moving_mask=mask).terms
    t.total.backward()
    assert torch.isfinite(t.total) and float(vg.grad.abs().sum()) > 0


def test_the_warped_mask_selects_voxels_and_carries_no_gradient():
    """The moving mask is warped with the image but not differentiated (as ITK's metric masks):
    the similarity's gradient is that of the masked sum (over all voxels' number) with the warped
    mask held fixed."""
    from hybridreg.spatial import scaling_and_squaring, warp

    torch.manual_seed(2)
    shape = (6, 7, 5)
    f, m = torch.rand(1, 1, *shape, dtype=torch.float64), torch.rand(1, 1, *shape, dtype=torch.float64)
    mask = torch.zeros(1, 1, *shape, dtype=torch.float64)
    mask[..., 1:5, 2:6, 1:4] = 1
    lam = torch.ones(1, 1, *shape, dtype=torch.float64)
    cfg = ObjectiveConfig(similarity="mse", svf_steps=2, hyperprior="none")
    v = _smooth_field(f.shape, 0.8, 2).requires_grad_()
    evaluate(f, m, v, lam, cfg, moving_mask=mask).terms.similarity.backward()
    ours = v.grad.clone()
    v.grad = None
    disp = scaling_and_squaring(v, cfg.svf_steps)
    with torch.no_grad():
        held = warp(mask, disp)
    per_voxel = (f - warp(m, disp)) ** 2 / (2 * cfg.mse_sigma**2)
    (per_voxel * held).mean().backward()
    assert torch.allclose(ours, v.grad, rtol=1e-10, atol=1e-12)
    v.grad = None
    moving_weight = warp(mask, scaling_and_squaring(v, cfg.svf_steps))  # differentiated, the mask's edge pulls on v
    (per_voxel.detach() * moving_weight).mean().backward()
    assert float(v.grad.abs().max()) > 1e-3


def test_symmetric_energy_gradcheck():
    torch.manual_seed(1)
    f, m = torch.rand(1, 1, 6, 7, 5, dtype=torch.float64), torch.rand(1, 1, 6, 7, 5, dtype=torch.float64)
    v = _smooth_field(f.shape, 0.8, 2).requires_grad_()
    lam = torch.full((1, 1, 6, 7, 5), 0.6, dtype=torch.float64)
    cfg = ObjectiveConfig(symmetric=True, lncc_window=3, svf_steps=2, hyperprior="none")
    assert torch.autograd.gradcheck(lambda x: evaluate(f, m, x, lam, cfg).terms.total, (v,), eps=1e-6, atol=1e-5)


def test_nonlocal_smoothness_inside_the_objective():
    torch.manual_seed(0)
    f = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    v = torch.zeros(1, 3, 16, 16, 16, dtype=torch.float64)
    lam = (torch.rand(1, 1, 16, 16, 16, dtype=torch.float64) * 0.5 + 0.25).requires_grad_()
    cfg = ObjectiveConfig(lambda_smoothness="nonlocal", w_smooth=1.0, smooth_node_factor=4, smooth_sigma_space=8.0)
    t = evaluate(f, f, v, lam, cfg, (1.0, 1.0, 1.0)).terms
    assert float(t.lambda_smoothness.detach()) > 0
    t.total.backward()
    assert lam.grad is not None and float(lam.grad.abs().sum()) > 0
    # a constant λ has zero smoothness energy
    const = torch.full_like(lam, 0.5)
    assert float(evaluate(f, f, v, const, cfg, (1.0, 1.0, 1.0)).terms.lambda_smoothness) == pytest.approx(0.0, abs=1e-12)


def test_paint_regions():
    labels = torch.zeros(1, 1, 6, 6, 6, dtype=torch.int64)
    labels[..., :3] = 2
    labels[..., 3:] = 41
    lam = paint_regions(labels, {2: 0.2, 41: 0.8})
    assert float(lam[..., 0].mean()) == pytest.approx(0.2) and float(lam[..., 5].mean()) == pytest.approx(0.8)
    smooth = paint_regions(labels, {2: 0.2, 41: 0.8}, smooth_sigma=0.8)
    assert 0.2 < float(smooth[0, 0, 3, 3, 2]) < float(smooth[0, 0, 3, 3, 3]) < 0.8
    with pytest.raises(ValueError, match="labels"):
        paint_regions(labels.float(), {2: 0.2})
    with pytest.raises(ValueError, match="values"):
        paint_regions(labels, {2: -1.0})


@pytest.mark.parametrize("smoothness", ["none", "grid", "nonlocal"])
@pytest.mark.parametrize("masked", [False, True])
def test_per_pair_terms_are_each_pair_evaluated_alone(smoothness, masked):
    """``evaluate(per_pair=True)``: each term is (B,), pair b's energy exactly as evaluated alone
    (masks, voxelwise λ, hyperprior and λ smoothness included); unmasked, their mean is the batch's term."""
    torch.manual_seed(3)
    B, shape = 3, (10, 12, 9)
    f, m = torch.rand(B, 1, *shape, dtype=torch.float64), torch.rand(B, 1, *shape, dtype=torch.float64)
    v = 0.5 * torch.randn(B, 3, 5, 6, 5, dtype=torch.float64)
    lam = 0.2 + torch.rand(B, 1, 5, 6, 5, dtype=torch.float64)
    masks = dict(fixed_mask=(torch.rand(B, 1, *shape) > 0.3).double(), moving_mask=(torch.rand(B, 1, *shape) > 0.2).double()) \
        if masked else {}
    cfg = ObjectiveConfig(lambda_smoothness=smoothness, w_smooth=0.5, hyper_strength=0.3)
    batch = evaluate(f, m, v, lam, cfg, (1.0, 1.5, 2.0), per_pair=True, **masks).terms
    assert all(t.shape == (B,) for t in batch)
    for b in range(B):
        one = evaluate(f[b:b + 1], m[b:b + 1], v[b:b + 1], lam[b:b + 1], cfg, (1.0, 1.5, 2.0),
                       **{k: t[b:b + 1] for k, t in masks.items()}).terms
        for name, t in zip(one._fields, one):
            assert float(getattr(batch, name)[b]) == pytest.approx(float(t), rel=1e-10, abs=1e-12), name
    if not masked:
        whole = evaluate(f, m, v, lam, cfg, (1.0, 1.5, 2.0)).terms
        for name, t in zip(whole._fields, whole):
            assert float(getattr(batch, name).mean()) == pytest.approx(float(t), rel=1e-10, abs=1e-12), name


def test_control_spacing_refuses_lists_of_other_lengths():
    """``zip`` would have cut the longer list silently: a 3D spacing with a 2D grid gave 2 values."""
    from hybridreg.objective import control_spacing

    assert control_spacing((2.0, 1.0, 1.0), (10, 20, 30), (5, 10, 10)) == (4.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="control_spacing.*one value per axis"):
        control_spacing((1.0, 1.0, 1.0), (10, 20), (5, 10))
    with pytest.raises(ValueError, match="control_spacing"):
        control_spacing((1.0, 1.0), (10, 20), (0, 10))
