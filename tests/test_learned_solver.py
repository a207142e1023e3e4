"""The learned solver end to end: `hybridreg train` (one and two processes), inference and
refinement through the Python API and the CLI, and the shipped weights on bundled data."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridreg import data
from hybridreg.cli import main
from hybridreg.io import Geometry, write_image

SHAPE = (12, 14, 16)
GEO = Geometry(size=(16, 14, 12), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
TINY = """network: {encoder: [4, 8], decoder: [8, 4], lambda_channels: 4}
objective: {lncc_window: 3, svf_steps: 3}
steps: 6
epoch_steps: 3
checkpoint_every: 3
lr: 0.002
seed: 3
pairing: mixed
deform_prob: 0.5
lambda_warmup_steps: 2
lambda_lr_factor: 0.5
synth_prob: 0.5
synth: {deform_std_mm: 1.0, blur_mm: 2.0}
"""


def _blob_volume(k):
    from hybridreg.spatial import gaussian_smooth

    g = torch.Generator().manual_seed(k)
    img = gaussian_smooth(torch.rand(1, 1, *SHAPE, generator=g), 1.5)[0, 0].numpy() * 100
    return img, (img > np.median(img)).astype(np.int32) + (img > np.percentile(img, 80))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinydata")
    lines = ["image,labels,split"]
    for k, split in enumerate(["atlas", "train", "train", "train", "val", "val", "test"]):
        img, lab = _blob_volume(k)
        write_image(root / f"s{k}.nii.gz", img, GEO)
        write_image(root / f"s{k}_seg.nii.gz", lab, GEO, dtype=np.int32)
        lines.append(f"s{k}.nii.gz,s{k}_seg.nii.gz,{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    (root / "tiny.yaml").write_text(TINY)
    return root


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    rc = main(["train", "--data", str(manifest / "manifest.csv"), "--config", str(manifest / "tiny.yaml"), "--out", str(out),
               "--no-progress"])
    assert rc == 0
    return out


def test_cli_train_sees_a_small_object_as_register_does(tmp_path):
    """`hybridreg train` on images under 64 mm across with 96 voxels along an axis (12×14×96 voxels of
    0.5 mm: 48 mm) trains as if they were 4 times larger, the spacing `register` hands the solvers
    for them; the weights record it, so a network trained on small objects runs on them at its grid."""
    from hybridreg.spatial import gaussian_smooth
    from learned.weights import load_weights

    small = tmp_path / "small"
    small.mkdir()
    geo = Geometry(size=(96, 14, 12), spacing=(0.5, 0.5, 0.5), origin=(0.0, 0.0, 0.0), direction=GEO.direction)
    lines = ["image,labels,split"]
    for k, split in enumerate(["atlas", "train", "train", "val", "val"]):
        img = gaussian_smooth(torch.rand(1, 1, 12, 14, 96, generator=torch.Generator().manual_seed(k)), 1.5)[0, 0].numpy() * 100
        lab = (img > np.median(img)).astype(np.int32) + (img > np.percentile(img, 80))
        write_image(small / f"s{k}.nii.gz", img, geo)
        write_image(small / f"s{k}_seg.nii.gz", lab, geo, dtype=np.int32)
        lines.append(f"s{k}.nii.gz,s{k}_seg.nii.gz,{split}")
    (small / "manifest.csv").write_text("\n".join(lines) + "\n")
    (small / "one.yaml").write_text(TINY.replace("steps: 6", "steps: 1").replace("checkpoint_every: 3", "checkpoint_every: 1")
                                    .replace("epoch_steps: 3", "epoch_steps: 1"))
    assert main(["train", "--data", str(small / "manifest.csv"), "--config", str(small / "one.yaml"), "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    assert load_weights(tmp_path / "run" / "model_final.pt")[2] == pytest.approx((2.0, 2.0, 2.0))


def test_training_pairs_drawn_from_label_maps_with_synth_prob(manifest):
    from hybridreg.data.sources import load_dataset
    from learned.train import TrainConfig, _sample_pair

    ds = load_dataset(str(manifest / "manifest.csv"))
    images = [torch.from_numpy(v.image)[None, None] for v in ds.train]
    labels = {id(t): torch.from_numpy(v.labels.astype(np.int64))[None, None] for t, v in zip(images, ds.train)}
    atlas = torch.from_numpy(ds.atlas.image)[None, None]
    cfg = TrainConfig(pairing="subject", flip_prob=0.0, synth_prob=1.0)
    f, m, fl = _sample_pair(ds, images, atlas, cfg, torch.Generator().manual_seed(0), labels)
    assert not any(torch.equal(f, t) or torch.equal(m, t) for t in images + [atlas])
    assert 0.0 <= float(f.min()) and float(f.max()) <= 1.0 and f.shape == images[0].shape
    f0, m0, _ = _sample_pair(ds, images, atlas, replace(cfg, synth_prob=0.0), torch.Generator().manual_seed(0), labels)
    assert any(torch.equal(f0, t) for t in images + [atlas])  # off: the data's own images


def test_cli_train_writes_logs_checkpoints_and_weights(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.yaml", "log.csv", "validation.csv", "history.json", "training.png", "model_best.pt", "model_final.pt",
            "checkpoint_6.pt"} <= names
    hist = json.loads((trained / "history.json").read_text())
    assert len(hist["epochs"]) == 2 and 0 < hist["best_val_dice"] <= 1


def test_cli_train_resume_and_errors(trained, manifest, tmp_path, capsys):
    # a finished run resumes to the same end (nothing left to do) using its own config.yaml
    assert main(["train", "--data", str(manifest / "manifest.csv"), "--out", str(trained), "--resume", "--no-progress"]) == 0
    hist = json.loads((trained / "history.json").read_text())["epochs"]
    assert isinstance(hist[0]["step"], int) and isinstance(hist[0]["val_dice"], float)  # numbers, not the CSV's text
    # other settings than the checkpoint's would be restored over (the optimizer keeps its lr) or fail to load: refused
    for change, key in (("lr=0.5", "lr 0.002 -> 0.5"), ("network.lambda_channels=8", "network.lambda_channels 4 -> 8")):
        before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
        assert main(["train", "--data", str(manifest / "manifest.csv"), "--out", str(trained), "--resume", "--no-progress",
                     "--set", change]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "other settings" in err[0] and key in err[0], err
        assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before
    longer = tmp_path / "longer"  # steps may change on resume (train longer), and the run's config.yaml says so
    shutil.copytree(trained, longer)
    assert main(["train", "--data", str(manifest / "manifest.csv"), "--out", str(longer), "--resume", "--no-progress",
                 "--set", "steps=9"]) == 0
    assert "steps: 9" in (longer / "config.yaml").read_text() and (longer / "checkpoint_9.pt").is_file()
    assert main(["train", "--data", str(manifest / "manifest.csv"), "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert main(["train", "--data", "nowhere.csv", "--out", str(tmp_path / "x")]) == 2
    assert "--data" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 0\n")
    assert main(["train", "--data", str(manifest / "manifest.csv"), "--config", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "steps" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_cli_train_fine_tunes_from_weights(trained, manifest, tmp_path):
    out = tmp_path / "ft"
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(TINY.replace("steps: 6", "steps: 1"))
    assert main(["train", "--data", str(manifest / "manifest.csv"), "--config", str(cfg), "--out", str(out), "--init",
                 str(trained / "model_final.pt"), "--no-progress"]) == 0
    assert main(["train", "--data", str(manifest / "manifest.csv"), "--config", str(cfg), "--out", str(tmp_path / "scratch"),
                 "--no-progress"]) == 0
    from learned.weights import load_weights

    start = load_weights(trained / "model_final.pt")[0].state_dict()
    tuned = load_weights(out / "model_final.pt")[0].state_dict()
    scratch = load_weights(tmp_path / "scratch" / "model_final.pt")[0].state_dict()
    dist = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)
    assert dist(tuned, start) <= 2 * 0.002 < dist(scratch, start)  # one AdamW step (lr 0.002) from the given weights


@pytest.mark.slow
def test_torchrun_two_cpu_processes(manifest, trained, tmp_path):
    """DistributedDataParallel over gloo with two CPU processes on tiny data."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hybridreg",
           "train", "--data", str(manifest / "manifest.csv"), "--config", str(manifest / "tiny.yaml"), "--out", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = torch.load(out / "checkpoint_6.pt", weights_only=False)
    assert ck["world_size"] == 2 and len(ck["generators"]) == 2
    assert not torch.equal(ck["generators"][0], ck["generators"][1])  # each rank draws its own pairs
    # gradients were averaged over two different pairs per step: not the single-process run
    single = torch.load(trained / "checkpoint_6.pt", weights_only=False)["model"]
    assert any(not torch.equal(a, single[k]) for k, a in ck["model"].items())
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 6


