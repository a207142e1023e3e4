"""Bayesian tuning: the loop on analytic objectives (no registrations), the folding
constraint, Pareto handling, resume, bad search spaces, and one tiny real tuning run."""

import json
import math
import warnings
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from botorch.exceptions.warnings import BotorchWarning

from hybridreg import tuning
from hybridreg.cli import main
from hybridreg.config import load_yaml

SPACE = {
    "solver": "instance",
    "parameters": {
        "objective.w_reg": {"low": 0.25, "high": 16.0, "log": True},
        "objective.hyper_strength": {"low": 0.01, "high": 1.0, "log": True},
    },
    "folding_max": 0.1,
    "initial_trials": 5,
    "batch_size": 1,
    "seed": 1,
}


def bowl(space, params):
    """Dice peaks at w_reg = 2, hyper_strength = 0.1 (0.8); folding for w_reg < 1."""
    w, a = params["objective.w_reg"], params["objective.hyper_strength"]
    dice = 0.8 - 0.05 * math.log(w / 2.0) ** 2 - 0.02 * math.log(a / 0.1) ** 2
    return {"dice": dice, "folding": 0.5 if w < 1.0 else 0.0, "sdlogj": 0.4 / math.sqrt(w)}


def tempting(space, params):
    """Dice keeps rising as w_reg falls, but w_reg < 1 folds: the constrained optimum is w_reg = 1."""
    w = params["objective.w_reg"]
    return {"dice": 0.9 - 0.05 * math.log(w), "folding": 1.0 if w < 1.0 else 0.0, "sdlogj": 0.4 / math.sqrt(w)}


def failing(space, params):
    if params["objective.w_reg"] > 4:
        raise RuntimeError("diverged")
    return bowl(space, params)


def space(**kw):
    return tuning.space_from_dict({**SPACE, **kw})


def test_parameter_scaling_round_trip():
    p = tuning.Parameter("objective.w_reg", 0.25, 16.0, log=True)
    assert p.from_unit(0.5) == pytest.approx(2.0) and p.to_unit(2.0) == pytest.approx(0.5)
    q = tuning.Parameter("iterations", 10, 50, integer=True)
    assert q.from_unit(0.51) == 30.0 and q.from_unit(2.0) == 50.0
    w = tuning.Parameter("objective.lncc_window", 5, 14, integer=True, step=2)  # odd windows 5..13
    assert [w.from_unit(u) for u in (0.0, 0.2, 0.5, 0.9, 1.0)] == [5.0, 7.0, 9.0, 13.0, 13.0]


def test_apply_params_sets_nested_keys_and_scales_schedules():
    sp = tuning.space_from_dict({**SPACE, "parameters": {**SPACE["parameters"], "iterations": {"low": 50, "high": 400}}})
    cfg = tuning.apply_params(sp, {"objective.w_reg": 3.0, "objective.hyper_strength": 0.2, "iterations": 100})
    assert cfg.objective.w_reg == 3.0 and cfg.objective.hyper_strength == 0.2
    assert cfg.iterations == (100, 53, 20, 1)  # default (150, 80, 30, 1) scaled by 100/150


def test_base_params_are_the_base_configs_values():
    sp = tuning.space_from_dict({**SPACE, "parameters": {**SPACE["parameters"], "iterations": {"low": 50, "high": 400}},
                                 "base_config": {"objective": {"w_reg": 2.5}}})
    base = tuning.base_params(sp)
    assert base == {"objective.w_reg": 2.5, "objective.hyper_strength": 0.175, "iterations": 150.0}
    assert tuning.apply_params(sp, base) == tuning.apply_params(sp, {**base, "iterations": 150})


@pytest.mark.slow
def test_botorch_finds_the_optimum_of_an_analytic_objective(tmp_path):
    res = tuning.run_tuning(space(), bowl, 14, tmp_path, progress=False)
    assert len(res.trials) == 14 and all(t["status"] == "done" for t in res.trials)
    sobol_best = max(t["dice"] for t in res.trials[:5] if t["folding"] <= 0.1)
    assert res.best["dice"] > 0.79 and res.best["dice"] >= sobol_best
    assert res.best["params"]["objective.w_reg"] == pytest.approx(2.0, rel=0.35)


