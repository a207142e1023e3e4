"""The registration figure's slices in one anatomical layout, whatever order and signs a file
stores its axes in (hybridreg.figures)."""

import numpy as np
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
