"""The register service (application layer): two image files → a solver → metrics → files.

One registration, step by step, each a function of its own:

1. :func:`solver_and_config` -- find the solver by name (:func:`hybridreg.solvers.get_solver`,
   entry points) and build its typed config (``--config`` YAML or the solver's defaults).
2. :func:`read_inputs` -- read and check images and label maps (:mod:`hybridreg.io`).
3. :func:`solve` -- normalise intensities and :func:`run_solver`: ``solver.register_pair`` on
   the device, timed, a diverged result refused (:func:`hybridreg.solvers.divergence`).
4. :func:`measure` -- metrics of the result (:func:`hybridreg.metrics.score_registration`).
5. :func:`write_outputs` -- every output file, staged next to ``--out`` and moved into place
   at the end, so a failed run leaves nothing half-written.

:func:`register_files` runs the five after :func:`check_outputs` (nothing the user has is
lost); the CLI (``hybridreg register`` / ``demo``) calls it, the tuning objectives and the
benchmarks call :func:`run_solver`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__
from .config import atomic_write_text, dump_yaml, load_yaml, to_dict
from .io import Geometry, check_same_grid, normalize_intensity, read_image, read_labels, write_displacement, write_image
from .metrics import LabelPolicy, jacobian_stats, score_dice, score_registration, scored_labels
from .solvers import DivergenceError, RegistrationResult, Solver, divergence, get_solver
from .spatial import jacobian_determinant, warp

__all__ = ["OUTPUT_FILES", "Inputs", "Solved", "solver_and_config", "device_of", "output_folder", "check_outputs",
           "read_inputs", "run_solver", "solve", "measure", "json_safe", "write_outputs", "register_files"]

OUTPUT_FILES = ("warped.nii.gz", "displacement.nii.gz", "lambda.nii.gz", "jacobian.nii.gz", "metrics.json", "figure.png",
                "config.yaml")


@dataclass
class Inputs:
    """A checked pair read from files (arrays in SimpleITK array order, on the fixed grid).

    Attributes:
        fixed, moving: float32 intensity arrays. geometry: the fixed grid (ITK, LPS, mm).
        fixed_labels, moving_labels: int label maps or ``None``. labels: the labels scored.
        paths: the input paths as given (for ``metrics.json``).
    """

    fixed: np.ndarray
    moving: np.ndarray
    geometry: Geometry
    fixed_labels: np.ndarray | None
    moving_labels: np.ndarray | None
    labels: tuple[int, ...]
    paths: dict[str, str | None]


@dataclass
class Solved:
    """A solver's result with its cost: ``seconds`` of ``register_pair``, ``peak_memory_mb``,
    and the solver configuration it ran with (written to ``config.yaml``)."""

    result: RegistrationResult
    seconds: float
    peak_memory_mb: float
    device: torch.device
    config: Any


def solver_and_config(name: str, config: str | os.PathLike | None = None, weights: str | None = None,
                      progress: bool = True) -> tuple[Solver, Any]:
    """The solver registered as ``name`` and its config: ``config`` (YAML of
    ``solver.config_class``) or the solver's defaults, with ``weights`` (learned solvers) and
    ``progress`` set, and the fields the solver name fixes (:meth:`Solver.configure`).

    Raises:
        ValueError: unknown solver, invalid config, ``weights`` for a solver without weights.
        FileNotFoundError: a missing ``config`` or ``weights`` file.
    """
    solver = get_solver(name)
    cfg = load_yaml(config, solver.config_class, arg="--config") if config else solver.default_config()
    if weights is not None:
        if not hasattr(cfg, "weights"):
            raise ValueError(f"`--weights` applies to the learned solvers, not to --solver {name}")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"`--weights`: file not found: {weights}")
        cfg = replace(cfg, weights=str(weights))
    return solver, solver.configure(replace(cfg, progress=progress))


def device_of(device: str | None) -> torch.device:
    """``--device`` as a torch device (default CPU).

    Raises:
        ValueError: not ``cpu``, ``cuda`` or ``cuda:N`` (``meta``, ``mps`` ... are refused),
            CUDA unavailable, or no GPU ``N``.
    """
    try:
        dev = torch.device(device) if device else torch.device("cpu")
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"`--device`: invalid device {device!r} (use cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device`: CUDA was requested but torch.cuda.is_available() is False")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"`--device`: {device!r} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    return dev


def output_folder(out: str | os.PathLike) -> Path:
    """``--out`` as a folder path: not an empty string, not an existing file, not below one.

    Raises:
        ValueError: naming ``--out``.
    """
    if not str(out).strip():
        raise ValueError("`--out` must name a folder, got an empty string")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`--out` exists and is not a folder: {out}")
    for q in out.parents:
        if q.exists() and not q.is_dir():
            raise ValueError(f"`--out` {out}: {q} is a file, not a folder")
    return out


def check_outputs(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *, overwrite: bool = False,
                  names: tuple[str, ...] = OUTPUT_FILES, needed_bytes: int = 0) -> Path:
    """Refuse, before any work, an output folder that would lose something.

    Args:
        out: the ``--out`` folder. inputs: ``{argument name: path}`` of every input file.
        overwrite: allow replacing the files ``names`` of an earlier run in ``out``.
        names: the files the command writes into ``out``.
        needed_bytes: a rough size of the outputs, checked against the free disk space.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: ``out`` empty or an existing file; an input among the outputs (always,
            even with ``overwrite``); earlier results in ``out`` without ``overwrite``; not
            enough free disk space. Each message names the argument.
    """
    out = output_folder(out)
    targets = {(out / n).resolve() for n in names}
    for arg, path in inputs.items():
        if path is not None and Path(path).resolve() in targets:
            raise ValueError(f"`{arg}` is {path}, which `--out` {out} would overwrite; choose another --out")
    earlier = [n for n in names if (out / n).exists()]
    if earlier and not overwrite:
        raise ValueError(f"`--out` {out} already holds results of an earlier run ({', '.join(earlier)});"
                         " pass --overwrite to replace them or choose a new --out")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes:
        raise ValueError(f"`--out`: {free / 2**20:.0f} MB free on the disk of {parent}, the outputs need about"
                         f" {needed_bytes / 2**20:.0f} MB")
    return out


def read_inputs(fixed: str | os.PathLike, moving: str | os.PathLike, fixed_labels: str | os.PathLike | None = None,
                moving_labels: str | os.PathLike | None = None, eval_labels: LabelPolicy = "auto") -> Inputs:
    """Read and check a pair (same grid; non-constant images; label maps on the fixed grid).

    Args:
        eval_labels: label policy of :func:`hybridreg.metrics.scored_labels`, or the CLI's
            ``--eval-labels`` string (``auto``, ``all`` or ``2,3,...``).

    Raises:
        FileNotFoundError, ValueError: missing or corrupt files, mismatched grids, NaN/Inf,
            labels given for one image only or sharing no label; each names its argument.
    """
    f_arr, f_geo = read_image(fixed, arg="FIXED")
    m_arr, m_geo = read_image(moving, arg="MOVING")
    check_same_grid(f_geo, m_geo, ("FIXED", "MOVING"))
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("`--fixed-labels` and `--moving-labels` must be given together")
    fl = ml = None
    labels: tuple[int, ...] = ()
    if fixed_labels is not None:
        fl, fl_geo = read_labels(fixed_labels, arg="--fixed-labels")
        ml, ml_geo = read_labels(moving_labels, arg="--moving-labels")
        check_same_grid(f_geo, fl_geo, ("FIXED", "--fixed-labels"))
        check_same_grid(f_geo, ml_geo, ("FIXED", "--moving-labels"))
        if isinstance(eval_labels, str) and eval_labels not in ("auto", "all"):
            try:
                eval_labels = [int(t) for t in eval_labels.split(",")]
            except ValueError:
                raise ValueError(f"`--eval-labels` must be 'auto', 'all' or comma-separated ints, got {eval_labels!r}") from None
        try:
            labels = scored_labels(fl, ml, eval_labels)
        except ValueError as e:
            raise ValueError(f"`--eval-labels` / `--fixed-labels` / `--moving-labels`: {e}") from None
    for name, arr in (("FIXED", f_arr), ("MOVING", m_arr)):
        if float(arr.max()) == float(arr.min()):
            raise ValueError(f"`{name}` is constant: there is nothing to register")
    paths = {"fixed": str(fixed), "moving": str(moving), "fixed_labels": str(fixed_labels) if fixed_labels else None,
             "moving_labels": str(moving_labels) if moving_labels else None}
    return Inputs(f_arr, m_arr, f_geo, fl, ml, labels, paths)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_solver(solver: Solver, config: Any, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float],
               device: torch.device | None = None) -> Solved:
    """Run ``solver.register_pair`` on tensors, time it, and refuse a diverged result: the one
    place every caller (the CLI through :func:`solve`, the tuning objectives, the benchmarks)
    registers a pair.

    Args:
        fixed, moving: ``(B, C, *spatial)`` images, intensities about [0, 1].
        spacing: voxel size in mm per tensor axis. device: default the inputs' device.

    Raises:
        DivergenceError: the solver diverged or collapsed (:func:`hybridreg.solvers.divergence`);
            the message names the likely cause.
    """
    dev = torch.device(device) if device is not None else fixed.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    result = solver.register_pair(fixed, moving, config, spacing=spacing, device=dev)
    seconds = time.perf_counter() - t0
    why = divergence(result)
    if why:
        raise DivergenceError(f"--solver {solver.name} diverged: {why}")
    return Solved(result, seconds, _peak_memory_mb(dev), dev, config)


def solve(inputs: Inputs, solver: Solver, config: Any, device: torch.device) -> Solved:
    """Normalise both images (:func:`hybridreg.io.normalize_intensity`) and :func:`run_solver`
    on ``device`` with the fixed grid's spacing (array order, mm)."""
    f_t = torch.from_numpy(normalize_intensity(inputs.fixed))[None, None]
    m_t = torch.from_numpy(normalize_intensity(inputs.moving))[None, None]
    return run_solver(solver, config, f_t, m_t, inputs.geometry.array_spacing, device)


