"""The benchmark suite: classical-tool wrappers return core-convention displacements, the
paired statistics, the report, and one tiny end-to-end suite run on the bundled pair."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from benchmarks import report
from benchmarks.methods import METHODS, Pair, available
from hybridreg.data.sources import Volume
from hybridreg.io import Geometry

ROOT = Path(__file__).resolve().parents[1]


def _blob_pair(shift=(2, -1, 0)):
    """A smooth blob and the same blob moved by ``shift`` voxels (array axes), labelled."""
    z, y, x = np.meshgrid(*(np.arange(32.0),) * 3, indexing="ij")
    c = np.array([16.0, 16.0, 16.0])

    def blob(center):
        r2 = (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2
        return np.exp(-r2 / 40.0).astype(np.float32)

    f, m = blob(c), blob(c + np.array(shift))
    geo = Geometry((32, 32, 32), (2.0, 2.0, 2.0), (-10.0, 5.0, 3.0), (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    return Pair("blob", "atlas", Volume("f", f, (f > 0.5).astype(np.int32) * 17), Volume("m", m, (m > 0.5).astype(np.int32) * 17),
                (2.0, 2.0, 2.0), geo)


@pytest.mark.parametrize("name", ["sitk-demons", "ants-syn"])
def test_classical_tools_return_core_convention_displacements(name):
    ok, msg = available(METHODS[name])
    if not ok:
        pytest.skip(msg)
    pair = _blob_pair()
    out = METHODS[name].run(pair, lambda d: 0.0)
    assert out.displacement.shape == (3, 32, 32, 32) and out.seconds > 0
    # warped(x) = moving(x + u(x)): near the blob's centre u ≈ +shift in array-axis order
    u = out.displacement[:, 13:20, 13:20, 13:20].reshape(3, -1).mean(axis=1)
    assert np.allclose(u, [2.0, -1.0, 0.0], atol=0.6), u


@pytest.mark.parametrize("name", ["instance-map", "instance-regions"])
def test_lambda_strategy_methods_run_in_the_suite(name):
    """The strategies' suite entries: MAP-estimated global λ (one value), region-wise λ (one
    per region of the fixed labels: background and the blob)."""
    out = METHODS[name].run(_blob_pair(), lambda d: 0.0)
    assert out.displacement.shape == (3, 32, 32, 32) and np.isfinite(out.displacement).all()
    if name == "instance-map":
        assert out.lam is None  # a uniform λ has no map to show
    else:
        assert out.lam is not None and out.lam.std() > 0


def test_a_diverged_instance_run_is_never_a_row(monkeypatch):
    """The suite registers prealigned pairs without the service (for the time-to-accuracy trace) and
    refuses what the service refuses (:func:`hybridreg.solvers.divergence`)."""
    import hybridreg.solvers as solvers

    seen = []
    monkeypatch.setattr(solvers, "divergence", lambda result: seen.append(result) or "the energy rose on a level")
    with pytest.raises(solvers.DivergenceError, match="blob diverged: the energy rose on a level"):
        METHODS["instance"].run(_blob_pair(), lambda d: 0.0)
    assert len(seen) == 1 and seen[0].history


def test_wilcoxon_and_rank_biserial():
    a = [0.80, 0.78, 0.75, 0.81, 0.79, 0.77]
    b = [0.78, 0.77, 0.76, 0.78, 0.76, 0.75]  # a − b: +.02 +.01 −.01 +.03 +.03 +.02
    r = report._wilcoxon(a, b)
    from scipy.stats import wilcoxon

    assert r["p"] == pytest.approx(wilcoxon(a, b).pvalue)
    # ranks of |d|: .01 → 1.5, 1.5; .02 → 3.5, 3.5; .03 → 5.5, 5.5; W− = 1.5, W+ = 19.5
    assert r["r"] == pytest.approx((19.5 - 1.5) / 21.0)
    assert r["median_diff"] == pytest.approx(0.02)
    assert report._wilcoxon(a, a)["p"] == 1.0


def _row(pair, method, dice, sd, sec):
    return {"pair": pair, "kind": "atlas", "method": method, "dice": {"17": dice, "53": dice - 0.05}, "dice_mean": dice - 0.025,
            "dice_before": 0.5, "hd95_mean": 2.0, "folding_percent": 0.0, "sdlogj": sd, "seconds": sec, "peak_rss_mb": 500.0}


def test_report_states_the_winners_and_the_paired_test(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        d = 0.75 + 0.02 * rng.standard_normal()
        rows += [_row(f"p{i}", "instance", d + 0.01, 0.23, 40.0), _row(f"p{i}", "instance-uniform", d, 0.24, 39.0),
                 _row(f"p{i}", "learned", d - 0.04, 0.16, 0.3)]
    stats = report.paired_stats(rows)
    overall = next(s for s in stats if s["measure"] == "mean Dice")
    assert overall["solver"] == "instance" and overall["n"] == 6 and overall["r"] == 1.0 and overall["median_diff"] == pytest.approx(0.01)
    assert all("q_bh" in s for s in stats if s["measure"].startswith("Dice "))
    scaling = [{"grid": g, "shape": [n] * 3, "voxels": n ** 3, "seconds_per_iteration": 0.1 * n, "memory_mb": 10.0 * n,
                "steps": {"forward": 0.03 * n, "backward": 0.06 * n, "optimizer": 0.01 * n}} for g, n in (("8x8x8", 8), ("2", 16))]
    files = report.figures(tmp_path, rows, scaling)
    md = report.markdown("bundled", "test pairs", {"cpu": "x", "cores": 2, "torch_threads": 2, "python": "3.11", "os": "linux"},
                         rows, stats, scaling, files, [], 1.0)
    assert "| highest mean Dice | instance (voxelwise λ) |" in md and "| lowest median seconds | learned (voxelwise λ) | 0.30 |" in md
    assert "| lowest mean SDlogJ (max %\\|J\\|≤0 < 0.1) | learned (voxelwise λ) | 0.160 |" in md
    # regularity of the paired arms (0.23 against 0.24: within 10 %), the winner at p < 0.05 (six pairs, all +0.01)
    assert "| instance | 0.230 | 0.240 | yes | the method |" in md
    assert "| 16×16×16 | 4,096 | 1.600 | 160 | 30% | 60% | 10% |" in md
    for f in files.values():
        assert (tmp_path / f).stat().st_size > 1000
    assert "more than one CPU" not in md  # no row records its CPU: nothing to tell apart


def test_report_names_the_cpu_of_each_methods_rows_when_they_differ():
    """A suite resumed on another machine: the report says which method's seconds ran where."""
    rows = [_row("p0", "instance", 0.8, 0.2, 40.0) | {"cpu": "CPU A"}, _row("p0", "learned", 0.7, 0.2, 9.0) | {"cpu": "CPU B"},
            _row("p0", "sitk-demons", 0.7, 0.2, 60.0)]
    (line,) = [x for x in report.hardware_note(rows) if x]
    assert "more than one CPU" in line and "CPU A: instance (voxelwise λ)" in line and "CPU B: learned (voxelwise λ)" in line
    assert f"not recorded: {METHODS['sitk-demons'].label}" in line
    assert report.hardware_note([r | {"cpu": "CPU A"} for r in rows]) == []
    # hybridreg on a GPU (`benchmarks run --device cuda`), the classical tool on the machine's CPU
    gpu = [r | {"cpu": "CPU A"} for r in rows[1:]] + [rows[0] | {"cpu": "CPU A", "device": "cuda", "gpu": "NVIDIA H200"}]
    (line,) = [x for x in report.hardware_note(gpu) if x]
    assert "more than one processor" in line and "GPU NVIDIA H200: instance (voxelwise λ)" in line
    assert f"CPU A: learned (voxelwise λ), {METHODS['sitk-demons'].label}" in line
    assert report.hardware_note([gpu[-1]]) == ["", "Every row ran on the GPU NVIDIA H200."]  # one processor, a GPU: said


