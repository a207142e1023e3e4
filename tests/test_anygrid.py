"""Any two scans, as they come: a moving scan on another grid (size, spacing, permuted and
flipped axes), misaligned by a known similarity transform, registered from the raw files, and
the transforms ``register`` writes applied by SimpleITK alone."""

import json

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from benchmarks.affine_stage import affine_error_mm, inverse_error_mm, misaligned_runs
from hybridreg.cli import main
from hybridreg.metrics import dice
from hybridreg.objective import ObjectiveConfig, evaluate

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The aligned pair and its moved copy, both registered with the defaults at 2 mm."""
    return misaligned_runs(2, tmp_path_factory.mktemp("anygrid"))


@pytest.mark.slow
def test_misaligned_scan_on_another_grid_reaches_the_aligned_dice(runs):
    aligned = json.loads((runs["out"]["aligned"] / "metrics.json").read_text())
    moved = json.loads((runs["out"]["moved"] / "metrics.json").read_text())
    assert moved["dice_before"]["mean"] < aligned["dice_before"]["mean"] - 0.2  # really misaligned
    assert moved["dice_after"]["mean"] == pytest.approx(aligned["dice_after"]["mean"], abs=0.01)
    assert moved["folding_percent"] == 0.0


@pytest.mark.slow
def test_recovered_affine_is_within_1mm_rms_of_the_truth(runs):
    assert affine_error_mm(runs) < 1.0


@pytest.mark.slow
def test_transform_h5_applied_by_simpleitk_alone_reproduces_the_outputs(runs):
    out, moved = runs["out"]["moved"], runs["moved"]
    tx = sitk.ReadTransform(str(out / "transform.h5"))
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    theirs = sitk.Resample(sitk.ReadImage(str(moved["image"]), sitk.sitkFloat32), warped, tx, sitk.sitkLinear, 0.0)
    a, b = sitk.GetArrayFromImage(warped).ravel(), sitk.GetArrayFromImage(theirs).ravel()
    assert np.corrcoef(a, b)[0, 1] >= 0.999
    labels = sitk.Resample(sitk.ReadImage(str(moved["labels"])), warped, tx, sitk.sitkNearestNeighbor, 0)
    ours = sitk.ReadImage(str(runs["f"].labels_path))  # the tool's own warped labels, via apply (nearest)
    tool = out / "tool_labels.nii.gz"
    assert main(["apply", str(out), str(moved["labels"]), "--labels", "--out", str(tool)]) == 0
    scored = json.loads((out / "metrics.json").read_text())["labels_scored"]
    agreement = dice(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(sitk.ReadImage(str(tool))), scored)
    assert np.mean(list(agreement.values())) >= 0.99
    del ours


@pytest.mark.slow
def test_inverse_transform_undoes_the_forward_one_inside_the_brain(runs):
    assert inverse_error_mm(runs["out"]["moved"], runs["f"].labels_path) < 0.1


@pytest.mark.slow
def test_apply_inverse_maps_fixed_labels_onto_the_moving_grid(runs, tmp_path):
    out, moved = runs["out"]["moved"], runs["moved"]
    back = tmp_path / "fixed_labels_on_moving.nii.gz"
    assert main(["apply", str(out), str(runs["f"].labels_path), "--labels", "--inverse", "--out", str(back)]) == 0
    img, ref = sitk.ReadImage(str(back)), sitk.ReadImage(str(moved["labels"]))
    assert img.GetSize() == ref.GetSize() and np.allclose(img.GetDirection(), ref.GetDirection())
    scored = json.loads((out / "metrics.json").read_text())["labels_scored"]
    d = np.mean(list(dice(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref), scored).values()))
    after = json.loads((out / "metrics.json").read_text())["dice_after"]["mean"]
    assert d > after - 0.05  # the same overlap, measured on the moving grid


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("solver", ["instance", "learned+refine", "learned-lambda", "learned-conditional+refine"])
def test_scans_on_two_grids_register_on_the_gpu_with_every_output(runs, solver, tmp_path):
    """The whole register service on a GPU, every output file written, for a moving scan on
    another grid: the path where the affine stage's CPU voxel map meets GPU fields (in the
    metrics, the warped image, the figure, the inverse). A GPU found the first such fault; the
    instance solver's Dice there is the CPU run's up to float32 summation order."""
    from hybridreg.service import OUTPUT_FILES, register_files

    f = runs["f"]
    m = register_files(f.image_path, runs["moved"]["image"], tmp_path / "out", fixed_labels=f.labels_path,
                       moving_labels=runs["moved"]["labels"], solver=solver, device="cuda", progress=False)
    assert m["device"].startswith("cuda") and m["peak_memory_kind"] == "torch.cuda.max_memory_allocated"
    assert sorted(q.name for q in (tmp_path / "out").iterdir()) == sorted(OUTPUT_FILES)
    assert m["folding_percent"] < 0.01 and m["dice_after"]["mean"] > m["dice_after_affine"]["mean"]
    if solver == "instance":
        assert m["dice_after"]["mean"] == pytest.approx(runs["metrics"]["moved"]["dice_after"]["mean"], abs=0.01)


def test_points_outside_movings_field_of_view_are_not_matched():
    """A point mapped outside MOVING's grid meets only its zero padding: it is left out of the
    image match (a scan of part of the head is matched where it has data)."""
    g = torch.Generator().manual_seed(3)
    f, m = torch.rand(1, 1, 12, 12, 12, generator=g), torch.rand(1, 1, 12, 12, 12, generator=g)
    v = torch.zeros(1, 3, 12, 12, 12)
    v[:, 0] = 2.5  # a translation: the points of the last three planes land outside MOVING's grid
    lam, cfg = torch.ones(1, 1, 1, 1, 1), ObjectiveConfig(similarity="mse", hyperprior="none")
    other = f.clone()
    other[:, :, 9:] = torch.rand(1, 1, 3, 12, 12, generator=g)
    a, b = evaluate(f, m, v, lam, cfg).terms.similarity, evaluate(other, m, v, lam, cfg).terms.similarity
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    per_voxel = (f - evaluate(f, m, v, lam, cfg).warped) ** 2 / (2 * cfg.mse_sigma**2)
    assert float(a) == pytest.approx(float(per_voxel[:, :, :9].sum()) / per_voxel.numel(), rel=1e-5)


def test_masked_similarity_leaves_out_the_voxels_outside_the_mask():
    """Voxels outside the mask add nothing and those inside keep their unmasked weight (the
    sum over the mask divided by all voxels), so a mask leaves the balance with the prior as it
    is; MAP's profiled σ² is the mean squared residual over the mask."""
    g = torch.Generator().manual_seed(0)
    f, m = torch.rand(1, 1, 8, 10, 12, generator=g), torch.rand(1, 1, 8, 10, 12, generator=g)
    v, lam = torch.zeros(1, 3, 8, 10, 12), torch.ones(1, 1, 1, 1, 1)
    cfg = ObjectiveConfig(similarity="mse", hyperprior="none")
    mask = torch.zeros(1, 1, 8, 10, 12)
    mask[..., :5, :] = 1.0
    full = evaluate(f, m, v, lam, cfg)
    masked = evaluate(f, m, v, lam, cfg, fixed_mask=mask)
    per_voxel = ((f - m) ** 2 / (2 * cfg.mse_sigma**2))
    assert float(masked.terms.similarity) == pytest.approx(float(per_voxel[..., :5, :].sum()) / per_voxel.numel(), rel=1e-5)
    assert float(full.terms.similarity) == pytest.approx(float(per_voxel.mean()), rel=1e-5)
    map_cfg = ObjectiveConfig(similarity="mse", hyperprior="none", log_det=True)
    sigma2 = float(((f - m) ** 2)[..., :5, :].mean())  # the squared residual's mean over the mask
    expected = (0.5 + 0.5 * math.log(2 * math.pi * sigma2)) * 0.5  # half the voxels are inside
    assert float(evaluate(f, m, v, lam, map_cfg, fixed_mask=mask).terms.similarity) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_transform_h5_applied_by_ants_reproduces_the_outputs(runs):
    ants = pytest.importorskip("ants", reason="antspyx is optional (pip install antspyx)")
    out, moved = runs["out"]["moved"], runs["moved"]
    fixed, moving = ants.image_read(str(runs["f"].image_path)), ants.image_read(str(moved["image"]))
    theirs = ants.apply_transforms(fixed, moving, transformlist=[str(out / "transform.h5")])
    ours = ants.image_read(str(out / "warped.nii.gz"))
    assert np.corrcoef(ours.numpy().ravel(), theirs.numpy().ravel())[0, 1] >= 0.999
    back = ants.apply_transforms(moving, ants.image_read(str(runs["f"].labels_path)),
                                 transformlist=[str(out / "inverse_transform.h5")], interpolator="genericLabel")
    assert back.shape == moving.shape
    scored = json.loads((out / "metrics.json").read_text())["labels_scored"]
    d = np.mean(list(dice(back.numpy().astype(int), ants.image_read(str(moved["labels"])).numpy().astype(int), scored).values()))
    assert d > json.loads((out / "metrics.json").read_text())["dice_after"]["mean"] - 0.05


