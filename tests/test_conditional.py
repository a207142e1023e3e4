"""The conditional network (method §3.2-3.3, issue 18): FiLM on the energy's hyperparameters,
CSAIN on a region-wise λ map, its training loss, the solvers ``learned-conditional[+refine]``,
``--set`` / ``--region-lambda`` on the CLI, and test-time tuning (TuRBO)."""

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from hybridreg.config import from_dict, to_dict
from hybridreg.objective import ObjectiveConfig, evaluate
from hybridreg.spatial import resize_image
from learned import NetworkConfig, RegistrationNetwork
from learned.network import Modulation

SMALL = dict(encoder=(4, 8), decoder=(8, 4), lambda_channels=4)


def _perturbed(net: RegistrationNetwork, seed: int = 0) -> RegistrationNetwork:
    """``net`` with its modulation's last layers (zero at initialisation) drawn at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modulation:
            for sub in (mod.film, mod.csain):
                if sub is not None:
                    sub[-1].weight.copy_(torch.randn(sub[-1].weight.shape, generator=g) * 0.3)
                    sub[-1].bias.copy_(torch.randn(sub[-1].bias.shape, generator=g) * 0.3)
    return net


def test_the_code_changes_the_output_and_a_fresh_modulation_is_the_identity():
    torch.manual_seed(0)
    plain = RegistrationNetwork(NetworkConfig(**SMALL, full_resolution_channels=3))
    with torch.no_grad():
        plain.velocity_head.weight.normal_(std=0.05)
        plain.full_resolution.velocity_head.weight.normal_(std=0.05)
    cond = RegistrationNetwork(replace(plain.config, conditional=True, region_condition=True))
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("modulation.") for k in missing) and not unexpected
    f, m = torch.rand(2, 1, 12, 14, 16), torch.rand(2, 1, 12, 14, 16)
    code = torch.tensor([[2.0, 0.1], [8.0, 0.5]])
    with torch.no_grad():
        a, b = plain(f, m), cond(f, m, code)
        torch.testing.assert_close(b.velocity, a.velocity)  # zero-initialised FiLM and CSAIN: the unconditional network
        torch.testing.assert_close(b.lam, a.lam)
        _perturbed(cond)
        c, d, e = cond(f, m, code), cond(f, m, code.flip(0)), cond(f.flip(0), m.flip(0), code.flip(0))
    assert float((c.velocity - a.velocity).abs().max()) > 1e-3
    assert float((c.velocity[0] - d.velocity[0]).abs().max()) > 1e-3  # a different code, a different output
    torch.testing.assert_close(c.velocity[0], e.velocity[1])  # each pair follows its own code
    torch.testing.assert_close(cond.normalized_code(torch.tensor([[1.0, 0.02], [16.0, 1.0], [4.0, math.sqrt(0.02)]])),
                               torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="code"):
        cond(f, m)
    with pytest.raises(ValueError, match="code"):
        plain(f, m, code)
    with pytest.raises(ValueError, match="region"):
        plain(f, m, None, torch.ones(2, 1, 12, 14, 16))


def test_csain_with_a_constant_map_is_conditional_instance_norm_on_the_scalar():
    torch.manual_seed(1)
    mod = Modulation(3, 5, 0, True, 8)
    with torch.no_grad():
        mod.csain[-1].weight.normal_()
        mod.csain[-1].bias.normal_()
    h = torch.randn(2, 5, 6, 7, 8)
    c = 0.37
    out = mod(h, None, torch.full((2, 1, 3, 4, 4), c))  # any grid: resampled to h's
    gamma, beta = mod.csain(torch.full((1, 1, 1, 1, 1), c)).reshape(2, 5)
    norm = (h - h.mean((2, 3, 4), keepdim=True)) / torch.sqrt(h.var((2, 3, 4), unbiased=False, keepdim=True) + 1e-5)
    expect = h + gamma.view(1, 5, 1, 1, 1) * norm + beta.view(1, 5, 1, 1, 1)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    varying = torch.rand(2, 1, 6, 7, 8)
    with torch.no_grad():
        assert float((mod(h, None, varying) - expect).abs().max()) > 1e-3  # a varying map modulates voxel by voxel

    net = _perturbed(RegistrationNetwork(NetworkConfig(**SMALL, region_condition=True)), 2)
    f, m = torch.rand(1, 1, 12, 14, 16), torch.rand(1, 1, 12, 14, 16)
    with torch.no_grad():
        out = net(f, m, None, torch.full((1, 1, 12, 14, 16), c))
    assert torch.allclose(out.lam, torch.tensor(c))  # the energy's λ is the map ("map" mode)
    prod = RegistrationNetwork(replace(net.config, region_lambda="product"))
    prod.load_state_dict(net.state_dict())
    with torch.no_grad():
        p = prod(f, m, None, torch.full((1, 1, 12, 14, 16), c))
    torch.testing.assert_close(p.velocity, out.velocity)
    assert float(p.lam.max()) <= c and float((p.lam / c).std()) > 0  # Λ times the (modulated) λ head


def _tiny_data():
    from tests.test_learned_network import _tiny_data as data

    return data()


def _tiny_cfg(**kw):
    from learned.train import TrainConfig

    net = NetworkConfig(**SMALL, conditional=True, region_condition=True, w_reg_range=(1.0, 16.0),
                        hyper_strength_range=(0.05, 0.5))
    base = dict(network=net, objective=ObjectiveConfig(lncc_window=3, svf_steps=3), steps=8, lr=1e-3, checkpoint_every=8,
                epoch_steps=8, seed=5, pairing="subject", flip_prob=0.0, region_prob=0.5)
    return TrainConfig(**{**base, **kw})


def test_the_conditional_loss_is_the_core_energy_at_the_sampled_values(tmp_path, monkeypatch):
    """Each step's loss is :func:`hybridreg.objective.evaluate` with ``w_reg`` and
    ``hyper_strength`` at the values drawn for that step (logged in ``log.csv``), the network
    sees the same values as its code, and region steps use the painted map as λ."""
    import learned.train as train_mod

    seen = []
    energy = train_mod.network_energy

    def spy(out, fixed, moving, objective, spacing):
        seen.append((out, fixed, moving, objective))
        return energy(out, fixed, moving, objective, spacing)

    codes = []
    monkeypatch.setattr(train_mod, "network_energy", spy)
    forward = RegistrationNetwork.forward
    monkeypatch.setattr(RegistrationNetwork, "forward",
                        lambda self, f, m, code=None, region=None: (codes.append((code, region)), forward(self, f, m, code, region))[1])
    cfg = _tiny_cfg()
    train_mod.train(cfg, _tiny_data(), tmp_path / "r", progress=False)
    with open(tmp_path / "r" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and len(seen) == 8
    step_codes = [c for c in codes if c[0] is not None and c[0].shape[0] == 1][:8]  # training forwards (not validation)
    for row, (out, f, m, obj), (code, region) in zip(rows, seen, step_codes):
        w, a = float(row["w_reg"]), float(row["hyper_strength"])
        assert 1.0 <= w <= 16.0 and 0.05 <= a <= 0.5
        assert obj == replace(cfg.objective, w_reg=w, hyper_strength=a)
        assert code.tolist() == [[pytest.approx(w), pytest.approx(a)]]
        ref = evaluate(f, m, out.velocity.detach(), out.lam.detach(), ObjectiveConfig(lncc_window=3, svf_steps=3, w_reg=w,
                                                                                     hyper_strength=a), (2.0,) * 3)
        assert float(row["total"]) == pytest.approx(float(ref.terms.total), rel=1e-5)
        assert int(row["regions"]) == (region is not None)
        if region is not None:  # the energy's λ is the painted map, its values drawn in [low, 1]
            torch.testing.assert_close(out.lam, resize_image(region, out.lam.shape[2:]))
            assert 0.05 - 1e-6 <= float(region.min()) and float(region.max()) <= 1.0 + 1e-6
    assert len({r["w_reg"] for r in rows}) == 8 and 0 < sum(int(r["regions"]) for r in rows) < 8


def test_tiny_conditional_training_end_to_end_and_from_unconditional_weights(tmp_path):
    from learned.train import train
    from learned.weights import load_weights, predict, save_weights

    data = _tiny_data()
    plain_cfg = _tiny_cfg(network=NetworkConfig(**SMALL), region_prob=0.0, steps=2, checkpoint_every=2, epoch_steps=2)
    plain = train(plain_cfg, data, tmp_path / "plain", progress=False)
    save_weights(tmp_path / "plain.pt", plain, plain_cfg.objective, data.spacing)
    cfg = _tiny_cfg(steps=6, checkpoint_every=3, epoch_steps=3, lr=3e-3, region_prob=1.0)
    net = train(cfg, data, tmp_path / "cond", progress=False, init_weights=tmp_path / "plain.pt")
    film = [p for mod in net.modulation for p in mod.film.parameters()]
    csain = [p for mod in net.modulation for p in mod.csain.parameters()]
    assert any(float(p.detach().abs().max()) > 0 for p in film) and any(float(p.detach().abs().max()) > 0 for p in csain)  # both trained
    loaded, obj, spacing, _ = load_weights(tmp_path / "cond" / "model_final.pt")
    assert loaded.config == cfg.network
    f = torch.from_numpy(data.val[0].image)[None, None]
    m = torch.from_numpy(data.val[1].image)[None, None]
    lo, hi = (predict(loaded, f, m, replace(obj, w_reg=w), spacing)[0] for w in (1.0, 16.0))
    assert float((lo.velocity - hi.velocity).abs().max()) > 0
    with pytest.raises(ValueError, match="region_prob"):
        _tiny_cfg(network=NetworkConfig(**SMALL, conditional=True))
    with pytest.raises(ValueError, match="w_reg_range"):
        NetworkConfig(w_reg_range=(4.0, 2.0))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A 3D conditional weight file with random modulation (no training)."""
    from learned.weights import save_weights

    torch.manual_seed(3)
    net = _perturbed(RegistrationNetwork(NetworkConfig(**SMALL, conditional=True, region_condition=True)), 4)
    path = tmp_path_factory.mktemp("w") / "cond.pt"
    save_weights(path, net, ObjectiveConfig(lncc_window=3, svf_steps=3), (2.0, 2.0, 2.0))
    return path