@pytest.mark.slow
def test_botorch_proposals_are_seeded_without_touching_the_global_rng(tmp_path):
    before = torch.random.get_rng_state()
    a, b = (tuning.run_tuning(space(), bowl, 7, tmp_path / n, progress=False) for n in "ab")  # 5 Sobol + 2 GP proposals
    assert [t["params"] for t in a.trials] == [t["params"] for t in b.trials]
    assert torch.equal(torch.random.get_rng_state(), before)


def test_importing_tuning_imports_no_optimisation_library():
    code = "import sys, hybridreg.tuning; print(sorted({m.split('.')[0] for m in sys.modules} & {'botorch', 'gpytorch', 'optuna'}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


@pytest.mark.slow
def test_folding_constraint_is_respected(tmp_path):
    res = tuning.run_tuning(space(), tempting, 12, tmp_path, progress=False)
    assert any(t["folding"] > 0.1 and t["dice"] > res.best["dice"] for t in res.trials)  # better but infeasible trials exist
    assert res.best["folding"] <= 0.1 and 1.0 <= res.best["params"]["objective.w_reg"] <= 2.0  # near the boundary
    assert all(t["folding"] <= 0.1 for t in res.pareto)


def cliff(space, params):
    """Dice rises as w_reg falls; below w_reg = 1 the folding grows from zero (zero-inflated):
    2·(1 − w)² %, so the feasible optimum for τ = 0.1 is w_reg = 1 − √0.05 ≈ 0.776."""
    w = params["objective.w_reg"]
    return {"dice": 0.9 - 0.05 * math.log(w), "folding": 2.0 * (1.0 - w) ** 2 if w < 1.0 else 0.0, "sdlogj": 0.4 / math.sqrt(w)}


def test_the_folding_constraint_model_recognises_feasible_points():
    from botorch.sampling import SobolQMCNormalSampler

    from hybridreg.tuning.loop import fit_gp, folding_slack

    g = torch.Generator().manual_seed(0)
    X = torch.rand(8, 2, generator=g, dtype=torch.double)
    folding = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 3.0], dtype=torch.double)  # zero-inflated
    dice = 0.8 - ((X - 0.5) ** 2).sum(-1)
    model = fit_gp(X, torch.stack([dice, folding_slack(folding, 0.1)], -1))
    z = SobolQMCNormalSampler(torch.Size([512]), seed=0)(model.posterior(X))[..., 1]
    p_feasible = (z <= 0).double().mean(0)
    assert bool((p_feasible[:6] > 0.99).all()) and bool((p_feasible[6:] < 0.05).all()), p_feasible
    assert bool((folding_slack(folding, 0.1) <= 0).eq(folding <= 0.1).all())
    assert float(folding_slack(torch.tensor(0.0), 0.0)) == 0.0  # τ = 0: only no folding at all is feasible


@pytest.mark.slow
def test_botorch_finds_a_feasible_optimum_at_a_zero_inflated_constraint(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BotorchWarning)  # e.g. "all training points are infeasible"
        res = tuning.run_tuning(space(), cliff, 12, tmp_path, progress=False)
    assert res.best["folding"] <= 0.1 and 0.776 <= res.best["params"]["objective.w_reg"] <= 1.3
    assert any(t["folding"] > 0.1 for t in res.trials)  # the tuner did probe the infeasible side


