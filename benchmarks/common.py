"""What every benchmark shares: the one child-process protocol (:func:`run_child`), the one
environment stamp (:func:`environment`), the one figure writer (:func:`save_figure`) and peak
memory."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LIBRARIES = ("torch", "numpy", "SimpleITK", "botorch", "gpytorch", "optuna", "pykeops", "monai", "antspyx")


def rss_mb() -> float:
    """Peak resident set size of this process (MB; Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def warm_up_torch() -> None:
    """Load what PyTorch loads on first use, before a torch solver's clock starts (as the
    classical tools' modules are loaded before theirs): ``torch.optim`` imports
    ``torch._dynamo`` when the first optimizer is made (about 1.1 s, once per process, on the
    2-core machine), which was counted in the first registration of each process."""
    import torch

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def warm_up_device(solver: str, device: str, config=None) -> None:
    """On a GPU, run ``solver`` (with ``config``, default its defaults: the run's own, so that
    its weights are loaded here) once on a small random pair (64³, 1 mm) before the timed runs:
    the first registration of a process also pays for CUDA's start-up (context, libraries,
    kernels loaded on first use: 7 s of the first 1 mm pair's 9 s on an H200), which is not the
    cost of a pair. Nothing on a CPU (:func:`warm_up_torch` is the CPU's)."""
    import torch

    if torch.device(device).type == "cpu":
        return

    from hybridreg.service import run_solver, solver_and_config

    obj, cfg = solver_and_config(solver, progress=False)
    cfg = cfg if config is None else config
    gen = torch.Generator().manual_seed(0)
    f, m = (torch.rand(1, 1, 64, 64, 64, generator=gen) for _ in range(2))
    run_solver(obj, cfg, f, m, (1.0, 1.0, 1.0), torch.device(device))


def run_child(target: str, **kwargs) -> dict:
    """Call ``target`` (``"module:function"``) with the JSON-able ``kwargs`` in a fresh Python
    process (so its peak RSS and its timings belong to that call alone) and return its
    JSON-able result.

    Raises:
        RuntimeError: the process failed (its stderr tail is in the message).
    """
    code = "import sys; from benchmarks.common import _child; _child(*sys.argv[1:])"
    p = subprocess.run([sys.executable, "-c", code, target, json.dumps(kwargs)], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{target}({kwargs}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _child(target: str, kwargs: str) -> None:
    module, name = target.split(":")
    print(json.dumps(getattr(importlib.import_module(module), name)(**json.loads(kwargs))))


def cpu_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name with its family and model numbers (the first processor of ``cpuinfo``;
    else what :mod:`platform` reports). A virtual machine may name only the brand: "AMD EPYC" was a
    Zen 1 part (family 23, model 1) at stop 49 and a faster one before, on which the same
    registration took a third of the time, so the name alone does not tell whether two rows'
    seconds compare."""
    info: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block ends
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if not info.get("model name"):
        return platform.processor() or platform.machine()
    numbers = [f"{label} {info[key]}" for key, label in (("cpu family", "family"), ("model", "model")) if info.get(key)]
    return info["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


def processor(row: dict) -> str:
    """Where a suite row's seconds were measured: ``GPU <name>`` for a row run on a GPU, else its
    CPU (``"not recorded"`` for rows from before the CPU was recorded)."""
    return f"GPU {row['gpu']}" if row.get("gpu") else row.get("cpu") or "not recorded"


def gpu_name(device: str | None = None) -> str | None:
    """The name of the GPU ``device`` is (default: the first visible GPU), ``None`` for the CPU
    or when no GPU is visible."""
    import torch

    if device is None:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def environment() -> dict:
    """Hardware, library versions and commit to stamp a report with."""
    import torch

    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "gpu": gpu_name(),
           "python": platform.python_version(), "os": platform.platform()}
    for lib in LIBRARIES:
        try:
            env[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            env[lib] = None
    env["git"] = git_revision(ROOT)
    return env


def git_revision(root: Path) -> str | None:
    """The commit ``root``'s checkout is at, with ``-dirty`` when a tracked file outside
    ``benchmarks/results`` differs from it (uncommitted code ran); the reports, rows and figures
    that a run itself rewrites there do not count. ``None`` outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=10).stdout.strip()

    try:
        commit = git("describe", "--always")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if changed else "")) if commit else None


def environment_markdown(env: dict | None) -> str:
    """The stamp as report lines (a stamp of another form is listed as it is)."""
    if not env or "cpu" not in env:
        return "- Environment: " + (", ".join(f"{k} {v}" for k, v in (env or {}).items()) or "not recorded") + "\n"
    hw = f"{env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads" + (f", GPU {env['gpu']}" if env.get("gpu") else ", no GPU")
    libs = ", ".join(f"{k} {env[k]}" for k in LIBRARIES if env.get(k))
    return f"- Hardware: {hw}\n- Software: Python {env['python']}, {libs} ({env['os']})\n- Commit: {env.get('git')}\n"


def shown(path: str | os.PathLike) -> str:
    """``path`` relative to the repository (or the working directory) when it lies inside."""
    p = Path(path).resolve()
    for base in (ROOT, Path.cwd()):
        if p.is_relative_to(base):
            return str(p.relative_to(base))
    return str(path)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a :class:`matplotlib.figure.Figure` atomically (the format follows the suffix)."""
    from hybridreg.config import atomic_output

    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
