"""Metrics against SimpleITK and brute force; I/O round trips; exported fields in SimpleITK."""

import gzip
import math
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial import cKDTree

from hybridreg.io import (
    Geometry,
    check_same_grid,
    displacement_from_itk,
    displacement_to_itk,
    read_displacement,
    read_image,
    read_labels,
    resample_with_field,
    write_displacement,
    write_image,
)
from hybridreg.metrics import dice, hausdorff, hd95, jacobian_stats, non_diffeomorphic_volume, score_registration
from hybridreg.spatial import scaling_and_squaring, warp


def balls(shape=(30, 32, 34), spacing=(1.0, 1.5, 2.0)):
    grid = np.stack(np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, spacing)], indexing="ij"))
    c = np.array([15.0, 24.0, 33.0]).reshape(3, 1, 1, 1)
    a = np.zeros(shape, np.int32)
    b = np.zeros(shape, np.int32)
    a[np.linalg.norm(grid - c, axis=0) < 9.0] = 1
    b[np.linalg.norm(grid - c - np.array([3.0, 0.0, 2.0]).reshape(3, 1, 1, 1), axis=0) < 8.0] = 1
    a[np.linalg.norm(grid - c - np.array([-7.0, 10.0, 0.0]).reshape(3, 1, 1, 1), axis=0) < 4.0] = 2
    b[np.linalg.norm(grid - c - np.array([-6.0, 11.0, 2.0]).reshape(3, 1, 1, 1), axis=0) < 4.0] = 2
    return a, b, spacing


def to_sitk(arr, spacing):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing[::-1])
    return img


def test_dice_matches_simpleitk():
    a, b, spacing = balls()
    ours = dice(a, b, [1, 2])
    for lab in (1, 2):
        f = sitk.LabelOverlapMeasuresImageFilter()
        f.Execute(to_sitk(a == lab, spacing), to_sitk(b == lab, spacing))
        assert ours[lab] == pytest.approx(f.GetDiceCoefficient(), abs=1e-12)


def test_hausdorff_max_matches_simpleitk():
    a, b, spacing = balls()
    ours = hausdorff(a, b, [1, 2], spacing, percentile=100)
    for lab in (1, 2):
        f = sitk.HausdorffDistanceImageFilter()
        f.Execute(to_sitk(a == lab, spacing), to_sitk(b == lab, spacing))
        assert ours[lab] == pytest.approx(f.GetHausdorffDistance(), abs=1e-4)


def test_hd95_matches_brute_force_surface_distances():
    a, b, spacing = balls()
    ours = hd95(a, b, [1, 2], spacing)
    for lab in (1, 2):
        pts = []
        for m in (a == lab, b == lab):
            contour = sitk.GetArrayFromImage(sitk.LabelContour(to_sitk(m, spacing), fullyConnected=False)) > 0
            pts.append(np.argwhere(contour) * np.array(spacing))
        dab = cKDTree(pts[1]).query(pts[0])[0]
        dba = cKDTree(pts[0]).query(pts[1])[0]
        expected = max(np.percentile(dab, 95), np.percentile(dba, 95))
        assert ours[lab] == pytest.approx(expected, abs=1e-4)


def test_a_structure_lost_after_warping_is_named_and_left_out_of_the_hd95_mean():
    """A label FIXED holds that the warped moving map no longer does scores Dice 0 (in the Dice
    mean) and HD95 inf: out of the HD95 mean, and named in ``hd95_lost``."""
    fixed = np.zeros((20, 20, 20), np.int32)
    fixed[4:10, 4:10, 4:10] = 1
    fixed[12:16, 12:16, 1:4] = 2
    moving = fixed.copy()
    disp = torch.zeros(1, 3, 20, 20, 20)
    disp[0, 2, 10:, 10:, :5] = -8.0  # label 2's voxels sample outside MOVING's grid: it is lost
    s = score_registration(fixed, moving, disp, [1, 2], spacing=(1.0, 1.0, 1.0), with_hd95=True)
    assert s["dice"][2] == 0.0 and s["dice_mean"] == pytest.approx(0.5)
    assert s["hd95"][2] == float("inf") and s["hd95_lost"] == [2]
    assert s["hd95_mean"] == pytest.approx(s["hd95"][1]) and np.isfinite(s["hd95_mean"])
    kept = score_registration(fixed, moving, torch.zeros_like(disp), [1, 2], with_hd95=True)
    assert kept["hd95_lost"] == [] and kept["hd95_mean"] == 0.0