def test_learned_register_pair_api_and_refinement(trained, manifest):
    from hybridreg.solvers import RegistrationResult, Status
    from learned.solver import LEARNED_REFINE, LearnedConfig, register_pair

    f, _ = _blob_volume(4)
    m, _ = _blob_volume(5)
    ft, mt = torch.from_numpy(f / 100)[None, None].float(), torch.from_numpy(m / 100)[None, None].float()
    res = register_pair(ft, mt, LearnedConfig(weights=str(trained / "model_final.pt"), cascade=0), spacing=(2.0, 2.0, 2.0))
    assert isinstance(res, RegistrationResult) and res.status is Status.NETWORK
    assert res.displacement.shape == (1, 3, *SHAPE) and res.lam.shape == (1, 1, 6, 7, 8)
    (net_pass,) = res.history  # the network pass: its grid (the 2 mm training grid) and the velocity's; 2 passes
    assert (net_pass.shape, net_pass.control_shape, net_pass.iterations, net_pass.terms) == (SHAPE, (6, 7, 8), 2, {})
    assert 0 < net_pass.seconds <= res.seconds
    # inverse-consistent inference: the swapped pair gives exactly the negated SVF, and the SVF is the mean of
    # the forward pass and the swapped pass's negation (each one pass, inverse_consistent off)
    one_way = LearnedConfig(weights=str(trained / "model_final.pt"), inverse_consistent=False, cascade=0)
    fwd, back = (register_pair(a, b, one_way, spacing=(2.0, 2.0, 2.0)) for a, b in ((ft, mt), (mt, ft)))
    assert fwd.history[0].iterations == 1 and not torch.allclose(fwd.velocity, -back.velocity, atol=1e-3)
    torch.testing.assert_close(res.velocity, 0.5 * (fwd.velocity - back.velocity))
    swapped = register_pair(mt, ft, LearnedConfig(weights=str(trained / "model_final.pt"), cascade=0), spacing=(2.0, 2.0, 2.0))
    torch.testing.assert_close(swapped.velocity, -res.velocity)
    torch.testing.assert_close(res.lam, fwd.lam)  # λ: the forward pass's, on FIXED's frame
    # float64 images: the network runs in its weights' float32, the result comes back in float64
    res64 = register_pair(ft.double(), mt.double(), LearnedConfig(weights=str(trained / "model_final.pt"), cascade=0),
                          spacing=(2.0, 2.0, 2.0))
    assert res64.displacement.dtype == res64.velocity.dtype == res64.lam.dtype == torch.float64
    torch.testing.assert_close(res64.velocity.float(), res.velocity)
    # on a 1 mm grid the network runs on its 2 mm training grid; outputs come back on the 1 mm grid
    big = torch.nn.functional.interpolate(ft, scale_factor=2, mode="trilinear")
    res1 = register_pair(big, big.flip(2), LearnedConfig(weights=str(trained / "model_final.pt")), spacing=(1.0, 1.0, 1.0))
    assert res1.displacement.shape == (1, 3, 24, 28, 32) and res1.lam.shape == (1, 1, 6, 7, 8)
    from instance_opt import InstanceOptConfig
    from instance_opt.solver import level_grids, levels_run

    from hybridreg.objective import evaluate

    cfg = LearnedConfig(weights=str(trained / "model_final.pt"), refine=True, progress=False, refine_objective_from_weights=True,
                        refine_config=InstanceOptConfig(level_spacing=(2.0,), iterations=(15,), min_iterations=15))
    ref = register_pair(ft, mt, cfg, spacing=(2.0, 2.0, 2.0))
    assert [h.status for h in ref.history] == [Status.NETWORK, Status.MAX_ITERATIONS] and ref.history[1].iterations == 15
    # the solver named learned+refine refines whatever `refine` says: the same result
    via = LEARNED_REFINE.register_pair(ft, mt, replace(cfg, refine=False), spacing=(2.0, 2.0, 2.0))
    assert torch.equal(via.displacement, ref.displacement) and len(via.history) == 2
    assert ref.final_terms["total"] < res.final_terms["total"]  # refinement lowers the network's energy
    # by default the refinement minimises the instance solver's energy (another LNCC ε and number of squarings than
    # the network's), from the network's one-way pass: that energy falls from the start's
    assert LearnedConfig().refine_objective_from_weights is None and LearnedConfig().refine_config.iterations == (7, 2)
    # its 1.75 mm level runs on a 1 mm image only: on a 2 mm one its grids are the 2 mm level's, so it is skipped
    default_refine = LearnedConfig().refine_config
    assert levels_run((48, 56, 40), (2.0, 2.0, 2.0), default_refine) == [0]
    assert levels_run((96, 112, 80), (1.0, 1.0, 1.0), default_refine) == [0, 1]
    assert level_grids((96, 112, 80), (1.0, 1.0, 1.0), 1.75, 1)[0] == (55, 64, 46)
    one_mm = register_pair(big, big.flip(2), LearnedConfig(weights=str(trained / "model_final.pt"), refine=True, progress=False,
                                                          refine_config=replace(default_refine, iterations=(1, 1))),
                           spacing=(1.0, 1.0, 1.0))
    assert [h.status for h in one_mm.history] == [Status.NETWORK, Status.MAX_ITERATIONS, Status.MAX_ITERATIONS]
    assert [tuple(h.shape) for h in one_mm.history[1:]] == [(12, 14, 16), (14, 16, 18)]
    assert one_mm.displacement.shape == (1, 3, 24, 28, 32) and one_mm.velocity.shape == (1, 3, 14, 16, 18)
    inst = InstanceOptConfig().objective
    instance_energy = replace(cfg, refine_objective_from_weights=False)
    on_instance = register_pair(ft, mt, instance_energy, spacing=(2.0, 2.0, 2.0))
    start = evaluate(ft, mt, fwd.velocity, fwd.lam, inst, (2.0, 2.0, 2.0)).terms.total
    assert on_instance.final_terms["total"] < float(start)
    assert not torch.equal(on_instance.displacement, ref.displacement)
    with pytest.raises(ValueError, match="the network registers 3D images, FIXED and MOVING are 2D"):
        register_pair(ft[:, :, 0], mt[:, :, 0], LearnedConfig(weights=str(trained / "model_final.pt")))


