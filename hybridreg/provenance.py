"""What a result came from: the command, the code and library versions, the machine and the
input files' bytes (``metrics.json``'s ``provenance``; the benchmark reports' environment stamp).

A rerun gives the same result bit for bit only with the same inputs, code, library versions,
thread count and device (``docs/conventions.md``); this records each of them, so that two
results can be told apart and a result can be repeated.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["COMMAND", "LIBRARIES", "cpu_name", "environment", "files_record", "git_revision", "gpu_name", "record",
           "weights_file"]

LIBRARIES = ("torch", "numpy", "SimpleITK", "botorch", "gpytorch", "optuna", "pykeops", "monai", "antspyx")
"""The libraries whose versions a stamp records (``None`` for one not installed)."""
COMMAND: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("command", default=None)
"""The ``hybridreg`` command line running now (``("hybridreg", "register", ...)``), set by the
CLI for the command's duration; ``None`` for a call through the Python API."""
SOURCE = Path(__file__).resolve().parents[1]
"""The folder holding the ``hybridreg`` package: a git checkout when installed from one (editable)."""


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


def gpu_name(device: str | None = None) -> str | None:
    """The name of the GPU ``device`` is (default: the first visible GPU), ``None`` for the CPU
    or when no GPU is visible."""
    import torch

    if device is None:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def git_revision(root: str | os.PathLike) -> str | None:
    """The commit of the git checkout holding ``root`` (any folder in it), with ``-dirty`` when a
    tracked file outside ``benchmarks/results`` differs from it (uncommitted code ran; the
    reports, rows and figures that a benchmark run itself rewrites there do not count). ``None``
    outside a git checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=10).stdout.strip()

    try:
        commit = git("describe", "--always")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if changed else "")) if commit else None


def environment(device: str | None = None, root: str | os.PathLike = SOURCE) -> dict:
    """Hardware, library versions and commit: ``{"cpu", "cores", "torch_threads", "gpu", "python",
    "os", <each of LIBRARIES>, "hybridreg", "git"}``; ``gpu``: ``device``'s (default the first
    visible one); ``git``: :func:`git_revision` of ``root`` where it is the top of a checkout
    (default hybridreg's own folder: an editable install's checkout). Gathered once per process
    for each (device, root, thread count): a batch's pairs do not read /proc and run git each."""
    import torch

    return dict(_environment(device, str(root), torch.get_num_threads()))


@functools.lru_cache(maxsize=None)
def _environment(device: str | None, root: str, threads: int) -> dict:
    from . import __version__

    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": threads,
           "gpu": gpu_name(device), "python": platform.python_version(), "os": platform.platform()}
    for lib in LIBRARIES:
        try:
            env[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            env[lib] = None
    env["hybridreg"] = __version__
    # the commit of hybridreg's own checkout (an editable install); an installed package is its version, not the
    # commit of whatever repository its site-packages lie in (a venv inside a project)
    env["git"] = git_revision(root) if (Path(root) / ".git").exists() else None
    return env


def files_record(paths: dict[str, str | os.PathLike | None]) -> dict[str, dict]:
    """``{role: {"path": absolute path, "sha256": hex digest}}`` of each file given (``None``
    skipped). A DICOM series (a folder, or one file of a series: :func:`hybridreg.io.dicom_series_files`,
    the files that were read) adds ``"files"``, their number, and its ``sha256`` is that of their
    digests in the order read.

    Raises ``OSError`` if a file cannot be read."""
    import hashlib

    from .io import IMAGE_SUFFIXES, dicom_series_files, file_sha256, is_dicom

    out = {}
    for role, p in paths.items():
        if p is None or p == "":
            continue
        p = Path(p).resolve()
        if p.is_dir() or (not p.name.lower().endswith(IMAGE_SUFFIXES) and is_dicom(p)):
            files = dicom_series_files(p, role)
            digest = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
            out[role] = {"path": str(p), "files": len(files), "sha256": digest}
        else:
            out[role] = {"path": str(p), "sha256": file_sha256(p)}
    return out


def weights_file(config) -> str | None:
    """The weights file a solver config runs with: its ``weights``, else its class's
    ``default_weights`` (the shipped file an empty ``weights`` means); ``None`` for a config
    without weights (the instance solver's)."""
    w = getattr(config, "weights", None) or getattr(config, "default_weights", None)
    return None if w is None else str(w)


def record(paths: dict[str, str | os.PathLike | None], device: str | None = None) -> dict:
    """``metrics.json``'s ``provenance``: ``command`` (:data:`COMMAND`, the ``hybridreg`` command
    line, with the options that ``config.yaml`` does not hold: the affine stage, masks, label
    maps, landmarks; ``None`` through the Python API), :func:`environment` and
    :func:`files_record` of ``paths`` (the inputs and a learned solver's weights)."""
    command = COMMAND.get()
    return {"command": None if command is None else list(command), **environment(device), "files": files_record(paths)}