def test_cpu_name_tells_apart_parts_that_share_a_brand_name(tmp_path):
    """A virtual machine's "AMD EPYC" names parts of different generations alike: the family and model numbers
    (of the first processor) keep their rows apart; without /proc/cpuinfo, platform's name."""
    from hybridreg.provenance import cpu_name

    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: AMD EPYC\n\n"
    (tmp_path / "zen1").write_text(block.format(0, 23, 1) + block.format(1, 23, 1))
    (tmp_path / "zen4").write_text(block.format(0, 25, 17))
    assert cpu_name(tmp_path / "zen1") == "AMD EPYC (family 23, model 1)"
    assert cpu_name(tmp_path / "zen4") == "AMD EPYC (family 25, model 17)"
    assert cpu_name(tmp_path / "missing") and "(" not in cpu_name(tmp_path / "missing")


def test_report_compares_methods_at_equal_regularity_along_their_fronts(tmp_path):
    # instance: (SDlogJ, Dice) 0.15/0.70, 0.20/0.75 (default), 0.28/0.78; demons: 0.10/0.64, 0.18/0.70, 0.26/0.74
    points = {"instance@w_reg=8": (0.15, 0.70), "instance": (0.20, 0.75), "instance@w_reg=2": (0.28, 0.78),
              "sitk-demons@sigma=2.5": (0.10, 0.64), "sitk-demons": (0.18, 0.70), "sitk-demons@sigma=1": (0.26, 0.74),
              "learned": (0.18, 0.66), "ants-syn": (0.22, 0.74)}
    rows = [_row(p, m, dice + 0.025, sd, 10.0) for p in ("a", "b") for m, (sd, dice) in points.items()]
    fr = report.fronts(rows)
    assert set(fr) == {"instance", "sitk-demons", "ants-syn", "learned"}  # learned and ANTs ran at one setting
    # the learned solver is also read against the instance solver it amortizes: 0.66 against 0.73 at SDlogJ 0.18
    amortized = [x for x in report.at_equal_regularity(rows) if x["method"] == "learned"]
    assert {x["peer"] for x in amortized} == {"instance", "sitk-demons", "ants-syn"}
    inst = next(x for x in amortized if x["peer"] == "instance")
    assert inst["peer_dice"] == pytest.approx(0.73) and inst["difference"] == pytest.approx(-0.07) and not inst["ahead"]
    assert not any(x["peer"] == "learned" for x in report.at_equal_regularity(rows))  # no tool is read against it
    assert [p["setting"] for p in fr["instance"]] == ["w_reg 8", "w_reg 4", "w_reg 2"] and fr["instance"][1]["default"]
    eq = {x["method"]: x for x in report.at_equal_regularity(rows) if x["peer"] == "sitk-demons"}
    ants = next(x for x in report.at_equal_regularity(rows) if x["peer"] == "ants-syn")
    assert ants["dice"] == pytest.approx(0.7575) and ants["difference"] == pytest.approx(0.0175) and ants["ahead"]
    assert eq["instance"]["peer_dice"] == pytest.approx(0.71) and eq["instance"]["difference"] == pytest.approx(0.04)
    assert eq["instance"]["ahead"] and eq["instance@w_reg=8"]["peer_dice"] == pytest.approx(0.6775)
    assert eq["instance@w_reg=2"]["peer_dice"] is None  # beyond the demons front's SDlogJ range
    files = report.figures(tmp_path, rows, [])
    md = report.markdown("realworld", "pairs", {"cpu": "x", "cores": 2, "torch_threads": 2, "python": "3.11", "os": "linux"},
                         rows, [], [], files, [], None)
    assert "| instance (voxelwise λ) | w_reg 4 (default) | 0.200 | 0.750 | 0.0000 | SimpleITK diffeomorphic demons | 0.710 | +0.040 | yes |" in md
    assert (tmp_path / files["fronts"]).stat().st_size > 1000


