"""Affine pre-alignment (hybridreg.affine): the voxel map against SimpleITK's own index/point
conversions, exported composites applied by SimpleITK, inverse composites, transform files,
bad input, and recovery of a known similarity transform across grids on bundled brains."""

import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from hybridreg import data
from hybridreg.affine import (
    _check_det,
    align,
    composite,
    inverse_composite,
    voxel_map,
    write_affine,
    write_transform,
)
from hybridreg.io import Geometry


def signed_permutation(rng, d):
    return (np.eye(d)[rng.permutation(d)] * rng.choice([-1.0, 1.0], d)).ravel().tolist()


def oblique(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q.ravel().tolist()


def grid(size, spacing, direction, origin):
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection(direction)
    img.SetOrigin([float(o) for o in origin])
    return img


def random_affine(rng, d, kind):
    if kind == "affine":
        tx = sitk.AffineTransform(d)
        tx.SetMatrix((np.eye(d) + 0.2 * rng.normal(size=(d, d))).ravel().tolist())
        tx.SetTranslation(rng.normal(0, 10, d).tolist())
    elif d == 3:
        tx = sitk.Similarity3DTransform()
        tx.SetRotation(rng.normal(size=3).tolist(), 0.4)
        tx.SetScale(1.1)
        tx.SetTranslation(rng.normal(0, 10, d).tolist())
    else:
        tx = sitk.Euler2DTransform()
        tx.SetAngle(0.4)
        tx.SetTranslation(rng.normal(0, 10, d).tolist())
    tx.SetCenter(rng.normal(0, 20, d).tolist())
    return tx


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kind", ["affine", "rigid"])
def test_voxel_map_matches_sitk(d, kind):
    rng = np.random.default_rng(d)
    for trial in range(4):  # anisotropic spacings, permuted/flipped axes (and oblique MOVING axes)
        fixed_dir, moving_dir = signed_permutation(rng, d), signed_permutation(rng, d) if trial % 2 else oblique(rng, d)
        fixed = grid(rng.integers(5, 30, d), rng.uniform(0.4, 3.0, d), fixed_dir, rng.uniform(-90, 90, d))
        moving = grid(rng.integers(5, 30, d), rng.uniform(0.4, 3.0, d), moving_dir, rng.uniform(-90, 90, d))
        tx = random_affine(rng, d, kind)
        m = voxel_map(Geometry.of(fixed), Geometry.of(moving), tx)
        assert m.shape == (d, d + 1) and m.dtype == np.float64
        for i in rng.uniform(-5, 35, (25, d)):  # array order (z, y, x); sitk takes ITK order
            p = fixed.TransformContinuousIndexToPhysicalPoint(i[::-1].tolist())
            j = np.array(moving.TransformPhysicalPointToContinuousIndex(tx.TransformPoint(p)))[::-1]
            np.testing.assert_allclose(m[:, :d] @ i + m[:, d], j, atol=1e-9, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
def test_voxel_map_samples_like_sitk_resample(d):
    """What the core does with the map (linear sampling of MOVING on its own grid) equals
    ``sitk.Resample(moving, fixed, transform)``."""
    rng = np.random.default_rng(10 + d)
    fixed = grid(rng.integers(8, 16, d), rng.uniform(0.8, 2.0, d), signed_permutation(rng, d), rng.uniform(-9, 9, d))
    tx = random_affine(rng, d, "affine")
    tx.SetTranslation([0.0] * d)
    size = rng.integers(10, 20, d)
    spacing = rng.uniform(0.8, 2.0, d)
    moving_dir = np.asarray(signed_permutation(rng, d)).reshape(d, d)
    middle = ((np.asarray(fixed.GetSize()) - 1) / 2).tolist()
    centre = np.asarray(tx.TransformPoint(fixed.TransformContinuousIndexToPhysicalPoint(middle)))  # MOVING is centred there
    moving = sitk.GetImageFromArray(rng.normal(size=size[::-1]).astype(np.float32))
    moving.SetSpacing(spacing.tolist())
    moving.SetDirection(moving_dir.ravel().tolist())
    moving.SetOrigin((centre - moving_dir @ (spacing * (size - 1) / 2)).tolist())
    m = voxel_map(Geometry.of(fixed), Geometry.of(moving), tx)
    idx = np.indices(Geometry.of(fixed).shape).reshape(d, -1).astype(float)
    j = m[:, :d] @ idx + m[:, d:]
    ours = ndimage.map_coordinates(sitk.GetArrayFromImage(moving), j, order=1).reshape(Geometry.of(fixed).shape)
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0))
    inside = np.all((j >= 0) & (j <= size[::-1, None] - 1), axis=0).reshape(theirs.shape)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-5)


