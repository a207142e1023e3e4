"""``hybridreg batch``: manifests (CSV, JSON, Learn2Reg / LUMIR dataset.json), the per-pair
outputs and the merged table, failures recorded while the others go on, resuming without
redoing a finished pair, refusing other settings, torchrun sharding equal to one process;
and the ``--set`` override syntax of every config key."""

import csv
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from hybridreg import data
from hybridreg.batch import merge, read_pairs
from hybridreg.cli import main
from hybridreg.config import apply_overrides
from hybridreg.io import file_sha256
from hybridreg.service import OUTPUT_SETS
from instance_opt.solver import InstanceOptConfig

QUICK = "level_spacing: [4.0]\niterations: [6]\n"
SUBJECTS = ("vxm", "synthseg_12", "synthseg_16")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """Three bundled 2 mm subjects cropped to 40x48x40 in the Learn2Reg layout
    (imagesTr/, labelsTr/), a quick config, and a corrupt image."""
    root = tmp_path_factory.mktemp("batch")
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir()
    for sid in SUBJECTS:
        s = data.load_subject(sid, 2)
        for folder, path in (("imagesTr", s.image_path), ("labelsTr", s.labels_path)):
            img = sitk.ReadImage(str(path))
            sitk.WriteImage(img[20:60, 24:72, 20:60], str(root / folder / f"{sid}.nii.gz"))
    (root / "imagesTr" / "broken.nii.gz").write_bytes(b"\x1f\x8b not an image")
    (root / "quick.yaml").write_text(QUICK)
    return root


def _csv(root: Path, rows: list[dict], name: str = "pairs.csv") -> Path:
    path = root / name
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def _pair(f: str, m: str, labels: bool = True, **extra) -> dict:
    row = {"fixed": f"imagesTr/{f}.nii.gz", "moving": f"imagesTr/{m}.nii.gz"}
    if labels:
        row.update(fixed_labels=f"labelsTr/{f}.nii.gz", moving_labels=f"labelsTr/{m}.nii.gz")
    return {**row, **extra}


def _batch(manifest, out, *extra):
    return ["batch", str(manifest), "--out", str(out), "--config", str(manifest.parent / "quick.yaml"), "--affine", "none",
            "--no-progress", *map(str, extra)]