def test_equal_regularity_verdicts_level_folding_and_per_pair(tmp_path):
    """A difference under the printed precision is level, not ahead; folding rules a point out, for a peer at one
    setting only through the two points of ours read at its SDlogJ; and the defaults are judged pair by pair."""
    assert report.verdict(0.0004, 0.0) == "level" and report.verdict(-0.0004, 0.0) == "level"
    assert report.verdict(0.0006, 0.0) == "yes" and report.verdict(-0.0006, 0.0) == "no"
    assert report.verdict(0.05, 0.001) == "no" and report.verdict(None, 0.0) is None
    # instance: 0.15/0.70, 0.20/0.75 (default), 0.28/0.78 with folding at w_reg 2 only; uniform λ at one setting, SDlogJ 0.18
    rows = [_row("a", m, dice + 0.025, sd, 10.0) for m, (sd, dice) in
            {"instance@w_reg=8": (0.15, 0.70), "instance": (0.20, 0.75), "instance@w_reg=2": (0.28, 0.78),
             "instance-uniform": (0.18, 0.7302)}.items()]
    rows[2]["folding_percent"] = 0.01
    (one,) = [x for x in report.at_equal_regularity(rows) if x["peer"] == "instance-uniform"]
    assert one["dice"] == pytest.approx(0.73) and one["folding_max"] == 0.0 and one["verdict"] == "level"
    rows[-1]["sdlogj"], rows[0]["folding_percent"] = 0.20, 0.5  # at our default's SDlogJ: that point alone is read
    (one,) = [x for x in report.at_equal_regularity(rows) if x["peer"] == "instance-uniform"]
    assert one["dice"] == pytest.approx(0.75) and one["folding_max"] == 0.0 and one["verdict"] == "yes"
    # ANTs ahead on pair a, behind on pair b, at the default's SDlogJ; demons level on a
    rows = []
    for pair, ants_dice in (("a", 0.74), ("b", 0.76)):
        rows += [_row(pair, m, dice + 0.025, sd, 10.0) for m, (sd, dice) in
                 {"instance@w_reg=8": (0.15, 0.70), "instance": (0.20, 0.75), "instance@w_reg=2": (0.28, 0.78),
                  "ants-syn@total_sigma=1": (0.10, ants_dice - 0.02), "ants-syn": (0.30, ants_dice + 0.02),
                  "sitk-demons@sigma=2.5": (0.10, 0.70), "sitk-demons": (0.30, 0.80 if pair == "a" else 0.70)}.items()]
    per = {(x["pair"], x["peer"]): x for x in report.per_pair_at_equal_regularity(rows)}
    assert {x["method"] for x in per.values()} == {"instance"}  # defaults only, against the tools
    assert per["a", "ants-syn"]["difference"] == pytest.approx(0.01) and per["a", "ants-syn"]["verdict"] == "yes"
    assert per["b", "ants-syn"]["difference"] == pytest.approx(-0.01) and per["b", "ants-syn"]["verdict"] == "no"
    assert per["a", "sitk-demons"]["verdict"] == "level" and per["b", "sitk-demons"]["verdict"] == "yes"
    md = report.markdown("realworld", "pairs", {"cpu": "x", "cores": 2, "torch_threads": 2, "python": "3.11", "os": "linux"},
                         rows, [], [], report.figures(tmp_path, rows, []), [], None)
    assert "| instance (voxelwise λ) | ANTs SyN | +0.010 yes | -0.010 no | 1 of 2 |" in md
    assert "| instance (voxelwise λ) | SimpleITK diffeomorphic demons | +0.000 level | +0.050 yes | 1 of 2 |" in md
    # a pair where ANTs did not run and one where its front ends below the default's SDlogJ: "–", counted apart
    rows = [r for r in rows if not (r["pair"] == "b" and r["method"].startswith("ants"))]
    rows += [_row("c", m, dice + 0.025, sd, 10.0) for m, (sd, dice) in
             {"instance@w_reg=8": (0.15, 0.70), "instance": (0.20, 0.75), "instance@w_reg=2": (0.28, 0.78),
              "ants-syn@total_sigma=1": (0.10, 0.70), "ants-syn": (0.18, 0.74)}.items()]
    md = report.markdown("realworld", "pairs", {"cpu": "x", "cores": 2, "torch_threads": 2, "python": "3.11", "os": "linux"},
                         rows, [], [], report.figures(tmp_path, rows, []), [], None)
    assert "| instance (voxelwise λ) | ANTs SyN | +0.010 yes | – | – | 1 of 1 |" in md