def measure(inputs: Inputs, solved: Solved, solver_name: str, *, with_hd95: bool = True) -> dict:
    """The ``metrics.json`` dictionary: inputs, Jacobian statistics, λ statistics, seconds,
    peak memory, every stage's history, the config, and (with labels) Dice before/after per
    label and HD95 (mm)."""
    res, dev = solved.result, solved.device
    disp = res.displacement.detach()
    lam = res.lambda_on_image_grid()[0, 0].cpu().numpy()
    metrics: dict = {
        "hybridreg_version": __version__,
        "solver": solver_name,
        "device": str(dev),
        "inputs": {**inputs.paths, "grid": inputs.geometry.to_dict()},
        "jacobian_method": "central differences (torch.gradient), whole image grid",
        "lambda": {"mean": float(lam.mean()), "std": float(lam.std()), "min": float(lam.min()), "max": float(lam.max())},
        "seconds": {"registration": solved.seconds},
        "peak_memory_mb": solved.peak_memory_mb,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "process peak RSS (ru_maxrss)",
        "levels": [
            {"spacing_mm": list(h.spacing), "shape": list(h.shape), "control_shape": list(h.control_shape),
             "iterations": h.iterations, "status": h.status, "seconds": h.seconds,
             "final_total": h.terms["total"][-1] if h.terms.get("total") else None}
            for h in res.history
        ],
        "final_terms": res.final_terms,
        "config": to_dict(solved.config),
    }
    t0 = time.perf_counter()
    if inputs.fixed_labels is None:
        metrics.update(jacobian_stats(disp))
    else:
        s = score_registration(inputs.fixed_labels, inputs.moving_labels, disp, list(inputs.labels),
                               spacing=inputs.geometry.array_spacing, with_hd95=with_hd95)
        metrics.update({k: s[k] for k in ("folding_percent", "sdlogj", "jacobian_min", "jacobian_max")})
        inside = lam[inputs.fixed_labels > 0]
        metrics["lambda"].update({"mean_inside_fixed_labels": float(inside.mean()), "std_inside_fixed_labels": float(inside.std())})
        before = score_dice(inputs.fixed_labels, inputs.moving_labels, policy=list(inputs.labels))
        metrics["labels_scored"] = list(inputs.labels)
        metrics["dice_before"] = {"mean": before["mean"], "per_label": {str(k): v for k, v in before["per_label"].items()}}
        metrics["dice_after"] = {"mean": s["dice_mean"], "per_label": {str(k): v for k, v in s["dice"].items()}}
        if with_hd95:
            metrics["hd95_mm_after"] = {"mean": s["hd95_mean"], "per_label": {str(k): v for k, v in s["hd95"].items()}}
    metrics["seconds"]["metrics"] = time.perf_counter() - t0
    return metrics


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON ``null``): a metric that
    cannot be computed (e.g. HD95 of a structure missing after warping) is never a NaN number."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_outputs(out: str | os.PathLike, inputs: Inputs, solved: Solved, metrics: dict) -> None:
    """Write :data:`OUTPUT_FILES` into ``out``: staged in a sibling folder, moved into place
    only when all are written (a failure leaves ``out`` as it was).

    Files: ``warped.nii.gz`` (MOVING resampled onto the fixed grid, linear),
    ``displacement.nii.gz`` (ITK displacement field, mm, LPS, fixed grid), ``lambda.nii.gz``,
    ``jacobian.nii.gz`` (det J of φ), ``metrics.json``, ``figure.png``, ``config.yaml``.

    Raises:
        OSError: the file system refused (the staging folder is removed, ``out`` untouched).
    """
    out = Path(out)
    t0 = time.perf_counter()
    res, geo = solved.result, inputs.geometry
    disp = res.displacement.detach()
    disp_np = disp[0].cpu().numpy()
    warped = warp(torch.from_numpy(inputs.moving)[None, None].to(solved.device), disp)[0, 0].cpu().numpy()
    lam = res.lambda_on_image_grid()[0, 0].cpu().numpy()
    jac = jacobian_determinant(disp)[0].cpu().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        write_image(stage / "warped.nii.gz", warped, geo)
        write_displacement(stage / "displacement.nii.gz", disp_np, geo)
        write_image(stage / "lambda.nii.gz", lam, geo)
        write_image(stage / "jacobian.nii.gz", jac, geo)
        from .figures import registration_figure

        title = f"{Path(inputs.paths['moving']).name} → {Path(inputs.paths['fixed']).name}"
        if "dice_after" in metrics:
            title += f"   Dice {metrics['dice_before']['mean']:.3f} → {metrics['dice_after']['mean']:.3f}"
        registration_figure(stage / "figure.png", normalize_intensity(inputs.fixed), normalize_intensity(inputs.moving),
                            normalize_intensity(warped), lam, disp_np, jac, geo.array_spacing, title=title)
        dump_yaml(solved.config, stage / "config.yaml")
        metrics["seconds"]["writing"] = time.perf_counter() - t0
        metrics["seconds"]["total"] = metrics["seconds"].get("total", 0.0) + time.perf_counter() - t0
        atomic_write_text(stage / "metrics.json", json.dumps(json_safe(metrics), indent=2, allow_nan=False))
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_FILES:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def register_files(fixed: str | os.PathLike, moving: str | os.PathLike, out: str | os.PathLike, *,
                   fixed_labels: str | os.PathLike | None = None, moving_labels: str | os.PathLike | None = None,
                   config: str | os.PathLike | None = None, device: str | None = None, solver: str = "instance",
                   weights: str | None = None, eval_labels: LabelPolicy = "auto", progress: bool = True,
                   hd95_metric: bool = True, overwrite: bool = False) -> dict:
    """Register two image files and write every output into ``out`` (:func:`write_outputs`).

    Returns:
        The metrics dictionary written to ``metrics.json``.

    Raises:
        FileNotFoundError, ValueError: missing/corrupt files, mismatched grids, NaNs, labels
        with nothing in common, invalid configs, unknown solver or device, an ``out`` that
        would lose an input or (without ``overwrite``) an earlier result. Nothing is written then.
    """
    t0 = time.perf_counter()
    solver_obj, cfg = solver_and_config(solver, config, weights, progress)
    dev = device_of(device)
    given = {"FIXED": fixed, "MOVING": moving, "--fixed-labels": fixed_labels, "--moving-labels": moving_labels,
             "--config": config, "--weights": weights}
    check_outputs(out, given, overwrite=overwrite)
    inputs = read_inputs(fixed, moving, fixed_labels, moving_labels, eval_labels)
    # warped, λ, det J (float32) and the displacement (d float32) uncompressed, twice for the staging copy
    check_outputs(out, given, overwrite=overwrite, needed_bytes=2 * 4 * (3 + inputs.fixed.ndim) * inputs.fixed.size)
    solved = solve(inputs, solver_obj, cfg, dev)
    metrics = measure(inputs, solved, solver, with_hd95=hd95_metric)
    metrics["seconds"]["total"] = time.perf_counter() - t0
    write_outputs(out, inputs, solved, metrics)
    return metrics
