"""Every YAML file shipped in configs/ loads into its class (a typo would be an error)."""

from pathlib import Path

import pytest

from hybridreg.config import load_yaml
from hybridreg.objective import ObjectiveConfig
from hybridreg.tuning import load_space
from instance_opt import InstanceOptConfig
from learned.solver import LEARNED_CONDITIONAL_REFINE, ConditionalConfig
from learned.train import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.stem.split("_")[0] for p in CONFIGS} == {"instance", "learned", "conditional", "tune"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path):
    kind = path.stem.split("_")[0]
    if kind == "instance":
        load_yaml(path, InstanceOptConfig)
    elif kind == "learned":
        cfg = load_yaml(path, TrainConfig)
        assert cfg.objective.w_reg == 4.0  # the instance solver's energy: both solvers minimise one model
        if cfg.network.lambda_mode == "uniform":  # the uniform network's energy is the uniform instance solver's
            inst = load_yaml(path.parent / "instance_uniform_matched.yaml", InstanceOptConfig)
            assert inst.lambda_mode == "uniform" and cfg.objective.hyperprior == inst.objective.hyperprior == "none"
            if cfg.objective.lncc_window == inst.objective.lncc_window:  # the same energy: the same uniform weight
                assert cfg.objective.w_reg * cfg.network.lambda_uniform == pytest.approx(inst.objective.w_reg * inst.lambda_init,
                                                                                        rel=1e-4)
            else:  # the network keeps the energy it was trained on (LNCC window 9); the instance baseline moved to 5
                assert cfg.objective.lncc_window == 9 and inst.objective.lncc_window == ObjectiveConfig().lncc_window
    elif kind == "conditional":  # settings of --solver learned-conditional[+refine]
        cfg = load_yaml(path, ConditionalConfig)
        LEARNED_CONDITIONAL_REFINE.configure(cfg)  # the code lies in the shipped network's ranges
        if not cfg.refine_objective_from_weights:  # refined on the instance solver's own energy
            assert cfg.refine_config.objective == InstanceOptConfig().objective
    else:
        load_space(path)


def test_atomic_output_replaces_whole_files_with_normal_permissions(tmp_path):
    import os

    from hybridreg.config import atomic_output, atomic_write_text

    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed")
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("path", [p for p in CONFIGS if "default" in p.stem], ids=lambda p: p.name)
def test_default_configs_equal_their_dataclass(path):
    """`configs/*default*.yaml` write out a solver's defaults: every key, every value."""
    from hybridreg.config import read_yaml, to_dict
    from hybridreg.solvers import get_solver

    solver = get_solver(path.stem.split("_")[0])
    defaults = to_dict(solver.default_config())
    assert read_yaml(path) == defaults
    assert load_yaml(path, solver.config_class) == solver.default_config()


def test_solver_defaults_are_the_objective_defaults():
    from hybridreg.objective import ObjectiveConfig
    from hybridreg.solvers import get_solver

    assert get_solver("instance").default_config().objective == ObjectiveConfig()
    assert TrainConfig().objective == ObjectiveConfig()


def _config_classes():
    from hybridreg.objective import ObjectiveConfig
    from hybridreg.tuning import SearchSpace
    from hybridreg.synthesis import SynthConfig
    from learned.network import NetworkConfig
    from learned.solver import ConditionalConfig, Hyperparameters, LearnedConfig

    return (ObjectiveConfig, InstanceOptConfig, NetworkConfig, TrainConfig, SynthConfig, SearchSpace, Hyperparameters,
            LearnedConfig, ConditionalConfig)


def test_every_numeric_setting_has_a_documented_range():
    """No number in a config is unbounded (a value could take the machine's memory), and
    docs/configuration.md lists every range exactly as the code has it."""
    import dataclasses
    import typing

    from hybridreg.config import bounds_table

    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            numeric = tp in (int, float) or (typing.get_origin(tp) is tuple and typing.get_args(tp)[0] in (int, float))
            assert not numeric or "range" in f.metadata, f"{cls.__name__}.{f.name} has no range"
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert bounds_table(*_config_classes()) in doc