def test_a_sweep_point_run_on_fewer_pairs_is_left_out_of_the_front():
    # ANTs' default and total σ 1 ran on pairs a, b, c; flow σ 5 on a alone: the front keeps the three pairs
    rows = [_row(p, m, 0.70 + i * 0.01, sd, 10.0) for i, p in enumerate("abc")
            for m, sd in (("ants-syn", 0.24), ("ants-syn@total_sigma=1", 0.11))]
    rows.append(_row("a", "ants-syn@flow_sigma=5", 0.69, 0.25, 10.0))
    front = report.fronts(rows)["ants-syn"]
    assert [p["method"] for p in front] == ["ants-syn@total_sigma=1", "ants-syn"]
    assert all(p["pairs"] == ["a", "b", "c"] for p in front) and front[1]["dice"] == pytest.approx(0.685)
    # with the default alone complete, the points every member ran on (pair a) are the front
    rows = [r for r in rows if r["method"] != "ants-syn@total_sigma=1"]
    assert [p["pairs"] for p in report.fronts(rows)["ants-syn"]] == [["a"], ["a"]]


def test_report_labels_means_over_fewer_pairs_than_the_suite(tmp_path):
    """ANTs run on two of three pairs: its summary and front rows say so (a mean over two pairs
    does not compare with the others' three); methods on every pair stay unlabelled."""
    rows = [_row(p, m, 0.75, sd, 10.0) for p in "abc" for m, sd in (("instance", 0.2), ("instance@w_reg=2", 0.25))]
    rows += [_row(p, m, 0.76, sd, 900.0) for p in "ab" for m, sd in (("ants-syn", 0.22), ("ants-syn@total_sigma=1", 0.12))]
    md = report.markdown("bundled-1mm", "pairs", {"cpu": "x", "cores": 2, "torch_threads": 2, "python": "3.11", "os": "linux"},
                         rows, [], [], report.figures(tmp_path, rows, []), [], None)
    summary = [line for line in md.splitlines() if line.startswith("| ANTs SyN") and "±" in line]
    assert len(summary) == 2 and all(line.split(" | ")[0].endswith("(2 of 3 pairs)") for line in summary)
    assert "| instance (voxelwise λ) | 0.500 |" in md  # on all three pairs: no label
    assert "| highest mean Dice | instance (voxelwise λ) | 0.725 |" in md  # ANTs' higher mean is over two pairs only
    assert "| ANTs SyN (2 of 3 pairs) | total σ 1 | 0.120 |" in md  # its front's table
    assert "| instance (voxelwise λ) (2 of 3 pairs) | w_reg 4 (default) | 0.200 |" in md  # read against ANTs on its 2 pairs


@pytest.mark.slow
def test_suite_runs_end_to_end_on_the_bundled_pair(tmp_path):
    out = tmp_path / "smoke"
    p = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "smoke", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"learned", "sitk-demons"} and len(rows) == 2
    for r in rows:
        assert r["dice_mean"] > r["dice_before"] + 0.05 and r["folding_percent"] < 0.1
    md = (out / "report.md").read_text()
    assert "## Best by criterion" in md and "| SimpleITK diffeomorphic demons |" in md
    assert (out / "results.csv").read_text().count("\n") == 3
    # a second run continues: nothing to redo, same rows
    p = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "smoke", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and len((out / "rows.jsonl").read_text().splitlines()) == 2


def test_select_pairs_keeps_the_order_asked_for():
    from benchmarks.suite import select_pairs

    every = ["a<-b", "a<-c", "b<-c", "c<-d"]
    assert select_pairs(every) == every and select_pairs(every, 2) == ["a<-b", "a<-c"]
    assert select_pairs(every, None, ["c<-d", "a<-b", "c<-d"]) == ["c<-d", "a<-b"]
    with pytest.raises(ValueError, match="--pairs: unknown \\['c<-d'\\]"):  # cut by --max-pairs first
        select_pairs(every, 2, ["c<-d"])


def test_unknown_suite_and_method_are_rejected(tmp_path):
    p = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "nope", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "--suite" in p.stderr
    from benchmarks.suite import run_suite

    with pytest.raises(ValueError, match="--methods"):
        run_suite("smoke", tmp_path, ["instance", "elastix"])
    with pytest.raises(ValueError, match="--pairs"):  # before anything is written
        run_suite("smoke", tmp_path / "p", pair_names=["vxm<-nobody"])
    assert not (tmp_path / "p").exists()
    for bad in ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"]):
        with pytest.raises(ValueError, match="`--device`"):
            run_suite("smoke", tmp_path / "d", device=bad)
        assert not (tmp_path / "d").exists()
    (tmp_path / "rows.jsonl").write_text("kept\n")  # --fresh with an unusable device discards nothing
    p = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "smoke", "--out", str(tmp_path), "--fresh",
                        "--device", "tpu"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "`--device`" in p.stderr and (tmp_path / "rows.jsonl").read_text() == "kept\n"
    # --max-pairs 0 ran every pair (the smoke suite's 1 became 9), a negative number all but the last ones
    for n in ("0", "-1"):
        p = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "smoke", "--max-pairs", n, "--out",
                            str(tmp_path / "m")], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 2 and "--max-pairs: expected an integer >= 1" in p.stderr and not (tmp_path / "m").exists()
    # a relative manifest path is the caller's, although each pair runs in a process started in the repository
    # (the parent read the pairs, the child then failed with a traceback)
    z, y, x = np.mgrid[:24, :24, :24]
    for name, c in (("f", 11.0), ("m", 13.0)):
        blob = np.exp(-((z - c) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) / 30.0).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(blob), str(tmp_path / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray((blob > 0.3).astype(np.int16)), str(tmp_path / f"{name}l.nii.gz"))
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_labels,moving_labels\nf.nii.gz,m.nii.gz,fl.nii.gz,ml.nii.gz\n")
    p = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--dataset", "manifest:pairs.csv", "--methods",
                        "sitk-demons", "--no-scaling", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and len((tmp_path / "r" / "rows.jsonl").read_text().splitlines()) == 1, p.stderr[-800:]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("method", ["instance", "learned", "sitk-demons"])