def test_voxel_map_rejects_non_affine():
    field = sitk.Image([8, 8, 8], sitk.sitkVectorFloat64)
    arr = sitk.GetArrayFromImage(field)
    arr[..., 0] = np.sin(np.arange(8))[:, None, None]
    field = sitk.GetImageFromArray(arr, isVector=True)
    g = Geometry.of(field)
    with pytest.raises(ValueError, match="not an affine"):
        voxel_map(g, g, sitk.DisplacementFieldTransform(field))


# ----------------------------------------------------------------------------- composites

def smooth_field(fixed: sitk.Image, amplitude=1.5) -> sitk.Image:
    """A smooth displacement field (mm) on ``fixed``'s grid, |D| <= amplitude * sqrt(3)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in fixed.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    a = np.asarray(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    p = idx @ a.T + np.asarray(fixed.GetOrigin())  # physical points, ITK (x, y, z)
    k = 2 * np.pi / 40.0
    x, y, z = p.T
    d = amplitude * np.stack([np.sin(k * y + 0.3), np.cos(k * z) * np.sin(k * x), np.sin(k * (x + z))], -1)
    arr = d.reshape(*fixed.GetSize(), 3).transpose(2, 1, 0, 3)  # -> array order (z, y, x, component)
    field = sitk.GetImageFromArray(arr.astype(np.float64), isVector=True)
    field.CopyInformation(fixed)
    return field


@pytest.fixture(scope="module")
def setting():
    direction = [0.0, 0.0, -1.0, 0.96, 0.28, 0.0, -0.28, 0.96, 0.0]  # permuted, flipped and oblique
    fixed = grid([24, 24, 24], [2.0, 1.8, 2.2], direction, [30.0, -20.0, 25.0])
    affine = sitk.AffineTransform(3)
    shear = np.array([[0.05, 0.1, 0.0], [-0.08, -0.03, 0.02], [0.01, 0.0, 0.06]])
    affine.SetMatrix((np.eye(3) + shear).ravel().tolist())
    affine.SetTranslation([4.0, -3.0, 2.0])
    affine.SetCenter([5.0, 0.0, -5.0])
    return fixed, affine, smooth_field(fixed)


def test_composite_resamples_as_the_explicit_point_map(setting):
    fixed, affine, field = setting
    # a smooth moving image on another grid, covering where the fixed grid maps
    corners = np.array([affine.TransformPoint(fixed.TransformIndexToPhysicalPoint([23 * b for b in bits]))
                        for bits in np.ndindex(2, 2, 2)])
    lo, hi = corners.min(0) - 4.0, corners.max(0) + 4.0  # margin for |D| <= 2.6 mm
    spacing = np.array([1.5, 1.6, 1.4])
    size = np.ceil((hi - lo) / spacing).astype(int) + 1
    z, y, x = np.mgrid[: size[2], : size[1], : size[0]]
    moving = sitk.GetImageFromArray((np.sin(0.2 * z) + np.cos(0.15 * y + 0.1 * x)).astype(np.float32))
    moving.SetSpacing(spacing.tolist())
    moving.SetDirection([1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0])  # y flipped: the origin is at the top
    moving.SetOrigin([lo[0], hi[1], lo[2]])
    tx = composite(affine, field)
    assert tx.GetNumberOfTransforms() == 2
    got = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, -99.0))
    # the explicit map p -> affine(p + D(p)), as one displacement field E(p) = affine(p + D(p)) - p
    f_arr = sitk.GetArrayFromImage(field)
    explicit = np.zeros_like(f_arr)
    for i in np.ndindex(*fixed.GetSize()[::-1]):
        p = np.asarray(fixed.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]))
        explicit[i] = np.asarray(affine.TransformPoint((p + f_arr[i]).tolist())) - p
    e = sitk.GetImageFromArray(explicit, isVector=True)
    e.CopyInformation(fixed)
    want = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(e), sitk.sitkLinear, -99))
    inside = want > -99
    assert inside.mean() > 0.99
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.array_equal(got > -99, inside)


def test_composite_reproduces_the_core_warp_through_the_voxel_map(setting):
    """The exported transform applies what the torch core does: ``warp(moving, u, voxel_map=M)``
    samples MOVING (on its own grid) at ``M (i + u(i))``; SimpleITK, given ``composite(affine,
    D)`` with ``D`` the same displacement in mm, samples it at ``affine(p + D(p))``."""
    torch = pytest.importorskip("torch")
    from hybridreg.io import displacement_from_itk
    from hybridreg.spatial import warp

    fixed, affine, field = setting
    moving = grid([30, 26, 34], [1.7, 1.9, 1.5], signed_permutation(np.random.default_rng(5), 3), [0.0, 0.0, 0.0])
    middle = ((np.asarray(moving.GetSize()) - 1) / 2).tolist()
    target = np.asarray(affine.TransformPoint(fixed.TransformContinuousIndexToPhysicalPoint([11.5] * 3)))
    moving.SetOrigin((target - np.asarray(moving.TransformContinuousIndexToPhysicalPoint(middle))).tolist())
    z, y, x = np.mgrid[:34, :26, :30]
    values = sitk.GetImageFromArray((np.sin(0.3 * z) * np.cos(0.2 * y) + 0.1 * x).astype(np.float64))
    values.CopyInformation(moving)
    u, geo = displacement_from_itk(field)
    m = voxel_map(geo, Geometry.of(values), affine)
    ours = warp(torch.from_numpy(sitk.GetArrayFromImage(values))[None, None], torch.from_numpy(u)[None],
                voxel_map=torch.from_numpy(m)[None])[0, 0].numpy()
    theirs = sitk.GetArrayFromImage(sitk.Resample(values, fixed, composite(affine, field), sitk.sitkLinear, 0.0))
    j = m[:, :3] @ (np.indices(geo.shape).reshape(3, -1) + u.reshape(3, -1)) + m[:, 3:]
    inside = np.all((j >= 0) & (j <= np.asarray(values.GetSize()[::-1])[:, None] - 1), axis=0)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours.ravel()[inside], theirs.ravel()[inside], atol=1e-6)


def numerical_inverse(field: sitk.Image, iterations=30) -> sitk.Image:
    """Dinv on the same grid with Dinv(p) = -D(p + Dinv(p)) (fixed-point iteration; D linearly interpolated)."""
    inv = sitk.Image(field.GetSize(), sitk.sitkVectorFloat64)
    inv.CopyInformation(field)
    for _ in range(iterations):
        shifted = sitk.Resample(field, field, sitk.DisplacementFieldTransform(sitk.Image(inv)), sitk.sitkLinear, 0.0)
        inv = sitk.GetImageFromArray(-sitk.GetArrayFromImage(shifted), isVector=True)
        inv.CopyInformation(field)
    return inv


def test_inverse_composite_inverts_the_forward(setting):
    fixed, affine, field = setting
    forward, backward = composite(affine, field), inverse_composite(affine, numerical_inverse(field))
    rng = np.random.default_rng(0)
    errs = []
    for i in rng.uniform(4, 19, (300, 3)):  # inside the grid, away from its border
        p = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(i.tolist()))
        errs.append(np.linalg.norm(np.asarray(backward.TransformPoint(forward.TransformPoint(p.tolist()))) - p))
        moved = np.linalg.norm(np.asarray(forward.TransformPoint(p.tolist())) - p)
        assert moved > 1.0  # the test is not trivial
    assert max(errs) < 0.1, max(errs)


def test_transform_files_round_trip(setting, tmp_path):
    fixed, affine, field = setting
    rng = np.random.default_rng(1)
    points = [fixed.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in rng.uniform(0, 23, (50, 3))]
    write_affine(tmp_path / "affine.mat", affine)
    back = sitk.ReadTransform(str(tmp_path / "affine.mat"))
    assert "AffineTransform" in back.GetName()
    for p in points:
        np.testing.assert_allclose(back.TransformPoint(p), affine.TransformPoint(p), atol=1e-9)
    for tx in (composite(affine, field), inverse_composite(affine, field)):
        write_transform(tmp_path / "composite.h5", tx)
        back = sitk.ReadTransform(str(tmp_path / "composite.h5"))
        for p in points:
            np.testing.assert_allclose(back.TransformPoint(p), tx.TransformPoint(p), atol=1e-9)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["affine.mat", "composite.h5"]  # no temporary files left


# ----------------------------------------------------------------------------- align

def rms(errors) -> float:
    return float(np.sqrt(np.mean(np.square(errors))))


def blob_image(size=(64, 56), spacing=(1.0, 1.0), origin=(0.0, 0.0), values=(1.0, 1.5, 0.7)):
    """A 2D asymmetric blob phantom (ellipse with two inner structures of contrasts ``values``)."""
    y, x = np.mgrid[: size[1], : size[0]].astype(float)
    c = np.array(size, float) / 2
    img = (((x - c[0]) / 20) ** 2 + ((y - c[1]) / 14) ** 2 < 1) * values[0]
    img += (((x - c[0] - 8) / 5) ** 2 + ((y - c[1] + 3) / 4) ** 2 < 1) * values[1]
    img += (((x - c[0] + 9) / 3) ** 2 + ((y - c[1] - 5) / 6) ** 2 < 1) * values[2]
    out = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(img.astype(np.float32)), 1.0)
    out.SetSpacing(spacing)
    out.SetOrigin(origin)
    return out


def test_align_2d_rigid_and_affine_recover_a_rotation():
    fixed = blob_image()
    truth = sitk.Euler2DTransform([32.0, 28.0], 0.25, [3.0, -2.0])  # moving = fixed seen through truth⁻¹
    other_grid = grid([70, 60], [0.9, 1.1], [0.0, 1.0, -1.0, 0.0], [-5.0, 60.0])  # axes swapped, one flipped
    moving = sitk.Resample(fixed, other_grid, truth, sitk.sitkLinear, 0.0)
    masks = dict(fixed_mask=sitk.Cast(fixed > 0.05, sitk.sitkUInt8), moving_mask=sitk.Cast(moving > 0.05, sitk.sitkUInt8))
    pts = [fixed.TransformIndexToPhysicalPoint(i) for i in np.argwhere(sitk.GetArrayFromImage(fixed).T > 0.5)[::7].tolist()]
    for kind, options in (("rigid", {}), ("affine", {}), ("affine", masks)):
        res = align(fixed, moving, kind=kind, metric="ncc", levels_mm=(4.0, 2.0, 1.0), **options)
        err = [np.linalg.norm(np.asarray(truth.TransformPoint(res.transform.TransformPoint(p))) - p) for p in pts]
        assert rms(err) < 0.3, (kind, rms(err))
        info = res.to_dict()
        assert info["kind"] == kind and len(info["matrix"]) == 2 and set(res.seconds) >= {"init", "rigid"}
        assert np.isfinite(info["metric_value"])
    again = align(fixed, moving, kind=kind, metric="ncc", levels_mm=(4.0, 2.0, 1.0), **options)
    assert again.matrix == res.matrix and again.translation == res.translation  # seeded sampling: deterministic


def test_align_mutual_information_recovers_a_rotation_across_contrasts():
    fixed, other_contrast = blob_image(), blob_image(values=(2.0, -1.6, 0.5))  # no linear map between them
    truth = sitk.Euler2DTransform([32.0, 28.0], 0.2, [2.0, 3.0])
    moving = sitk.Resample(other_contrast, fixed, truth, sitk.sitkLinear, 0.0)
    pts = [fixed.TransformIndexToPhysicalPoint(i) for i in np.argwhere(sitk.GetArrayFromImage(fixed).T > 0.5)[::7].tolist()]
    res = align(fixed, moving, kind="rigid", metric="mi", levels_mm=(4.0, 2.0, 1.0), samples=4000)
    err = [np.linalg.norm(np.asarray(truth.TransformPoint(res.transform.TransformPoint(p))) - p) for p in pts]
    assert rms(err) < 0.6, rms(err)  # correlation: 0.76 mm
    assert res.to_dict()["metric"] == "mi"


def test_moments_start_weighs_the_intensity_above_the_background_inside_the_masks():
    """``init="moments"``: the centre of mass of the intensity above each image's lowest value,
    inside its mask: a background of 30 (a no-data fill) over a large grid does not pull the
    centre to the grid's, nor does a bright corner outside the mask."""
    fixed = blob_image()
    shift = sitk.TranslationTransform(2, (6.0, -4.0))
    big = grid([120, 110], [1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [-40.0, -30.0])  # the blob off the grid's centre
    moving = sitk.Resample(fixed, big, shift, sitk.sitkLinear, 0.0) + 30.0
    arr = sitk.GetArrayFromImage(moving)
    arr[:10, :10] = 500.0  # bright, and outside the mask
    bright = sitk.GetImageFromArray(arr)
    bright.CopyInformation(moving)
    mask = sitk.Cast(moving > 30.05, sitk.sitkUInt8)
    for image, options in ((moving, {}), (bright, {"moving_mask": mask})):
        res = align(fixed, image, kind="rigid", init="moments", levels_mm=(4.0, 2.0, 1.0), iterations=0, **options)
        assert np.allclose(res.translation, [-6.0, 4.0], atol=0.3), res.translation  # fixed points to moving ones


def test_align_threads_follow_torch_with_correlation_and_stay_one_with_mutual_information(monkeypatch):
    """The default ``threads``: torch's thread count for ncc (ITK adds its per-thread sums in a
    fixed order: the same transform run after run, and next to one thread's), one for mi."""
    fixed = blob_image(size=(96, 88))
    moving = sitk.Resample(fixed, fixed, sitk.Euler2DTransform([48.0, 44.0], 0.15, [2.0, -1.0]), sitk.sitkLinear, 0.0)
    used, real = [], sitk.ProcessObject.SetGlobalDefaultNumberOfThreads
    monkeypatch.setattr(sitk.ProcessObject, "SetGlobalDefaultNumberOfThreads",
                        staticmethod(lambda n: (used.append(n), real(n))[1]))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    run = dict(kind="affine", levels_mm=(4.0, 2.0, 1.0))
    threaded = [align(fixed, moving, metric="ncc", **run) for _ in range(2)]
    assert used[0::2] == [3] * 4  # rigid and affine, twice; every other call restores ITK's default
    assert threaded[0].threads == 3 and threaded[0].to_dict()["threads"] == 3  # metrics.json records it
    assert threaded[0].matrix == threaded[1].matrix and threaded[0].translation == threaded[1].translation
    one = align(fixed, moving, metric="ncc", threads=1, **run)
    np.testing.assert_allclose(threaded[0].matrix, one.matrix, atol=1e-5)
    np.testing.assert_allclose(threaded[0].translation, one.translation, atol=1e-4)
    used.clear()
    assert align(fixed, moving, metric="mi", samples=4000, **run).threads == 1
    assert used[0::2] == [1, 1]


def test_align_none_and_bad_input():
    fixed = blob_image()
    res = align(fixed, fixed, kind="none")
    assert res.matrix == [[1.0, 0.0], [0.0, 1.0]] and res.translation == [0.0, 0.0]
    mask = sitk.Cast(fixed > 0.5, sitk.sitkUInt8)
    with pytest.raises(ValueError, match="`--fixed-mask` must be on FIXED's grid"):
        align(fixed, fixed, fixed_mask=sitk.Cast(blob_image(spacing=(1.0, 2.0)) > 0.5, sitk.sitkUInt8))
    with pytest.raises(ValueError, match="`--moving-mask` is empty"):
        align(fixed, fixed, fixed_mask=mask, moving_mask=mask * 0)
    with pytest.raises(ValueError, match="`--moving-mask` must be a binary mask"):
        align(fixed, fixed, moving_mask=mask * 2)
    with pytest.raises(ValueError, match="`kind`"):
        align(fixed, fixed, kind="bspline")
    with pytest.raises(ValueError, match="`threads` must be a positive integer"):
        align(fixed, fixed, threads=0)
    with pytest.raises(ValueError, match="`FIXED` and `MOVING` do not overlap"):
        align(fixed, blob_image(size=(8, 8)))  # a far smaller field of view
    with pytest.raises(ValueError, match=r"the affine stage failed \(singular matrix\)"):
        _check_det(sitk.AffineTransform([1.0, 0.0, 0.0, 0.1], [0.0, 0.0]), ("FIXED", "MOVING"))


def moved_copy(image: sitk.Image, labels: sitk.Image, truth: sitk.Transform, spacing=(2.4, 2.0, 3.0)):
    """``image`` seen through ``truth⁻¹`` on a new grid (anisotropic ``spacing``, permuted and
    flipped axes) that covers it: the moved image at q shows the original at truth(q)."""
    direction = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    spacing = np.asarray(spacing, float)
    inv = truth.GetInverse()
    corners = [image.TransformIndexToPhysicalPoint([int(c * (n - 1)) for c, n in zip(bits, image.GetSize())])
               for bits in np.ndindex(2, 2, 2)]
    local = np.array([direction.T @ np.asarray(inv.TransformPoint(c)) for c in corners])  # in the new axes
    lo, hi = local.min(0) - 6.0, local.max(0) + 6.0
    ref = grid(np.ceil((hi - lo) / spacing).astype(int) + 1, spacing, direction.ravel().tolist(), direction @ lo)
    moved = sitk.Resample(image, ref, truth, sitk.sitkLinear, 0.0)
    return moved, sitk.Resample(labels, ref, truth, sitk.sitkNearestNeighbor, 0)


@pytest.mark.slow
@pytest.mark.parametrize("subject", ["synthseg_16", "vxm", "synthseg_17"])
def test_align_recovers_a_similarity_across_grids(subject):
    s = data.load_subject(subject, 2)
    fixed, labels = sitk.ReadImage(str(s.image_path), sitk.sitkFloat32), sitk.ReadImage(str(s.labels_path))
    brain = np.argwhere(sitk.GetArrayFromImage(labels).T > 0)  # ITK index order
    center = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(brain.mean(0).tolist()))
    truth = sitk.Similarity3DTransform()
    truth.SetCenter(center.tolist())
    truth.SetRotation([1.0, 0.4, -0.3], np.deg2rad(12.0))
    truth.SetScale(1.05)
    truth.SetTranslation([10.0, -8.0, 6.0])
    moving, moving_labels = moved_copy(fixed, labels, truth)
    assert moving.GetSize() != fixed.GetSize()
    t0 = time.perf_counter()
    res = align(fixed, moving, kind="affine")
    seconds = time.perf_counter() - t0
    pts = [fixed.TransformIndexToPhysicalPoint(i) for i in brain[::50].tolist()]
    before = [np.linalg.norm(np.asarray(truth.TransformPoint(p)) - p) for p in pts]
    after = [np.linalg.norm(np.asarray(truth.TransformPoint(res.transform.TransformPoint(p))) - p) for p in pts]
    print(f"{subject}: RMS {rms(before):.2f} mm -> {rms(after):.3f} mm in {seconds:.1f} s {res.seconds}")
    assert rms(after) <= 1.0
    # the moved labels pulled back through the recovered transform overlap the originals as well
    # as through the true one (both lose a little to nearest-neighbour resampling on the coarse grid)
    def brain_dice(tx):
        back = sitk.GetArrayFromImage(sitk.Resample(moving_labels, fixed, tx, sitk.sitkNearestNeighbor, 0)) > 0
        a = sitk.GetArrayFromImage(labels) > 0
        return 2 * (a & back).sum() / (a.sum() + back.sum())

    assert brain_dice(res.transform) > brain_dice(truth.GetInverse()) - 0.005 > 0.9
    if subject == "vxm":  # bit-reproducible (seeded sampling, a fixed thread count)
        again = align(fixed, moving, kind="affine")
        assert again.matrix == res.matrix and again.translation == res.translation