def test_metrics_bad_input():
    a, b, _ = balls()
    with pytest.raises(ValueError, match="same shape"):
        dice(a, b[:-1])
    with pytest.raises(ValueError, match="non-integer"):
        dice(a + 0.5, b)
    with pytest.raises(ValueError, match="labels"):
        dice(a * 0, b)  # nothing in common


def test_jacobian_stats_of_known_maps():
    u = torch.zeros(1, 3, 10, 11, 12, dtype=torch.float64)
    s = jacobian_stats(u)
    assert s["folding_percent"] == 0.0 and s["sdlogj"] == pytest.approx(0.0, abs=1e-12)
    grid = torch.arange(10, dtype=torch.float64).view(10, 1, 1).expand(10, 11, 12)
    u[0, 0] = -2.0 * grid  # x -> -x: det = -1 everywhere
    assert jacobian_stats(u)["folding_percent"] == 100.0


def _ndv_brute_force(disp: np.ndarray) -> float:
    """NDV cell by cell: every simplex of both decompositions written out by its vertices
    (the 8 corner tetrahedra and the 2 central ones of a cube; the 4 corner triangles of a
    square), its signed volume after φ against the identity's."""
    import itertools
    import math

    d, shape = disp.shape[0], disp.shape[1:]
    corners = list(itertools.product((0, 1), repeat=d))
    simplices = [[c] + [tuple(b ^ (k == a) for k, b in enumerate(c)) for a in range(d)] for c in corners]
    if d == 3:
        simplices += [[c for c in corners if sum(c) % 2 == p] for p in (0, 1)]
    folded = 0.0
    for cell in itertools.product(*[range(n - 1) for n in shape]):
        for simplex in simplices:
            ref = np.array([np.add(cell, v) for v in simplex], dtype=float)
            moved = ref + np.array([disp[(slice(None), *map(int, p))] for p in ref])
            vol = np.linalg.det(moved[1:] - moved[0]) * np.sign(np.linalg.det(ref[1:] - ref[0])) / math.factorial(d)
            folded += max(-vol, 0.0)
    return 0.5 * folded / math.prod(shape) * 100.0