def test_a_suite_row_on_the_gpu_matches_the_cpu_row(method):
    """`benchmarks run --device cuda`: hybridreg's solvers on the GPU (the row names it), the
    classical tool on the CPU; the same Dice as on the CPU up to float32 summation order."""
    from benchmarks.suite import child, get_dataset

    pair = get_dataset("bundled").pairs()[0].name
    cpu, gpu = (child("bundled", pair, method, None, device=d) for d in ("cpu", "cuda"))
    assert gpu.get("device") == (None if method == "sitk-demons" else "cuda") and "device" not in cpu
    assert gpu["dice_mean"] == pytest.approx(cpu["dice_mean"], abs=0.005) and gpu["folding_percent"] < 0.01


def test_missing_optional_tool_is_skipped_with_a_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ants" else real(n, *a))
    ok, msg = available(METHODS["ants-syn"])
    assert not ok and "antspyx" in msg


def test_uniform_lambda_calibration_finds_the_matching_lambda():
    from benchmarks.__main__ import match_sdlogj

    calls = []

    def measure(lam):  # SDlogJ falls as a power of λ, as it does for the registration
        calls.append(lam)
        return {"sdlogj": 0.3 * lam ** -0.35}

    pts = match_sdlogj(measure, 0.227, 1.0, 6, 1e-4)
    lam = np.exp(pts[-1][0])
    assert abs(0.3 * lam ** -0.35 - 0.227) < 1e-4 and len(calls) <= 4
    assert calls[1] == pytest.approx(np.exp(0.7))  # the first step goes towards more λ (smoother)


def test_rerun_comparison_flags_changed_accuracy_and_reports_time_ratios(tmp_path):
    from benchmarks.compare import compare_files, compare_rows

    ref = [_row(p, m, 0.75, 0.2, 10.0) for p in ("a", "b") for m in ("instance", "learned")]
    new = [dict(r, seconds=r["seconds"] * (2.0 if r["method"] == "learned" else 1.1)) for r in ref]
    new[0] = dict(new[0], dice_mean=new[0]["dice_mean"] + 0.01)  # pair a, instance: beyond the Dice tolerance
    new.append(_row("c", "instance", 0.9, 0.2, 1.0))  # only in the re-run: not compared
    cmp = {c["method"]: c for c in compare_rows(ref, new)}
    assert cmp["instance"]["pairs"] == 2 and not cmp["instance"]["match"]
    assert cmp["instance"]["max_abs_dice_diff"] == pytest.approx(0.01)
    assert cmp["learned"]["match"] and cmp["learned"]["time_ratio_median"] == pytest.approx(2.0)
    assert compare_rows(ref, [dict(r, sdlogj=r["sdlogj"] + 0.005) for r in ref])[0]["match"]  # within the SDlogJ tolerance
    assert not any(c["other_processor"] for c in cmp.values())
    on_gpu = compare_rows(ref, [dict(r, gpu="NVIDIA H200") if r["method"] == "learned" else r for r in ref])
    assert [c["other_processor"] for c in on_gpu] == [False, True]  # instance, learned: a time ratio across processors
    with pytest.raises(ValueError, match="share no"):
        compare_rows(ref, [_row("z", "instance", 0.7, 0.2, 1.0)])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in ref))
    b.write_text("".join(json.dumps(r) + "\n" for r in new))
    md = compare_files(a, b, tmp_path / "reproducibility.md")
    row = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert row["| instance (voxelwise λ)"].endswith("| **no** |") and row["| learned (voxelwise λ)"].endswith("| yes |")
    assert "| 2.00 (2.00–2.00) |" in row["| learned (voxelwise λ)"] and (tmp_path / "reproducibility.md").read_text() == md
    with pytest.raises(FileNotFoundError, match="reference"):
        compare_files(tmp_path / "missing.jsonl", b)


def test_tuner_comparison_states_the_criterion_from_the_trials(tmp_path):
    """The tuning report's criterion (BoTorch's best-so-far after the mark against random
    search's median over seeds) follows the trials, honours the folding constraint, and
    leaves out seeds that have not reached the mark."""
    from benchmarks.tuning_comparison import COMPARISONS, comparison_section
    from hybridreg.tuning import load_space

    c = COMPARISONS["full"]
    space = load_space(c.space)

    def run(dices, folding=0.0):
        return [{"id": i, "status": "done", "dice": d, "folding": folding, "sdlogj": 0.2, "seconds": 1.0,
                 "x": [0.1 * i, 0.5], "params": {"objective.w_reg": 1.0 + i, "objective.hyper_strength": 0.1}}
                for i, d in enumerate(dices)]

    def at_mark(runs):  # the rows of the table at the mark, by tuner
        lines = comparison_section(c, space, runs, 15, str)
        head = lines.index("| tuner | seeds | median | min | max | median ≥ random's median | every seed ≥ random's median |")
        return {r.split(" | ")[0][2:]: r for r in lines[head + 2:] if r.startswith("| ")}

    random = {0: run([0.70] * 15), 1: run([0.72] * 15), 2: run([0.74] * 15)}  # median 0.72
    rows = at_mark({"random": random, "botorch": {0: run([0.71] * 14 + [0.73])}})
    assert rows["random"] == "| random | 0, 1, 2 | 0.7200 | 0.7000 | 0.7400 | – | – |"
    assert rows["botorch"] == "| botorch | 0 | 0.7300 | 0.7300 | 0.7300 | yes | yes |"
    # the best trial of that run folds too much: it no longer counts
    folded = run([0.71] * 14 + [0.73])
    folded[-1]["folding"] = 2 * space.folding_max
    assert at_mark({"random": random, "botorch": {0: folded}})["botorch"].endswith("| 0.7100 | no | no |")
    # a seed short of the mark is left out of the medians
    rows = at_mark({"random": {**random, 3: run([0.9] * 10)}, "botorch": {0: run([0.73] * 15), 1: run([0.71] * 15)}})
    assert rows["random"].startswith("| random | 0, 1, 2 | 0.7200 |")
    assert rows["botorch"] == "| botorch | 0, 1 | 0.7200 | 0.7100 | 0.7300 | yes | no |"


