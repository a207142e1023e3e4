"""Helpers shared by the benchmarks: the environment stamp of a report and peak memory."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import subprocess
import sys

LIBRARIES = ("torch", "numpy", "SimpleITK", "botorch", "gpytorch", "optuna", "pykeops", "monai", "antspyx")


def rss_mb() -> float:
    """Peak resident set size of this process (MB; Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Hardware and library versions to stamp a report with."""
    import torch

    env = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "python": platform.python_version(), "os": platform.platform()}
    for lib in LIBRARIES:
        try:
            env[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            env[lib] = None
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    return env


def environment_markdown(env: dict) -> str:
    """One line per stamp entry, for the head of a report."""
    hw = f"{env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads" + (f", GPU {env['gpu']}" if env.get("gpu") else ", no GPU")
    libs = ", ".join(f"{k} {env[k]}" for k in LIBRARIES if env.get(k))
    return f"- Hardware: {hw}\n- Software: Python {env['python']}, {libs} ({env['os']})\n- Commit: {env.get('git')}\n"


def run_python(args: list[str], cwd: str | None = None) -> str:
    """Run ``python args...`` in a fresh process (its own peak RSS); returns stdout.

    Raises:
        RuntimeError: the process failed (its stderr tail is in the message).
    """
    p = subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed:\n{p.stderr[-3000:]}")
    return p.stdout