def test_non_diffeomorphic_volume_known_maps_and_brute_force():
    rng = np.random.default_rng(0)
    for shape in ((7, 6, 5), (9, 8)):
        d = len(shape)
        zero = torch.zeros((d, *shape))
        assert non_diffeomorphic_volume(zero) == 0.0
        x0 = torch.arange(shape[0], dtype=torch.float32).view(-1, *[1] * (d - 1)).expand(shape)
        cells = math.prod(n - 1 for n in shape) / math.prod(shape)  # per voxel, as Liu et al.'s reference counts
        for scale, expected in ((-2.0, 100.0), (-3.0, 200.0), (0.5, 0.0)):  # φ_0 = (1 + scale) x_0: a reflection folds every cell
            disp = zero.clone()
            disp[0] = scale * x0
            assert non_diffeomorphic_volume(disp) == pytest.approx(expected * cells, rel=1e-5)
        rough = rng.normal(scale=0.6, size=(d, *shape)).astype(np.float32)
        ndv = non_diffeomorphic_volume(torch.from_numpy(rough)[None])
        assert ndv > 0.0
        assert ndv == pytest.approx(_ndv_brute_force(rough.astype(np.float64)), rel=1e-4)
    # NDV counts the folded volume, not voxels: more folding of the same voxels gives more NDV
    half = torch.zeros((3, 8, 6, 6))
    half[0, 4:] = -2.0 * torch.arange(4.0).view(-1, 1, 1)
    steeper = half.clone()
    steeper[0, 4:] *= 2.0
    assert 0.0 < non_diffeomorphic_volume(half) < non_diffeomorphic_volume(steeper)
    assert "ndv_percent" in jacobian_stats(half)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_io_round_trip_keeps_metadata(tmp_path, suffix):
    rng = np.random.default_rng(0)
    arr = rng.random((6, 7, 8)).astype(np.float32)
    geo = Geometry((8, 7, 6), (1.5, 2.0, 2.5), (10.0, -20.0, 30.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    write_image(tmp_path / f"x{suffix}", arr, geo)
    back, geo2 = read_image(tmp_path / f"x{suffix}")
    assert np.array_equal(back, arr)
    assert geo2.matches(geo, tol=1e-6)
    assert geo2.array_spacing == (2.5, 2.0, 1.5)
    assert [p.name for p in tmp_path.iterdir()] == [f"x{suffix}"]  # no temporary files left


def test_exported_displacement_reproduces_our_warp_in_simpleitk(tmp_path):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    shape = (24, 26, 28)
    img = np.zeros(shape, np.float32)
    img[4:-4, 4:-4, 4:-4] = gaussian_filter(rng.random((16, 18, 20)), 1.5).astype(np.float32)
    geo = Geometry(shape[::-1], (1.2, 0.9, 2.0), (5.0, -3.0, 7.0), (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    v = torch.tensor(np.stack([gaussian_filter(rng.standard_normal(shape), 3) for _ in range(3)]) * 6.0, dtype=torch.float32)[None]
    u = scaling_and_squaring(v, 7)
    ours = warp(torch.from_numpy(img)[None, None], u)[0, 0].numpy()
    write_displacement(tmp_path / "disp.nii.gz", u[0].numpy(), geo)
    field = read_displacement(tmp_path / "disp.nii.gz")
    moving = geo.apply(sitk.GetImageFromArray(img))
    theirs = sitk.GetArrayFromImage(resample_with_field(moving, field))
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    assert np.abs(ours - theirs).max() < 1e-3
    back, g = displacement_from_itk(field)
    assert g.matches(geo, 1e-6)
    assert np.allclose(back, u[0].numpy(), atol=1e-4)
    # the physical displacement is direction · spacing · (voxel displacement, ITK order)
    itk = sitk.GetArrayFromImage(displacement_to_itk(u[0].numpy(), geo))
    M = np.array(geo.direction).reshape(3, 3) @ np.diag(geo.spacing)
    assert np.allclose(itk[3, 4, 5], M @ u[0, :, 3, 4, 5].numpy()[::-1], atol=1e-5)


def test_io_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="FIXED"):
        read_image(tmp_path / "nope.nii.gz", arg="FIXED")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="MOVING"):
        read_image(bad, arg="MOVING")
    geo = Geometry((4, 4, 4), (1.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    write_image(tmp_path / "nan.mha", nan, geo)  # NIfTI writers may zero NaNs; MetaImage keeps them
    with pytest.raises(ValueError, match="FIXED.*NaN"):
        read_image(tmp_path / "nan.mha", arg="FIXED")
    assert np.isnan(read_image(tmp_path / "nan.mha", arg="FIXED", nan="keep")[0]).sum() == 1
    write_image(tmp_path / "frac.nii.gz", np.full((4, 4, 4), 0.5, np.float32), geo)
    with pytest.raises(ValueError, match="non-integer"):
        read_labels(tmp_path / "frac.nii.gz", arg="--fixed-labels")
    other = Geometry((4, 4, 4), (2.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="different grids"):
        check_same_grid(geo, other, ("FIXED", "MOVING"))


# ----------------------------------------------------------------------------- landmarks and TRE

def test_read_landmarks_physical_and_voxel_index_rows(tmp_path):
    from hybridreg.io import Geometry, read_landmarks

    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # axes permuted and flipped
    geo = Geometry(size=(10, 12, 8), spacing=(1.5, 2.0, 3.0), origin=(10.0, -5.0, 2.5), direction=direction)
    (tmp_path / "plain.csv").write_text("1.5,2,3\n-4,5,6.25\n")
    assert read_landmarks(tmp_path / "plain.csv", geo).tolist() == [[1.5, 2.0, 3.0], [-4.0, 5.0, 6.25]]
    (tmp_path / "named.csv").write_text("id,x,y,z\na,1,2,3\nb,4,5,6\n")
    assert read_landmarks(tmp_path / "named.csv", geo).tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    (tmp_path / "index.txt").write_text("i\tj\tk\n0\t0\t0\n2\t1\t3.5\n")
    pts = read_landmarks(tmp_path / "index.txt", geo)
    m = np.array(direction).reshape(3, 3) @ np.diag(geo.spacing)  # p = origin + D diag(s) index
    assert np.allclose(pts, [geo.origin, np.array(geo.origin) + m @ [2, 1, 3.5]])
    for text, needle in (("", "holds no points"), ("1,2\n", "point 1 is not 3 numbers"), ("a,b,c\n1,2,3\n", "must name the columns"),
                         ("1,2,nan\n", "NaN or Inf")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ValueError, match=needle):
            read_landmarks(tmp_path / "bad.csv", geo, arg="--fixed-landmarks")
    with pytest.raises(FileNotFoundError, match="--moving-landmarks"):
        read_landmarks(tmp_path / "nope.csv", geo, arg="--moving-landmarks")
    # a coordinate the image does not have is refused, not dropped: four numbers on a 3D image, three or a z on a 2D one
    geo2 = Geometry(size=(10, 12), spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    for text, g, needle in (("1,2,3,4\n", geo, "point 1 is not 3 numbers"), ("0,60,1\n5,70,2\n", geo2, "point 1 is not 2 numbers"),
                            ("x,y,z\n1,2,3\n", geo2, r"third coordinate \(z\)"), ("i,j,k\n1,2,3\n", geo2, r"third coordinate \(k\)")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ValueError, match=needle):
            read_landmarks(tmp_path / "bad.csv", g, arg="--fixed-landmarks")
    # a point outside its image (beyond half a voxel past the outermost centres) is refused: indices of another grid,
    # or mm written as indices, would give a TRE of hundreds of mm; the image's own edge is accepted
    for text, needle in (("i,j,k\n0,0,0\n50,1,1\n", r"point 2 \(.*\) lies outside its image \(size 10x12x8\); 1 of 2"),
                         ("x,y,z\n100,0,0\n", "point 1 .* lies outside")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ValueError, match="`--moving-landmarks`: .*" + needle):
            read_landmarks(tmp_path / "bad.csv", geo, arg="--moving-landmarks")
    (tmp_path / "edge.csv").write_text("i,j,k\n-0.5,-0.5,-0.5\n9.5,11.5,7.5\n")
    assert len(read_landmarks(tmp_path / "edge.csv", geo)) == 2
    (tmp_path / "two.csv").write_text("x,y\n1,2\n")
    assert read_landmarks(tmp_path / "two.csv", geo2).tolist() == [[1.0, 2.0]]


def test_target_registration_error_of_a_known_transform():
    from hybridreg.metrics import target_registration_error

    rng = np.random.default_rng(0)
    pf = rng.uniform(-50, 50, (7, 3))
    t = np.array([3.0, -4.0, 12.0])
    pm = pf + t
    before = target_registration_error(pf, pm)
    assert before["n"] == 7 and before["mean"] == pytest.approx(13.0) and before["max"] == pytest.approx(13.0)
    assert target_registration_error(pf, pm, sitk.TranslationTransform(3, t.tolist()))["max"] == pytest.approx(0.0, abs=1e-9)
    half = target_registration_error(pf, pm, sitk.TranslationTransform(3, (t / 2).tolist()))
    assert half["per_point"] == pytest.approx([6.5] * 7)
    with pytest.raises(ValueError, match="equal n"):
        target_registration_error(pf, pm[:3])


@pytest.mark.slow
def test_register_reports_tre_of_a_shifted_scan(tmp_path, capsys):
    """MOVING is FIXED with its origin moved by t (a pure translation, known correspondence): the
    same voxel-index landmarks in both files are corresponding points; TRE is |t| before, 0 after
    the affine stage and under half a voxel after registration (CLI, metrics.json, batch table)."""
    from hybridreg import data
    from hybridreg.batch import merge, read_pairs
    from hybridreg.cli import main

    img = sitk.ReadImage(str(data.load_subject("vxm", 2).image_path))[20:60, 24:72, 20:60]
    sitk.WriteImage(img, str(tmp_path / "fixed.nii.gz"))
    t = np.array([3.0, -2.0, 4.0])
    img.SetOrigin(tuple(np.array(img.GetOrigin()) + t))
    sitk.WriteImage(img, str(tmp_path / "moving.nii.gz"))
    (tmp_path / "points.csv").write_text("i,j,k\n20,24,20\n10,30,25\n28,12,14\n15,20,30\n")
    out = tmp_path / "out"
    rc = main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "--out", str(out), "--fixed-landmarks", str(tmp_path / "points.csv"), "--moving-landmarks",
               str(tmp_path / "points.csv"), "--outputs", "metrics", "--no-progress"])
    assert rc == 0
    assert "TRE over 4 landmarks: 5.39 mm before" in capsys.readouterr().out
    import json

    tre = json.loads((out / "metrics.json").read_text())["tre_mm"]
    assert tre["before"]["mean"] == pytest.approx(float(np.linalg.norm(t)))
    assert tre["after_affine"]["max"] < 0.05  # the affine stage recovers the translation
    assert tre["after"]["mean"] < 0.5 and tre["after"]["max"] < 1.0  # within half a 2 mm voxel
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_landmarks,moving_landmarks,id\n"
                                        "fixed.nii.gz,moving.nii.gz,points.csv,points.csv,p\n")
    (tmp_path / "b" / "pairs").mkdir(parents=True)
    (out).rename(tmp_path / "b" / "pairs" / "p")
    merge(read_pairs(tmp_path / "pairs.csv"), tmp_path / "b")
    row = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    header, values = row[0].split(","), row[1].split(",")
    assert float(values[header.index("tre_mm")]) == pytest.approx(tre["after"]["mean"])
    assert main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "--out", str(tmp_path / "o2"),
                 "--fixed-landmarks", str(tmp_path / "points.csv")]) == 2
    assert "--fixed-landmarks` and `--moving-landmarks` must be given together" in capsys.readouterr().err


def test_nifti_nan_voxels_are_found_where_nibabel_has_them(tmp_path):
    """SimpleITK's NIfTI reader returns NaN voxels as 0; read_image takes their places from
    nibabel's copy (axes reversed), on a grid whose three sizes differ, with a trailing
    singleton axis, and in a .hdr/.img pair; Inf and NaN in label maps are refused."""
    import nibabel as nib

    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    data[1, 2, 3] = data[4, 0, 6] = np.nan
    affine = np.diag([1.0, 2.0, 1.5, 1.0])
    for name, arr in (("a.nii.gz", data), ("b.nii", data[..., None]), ("c.hdr", data)):  # c: SPM's .hdr/.img pair
        nib.save((nib.Nifti1Pair if name.endswith(".hdr") else nib.Nifti1Image)(arr, affine), tmp_path / name)
        with pytest.raises(ValueError, match="MOVING.*NaN"):
            read_image(tmp_path / name, arg="MOVING")
        kept, geo = read_image(tmp_path / name, arg="MOVING", nan="keep")
        assert kept.shape == (7, 6, 5) and geo.spacing == (1.0, 2.0, 1.5)
        assert sorted(zip(*np.nonzero(np.isnan(kept)))) == [(3, 2, 1), (6, 0, 4)]
        assert np.array_equal(kept[~np.isnan(kept)], data.T[~np.isnan(data.T)])
        with pytest.raises(ValueError, match="--fixed-labels.*NaN"):
            read_labels(tmp_path / name, arg="--fixed-labels")
    data[1, 2, 3] = np.inf
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "inf.nii.gz")
    with pytest.raises(ValueError, match="FIXED.*Inf"):
        read_image(tmp_path / "inf.nii.gz", arg="FIXED", nan="keep")