def test_cascade_adds_the_svf_of_a_pass_in_the_mid_space(trained, monkeypatch):
    """``cascade`` (default 1): the SVF is the first (inverse-consistent) pass's, v, plus that of a
    pass registering FIXED ∘ exp(−v/2) to MOVING ∘ exp(v/2); the swapped pair gives exactly the
    negated SVF; not used with refinement."""
    from hybridreg.spatial import resize_field, scaling_and_squaring, warp
    from instance_opt import InstanceOptConfig
    from learned.solver import LearnedConfig, register_pair

    import learned.solver as solver_module

    f, _ = _blob_volume(4)
    m, _ = _blob_volume(5)
    ft, mt = torch.from_numpy(f / 100)[None, None].float(), torch.from_numpy(m / 100)[None, None].float()
    w = str(trained / "model_final.pt")
    assert LearnedConfig().cascade == 1
    # the tiny test network's SVF is at most about 3e-4 voxels, where exp(±v/2) is the identity to
    # rounding: scaled up (linearly, so the inverse-consistent average stays exact), the mid-space pass's
    # inputs differ from the plain pass's and the comparisons below can tell them apart
    real_load = solver_module._load

    class Louder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.config = net, net.config

        def forward(self, *args):
            out = self.net(*args)
            return out._replace(velocity=3000.0 * out.velocity)

    def louder_load(*args):
        net, *rest = real_load(*args)
        return (Louder(net), *rest)

    monkeypatch.setattr(solver_module, "_load", louder_load)
    first = register_pair(ft, mt, LearnedConfig(weights=w, cascade=0), spacing=(2.0, 2.0, 2.0))
    both = register_pair(ft, mt, LearnedConfig(weights=w), spacing=(2.0, 2.0, 2.0))
    assert both.history[0].iterations == 4  # two inverse-consistent passes
    half, back = (resize_field(scaling_and_squaring(s * first.velocity, first.svf_steps), SHAPE) for s in (0.5, -0.5))
    second = register_pair(warp(ft, back), warp(mt, half), LearnedConfig(weights=w, cascade=0), spacing=(2.0, 2.0, 2.0))
    assert float(second.velocity.abs().max()) > 0
    torch.testing.assert_close(both.velocity, first.velocity + second.velocity, rtol=1e-4, atol=1e-10)
    assert not torch.allclose(both.velocity, first.velocity, rtol=1e-2, atol=0)
    swapped = register_pair(mt, ft, LearnedConfig(weights=w), spacing=(2.0, 2.0, 2.0))
    assert torch.equal(swapped.velocity, -both.velocity)  # exactly inverse-consistent
    # not stop 39's pass (FIXED ← MOVING ∘ exp(v), which the swapped pair does not mirror): the sums differ
    plain = register_pair(ft, warp(mt, resize_field(scaling_and_squaring(first.velocity, first.svf_steps), SHAPE)),
                          LearnedConfig(weights=w, cascade=0), spacing=(2.0, 2.0, 2.0))
    assert not torch.allclose(both.velocity, first.velocity + plain.velocity, rtol=1e-2, atol=0)
    assert float((second.velocity - plain.velocity).abs().max()) > 0.05 * float(plain.velocity.abs().max())
    torch.testing.assert_close(both.lam, first.lam)  # λ: the first pass's
    refine = InstanceOptConfig(level_spacing=(2.0,), iterations=(2,), min_iterations=2, progress=False)
    a, b = (register_pair(ft, mt, LearnedConfig(weights=w, refine=True, progress=False, refine_config=refine, cascade=c),
                          spacing=(2.0, 2.0, 2.0)) for c in (0, 1))
    assert a.history[0].iterations == b.history[0].iterations == 1 and torch.equal(a.displacement, b.displacement)
    with pytest.raises(ValueError, match="cascade"):
        LearnedConfig(cascade=5)