def _table(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- manifests

def test_manifests_csv_json_and_learn2reg(layout):
    rows = [_pair("vxm", "synthseg_12"), _pair("synthseg_12", "vxm", labels=False, id="back")]
    from_csv = read_pairs(_csv(layout, rows))
    (layout / "pairs.json").write_text(json.dumps(rows))
    from_json = read_pairs(layout / "pairs.json")
    assert from_csv == from_json
    assert [p.id for p in from_csv] == ["vxm__synthseg_12", "back"]
    assert from_csv[0].fixed_labels == str(layout / "labelsTr" / "vxm.nii.gz") and from_csv[1].fixed_labels is None
    # Learn2Reg / LUMIR: pair lists of {"fixed", "moving"}; labels from "training" or the labelsTr/ sibling
    doc = {"name": "tiny", "training": [{"image": "./imagesTr/vxm.nii.gz", "label": "./labelsTr/vxm.nii.gz"}],
           "registration_val": [{"fixed": "./imagesTr/vxm.nii.gz", "moving": "./imagesTr/synthseg_16.nii.gz"}],
           "registration_test": [{"fixed": "./imagesTr/synthseg_12.nii.gz", "moving": "./imagesTr/vxm.nii.gz"}]}
    (layout / "dataset.json").write_text(json.dumps(doc))
    val = read_pairs(layout / "dataset.json")  # the default split: registration_val
    assert len(val) == 1 and val[0].id == "vxm__synthseg_16"
    assert Path(val[0].fixed_labels).name == "vxm.nii.gz" and Path(val[0].moving_labels).parent.name == "labelsTr"
    test = read_pairs(layout / "dataset.json", "registration_test")
    assert Path(test[0].fixed_labels) == layout / "labelsTr" / "synthseg_12.nii.gz"


@pytest.mark.parametrize("rows,split,error,needle", [
    ([{"fixed": "imagesTr/vxm.nii.gz", "moving": "imagesTr/nope.nii.gz"}], None, FileNotFoundError, "row 1.*moving.*not found"),
    ([{"fixed": "imagesTr/vxm.nii.gz"}], None, ValueError, "row 1 needs non-empty `fixed` and `moving`"),
    ([{**_pair("vxm", "synthseg_12"), "weight": "1"}], None, ValueError, r"unknown column\(s\) \['weight'\]"),
    ([_pair("vxm", "synthseg_12"), _pair("vxm", "synthseg_12")], None, ValueError, "row 2: id .* repeats"),
    ([_pair("vxm", "synthseg_12", id="a/b")], None, ValueError, "row 1: `id` 'a/b'"),
    ([{**_pair("vxm", "synthseg_12", labels=False), "fixed_labels": "labelsTr/vxm.nii.gz"}], None, ValueError,
     "row 1: `fixed_labels` and `moving_labels` must be given together"),
    ([_pair("vxm", "synthseg_12")], "validation", ValueError, "--split.*dataset.json"),
    ([], None, ValueError, "lists no pairs"),
])
def test_manifest_errors_name_the_row(layout, rows, split, error, needle):
    path = layout / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(error, match=needle):
        read_pairs(path, split)


def test_a_label_map_off_its_images_grid_is_refused_before_any_pair_runs(layout, tmp_path, capsys):
    """A row whose label map (or mask) is not on its image's grid is found from the headers when
    the manifest is read, naming the row and the columns, not when that pair's turn comes."""
    img = sitk.ReadImage(str(layout / "labelsTr" / "synthseg_12.nii.gz"))
    img.SetOrigin((5.0, 0.0, 0.0))
    shifted = tmp_path / "shifted.nii.gz"
    sitk.WriteImage(img, str(shifted))
    rows = [_pair("vxm", "synthseg_12", id="fine"), {**_pair("vxm", "synthseg_12", id="off"), "moving_labels": str(shifted)}]
    path = _csv(layout, rows, "offgrid.csv")
    with pytest.raises(ValueError, match=r"row 2: `moving` and `moving_labels` are on different grids.*resample"):
        read_pairs(path)
    out = tmp_path / "out"
    assert main(_batch(path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 2" in err[0] and not (out / "pairs").exists()


def test_a_manifest_with_a_byte_order_mark_is_read(layout):
    """Excel's "CSV UTF-8" (and some editors' JSON) start with a byte-order mark, which made the
    first column read as '\\ufefffixed'; it is dropped."""
    rows = [_pair("vxm", "synthseg_12")]
    plain = read_pairs(_csv(layout, rows))
    bom = layout / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (layout / "pairs.csv").read_bytes())
    (layout / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert read_pairs(bom) == plain == read_pairs(layout / "bom.json")


def test_a_made_up_id_says_where_it_came_from(layout, tmp_path):
    import shutil

    shutil.copy(layout / "imagesTr" / "vxm.nii.gz", layout / "imagesTr" / "vxm copy.nii.gz")
    with pytest.raises(ValueError, match=r"`id` 'vxm__vxm copy' \(made from the file names: give the row an `id` column\)"):
        read_pairs(_csv(layout, [_pair("vxm", "vxm copy", labels=False)], "spaces.csv"))
    assert read_pairs(_csv(layout, [_pair("vxm", "vxm copy", labels=False, id="ok")], "spaces.csv"))[0].id == "ok"


def test_eval_labels_with_unlabelled_pairs_is_refused_as_in_register(layout, tmp_path, capsys):
    """`register --eval-labels 17,53` without label maps is refused; `batch` ignored it for the pairs
    without labels and marked them done without Dice. It now refuses before any pair runs."""
    manifest = _csv(layout, [_pair("vxm", "synthseg_12"), _pair("synthseg_12", "vxm", labels=False, id="nolabels")], "mixed.csv")
    assert main(_batch(manifest, tmp_path / "b", "--eval-labels", "17,53")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`--eval-labels` '17,53' needs label maps, and 1 pair(s) have none (nolabels)" in err[0], err
    assert not (tmp_path / "b").exists()


def test_batch_never_replaces_files_it_did_not_write(layout, tmp_path, capsys):
    """A manifest called metrics.csv in its own --out was replaced by the result table (exit 0), a user's
    summary.md was overwritten, and a batch.json no batch run wrote crashed the run (TypeError, exit 1)."""
    out = tmp_path / "mc"
    out.mkdir()
    manifest = _csv(out, [{k: str(layout / v) for k, v in _pair("vxm", "synthseg_12").items()}], "metrics.csv")
    before = manifest.read_bytes()
    (out / "summary.md").write_text("my notes")
    cmd = ["--config", str(layout / "quick.yaml"), "--affine", "none", "--no-progress"]
    assert main(["batch", str(manifest), "--out", str(out), *cmd]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds metrics.csv, summary.md, which a batch run writes" in err[0], err
    assert manifest.read_bytes() == before and (out / "summary.md").read_text() == "my notes"
    assert not (out / "batch.json").exists()
    other = tmp_path / "mj"
    other.mkdir()
    (other / "batch.json").write_text("[1, 2]")
    assert main(["batch", str(manifest), "--out", str(other), *cmd]) == 2
    assert "holds a batch.json that cannot be read as a batch run's settings" in capsys.readouterr().err
    assert (other / "batch.json").read_text() == "[1, 2]"


def test_dataset_json_unknown_split(layout):
    (layout / "d2.json").write_text(json.dumps({"validation": [{"fixed": "imagesTr/vxm.nii.gz", "moving": "imagesTr/vxm.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"--split.*'test'.*\['validation'\]"):
        read_pairs(layout / "d2.json", "test")


def test_a_resume_with_other_region_weights_or_default_is_refused(tmp_path):
    from hybridreg.batch import _check_settings, _region_settings, _settings
    from learned.solver import ConditionalConfig

    def settings(**kw):
        return _settings([], {"solver": "learned-conditional", "region_lambda": _region_settings(ConditionalConfig(**kw))})

    assert _region_settings(ConditionalConfig()) is None
    _check_settings(tmp_path, settings(region_lambda={2: 0.5}))
    _check_settings(tmp_path, settings(region_lambda={2: 0.5}))  # the same weights: a resume
    for other in ({"region_lambda": {2: 0.6}}, {"region_lambda": {2: 0.5}, "region_default": 2.0}):
        with pytest.raises(ValueError, match=r"other settings \(options \['region_lambda'\]"):
            _check_settings(tmp_path, settings(**other))


# ----------------------------------------------------------------------------- runs

@pytest.mark.slow
def test_batch_records_failures_goes_on_and_resumes_without_redoing(layout, tmp_path, capsys):
    rows = [_pair("vxm", "synthseg_12"), _pair("vxm", "broken", labels=False), _pair("synthseg_16", "vxm")]
    manifest = _csv(layout, rows, "with_broken.csv")
    out = tmp_path / "run"
    assert main([a for a in _batch(manifest, out) if a != "--no-progress"]) == 3  # finished, but a pair failed
    printed, err = capsys.readouterr()
    assert "2 of 3 pairs registered, 1 failed" in printed
    # progress where stderr is not a terminal (a log file): one line per pair, counted, no bar
    done = [line for line in err.splitlines() if line.startswith("pair ") and " done " in line]
    assert done[0].startswith("pair vxm__synthseg_12 done (1 of 3): Dice") and "\r" not in err
    assert done[1].startswith("pair synthseg_16__vxm done (3 of 3): Dice") and len(done) == 2
    table = _table(out)
    assert [r["status"] for r in table] == ["done", "failed", "done"]
    assert "MOVING" in table[1]["error"] and "cannot read" in table[1]["error"]
    for r in (table[0], table[2]):
        assert 0.0 < float(r["dice_before"]) < float(r["dice"]) < 1.0
        assert float(r["ndv_percent"]) >= 0.0 and float(r["sdlogj"]) > 0.0
        assert all(float(r[f"seconds_{s}"]) >= 0.0 for s in ("reading", "affine", "registration", "metrics", "writing", "total"))
    assert sorted(p.name for p in (out / "pairs" / "vxm__synthseg_12").iterdir()) == sorted(OUTPUT_SETS["transforms"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 2 and list(summary["failed"]) == ["vxm__broken"]
    assert summary["metrics"]["dice"]["n"] == 2 and summary["dice_per_structure"]
    assert (out / "summary.md").read_text().startswith("# Batch: 2 of 3 pairs registered")
    # re-run: nothing finished is redone; the failed pair is tried again (and fails again)
    stamps = {p: (out / "pairs" / p / "metrics.json").stat().st_mtime_ns for p in ("vxm__synthseg_12", "synthseg_16__vxm")}
    assert main(_batch(manifest, out)) == 3
    assert {p: (out / "pairs" / p / "metrics.json").stat().st_mtime_ns for p in stamps} == stamps
    # a damaged metrics.json (it had ended the merge with a JSON error naming no file): the pair runs again
    damaged = out / "pairs" / "synthseg_16__vxm" / "metrics.json"
    damaged.write_text(damaged.read_text()[:100])
    assert main(_batch(manifest, out)) == 3
    assert json.loads(damaged.read_text())["sdlogj"] > 0.0 and [r["status"] for r in _table(out)] == ["done", "failed", "done"]
    assert (out / "pairs" / "vxm__synthseg_12" / "metrics.json").stat().st_mtime_ns == stamps["vxm__synthseg_12"]
    capsys.readouterr()
    # the same folder with other settings is refused in one line, before any work
    assert main(_batch(manifest, out, "--set", "objective.w_reg=2")) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_a_pair_registered_with_a_warning_is_listed(layout, tmp_path, capsys):
    """An image against itself keeps its one level's start (the identity is the optimum; see
    test_a_level_that_ends_uphill_hands_on_its_start): the pair is registered, and its warning is
    in metrics.csv, summary.json, summary.md and on stderr; the other pair has none."""
    manifest = _csv(layout, [_pair("vxm", "synthseg_12"), _pair("vxm", "vxm")], "with_itself.csv")
    (tmp_path / "one_level.yaml").write_text("level_spacing: [8.0]\niterations: [20]\n")
    out = tmp_path / "run"
    argv = _batch(manifest, out)
    argv[argv.index("--config") + 1] = str(tmp_path / "one_level.yaml")
    assert main(argv) == 0
    err = capsys.readouterr().err
    table = _table(out)
    assert [r["status"] for r in table] == ["done", "done"] and table[0]["warnings"] == ""
    assert table[1]["warnings"].startswith("stage 1/1 (") and "did not descend" in table[1]["warnings"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"] == {"vxm__vxm": [table[1]["warnings"]]}
    assert f"- `vxm__vxm`: {table[1]['warnings']}" in (out / "summary.md").read_text()
    assert f"hybridreg batch: warning: vxm__vxm: {table[1]['warnings']}" in err.splitlines()
    # a pair finished before metrics.json recorded warnings: the same line, from its levels
    metrics = out / "pairs" / "vxm__vxm" / "metrics.json"
    metrics.write_text(json.dumps({k: v for k, v in json.loads(metrics.read_text()).items() if k != "warnings"}))
    assert merge(read_pairs(manifest), out).warnings == summary["warnings"]


@pytest.mark.slow
def test_interrupted_batch_finishes_on_rerun_with_no_pair_done_twice(layout, tmp_path, monkeypatch, capsys):
    import hybridreg.batch as batch

    manifest = _csv(layout, [_pair("vxm", "synthseg_12"), _pair("synthseg_12", "synthseg_16"), _pair("synthseg_16", "vxm")],
                    "three.csv")
    out, calls, real = tmp_path / "run", [], batch.finish_pair

    def interrupted(prepared, *a, **kw):
        calls.append(prepared.out.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second pair's results are measured
        return real(prepared, *a, **kw)

    monkeypatch.setattr(batch, "finish_pair", interrupted)
    assert main(_batch(manifest, out)) == 130
    assert "interrupted; the finished pairs are kept in --out; run the same command again to resume" in capsys.readouterr().err
    assert [p.name for p in (out / "pairs").iterdir()] == ["vxm__synthseg_12"]
    assert not list(out.glob("pairs/.*partial*"))
    calls.clear()
    monkeypatch.setattr(batch, "finish_pair", lambda *a, **kw: (calls.append(a[0].out.name), real(*a, **kw))[1])
    assert main(_batch(manifest, out)) == 0
    assert calls == ["synthseg_12__synthseg_16", "synthseg_16__vxm"]  # the finished pair is not redone
    assert [r["status"] for r in _table(out)] == ["done"] * 3


@pytest.mark.slow
def test_batch_size_solves_pairs_together_with_one_at_a_time_results(layout, tmp_path, capsys):
    """``--batch-size 2``: pairs sharing their grids are solved in one optimization, the others
    apart; a pair that cannot be read fails alone; the per-pair metrics equal a one-at-a-time run's
    (float32 summation order, and the shared foreground box); resuming with another batch size is
    refused, since that box moves results a little."""
    small = layout / "imagesTr" / "vxm_small.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(layout / "imagesTr" / "vxm.nii.gz"))[2:38, 4:44, 2:38], str(small))
    rows = [_pair("vxm", "synthseg_12"), _pair("synthseg_12", "broken", labels=False),
            _pair("synthseg_16", "vxm_small", labels=False), _pair("synthseg_12", "synthseg_16"), _pair("synthseg_16", "vxm")]
    manifest = _csv(layout, rows, "grouped.csv")
    assert main(_batch(manifest, tmp_path / "one")) == 3
    assert main(_batch(manifest, tmp_path / "two", "--batch-size", "2")) == 3
    one, two = _table(tmp_path / "one"), _table(tmp_path / "two")
    assert [r["status"] for r in two] == ["done", "failed", "done", "done", "done"]
    sizes = {r["id"]: json.loads((tmp_path / "two" / "pairs" / r["id"] / "metrics.json").read_text())["batch_size"]
             for r in two if r["status"] == "done"}
    # vxm<-s12 and s12<-s16 share a group, s16<-vxm_small (another moving grid) is alone, s16<-vxm the last, alone
    assert sizes == {"vxm__synthseg_12": 2, "synthseg_16__vxm_small": 1, "synthseg_12__synthseg_16": 2, "synthseg_16__vxm": 1}
    for ra, rb in zip(one, two):
        if ra["status"] == "done":
            for key in ("dice", "sdlogj", "folding_percent"):
                assert ra[key] != "" or key == "dice"  # the unlabelled pair has no Dice
                assert ra[key] == rb[key] == "" or float(ra[key]) == pytest.approx(float(rb[key]), abs=2e-3), (ra["id"], key)
    assert main(_batch(manifest, tmp_path / "two", "--batch-size", "2")) == 3  # resumes: the broken pair fails again
    capsys.readouterr()
    assert main(_batch(manifest, tmp_path / "two", "--batch-size", "3")) == 2
    assert "options ['batch_size'] differ" in capsys.readouterr().err
    assert main(_batch(manifest, tmp_path / "three", "--batch-size", "0")) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(layout, tmp_path):
    """2 CPU processes (gloo) shard 3 pairs (rank 0 two, rank 1 one); rank 0 merges a table whose
    per-pair metrics equal a one-process run's (one thread per process in both runs)."""
    manifest = _csv(layout, [_pair("vxm", "synthseg_12"), _pair("synthseg_12", "synthseg_16"), _pair("synthseg_16", "vxm")],
                    "three.csv")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "hybridreg", *_batch(manifest, tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                          "-m", "hybridreg", *_batch(manifest, tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("3 of 3 pairs registered") == 1  # rank 0 reports
    a, b = _table(tmp_path / "one"), _table(tmp_path / "two")
    assert [r["id"] for r in a] == [r["id"] for r in b] and all(r["status"] == "done" for r in b)
    for ra, rb in zip(a, b):
        for key in ("dice", "dice_before", "sdlogj", "folding_percent", "ndv_percent", "hd95_mm"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=1e-6), (ra["id"], key)


# ----------------------------------------------------------------------------- --set

def test_set_overrides_any_key_and_names_bad_ones():
    cfg = apply_overrides(InstanceOptConfig(), ["objective.w_reg=2.5", "iterations=[10, 5, 2, 1]", "objective.symmetric=true"])
    assert cfg.objective.w_reg == 2.5 and cfg.iterations == (10, 5, 2, 1) and cfg.objective.symmetric is True
    for bad, needle in ((["objective.wreg=1"], "objective has no key 'wreg'; valid keys are"),
                        (["w_reg"], "takes KEY=VALUE"),
                        (["objective.w_reg=-1"], "w_reg` must be in"),
                        (["iterations=abc"], "iterations must be a list")):
        with pytest.raises(ValueError, match=needle):
            apply_overrides(InstanceOptConfig(), bad)


@pytest.mark.slow
def test_register_set_and_outputs(layout, tmp_path, capsys):
    import yaml

    d = layout / "imagesTr"
    out = tmp_path / "out"
    assert main(["register", str(d / "vxm.nii.gz"), str(d / "synthseg_12.nii.gz"), "--out", str(out), "--config",
                 str(layout / "quick.yaml"), "--set", "objective.w_reg=2.5", "--set", "iterations=[4]", "--affine", "none",
                 "--no-progress"]) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["objective"]["w_reg"] == 2.5 and written["iterations"] == [4]
    assert len(list(out.iterdir())) == 11
    # what the result came from: the header says how to feed config.yaml back; metrics.json has the command, the
    # versions and the inputs' bytes
    assert (out / "config.yaml").read_text().startswith("# The configuration of --solver instance in this run")
    prov = json.loads((out / "metrics.json").read_text())["provenance"]
    assert prov["command"][:4] == ["hybridreg", "register", str(d / "vxm.nii.gz"), str(d / "synthseg_12.nii.gz")]
    assert prov["command"][prov["command"].index("--affine") + 1] == "none" and prov["torch"] == torch.__version__
    assert prov["torch_threads"] == torch.get_num_threads() and set(prov["files"]) == {"fixed", "moving"}
    assert prov["files"]["moving"] == {"path": str((d / "synthseg_12.nii.gz").resolve()),
                                       "sha256": file_sha256(d / "synthseg_12.nii.gz")}
    # a smaller output set over an earlier run: its other files go, so the folder is one run's
    assert main(["register", str(d / "vxm.nii.gz"), str(d / "synthseg_12.nii.gz"), "--out", str(out), "--config",
                 str(layout / "quick.yaml"), "--affine", "none", "--outputs", "metrics", "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.json"]
    assert json.loads((out / "metrics.json").read_text())["outputs"] == ["metrics.json", "config.yaml"]
    assert main(["register", str(d / "vxm.nii.gz"), str(d / "synthseg_12.nii.gz"), "--out", str(tmp_path / "x"),
                 "--set", "objective.w_regg=2", "--no-progress"]) == 2
    assert "`--set objective.w_regg`" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- the suite on public layouts

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lumir", "manifest"])
def test_benchmark_suite_on_a_lumir_layout_and_a_manifest(layout, tmp_path, kind):
    """``python -m benchmarks run --dataset KIND:PATH``: the realworld suite's machinery on pairs
    listed by a Learn2Reg / LUMIR dataset.json (labels from labelsTr/) or a CSV manifest (with
    landmark files: TRE); the report has NDV next to %|J|≤0."""
    if kind == "lumir":
        doc = {"training": [{"image": f"./imagesTr/{s}.nii.gz"} for s in SUBJECTS],
               "validation": [{"fixed": "./imagesTr/vxm.nii.gz", "moving": "./imagesTr/synthseg_16.nii.gz"}]}
        (layout / "LUMIR_dataset.json").write_text(json.dumps(doc))
        spec, name = f"lumir:{layout / 'LUMIR_dataset.json'}#validation", "vxm__synthseg_16"
    else:
        (layout / "points.csv").write_text("i,j,k\n20,24,20\n10,30,25\n")  # both crops share their grid: TRE before is 0
        row = _pair('synthseg_12', 'vxm', id='s12_to_vxm', fixed_landmarks="points.csv", moving_landmarks="points.csv")
        spec, name = f"manifest:{_csv(layout, [row], 'suite.csv')}", "s12_to_vxm"
    out = tmp_path / "suite"
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--dataset", spec, "--out", str(out), "--methods",
                        "sitk-demons"], capture_output=True, text=True, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["pair"], r["method"]) for r in rows] == [(name, "sitk-demons")]
    assert rows[0]["dice_mean"] > rows[0]["dice_before"] and rows[0]["ndv_percent"] >= 0.0
    md = (out / "report.md").read_text()
    assert "NDV % (max)" in md and f"| {name} |" in md
    # the report says how to regenerate it: this run's command, and no scaling it did not run
    assert f"Regenerate with `python -m benchmarks run --dataset {shlex.quote(spec)} --out {out} --methods sitk-demons`" in md
    assert "scaling" not in md.split("\n")[2] and "`scaling.csv`" not in md
    if kind == "manifest":  # landmark files give the TRE, in the rows and the report
        assert rows[0]["tre_before_mm"] == pytest.approx(0.0, abs=1e-9) and rows[0]["tre_mm"] > 0.0
        assert "| method | TRE mm |" in md
        assert rows[0]["pair_files"][1] == str((layout / "imagesTr" / "vxm.nii.gz").resolve())
        # the same id with another moving scan: the stored row is not that pair's result
        changed = _pair('synthseg_12', 'synthseg_16', id='s12_to_vxm', fixed_landmarks="points.csv", moving_landmarks="points.csv")
        again = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--dataset",
                                f"manifest:{_csv(layout, [changed], 'suite2.csv')}", "--out", str(out), "--methods", "sitk-demons"],
                               capture_output=True, text=True, cwd=root)
        assert again.returncode == 2 and "made from other files" in again.stderr, again.stderr[-2000:]
        assert "--fresh" in again.stderr and len((out / "rows.jsonl").read_text().splitlines()) == len(rows)
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--dataset", "lumir:" + str(layout / "nope.json"),
                          "--out", str(out)], capture_output=True, text=True, cwd=root)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [f"`--dataset`: manifest not found: {layout / 'nope.json'}"]


def test_summary_shows_no_spread_for_a_metric_of_one_pair():
    """A metric measured on one pair only (TRE with landmarks on one pair) read "3.621 ± 0.000", a
    spread of zero; it now says it is one pair's."""
    from hybridreg.batch import _markdown, _stats

    s = {"done": 2, "pairs": 2, "failed": {}, "warnings": {}, "missing": [], "dice_per_structure": {},
         "metrics": {"dice_after": _stats([0.7, 0.8]), "tre_mm_after": _stats([3.621, None])}, "seconds": {}}
    md = _markdown(s)
    assert "| tre_mm_after | 3.621 (one pair) |" in md and "| dice_after | 0.750 ± 0.071 (median 0.750) |" in md
