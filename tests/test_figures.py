"""The registration figure's slices in one anatomical layout, whatever order and signs a file
stores its axes in (hybridreg.figures)."""

import numpy as np
import pytest
import SimpleITK as sitk

from hybridreg.figures import display_orientation, for_display, registration_figure
from hybridreg.io import Geometry


def _variants():
    """One volume on an identity-direction (LPS) grid, and the same image stored with its axes
    permuted and flipped by SimpleITK (physical space unchanged, the direction updated)."""
    rng = np.random.default_rng(0)
    ref = sitk.GetImageFromArray(rng.random((5, 6, 7)).astype(np.float32))
    ref.SetSpacing((1.0, 1.5, 2.0))
    out = [ref]
    for order, flip in (([0, 1, 2], [True, False, False]), ([2, 0, 1], [False, True, True]), ([1, 2, 0], [True, True, False])):
        out.append(sitk.Flip(sitk.PermuteAxes(ref, order), flip, flipAboutOrigin=False))
    return out


def test_identity_grid_is_shown_superior_up():
    assert display_orientation((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), 3) == ((0, 1, 2), (True, False, False))
    assert display_orientation(None, 3) == ((0, 1, 2), (False, False, False))
    assert display_orientation((1.0, 0.0, 0.0, 1.0), 2) == ((0, 1), (False, False))


def test_every_storage_order_gives_the_same_slices_and_displacement():
    t = np.array([0.3, -0.7, 1.1])  # a constant physical displacement, LPS mm
    shown = []
    for img in _variants():
        geo = Geometry.of(img)
        arr = sitk.GetArrayFromImage(img)
        D = np.asarray(geo.direction).reshape(3, 3)
        # voxel units per array axis a (ITK axis 2 - a): the component along that axis over its spacing
        disp = np.stack([np.full(arr.shape, D[:, 2 - a] @ t / geo.spacing[2 - a]) for a in range(3)])
        (vol,), u, spacing = for_display(geo.direction, [arr], disp, geo.array_spacing)
        shown.append((vol, u * np.asarray(spacing)[:, None, None, None], spacing))
    for vol, u_mm, spacing in shown:
        np.testing.assert_array_equal(vol, shown[0][0])
        assert spacing == [2.0, 1.5, 1.0]
        # display axes run inferior-wards, posterior-wards and left-wards
        np.testing.assert_allclose(u_mm[:, 0, 0, 0], [-t[2], t[1], t[0]], atol=1e-12)


def test_the_figure_is_written_for_a_permuted_grid(tmp_path):
    img = _variants()[2]
    arr = sitk.GetArrayFromImage(img)
    geo = Geometry.of(img)
    path = tmp_path / "figure.png"
    registration_figure(path, arr, arr, arr, np.ones_like(arr), np.zeros((3,) + arr.shape), np.ones_like(arr),
                        geo.array_spacing, direction=geo.direction)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_grid_without_a_nearest_axis_permutation_keeps_the_array_order():
    direction = (0.7071, 0.7071, 0.0, 0.7071, 0.7071, 0.0, 0.0, 0.0, 1.0)
    assert display_orientation(direction, 3) == ((0, 1, 2), (False, False, False))


def test_centre_slices_are_the_displayed_volumes_slices_through_the_centre_voxel():
    """For every axis permutation and sign, each slice equals the displayed volume's slice through the array's
    centre voxel (``n // 2``), and the axial one shows anterior up and the patient's right on the left."""
    import itertools

    from hybridreg.figures import centre_slices, oriented_slices

    rng = np.random.default_rng(1)
    vol = rng.random((5, 6, 7))
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            D = np.zeros((3, 3))
            for i, p in enumerate(order):
                D[p, i] = signs[i]
            perm, flips = display_orientation(D.ravel(), 3)
            shown = np.flip(vol.transpose(perm), [a for a, f in enumerate(flips) if f])
            got = centre_slices(vol, D.ravel())
            for b in range(3):
                k = vol.shape[perm[b]] // 2
                np.testing.assert_array_equal(got[b], np.take(shown, shown.shape[b] - 1 - k if flips[b] else k, axis=b))
    # physical LPS coordinates as values on an RAS-stored grid (x → R, y → A, z → S): the axial slice's top-left
    # voxel is the most anterior and most right-hand one
    img = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.float32))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    arr = sitk.GetArrayFromImage(img)
    x, y = (np.zeros_like(arr) for _ in range(2))
    for idx in np.ndindex(arr.shape):
        p = img.TransformIndexToPhysicalPoint(tuple(int(i) for i in reversed(idx)))
        x[idx], y[idx] = p[0], p[1]
    ax_x, ax_y = (centre_slices(v, img.GetDirection())[0] for v in (x, y))
    assert ax_x[0, 0] == x.min() and ax_y[0, 0] == y.min()  # LPS: the smallest x is right, the smallest y anterior
    with pytest.raises(ValueError, match="slices"):
        oriented_slices([vol[0], vol[:, 0]], None)


def test_a_2d_image_is_shown_as_an_axial_slice_whatever_its_storage_order(tmp_path):
    """A 2D slice stored with its rows running posterior → anterior (direction (1, 0, 0, -1)) was shown upside
    down against the 3D figure's axial row: every storage order now gives the same picture, anterior up and the
    patient's right on the left; the identity direction (a PNG) keeps the array order."""
    from hybridreg.figures import layout_note

    rng = np.random.default_rng(2)
    ref = sitk.GetImageFromArray(rng.random((6, 7)).astype(np.float32))
    variants = [ref] + [sitk.Flip(sitk.PermuteAxes(ref, order), flip, flipAboutOrigin=False)
                        for order, flip in (([0, 1], [False, True]), ([1, 0], [False, False]), ([1, 0], [True, True]))]
    shown = []
    for img in variants:
        geo = Geometry.of(img)
        (vol,), _, spacing = for_display(geo.direction, [sitk.GetArrayFromImage(img)], np.zeros((2, *img.GetSize()[::-1])),
                                         geo.array_spacing)
        shown.append(vol)
    for vol in shown[1:]:
        np.testing.assert_array_equal(vol, shown[0])
    assert display_orientation((1.0, 0.0, 0.0, -1.0), 2) == ((0, 1), (True, False))
    assert layout_note((1.0, 0.0, 0.0, -1.0), 2).startswith("as an axial slice: anterior up")
    assert layout_note((0.7071, 0.7071, 0.7071, -0.7071), 2) == "array order (an oblique grid)"
    assert layout_note(None, 3) == "array order" and layout_note(np.eye(3).ravel(), 3).startswith("radiological")
    arr = shown[0]
    registration_figure(tmp_path / "f.png", arr, arr, arr, np.ones_like(arr), np.zeros((2,) + arr.shape),
                        np.full_like(arr, 3.0), (1.0, 1.0), direction=(1.0, 0.0, 0.0, -1.0), moving_title="moving, affine only")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