def test_transform_of_voxel_map_inverts_voxel_map():
    """The physical affine rebuilt from a voxel map maps points as the original transform does
    (grids with permuted, flipped axes and anisotropic spacing; a sheared, centred affine)."""
    from hybridreg.affine import transform_of_voxel_map, voxel_map
    from hybridreg.io import Geometry

    f = Geometry(size=(10, 12, 8), spacing=(1.5, 2.0, 3.0), origin=(10.0, -5.0, 2.5), direction=(0, -1, 0, 1, 0, 0, 0, 0, 1))
    m = Geometry(size=(9, 11, 7), spacing=(1.0, 1.2, 2.0), origin=(-3.0, 4.0, 1.0), direction=(1, 0, 0, 0, 0, 1, 0, -1, 0))
    tx = sitk.AffineTransform(3)
    tx.SetMatrix([1.1, 0.1, 0.0, -0.05, 0.9, 0.2, 0.0, 0.1, 1.05])
    tx.SetTranslation((3.0, -2.0, 5.0))
    tx.SetCenter((1.0, 2.0, 3.0))
    back = transform_of_voxel_map(f, m, voxel_map(f, m, tx))
    for p in [(4.0, 5.0, -6.0), (0.0, 0.0, 0.0), (-20.0, 13.0, 7.5)]:
        assert np.allclose(back.TransformPoint(p), tx.TransformPoint(p), atol=1e-9)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        transform_of_voxel_map(f, m, np.eye(3))