def test_refinement_energy_by_default_is_the_instance_solvers_for_the_shipped_network_only():
    """``refine_objective_from_weights=None``: the shipped network (trained on the instance
    solver's model, LNCC ε and squarings aside) is refined on the instance solver's energy, a
    network trained on another model (the ``fixed-w2`` network: w_reg 2) on its own; the
    conditional solvers refine their code's energy with 12 iterations."""
    from learned.solver import NAMED_WEIGHTS, ConditionalConfig, LearnedConfig, register_pair

    assert ConditionalConfig().refine_objective_from_weights is True and ConditionalConfig().refine_config.iterations == (12,)
    f, m = data.load_subject("vxm", 2), data.load_subject("synthseg_17", 2)
    ft, mt = (torch.from_numpy(s.image)[None, None] for s in (f, m))
    short = replace(LearnedConfig().refine_config, iterations=(2, 2), progress=False)
    for weights, own in (("", False), (str(NAMED_WEIGHTS["fixed-w2"]), True)):
        runs = {flag: register_pair(ft, mt, LearnedConfig(weights=weights, refine=True, progress=False, refine_config=short,
                                                          refine_objective_from_weights=flag), spacing=f.spacing)
                for flag in (None, False, True)}
        assert not torch.equal(runs[False].displacement, runs[True].displacement)
        assert torch.equal(runs[None].displacement, runs[own].displacement), weights