def test_auto_scores_freesurfer_structures_only_on_freesurfer_maps():
    """``"auto"``: the standard FreeSurfer structures of an aseg-like map; every shared label of an
    atlas of another numbering (AAL's 1..116 holds 30 of FreeSurfer's numbers by chance)."""
    from hybridreg.data import evaluation_labels
    from hybridreg.metrics import scored_labels

    aseg = np.array([list(evaluation_labels()) + [24, 77, 85]])  # a FreeSurfer map has a few more labels
    assert scored_labels(aseg, aseg, "auto") == tuple(evaluation_labels())
    aparc_aseg = np.array([[lab for lab in evaluation_labels() if lab not in (17, 53)] + [24, 77, 85]
                           + list(range(1001, 1036)) + list(range(2001, 2036))])  # the cortex as 70 parcels
    assert scored_labels(aparc_aseg, aparc_aseg, "auto") == tuple(lab for lab in evaluation_labels() if lab not in (17, 53))
    aal = np.arange(117)[None]
    assert len(set(evaluation_labels()) & set(range(1, 117))) >= 20
    assert scored_labels(aal, aal, "auto") == tuple(range(1, 117)) == scored_labels(aal, aal, "all")


def test_an_explicit_label_list_is_scored_as_given_or_refused():
    """``--eval-labels 2,3`` scores exactly those; a repeated label (it counted twice in the
    console's count but once in the mean), the background 0 and a label one map lacks are refused."""
    from hybridreg.metrics import scored_labels

    f = np.array([[0, 2, 2], [3, 3, 5]])
    m = np.array([[0, 2, 3], [3, 2, 7]])
    assert scored_labels(f, m, [3, 2]) == (3, 2)
    for policy, needle in (([2, 2, 3], r"label\(s\) \[2\] given more than once"), ([0, 2], "0 is the background"),
                           ([2, 5], r"labels \[5\] are not present in both")):
        with pytest.raises(ValueError, match=needle):
            scored_labels(f, m, policy)