@pytest.mark.slow
def test_a_small_object_registers_as_the_same_object_at_a_heads_size(tmp_path):
    """A 2D slice of the demo pair cropped to 96×96 voxels of 2 mm (192 mm), and the same files with
    every voxel 10 times smaller (19.2 mm across, under ``SMALL_EXTENT_MM``): the small pair is
    registered as if 10 times larger, so the solver does the same work on it (the same levels and
    displacement in voxels, the same Dice), and its outputs are in its own true mm."""
    from hybridreg import data
    from hybridreg.io import physical_scale

    fid, mid = data.demo_pair()
    f, m = data.load_subject(fid, 2), data.load_subject(mid, 2)
    (tmp_path / "q.yaml").write_text("level_spacing: [8, 4, 2]\niterations: [30, 20, 10]\n")
    for size, k in (("head", 1.0), ("small", 0.1)):
        paths = []
        for which, path in (("f", f.image_path), ("m", m.image_path), ("fl", f.labels_path), ("ml", m.labels_path)):
            img = sitk.ReadImage(str(path))[8:104, :, 40]
            img = sitk.Resample(img, [96, 96], sitk.Transform(), sitk.sitkNearestNeighbor, img.GetOrigin(), img.GetSpacing(),
                                img.GetDirection(), 0, img.GetPixelID())  # 96 voxels along both axes
            img.SetSpacing([s * k for s in img.GetSpacing()])
            img.SetOrigin([o * k for o in img.GetOrigin()])
            paths.append(tmp_path / f"{size}_{which}.nii.gz")
            sitk.WriteImage(img, str(paths[-1]))
        assert main(["register", str(paths[0]), str(paths[1]), "--out", str(tmp_path / size), "--fixed-labels", str(paths[2]),
                     "--moving-labels", str(paths[3]), "--affine", "none", "--config", str(tmp_path / "q.yaml"),
                     "--outputs", "transforms", "--eval-labels", "all", "--no-progress"]) == 0
    head, small = (json.loads((tmp_path / s / "metrics.json").read_text()) for s in ("head", "small"))
    assert head["physical_scale"] == 1.0 and small["physical_scale"] == pytest.approx(0.1)
    small_f = sitk.ReadImage(str(tmp_path / "small_f.nii.gz"))
    assert physical_scale(small_f.GetSize(), small_f.GetSpacing()) == pytest.approx(0.1)
    assert [lv["shape"] for lv in small["levels"]] == [lv["shape"] for lv in head["levels"]]
    assert np.allclose([lv["spacing_mm"] for lv in small["levels"]], [[x * 0.1 for x in lv["spacing_mm"]] for lv in head["levels"]])
    assert small["dice_after"]["mean"] == pytest.approx(head["dice_after"]["mean"], abs=2e-3) and head["dice_after"]["mean"] > head["dice_before"]["mean"] + 0.05
    assert small["sdlogj"] == pytest.approx(head["sdlogj"], abs=2e-3)
    d_head, d_small = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / s / "displacement.nii.gz"))) for s in ("head", "small"))
    assert np.abs(d_small * 10 - d_head).max() < 0.05  # mm: the same displacement in voxels
    # with the affine stage (its pyramid in mm is scaled too: ITK's optimiser is not exactly scale-free) and the
    # inverse: the same figures within 0.01, and the small pair's inverse undoes its forward map in its own mm
    for size in ("head", "small"):
        paths = [tmp_path / f"{size}_{w}.nii.gz" for w in ("f", "m", "fl", "ml")]
        assert main(["register", str(paths[0]), str(paths[1]), "--out", str(tmp_path / f"{size}_affine"), "--fixed-labels",
                     str(paths[2]), "--moving-labels", str(paths[3]), "--config", str(tmp_path / "q.yaml"), "--eval-labels",
                     "all", "--no-progress"]) == 0
    head, small = (json.loads((tmp_path / f"{s}_affine" / "metrics.json").read_text()) for s in ("head", "small"))
    for key in ("dice_after_affine", "dice_after"):
        assert small[key]["mean"] == pytest.approx(head[key]["mean"], abs=0.01), key
    fwd, inv = (sitk.ReadTransform(str(tmp_path / "small_affine" / n)) for n in ("transform.h5", "inverse_transform.h5"))
    ref = sitk.ReadImage(str(tmp_path / "small_f.nii.gz"))
    points = [ref.TransformContinuousIndexToPhysicalPoint((float(i), float(j))) for i in range(30, 70, 8) for j in range(30, 70, 8)]
    err = max(np.linalg.norm(np.subtract(inv.TransformPoint(fwd.TransformPoint(p)), p)) for p in points)
    assert err < 0.1 * 0.2  # a tenth of a voxel of 0.2 mm


def test_register_files_refuses_eval_labels_without_label_maps(tmp_path):
    """The CLI refused `--eval-labels 17` without label maps; `register_files` accepted it."""
    from hybridreg import data
    from hybridreg.service import register_files

    f, m = data.load_subject("vxm"), data.load_subject("synthseg_16")
    with pytest.raises(ValueError, match="`--eval-labels` chooses the labels Dice is scored on"):
        register_files(f.image_path, m.image_path, tmp_path / "out", eval_labels=[17])
    assert not (tmp_path / "out").exists()