def test_learned_solver_report_pools_atlas_and_subject_pairs():
    """With both pair kinds at one grid the report adds their pooled summary: the mean over all
    pairs (not the mean of the two group means) and its difference from instance optimization;
    the time ratio only where every row of both solvers ran on one CPU."""
    from benchmarks.learned_solver import to_markdown

    def row(method, pair, kind, dice):
        return {"method": method, "pair": pair, "kind": kind, "resolution_mm": 2, "dice_before": 0.5,
                "dice_mean": dice, "hd95_mean": 3.0, "folding_percent": 0.0, "sdlogj": 0.2, "lambda_std_brain": 0.1,
                "seconds": 10.0 if method == "instance" else 1.0, "peak_rss_mb": 100.0, "cpu": "cpu A"}

    pairs = [row("instance", f"a{i}", "atlas", 0.80) for i in range(3)] + [row("learned", f"a{i}", "atlas", 0.78) for i in range(3)]
    pairs += [row("instance", "s0", "subject", 0.70), row("learned", "s0", "subject", 0.62)]
    res = {"environment": {"cpu": "x", "cores": 2, "torch_threads": 2, "python": "p", "os": "o", "weights": "w"},
           "pairs": pairs, "inference": [], "train_step": []}
    md = to_markdown(res)
    pooled = md.split("## 2 mm, all test pairs")[1]
    assert "mean over 4 pairs" in pooled
    learned = next(line for line in pooled.splitlines() if line.startswith("| learned |"))
    # instance (3 * 0.80 + 0.70) / 4 = 0.775, learned (3 * 0.78 + 0.62) / 4 = 0.740 -> -0.035
    assert "| 0.740 ± " in learned and "| -0.035 |" in learned and "| 0.100 |" in learned
    only_atlas = to_markdown({**res, "pairs": pairs[:6]})
    assert "all test pairs" not in only_atlas
    for cpu in ("cpu B", None):  # one learned row on another CPU, or on one not recorded: no ratio
        mixed = to_markdown({**res, "pairs": pairs[:5] + [{**pairs[5], "cpu": cpu}]})
        learned = next(line for line in mixed.splitlines() if line.startswith("| learned |"))
        assert learned.split(" | ")[9] == "–" and "| -0.020 |" in learned


def test_committed_speed_reports_still_render():
    """The focused reports render the committed results, whatever version wrote them."""
    from benchmarks.instance_speed import to_markdown as speed
    from benchmarks.learned_solver import to_markdown as learned

    results = ROOT / "benchmarks" / "results"
    md = speed(json.loads((results / "instance_speed.json").read_text()))
    assert md.count("| level | grid | control grid |") == 2 and "| 3 (2 mm) | 100×85×80 |" in md and "| 4 (1 mm) | 199×169×160 |" in md
    md = learned(json.loads((results / "learned_solver.json").read_text()))
    assert "## 2 mm, all test pairs: mean over 9 pairs" in md and "| `configs/learned_bundled_2mm.yaml` |" in md


def test_device_figures_compare_the_device_with_the_same_machines_cpu():
    """``benchmarks batched``: the 1 mm table names each row's pair and device, the device ratio
    is the CPU row's registration seconds over the device row's for the same pair, and the
    committed (older) results still render."""
    from benchmarks.batched import device_ratio, markdown, one_mm_pairs

    def row(device, reg, dice):
        return {"pair": "vxm<-synthseg_16", "solver": "instance", "device": device, "grid": [160, 192, 224], "dice": dice,
                "sdlogj": 0.25, "folding_percent": 0.0, "seconds": {"registration": reg, "total": reg + 10},
                "peak_memory_mb": 900.0, "peak_memory_kind": "k"}

    r = {"environment": {"torch_threads": 16}, "device": "cuda",
         "one_mm": [row("cuda:0", 2.5, 0.7191), {**row("cuda:0", 1.0, 0.68), "solver": "learned"}, row("cpu", 10.0, 0.7184)]}
    (line,) = [x for x in device_ratio(r) if x]
    assert "2.5 s on cuda:0 against 10.0 s" in line and "**4.0×**" in line and "Dice 0.7191 against 0.7184" in line
    assert device_ratio({**r, "one_mm": r["one_mm"][:2]}) == []  # no CPU row: no ratio
    committed = json.loads((ROOT / "benchmarks" / "results" / "batched.json").read_text())
    md = markdown(committed)
    assert "| pair | solver | device |" in md and "| demo | instance | cpu |" in md
    gpu = ROOT / "benchmarks" / "results" / "batched_cuda"  # the H200 run renders to its committed report
    md = markdown(json.loads(gpu.with_suffix(".json").read_text()))
    assert md == gpu.with_suffix(".md").read_text() and "--device cuda --n 4 --batch-size 4 --realworld`" in md
    assert [p["name"] for p in one_mm_pairs("demo")] == ["vxm<-synthseg_16"]
    with pytest.raises(ValueError, match="`which`"):
        one_mm_pairs("oasis")