def test_one_cascade_pass_lowers_the_shipped_networks_energy_on_a_bundled_pair():
    """The reason ``cascade`` defaults to 1 (``docs/results.md``, "A recursive pass of the learned
    solver"): on a bundled test pair (2 mm) the shipped network's energy after the recursive pass is
    below that of one (inverse-consistent) pass; its SDlogJ rises towards instance optimization's."""
    from learned.solver import DEFAULT_WEIGHTS, LearnedConfig, register_pair

    if not DEFAULT_WEIGHTS.is_file():
        pytest.fail(f"shipped weights missing: {DEFAULT_WEIGHTS}")
    f, m = data.load_subject("vxm", 2), data.load_subject("synthseg_17", 2)
    ft, mt = (torch.from_numpy(s.image)[None, None] for s in (f, m))
    terms = [register_pair(ft, mt, LearnedConfig(cascade=c), spacing=f.spacing).final_terms for c in (0, 1)]
    assert terms[1]["total"] < terms[0]["total"]
    assert terms[1]["similarity"] < terms[0]["similarity"] and terms[1]["regularization"] > terms[0]["regularization"]


def test_cli_learned_bad_weights(manifest, tmp_path, capsys):
    img = str(manifest / "s4.nii.gz")
    assert main(["register", img, img, "--out", str(tmp_path / "o"), "--solver", "learned", "--weights", str(tmp_path / "no.pt")]) == 2
    assert "--weights" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["register", img, img, "--out", str(tmp_path / "o"), "--solver", "learned", "--weights", str(junk)]) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["register", img, img, "--out", str(tmp_path / "o"), "--solver", "instance", "--weights", str(junk)]) == 2
    assert "learned solvers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    from learned.solver import DEFAULT_WEIGHTS

    if not DEFAULT_WEIGHTS.is_file():
        pytest.fail(f"shipped weights missing: {DEFAULT_WEIGHTS}")
    fid, mid = data.demo_pair()
    f, m = data.load_subject(fid, 2), data.load_subject(mid, 2)
    out = tmp_path_factory.mktemp("shipped") / "out"
    rc = main(["register", str(f.image_path), str(m.image_path), "--out", str(out), "--fixed-labels", str(f.labels_path),
               "--moving-labels", str(m.labels_path), "--solver", "learned", "--no-progress"])
    assert rc == 0
    return out, f


