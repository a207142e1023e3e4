"""The CLI end to end on bundled data, and its bad-input contract."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from hybridreg import data
from hybridreg.cli import OUTPUT_FILES, main
from hybridreg.io import Geometry, write_image

QUICK = "level_spacing: [8, 4]\niterations: [30, 20]\n"


@pytest.fixture(scope="module")
def bundled():
    fid, mid = data.demo_pair()
    return data.load_subject(fid, 2), data.load_subject(mid, 2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled):
    f, m = bundled
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "quick.yaml"
    cfg.write_text(QUICK)
    out = root / "out"
    rc = main(["register", str(f.image_path), str(m.image_path), "--out", str(out), "--fixed-labels", str(f.labels_path),
               "--moving-labels", str(m.labels_path), "--config", str(cfg), "--no-progress"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_register_writes_every_output(run_dir):
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(OUTPUT_FILES)
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("dice_before", "dice_after", "hd95_mm_after", "folding_percent", "sdlogj", "seconds", "peak_memory_mb", "config"):
        assert key in m
    # "auto": the standard FreeSurfer structures present in both maps (the synthetic subjects
    # have no 24, 31, 63 — see hybridreg/data/bundled/README.md)
    assert m["labels_scored"] == [lab for lab in data.evaluation_labels() if lab not in (24, 31, 63)]
    assert m["dice_after"]["mean"] > m["dice_before"]["mean"]
    assert m["config"]["iterations"] == [30, 20]
    assert m["warnings"] == [] and not any(level["kept_start"] for level in m["levels"])


@pytest.mark.slow
def test_exported_displacement_reproduces_warped_in_simpleitk(run_dir, bundled):
    _, mv = bundled
    field = sitk.ReadImage(str(run_dir / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    affine = sitk.ReadTransform(str(run_dir / "affine.mat"))
    moving = sitk.ReadImage(str(mv.image_path), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(run_dir / "warped.nii.gz"))
    # the displacement applies first, then the affine stage (transform.h5 holds both)
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])))
    ours = sitk.GetArrayFromImage(fixed)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.99


@pytest.mark.slow
def test_outputs_keep_physical_space(run_dir, bundled):
    f, _ = bundled
    ref = sitk.ReadImage(str(f.image_path))
    for name in ("warped.nii.gz", "displacement.nii.gz", "lambda.nii.gz", "jacobian.nii.gz"):
        img = sitk.ReadImage(str(run_dir / name))
        assert Geometry.of(img).matches(Geometry.of(ref), 1e-4), name


@pytest.mark.slow
def test_apply_warps_labels_like_register(run_dir, bundled, tmp_path):
    f, m = bundled
    out = tmp_path / "warped_labels.nii.gz"
    assert main(["apply", str(run_dir), str(m.labels_path), "--out", str(out), "--labels"]) == 0
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.unique(warped)) <= set(np.unique(m.labels))
    from hybridreg.metrics import dice

    m = json.loads((run_dir / "metrics.json").read_text())
    after = np.nanmean(list(dice(f.labels, warped, m["labels_scored"]).values()))
    assert after == pytest.approx(m["dice_after"]["mean"], abs=0.005)  # SimpleITK resampling vs our nearest warp


@pytest.mark.slow
def test_a_level_that_kept_its_start_is_written_with_a_warning(bundled, tmp_path, capsys):
    """An image against itself with no affine stage: the identity is the optimum, so a level of
    20 iterations (KEEP_START_ITERATIONS) ends uphill and keeps its start (see
    test_a_level_that_ends_uphill_hands_on_its_start). The result is still written, and the
    user is told on stderr and in metrics.json which level did not descend."""
    f, _ = bundled
    cfg = tmp_path / "one_level.yaml"
    cfg.write_text("level_spacing: [8]\niterations: [20]\n")
    out = tmp_path / "out"
    assert main(["register", str(f.image_path), str(f.image_path), "--out", str(out), "--affine", "none",
                 "--config", str(cfg), "--no-progress"]) == 0
    err = capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["levels"][0]["kept_start"] and len(m["warnings"]) == 1
    assert m["warnings"][0].startswith("stage 1/1 (") and "did not descend" in m["warnings"][0]
    assert f"hybridreg register: warning: {m['warnings'][0]}" in err.splitlines()
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "hybridreg.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "register" in res.stdout


def _fail(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    return err


@pytest.fixture()
def files(tmp_path, bundled):
    f, m = bundled
    geo = Geometry.of(sitk.ReadImage(str(f.image_path)))
    d = {"fixed": str(f.image_path), "moving": str(m.image_path), "fl": str(f.labels_path), "ml": str(m.labels_path)}
    inf = f.image.copy()
    inf[10, 10, 10] = np.inf
    write_image(tmp_path / "inf.mha", inf, geo)
    d["inf"] = str(tmp_path / "inf.mha")
    small = Geometry(tuple(n - 2 for n in geo.size), geo.spacing, geo.origin, geo.direction)
    write_image(tmp_path / "small.nii.gz", f.image[1:-1, 1:-1, 1:-1], small)
    d["small"] = str(tmp_path / "small.nii.gz")
    write_image(tmp_path / "small_labels.nii.gz", f.labels[1:-1, 1:-1, 1:-1], small, dtype=np.int32)
    d["small_labels"] = str(tmp_path / "small_labels.nii.gz")
    write_image(tmp_path / "img2d.nii.gz", f.image[40], Geometry(geo.size[:2], geo.spacing[:2], geo.origin[:2], (1.0, 0.0, 0.0, 1.0)))
    d["2d"] = str(tmp_path / "img2d.nii.gz")
    write_image(tmp_path / "frac.nii.gz", f.labels + 0.5, geo)
    d["frac"] = str(tmp_path / "frac.nii.gz")
    write_image(tmp_path / "other.nii.gz", (f.labels > 0) * 999, geo, dtype=np.int32)
    d["other"] = str(tmp_path / "other.nii.gz")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage")
    d["corrupt"] = str(tmp_path / "corrupt.nii.gz")
    (tmp_path / "bad.yaml").write_text("objective:\n  w_reg: -3\n")
    d["badcfg"] = str(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("iteratons: [3]\n")
    d["typo"] = str(tmp_path / "typo.yaml")
    return d


@pytest.mark.parametrize(
    "argv,needle",
    [
        (lambda d: [d["fixed"], d["moving"], "--fixed-labels", d["small_labels"], "--moving-labels", d["ml"]], "different grids"),
        (lambda d: [d["fixed"], d["2d"]], "MOVING.* is 2D but `FIXED` is 3D"),
        (lambda d: [d["fixed"], d["inf"]], "MOVING.*Inf"),
        (lambda d: [d["fixed"], d["fixed"] + ".missing"], "MOVING.*not found"),
        (lambda d: [d["corrupt"], d["moving"]], "FIXED.*cannot read"),
        (lambda d: [d["fixed"], d["moving"], "--fixed-labels", d["frac"], "--moving-labels", d["ml"]], "--fixed-labels.*non-integer"),
        (lambda d: [d["fixed"], d["moving"], "--fixed-labels", d["fl"], "--moving-labels", d["other"]], "share no"),
        (lambda d: [d["fixed"], d["moving"], "--fixed-labels", d["fl"]], "together"),
        (lambda d: [d["fixed"], d["moving"], "--config", d["badcfg"]], "w_reg"),
        (lambda d: [d["fixed"], d["moving"], "--config", d["typo"]], "iteratons"),
        (lambda d: [d["fixed"], d["moving"], "--config", d["fixed"] + ".yaml"], "--config.*not found"),
        (lambda d: [d["fixed"], d["moving"], "--device", "tpu:7"], "--device"),
    ],
)
def test_bad_input_clear_error_and_no_output(files, tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    err = _fail(["register", *argv(files), "--out", str(out), "--no-progress"], capsys)
    import re

    assert re.search(needle, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no staging left behind


@pytest.mark.parametrize("argv, needle", [
    (["register", "F.nii.gz", "M.nii.gz", "--solver", "nope"], "argument --solver: invalid choice: 'nope'"),
    (["register", "F.nii.gz", "M.nii.gz", "--eval-labels", "bogus"],  # checked without label maps too
     "argument --eval-labels: must be 'auto', 'all' or comma-separated ints, got 'bogus'"),
    (["batch", "pairs.csv", "--eval-labels", "2,x"], "argument --eval-labels: must be"),
    (["register", "F.nii.gz"], "the following arguments are required: MOVING"),
    (["tune", "--space", "s.yaml", "--trials", "two"], "argument --trials: invalid int value: 'two'"),
])
def test_usage_errors_are_one_line_naming_the_argument(tmp_path, capsys, argv, needle):
    """argparse's usage errors follow the CLI's rule for bad input: one line, exit code 2, before any work."""
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err and err.startswith("hybridreg "), err
    assert not out.exists()


def test_apply_bad_field(files, tmp_path, capsys):
    err = _fail(["apply", files["fixed"], files["moving"], "--out", str(tmp_path / "x.nii.gz")], capsys)
    assert "TRANSFORM" in err and "not a displacement field" in err


@pytest.mark.parametrize("mode", ["map", "regions"])
def test_lambda_strategies_from_the_cli(tmp_path, bundled, mode, capsys):
    """MAP-estimated global λ and region-wise λ (issue: every regularization strategy) run from
    `--set lambda_mode=...`, report their λ in metrics.json; regions need FIXED's labels."""
    f, m = bundled
    args = ["register", str(f.image_path), str(m.image_path), "--set", f"lambda_mode={mode}", "--set", "level_spacing=[8]",
            "--set", "iterations=[20]", "--set", "control_factor=[2]", "--outputs", "metrics", "--no-progress", "--affine", "none"]
    out = tmp_path / "out"
    assert main(args + ["--out", str(out), "--fixed-labels", str(f.labels_path), "--moving-labels", str(m.labels_path)]) == 0
    lam = json.loads((out / "metrics.json").read_text())["lambda"]
    assert lam["mode"] == mode
    if mode == "map":
        assert lam["std"] < 1e-4 * lam["mean"] and lam["mean"] > 0 and lam["mean"] != 0.5  # one estimated value
    else:
        assert len(lam["per_region"]) > 10 and len(set(lam["per_region"].values())) > 1
        capsys.readouterr()
        assert main(args + ["--out", str(tmp_path / "none")]) == 2
        assert "--fixed-labels" in capsys.readouterr().err
        assert not (tmp_path / "none" / "metrics.json").exists()