def test_an_sdlogj_bound_is_a_second_constraint():
    from hybridreg.tuning.loop import _outcomes

    sp = space(sdlogj_max=0.2)
    trials = [{"id": i, "status": "done", "dice": d, "folding": f, "sdlogj": s}
              for i, (d, f, s) in enumerate([(0.80, 0.0, 0.28), (0.78, 0.0, 0.19), (0.79, 0.5, 0.15), (0.70, 0.0, 0.10)])]
    assert [sp.feasible(t) for t in trials] == [False, True, False, True]
    assert tuning.best_trial(trials, sp)["id"] == 1 and tuning.best_trial(trials, space())["id"] == 0
    assert {t["id"] for t in tuning.pareto_front(trials, sp)} == {1, 3}
    assert tuning.best_so_far(trials, sp) == [pytest.approx(float("nan"), nan_ok=True), 0.78, 0.78, 0.78]
    Y, constraints = _outcomes(sp, trials)
    assert Y.shape == (4, 3) and len(constraints) == 2  # Dice, then the folding and SDlogJ slacks
    feasible = torch.stack([c(Y) for c in constraints]).le(0).all(0)
    assert feasible.tolist() == [sp.feasible(t) for t in trials]
    assert _outcomes(space(), trials)[0].shape == (4, 2) and _outcomes(space(mode="pareto", sdlogj_max=0.2), trials)[0].shape == (4, 4)
    with pytest.raises(ValueError, match="sdlogj_max"):
        space(sdlogj_max=-0.1)