@pytest.mark.slow
def test_shipped_weights_register_the_bundled_pair(shipped_run):
    out, f = shipped_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["solver"] == "learned"
    assert m["dice_after"]["mean"] > m["dice_before"]["mean"] + 0.1
    assert m["folding_percent"] < 0.1


def test_shipped_weights_predict_spatially_varying_lambda(shipped_run):
    import SimpleITK as sitk

    out, f = shipped_run
    lam = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lambda.nii.gz")))
    inside = lam[f.labels > 0]
    assert float(inside.std()) > 0.05 and 0 < float(inside.min()) and float(inside.max()) <= 1  # the beta bound 1 - 1e-6 rounds to 1 in float32
    m = json.loads((out / "metrics.json").read_text())
    assert m["lambda"]["std_inside_fixed_labels"] == pytest.approx(float(inside.std()), rel=1e-3)


def test_named_weights_resolve_to_the_shipped_files():
    """`--weights` takes the shipped files by name (the earlier stages stay reachable for
    comparison); configure() records the file, and an unknown name lists the names."""
    from learned.solver import DEFAULT_WEIGHTS, LEARNED, NAMED_WEIGHTS, LearnedConfig, weights_path

    assert weights_path("") == DEFAULT_WEIGHTS == NAMED_WEIGHTS["shipped"]
    for name, path in NAMED_WEIGHTS.items():
        assert weights_path(name) == path and path.is_file(), name
        assert LEARNED.configure(LearnedConfig(weights=name)).weights == str(path)
    assert len({p.resolve() for p in NAMED_WEIGHTS.values()}) == len(NAMED_WEIGHTS)
    with pytest.raises(FileNotFoundError, match="--weights.*stage1"):
        weights_path("stage9")


