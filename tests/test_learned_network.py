"""The λ-head network and its loss (groundwork of the learned solver)."""

import numpy as np
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


@pytest.mark.parametrize("ndim,shape", [(3, (16, 20, 24)), (2, (32, 36))])
def test_swin_backbone_shapes_and_gradients(ndim, shape):
    """TransMorph-style backbone (MONAI SwinTransformer encoder) behind the same heads."""
    torch.manual_seed(0)
    cfg = NetworkConfig(ndim=ndim, backbone="swin", decoder=(8, 8, 8, 8, 4), lambda_channels=4, swin_embed_dim=6,
                        swin_depths=(1, 1, 1, 1), swin_heads=(1, 2, 2, 2), swin_window=3)
    net = RegistrationNetwork(cfg)
    f, m = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    out = net(f, m)
    grid = tuple(n // 2 for n in shape)
    assert out.velocity.shape == (1, ndim, *grid) and out.lam.shape == (1, 1, *grid)
    loss = network_energy(out, f, m, ObjectiveConfig(lncc_window=3, svf_steps=3), (2.0,) * ndim).terms.total
    loss.backward()
    assert all(p.grad is not None for p in net.backbone.encoder.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="swin"):
        NetworkConfig(backbone="swin", decoder=(8, 8))


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


def test_uniform_lambda_network_has_no_lambda_head_and_trains(tmp_path):
    """``lambda_mode="uniform"``: λ ≡ ``lambda_uniform`` on the network grid, no λ-head
    parameters, the same energy as the instance solver's uniform mode, and a training run
    whose weights reload in the same mode."""
    from dataclasses import replace

    from learned.train import train
    from learned.weights import load_weights

    cfg = NetworkConfig(encoder=(4, 8), decoder=(8, 4), lambda_channels=4, lambda_mode="uniform", lambda_uniform=0.3)
    torch.manual_seed(0)
    net = RegistrationNetwork(cfg)
    assert net.lambda_head is None and not any("lambda" in k for k in net.state_dict())
    f = torch.rand(1, 1, 16, 18, 20)
    m = torch.roll(f, 2, dims=3)
    with torch.no_grad():
        net.velocity_head.weight.normal_(std=0.05)
        out = net(f, m)
    assert out.lam.shape == (1, 1, 8, 9, 10) and torch.all(out.lam == 0.3)
    obj = ObjectiveConfig(w_reg=2.0, hyperprior="none")
    icfg = InstanceOptConfig(objective=obj, level_spacing=(2.0,), iterations=(0,), control_factor=(2,),
                             velocity_smoothing=0.0, progress=False, lambda_mode="uniform", lambda_init=0.3)
    res = register_pair(f, m, icfg, spacing=(2.0,) * 3, init_velocity=out.velocity)
    assert res.final_terms["total"] == pytest.approx(float(network_energy(out, f, m, obj, (2.0,) * 3).terms.total), rel=1e-4)

    tcfg = replace(_tiny_cfg(), network=cfg, objective=ObjectiveConfig(lncc_window=3, svf_steps=3, hyperprior="none"),
                   lambda_warmup_steps=0, steps=4, checkpoint_every=2)
    train(tcfg, _tiny_data(), tmp_path / "u", progress=False)
    loaded, *_ = load_weights(tmp_path / "u" / "model_final.pt")
    assert loaded.config == cfg and loaded.lambda_head is None
    # refinement of a uniform network keeps its fixed λ (the energy it was trained on)
    from learned.solver import LearnedConfig
    from learned.solver import register_pair as learned_register_pair

    v = _tiny_data().val[0]
    fm = torch.from_numpy(v.image)[None, None].float()
    res = learned_register_pair(fm, torch.roll(fm, 1, dims=2), LearnedConfig(weights=str(tmp_path / "u" / "model_final.pt"),
                                                                          refine=True, progress=False), spacing=(2.0,) * 3)
    assert res.lam.numel() == 1 and float(res.lam) == pytest.approx(0.3)
    assert res.displacement.shape == (1, 3, *v.image.shape)
    with pytest.raises(ValueError, match="lambda_warmup_steps"):
        replace(tcfg, lambda_warmup_steps=2)
    with pytest.raises(ValueError, match="lambda_uniform"):
        NetworkConfig(lambda_mode="uniform", lambda_uniform=1.5)  # beyond the beta prior's range
    with pytest.raises(ValueError, match="lambda_mode"):
        NetworkConfig(lambda_mode="scalar")


def _tiny_data(n=4, shape=(12, 14, 16)):
    from hybridreg.data.sources import RegistrationDataset, Volume
    from hybridreg.spatial import gaussian_smooth

    g = torch.Generator().manual_seed(123)
    vols = []
    for k in range(n + 2):
        img = gaussian_smooth(torch.rand(1, 1, *shape, generator=g), 1.5)[0, 0].numpy()
        vols.append(Volume(f"s{k}", img, (img > np.median(img)).astype(np.int32) + (img > np.percentile(img, 80))))
    return RegistrationDataset("tiny", (2.0, 2.0, 2.0), vols[:n], vols[n:], [], None)


def _tiny_cfg(**kw):
    from learned.train import TrainConfig

    net = NetworkConfig(encoder=(4, 8), decoder=(8, 4), lambda_channels=4)
    base = dict(network=net, objective=ObjectiveConfig(lncc_window=3, svf_steps=3), steps=6, lr=1e-3,
                checkpoint_every=3, epoch_steps=2, seed=7, pairing="subject", deform_prob=0.5, gamma_std=0.1,
                lambda_warmup_steps=2, lambda_lr_factor=0.5)
    return TrainConfig(**{**base, **kw})


def test_interrupted_and_resumed_training_matches_uninterrupted(tmp_path):
    from learned.train import latest_checkpoint, train

    data = _tiny_data()
    full = train(_tiny_cfg(), data, tmp_path / "full", progress=False)
    train(_tiny_cfg(), data, tmp_path / "cut", stop_after=4, progress=False)  # killed after step 4, checkpoint at 3
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint_3.pt"
    resumed = train(_tiny_cfg(), data, tmp_path / "cut", resume=True, progress=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    for name in ("log.csv", "validation.csv"):
        cut = [r.split(",")[:4] for r in (tmp_path / "cut" / name).read_text().strip().splitlines()]
        ref = [r.split(",")[:4] for r in (tmp_path / "full" / name).read_text().strip().splitlines()]
        assert cut == ref, name  # same losses and validation Dice, every step once
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint_*.pt")) == ["checkpoint_3.pt", "checkpoint_6.pt"]
    for f in ("model_best.pt", "model_final.pt", "training.png", "history.json", "config.yaml"):
        assert (tmp_path / "cut" / f).is_file(), f
    # a resume with fewer steps than trained trained nothing, said it had, and rewrote config.yaml
    before = {f: (tmp_path / "cut" / f).read_bytes() for f in ("config.yaml", "model_final.pt", "history.json")}
    with pytest.raises(ValueError, match=r"checkpoint_6.pt has trained 6 steps, more than `steps` 4"):
        train(_tiny_cfg(steps=4), data, tmp_path / "cut", resume=True, progress=False)
    assert {f: (tmp_path / "cut" / f).read_bytes() for f in before} == before


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(tmp_path):
    """Interrupted before its first checkpoint, a run's folder held config.yaml and the logs only:
    ``--resume`` said "no checkpoint" and a plain rerun "already holds a run". It now starts over,
    to the weights of an uninterrupted run, with its own settings only."""
    from dataclasses import replace

    from learned.train import latest_checkpoint, train

    data = _tiny_data()
    full = train(_tiny_cfg(), data, tmp_path / "full", progress=False)
    train(_tiny_cfg(), data, tmp_path / "cut", stop_after=2, progress=False)  # stopped at step 2, first checkpoint at 3
    assert latest_checkpoint(tmp_path / "cut") is None and (tmp_path / "cut" / "config.yaml").is_file()
    with pytest.raises(ValueError, match=r"started with other settings \(lr 0.001 -> 0.002\)"):
        train(replace(_tiny_cfg(), lr=2e-3), data, tmp_path / "cut", resume=True, progress=False)
    resumed = train(_tiny_cfg(), data, tmp_path / "cut", resume=True, progress=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    rows = (tmp_path / "cut" / "log.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 7))  # every step once
    with pytest.raises(ValueError, match="holds no run"):
        train(_tiny_cfg(), data, tmp_path / "never", resume=True, progress=False)
    # fine-tuning: a resume before the first checkpoint starts from the run's --init weights again, not at random
    from learned.weights import save_weights

    save_weights(tmp_path / "init.pt", full, _tiny_cfg().objective, (2.0, 2.0, 2.0))
    tuned = train(_tiny_cfg(), data, tmp_path / "ft", init_weights=tmp_path / "init.pt", progress=False)
    train(_tiny_cfg(), data, tmp_path / "ft_cut", init_weights=tmp_path / "init.pt", stop_after=2, progress=False)
    again = train(_tiny_cfg(), data, tmp_path / "ft_cut", resume=True, progress=False)  # --init not repeated
    for (k, a), (_, b) in zip(tuned.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    train(_tiny_cfg(), data, tmp_path / "plain_cut", stop_after=2, progress=False)
    with pytest.raises(ValueError, match="was started without `init_weights`"):
        train(_tiny_cfg(), data, tmp_path / "plain_cut", init_weights=tmp_path / "init.pt", resume=True, progress=False)


def test_training_reduces_the_energy_and_logs_validation_dice(tmp_path):
    import csv
    from dataclasses import replace

    from learned.train import train
    from learned.weights import load_weights

    data = _tiny_data(3)
    cfg = replace(_tiny_cfg(), steps=40, checkpoint_every=40, epoch_steps=10, lr=3e-3, flip_prob=0.0, deform_prob=0.0,
                  gamma_std=0.0)
    train(cfg, data, tmp_path / "r", progress=False)
    totals = [float(r.split(",")[2]) for r in (tmp_path / "r" / "log.csv").read_text().strip().splitlines()[1:]]
    assert len(totals) == 40 and sum(totals[-10:]) / 10 < sum(totals[:10]) / 10
    with open(tmp_path / "r" / "validation.csv") as fh:
        val = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in val] == [10, 20, 30, 40]
    assert all(0 < float(r["val_dice"]) <= 1 for r in val)
    net, obj, spacing, info = load_weights(tmp_path / "r" / "model_best.pt")
    assert spacing == (2.0, 2.0, 2.0) and obj == cfg.objective and info["val_dice"] == max(float(r["val_dice"]) for r in val)


def test_training_log_is_read_every_k_steps_one_row_per_step(tmp_path, monkeypatch):
    """``log_every``: terms are read from the device and appended in blocks (also before
    validation and checkpoints), yet ``log.csv`` holds one row per step; torch's global RNG
    is left as it was."""
    import learned.train as train_mod

    writes = []
    append = train_mod._append_rows
    monkeypatch.setattr(train_mod, "_append_rows", lambda path, rows: (writes.append((path.name, len(rows))), append(path, rows)))
    rng = torch.get_rng_state()
    train_mod.train(_tiny_cfg(steps=7, log_every=3, epoch_steps=5, checkpoint_every=7), _tiny_data(), tmp_path / "r", progress=False)
    assert [n for name, n in writes if name == "log.csv"] == [3, 2, 1, 1]  # steps 1-3, 4-5 (validation), 6, 7 (the end)
    rows = (tmp_path / "r" / "log.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 8))
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match="log_every"):
        _tiny_cfg(log_every=0)


def test_random_deformation_is_smooth_and_diffeomorphic():
    from hybridreg.synthesis import random_deformation
    from hybridreg.spatial import jacobian_determinant, scaling_and_squaring

    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, 20)
    img = (x[:, None, None] + 0 * x[None, :, None] + 0 * x[None, None, :])[None, None].expand(1, 1, 20, 20, 20).contiguous()
    out = random_deformation(img, 4.0, 5, (2.0, 2.0, 2.0), g)
    assert out.shape == img.shape and not torch.equal(out, img)
    # the same draw as a displacement: positive Jacobian everywhere, amplitude of the order of std
    g = torch.Generator().manual_seed(0)
    v = torch.randn((1, 3, 5, 5, 5), generator=g) * 2.0
    from hybridreg.spatial import resize_image

    u = scaling_and_squaring(resize_image(v, (20, 20, 20)), 6)
    assert float(jacobian_determinant(u).min()) > 0
    assert 0.5 < float(u.std()) < 4.0


def test_train_bad_input(tmp_path):
    from learned.train import TrainConfig, train

    with pytest.raises(ValueError, match="resume"):
        train(_tiny_cfg(), _tiny_data(), tmp_path / "none", resume=True)
    with pytest.raises(ValueError, match="atlas"):
        train(_tiny_cfg(pairing="atlas"), _tiny_data(), tmp_path / "a")
    with pytest.raises(ValueError, match="ndim"):
        train(_tiny_cfg(network=NetworkConfig(ndim=2, encoder=(4, 8), decoder=(8, 4))), _tiny_data(), tmp_path / "b")
    with pytest.raises(ValueError, match="pairing"):
        TrainConfig(pairing="random")
    with pytest.raises(ValueError, match="deform_prob"):
        TrainConfig(deform_prob=1.5)
    train(_tiny_cfg(steps=1), _tiny_data(), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="already holds a training run.s files"):
        train(_tiny_cfg(steps=1), _tiny_data(), tmp_path / "c", progress=False)


def test_full_resolution_stage_starts_from_the_half_grid_output_and_fine_tunes(tmp_path):
    """``full_resolution_channels``: outputs on the input grid; with half-grid weights loaded
    the velocity starts as their velocity resampled to the input grid (voxel units rescaled)
    and λ as their λ up-sampled; gradients reach the stage; ``train(init_weights=...)``
    fine-tunes from weights without the stage and rejects other architecture changes."""
    from dataclasses import replace

    import torch.nn.functional as F

    from hybridreg.spatial import resize_field
    from learned.train import train
    from learned.weights import load_weights, save_weights

    torch.manual_seed(0)
    half = RegistrationNetwork(NetworkConfig(encoder=(4, 8), decoder=(8, 4), lambda_channels=4))
    with torch.no_grad():
        half.velocity_head.weight.normal_(std=0.05)
        half.velocity_head.bias.fill_(0.2)
    full = RegistrationNetwork(replace(half.config, full_resolution_channels=3))
    missing, unexpected = full.load_state_dict(half.state_dict(), strict=False)
    assert missing and all(k.startswith("full_resolution.") for k in missing) and not unexpected
    f, m = torch.rand(1, 1, 16, 18, 20), torch.rand(1, 1, 16, 18, 20)
    with torch.no_grad():
        a, b = half(f, m), full(f, m)
    assert a.velocity.shape == (1, 3, 8, 9, 10) and b.velocity.shape == (1, 3, 16, 18, 20) and b.lam.shape == (1, 1, 16, 18, 20)
    expect = resize_field(a.velocity, (16, 18, 20))
    assert float(expect.abs().min()) > 0.1  # a non-trivial coarse velocity ...
    torch.testing.assert_close(b.velocity, expect, atol=1e-3, rtol=0)  # ... that the stage starts from
    torch.testing.assert_close(b.lam, F.interpolate(a.lam, size=(16, 18, 20), mode="trilinear", align_corners=False))
    network_energy(full(f, m), f, m, ObjectiveConfig(lncc_window=3, svf_steps=3), (2.0,) * 3).terms.total.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in full.full_resolution.parameters())
    with pytest.raises(ValueError, match="full_resolution_channels"):
        NetworkConfig(resolution_factor=1, full_resolution_channels=8)

    cfg = _tiny_cfg(steps=1, lambda_warmup_steps=0)
    save_weights(tmp_path / "half.pt", half, cfg.objective, (2.0,) * 3)
    grown = replace(cfg, network=replace(cfg.network, full_resolution_channels=3))
    net = train(grown, _tiny_data(), tmp_path / "ft", progress=False, init_weights=tmp_path / "half.pt")
    assert net.full_resolution is not None
    start = half.state_dict()
    assert max(float((net.state_dict()[k] - start[k]).abs().max()) for k in start) <= 2 * cfg.lr  # one AdamW step
    assert load_weights(tmp_path / "ft" / "model_final.pt")[0].config == grown.network
    with pytest.raises(ValueError, match="init_weights"):
        train(replace(cfg, network=replace(cfg.network, encoder=(4, 6))), _tiny_data(), tmp_path / "bad", init_weights=tmp_path / "half.pt")


def test_weight_files_keep_the_lncc_eps_they_were_trained_with(tmp_path):
    """A weight file records the energy's ``lncc_eps``; one written before the setting existed
    (no key, e.g. the shipped networks) loads with the 1e-5 it was trained with, not the new default."""
    from learned.solver import DEFAULT_WEIGHTS
    from learned.weights import LEGACY_LNCC_EPS, load_weights, save_weights

    net = RegistrationNetwork(NetworkConfig(encoder=(4, 8), decoder=(8, 4), lambda_channels=4))
    save_weights(tmp_path / "new.pt", net, ObjectiveConfig(lncc_eps=3e-6), (2.0, 2.0, 2.0))
    assert load_weights(tmp_path / "new.pt")[1].lncc_eps == 3e-6
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    del payload["objective"]["lncc_eps"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_weights(tmp_path / "old.pt")[1].lncc_eps == LEGACY_LNCC_EPS == 1e-5 != ObjectiveConfig().lncc_eps
    assert load_weights(DEFAULT_WEIGHTS)[1].lncc_eps == 1e-5


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path, capsys):
    """A checkpoint cut short (a full disk, a copy) made `--resume` fail with `[Errno 22]` or
    `EOFError` although the one before was intact; a fresh run replaced an earlier run's weights
    when its folder held no log.csv; `init_weights` in the run folder was overwritten."""
    import shutil

    from learned.train import train

    data = _tiny_data()
    full = train(_tiny_cfg(), data, tmp_path / "full", progress=False)
    train(_tiny_cfg(), data, tmp_path / "cut", stop_after=6, progress=False)  # checkpoints at 3 and 6
    shutil.copy(tmp_path / "cut" / "checkpoint_3.pt", tmp_path / "keep3.pt")
    (tmp_path / "cut" / "checkpoint_3.pt").write_bytes(b"")  # then: only a damaged one left ...
    ck6 = (tmp_path / "cut" / "checkpoint_6.pt").read_bytes()
    (tmp_path / "cut" / "checkpoint_6.pt").write_bytes(ck6[: len(ck6) // 2])
    with pytest.raises(ValueError, match=r"no checkpoint in .*cut can be read \(checkpoint_6.pt .*checkpoint_3.pt"):
        train(_tiny_cfg(), data, tmp_path / "cut", resume=True, progress=False)
    shutil.copy(tmp_path / "keep3.pt", tmp_path / "cut" / "checkpoint_3.pt")  # ... and with the one before intact
    capsys.readouterr()
    resumed = train(_tiny_cfg(), data, tmp_path / "cut", resume=True, progress=False)
    err = capsys.readouterr().err
    assert "cannot read checkpoint_6.pt" in err and "resuming from checkpoint_3.pt" in err, err
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.load(tmp_path / "cut" / "checkpoint_6.pt", weights_only=False)["step"] == 6  # rewritten whole

    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model_best.pt").write_bytes(b"the user's weights")
    with pytest.raises(ValueError, match=r"already holds a training run's files \(model_best.pt\)"):
        train(_tiny_cfg(), data, lone, progress=False)
    assert (lone / "model_best.pt").read_bytes() == b"the user's weights"
    with pytest.raises(ValueError, match=r"`init_weights` .*is a file this run writes"):
        train(_tiny_cfg(), data, tmp_path / "full", resume=True, init_weights=tmp_path / "full" / "model_best.pt",
              progress=False)
