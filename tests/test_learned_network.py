"""The λ-head network and its loss (groundwork of the learned solver)."""

import pytest
import torch

from hybridreg.objective import ObjectiveConfig
from instance_opt import InstanceOptConfig, register_pair
from learned import NetworkConfig, RegistrationNetwork, network_energy


@pytest.mark.parametrize("ndim,shape", [(3, (16, 20, 24)), (2, (32, 36))])
@pytest.mark.parametrize("prior", ["beta", "normal"])
def test_network_shapes_and_lambda_range(ndim, shape, prior):
    torch.manual_seed(0)
    net = RegistrationNetwork(NetworkConfig(ndim=ndim, encoder=(4, 8, 8), decoder=(8, 8, 4), lambda_channels=6, lambda_prior=prior))
    f, m = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    with torch.no_grad():
        out = net(f, m)
    grid = tuple(n // 2 for n in shape)
    assert out.velocity.shape == (2, ndim, *grid) and out.lam.shape == (2, 1, *grid)
    hi = 1.0 if prior == "beta" else 5.0
    assert float(out.lam.min()) >= 1e-6 and float(out.lam.max()) <= hi
    assert float(out.velocity.abs().max()) < 1e-2  # starts near the identity


def test_training_loss_equals_instance_optimizer_loss():
    """Same (velocity, λ) on the same pair → the same energy in both solvers."""
    torch.manual_seed(0)
    f = torch.rand(1, 1, 16, 18, 20)
    m = torch.roll(f, 2, dims=3)
    net = RegistrationNetwork(NetworkConfig(encoder=(4, 8), decoder=(8, 4), lambda_channels=6))
    with torch.no_grad():
        net.velocity_head.weight.normal_(std=0.05)  # a non-trivial velocity
        out = net(f, m)
    obj = ObjectiveConfig(w_reg=2.0, hyper_strength=0.3, lambda_smoothness="grid", w_smooth=0.5)
    train = network_energy(out, f, m, obj, (2.0, 2.0, 2.0)).terms
    cfg = InstanceOptConfig(objective=obj, level_spacing=(2.0,), iterations=(0,), control_factor=(2,),
                            velocity_smoothing=0.0, progress=False)
    res = register_pair(f, m, cfg, spacing=(2.0, 2.0, 2.0), init_velocity=out.velocity, init_lambda=out.lam)
    for name in ("total", "similarity", "regularization", "hyperprior", "lambda_smoothness"):
        assert res.final_terms[name] == pytest.approx(float(getattr(train, name)), rel=1e-4, abs=1e-7), name


def test_network_rejects_bad_input():
    net = RegistrationNetwork(NetworkConfig(encoder=(4, 8), decoder=(8, 4), lambda_channels=4))
    with pytest.raises(ValueError, match="moving"):
        net(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))
    with pytest.raises(ValueError, match="fixed"):
        net(torch.rand(1, 2, 8, 8, 8), torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="backbone"):
        NetworkConfig(backbone="resnet")


def _tiny_images(n=4, shape=(12, 14, 16)):
    from hybridreg.spatial import gaussian_smooth

    g = torch.Generator().manual_seed(123)
    return [gaussian_smooth(torch.rand(1, 1, *shape, generator=g), 1.5) for _ in range(n)]


def _tiny_cfg(**kw):
    from learned.train import TrainConfig

    net = NetworkConfig(encoder=(4, 8), decoder=(8, 4), lambda_channels=4)
    return TrainConfig(network=net, objective=ObjectiveConfig(lncc_window=3, svf_steps=3), steps=6, lr=1e-3,
                       checkpoint_every=3, seed=7, pairing="subject", **kw)


def test_interrupted_and_resumed_training_matches_uninterrupted(tmp_path):
    from learned.train import latest_checkpoint, train

    images = _tiny_images()
    full = train(_tiny_cfg(), images, tmp_path / "full")
    train(_tiny_cfg(), images, tmp_path / "cut", stop_after=3)
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint_3.pt"
    resumed = train(_tiny_cfg(), images, tmp_path / "cut", resume=True)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    rows = (tmp_path / "cut" / "log.csv").read_text().strip().splitlines()
    assert rows == (tmp_path / "full" / "log.csv").read_text().strip().splitlines()  # same losses, every step once


def test_training_reduces_the_energy(tmp_path):
    from learned.train import train

    images = _tiny_images(3)
    cfg = _tiny_cfg()
    from dataclasses import replace

    cfg = replace(cfg, steps=40, checkpoint_every=40, lr=3e-3, flip_prob=0.0)
    train(cfg, images, tmp_path / "r")
    totals = [float(r.split(",")[2]) for r in (tmp_path / "r" / "log.csv").read_text().strip().splitlines()[1:]]
    assert sum(totals[-10:]) / 10 < sum(totals[:10]) / 10


def test_train_bad_input(tmp_path):
    from learned.train import TrainConfig, train

    with pytest.raises(ValueError, match="resume"):
        train(_tiny_cfg(), _tiny_images(), tmp_path / "none", resume=True)
    with pytest.raises(ValueError, match="atlas"):
        train(TrainConfig(network=NetworkConfig(encoder=(4, 8), decoder=(8, 4))), _tiny_images(), tmp_path / "a")
    with pytest.raises(ValueError, match="pairing"):
        TrainConfig(pairing="random")