def test_jacobian_metrics_read_a_batch_of_three_2d_fields_as_a_batch_and_take_its_mask():
    """(3, 2, H, W) was read as one 3D field: a map with det J = 1.5 everywhere gave 58 %
    folding and SDlogJ 10; a spatial mask failed for B > 1."""
    y, x = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    u = torch.stack([0.5 * y, 0 * x])[None]  # φ = diag(1.5, 1)
    for b in (1, 2, 3):
        s = jacobian_stats(u.expand(b, 2, 6, 7))
        assert s["folding_percent"] == 0 and s["sdlogj"] < 1e-9 and s["ndv_percent"] == 0
        assert abs(s["jacobian_min"] - 1.5) < 1e-6 and abs(s["jacobian_max"] - 1.5) < 1e-6
    one = torch.zeros(3, 5, 6, 7)  # one 3D field without its batch axis
    assert jacobian_stats(one)["jacobian_min"] == 1.0
    mask = torch.zeros(10, 11, 12, dtype=torch.bool)
    mask[2:5] = True
    field = torch.zeros(2, 3, 10, 11, 12)
    field[1, 0, 6:] = torch.arange(4.0)[:, None, None].expand(4, 11, 12) * -2.0  # folds outside the mask only
    assert jacobian_stats(field, mask)["folding_percent"] == 0 and jacobian_stats(field)["folding_percent"] > 0
    with pytest.raises(ValueError, match="`mask` must have the spatial shape"):
        jacobian_stats(field, torch.ones(10, 11, 13, dtype=torch.bool))


