"""The CLI's fault contract, one row per bad input or fault (issue: a 144-case fault probe).

Every row runs ``hybridreg`` on 32³ crops of the bundled data with a short schedule and
checks: the exit code, one line on stderr with the expected fragment and no traceback, and
``--out`` exactly as it was before (nothing partial, nothing of the user's lost).
"""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hybridreg import data
from hybridreg.cli import main

QUICK = "level_spacing: [4.0]\niterations: [5]\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Crops of the bundled demo pair (fixed, moving, their labels) and a few bad files."""
    root = tmp_path_factory.mktemp("faults")
    fid, mid = data.demo_pair()
    f, m = data.load_subject(fid, 2), data.load_subject(mid, 2)
    sl = (slice(24, 56), slice(32, 64), slice(24, 56))
    paths = {}
    for key, path in (("fixed", f.image_path), ("moving", m.image_path), ("fixed_labels", f.labels_path),
                      ("moving_labels", m.labels_path)):
        paths[key] = root / f"{key}.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(path))[sl[2], sl[1], sl[0]], str(paths[key]))
    img = sitk.ReadImage(str(paths["moving"]), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)
    for name, value in (("nan", np.nan), ("inf", np.inf), ("all_nan", np.nan)):
        bad = arr.copy()
        bad[(slice(None),) * 3 if name == "all_nan" else (5, 5, 5)] = value
        out = sitk.GetImageFromArray(bad)
        out.CopyInformation(img)
        paths[name] = root / f"{name}.nii.gz"
        sitk.WriteImage(out, str(paths[name]))
    one = np.zeros(arr.shape, np.uint8)
    one[5, 5, 5] = 1  # a moving mask over the NaN voxel alone
    nan_mask = sitk.GetImageFromArray(one)
    nan_mask.CopyInformation(img)
    paths["nan_mask"] = root / "nan_mask.nii.gz"
    sitk.WriteImage(nan_mask, str(paths["nan_mask"]))
    for name, corner in (("corner_mask_a", (0, 0, 0)), ("corner_mask_b", (-1, -1, -1))):  # opposite corners
        one = np.zeros(arr.shape, np.uint8)
        one[corner] = 1
        mask = sitk.GetImageFromArray(one)
        mask.CopyInformation(img)
        paths[name] = root / f"{name}.nii.gz"
        sitk.WriteImage(mask, str(paths[name]))
    raw = root / "moving.nii"
    sitk.WriteImage(img, str(raw))
    blob = raw.read_bytes()
    (root / "short.nii").write_bytes(blob[: len(blob) // 2])
    paths["short_nii"] = root / "short.nii"
    paths["short_niigz"] = root / "short.nii.gz"
    paths["short_niigz"].write_bytes(gzip.compress(blob)[: len(gzip.compress(blob)) // 2])
    lab = sitk.ReadImage(str(paths["fixed_labels"]))
    for name, pix, value in (("labels_uint32", sitk.sitkUInt32, 2**31 + 5), ("labels_negative", sitk.sitkInt32, -3)):
        la = sitk.GetArrayFromImage(lab).astype(np.int64)
        la[la == 2] = value
        out = sitk.GetImageFromArray(la.astype(np.uint32 if pix == sitk.sitkUInt32 else np.int32))
        out.CopyInformation(lab)
        paths[name] = root / f"{name}.nii.gz"
        sitk.WriteImage(out, str(paths[name]))
    paths["image2d"] = root / "slice2d.nii.gz"
    sitk.WriteImage(img[:, :, 16], str(paths["image2d"]))
    for name, part in (("slice1", img[:, :, 16:17]), ("slab3", img[:, :, 15:18])):  # 3D images of one and three slices
        paths[name] = root / f"{name}.nii.gz"
        sitk.WriteImage(part, str(paths[name]))
    far = sitk.Image(img)
    far.SetOrigin([c + 1000.0 for c in img.GetOrigin()])  # the same image 1 m away: no overlap as the headers place it
    paths["far"] = root / "far.nii.gz"
    sitk.WriteImage(far, str(paths["far"]))
    paths["quick"] = root / "quick.yaml"
    paths["quick"].write_text(QUICK)
    for name, text in (("cfg_lr", QUICK + "lr: 1.0e+6\n"), ("cfg_lr_lambda", QUICK + "lr_lambda: 1.0e+30\n"),
                       ("cfg_smoothing", QUICK + "velocity_smoothing: 1.0e+6\n"),
                       ("cfg_nan_mean", QUICK + "objective: {hyperprior: normal, hyper_mean: .nan}\n"),
                       ("cfg_iterations", "level_spacing: [4.0]\niterations: [100000000]\n")):
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(text)
    paths["cfg_latin1"] = root / "latin1.yaml"
    paths["cfg_latin1"].write_bytes("lr: 0.5 # r\xe9glage\n".encode("latin-1"))
    return paths


def _register(p, out, *extra, moving=None, labels=True, config=True):
    argv = ["register", str(p["fixed"]), str(moving or p["moving"]), "--out", str(out), "--no-progress"]
    argv += ["--config", str(p["quick"])] if config else []
    if labels:
        argv += ["--fixed-labels", str(p["fixed_labels"]), "--moving-labels", str(p["moving_labels"])]
    return argv + [str(e) for e in extra]


def _snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {q.relative_to(folder).as_posix(): q.read_bytes() for q in sorted(folder.rglob("*")) if q.is_file()}


# (id, argv builder (paths, out folder) -> argv, expected exit code, stderr fragment)
CASES = [
    ("moving-is-an-output", lambda p, o: _register(p, o, moving=o / "warped.nii.gz"), 2, "would overwrite"),
    ("out-empty", lambda p, o: _register(p, ""), 2, "empty string"),
    ("out-has-results", lambda p, o: _register(p, o), 2, "earlier run"),
    ("out-below-a-file", lambda p, o: _register(p, o / "metrics.json" / "sub"), 2, "is a file"),
    ("out-is-a-file", lambda p, o: _register(p, o / "metrics.json"), 2, "not a folder"),
    ("truncated-nii", lambda p, o: _register(p, o / "new", moving=p["short_nii"]), 2, "truncated"),
    ("truncated-nii-gz", lambda p, o: _register(p, o / "new", moving=p["short_niigz"]), 2, "truncated"),
    ("all-nan-nifti", lambda p, o: _register(p, o / "new", moving=p["all_nan"]), 2, "every voxel is NaN"),
    ("moving-mask-only-on-nan", lambda p, o: _register(p, o / "new", "--moving-mask", p["nan_mask"], moving=p["nan"]), 2,
     "no number inside `--moving-mask`"),
    # the start from the masks' boxes puts one mask's voxel on the other's: ITK's metric then finds too few points
    ("moving-mask-off-fixed-foreground", lambda p, o: _register(p, o / "new", "--fixed-mask", p["corner_mask_a"],
                                                                "--moving-mask", p["corner_mask_b"]), 2,
     "the rigid stage failed: `FIXED` and `MOVING` may not overlap"),
    ("moving-mask-off-fixed-foreground-affine-none", lambda p, o: _register(
        p, o / "new", "--affine", "none", "--fixed-mask", p["corner_mask_a"], "--moving-mask", p["corner_mask_b"]), 2,
     "`--moving-mask` leaves nothing to match"),
    ("inf-voxel-nifti", lambda p, o: _register(p, o / "new", moving=p["inf"]), 2, "contains Inf values"),
    ("lr-1e6", lambda p, o: _register(p, o / "new", "--config", p["cfg_lr"]), 2, "`lr`"),
    ("lr-lambda-1e30", lambda p, o: _register(p, o / "new", "--config", p["cfg_lr_lambda"]), 2, "`lr_lambda`"),
    ("smoothing-1e6", lambda p, o: _register(p, o / "new", "--config", p["cfg_smoothing"]), 2, "`velocity_smoothing`"),
    ("nan-hyper-mean", lambda p, o: _register(p, o / "new", "--config", p["cfg_nan_mean"]), 2, "`hyper_mean`"),
    ("huge-iterations", lambda p, o: _register(p, o / "new", "--config", p["cfg_iterations"]), 2, "`iterations`"),
    ("config-not-utf8", lambda p, o: _register(p, o / "new", "--config", p["cfg_latin1"]), 2, "--config"),
    ("device-meta", lambda p, o: _register(p, o / "new", "--device", "meta"), 2, "--device"),
    ("device-mps", lambda p, o: _register(p, o / "new", "--device", "mps"), 2, "--device"),
    ("weights-not-a-weight-file", lambda p, o: _register(p, o / "new", "--solver", "learned", "--weights", p["fixed"],
                                                         config=False), 2, "--weights"),
    ("weights-for-instance", lambda p, o: _register(p, o / "new", "--weights", p["fixed"]), 2, "--weights"),
    ("apply-out-txt", lambda p, o: ["apply", o / "displacement.nii.gz", p["moving"], "--out", o / "x.txt"], 2, "image file"),
    ("apply-out-uppercase", lambda p, o: ["apply", o / "displacement.nii.gz", p["moving"], "--out", o / "x.MHA"], 2,
     "(lowercase), got"),
    ("apply-2d-image-3d-field", lambda p, o: ["apply", o / "displacement.nii.gz", p["image2d"], "--out", o / "w.nii.gz"], 2,
     "2D"),
    ("apply-out-exists", lambda p, o: ["apply", o / "displacement.nii.gz", p["moving"], "--out", o / "warped.nii.gz"], 2,
     "--overwrite"),
    ("apply-out-is-input", lambda p, o: ["apply", o / "displacement.nii.gz", o / "warped.nii.gz", "--out",
                                         o / "warped.nii.gz", "--overwrite"], 2, "is the input"),
    ("apply-out-a-result-of-the-folder", lambda p, o: ["apply", o, p["moving"], "--out", o / "displacement.nii.gz",
                                                       "--overwrite"], 2, "one of the results in the register output folder"),
    ("apply-field-nan", lambda p, o: ["apply", p["nan"], p["moving"], "--out", o / "w.nii.gz"], 2, "TRANSFORM"),
    ("apply-2d-reference-3d-transform", lambda p, o: ["apply", o, p["moving"], "--reference", p["image2d"], "--out",
                                                      o / "w.nii.gz"], 2, "`--reference` is 2D"),
    ("learned-2d", lambda p, o: ["register", p["image2d"], p["image2d"], "--out", o / "new", "--solver", "learned",
                                 "--no-progress"], 2, "`--solver`/`--weights`: the network registers 3D images, FIXED and MOVING are 2D"),
    ("learned-lambda-2d", lambda p, o: ["register", p["image2d"], p["image2d"], "--out", o / "new", "--solver",
                                        "learned-lambda", "--no-progress"], 2, "the λ regressor registers 3D images"),
    ("moving-one-slice", lambda p, o: _register(p, o / "new", "--affine", "none", moving=p["slice1"], labels=False), 2,
     "`MOVING` has one voxel along an axis"),
    ("affine-three-slices", lambda p, o: _register(p, o / "new", moving=p["slab3"], labels=False), 2,
     "`MOVING` has fewer than 4 voxels"),
    ("eval-labels-without-labels", lambda p, o: _register(p, o / "new", "--eval-labels", "2,3", labels=False), 2,
     "`--eval-labels` chooses the labels"),
    ("demo-out-has-results", lambda p, o: ["demo", "--out", o], 2, "earlier run"),
    ("no-overlap-affine-none", lambda p, o: _register(p, o / "new", "--affine", "none", moving=p["far"], labels=False), 2,
     "do not overlap"),
    ("tune-resume-nothing", lambda p, o: ["tune", "--space", Path(__file__).parents[1] / "configs" / "tune_instance.yaml",
                                          "--trials", "1", "--out", o / "tune", "--resume"], 2, "--resume"),
    ("tune-out-below-file", lambda p, o: ["tune", "--space", Path(__file__).parents[1] / "configs" / "tune_instance.yaml",
                                          "--trials", "1", "--out", o / "metrics.json" / "t"], 2, "is a file"),
    ("space-name-too-long", lambda p, o: ["tune", "--space", "x" * 300 + ".yaml", "--trials", "1", "--out", o / "tune"], 2,
     "File name too long"),
    ("train-init-corrupt", lambda p, o: ["train", "--data", "bundled", "--out", o / "run", "--init", p["fixed"]], 2, "--init"),
    ("train-out-is-file", lambda p, o: ["train", "--data", "bundled", "--out", o / "metrics.json"], 2, "not a folder"),
]
CASES += [
    ("labels-uint32-wrap", lambda p, o: ["register", p["fixed"], p["moving"], "--out", o / "new", "--no-progress", "--config",
                                         p["quick"], "--fixed-labels", p["labels_uint32"], "--moving-labels",
                                         p["moving_labels"]], 2, "outside 0.."),
    ("labels-negative", lambda p, o: ["register", p["fixed"], p["moving"], "--out", o / "new", "--no-progress", "--config",
                                      p["quick"], "--fixed-labels", p["fixed_labels"], "--moving-labels",
                                      p["labels_negative"]], 2, "outside 0.."),
]


@pytest.fixture(scope="module")
def earlier(files, tmp_path_factory):
    """A folder holding the results of an earlier, successful run."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    assert main(_register(files, out)) == 0
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fault_gives_one_line_exit_2_and_loses_nothing(case, files, earlier, capsys):
    _, build, code, fragment = case
    before = _snapshot(earlier)
    parent_before = sorted(p.name for p in earlier.parent.iterdir())
    rc = main([str(a) for a in build(files, earlier)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == code
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in err[0], err
    assert not captured.out.strip(), captured.out  # refused before any work: nothing announced
    assert _snapshot(earlier) == before
    assert sorted(p.name for p in earlier.parent.iterdir()) == parent_before  # no staging folder, no new --out


@pytest.mark.parametrize("outputs", ["transforms", "metrics"])
def test_a_smaller_output_set_does_not_remove_the_users_files(files, tmp_path, capsys, outputs):
    """Files named like the outputs of another set (a run would remove them so that the folder
    holds one run's files) are refused without --overwrite; an input among them always."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("warped.nii.gz", "jacobian.nii.gz", "figure.png"):
        (out / name).write_bytes(b"the user's " + name.encode())
    shutil.copy(files["moving"], out / "inverse_displacement.nii.gz")
    before = _snapshot(out)
    for extra, fragment in (((), "earlier run"), (("--overwrite",), "would overwrite")):
        moving = out / "inverse_displacement.nii.gz" if extra else None
        rc = main([str(a) for a in _register(files, out, "--outputs", outputs, *extra, moving=moving)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and fragment in err[0], err
        assert _snapshot(out) == before


def test_apply_inverse_says_which_file_the_folder_lacks(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_register(files, out, "--outputs", "transforms")) == 0
    capsys.readouterr()
    rc = main(["apply", str(out), str(files["fixed_labels"]), "--labels", "--inverse", "--out", str(tmp_path / "b.nii.gz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "holds no inverse_transform.h5 (written by --outputs all only)" in err[0], err
    assert not (tmp_path / "b.nii.gz").exists()


def test_nan_voxels_are_outside_the_image(files, tmp_path, capsys):
    """A NaN voxel (no data: SPM writes NaN outside the brain) is filled and left out of the
    image match; the run says so and counts it in metrics.json; the outputs hold no NaN;
    ``apply`` keeps NaN voxels as NaN."""
    import json

    from hybridreg.io import read_image

    out = tmp_path / "out"
    assert main(_register(files, out, moving=files["nan"])) == 0
    assert "MOVING: 1 NaN voxels treated as outside the image" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["inputs"]["nan_voxels"] == {"fixed": 0, "moving": 1} and m["folding_percent"] < 0.01
    assert np.isfinite(read_image(out / "warped.nii.gz", nan="keep")[0]).all()
    img = sitk.ReadImage(str(files["moving"]), sitk.sitkFloat32)
    half = sitk.GetArrayFromImage(img) * 0
    half[:, :, :20] = 1
    mask = sitk.GetImageFromArray(half.astype(np.uint8))
    mask.CopyInformation(img)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    # NaN in FIXED, with a mask of FIXED's own: both leave voxels out
    assert main(["register", str(files["nan"]), str(files["fixed"]), "--out", str(tmp_path / "f"), "--no-progress",
                 "--config", str(files["quick"]), "--fixed-mask", str(tmp_path / "mask.nii.gz"), "--outputs", "metrics"]) == 0
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["inputs"]["nan_voxels"] == {"fixed": 1, "moving": 0}
    slab = sitk.GetArrayFromImage(img)
    slab[14:18] = np.nan
    nan_slab = sitk.GetImageFromArray(slab)
    nan_slab.CopyInformation(img)
    sitk.WriteImage(nan_slab, str(tmp_path / "slab.nii.gz"))
    zero = sitk.Image(img.GetSize(), sitk.sitkVectorFloat64, 3)  # the identity, as a displacement field
    zero.CopyInformation(img)
    sitk.WriteImage(zero, str(tmp_path / "identity.nii.gz"))
    assert main(["apply", str(tmp_path / "identity.nii.gz"), str(tmp_path / "slab.nii.gz"), "--out",
                 str(tmp_path / "applied.nii.gz")]) == 0
    applied = read_image(tmp_path / "applied.nii.gz", nan="keep")[0]  # SimpleITK's NIfTI reader returns NaN as 0
    assert np.array_equal(np.isnan(applied), np.isnan(slab))  # apply keeps no data as NaN


def test_overwrite_replaces_earlier_results(files, tmp_path):
    out = tmp_path / "out"
    assert main(_register(files, out)) == 0
    first = (out / "metrics.json").read_bytes()
    assert main(_register(files, out, "--overwrite")) == 0
    assert (out / "metrics.json").read_bytes() != first  # a new run (its timings differ)


def test_diverging_run_is_reported_and_not_written(files, tmp_path, capsys):
    """lr within its range but far too large for this pair: the optimisation collapses."""
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(QUICK + "lr: 100.0\nvelocity_smoothing: 0.0\n")
    out = tmp_path / "out"
    rc = main(_register(files, out, "--config", cfg))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "diverged" in err[0] and "lr" in err[0], err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["fast.yaml"]


def test_nan_weights_are_a_divergence(files, tmp_path, capsys):
    import torch

    from learned.solver import DEFAULT_WEIGHTS

    payload = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    for v in payload["state_dict"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(payload, bad)
    rc = main(_register(files, tmp_path / "out", "--solver", "learned", "--weights", bad, config=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "weights" in err[0], err
    assert not (tmp_path / "out").exists()


def test_2d_pair_registers_end_to_end(files, tmp_path):
    # whole slices of the two scans (a 64 mm crop without background gives the affine stage's
    # correlation nothing to hold on to: it shrinks the moving image and is refused as singular)
    fid, mid = data.demo_pair()
    f, m = data.load_subject(fid, 2), data.load_subject(mid, 2)
    paths = {}
    for key, path in (("fixed", f.image_path), ("moving", m.image_path), ("fixed_labels", f.labels_path),
                      ("moving_labels", m.labels_path)):
        paths[key] = tmp_path / f"{key}2d.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(path))[:, :, 56], str(paths[key]))
    out = tmp_path / "out"
    rc = main(["register", str(paths["fixed"]), str(paths["moving"]), "--out", str(out), "--no-progress", "--config",
               str(files["quick"]), "--fixed-labels", str(paths["fixed_labels"]), "--moving-labels", str(paths["moving_labels"])])
    assert rc == 0
    assert sitk.ReadImage(str(out / "displacement.nii.gz")).GetDimension() == 2


def test_unexpected_error_is_logged_with_exit_1(files, tmp_path, capsys, monkeypatch):
    import hybridreg.service as service

    def boom(*a, **k):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(service, "solve", boom)
    rc = main(_register(files, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "an internal bug" in err[0] and "full traceback in" in err[0]
    log = Path(err[0].rsplit("full traceback in ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    log.unlink()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_signals_exit_130_143_and_leave_nothing(files, tmp_path, sig, code):
    cfg = tmp_path / "long.yaml"
    cfg.write_text("level_spacing: [2.0]\niterations: [100000]\ntol: 0.0\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's file")
    # a test run started in the background by a shell ignores SIGINT, and its children inherit that: restore it
    proc = subprocess.Popen([sys.executable, "-m", "hybridreg", "register", str(files["fixed"]), str(files["moving"]),
                             "--out", str(out), "--config", str(cfg), "--no-progress"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(12)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.yaml", "out"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_train_without_a_computable_validation_fails_at_start_up(tmp_path, capsys):
    """One labelled validation subject and no atlas: no validation pair, so validation Dice
    (and model_best.pt) could never be computed: refused before any step, nothing written."""
    from hybridreg.io import Geometry, write_image

    geo = Geometry(size=(16, 14, 12), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(0)
    lines = ["image,labels,split"]
    for k, split in enumerate(["train", "train", "val"]):
        img = rng.random((12, 14, 16)).astype(np.float32)
        write_image(tmp_path / f"s{k}.nii.gz", img, geo)
        write_image(tmp_path / f"s{k}_seg.nii.gz", (img > 0.5).astype(np.int32), geo, dtype=np.int32)
        lines.append(f"s{k}.nii.gz,s{k}_seg.nii.gz,{split}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "cfg.yaml").write_text("network: {encoder: [4, 8], decoder: [8, 4], lambda_channels: 4}\nsteps: 2\npairing: subject\n")
    rc = main(["train", "--data", str(tmp_path / "manifest.csv"), "--config", str(tmp_path / "cfg.yaml"), "--out",
               str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no validation pair" in err[0], err
    assert not (tmp_path / "run").exists()


def test_damaged_weight_file_is_one_line(files, tmp_path, capsys):
    import torch

    from learned.solver import DEFAULT_WEIGHTS

    payload = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    bad = tmp_path / "missing_key.pt"
    torch.save(payload, bad)
    rc = main(_register(files, tmp_path / "out", "--solver", "learned", "--weights", bad, config=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "damaged" in err[0] and "weights_only" not in err[0], err


def test_too_little_disk_space_is_refused_before_the_run(files, tmp_path, capsys, monkeypatch):
    import collections

    import hybridreg.service as service

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(service.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(service, "solve", lambda *a, **k: pytest.fail("the run started"))
    rc = main(_register(files, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "MB free" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["register", "train", "tune"])
def test_a_read_only_out_is_refused_before_the_run(files, tmp_path, capsys, monkeypatch, command):
    """A folder on a read-only file system (running as root, permissions do not stop a write,
    so the file system's refusal is simulated): one line naming --out before any work."""
    import errno

    import hybridreg.service as service

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(service.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(service, "solve", lambda *a, **k: pytest.fail("the run started"))
    space = Path(__file__).parents[1] / "configs" / "tune_instance.yaml"
    argv = {"register": _register(files, tmp_path / "out"),
            "train": ["train", "--data", "bundled", "--out", str(tmp_path / "out"), "--set", "steps=1"],
            "tune": ["tune", "--space", str(space), "--trials", "1", "--out", str(tmp_path / "out")]}[command]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "`--out`" in err[0] and "Read-only file system" in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_out_folder_on_another_file_system_is_written(files, tmp_path, monkeypatch):
    """``--out`` a mount point (a container's volume, ``-v host:/out``): a file cannot be renamed
    into it from another file system (EXDEV), so the outputs are staged inside it, and no staging
    folder is left there."""
    import errno

    volume = tmp_path / "volume"
    volume.mkdir()
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if volume not in Path(src).parents and volume in Path(dst).parents:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert main(_register(files, volume)) == 0
    assert (volume / "metrics.json").is_file() and (volume / "transform.h5").is_file()
    assert not [q.name for q in volume.iterdir() if q.name.startswith(".")]


def test_apply_warps_a_slab_with_the_transform_made_for_it(files, tmp_path, capsys):
    """A moving slab that covers under 10 % of FIXED's grid registers; ``apply`` then warps that
    same image (on the grid the folder's transform was made for) instead of refusing it as a
    stranger, and still refuses another image that barely meets the output grid."""
    out = tmp_path / "out"
    assert main(_register(files, out, "--affine", "none", moving=files["slab3"], labels=False)) == 0
    assert main(["apply", str(out), str(files["slab3"]), "--out", str(tmp_path / "w.nii.gz")]) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nii.gz")))
    # the slab's faces cut through anatomy: warped.nii.gz is ITK's resampling, the same at the edge of its field of view
    assert np.array_equal(warped, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))) and warped.any()
    capsys.readouterr()
    other = sitk.ReadImage(str(files["slab3"]))
    other.SetOrigin([c + 0.5 for c in other.GetOrigin()])  # another grid: judged by its overlap
    sitk.WriteImage(other, str(tmp_path / "other.nii.gz"))
    assert main(["apply", str(out), str(tmp_path / "other.nii.gz"), "--out", str(tmp_path / "o.nii.gz")]) == 2
    assert "maps inside the image" in capsys.readouterr().err


def test_outside_movings_field_of_view_is_its_lowest_value(files, tmp_path):
    """A CT-like MOVING (int16, air −1000) on a three-slice slab: ``warped.nii.gz`` and ``apply``
    fill the fixed grid outside the slab with −1000 (air), not 0 (water), and equal SimpleITK's
    resampling through ``transform.h5`` with that default value."""
    slab = sitk.ReadImage(str(files["slab3"]), sitk.sitkFloat32)
    ct = sitk.Cast(slab * 3.0 - 1000.0, sitk.sitkInt16)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    out = tmp_path / "out"
    assert main(_register(files, out, "--affine", "none", moving=tmp_path / "ct.nii.gz", labels=False)) == 0
    assert main(["apply", str(out), str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "w.nii.gz")]) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"))).astype(np.float64)
    applied = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.nii.gz"))).astype(np.float64)
    theirs = sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), sitk.ReadImage(str(files["fixed"])), sitk.ReadTransform(str(out / "transform.h5")),
                           sitk.sitkLinear, -1000.0)
    assert np.array_equal(warped, applied) and np.array_equal(warped, sitk.GetArrayFromImage(theirs).astype(np.float64))
    assert (warped == -1000).mean() > 0.8 and not (warped == 0).any()  # the slab is 3 of 32 slices


def test_a_mask_of_0_and_255_is_the_mask_of_0_and_1(files, tmp_path, capsys):
    """Image editors save masks as 0/255: such a mask was refused as not binary. A mask of 0 and one
    other value now acts as that 0/1 mask (the same result); three values are still refused."""
    fixed = sitk.ReadImage(str(files["fixed"]))
    arr = (sitk.GetArrayFromImage(fixed) > 20).astype(np.uint8)
    for name, values in (("m01", arr), ("m255", arr * 255), ("m012", arr + (arr * (np.arange(arr.shape[-1]) > 16)))):
        img = sitk.GetImageFromArray(values.astype(np.uint8))
        img.CopyInformation(fixed)
        sitk.WriteImage(img, str(tmp_path / f"{name}.nii.gz"))
    for name in ("m01", "m255"):
        assert main(_register(files, tmp_path / name, "--fixed-mask", tmp_path / f"{name}.nii.gz", "--outputs", "metrics")) == 0
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("m01", "m255"))
    assert a["dice_after"] == b["dice_after"] and a["sdlogj"] == b["sdlogj"]
    capsys.readouterr()
    assert main(_register(files, tmp_path / "m012", "--fixed-mask", tmp_path / "m012.nii.gz")) == 2
    assert "`--fixed-mask`: " in capsys.readouterr().err and not (tmp_path / "m012").exists()


def test_results_another_run_wrote_meanwhile_are_kept(files, tmp_path, capsys, monkeypatch):
    """Two runs given one new ``--out``: both find it free, and the one that finishes second
    used to remove the first's files (no ``--overwrite`` given). It now keeps them and writes nothing."""
    import hybridreg.service as service

    out = tmp_path / "shared"
    solve = service.solve

    def other_run_finishes_first(*args, **kwargs):
        solved = solve(*args, **kwargs)
        out.mkdir()
        (out / "metrics.json").write_text('{"the other run": 1}')
        return solved

    monkeypatch.setattr(service, "solve", other_run_finishes_first)
    assert main(_register(files, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another run wrote results there while this one worked (metrics.json)" in err[0], err
    assert _snapshot(out) == {"metrics.json": b'{"the other run": 1}'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no staging folder left


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(files, tmp_path):
    """SIGKILL while writing leaves the hidden staging folder (no clean-up runs); the next run into
    that ``--out`` removes it, as nothing holds its lock any more, and leaves alone a folder whose
    lock a live process holds, a young one and one without a lock file."""
    import fcntl

    out = tmp_path / "out"
    stale, live, young, unknown = (tmp_path / f".out.partial-{n}" for n in ("stale", "live", "young", "unknown"))
    for q in (stale, live, young, unknown):
        q.mkdir()
        (q / "warped.nii.gz").write_bytes(b"half")
        if q is not unknown:
            (q / ".lock").write_text("")
    for q in (stale, live):
        os.utime(q / ".lock", (time.time() - 60, time.time() - 60))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a');"
                               " fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(live / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_register(files, out, labels=False)) == 0
        assert not stale.exists() and live.exists() and young.exists() and unknown.exists()
        assert (out / "metrics.json").is_file() and not list(out.glob(".out.partial-*"))
    finally:
        holder.kill()
        holder.wait()
    with open(live / ".lock") as fh:  # the holder's death released it: stale now
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.slow
def test_a_file_that_fails_to_write_leaves_nothing(files, earlier, capsys, monkeypatch):
    """A writer that fails while the others write in parallel (the disk fills up while
    transform.h5 is written): one line, exit 2, and the earlier results in --out untouched, with
    no staging folder left beside it."""
    import hybridreg.service as service

    def full(path, transform):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(service, "write_transform", full)
    before = _snapshot(earlier)
    parent_before = sorted(p.name for p in earlier.parent.iterdir())
    rc = main(_register(files, earlier, "--overwrite"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert _snapshot(earlier) == before
    assert sorted(p.name for p in earlier.parent.iterdir()) == parent_before


def test_transform_files_are_written_one_at_a_time(files, tmp_path, monkeypatch):
    """ITK's HDF5 transform writer is not thread-safe: two transform.h5 files written at once
    crashed the process (a segmentation fault in CI). The image files still go in parallel, the
    transform files one after the other, even with more writer threads than files."""
    import threading

    import torch

    import hybridreg.service as service

    lock, state = threading.Lock(), {"now": 0, "most": 0, "calls": 0}
    real = service.write_transform

    def watched(path, transform):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["calls"] += 1
        time.sleep(0.3)  # long enough for a second transform writer to start if it could
        try:
            return real(path, transform)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(service, "write_transform", watched)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # a pool with a worker for every file
    out = tmp_path / "out"
    assert main(_register(files, out)) == 0
    assert state["calls"] == 2 and state["most"] == 1, state  # transform.h5 and inverse_transform.h5
    for name in service.OUTPUT_FILES:
        assert (out / name).is_file(), name
    assert sitk.ReadTransform(str(out / "transform.h5")) is not None
    assert sitk.ReadTransform(str(out / "inverse_transform.h5")) is not None


def test_a_full_disk_is_one_error_naming_the_file_and_no_cut_image_is_kept(tmp_path, monkeypatch):
    """SimpleITK's NIfTI writer reports a full disk on stderr only: `apply` exited 0 with a cut
    `.nii.gz` under the final name. HDF5 and torch.save raise RuntimeError there, which the CLI
    took for a bug (exit 1). Both are now OSError ENOSPC naming the file, and nothing is left."""
    import collections
    import errno

    import hybridreg.config as config
    from hybridreg.io import Geometry, write_image

    geo = Geometry.of(sitk.Image(12, 10, 8, sitk.sitkFloat32))
    arr = np.random.default_rng(0).random((8, 10, 12)).astype(np.float32)
    real = sitk.WriteImage

    def cut_short(image, path, *args):  # what the NIfTI writer leaves on a full disk, without raising
        real(image, path, *args)
        Path(path).write_bytes(Path(path).read_bytes()[:-40])

    for name in ("cut.nii.gz", "cut.nii"):
        monkeypatch.setattr(sitk, "WriteImage", cut_short)
        with pytest.raises(OSError, match=f"wrote .*{name} incompletely"):
            write_image(tmp_path / name, arr, geo)
        monkeypatch.setattr(sitk, "WriteImage", real)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "a cut file or its temporary was left"
        write_image(tmp_path / name, arr, geo)  # written whole, it passes the check
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))), arr)
        (tmp_path / name).unlink()

    def hdf5_fails(path):
        Path(path).write_bytes(b"\0" * 100)
        raise RuntimeError("H5Dwrite failed")

    usage = collections.namedtuple("usage", "total used free")
    with pytest.raises(RuntimeError, match="H5Dwrite"):  # with space left, the writer's own error
        with config.atomic_output(tmp_path / "transform.h5") as tmp:
            hdf5_fails(tmp)
    monkeypatch.setattr(config.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=r"no space left on the device: cannot write .*transform.h5") as e:
        with config.atomic_output(tmp_path / "transform.h5") as tmp:
            hdf5_fails(tmp)
    assert e.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []

    def itk_fails(image, path, *args):  # a header and its data file go through a hidden folder, not atomic_output
        Path(path).with_suffix(".zraw").write_bytes(b"\0" * 100)
        raise RuntimeError("MetaImage: M_WriteElementsData: file stream is fail after write")

    monkeypatch.setattr(sitk, "WriteImage", itk_fails)
    with pytest.raises(OSError, match=r"no space left on the device: cannot write .*cut.mhd"):
        write_image(tmp_path / "cut.mhd", arr, geo)
    assert list(tmp_path.iterdir()) == []


def test_the_disk_space_check_counts_the_outputs_asked_for(files, tmp_path, capsys, monkeypatch):
    """`--outputs metrics` (a few kB) was refused on a disk with 3 MB free: "the outputs need about 59 MB"."""
    import collections

    import hybridreg.service as service

    assert service.output_bytes(service.OUTPUT_SETS["metrics"], 10**6, 3) == 2**20
    assert service.output_bytes(service.OUTPUT_SETS["all"], 10**6, 3) == (3 * 4 + 2 * 12 + 2 * 24) * 10**6 + 2**20
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(service.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 3 * 2**20, 3 * 2**20))
    monkeypatch.setattr(service, "solve", lambda *a, **k: pytest.fail("the run started"))
    assert main(_register(files, tmp_path / "all")) == 2
    assert "MB free" in capsys.readouterr().err
    with pytest.raises(pytest.fail.Exception, match="the run started"):  # past the check: the run starts
        main(_register(files, tmp_path / "metrics") + ["--outputs", "metrics"])


def test_a_search_space_in_the_tuning_folder_under_an_output_name_is_refused(tmp_path, capsys):
    """`tune --space out/best_config.yaml --out out` replaced the user's search space with the run's result."""
    out = tmp_path / "tuned"
    out.mkdir()
    shutil.copy(Path(__file__).parents[1] / "configs" / "tune_instance.yaml", out / "best_config.yaml")
    before = _snapshot(out)
    for extra, fragment in (((), "is a file this run writes in `--out`"), (("--resume",), "no trials.json to resume")):
        assert main(["tune", "--space", str(out / "best_config.yaml"), "--trials", "1", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert _snapshot(out) == before


def test_a_training_config_in_the_run_folder_under_an_output_name_is_named(tmp_path, capsys):
    """`train --config OUT/config.yaml --out OUT` (a fresh run) was refused as "already holds a training run"."""
    from hybridreg.config import among_outputs
    from learned.train import RUN_FILES

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 1\n")
    assert main(["train", "--data", "bundled", "--out", str(run), "--config", str(run / "config.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`--config`" in err[0] and "is a file this run writes in `--out`" in err[0], err
    assert (run / "config.yaml").read_text() == "steps: 1\n" and sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    # by its name in the folder or by the file it links to, through a linked folder too
    (tmp_path / "elsewhere.pt").write_bytes(b"w")
    (run / "model_best.pt").symlink_to(tmp_path / "elsewhere.pt")
    (tmp_path / "mine.pt").symlink_to(run / "config.yaml")
    (tmp_path / "via").symlink_to(run)
    assert among_outputs(run / "model_best.pt", run, RUN_FILES) and among_outputs(tmp_path / "mine.pt", run, RUN_FILES)
    assert among_outputs(tmp_path / "via" / "checkpoint_4.pt", run, RUN_FILES)
    assert not among_outputs(tmp_path / "elsewhere.pt", run, RUN_FILES) and not among_outputs(run / "notes.pt", run, RUN_FILES)