def test_a_small_moving_mask_inside_the_overlap_is_accepted_and_one_outside_refused():
    """Every FIXED foreground voxel is tried against a MOVING mask: a 3×3×3 mask anywhere inside
    the overlap is accepted (a subsample of the foreground stepped over some positions and refused
    them); a mask that FIXED's foreground misses is refused, after the overlap checks."""
    rng = np.random.default_rng(0)
    fixed = sitk.GetImageFromArray(rng.uniform(1, 2, (80, 80, 80)).astype(np.float32))
    moving = sitk.Image(fixed)
    for corner in rng.integers(1, 76, (40, 3)):
        mask = np.zeros((80, 80, 80), np.uint8)
        mask[tuple(slice(c, c + 3) for c in corner)] = 1
        m = sitk.GetImageFromArray(mask)
        align(fixed, moving, kind="none", moving_mask=m)  # no error
    fg_mask = np.zeros((80, 80, 80), np.uint8)
    fg_mask[:10, :10, :10] = 1
    mask = np.zeros((80, 80, 80), np.uint8)
    mask[70:, 70:, 70:] = 1
    with pytest.raises(ValueError, match="`--moving-mask` leaves nothing to match"):
        align(fixed, moving, kind="none", fixed_mask=sitk.GetImageFromArray(fg_mask), moving_mask=sitk.GetImageFromArray(mask))
    far = sitk.Image(moving)
    far.SetOrigin((1000.0, 0.0, 0.0))
    everywhere = sitk.GetImageFromArray(np.ones((80, 80, 80), np.uint8))
    everywhere.CopyInformation(far)
    with pytest.raises(ValueError, match="do not overlap"):  # the overlap is named first, not the mask
        align(fixed, far, kind="none", moving_mask=everywhere)