@pytest.mark.slow
def test_botorch_finds_dice_under_an_sdlogj_bound(tmp_path):
    """`bowl` peaks at w_reg 2 (SDlogJ 0.28); under SDlogJ ≤ 0.2 the optimum is w_reg 4 (SDlogJ 0.2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BotorchWarning)
        res = tuning.run_tuning(space(sdlogj_max=0.2), bowl, 12, tmp_path, progress=False)
    assert res.best["sdlogj"] <= 0.2 and 4.0 <= res.best["params"]["objective.w_reg"] <= 5.0, res.best
    assert any(t["sdlogj"] > 0.2 for t in res.trials)


@pytest.mark.slow
def test_pareto_mode_returns_the_non_dominated_trials(tmp_path):
    res = tuning.run_tuning(space(mode="pareto", batch_size=2), bowl, 8, tmp_path, progress=False)
    ok = [t for t in res.trials if t["folding"] <= 0.1]
    front_ids = {t["id"] for t in res.pareto}
    for t in ok:  # brute force: on the front iff no other feasible trial is at least as good in both and better in one
        dominated = any(o["dice"] >= t["dice"] and o["sdlogj"] <= t["sdlogj"] and (o["dice"], o["sdlogj"]) != (t["dice"], t["sdlogj"])
                        for o in ok)
        assert (t["id"] in front_ids) == (not dominated), t
    assert len(res.pareto) >= 2


@pytest.mark.parametrize("method", ["random", "tpe"])
def test_baseline_methods(tmp_path, method):
    res = tuning.run_tuning(space(), bowl, 8, tmp_path, method=method, progress=False)
    assert len(res.trials) == 8 and res.best is not None
    assert json.loads((tmp_path / "trials.json").read_text())["method"] == method


@pytest.mark.slow
def test_failed_trials_are_recorded_and_the_run_goes_on(tmp_path):
    res = tuning.run_tuning(space(), failing, 8, tmp_path, progress=False)
    failed = [t for t in res.trials if t["status"] == "failed"]
    assert failed and all("diverged" in t["error"] for t in failed)
    assert len(res.trials) == 8 and res.best["params"]["objective.w_reg"] <= 4


@pytest.mark.slow
def test_killed_run_resumes_without_losing_trials(tmp_path):
    sp = space(batch_size=2)
    full = tuning.run_tuning(sp, bowl, 9, tmp_path / "full", progress=False)
    tuning.run_tuning(sp, bowl, 9, tmp_path / "cut", progress=False, stop_after=6)  # stops inside a batch of 2
    saved = json.loads((tmp_path / "cut" / "trials.json").read_text())["trials"]
    assert sum(t["status"] == "done" for t in saved) == 6 and [t["status"] for t in saved].count("pending") == 1
    res = tuning.run_tuning(sp, bowl, 9, tmp_path / "cut", progress=False, resume=True)
    assert [t["params"] for t in res.trials[:7]] == [t["params"] for t in saved]  # kept, pending one evaluated as proposed
    assert [t["params"] for t in res.trials[:7]] == [t["params"] for t in full.trials[:7]]
    assert len(res.trials) == 9 and all(t["status"] == "done" for t in res.trials)
    with pytest.raises(ValueError, match="another method or search space"):
        tuning.run_tuning(space(seed=5), bowl, 10, tmp_path / "cut", progress=False, resume=True)
    with pytest.raises(ValueError, match="--resume"):
        tuning.run_tuning(sp, bowl, 9, tmp_path / "cut", progress=False)


def test_a_fresh_run_keeps_an_earlier_runs_files_and_a_damaged_state_is_named(tmp_path):
    """A fresh run refused a folder only for its trials.json: summary.json and pareto.json of an
    earlier run were replaced. A cut trials.json gave a bare JSON error naming no file."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds a tuning run's files \(summary.json\)"):
        tuning.run_tuning(space(), bowl, 2, tmp_path / "old", progress=False)
    assert (tmp_path / "old" / "summary.json").read_text() == "{}"
    tuning.run_tuning(space(), bowl, 2, tmp_path / "cut", progress=False)
    state = tmp_path / "cut" / "trials.json"
    text = state.read_text()
    state.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"trials.json cannot be read as a tuning run's state"):
        tuning.run_tuning(space(), bowl, 3, tmp_path / "cut", progress=False, resume=True)
    assert state.read_text() == text[: len(text) // 2]  # left as it was


def test_resume_accepts_a_state_file_written_before_a_field_was_added(tmp_path):
    sp = space()
    tuning.run_tuning(sp, bowl, 3, tmp_path, progress=False)
    state = json.loads((tmp_path / "trials.json").read_text())
    for p in state["space"]["parameters"]:
        del p["step"]  # as written by an older hybridreg
    (tmp_path / "trials.json").write_text(json.dumps(state))
    assert len(tuning.run_tuning(sp, bowl, 4, tmp_path, progress=False, resume=True).trials) == 4
    with pytest.raises(ValueError, match="another method or search space"):
        tuning.run_tuning(space(folding_max=0.5), bowl, 5, tmp_path, progress=False, resume=True)


@pytest.mark.slow
def test_parallel_workers_evaluate_a_batch(tmp_path):
    res = tuning.run_tuning(space(batch_size=2, workers=2, initial_trials=2), bowl, 4, tmp_path, progress=False)
    assert len(res.trials) == 4 and all(t["status"] == "done" for t in res.trials)


@pytest.mark.slow
def test_outputs_and_best_config_is_accepted_by_register(tmp_path):
    sp = space()
    res = tuning.run_tuning(sp, bowl, 8, tmp_path, progress=False)
    summary = tuning.write_outputs(sp, res, tmp_path)
    for name in ("best_config.yaml", "pareto.json", "summary.json", "best_so_far.png", "pareto.png", "partial_dependence.png"):
        assert (tmp_path / name).is_file(), name
    from instance_opt import InstanceOptConfig

    cfg = load_yaml(tmp_path / "best_config.yaml", InstanceOptConfig)
    assert cfg.objective.w_reg == pytest.approx(res.best["params"]["objective.w_reg"])
    assert summary["best_so_far"][-1] == res.best["dice"]
    pd = tuning.partial_dependence(sp, res.trials)
    xs, mean, _ = pd["objective.w_reg"]
    assert xs[0] == pytest.approx(0.25) and xs[-1] == pytest.approx(16.0) and len(mean) == len(xs)


@pytest.mark.parametrize("content,match", [
    ("solver: instance\n", "parameters"),
    ("parameters: {objective.w_reg: {low: 4, high: 1}}\n", "below"),
    ("parameters: {objective.w_reg: {low: 0, high: 1, log: true}}\n", "low > 0"),
    ("parameters: {objective.w_regg: {low: 1, high: 2}}\n", "w_regg"),
    ("parameters: {objective.w_reg: {low: 1, high: 2}}\nbatchsize: 2\n", "batchsize"),
    ("parameters: {objective.w_reg: {low: 1, high: 2, scale: 3}}\n", "scale"),
    ("parameters: [w_reg]\n", "parameters"),
    ("parameters: {objective.w_reg: {low: 1, high: 2}}\nbatch_size: 0\n", "batch_size"),
    ("parameters: {a: [1,\n", "not valid YAML"),
    ("parameters: {objective.lncc_window: {low: 5, high: 13, integer: true, step: 20}}\n", "step"),
    ("parameters: {objective.lncc_window: {low: 4, high: 12, integer: true}}\n", "lncc_window"),  # even mid-range window
    # a number or a range without `high` crashed with a TypeError (exit 1)
    ("parameters: {objective.w_reg: 3.0}\n", r"must be a mapping \{low, high"),
    ("parameters: {objective.w_reg: {low: 1}}\n", r"missing key\(s\) \['high'\]"),
])
def test_bad_search_space_files(tmp_path, content, match):
    p = tmp_path / "space.yaml"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        tuning.load_space(p)
    assert main(["tune", "--space", str(p), "--trials", "2", "--out", str(tmp_path / "o"), "--no-progress"]) == 2


def test_train_data_is_refused_unless_the_learned_solver_is_tuned(tmp_path, capsys):
    """``train_data`` names the learned solver's training data: an instance search space with it
    was accepted and its trials scored the bundled pairs; it is refused before any trial, and a
    file without ``solver:`` run with ``--solver learned`` keeps it (the solver is known then)."""
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({**SPACE, "train_data": "pairs.csv"}))
    out = tmp_path / "o"
    assert main(["tune", "--space", str(p), "--trials", "2", "--out", str(out), "--no-progress"]) == 2
    assert "`train_data`" in capsys.readouterr().err and not (out / "trials.json").exists()
    assert tuning.load_space(p).train_data == "pairs.csv"  # the file itself is valid: the check is the run's
    # a learned space whose train_data does not open ran every trial to failure, exit 0, blaming a `--data` flag
    p.write_text(yaml.safe_dump({"solver": "learned", "parameters": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
                                 "train_data": str(tmp_path / "nowhere.csv")}))
    assert main(["tune", "--space", str(p), "--trials", "2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "search space: `train_data`: " in err and "is neither 'bundled'" in err and not out.exists()


def test_an_integer_range_with_values_the_solver_refuses_is_refused_before_any_trial(tmp_path, capsys):
    """An LNCC window from 3 to 7 without `step: 2` passed the checks at its ends and middle (all odd), and half of
    its trials then failed on an even window, exit 0."""
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({"seed": 3, "parameters": {"objective.lncc_window": {"low": 3, "high": 7, "integer": True}}}))
    out = tmp_path / "o"
    assert main(["tune", "--space", str(p), "--trials", "2", "--out", str(out), "--method", "random", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "`objective.lncc_window` can take 4, which the solver refuses" in err and "must be odd" in err
    assert not out.exists()


@pytest.mark.parametrize("device", ["tpu", f"cuda:{torch.cuda.device_count()}"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_tune_refuses_an_unusable_device_before_making_its_folder(tmp_path, capsys, device):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "o"
    assert main(["tune", "--space", str(tmp_path / "space.yaml"), "--trials", "2", "--out", str(out), "--no-progress",
                 "--device", device]) == 2
    assert "`--device`" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("space_file, solver_arg, expected", [
    ("tune_conditional.yaml", [], "learned-conditional"),  # the file's `solver:` (it was tuned as instance)
    ("tune_conditional.yaml", ["--solver", "learned-conditional"], "learned-conditional"),
    ("tune_instance.yaml", [], "instance"),
])
def test_tune_runs_the_search_spaces_solver_unless_solver_is_given(tmp_path, monkeypatch, space_file, solver_arg, expected):
    from pathlib import Path

    seen = []

    def stop(space, objective, *args, **kwargs):  # records what would run, then ends the command (exit 2)
        seen.append((space.solver, objective.func))
        raise ValueError("stopped by the test")

    monkeypatch.setattr(tuning, "run_tuning", stop)
    space = Path(__file__).resolve().parents[1] / "configs" / space_file
    assert main(["tune", "--space", str(space), "--trials", "2", "--out", str(tmp_path / "o"), "--no-progress", *solver_arg]) == 2
    assert seen == [(expected, tuning.OBJECTIVES[expected])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_a_trial_on_the_gpu_scores_as_on_the_cpu():
    sp = tuning.space_from_dict({**SPACE, "max_pairs": 1, "base_config": {"level_spacing": [8.0], "iterations": [5]}})
    params = tuning.base_params(sp)
    cpu, gpu = (tuning.solver_objective(sp, params, device=d) for d in ("cpu", "cuda"))
    assert gpu["dice"] == pytest.approx(cpu["dice"], abs=0.01) and gpu["sdlogj"] == pytest.approx(cpu["sdlogj"], abs=0.01)


def test_tuning_pairs_add_copies_drawn_from_the_label_maps():
    from hybridreg.tuning.objectives import _load_pairs, _pairs

    sp = tuning.space_from_dict({**SPACE, "max_pairs": 2, "synth_contrasts": 1})
    pairs, spacing = _pairs(sp, "val")
    assert len(pairs) == 4 and spacing == (2.0, 2.0, 2.0)
    (f, m), (sf, sm) = pairs[0], pairs[2]
    assert sf.subject_id == f"{f.subject_id}~synth" and sm.image.shape == m.image.shape
    assert sm.labels.shape == m.labels.shape and not np.array_equal(sm.image, m.image)
    assert _pairs(sp, "val")[0][2][1] is sm  # loaded and drawn once per process, not once per trial
    _load_pairs.cache_clear()
    again = _pairs(sp, "val")[0][2]
    assert again[1] is not sm and np.array_equal(again[1].image, sm.image)  # the same images, drawn again
    # the image is drawn from the (deformed) labels it comes with: per-label means explain it
    lab, img = sm.labels, sm.image
    fit = np.zeros_like(img)
    for k in np.unique(lab):
        fit[lab == k] = img[lab == k].mean()
    assert np.corrcoef(fit.ravel(), img.ravel())[0, 1] > 0.8


@pytest.mark.slow
def test_tiny_real_tuning_run_through_the_cli(tmp_path, capsys):
    sp = {**SPACE, "initial_trials": 2, "max_pairs": 1, "synth_contrasts": 0,
          "base_config": {"level_spacing": [8.0], "iterations": [25], "velocity_smoothing": 1.0}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(sp))
    out = tmp_path / "tune"
    assert main(["tune", "--space", str(tmp_path / "space.yaml"), "--trials", "3", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert len(trials) == 3 and all(t["status"] == "done" and t["device"] == "cpu" for t in trials)
    assert all(0.5 < t["dice"] < 0.9 and t["sdlogj"] > 0 for t in trials)  # real registrations of a bundled pair
    assert "best of 3 trials" in capsys.readouterr().out
    assert main(["tune", "--space", str(tmp_path / "space.yaml"), "--trials", "4", "--out", str(out), "--resume",
                 "--no-progress"]) == 0
    assert len(json.loads((out / "trials.json").read_text())["trials"]) == 4


@pytest.mark.slow
def test_learned_objective_trains_a_short_run_and_scores_validation_pairs():
    sp = tuning.space_from_dict({
        "solver": "learned", "parameters": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}, "max_pairs": 1,
        "base_config": {"network": {"ndim": 3, "encoder": [4, 8], "decoder": [8, 4], "lambda_channels": 4,
                                    "resolution_factor": 2},
                        "steps": 2, "epoch_steps": 2, "checkpoint_every": 2},
    })
    r = tuning.learned_objective(sp, {"lr": 1e-3})
    assert set(r) == {"dice", "folding", "sdlogj"}
    assert 0.4 < r["dice"] < 0.9 and r["sdlogj"] >= 0  # an (almost untrained) network on the real pair vxm <- synthseg_13


def test_objectives_score_the_test_split_on_request():
    sp = tuning.space_from_dict({**SPACE, "max_pairs": 1, "base_config": {"level_spacing": [8.0], "iterations": [5]}})
    params = tuning.base_params(sp)
    val, test = (tuning.solver_objective(sp, params, split=s) for s in ("val", "test"))
    assert val["dice"] != test["dice"]  # vxm <- synthseg_13 against vxm <- synthseg_16
    with pytest.raises(ValueError, match="split"):
        tuning.solver_objective(sp, params, split="train")


def test_a_run_without_a_feasible_trial_says_why_and_lists_only_the_files_it_wrote(tmp_path):
    """The command listed best_config.yaml and partial_dependence.png that it had not written,
    blamed folding when SDlogJ (or failing trials) made every trial infeasible, and wrote NaN
    into summary.json."""
    sp = space(sdlogj_max=0.01)
    res = tuning.run_tuning(sp, bowl, 2, tmp_path / "sd", progress=False)
    summary = tuning.write_outputs(sp, res, tmp_path / "sd")
    folded = sum(t["folding"] > 0.1 for t in res.trials)  # the Sobol points with w_reg < 1
    assert res.best is None and summary["infeasible"] == "; ".join(
        ([f"%|J|≤0 > 0.1 in {folded} of 2 finished trials"] if folded else []) + ["SDlogJ > 0.01 in 2 of 2 finished trials"])
    assert summary["outputs"] == ["trials.json", "summary.json", "best_so_far.png", "pareto.json", "pareto.png"]
    assert sorted(p.name for p in (tmp_path / "sd").iterdir()) == sorted(summary["outputs"])

    def strict(name):
        raise ValueError(f"{name} in summary.json")

    assert json.loads((tmp_path / "sd" / "summary.json").read_text(), parse_constant=strict)["best_so_far"] == [None, None]
    res = tuning.run_tuning(space(), lambda s, p: failing(s, {"objective.w_reg": 8.0}), 2, tmp_path / "f", progress=False)
    assert tuning.write_outputs(space(), res, tmp_path / "f")["infeasible"] == (
        "2 of 2 trials failed (the first: RuntimeError: diverged)")


def test_a_conditional_search_space_outside_the_networks_range_is_refused_before_any_trial(tmp_path, capsys):
    """Every trial of w_reg in [20, 32] failed (the network was trained on [1, 16]) and the run
    ended with exit 0; the instance solver's bounds were checked before any work."""
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({"solver": "learned-conditional", "initial_trials": 2,
                                 "parameters": {"objective.w_reg": {"low": 0.5, "high": 16.0, "log": True}}}))
    out = tmp_path / "o"
    assert main(["tune", "--space", str(p), "--trials", "2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "every `low` of the parameters together" in err and "`objective.w_reg` must lie in the conditional" in err
    assert not (out / "trials.json").exists()


def test_the_space_check_takes_the_values_trials_can_take(tmp_path):
    """An integer window from 5 to 12 in steps of 2 takes 5, 7, 9 and 11: a check of `high` itself
    (12, an even window) refused a space that runs."""
    sp = tuning.space_from_dict({"solver": "instance", "initial_trials": 2,
                                 "parameters": {"objective.lncc_window": {"low": 5, "high": 12, "integer": True, "step": 2}}})
    res = tuning.run_tuning(sp, lambda s, p: {"dice": 0.5, "folding": 0.0, "sdlogj": 0.1}, 2, tmp_path, progress=False)
    assert all(t["params"]["objective.lncc_window"] in (5, 7, 9, 11) for t in res.trials)
