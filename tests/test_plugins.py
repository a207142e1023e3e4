"""Third-party solvers (``docs/development.md``, "Plugging in a solver"): found through the
``hybridreg.solvers`` entry points, used by the CLI, the service and the benchmarks; a plug-in's
load failures, name clashes and broken results are refused in one line naming it."""

from dataclasses import dataclass
from importlib.metadata import EntryPoint

import pytest
import torch

import hybridreg.solvers as solvers
from hybridreg.solvers import RegistrationResult, get_solver


@dataclass(frozen=True)
class PlainConfig:
    """A plug-in's config: no `progress` field (the docs never asked for one)."""

    shift: float = 0.0


@dataclass(frozen=True)
class Plain:
    """Translates MOVING by `shift` voxels along the first axis; `fault` breaks its result."""

    name: str = "plain"
    config_class: type = PlainConfig
    fault: str = ""

    def default_config(self) -> PlainConfig:
        return PlainConfig()

    def configure(self, config: PlainConfig) -> PlainConfig:
        return config

    def register_pair(self, fixed, moving, config=None, *, spacing=None, device=None, **grids) -> RegistrationResult:
        cfg = config or PlainConfig()
        shape = (fixed.shape[0], fixed.dim() - 2, *fixed.shape[2:])
        disp = torch.zeros(shape, dtype=fixed.dtype, device=fixed.device)
        disp[:, 0] = cfg.shift
        if self.fault == "short":
            disp = disp[..., :-2]
        if self.fault == "grad":
            disp.requires_grad_(True)
        if self.fault == "raise":
            raise RuntimeError("the plug-in exploded")
        return RegistrationResult(disp, disp.detach().clone(), torch.ones((fixed.shape[0], 1) + (1,) * (fixed.dim() - 2)),
                                  moving, [], 0.0, cfg, {})


PLAIN, SHORT, GRAD, BOOM = Plain(), Plain("short", fault="short"), Plain("grad", fault="grad"), Plain("boom", fault="raise")


@pytest.fixture
def plugins(monkeypatch):
    """The installed entry points plus this module's plug-ins (as if a package declared them)."""
    real = solvers.entry_points

    def extra(**kw):
        group = kw.get("group")
        eps = list(real(group=group))
        if group == solvers.ENTRY_POINT_GROUP:
            eps += [EntryPoint(n, f"test_plugins:{v}", group) for n, v in
                    (("plain", "PLAIN"), ("short", "SHORT"), ("grad", "GRAD"), ("boom", "BOOM"), ("plain-class", "Plain"),
                     ("instance", "PLAIN"))]  # a plug-in that takes a built-in solver's name
            eps.append(EntryPoint("broken", "no_such_module_here:SOLVER", group))
        return eps

    monkeypatch.setattr(solvers, "entry_points", extra)


def test_load_failures_and_name_clashes_are_one_line_naming_the_plugin(plugins):
    assert get_solver("plain") is PLAIN
    for name, match in (("broken", r"`--solver` 'broken': its entry point no_such_module_here:SOLVER failed to load:"
                                   r" ModuleNotFoundError"),
                        ("plain-class", r"is not a hybridreg.solvers.Solver \(it is a class: register an instance of it\)"),
                        ("instance", r"`--solver` 'instance' is registered by more than one installed package")):
        with pytest.raises(ValueError, match=match):
            get_solver(name)


def test_a_plugin_registers_through_the_cli_and_its_broken_results_are_refused(plugins, tmp_path, capsys):
    """A config without `progress` failed every command (TypeError, exit 1); a displacement off
    FIXED's grid was blamed on the label maps; one with an autograd graph failed at numpy()."""
    import json

    from hybridreg import data
    from hybridreg.cli import main

    f, m = data.load_subject("vxm"), data.load_subject("synthseg_16")
    common = [str(f.image_path), str(m.image_path), "--fixed-labels", str(f.labels_path), "--moving-labels",
              str(m.labels_path), "--affine", "none", "--outputs", "metrics", "--no-progress"]
    assert main(["register", *common, "--solver", "plain", "--set", "shift=0.5", "--out", str(tmp_path / "p")]) == 0
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["solver"] == "plain" and metrics["config"] == {"shift": 0.5}
    for name, match in (("short", "--solver short returned a displacement of shape (1, 3, 112, 96, 78): it must be"
                                  " (1, 3, 112, 96, 80)"),
                        ("grad", "--solver grad returned `displacement` with an autograd graph")):
        capsys.readouterr()
        assert main(["register", *common, "--solver", name, "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / name).exists()


def test_the_benchmarks_run_an_installed_plugin(plugins):
    from benchmarks.methods import plugin_methods

    methods = plugin_methods()
    assert {"plain", "short", "grad"} <= set(methods) and "learned" not in methods
    assert methods["plain"].solver == "plain" and "installed solver" in methods["plain"].label


def test_a_plugins_crash_in_batch_keeps_its_traceback(plugins, tmp_path):
    """`failed/<id>.json` held the error's one line only; `register` writes the traceback to a log."""
    import json

    from hybridreg import data
    from hybridreg.cli import main

    f, m = data.load_subject("vxm"), data.load_subject("synthseg_16")
    (tmp_path / "pairs.csv").write_text(f"fixed,moving,id\n{f.image_path},{m.image_path},p16\n")
    assert main(["batch", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "o"), "--solver", "boom", "--affine", "none",
                 "--no-progress"]) == 3
    failed = json.loads((tmp_path / "o" / "failed" / "p16.json").read_text())
    assert failed["error"] == "RuntimeError: the plug-in exploded" and 'raise RuntimeError("the plug-in exploded")' in failed["traceback"]
