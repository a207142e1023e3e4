"""Command-line interface: ``hybridreg register | apply | demo``.

The CLI is the application layer: it reads files, runs a solver, writes results. The
model modules (:mod:`hybridreg.spatial`, ``objective`` ...) never import a solver; the
CLI looks its solver up by name in :data:`SOLVERS` and imports it only when it runs.

Every input is validated before anything is written; outputs are written into a staging
folder next to ``--out`` and moved into place at the end, so a failed run leaves no
partial output in ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import __version__
from .config import atomic_write_text, dump_yaml, load_yaml, to_dict
from .io import (
    Geometry,
    check_same_grid,
    normalize_intensity,
    read_displacement,
    read_image,
    read_labels,
    resample_with_field,
    write_displacement,
    write_image,
)
from .metrics import common_labels, dice, hd95, jacobian_stats
from .spatial import jacobian_determinant, warp

__all__ = ["main", "register_files", "SOLVERS", "normalize_intensity"]

SOLVERS = {
    "instance": ("instance_opt", "InstanceOptConfig", {}),
    "learned": ("learned.solver", "LearnedConfig", {"refine": False}),
    "learned+refine": ("learned.solver", "LearnedConfig", {"refine": True}),
}
"""Solver name → (module providing ``register_pair``, its config class, fixed config fields)."""

OUTPUT_FILES = ("warped.nii.gz", "displacement.nii.gz", "lambda.nii.gz", "jacobian.nii.gz", "metrics.json", "figure.png", "config.yaml")


class CLIError(Exception):
    """An error the CLI reports in one line (bad input, bad config)."""


def _solver(name: str, config: str | os.PathLike | None, weights: str | None, progress: bool):
    """Import solver ``name`` and build its config (from ``--config`` YAML if given)."""
    if name not in SOLVERS:
        raise CLIError(f"`--solver` must be one of {sorted(SOLVERS)}, got {name!r}")
    module, cls_name, fixed = SOLVERS[name]
    mod = importlib.import_module(module)
    cls = getattr(mod, cls_name)
    cfg = load_yaml(config, cls, arg="--config") if config else cls()
    if weights is not None:
        if not hasattr(cfg, "weights"):
            raise CLIError(f"`--weights` applies to the learned solvers, not to --solver {name}")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"`--weights`: file not found: {weights}")
        fixed = {**fixed, "weights": str(weights)}
    return mod, replace(cfg, progress=progress, **fixed)


def _device(device: str | None) -> torch.device:
    try:
        dev = torch.device(device) if device else torch.device("cpu")
    except RuntimeError:
        raise CLIError(f"`--device`: invalid device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("`--device`: CUDA was requested but torch.cuda.is_available() is False")
    return dev


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _eval_label_set(spec: str | None, fixed_labels: np.ndarray, moving_labels: np.ndarray) -> tuple[int, ...]:
    common = common_labels(fixed_labels, moving_labels)
    if not common:
        raise CLIError("`--fixed-labels` and `--moving-labels` share no non-zero label: nothing to score")
    if spec in (None, "auto"):
        from .data import evaluation_labels_in

        standard = evaluation_labels_in(common)
        return tuple(standard) if len(standard) >= 20 else common
    if spec == "all":
        return common
    try:
        chosen = tuple(int(t) for t in spec.split(","))
    except ValueError:
        raise CLIError(f"`--eval-labels` must be 'auto', 'all' or comma-separated ints, got {spec!r}") from None
    missing = [lab for lab in chosen if lab not in common]
    if missing:
        raise CLIError(f"`--eval-labels`: labels {missing} are not present in both label maps")
    return chosen


def _summary(d: dict[int, float]) -> dict:
    vals = [v for v in d.values() if np.isfinite(v)]
    return {"mean": float(np.mean(vals)) if vals else float("nan"), "per_label": {str(k): v for k, v in d.items()}}


def register_files(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fixed_labels: str | os.PathLike | None = None,
    moving_labels: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    device: str | None = None,
    solver: str = "instance",
    weights: str | None = None,
    eval_labels: str | None = None,
    progress: bool = True,
    hd95_metric: bool = True,
) -> dict:
    """Register two image files and write every output into ``out``.

    Writes ``warped.nii.gz`` (moving resampled onto the fixed grid), ``displacement.nii.gz``
    (ITK displacement field, mm, LPS, on the fixed grid), ``lambda.nii.gz``,
    ``jacobian.nii.gz`` (det J of φ), ``metrics.json``, ``figure.png`` and ``config.yaml``.

    Returns:
        The metrics dictionary written to ``metrics.json``.

    Raises:
        FileNotFoundError, ValueError, CLIError: missing/corrupt files, mismatched grids,
        NaNs, labels with nothing in common, invalid configs. Nothing is written then.
    """
    t_total = time.perf_counter()
    mod, cfg = _solver(solver, config, weights, progress)
    dev = _device(device)

    f_arr, f_geo = read_image(fixed, arg="FIXED")
    m_arr, m_geo = read_image(moving, arg="MOVING")
    check_same_grid(f_geo, m_geo, ("FIXED", "MOVING"))
    if (fixed_labels is None) != (moving_labels is None):
        raise CLIError("`--fixed-labels` and `--moving-labels` must be given together")
    fl = ml = None
    labels_to_score: tuple[int, ...] = ()
    if fixed_labels is not None:
        fl, fl_geo = read_labels(fixed_labels, arg="--fixed-labels")
        ml, ml_geo = read_labels(moving_labels, arg="--moving-labels")
        check_same_grid(f_geo, fl_geo, ("FIXED", "--fixed-labels"))
        check_same_grid(f_geo, ml_geo, ("FIXED", "--moving-labels"))
        labels_to_score = _eval_label_set(eval_labels, fl, ml)
    for name, arr in (("FIXED", f_arr), ("MOVING", m_arr)):
        if float(arr.max()) == float(arr.min()):
            raise CLIError(f"`{name}` is constant: there is nothing to register")

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"`--out` exists and is not a folder: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        spacing = f_geo.array_spacing
        f_t = torch.from_numpy(normalize_intensity(f_arr))[None, None]
        m_t = torch.from_numpy(normalize_intensity(m_arr))[None, None]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        result = mod.register_pair(f_t, m_t, cfg, spacing=spacing, device=dev)
        seconds = time.perf_counter() - t0
        peak = _peak_memory_mb(dev)

        disp = result.displacement.detach()
        disp_np = disp[0].cpu().numpy()
        warped_t = warp(torch.from_numpy(m_arr)[None, None].to(dev), disp)[0, 0].cpu().numpy()
        lam_np = result.lambda_on_image_grid()[0, 0].cpu().numpy()
        jac_np = jacobian_determinant(disp)[0].cpu().numpy()
        metrics: dict = {
            "hybridreg_version": __version__,
            "solver": solver,
            "device": str(dev),
            "inputs": {"fixed": str(fixed), "moving": str(moving), "fixed_labels": str(fixed_labels) if fixed_labels else None,
                       "moving_labels": str(moving_labels) if moving_labels else None, "grid": f_geo.to_dict()},
            **jacobian_stats(disp),
            "jacobian_method": "central differences (torch.gradient), whole image grid",
            "lambda": {"mean": float(lam_np.mean()), "std": float(lam_np.std()), "min": float(lam_np.min()), "max": float(lam_np.max())},
            "seconds": {"registration": seconds},
            "peak_memory_mb": peak,
            "peak_memory_kind": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "process peak RSS (ru_maxrss)",
            "levels": [
                {"spacing_mm": list(h.spacing), "shape": list(h.shape), "control_shape": list(h.control_shape), "iterations": h.iterations,
                 "status": h.status, "seconds": h.seconds, "final_total": h.terms["total"][-1] if h.terms.get("total") else None}
                for h in result.history
            ],
            "final_terms": result.final_terms,
            "config": to_dict(cfg),
        }
        t_metrics = time.perf_counter()
        if fl is not None:
            wl = warp(torch.from_numpy(ml)[None, None].to(dev), disp, mode="nearest")[0, 0].cpu().numpy()
            inside = lam_np[fl > 0]
            metrics["lambda"].update({"mean_inside_fixed_labels": float(inside.mean()), "std_inside_fixed_labels": float(inside.std())})
            metrics["labels_scored"] = list(labels_to_score)
            metrics["dice_before"] = _summary(dice(fl, ml, labels_to_score))
            metrics["dice_after"] = _summary(dice(fl, wl, labels_to_score))
            if hd95_metric:
                metrics["hd95_mm_after"] = _summary(hd95(fl, wl, labels_to_score, spacing))
        metrics["seconds"]["metrics"] = time.perf_counter() - t_metrics
        t_write = time.perf_counter()
        write_image(stage / "warped.nii.gz", warped_t, f_geo)
        write_displacement(stage / "displacement.nii.gz", disp_np, f_geo)
        write_image(stage / "lambda.nii.gz", lam_np, f_geo)
        write_image(stage / "jacobian.nii.gz", jac_np, f_geo)
        from .figures import registration_figure

        title = f"{Path(moving).name} → {Path(fixed).name}"
        if fl is not None:
            title += f"   Dice {metrics['dice_before']['mean']:.3f} → {metrics['dice_after']['mean']:.3f}"
        registration_figure(stage / "figure.png", normalize_intensity(f_arr), normalize_intensity(m_arr),
                            normalize_intensity(warped_t), lam_np, disp_np, jac_np, spacing, title=title)

        dump_yaml(cfg, stage / "config.yaml")
        metrics["seconds"]["writing"] = time.perf_counter() - t_write
        metrics["seconds"]["total"] = time.perf_counter() - t_total
        atomic_write_text(stage / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True))
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUT_FILES:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return metrics


def apply_file(displacement: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike, *, labels: bool = False) -> None:
    """Warp ``image`` with an ITK displacement field written by ``register`` (SimpleITK
    resampling onto the field's grid; nearest neighbour for label maps)."""
    import SimpleITK as sitk

    field = read_displacement(displacement, arg="DISPLACEMENT")
    if labels:
        arr, geo = read_labels(image, arg="IMAGE")
        img = geo.apply(sitk.GetImageFromArray(arr))
    else:
        arr, geo = read_image(image, arg="IMAGE")
        img = geo.apply(sitk.GetImageFromArray(arr))
    res = resample_with_field(img, field, labels=labels)
    out = Path(out)
    if not out.parent.exists():
        raise CLIError(f"`--out`: folder does not exist: {out.parent}")
    write_image(out, sitk.GetArrayFromImage(res), Geometry.of(res), dtype=np.int32 if labels else np.float32)


def train_command(args: argparse.Namespace) -> None:
    """``hybridreg train``: load the data source and the config, then :func:`learned.train.train`.
    With ``--resume`` and no ``--config`` the run's own ``config.yaml`` is used."""
    train_mod = importlib.import_module("learned.train")
    from .data.sources import load_dataset

    out = Path(args.out)
    cfg_path = args.config or (out / "config.yaml" if args.resume and (out / "config.yaml").is_file() else None)
    cfg = load_yaml(cfg_path, train_mod.TrainConfig, arg="--config") if cfg_path else train_mod.TrainConfig()
    if args.resume and train_mod.latest_checkpoint(out) is None:
        raise CLIError(f"`--resume`: {out} holds no checkpoint to resume from")
    dev = _device(args.device)
    data = load_dataset(args.data, args.spacing)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"hybridreg train: {data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test subjects,"
              f" grid {'x'.join(map(str, data.shape))} at {'x'.join(f'{s:g}' for s in data.spacing)} mm,"
              f" atlas {'yes' if data.atlas is not None else 'no'}; {cfg.steps} steps -> {out}")
    if args.init is not None and not Path(args.init).is_file():
        raise FileNotFoundError(f"`--init`: weight file not found: {args.init}")
    train_mod.train(cfg, data, out, resume=args.resume, device=dev, progress=not args.no_progress, init_weights=args.init)
    if rank == 0:
        print(f"wrote {out}/: model_best.pt, model_final.pt, log.csv, validation.csv, history.json, training.png")


