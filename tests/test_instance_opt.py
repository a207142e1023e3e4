"""Instance optimization: end to end on a bundled real-data pair, and its contracts."""

import numpy as np
import pytest
import torch

from hybridreg import data
from hybridreg.config import from_dict
from hybridreg.metrics import dice, jacobian_stats
from hybridreg.objective import ObjectiveConfig, evaluate
from hybridreg.spatial import warp
from instance_opt import InstanceOptConfig, RelativeChangeStopping, register_pair

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tensor(x):
    return torch.from_numpy(np.ascontiguousarray(x))[None, None]


@pytest.fixture(scope="module")
def pair():
    fid, mid = data.demo_pair()
    return data.load_subject(fid, 2), data.load_subject(mid, 2)


@pytest.fixture(scope="module")
def quick_result(pair):
    f, m = pair
    cfg = InstanceOptConfig(level_spacing=(8.0, 4.0), iterations=(60, 40), progress=False)
    return register_pair(tensor(f.image), tensor(m.image), cfg, spacing=f.spacing)


def test_low_resolution_registration_improves_dice_without_folding(pair, quick_result):
    f, m = pair
    r = quick_result
    labels = data.evaluation_labels()
    warped = warp(tensor(m.labels), r.displacement, mode="nearest")[0, 0].numpy()
    before = np.nanmean(list(dice(f.labels, m.labels, labels).values()))
    after = np.nanmean(list(dice(f.labels, warped, labels).values()))
    assert after - before >= 0.1, (before, after)
    assert jacobian_stats(r.displacement)["folding_percent"] < 0.1
    # the result carries what a user needs
    assert r.displacement.shape == (1, 3, *f.image.shape)
    assert r.warped.shape == (1, 1, *f.image.shape)
    assert len(r.history) == 2 and all(h.iterations > 0 for h in r.history)
    assert r.history[0].terms["total"][0] > r.history[0].terms["total"][-1]
    lam = r.lambda_on_image_grid()
    assert lam.shape == (1, 1, *f.image.shape) and float(lam.std()) > 0  # voxelwise λ varies


def test_final_terms_are_the_shared_objective(pair, quick_result):
    """The solver's reported energy is evaluate() on its own (velocity, λ)."""
    f, m = pair
    r = quick_result
    ev = evaluate(tensor(f.image), tensor(m.image), r.velocity, r.lam, r.config.objective, f.spacing)
    assert float(ev.terms.total) == pytest.approx(r.final_terms["total"], rel=1e-5)
    assert torch.allclose(ev.displacement, r.displacement)


def test_uniform_lambda_baseline_same_code_path(pair):
    f, m = pair
    cfg = InstanceOptConfig(level_spacing=(8.0,), iterations=(15,), lambda_mode="uniform", lambda_init=1.0, progress=False)
    r = register_pair(tensor(f.image), tensor(m.image), cfg, spacing=f.spacing)
    assert r.lam.shape == (1, 1, 1, 1, 1) and float(r.lam) == 1.0
    assert r.final_terms["hyperprior"] == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype_follow_request(device):
    torch.manual_seed(0)
    f = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    m = torch.roll(f, 1, dims=2)
    cfg = InstanceOptConfig(level_spacing=(2.0, 1.0), iterations=(3, 3), progress=False)
    r = register_pair(f, m, cfg, device=device)
    assert r.displacement.device.type == device and r.displacement.dtype == torch.float64


def test_2d_registration_recovers_a_shift():
    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    f = torch.exp(-((y - 24) ** 2 + (x - 24) ** 2) / 60.0)[None, None]
    m = torch.exp(-((y - 26) ** 2 + (x - 23) ** 2) / 60.0)[None, None]
    cfg = InstanceOptConfig(level_spacing=(2.0, 1.0), iterations=(80, 40), objective=ObjectiveConfig(similarity="mse", w_reg=0.01), progress=False)
    r = register_pair(f, m, cfg)
    u = r.displacement[0, :, 20:28, 20:28].mean(dim=(1, 2))
    assert torch.allclose(u, torch.tensor([2.0, -1.0]), atol=0.3)


def test_callback_sees_the_optimised_velocity():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    f = torch.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 40.0)[None, None]
    m = torch.exp(-((y - 17) ** 2 + (x - 15) ** 2) / 40.0)[None, None]
    cfg = InstanceOptConfig(level_spacing=(2.0, 1.0), iterations=(25, 20), tol=0.0, window=10,
                            objective=ObjectiveConfig(similarity="mse", w_reg=0.01), progress=False)
    calls = []
    r = register_pair(f, m, cfg, callback=lambda lev, it, v, lam: calls.append((lev, it, v.clone(), lam.clone())))
    # every window, plus a level's last iteration when it is not a multiple of the window
    assert [(lev, it) for lev, it, _, _ in calls] == [(0, 10), (0, 20), (0, 25), (1, 10), (1, 20)]
    assert calls[0][2].shape == (1, 2, 16, 16) and calls[-1][2].shape == (1, 2, 32, 32)
    assert not calls[-1][2].requires_grad
    assert torch.equal(calls[-1][2], r.velocity) and torch.equal(calls[-1][3], r.lam)


def test_init_velocity_is_used():
    f = torch.rand(1, 1, 12, 12, 12)
    v0 = torch.full((1, 3, 6, 6, 6), 0.5)
    cfg = InstanceOptConfig(level_spacing=(1.0,), iterations=(0,), velocity_smoothing=0.0, progress=False)
    r = register_pair(f, f, cfg, init_velocity=v0)
    assert torch.allclose(r.displacement, torch.full_like(r.displacement, 1.0), atol=1e-5)  # 0.5 coarse voxels = 1 fine voxel


def test_relative_change_stopping():
    stop = RelativeChangeStopping(tol=1e-3, window=5, min_iterations=10)
    assert not stop([1.0] * 9)
    assert stop([1.0] * 10)
    assert not stop([10.0 - i for i in range(10)])


@pytest.mark.parametrize(
    "data_,name",
    [({"level_spacing": [4, 2], "iterations": [10]}, "iterations"), ({"lr": -1}, "lr"), ({"lambda_mode": "patchwise"}, "lambda_mode"),
     ({"objective": {"w_reg": "a lot"}}, "w_reg"), ({"objective": {"typo": 1}}, "typo"), ({"level_spacing": [0]}, "level_spacing"),
     ({"lambda_init": 1.5}, "lambda_init"), ({"velocity_smoothing": -1.0}, "velocity_smoothing"),
     ({"lr_final_fraction": 0.0}, "lr_final_fraction")],
)
def test_config_errors_name_the_key(data_, name):
    with pytest.raises(ValueError, match=name):
        from_dict(InstanceOptConfig, data_)


def test_bad_images_are_rejected():
    good = torch.rand(1, 1, 8, 8, 8)
    bad = good.clone()
    bad[0, 0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="moving.*NaN"):
        register_pair(good, bad)
    with pytest.raises(ValueError, match="same shape"):
        register_pair(good, torch.rand(1, 1, 8, 8, 9))
    with pytest.raises(ValueError, match="fixed"):
        register_pair(torch.rand(8, 8, 8), good)
