"""What every benchmark shares: the one child-process protocol (:func:`run_child`), the one
environment stamp (:func:`environment`, from :mod:`hybridreg.provenance`), the one figure writer (:func:`save_figure`) and peak
memory."""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from hybridreg import provenance
from hybridreg.provenance import LIBRARIES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


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


def processor(row: dict) -> str:
    """Where a suite row's seconds were measured: ``GPU <name>`` for a row run on a GPU, else its
    CPU (``"not recorded"`` for rows from before the CPU was recorded)."""
    return f"GPU {row['gpu']}" if row.get("gpu") else row.get("cpu") or "not recorded"


def environment() -> dict:
    """Hardware, library versions and commit to stamp a report with
    (:func:`hybridreg.provenance.environment`, the commit of this checkout)."""
    return provenance.environment(root=ROOT)


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


def save_figure(fig, path: str | os.PathLike, *, layout: bool = True) -> None:
    """Write a :class:`matplotlib.figure.Figure` atomically (the format follows the suffix), laid
    out by ``tight_layout`` first unless ``layout`` is false (a figure whose annotations were
    placed on its final layout)."""
    from hybridreg.config import atomic_output

    if layout:
        fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