def test_hd95_counts_a_structures_voxels_on_the_grids_edge_as_surface():
    """Without padding, a structure cut by the grid's edge had no surface there: HD95 8.0
    where the DeepMind package and MONAI give 5.0. The same maps placed inside a larger
    grid of background give the same HD95."""
    a = np.zeros((20, 20, 20), int)
    b = np.zeros_like(a)
    a[:10] = 3
    b[:10, :, :15] = 3
    inside = hd95(np.pad(a, 3), np.pad(b, 3), [3])[3]
    assert hd95(a, b, [3])[3] == inside == 5.0
    with pytest.raises(ValueError, match="`labels` is empty"):
        dice(a, b, [])
    with pytest.raises(ValueError, match="`displacement` must be on the fixed labels' grid"):
        score_registration(a, b, torch.zeros(1, 3, 19, 20, 20))


def test_metrics_refuse_a_batch_a_bad_spacing_and_a_repeated_or_background_label():
    """score_registration scored pair 0's labels but averaged the Jacobian of every pair; HD95 took an
    infinite spacing (NaN and ITK errors); dice scored the background and silently merged repeated labels."""
    from hybridreg.metrics import scored_labels

    a = np.zeros((8, 8, 8), np.int32)
    a[2:6, 2:6, 2:6] = 1
    with pytest.raises(ValueError, match="`displacement` must be one registration"):
        score_registration(a, a, torch.zeros(2, 3, 8, 8, 8), [1])
    assert score_registration(a, a, torch.zeros(1, 3, 8, 8, 8), [1])["dice_mean"] == 1.0
    with pytest.raises(ValueError, match=r"hd95\(\): `spacing` must be 3 positive finite numbers"):
        hd95(a, a, [1], spacing=(float("inf"), 1.0, 1.0))
    for labels, match in [([0, 1], "0 is the background"), ([1, 1], r"label\(s\) \[1\] given more than once")]:
        with pytest.raises(ValueError, match=match):
            dice(a, a, labels)
    with pytest.raises(ValueError, match="`policy` must be 'auto', 'all' or a list"):
        scored_labels(a, a, "every")