def test_conditional_solver_api(tiny_weights):
    from learned.solver import LEARNED_CONDITIONAL, LEARNED_CONDITIONAL_REFINE, ConditionalConfig, Hyperparameters

    g = torch.Generator().manual_seed(0)
    f, m = torch.rand(1, 1, 12, 14, 16, generator=g), torch.rand(1, 1, 12, 14, 16, generator=g)
    labels = torch.zeros(1, 1, 12, 14, 16, dtype=torch.long)
    labels[..., 8:] = 1  # two halves: λ 0.2 and 0.9, smoothed across the border
    labels[..., :2, :, :] = 2
    base = ConditionalConfig(weights=str(tiny_weights), progress=False)
    a = LEARNED_CONDITIONAL.register_pair(f, m, base, spacing=(2.0,) * 3)
    b = LEARNED_CONDITIONAL.register_pair(f, m, replace(base, objective=Hyperparameters(w_reg=12.0)), spacing=(2.0,) * 3)
    assert float((a.velocity - b.velocity).abs().max()) > 0
    region = replace(base, region_lambda={1: 0.2, 2: 0.9}, region_default=0.5)  # label 0 gets the default
    r = LEARNED_CONDITIONAL.register_pair(f, m, region, spacing=(2.0,) * 3, regions=labels)
    assert float(r.lam.min()) >= 0.2 - 1e-5 and float(r.lam.max()) <= 0.9 + 1e-5
    assert float(r.lam.min()) < 0.3 and float(r.lam.max()) > 0.8
    ref = LEARNED_CONDITIONAL_REFINE.register_pair(f, m, replace(region, refine_config=replace(region.refine_config, iterations=(3,))),
                                                   spacing=(2.0,) * 3, regions=labels)
    assert ref.config.refine and ref.history[0].status == "network" and len(ref.history) == 2
    with pytest.raises(ValueError, match="objective.w_reg"):
        LEARNED_CONDITIONAL.configure(replace(base, objective=Hyperparameters(w_reg=40.0)))
    with pytest.raises(ValueError, match="fixed-labels"):
        LEARNED_CONDITIONAL.register_pair(f, m, region, spacing=(2.0,) * 3)
    with pytest.raises(ValueError, match="region_lambda"):
        ConditionalConfig(region_lambda={"brain": 0.5})
    with pytest.raises(ValueError, match="region_lambda.3"):
        ConditionalConfig(region_lambda={3: -1.0})
    with pytest.raises(ValueError, match="learned-conditional"):
        from learned.solver import LEARNED, LearnedConfig

        LEARNED.register_pair(f, m, LearnedConfig(weights=str(tiny_weights)), spacing=(2.0,) * 3)