def test_profiled_iterations_of_the_real_solver_add_up():
    """The instance-speed profile splits the real solver's iterations into steps that add up to
    the iteration's wall time, and lists the costliest operators."""
    import torch

    from benchmarks.instance_speed import profile_level
    from hybridreg.solvers import get_solver

    g = torch.Generator().manual_seed(0)
    f, m = torch.rand(1, 1, 16, 16, 16, generator=g), torch.rand(1, 1, 16, 16, 16, generator=g)
    p = profile_level(f, m, (2.0, 2.0, 2.0), get_solver("instance").default_config(), level=2, repeats=3)
    steps = {k: v for k, v in p.items() if k not in ("total", "ops")}
    assert {"forward", "backward", "optimizer", "other"} <= set(steps) and p["total"] > 0
    assert sum(steps.values()) == pytest.approx(p["total"]) and min(steps["forward"], steps["backward"]) > 0
    assert len(p["ops"]) == 8 and p["ops"][0][1] >= p["ops"][-1][1] > 0


def test_child_process_protocol():
    from benchmarks.common import run_child

    assert run_child("json:dumps", obj=[1, 2]) == "[1, 2]"
    with pytest.raises(RuntimeError, match="json:loads"):
        run_child("json:loads", s="not json")


def _two_grid_pair(folder: Path):
    """A tiny stand-in for a ``realworld`` pair, no download: two bundled 2 mm scans cropped
    around the basal ganglia; the moving one misaligned (rotated, shifted), resampled onto
    another grid (RAS instead of LIA, 2.4 mm, its own origin) with its intensities rescaled;
    labels grouped into GM/WM, each map on its own image's grid."""
    import SimpleITK as sitk

    from benchmarks.realworld import TISSUE_LABELS, TISSUE_NAMES, RealPair, aseg_to_tissue
    from hybridreg.data import load_subject

    def crop(sid):
        s = load_subject(sid, 2)
        img, lab = sitk.ReadImage(str(s.image_path), sitk.sitkFloat32), sitk.ReadImage(str(s.labels_path))
        size, index = [36, 40, 40], [22, 28, 36]
        return sitk.RegionOfInterest(img, size, index), sitk.RegionOfInterest(lab, size, index)

    def write(img, lab, name):
        paths = folder / f"{name}_t1.nii.gz", folder / f"{name}_tissue.nii.gz"
        tissue = sitk.GetImageFromArray(aseg_to_tissue(sitk.GetArrayFromImage(lab)))
        tissue.CopyInformation(lab)
        sitk.WriteImage(img, str(paths[0]))
        sitk.WriteImage(tissue, str(paths[1]))
        return paths

    f_img, f_lab = crop("vxm")
    m_img, m_lab = crop("synthseg_16")
    corners = np.array([m_img.TransformIndexToPhysicalPoint([c * (n - 1) for c, n in zip(bits, m_img.GetSize())])
                        for bits in np.ndindex(2, 2, 2)])
    lo, hi = corners.min(0), corners.max(0)
    ref = sitk.Image([int(np.ceil((b - a) / 2.4)) + 1 for a, b in zip(lo, hi)], sitk.sitkFloat32)
    ref.SetSpacing([2.4] * 3)
    ref.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))  # RAS
    ref.SetOrigin((hi[0], hi[1], lo[2]))
    move = sitk.Euler3DTransform((lo + hi) / 2, 0.0, 0.05, 0.15, (6.0, -5.0, 4.0))
    m_img = sitk.Resample(m_img, ref, move, sitk.sitkLinear, 0.0) * 3.0 + 10.0
    m_lab = sitk.Resample(m_lab, ref, move, sitk.sitkNearestNeighbor, 0, m_lab.GetPixelID())
    (fi, fl), (mi, ml) = write(f_img, f_lab, "fixed"), write(m_img, m_lab, "moving")
    return RealPair("fixed<-moving", "tissue", "fixed", "moving", fi, mi, fl, ml, TISSUE_LABELS, dict(TISSUE_NAMES),
                    "a 2 mm stand-in on two grids")


