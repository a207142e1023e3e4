"""The λ regressor (method §3.1, Wang & Zhang): MAP targets, tiny-run training end to end,
weight files, and the solver that registers with the predicted λ."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from hybridreg.data.sources import RegistrationDataset, Volume
from hybridreg.spatial import gaussian_smooth
from instance_opt import InstanceOptConfig
from learned import regressor as R


def _volume(i, shape=(16, 16, 16)):
    g = torch.Generator().manual_seed(i)
    img = gaussian_smooth(torch.rand(1, 1, *shape, generator=g), 1.5)[0, 0]
    img = (img - img.min()) / (img.max() - img.min())
    return Volume(f"s{i}", img.numpy(), (img.numpy() * 4).astype(np.int32))


QUICK_MAP = InstanceOptConfig(lambda_mode="map", control_factor=(2,), level_spacing=(2.0,), iterations=(30,), progress=False)


def test_map_targets_are_map_estimates_and_resume(tmp_path, monkeypatch):
    ds = RegistrationDataset("tiny", (2.0, 2.0, 2.0), [_volume(i) for i in range(4)])
    cache = tmp_path / "targets.json"
    first = R.map_targets(ds, 3, QUICK_MAP, synth_prob=0.5, cache=cache, progress=False)
    assert len(first) == 3 and all(t["lam"] > 0 and t["fixed"] != t["moving"] for t in first)
    assert json.loads(cache.read_text()) == first
    # resuming does no registration and returns the same targets
    monkeypatch.setattr(R, "instance_register_pair", lambda *a, **k: pytest.fail("registered again"))
    assert R.map_targets(ds, 3, QUICK_MAP, synth_prob=0.5, cache=cache, progress=False) == first


def test_blurred_pairs_blur_one_image_each_and_extend_a_cached_run(tmp_path, monkeypatch):
    ds = RegistrationDataset("tiny", (2.0, 2.0, 2.0), [_volume(i) for i in range(4)])
    cache = tmp_path / "targets.json"
    plain = R.map_targets(ds, 2, QUICK_MAP, cache=cache, progress=False)
    calls = []
    real = R.instance_register_pair
    monkeypatch.setattr(R, "instance_register_pair", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = R.map_targets(ds, 2, QUICK_MAP, blur_pairs=3, blur_mm=4.0, cache=cache, progress=False)
    assert len(calls) == 3 and both[:2] == plain  # the plain pairs come from the cache
    by_id = {v.subject_id: v for v in ds.train}
    for t in both[2:]:
        assert t["index"] >= R.BLUR_INDEX and t["lam"] > 0
        sigma = max(t["blur"])
        assert min(t["blur"]) == 0.0 and 1.0 <= sigma <= 4.0  # one image of each pair, U(blur_mm / 4, blur_mm) mm
        f, m = R.target_images(t, by_id, ds.spacing)
        unblurred = R.target_images({**t, "blur": [0.0, 0.0]}, by_id, ds.spacing)
        i = t["blur"].index(sigma)
        blurred, sharp = (f, m)[i], unblurred[i]

        def roughness(x):
            return float(sum((torch.diff(x, dim=a) ** 2).mean() for a in (2, 3, 4)))

        assert roughness(blurred) < 0.7 * roughness(sharp)
        assert torch.equal((f, m)[1 - i], unblurred[1 - i])
    assert json.loads(cache.read_text()) == both


def test_tiny_training_fits_its_targets_and_round_trips(tmp_path):
    vols = [_volume(i) for i in range(4)]
    inputs = [R.regressor_inputs(torch.from_numpy(a.image)[None, None], torch.from_numpy(b.image)[None, None],
                                 (2.0, 2.0, 2.0), 4.0) for a, b in zip(vols, vols[1:] + vols[:1])]
    targets = [0.2, 0.5, 1.0, 3.0]
    cfg = R.RegressorConfig(channels=4, levels=2, steps=150, batch_size=4, lr=3e-3)
    untrained = R.LambdaRegressor(cfg).eval()
    net, log = R.train_regressor(inputs, targets, cfg, progress=False)
    assert len(log) == 3 and log[-1]["loss"] < log[0]["loss"]

    def err(n):
        with torch.no_grad():
            pred = torch.cat([n(f, m) for f, m in inputs])
        return float(((pred - torch.tensor(targets).log()) ** 2).mean())

    assert err(net) < 0.5 * err(untrained)
    with pytest.raises(ValueError, match="train_regressor.*`targets`"):  # had failed inside math.log
        R.train_regressor(inputs, [0.2, 0.5, 0.0, 3.0], cfg, progress=False)
    path = tmp_path / "reg.pt"
    R.save_regressor(path, net, {"pairs": 4})
    back, info = R.load_regressor(path)
    assert info == {"pairs": 4}
    f, m = inputs[0]
    with torch.no_grad():
        assert torch.allclose(back(f, m), net(f, m))
    with pytest.raises(ValueError, match="--weights"):
        (tmp_path / "bad.pt").write_bytes(b"not a weight file")
        R.load_regressor(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="RegressorConfig: `levels` must be in"):
        R.RegressorConfig(levels=0)


def test_learned_lambda_solver_registers_at_the_predicted_lambda(tmp_path):
    net = R.LambdaRegressor(R.RegressorConfig(channels=2, levels=1))
    with torch.no_grad():
        net.head[-1].bias.fill_(float(np.log(0.7)))
        net.head[-1].weight.zero_()  # predicts λ = 0.7 for every pair
    path = tmp_path / "reg.pt"
    R.save_regressor(path, net.eval())
    f, m = (torch.from_numpy(_volume(i).image)[None, None] for i in (1, 2))
    register = replace(R.LearnedLambdaConfig().register, level_spacing=(2.0,), iterations=(10,))
    cfg = R.LearnedLambdaConfig(weights=str(path), register=register, progress=False)
    res = R.LEARNED_LAMBDA.register_pair(f, m, R.LEARNED_LAMBDA.configure(cfg), spacing=(2.0, 2.0, 2.0))
    assert float(res.lam.reshape(-1)[0]) == pytest.approx(0.7, rel=1e-5)
    assert res.config is cfg and res.displacement.shape == (1, 3, 16, 16, 16)
    # the default registration is the MAP energy with λ fixed
    assert R.LearnedLambdaConfig().register.objective.log_det and R.LearnedLambdaConfig().register.control_factor == (4,)
    with pytest.raises(FileNotFoundError, match="--weights"):
        R.LEARNED_LAMBDA.configure(replace(cfg, weights=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="uniform"):
        R.LearnedLambdaConfig(register=InstanceOptConfig(lambda_mode="map"))


def test_map_config_is_the_committed_yaml():
    from pathlib import Path

    from hybridreg.config import load_yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "instance_map.yaml"
    assert load_yaml(path, InstanceOptConfig) == R.map_config()


def test_inputs_through_the_affine_map_match_the_same_grid():
    """MOVING on its own grid through the affine stage's voxel map gives the network the same
    inputs as MOVING already on FIXED's grid (here the map is the identity)."""
    f, m = (torch.from_numpy(_volume(i, (20, 24, 16)).image)[None, None] for i in (3, 4))
    identity = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)[None]
    direct = R.regressor_inputs(f, m, (2.0, 2.0, 2.0), 4.0)
    mapped = R.regressor_inputs(f, m, (2.0, 2.0, 2.0), 4.0, moving_map=identity, moving_spacing=(2.0, 2.0, 2.0))
    assert direct[0].shape == (1, 1, 10, 12, 8)
    for a, b in zip(direct, mapped):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("arg", [["--blur-mm", "-1"], ["--blur-pairs", "-3"], ["--pairs", "0"], ["--seed", "-1"]])