@pytest.mark.parametrize("cls_name, key, value", [("ObjectiveConfig", "lncc_window", 10001), ("ObjectiveConfig", "hyper_mean", float("nan")),
                                                  ("InstanceOptConfig", "velocity_smoothing", 1e6), ("InstanceOptConfig", "lr", 1e6),
                                                  ("TrainConfig", "steps", 10**9), ("NetworkConfig", "lambda_channels", 10**6)])
def test_out_of_range_values_are_refused_naming_the_key(cls_name, key, value):
    cls = {c.__name__: c for c in _config_classes()}[cls_name]
    with pytest.raises(ValueError, match=f"{cls_name}: `{key}` must be in"):
        cls(**{key: value})


def test_yaml_reads_an_exponent_without_a_dot_as_a_number(tmp_path):
    """PyYAML's YAML 1.1 rules read ``1e-6`` as a string; configs and ``--set`` read it as the
    number (YAML 1.2), and a value that is no number is still refused naming the key."""
    from hybridreg.config import apply_overrides

    assert apply_overrides(ObjectiveConfig(), ["lncc_eps=1e-6"]).lncc_eps == 1e-6
    p = tmp_path / "c.yaml"
    p.write_text("objective:\n  lncc_eps: 1E-5\n  w_reg: 8\nlr: 5e-1\n")
    cfg = load_yaml(p, InstanceOptConfig)
    assert (cfg.objective.lncc_eps, cfg.objective.w_reg, cfg.lr) == (1e-5, 8.0, 0.5)
    with pytest.raises(ValueError, match="w_reg"):
        apply_overrides(ObjectiveConfig(), ["w_reg=1e"])


def test_a_list_for_a_tuple_setting_is_taken_in_python_as_on_the_command_line():
    """``dataclasses.replace(cfg, iterations=[30, 20, 10, 1])`` was refused as not holding ints,
    though ``--set iterations=[30,20,10,1]`` works; the list is now stored as the tuple."""
    from dataclasses import replace

    cfg = replace(InstanceOptConfig(), iterations=[30, 20, 10, 1], level_spacing=[8, 4, 2, 1])
    assert cfg.iterations == (30, 20, 10, 1) and cfg.level_spacing == (8, 4, 2, 1) and hash(cfg)
    assert replace(TrainConfig(), steps=3).steps == 3
    with pytest.raises(ValueError, match="`iterations` must hold ints"):
        replace(cfg, iterations=[1.5, 2, 3, 4])


def test_set_reads_a_label_of_a_mapping_as_the_search_space_does_and_leaves_the_config_alone():
    """`--set region_lambda.17=0.3` was refused ("region_lambda has no key '17'; valid keys are [17]"), which
    the tuner's search space accepted; and a value set through the copy of to_dict reached the original config."""
    from hybridreg.config import apply_overrides

    cfg = ConditionalConfig(region_lambda={17: 0.5})
    assert apply_overrides(cfg, ["region_lambda.17=0.3"]).region_lambda == {17: 0.3}
    assert apply_overrides(cfg, ["region_lambda.53=0.2"]).region_lambda == {17: 0.5, 53: 0.2}
    assert cfg.region_lambda == {17: 0.5}
    with pytest.raises(ValueError, match="region_lambda has no key 'x'"):
        apply_overrides(cfg, ["region_lambda.x=1"])
    for key in ("objective.17=2", "region_lambda.-3=0.1", "region_lambda.²=0.1"):  # not a label, or not a mapping
        with pytest.raises(ValueError, match=r"has no key '(17|-3|²)'"):
            apply_overrides(cfg, [key])


def test_result_files_are_strict_json(tmp_path):
    """history.json held a bare NaN (invalid JSON) when a run had no validation pairs."""
    import json

    from hybridreg.config import write_json

    write_json(tmp_path / "x.json", {"dice": float("nan"), "per": [1.0, float("inf")], "n": 2})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == \
        {"dice": None, "per": [1.0, None], "n": 2}