def test_io_helpers_refuse_nan_and_constant_inputs_naming_them():
    """normalize_intensity turned one NaN voxel into an all-NaN image and a constant image into zeros;
    displacement_to_itk wrote a NaN field that read_displacement then refused."""
    from hybridreg.io import displacement_to_itk, normalize_intensity

    x = np.random.default_rng(0).random((6, 6)).astype(np.float32)
    assert normalize_intensity(x).max() == 1.0
    x[2, 2] = np.nan
    with pytest.raises(ValueError, match="`x` contains NaN"):
        normalize_intensity(x)
    with pytest.raises(ValueError, match="`scan.nii` is constant"):
        normalize_intensity(np.full((6, 6), 3.0), arg="scan.nii")
    geo = Geometry.of(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)))
    disp = np.zeros((2, 4, 5))
    disp[0, 1, 1] = np.inf
    with pytest.raises(ValueError, match="`disp` contains NaN or Inf"):
        displacement_to_itk(disp, geo)


def test_resize_image_refuses_a_label_map_and_a_grid_check_names_the_direction():
    """resize_image of an integer tensor raised torch's NotImplementedError; two grids differing only in their
    direction printed the same size, spacing and origin twice."""
    from hybridreg.io import check_same_grid
    from hybridreg.spatial import resize_image

    with pytest.raises(TypeError, match=r"resize_image\(\): `image` must be a floating-point"):
        resize_image(torch.zeros(1, 1, 4, 4, dtype=torch.int64), (2, 2))
    a = Geometry((4, 5), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    b = Geometry((4, 5), (1.0, 1.0), (0.0, 0.0), (0.0, 1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match=r"direction \(1.0, 0.0, 0.0, 1.0\) vs \(0.0, 1.0, 1.0, 0.0\)"):
        check_same_grid(a, b, ("FIXED", "FIXED labels"))


def test_intensities_of_any_scale_normalise_alike_and_float32_limits_are_named(tmp_path):
    """An image whose intensities spanned less than 1e-12 normalised to about 0 (and registered to the
    identity); a float64 file near 1e300 was reported as holding Inf after the cast to float32, and one
    near 1e-300 as constant."""
    from hybridreg.io import normalize_intensity, read_image

    x = np.random.default_rng(1).random((8, 9, 10)).astype(np.float32)
    want = normalize_intensity(x)
    for scale in (1e-20, 1e-13, 1e30):
        np.testing.assert_allclose(normalize_intensity(x * np.float32(scale)), want, atol=1e-5)
    almost = np.ones((40, 50), np.float32)  # over 99.5 % at the maximum: its few dark voxels are the contrast
    almost[0, :5] = 0.0
    assert normalize_intensity(almost).min() == 0.0 and normalize_intensity(almost).max() == 1.0
    geo = Geometry.of(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)))
    for value, where in ((1e300, "beyond"), (1e-300, "below")):
        path = tmp_path / f"{where}.nii.gz"
        img = sitk.GetImageFromArray(np.random.default_rng(2).random((4, 5, 6)) * value)
        sitk.WriteImage(geo.apply(img), str(path))
        with pytest.raises(ValueError, match=rf"`MOVING`: .*{where}.nii.gz holds float64 values up to .*{where} float32's range"):
            read_image(path, arg="MOVING")
    sitk.WriteImage(geo.apply(sitk.GetImageFromArray(np.random.default_rng(2).random((4, 5, 6)) * 1e30)), str(tmp_path / "ok.nrrd"))
    assert np.isfinite(read_image(tmp_path / "ok.nrrd")[0]).all()


def test_a_folder_given_for_a_file_is_named_as_a_folder(tmp_path):
    """A manifest, config or weight file given as a folder was reported as "not found"."""
    from hybridreg.batch import read_pairs
    from hybridreg.config import read_yaml
    from hybridreg.data.sources import from_manifest
    from hybridreg.io import read_image
    from learned.weights import read_weight_file

    folder = tmp_path / "scans"
    folder.mkdir()
    for read, what in ((lambda: read_pairs(folder, arg="MANIFEST"), "manifest"), (lambda: from_manifest(folder, arg="--data"), "manifest"),
                       (lambda: read_yaml(folder, arg="--config"), "YAML file"),
                       (lambda: read_weight_file(folder, "network"), "weight file")):
        with pytest.raises(ValueError, match=rf"`.*`: {folder} is a folder, not a {what}$"):
            read()
    with pytest.raises(ValueError, match=rf"`FIXED`: {folder} is a folder holding no DICOM series: give an image file"):
        read_image(folder, arg="FIXED")  # an image may be a DICOM series' folder
    with pytest.raises(FileNotFoundError, match=r"`MANIFEST`: manifest not found: .*nope.csv"):
        read_pairs(folder / "nope.csv", arg="MANIFEST")