def tune_command(args: argparse.Namespace) -> None:
    """``hybridreg tune``: :func:`hybridreg.tuning.run_tuning` with the solver's validation
    objective, then the outputs of :func:`hybridreg.tuning.write_outputs`."""
    from dataclasses import replace as _replace

    from . import tuning

    space = tuning.load_space(args.space)
    if space.solver != args.solver:
        space = _replace(space, solver=args.solver)
        tuning.apply_params(space, {p.key: p.from_unit(0.5) for p in space.parameters})
    result = tuning.run_tuning(space, tuning.OBJECTIVES[args.solver], args.trials, args.out, method=args.method,
                               resume=args.resume, progress=not args.no_progress)
    summary = tuning.write_outputs(space, result, args.out)
    print(f"wrote {args.out}/: trials.json, summary.json, pareto.json, best_config.yaml, best_so_far.png, pareto.png, partial_dependence.png")
    if result.best:
        print(f"best of {summary['finished']} trials: validation Dice {result.best['dice']:.4f} (folding {result.best['folding']:.4f}%,"
              f" SDlogJ {result.best['sdlogj']:.3f}) with {result.best['params']}")
    else:
        print(f"no feasible trial among {summary['finished']} (folding > {space.folding_max}% everywhere)")


def _print_summary(m: dict, out: Path) -> None:
    print(f"wrote {out}/: " + ", ".join(OUTPUT_FILES))
    if "dice_after" in m:
        print(f"mean Dice over {len(m['labels_scored'])} structures: {m['dice_before']['mean']:.3f} -> {m['dice_after']['mean']:.3f}")
    if "hd95_mm_after" in m:
        print(f"mean HD95 after: {m['hd95_mm_after']['mean']:.2f} mm")
    print(f"%|J|<=0: {m['folding_percent']:.4f} %   SDlogJ: {m['sdlogj']:.3f}   λ mean {m['lambda']['mean']:.3f} (std {m['lambda']['std']:.3f})")
    print(f"time: {m['seconds']['registration']:.1f} s registration, {m['seconds']['total']:.1f} s total;"
          f" peak memory {m['peak_memory_mb']:.0f} MB ({m['device']})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridreg", description="Diffeomorphic registration with spatially varying regularization.")
    p.add_argument("--version", action="version", version=f"hybridreg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register MOVING to FIXED (same grid) and write all outputs to --out")
    r.add_argument("fixed", metavar="FIXED")
    r.add_argument("moving", metavar="MOVING")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--fixed-labels")
    r.add_argument("--moving-labels")
    r.add_argument("--config", help="YAML with `objective:` and solver keys (see README)")
    r.add_argument("--device", help="cpu (default), cuda, cuda:N")
    r.add_argument("--solver", default="instance", choices=sorted(SOLVERS),
                   help="instance (optimization, default), learned (one network pass), learned+refine (network, then a short instance optimization)")
    r.add_argument("--weights", help="weight file for the learned solvers (default: the shipped bundled-data weights)")
    r.add_argument("--eval-labels", default="auto", help="auto (the 30 standard FreeSurfer structures if present, else all common), all, or 2,3,4,...")
    r.add_argument("--no-progress", action="store_true")

    a = sub.add_parser("apply", help="warp IMAGE with a displacement written by register")
    a.add_argument("displacement", metavar="DISPLACEMENT")
    a.add_argument("image", metavar="IMAGE")
    a.add_argument("--out", required=True, help="output image file (.nii.gz, .mha, .nrrd)")
    a.add_argument("--labels", action="store_true", help="IMAGE is a label map: nearest-neighbour interpolation")

    t = sub.add_parser("train", help="train the learned solver (unsupervised) on a data source; torchrun-aware")
    t.add_argument("--data", required=True, help="bundled, a .csv/.json manifest, or an OASIS / IXI (TransMorph) folder")
    t.add_argument("--config", help="training YAML (learned.train.TrainConfig); defaults if omitted")
    t.add_argument("--out", required=True, help="run folder (logs, checkpoints, weights)")
    t.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --out")
    t.add_argument("--init", help="fine-tune: start from this weight file (e.g. the shipped weights) instead of random weights")
    t.add_argument("--spacing", type=float, nargs="+", help="resample the data to this voxel size in mm (one value or one per axis)")
    t.add_argument("--device", help="cpu (default) or cuda")
    t.add_argument("--no-progress", action="store_true")

    u = sub.add_parser("tune", help="tune hyperparameters by Bayesian optimization (BoTorch) on the bundled validation pairs")
    u.add_argument("--solver", default="instance", choices=("instance", "learned"))
    u.add_argument("--space", required=True, help="search-space YAML (see configs/tune_instance.yaml)")
    u.add_argument("--trials", type=int, required=True, help="number of finished trials to reach")
    u.add_argument("--out", required=True, help="output folder (trials.json, best_config.yaml, figures)")
    u.add_argument("--method", default="botorch", choices=("botorch", "random", "tpe"), help="botorch (default), random search, or Optuna TPE")
    u.add_argument("--resume", action="store_true", help="continue the run in --out (finished trials are kept)")
    u.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("demo", help="register the bundled default pair (real T1 + another subject) with labels")
    d.add_argument("--out", default="hybridreg-demo", help="output folder (default ./hybridreg-demo)")
    d.add_argument("--resolution", type=int, default=2, choices=(1, 2), help="2 mm (default) or 1 mm")
    d.add_argument("--config")
    d.add_argument("--device")
    d.add_argument("--solver", default="instance", choices=sorted(SOLVERS))
    d.add_argument("--weights")
    d.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "register":
            m = register_files(args.fixed, args.moving, args.out, fixed_labels=args.fixed_labels,
                               moving_labels=args.moving_labels, config=args.config, device=args.device,
                               solver=args.solver, weights=args.weights, eval_labels=args.eval_labels, progress=not args.no_progress)
            _print_summary(m, Path(args.out))
        elif args.command == "apply":
            apply_file(args.displacement, args.image, args.out, labels=args.labels)
            print(f"wrote {args.out}")
        elif args.command == "train":
            train_command(args)
        elif args.command == "tune":
            tune_command(args)
        elif args.command == "demo":
            from . import data

            fid, mid = data.demo_pair()
            fs, ms = data.load_subject(fid, args.resolution), data.load_subject(mid, args.resolution)
            print(f"hybridreg demo: registering bundled subject {mid} (moving) to {fid} (fixed, real T1) at {args.resolution} mm")
            m = register_files(fs.image_path, ms.image_path, args.out, fixed_labels=fs.labels_path,
                               moving_labels=ms.labels_path, config=args.config, device=args.device,
                               solver=args.solver, weights=args.weights, eval_labels="auto", progress=not args.no_progress)
            _print_summary(m, Path(args.out))
    except (CLIError, FileNotFoundError, ValueError) as e:
        print(f"hybridreg {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
