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
    else:
        load_space(path)