def test_regressor_command_refuses_bad_numbers_before_any_work(tmp_path, arg, capsys):
    with pytest.raises(SystemExit) as e:
        R.main(["--out", str(tmp_path / "out"), *arg])
    assert e.value.code == 2 and arg[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_regressor_command_trains_with_the_seed_it_is_given(tmp_path, monkeypatch):
    """``--seed`` reaches the training's RegressorConfig and config.yaml; the targets are not
    recomputed (their own seed is map_targets')."""
    import yaml

    ds = RegistrationDataset("tiny", (2.0, 2.0, 2.0), [_volume(i) for i in range(3)])
    monkeypatch.setattr("hybridreg.data.sources.bundled", lambda spacing: ds)
    targets = [{"fixed": "s0", "moving": "s1", "synth": [None, None], "index": 0, "lam": 0.5, "seconds": 1.0},
               {"fixed": "s1", "moving": "s2", "synth": [None, None], "index": 1, "lam": 2.0, "seconds": 1.0}]
    monkeypatch.setattr(R, "map_targets", lambda *a, **k: targets)
    seen = []

    def train(inputs, lams, config, progress=True):
        seen.append(config)
        return R.LambdaRegressor(config).eval(), [{"step": 50, "loss": 1.0}]

    monkeypatch.setattr(R, "train_regressor", train)
    assert R.main(["--out", str(tmp_path / "out"), "--pairs", "2", "--seed", "7", "--no-progress"]) == 0
    assert [c.seed for c in seen] == [7] and yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["seed"] == 7


LIA = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)  # the bundled grid's direction (hybridreg.data)


