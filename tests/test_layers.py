"""The architecture contract: layers import one way (model ← solvers ← application), solvers
are found through entry points, and registering a pair stays on a light import path."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hybridreg", "instance_opt", "learned", "benchmarks")
LINT = "from importlinter.cli import lint_imports; raise SystemExit(lint_imports(config_filename='pyproject.toml'))"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", LINT], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _copy_tree(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "weights", "bundled", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_layer_contract_is_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module, upward", [("hybridreg/spatial.py", "import instance_opt"),
                                            ("hybridreg/metrics.py", "from hybridreg import service"),
                                            ("instance_opt/solver.py", "import hybridreg.cli"),
                                            ("instance_opt/solver.py", "import learned.network")])
def test_layer_contract_fails_on_an_upward_import(tmp_path, module, upward):
    tree = _copy_tree(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n\ndef _upward():\n    {upward}  # deliberately inserted\n")
    r = _lint(tree)
    assert r.returncode != 0 and "BROKEN" in r.stdout.upper(), r.stdout + r.stderr


def test_model_names_no_solver_module():
    """No import string or import statement of a solver module in the model (hybridreg
    outside the application modules); solvers come from entry points."""
    application = {"cli.py", "service.py", "__main__.py"}
    for path in (ROOT / "hybridreg").rglob("*.py"):
        rel = path.relative_to(ROOT / "hybridreg")
        text = path.read_text()
        assert "import_module" not in text, rel
        if rel.name in application or rel.parts[0] == "tuning":
            continue
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("instance_opt", "learned", "benchmarks") for n in names), rel


def test_solvers_come_from_entry_points():
    from hybridreg.solvers import Solver, available_solvers, get_solver

    assert {"instance", "learned", "learned+refine"} <= set(available_solvers())
    for name in ("instance", "learned", "learned+refine"):
        s = get_solver(name)
        assert isinstance(s, Solver) and s.name == name
        assert isinstance(s.default_config(), s.config_class)
    with pytest.raises(ValueError, match="`--solver`.*'nope'"):
        get_solver("nope")


@pytest.mark.slow
def test_registering_a_pair_imports_no_tuning_or_keops_library():
    code = (
        "import sys, torch\n"
        "from hybridreg.service import solver_and_config\n"
        "solver, cfg = solver_and_config('instance', progress=False)\n"
        "from dataclasses import replace\n"
        "cfg = replace(cfg, level_spacing=(2.0,), iterations=(2,))\n"
        "g = torch.Generator().manual_seed(0)\n"
        "f, m = torch.rand(1, 1, 16, 16, 16, generator=g), torch.rand(1, 1, 16, 16, 16, generator=g)\n"
        "solver.register_pair(f, m, cfg, spacing=(2.0, 2.0, 2.0))\n"
        "print(sorted(k for k in ('botorch', 'gpytorch', 'pykeops', 'optuna', 'matplotlib.pyplot') if k in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


TOY_SOLVER = '''
from dataclasses import dataclass
import torch
from hybridreg.solvers import LevelHistory, RegistrationResult, Status


@dataclass(frozen=True)
class ToyConfig:
    progress: bool = True


class ToySolver:
    """The identity transform: a third-party solver in ten lines."""
    name, config_class = "toy", ToyConfig

    def default_config(self):
        return ToyConfig()

    def configure(self, config):
        return config

    def register_pair(self, fixed, moving, config=None, *, spacing=None, device=None, **grids):
        zero = torch.zeros((fixed.shape[0], fixed.dim() - 2) + tuple(fixed.shape[2:]))
        lam = torch.ones((fixed.shape[0], 1) + (1,) * (fixed.dim() - 2))
        step = LevelHistory(tuple(spacing), tuple(fixed.shape[2:]), tuple(fixed.shape[2:]), {}, 1, Status.NETWORK, 0.0)
        return RegistrationResult(zero, zero, lam, fixed, [step], 0.0, config, {"total": 0.0})


SOLVER = ToySolver()
'''


def test_a_third_party_solver_plugs_in_through_its_entry_point(tmp_path):
    """A package that declares a `hybridreg.solvers` entry point is used by the CLI like ours."""
    from hybridreg import data

    (tmp_path / "toy_solver.py").write_text(TOY_SOLVER)
    dist = tmp_path / "toy_solver-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-solver\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[hybridreg.solvers]\ntoy = toy_solver:SOLVER\n")
    f, m = (data.load_subject(s, 2) for s in data.demo_pair())
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    r = subprocess.run([sys.executable, "-m", "hybridreg", "register", str(f.image_path), str(m.image_path), "--out", str(out),
                        "--fixed-labels", str(f.labels_path), "--moving-labels", str(m.labels_path), "--solver", "toy",
                        "--affine", "none", "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["solver"] == "toy" and metrics["folding_percent"] == 0.0
    assert metrics["dice_after"]["mean"] == pytest.approx(metrics["dice_before"]["mean"])  # the identity