def _head_and_neck():
    """The bundled demo FIXED at 2 mm inside a 240×240×300 mm field of view reaching 200 mm below the
    brain's centre, with a neck of tissue below the brain, and its brain mask (0/1) on that grid."""
    fid, _ = data.demo_pair()
    brain = sitk.ReadImage(str(data.load_subject(fid, 2).image_path), sitk.sitkFloat32)
    centre = np.array(brain.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in brain.GetSize()]))
    size = np.array([120, 120, 150])
    origin = centre - 2.0 * (size - 1) / 2
    origin[2] = centre[2] - 200.0
    big = grid(size, [2.0] * 3, np.eye(3).ravel().tolist(), origin)
    arr = sitk.GetArrayFromImage(sitk.Resample(brain, big, sitk.Transform(), sitk.sitkLinear, 0.0))
    mask = arr > 5
    z, y, x = np.mgrid[0:size[2], 0:size[1], 0:size[0]]
    neck = ((x - 60) ** 2 + (y - 60) ** 2 < 22 ** 2) & (z < 60) & ~mask
    arr[neck] = 70.0 + np.random.default_rng(0).normal(0, 3, int(neck.sum()))
    image, m = sitk.GetImageFromArray(arr), sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(big)
    m.CopyInformation(big)
    return image, m, brain