def _reoriented(arr, spacing, direction, code):
    """``arr`` (tensor axis order, voxel size ``spacing``) as SimpleITK reorients it to ``code``:
    ``(array, spacing, direction)`` of the same image stored in another axis order."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in reversed(spacing)])
    img.SetDirection(direction)
    out = sitk.DICOMOrient(img, code)
    return sitk.GetArrayFromImage(out), tuple(reversed(out.GetSpacing())), out.GetDirection()


def test_the_training_frame_is_the_bundled_grid_and_leaves_it_unchanged():
    import SimpleITK as sitk

    from hybridreg import data
    from hybridreg.io import read_image

    _, geo = read_image(data.load_subject(data.demo_pair()[0], 2).image_path)
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geo.direction) == R.TRAINING_ORIENTATION
    assert tuple(n * h for n, h in zip(geo.shape, geo.array_spacing)) == R.TRAINING_EXTENT_MM
    x = torch.rand(1, 1, 56, 48, 40)
    assert torch.equal(R.training_frame(x, (4.0, 4.0, 4.0), geo.direction), x)


@pytest.mark.parametrize("code", ["RAS", "PSL", "IRP"])
def test_the_prediction_does_not_depend_on_the_order_of_the_array_axes(code):
    """The same pair stored in another axis order (both images alike, with the direction and
    voxel sizes that say so) gets the same λ; without the direction it does not."""
    spacing = (2.0, 2.0, 4.0)
    f, m = (_volume(i, (24, 20, 16)).image for i in (3, 4))
    torch.manual_seed(0)
    net = R.LambdaRegressor(R.RegressorConfig(channels=2, levels=2)).eval()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None]  # noqa: E731
    ref = R.predict_lambda(net, t(f), t(m), spacing, fixed_direction=LIA)
    fo, spacing_o, direction_o = _reoriented(f, spacing, LIA, code)
    mo = _reoriented(m, spacing, LIA, code)[0]
    assert fo.shape != f.shape or not np.array_equal(fo, f)
    assert torch.allclose(R.predict_lambda(net, t(fo), t(mo), spacing_o, fixed_direction=direction_o), ref, rtol=1e-5)
    assert not torch.allclose(R.predict_lambda(net, t(fo), t(mo), spacing_o), ref, rtol=1e-3)


def test_training_frame_names_a_bad_direction():
    with pytest.raises(ValueError, match="fixed_direction"):
        R.training_frame(torch.zeros(1, 1, 8, 8, 8), (4.0, 4.0, 4.0), (1.0, 0.0, 0.0, 1.0))


def test_the_service_gives_the_solver_the_fixed_grids_direction(tmp_path):
    """Scans read from files reach the solver with FIXED's direction (what ``learned-lambda``
    puts its inputs in the training frame by)."""
    import SimpleITK as sitk

    from hybridreg import data, service

    f, m = (data.load_subject(s, 2) for s in data.demo_pair())
    ras = tmp_path / "fixed_ras.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(f.image_path)), "RAS"), str(ras))
    inputs = service.read_inputs(ras, m.image_path)
    seen = {}

    class Capture:
        name = "capture"

        def register_pair(self, fixed, moving, config=None, **grids):
            seen.update(grids)
            raise RuntimeError("captured")

    with pytest.raises(RuntimeError, match="captured"):
        service.solve_pairs([inputs], Capture(), None, torch.device("cpu"), [service.prealign(inputs, kind="none")])
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(seen["fixed_direction"]) == "RAS"


def test_learned_lambda_names_a_2d_pair():
    from hybridreg.solvers import get_solver

    solver = get_solver("learned-lambda")
    with pytest.raises(ValueError, match="registers 3D images, FIXED and MOVING are 2D"):
        solver.register_pair(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), solver.default_config(), spacing=(1.0, 1.0))


def test_pairs_whose_fixed_grids_differ_in_direction_are_not_batched_together(tmp_path):
    """One batch passes one ``fixed_direction``: a fixed scan flipped left-right (same shape and
    spacing, another direction) gets another batch key."""
    import SimpleITK as sitk

    from hybridreg import data, service

    f, m = (data.load_subject(s, 2) for s in data.demo_pair())
    flipped = tmp_path / "fixed_ria.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(f.image_path)), "RIA"), str(flipped))
    a, b = service.read_inputs(f.image_path, m.image_path), service.read_inputs(flipped, m.image_path)
    assert a.fixed.shape == b.fixed.shape and a.geometry.direction != b.geometry.direction
    assert service.batch_key(a) != service.batch_key(b)


def test_regressor_benchmark_reports_the_compared_file_against_the_same_map_run(tmp_path):
    from benchmarks import lambda_regressor as LR

    row = dict(dataset="realworld", pair="a<-b", lambda_map=0.5, lambda_pred=0.55, ratio=1.1, seconds_map=5.0,
               seconds_pred=0.05, time_fraction=0.01, dice_map=0.7, sdlogj_map=0.2, folding_map=0.0, dice_pred=0.71,
               sdlogj_pred=0.21, folding_pred=0.0, seconds_pred_registration=5.0)
    rows = [dict(row, lambda_compare=0.8, ratio_compare=1.6), dict(row, pair="b<-a", lambda_compare=0.45, ratio_compare=0.9)]
    text = LR.markdown({"environment": None, "compare": "/x/candidate.pt", "rows": rows})
    assert "within 20 % of MAP on 2 of 2 pairs" in text
    assert "(`candidate.pt`) against the same MAP run: within 20 % on 1 of 2 pairs (ratios 1.60, 0.90)" in text
    with pytest.raises(SystemExit) as e:
        LR.main(["--compare", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and not list(tmp_path.iterdir())


def test_every_solver_config_names_the_weights_it_runs_with():
    """metrics.json's provenance records a network's weights: learned-lambda's shipped regressor was left out
    (its ``weights`` is ``None`` and it named no default)."""
    from hybridreg.provenance import weights_file
    from instance_opt.solver import InstanceOptConfig
    from learned.solver import DEFAULT_WEIGHTS, LearnedConfig

    assert weights_file(R.LearnedLambdaConfig()) == str(R.REGRESSOR_WEIGHTS) and R.REGRESSOR_WEIGHTS.is_file()
    assert weights_file(R.LearnedLambdaConfig(weights="mine.pt")) == "mine.pt"
    assert weights_file(LearnedConfig()) == str(DEFAULT_WEIGHTS) and weights_file(InstanceOptConfig()) is None