@pytest.mark.parametrize("solver, mode", [("learned", "voxelwise"), ("learned-lambda", "uniform")])
def test_a_networks_lambda_mode_is_reported(tmp_path, bundled, solver, mode):
    """The network-based solvers' configs name no λ strategy: metrics.json reports what the
    result holds, a λ map from the network's head or the regressor's one λ (was null)."""
    f, m = bundled
    out = tmp_path / "out"
    assert main(["register", str(f.image_path), str(m.image_path), "--out", str(out), "--solver", solver, "--outputs",
                 "metrics", "--no-progress", "--affine", "none"]) == 0
    assert json.loads((out / "metrics.json").read_text())["lambda"]["mode"] == mode


def test_a_ctrl_c_while_the_command_starts_is_one_line(tmp_path):
    """The entry point imports torch (about a second) inside its own error boundary: a Ctrl-C
    then ends in one line and exit code 130, as it does later, with nothing written."""
    out = tmp_path / "out"
    script = (
        "import builtins, sys\n"
        "import hybridreg.__main__ as entry\n"
        "assert 'torch' not in sys.modules, 'the entry point imported torch outside its boundary'\n"
        "real = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'torch':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        f"sys.exit(entry.main(['demo', '--out', {str(out)!r}]))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 130, run.stderr
    assert run.stderr.strip() == "hybridreg: interrupted while starting; nothing was written"
    assert run.stdout == "" and not out.exists()


def test_the_docs_configs_run_from_any_folder(tmp_path, bundled, monkeypatch, capsys):
    """`--config configs/NAME.yaml`, as the README writes it, reads the copy shipped in the package
    where the folder has no such file (a pip install has no configs/ folder); a file of the user's
    at that path is always theirs; a name that is not shipped is still refused."""
    f, m = bundled
    monkeypatch.chdir(tmp_path)
    args = ["register", str(f.image_path), str(m.image_path), "--set", "level_spacing=[8]", "--set", "iterations=[5]",
            "--set", "control_factor=[2]", "--outputs", "metrics", "--no-progress", "--affine", "none"]
    assert main(args + ["--out", "shipped", "--config", "configs/instance_map.yaml"]) == 0
    assert "reading the copy shipped with hybridreg" in capsys.readouterr().err
    assert json.loads((tmp_path / "shipped" / "metrics.json").read_text())["lambda"]["mode"] == "map"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "instance_map.yaml").write_text("lambda_mode: uniform\n")
    assert main(args + ["--out", "own", "--config", "configs/instance_map.yaml"]) == 0
    assert "shipped" not in capsys.readouterr().err
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["lambda"]["mode"] == "uniform"
    assert main(args + ["--out", "none", "--config", "configs/not_shipped.yaml"]) == 2
    assert "`--config`: YAML file not found: configs/not_shipped.yaml" in capsys.readouterr().err