@pytest.mark.parametrize("name,data_file", [("w.mhd", "w.zraw"), ("w.nhdr", "w.raw.gz")])
def test_an_image_with_a_detached_header_names_its_own_data_file(tmp_path, name, data_file):
    """``.mhd`` and ``.nhdr`` outputs wrote their data under the staging name (a hidden ``.w.<random>.zraw``) and
    named it in the header; each overwrite left the previous data file behind."""
    from hybridreg.io import write_image

    geo = Geometry.of(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)))
    for k in range(2):  # the second write replaces the first
        arr = np.random.default_rng(k).random((4, 5, 6)).astype(np.float32)
        write_image(tmp_path / name, arr, geo)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, data_file])
    assert data_file in (tmp_path / name).read_bytes().decode("latin-1")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))), arr)


def test_placements_other_tools_read_otherwise_are_warned_and_misnamed_gzip_refused(tmp_path):
    """A NIfTI file whose qform and sform disagree was read by ITK's rule without a word (FSL, SPM and nibabel
    follow the sform: a warped image 30 mm off in their viewers); so were a file without orientation and an
    Analyze file. A .nii.gz that is not compressed (or a compressed .nii) was "truncated or corrupt"."""
    import nibabel as nib

    from hybridreg.io import placement_warnings, read_image
    from hybridreg.service import read_inputs

    data = np.random.default_rng(0).random((10, 11, 12)).astype(np.float32) + 1.0
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-10.0, -12.0, -8.0)
    off = affine.copy()
    off[0, 3] += 30.0

    def save(name, qform=(affine, 1), sform=(affine, 1), kind=nib.Nifti1Image):
        img = kind(data, affine)
        if kind is not nib.AnalyzeImage:
            img.set_qform(*qform)
            img.set_sform(*sform)
        nib.save(img, str(tmp_path / name))
        return tmp_path / name

    plain = save("plain.nii.gz")
    cases = {save("qs.nii.gz", qform=(off, 1), sform=(affine, 2)): r"qform \(code 1\) and sform \(code 2\) place it up to 30.0 mm"
                                                                    r" apart: it was read by the qform",
             save("none.nii.gz", qform=(affine, 0), sform=(affine, 0)): "holds no orientation",
             save("old.img", kind=nib.AnalyzeImage): "is an Analyze 7.5 file"}
    assert placement_warnings(plain, read_image(plain)[1], arg="FIXED") == []
    for path, needle in cases.items():
        (line,) = placement_warnings(path, read_image(path)[1], arg="MOVING")
        assert line.startswith("`MOVING`: ") and re.search(needle, line), line
    flat = nib.Nifti1Image(data[:, :, 0], off)  # 2D: ITK drops the out-of-plane placement nibabel keeps (35 mm here)
    flat.set_sform(off, 2)
    nib.save(flat, str(tmp_path / "flat.nii.gz"))
    assert placement_warnings(tmp_path / "flat.nii.gz", read_image(tmp_path / "flat.nii.gz")[1]) == []
    warned = read_inputs(plain, tmp_path / "qs.nii.gz")
    assert len(warned.warnings) == 1 and warned.warnings[0].startswith("`MOVING`: ")
    (tmp_path / "raw.nii.gz").write_bytes(gzip.decompress(plain.read_bytes()))
    (tmp_path / "packed.nii").write_bytes(plain.read_bytes())
    (tmp_path / "empty.nii.gz").write_bytes(b"")  # no NIfTI header: not a naming problem
    for name, needle in (("empty.nii.gz", "cannot read .*empty.nii.gz as an image"),
                         ("raw.nii.gz", "is not gzip-compressed but named .nii.gz: rename it raw.nii$"),
                         ("packed.nii", "is gzip-compressed but named .nii: rename it packed.nii.gz$")):
        with pytest.raises(ValueError, match=rf"`FIXED`: .*{needle}"):
            read_image(tmp_path / name, arg="FIXED")
