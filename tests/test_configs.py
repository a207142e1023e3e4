"""Every YAML file shipped in configs/ loads into its class (a typo would be an error)."""

from pathlib import Path

import pytest

from hybridreg.config import load_yaml
from hybridreg.tuning import load_space
from instance_opt import InstanceOptConfig
from learned.train import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.stem.split("_")[0] for p in CONFIGS} == {"instance", "learned", "tune"}


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
            assert cfg.objective.w_reg * cfg.network.lambda_uniform == pytest.approx(inst.objective.w_reg * inst.lambda_init, rel=1e-4)
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