def test_cli_register_records_the_values_and_rejects_bad_ones(tiny_weights, tmp_path, capsys):
    import yaml

    from hybridreg.cli import main
    from hybridreg.io import Geometry, write_image

    geo = Geometry(size=(16, 14, 12), spacing=(2.0,) * 3, origin=(0.0,) * 3, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    g = np.random.default_rng(0)
    for name in ("f", "m"):
        img = g.random((12, 14, 16)).astype(np.float32)
        write_image(tmp_path / f"{name}.nii.gz", img, geo)
        write_image(tmp_path / f"{name}_seg.nii.gz", (img > 0.5).astype(np.int32) + (img > 0.8), geo, dtype=np.int32)
    (tmp_path / "rl.yaml").write_text("1: 0.3\n2: 0.8\n")
    common = [str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "--solver", "learned-conditional", "--weights",
              str(tiny_weights), "--no-progress", "--outputs", "metrics", "--affine", "none"]
    labels = ["--fixed-labels", str(tmp_path / "f_seg.nii.gz"), "--moving-labels", str(tmp_path / "m_seg.nii.gz")]
    assert main(["register", *common, *labels, "--out", str(tmp_path / "o"), "--set", "objective.w_reg=2.5",
                 "--region-lambda", str(tmp_path / "rl.yaml")]) == 0
    written = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert written["objective"] == {"w_reg": 2.5, "hyper_strength": 0.175} and written["region_lambda"] == {1: 0.3, 2: 0.8}
    assert not any("region-lambda" in w for w in json.loads((tmp_path / "o" / "metrics.json").read_text())["warnings"])
    # a label FIXED does not hold (a typo: 999) was used silently
    (tmp_path / "typo.yaml").write_text("1: 0.3\n999: 0.5\n")
    capsys.readouterr()
    assert main(["register", *common, *labels, "--out", str(tmp_path / "t"), "--region-lambda", str(tmp_path / "typo.yaml")]) == 0
    want = "`--region-lambda` names labels that FIXED's label map does not hold, whose λ was not used: 999"
    assert want in json.loads((tmp_path / "t" / "metrics.json").read_text())["warnings"] and want in capsys.readouterr().err
    for args, match in ((["--set", "objective.w_reg=40"], "objective.w_reg"),
                        (["--set", "objective.lncc_window=3"], "lncc_window"),
                        (["--region-lambda", str(tmp_path / "rl.yaml")], "fixed-labels"),
                        (["--region-lambda", str(tmp_path / "missing.yaml")], "region-lambda")):
        capsys.readouterr()
        assert main(["register", *common, "--out", str(tmp_path / "bad"), *args]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def _bounded_paths(cfg, prefix=""):
    """Dotted paths of every bounded float of a config (recursively)."""
    from dataclasses import fields, is_dataclass

    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            yield from _bounded_paths(v, f"{prefix}{f.name}.")
        elif isinstance(v, float) and "range" in f.metadata:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("name", ["instance", "learned", "learned+refine", "learned-lambda", "learned-conditional",
                                  "learned-conditional+refine"])
def test_set_rejects_unknown_keys_and_out_of_range_values_for_every_solver(name):
    from hybridreg.service import solver_and_config
    from hybridreg.solvers import available_solvers, get_solver

    assert name in available_solvers()
    with pytest.raises(ValueError, match="no key 'no_such_key'"):
        solver_and_config(name, overrides=["no_such_key=1"])
    paths = list(_bounded_paths(get_solver(name).default_config()))
    assert paths
    for path in paths:
        with pytest.raises(ValueError, match=path.split(".")[-1]):
            solver_and_config(name, overrides=[f"{path}=1e30"])


def test_turbo_trust_region_replays_successes_and_failures():
    from hybridreg import tuning
    from hybridreg.tuning.loop import TURBO_INIT, turbo_length

    sp = tuning.space_from_dict({"solver": "instance", "initial_trials": 2, "parameters": {
        "objective.w_reg": {"low": 1, "high": 16, "log": True}, "objective.hyper_strength": {"low": 0.01, "high": 1}}})
    t = lambda d: {"status": "done", "dice": d, "folding": 0.0, "sdlogj": 0.1}  # noqa: E731
    assert turbo_length(sp, [t(0.5), t(0.6)]) == TURBO_INIT
    assert turbo_length(sp, [t(0.5), t(0.6), t(0.61), t(0.62), t(0.63)]) == 2 * TURBO_INIT  # 3 successes double it
    assert turbo_length(sp, [t(0.5), t(0.6)] + [t(0.1)] * 4) == TURBO_INIT / 2  # ceil(max(4, d)) = 4 failures halve it
    assert turbo_length(sp, [t(0.5), t(0.6)] + [t(0.1)] * 28) == TURBO_INIT  # 7 halvings: below 2^-7, restarted
    assert turbo_length(sp, [t(0.5), t(0.6), {**t(0.9), "folding": 5.0}] * 1 + [t(0.1)] * 3) == TURBO_INIT / 2  # infeasible fails


@pytest.mark.slow
def test_turbo_beats_random_search_on_a_12_dimensional_analytic_objective(tmp_path):
    """Dice peaks at x = 0.3 in every unit coordinate; 12 parameters, 30 trials each."""
    from hybridreg import tuning

    keys = [f"region_lambda.{k}" for k in range(1, 13)]
    sp = tuning.space_from_dict({"solver": "learned-conditional", "initial_trials": 8, "seed": 0,
                                 "parameters": {k: {"low": 0.01, "high": 1.0} for k in keys}})

    def bowl(space, params):
        return {"dice": 0.9 - sum((params[k] - 0.3) ** 2 for k in keys) / len(keys), "folding": 0.0, "sdlogj": 0.1}

    turbo = tuning.run_tuning(sp, bowl, 30, tmp_path / "t", method="turbo", progress=False)
    rand = tuning.run_tuning(sp, bowl, 30, tmp_path / "r", method="random", progress=False)
    assert turbo.best["dice"] > rand.best["dice"]
    assert all(t["status"] == "done" for t in turbo.trials)


def test_region_weight_parameters_apply_to_the_conditional_config():
    from hybridreg import tuning

    sp = tuning.space_from_dict({"solver": "learned-conditional", "base_config": {"region_default": 0.6},
                                 "parameters": {"objective.w_reg": {"low": 1, "high": 16, "log": True},
                                                "region_lambda.17": {"low": 0.05, "high": 1.0, "log": True},
                                                "region_lambda.53": {"low": 0.05, "high": 1.0, "log": True}}})
    cfg = tuning.apply_params(sp, {"objective.w_reg": 2.0, "region_lambda.17": 0.3, "region_lambda.53": 0.4})
    assert cfg.objective.w_reg == 2.0 and cfg.region_lambda == {17: 0.3, 53: 0.4} and cfg.lambda_mode == "regions"
    assert tuning.base_params(sp) == {"objective.w_reg": 4.0, "region_lambda.17": 0.6, "region_lambda.53": 0.6}
    assert from_dict(type(cfg), to_dict(cfg)) == cfg  # the best config round-trips through YAML's mapping
    with pytest.raises(ValueError, match="region_lambdas"):
        tuning.space_from_dict({"solver": "learned-conditional", "parameters": {"region_lambdas.17": {"low": 0.1, "high": 1}}})


def test_regions_mode_starts_each_region_at_the_mean_of_init_lambda():
    """The refinement of a region-conditioned output: instance optimization with one λ per region
    starts from the network's map, region by region (its mean over each region)."""
    from instance_opt import InstanceOptConfig, register_pair

    g = torch.Generator().manual_seed(0)
    f, m = torch.rand(1, 1, 10, 12, 14, generator=g), torch.rand(1, 1, 10, 12, 14, generator=g)
    regions = torch.zeros(1, 1, 10, 12, 14, dtype=torch.long)
    regions[..., 7:] = 3
    init = torch.where(regions == 3, 0.8, 0.2).to(f.dtype)
    init[..., :2] = 0.3  # region 0's mean: (2·0.3 + 5·0.2) / 7
    cfg = InstanceOptConfig(lambda_mode="regions", level_spacing=(1.0,), iterations=(1,), lr=1e-6, lr_lambda=1e-6,
                            region_smoothing=0.0, progress=False)
    res = register_pair(f, m, cfg, spacing=(1.0,) * 3, init_lambda=init, regions=regions)
    lam = res.lam[0, 0]
    assert float(lam[..., 7:].mean()) == pytest.approx(0.8, abs=1e-3)
    assert float(lam[..., :7].mean()) == pytest.approx((2 * 0.3 + 5 * 0.2) / 7, abs=1e-3)


@pytest.mark.slow
def test_tiny_conditional_tuning_end_to_end_through_the_cli(tiny_weights, tmp_path, capsys):
    """``hybridreg tune --solver learned-conditional``: each trial is forward passes of the network
    at the trial's w_reg and region weights on the bundled validation pairs; TuRBO proposes after
    the Sobol design, and the best config is accepted by ``register --config``."""
    import json

    import yaml

    from hybridreg import tuning
    from hybridreg.cli import main

    space = {"solver": "learned-conditional", "initial_trials": 2, "max_pairs": 1, "synth_contrasts": 0, "seed": 0,
             "base_config": {"weights": str(tiny_weights), "region_default": 0.5},
             "parameters": {"objective.w_reg": {"low": 1.0, "high": 16.0, "log": True},
                            "region_lambda.17": {"low": 0.05, "high": 1.0, "log": True},
                            "region_lambda.53": {"low": 0.05, "high": 1.0, "log": True}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert main(["tune", "--solver", "learned-conditional", "--space", str(tmp_path / "space.yaml"), "--trials", "3",
                 "--method", "turbo", "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    trials = json.loads((tmp_path / "t" / "trials.json").read_text())["trials"]
    assert [t["status"] for t in trials] == ["done"] * 3 and all(0 < t["dice"] < 1 for t in trials)
    best = load_yaml_config(tmp_path / "t" / "best_config.yaml")
    assert set(best.region_lambda) == {17, 53} and 1.0 <= best.objective.w_reg <= 16.0
    sp = tuning.load_space(tmp_path / "space.yaml")
    assert tuning.apply_params(sp, trials[0]["params"]).weights == str(tiny_weights)
    assert "best of 3 trials" in capsys.readouterr().out


def load_yaml_config(path):
    from hybridreg.config import load_yaml
    from learned.solver import ConditionalConfig

    return load_yaml(path, ConditionalConfig)


@pytest.mark.slow
def test_shipped_conditional_weights_move_along_the_trade_off():
    """The shipped conditional network on the bundled demo pair (2 mm): one set of weights,
    SDlogJ falls as w_reg rises, every setting registers (Dice up from before, no folding)."""
    from hybridreg import data
    from hybridreg.metrics import score_registration
    from learned.solver import CONDITIONAL_WEIGHTS, LEARNED_CONDITIONAL, ConditionalConfig, Hyperparameters

    assert CONDITIONAL_WEIGHTS.is_file() and CONDITIONAL_WEIGHTS.stat().st_size < 10e6
    fid, mid = data.demo_pair()
    fs, ms = data.load_subject(fid, 2), data.load_subject(mid, 2)
    f, m = (torch.from_numpy(np.asarray(s.image, dtype=np.float32))[None, None] for s in (fs, ms))
    f, m = (t / t.max() for t in (f, m))
    scores = []
    for w in (1.0, 4.0, 16.0):
        res = LEARNED_CONDITIONAL.register_pair(f, m, ConditionalConfig(objective=Hyperparameters(w_reg=w), progress=False),
                                                spacing=(2.0,) * 3)
        scores.append(score_registration(fs.labels, ms.labels, res.displacement, "auto"))
    sd = [s["sdlogj"] for s in scores]
    assert sd[0] > sd[1] > sd[2] and all(s["folding_percent"] == 0 for s in scores)
    before = score_registration(fs.labels, ms.labels, torch.zeros(1, 3, *fs.labels.shape), "auto")["dice_mean"]
    assert all(s["dice_mean"] > before + 0.05 for s in scores)