def test_inverse_consistent_pass_carries_the_region_map_into_the_moving_frame():
    """With a region map, the swapped pass sees it carried into MOVING's frame by exp(−v):
    for a constant forward SVF of +2 voxels along x, the map moves by +2 voxels; the result
    is the mean of the forward SVF and the swapped pass's negation."""
    from types import SimpleNamespace

    from learned.solver import _inverse_consistent

    seen = {}

    def net(fixed, moving, code, region):
        seen.update(fixed=fixed, region=region)
        return SimpleNamespace(velocity=torch.full((1, 3, 6, 7, 8), -1.0))

    f, m = torch.rand(1, 1, 12, 14, 16), torch.rand(1, 1, 12, 14, 16)
    region = torch.zeros(1, 1, 12, 14, 16)
    region[:, :, :6] = 1.0
    forward = torch.zeros(1, 3, 6, 7, 8)
    forward[:, 0] = 1.0  # voxels of the 6x7x8 control grid: 2 voxels of the 12x14x16 grid
    v = _inverse_consistent(net, f, m, None, region, forward, svf_steps=4)
    assert seen["fixed"] is m  # the swapped pair
    torch.testing.assert_close(seen["region"][:, :, :8], torch.ones(1, 1, 8, 14, 16))  # 1 up to x = 5 + 2
    torch.testing.assert_close(seen["region"][:, :, 8:], torch.zeros(1, 1, 4, 14, 16))
    torch.testing.assert_close(v, 0.5 * (forward + 1.0))
    assert _inverse_consistent(net, f, m, None, None, forward, svf_steps=4) is not None and seen["region"] is None


def test_a_config_written_by_one_solver_is_refused_by_another_in_one_line_naming_its_solver(tmp_path):
    """``config.yaml`` of ``learned+refine`` fed to ``--solver learned`` ran the network alone without a word (its
    ``refine: true`` overridden by the name); fed to the instance solver it was "unknown keys" without saying whose."""
    from hybridreg.config import dump_yaml
    from hybridreg.service import solver_and_config

    _, cfg = solver_and_config("learned+refine", progress=False)
    dump_yaml(cfg, tmp_path / "plain.yaml", header="written by hand")
    assert (tmp_path / "plain.yaml").read_text().startswith("# written by hand\n")
    with pytest.raises(ValueError, match=r"refine: true, the setting of --solver learned\+refine"):
        solver_and_config("learned", tmp_path / "plain.yaml")
    # without a run's header: the solvers that read and accept it (not learned, which refuses refine: true)
    with pytest.raises(ValueError, match=r"unknown key.*\(it is a config of --solver learned\+refine or "
                                         r"learned-conditional\+refine: give --solver with it\)"):
        solver_and_config("instance", tmp_path / "plain.yaml")
    assert solver_and_config("learned+refine", tmp_path / "plain.yaml")[1].refine
    # a run's config.yaml names its solver in its first line
    dump_yaml(cfg, tmp_path / "config.yaml", header="The configuration of --solver learned+refine in this run (...)")
    with pytest.raises(ValueError, match=r"\(it is the config of a --solver learned\+refine run: give --solver "
                                         r"learned\+refine with it\)"):
        solver_and_config("instance", tmp_path / "config.yaml")