def test_realworld_suite_runs_on_two_grids(tmp_path, monkeypatch):
    """The ``realworld`` machinery on a tiny stand-in: pairs given as files on two grids
    (other orientation, spacing, origin, intensities; misaligned) run through demons (the
    affine stage, resampling, histogram matching) and through the register service
    (instance, short config); the rows carry the bundled rows' fields, scored on the pair's
    labels the same way by both paths, and the report renders them with the pair's label names."""
    from dataclasses import replace

    import benchmarks.realworld as rw
    from benchmarks import suite
    from benchmarks.methods import FilePair, _instance

    monkeypatch.setenv("HYBRIDREG_DATA", str(tmp_path / "no-data"))
    notes = suite.DATASETS["realworld"].notes()
    assert len(notes) == 1 and "python scripts/fetch_realworld.py" in notes[0]
    real = _two_grid_pair(tmp_path)
    monkeypatch.setattr(rw, "realworld_pairs", lambda root=None, warn=True: [real])
    fields = {"pair", "kind", "method", "seconds", "peak_rss_mb", "dice", "dice_mean", "dice_before", "hd95_mean",
              "folding_percent", "sdlogj", "dice_affine", "label_names"}

    demons = suite.child("realworld", real.name, "sitk-demons", None)
    assert fields <= set(demons) and set(demons["dice"]) == {"1", "2"} and demons["kind"] == "tissue"
    assert demons["dice_mean"] > demons["dice_affine"] > demons["dice_before"] + 0.05, demons
    assert demons["folding_percent"] < 0.5 and 0 < demons["sdlogj"] < 1 and demons["seconds"] > 0

    cfg = tmp_path / "quick.yaml"
    cfg.write_text("level_spacing: [4.0]\niterations: [5]\n")
    monkeypatch.setitem(METHODS, "instance", replace(METHODS["instance"], run=_instance(cfg)))
    pair = suite.DATASETS["realworld"].pairs()[0]
    assert isinstance(pair, FilePair) and pair.labels == (1, 2)
    out = METHODS["instance"].run(pair, None)
    assert out.metrics["config"]["iterations"] == [5] and out.displacement.shape == (3, 40, 40, 36)
    inst = suite.file_pair_row(pair, "instance", out)
    assert fields <= set(inst) and inst["dice_affine"] > inst["dice_before"] + 0.05, inst
    assert inst["seconds"] == pytest.approx(out.metrics["seconds"]["registration"] + out.metrics["seconds"]["affine"])
    assert inst["dice_mean"] > 0.5 and inst["folding_percent"] < 0.5 and "lambda_std_brain" in inst
    # the suite's own scoring (demons, ANTs) agrees with the service's on the service's written outputs
    again = suite.evaluate_files(pair, out.displacement, out.voxel_map)
    assert again["dice_before"]["mean"] == pytest.approx(inst["dice_before"], abs=1e-6)
    assert again["dice_after_affine"]["mean"] == pytest.approx(inst["dice_affine"], abs=1e-6)
    assert again["dice_after"]["mean"] == pytest.approx(inst["dice_mean"], abs=0.005)
    assert again["sdlogj"] == pytest.approx(inst["sdlogj"], abs=1e-3)

    # the λ figure's input: the centre slices of FIXED and of λ in the radiological layout
    from hybridreg.figures import centre_slices
    from hybridreg.io import normalize_intensity, read_image

    (tmp_path / "lambda").mkdir()
    suite.child("realworld", real.name, "instance", str(tmp_path / "lambda" / "instance.npz"))
    z = np.load(tmp_path / "lambda" / "instance.npz")
    fixed, geometry = read_image(pair.fixed_image)
    for k, want in enumerate(centre_slices(normalize_intensity(fixed), geometry.direction)):
        np.testing.assert_allclose(z[f"img{k}"], want, atol=1e-3)  # stored as float16
        assert z[f"lam{k}"].shape == want.shape
    # a 2D suite's file holds its one slice
    np.savez_compressed(tmp_path / "lambda" / "two_d.npz", layout="radiological", img0=np.ones((5, 6), np.float16),
                        lam0=np.full((5, 6), 0.5, np.float16))
    rows = [demons, inst]
    files = report.figures(tmp_path, rows, [])
    assert files["lambda"] == "lambda_maps.png" and (tmp_path / "lambda_maps.png").is_file()
    md = report.markdown("realworld", suite.DATASETS["realworld"].description, {}, rows, [], [], files, notes, None)
    assert "| fixed<-moving | SimpleITK diffeomorphic demons |" in md and "fetch_realworld.py" in md
    report.write_csvs(tmp_path, rows, [], [])
    assert ",1,GM," in (tmp_path / "dice_per_structure.csv").read_text()


def test_the_commit_stamp_is_dirty_for_changed_code_not_for_rewritten_results(tmp_path):
    """A resumed suite run rewrites its own rows and report under benchmarks/results: the stamp
    stays the commit's; a changed code file marks it ``-dirty``."""
    from hybridreg.provenance import git_revision

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "rows.jsonl").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    commit = git_revision(tmp_path)
    assert commit and not commit.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "rows.jsonl").write_text("{}\n{}\n")
    (tmp_path / "benchmarks" / "results" / "report.md").write_text("new\n")
    for where in (tmp_path, tmp_path / "benchmarks"):  # the whole checkout counts, from any folder in it
        assert git_revision(where) == commit
    (tmp_path / "code.py").write_text("x = 2\n")
    for where in (tmp_path, tmp_path / "benchmarks"):
        assert git_revision(where) == commit + "-dirty"


def test_front_labels_do_not_cover_each_other_or_leave_the_axes():
    """Crowded points (the fronts' settings meet near the defaults) each get a label of their own place."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    xy = [(0.150, 0.750), (0.151, 0.7502), (0.152, 0.7498), (0.150, 0.7501), (0.30, 0.70)]
    ax.plot(*zip(*xy), "o")
    ax.set(xlim=(0.1, 0.3), ylim=(0.69, 0.76))  # the last point sits in the corner: its label must turn inwards
    fig.tight_layout()
    report._place_labels(fig, ax, [(p, f"w_reg {i}", "C0") for i, p in enumerate(xy)])
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert [t.get_text() for t in ax.texts] == [f"w_reg {i}" for i in range(len(xy))]
    frame = ax.get_window_extent(renderer)
    assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    r = report._MARKER_PT * fig.dpi / 72.0  # nor a marker: the points' own included
    for x, y in (ax.transData.transform(p) for p in xy):
        assert not any(b.overlaps(Bbox.from_extents(x - r, y - r, x + r, y + r)) for b in boxes)