def test_a_masked_start_centres_the_masks_not_the_fields_of_view(monkeypatch):
    """With a brain mask on a head-and-neck scan, ``init="geometry"`` started from the centre of the
    field of view, 100 mm below the brain's: with the mask on FIXED the affine stage collapsed (det
    0.23, exit 0), with it on MOVING it ran off (131 and 157 mm, nothing left to match). The start from
    the masks' bounding boxes is now tried too, and kept where it matches better; an ROI mask on one of
    two scans of the same field of view keeps the start from the images' centres (the box start alone
    moved it 40 mm); and a stage that runs off is reported, not returned."""
    import hybridreg.affine as affine

    big, mask, brain = _head_and_neck()
    _, mid = data.demo_pair()
    other = sitk.ReadImage(str(data.load_subject(mid, 2).image_path), sitk.sitkFloat32)
    for options, pair in (({"fixed_mask": mask}, (big, other)), ({"moving_mask": mask}, (other, big))):
        res = align(*pair, **options)
        det = float(np.linalg.det(np.reshape(res.transform.GetMatrix(), (3, 3))))
        assert 0.8 < det < 1.3 and np.linalg.norm(res.transform.GetTranslation()) < 10.0, (options.keys(), det, res.translation)
    fixed = sitk.ReadImage(str(data.load_subject(data.demo_pair()[0], 2).image_path), sitk.sitkFloat32)
    for corner, side in (((40, 40, 30), "fixed_mask"), ((70, 20, 30), "fixed_mask"), ((40, 40, 30), "moving_mask")):
        roi = np.zeros(fixed.GetSize()[::-1], np.uint8)
        roi[tuple(slice(c, c + 12) for c in corner)] = 1  # a 24 mm cube off the brain's centre, on one scan
        roi_mask = sitk.GetImageFromArray(roi)
        roi_mask.CopyInformation(fixed)
        pair = (fixed, other) if side == "fixed_mask" else (other, fixed)
        res = align(*pair, kind="rigid", levels_mm=(8.0, 4.0), **{side: roi_mask})
        assert np.linalg.norm(res.transform.GetTranslation()) < 10.0, (corner, side, res.translation)
    # the start of before, from the centre of the field of view: the stage runs off, and says so
    monkeypatch.setattr(affine, "_box_centre", lambda image, m: np.asarray(
        image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])))
    with pytest.raises(ValueError, match=r"the affine stage failed: .* of FIXED's foreground maps onto `--moving-mask`"
                                         r" after it, against .* at its start \(init='geometry'\)"):
        align(other, big, moving_mask=mask)
