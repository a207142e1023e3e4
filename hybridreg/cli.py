"""Command-line interface: ``hybridreg register | batch | apply | demo | train | tune``.

The CLI is the application layer's thin edge: it parses arguments, calls the register service
(:mod:`hybridreg.service`: read → solve → score → write) or the training and tuning entry
points, prints a summary, and is the one error boundary (:func:`main`): a known failure
becomes one line naming the argument and exit code 2. Solvers are found by name through
entry points (:func:`hybridreg.solvers.available_solvers`), never imported by module path.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import __version__, provenance
from .config import among_outputs, apply_overrides, load_yaml, shipped_config
from .io import (IMAGE_SUFFIXES, SMALL_EXTENT_MM, Geometry, physical_scale, placement_warnings, read_displacement, read_image,
                 read_labels, read_transform, resample, write_image)
from .service import OUTPUT_FILES, OUTPUT_SETS, check_outputs, device_of, output_folder, parse_eval_labels, register_files
from .solvers import available_solvers

__all__ = ["main", "OUTPUT_FILES"]


class CLIError(Exception):
    """An error the CLI reports in one line (bad input, bad config)."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser (and its subcommands') with a usage error in one line naming the
    argument, exit code 2, as every other bad input (argparse prints the usage block too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _eval_labels(value: str) -> str:
    """``--eval-labels``: checked when the arguments are parsed, with or without label maps."""
    try:
        parse_eval_labels(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("`--eval-labels` ", "")) from None
    return value


_NOTHING_WRITTEN = "nothing was written to --out"
_KEPT = {"batch": "the finished pairs are kept in --out; run the same command again to resume",
         "train": "the checkpoints written so far are kept in --out; continue with --resume",
         "tune": "the finished trials are kept in --out; continue with --resume"}
"""What an interrupted command leaves in ``--out`` (``register``, ``apply`` and ``demo``: nothing)."""


def _transform_and_grid(transform: str | os.PathLike, inverse: bool, reference: str | os.PathLike | None):
    """``apply``'s TRANSFORM: a ``register`` output folder, an ITK transform file, or a
    displacement field image; returns ``(sitk transform, output grid, source grid)``: the
    source grid, known for a ``register`` folder only (else ``None``), is the grid of the image
    the transform was made for (MOVING's; FIXED's with ``inverse``)."""
    import SimpleITK as sitk

    p = Path(transform)
    ref = read_image(reference, arg="--reference", nan="keep")[1] if reference is not None else None
    if p.is_dir():
        name = "inverse_transform.h5" if inverse else "transform.h5"
        missing = [n for n in (name, "metrics.json") if not (p / n).is_file()]
        if missing:
            why = " (written by --outputs all only)" if missing == ["inverse_transform.h5"] else ""
            raise CLIError(f"`TRANSFORM`: {p} holds no {' and '.join(missing)}{why}: pass a `hybridreg register` output folder"
                           " that has it")
        inputs = json.loads((p / "metrics.json").read_text(encoding="utf-8"))["inputs"]
        grid_of = lambda key: Geometry(**{k: tuple(v) for k, v in inputs[key].items()})  # noqa: E731
        target, source = ("moving_grid", "grid") if inverse else ("grid", "moving_grid")
        return read_transform(p / name), ref or grid_of(target), grid_of(source)
    if str(p).lower().endswith((".h5", ".hdf5", ".mat", ".txt", ".tfm")):
        tx = read_transform(p)
        if inverse:
            tx = tx.GetInverse() if tx.IsLinear() else None
            if tx is None:
                raise CLIError("`--inverse`: only an affine transform file can be inverted; apply the inverse_transform.h5"
                               " that register wrote, or pass the register output folder")
        if ref is None:
            raise CLIError("`--reference` is needed with a transform file: the image whose grid the output takes")
        return tx, ref, None
    if inverse:
        raise CLIError("`--inverse` needs a register output folder or an affine transform file, not a displacement field")
    field = read_displacement(p, arg="TRANSFORM")
    return sitk.DisplacementFieldTransform(sitk.Image(field)), ref or Geometry.of(field), None


def apply_file(transform: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike, *, labels: bool = False,
               overwrite: bool = False, inverse: bool = False, reference: str | os.PathLike | None = None) -> list[str]:
    """Resample ``image`` through a transform written by ``register`` (SimpleITK); returns the lines
    :func:`hybridreg.io.placement_warnings` gives for ``image`` (the CLI prints them).

    ``transform`` is a ``register`` output folder (``transform.h5`` onto the fixed grid; with
    ``inverse``, ``inverse_transform.h5`` onto the moving grid: fixed-space images and labels
    mapped onto the moving image), an ITK transform file (``.h5``, ``.mat``, ``.txt``, with
    ``reference`` giving the output grid; ``inverse`` inverts an affine), or a displacement field
    image (output on its grid). Transforms map output points to ``image`` points (LPS, mm).
    NaN voxels of ``image`` (no data) stay NaN, and spread to the output points whose linear
    interpolation uses them.

    Raises:
        FileNotFoundError, ValueError: unreadable inputs, a field with NaN/Inf, a transform of
            another dimension than ``image`` or ``reference``, one that maps the output grid
            outside ``image`` (not checked for an image on the grid a ``register`` folder's
            transform was made for), an ``--out``
            that is not an image file name, that is an input or one of the results in the ``register``
            output folder given as ``transform``, or that exists (without ``overwrite``).
    """
    import SimpleITK as sitk

    out = Path(out)
    if not str(out).endswith(IMAGE_SUFFIXES):  # lowercase: SimpleITK picks the format by it (w.MHA was written empty)
        raise CLIError(f"`--out` must be an image file name ending in {', '.join(IMAGE_SUFFIXES)} (lowercase), got {str(out)!r}")
    if not out.parent.is_dir():
        raise CLIError(f"`--out`: folder does not exist: {out.parent}")
    for arg, path in (("TRANSFORM", transform), ("IMAGE", image), ("--reference", reference)):
        if path is not None and Path(path).resolve() == out.resolve():
            raise CLIError(f"`--out` is the input `{arg}` ({path}); choose another --out")
    if Path(transform).is_dir() and out.name in OUTPUT_FILES and out.resolve().parent == Path(transform).resolve():
        raise CLIError(f"`--out` {out} is one of the results in the register output folder `TRANSFORM`; choose another --out")
    if out.exists() and not overwrite:
        raise CLIError(f"`--out` {out} exists; pass --overwrite to replace it")
    tx, grid, source = _transform_and_grid(transform, inverse, reference)
    if grid.dim != tx.GetDimension():
        raise CLIError(f"`--reference` is {grid.dim}D but `TRANSFORM` is {tx.GetDimension()}D")
    arr, geo = read_labels(image, arg="IMAGE") if labels else read_image(image, arg="IMAGE", nan="keep")  # NaN: no data
    if geo.dim != tx.GetDimension():
        raise CLIError(f"`IMAGE` is {geo.dim}D but `TRANSFORM` is {tx.GetDimension()}D")
    try:  # an image on the grid the transform was made for belongs to it, however little of the output it covers (a slab)
        res = resample(geo.apply(sitk.GetImageFromArray(arr)), tx, grid, labels=labels,
                       check_overlap=source is None or not geo.matches(source))
    except ValueError as e:
        raise CLIError(f"`IMAGE` and `TRANSFORM`: {e}") from None
    write_image(out, sitk.GetArrayFromImage(res), Geometry.of(res), dtype=np.int32 if labels else np.float32)
    return placement_warnings(image, geo, arg="IMAGE")


def train_command(args: argparse.Namespace) -> None:
    """``hybridreg train``: load the data source and the config, then :func:`learned.train.train`.
    With ``--resume`` and no ``--config`` the run's own ``config.yaml`` is used."""
    import learned.train as train_mod  # the application layer may import a solver package

    from .data.sources import load_dataset

    out = output_folder(args.out)
    if args.config and not args.resume and among_outputs(args.config, out, train_mod.RUN_FILES):
        raise CLIError(f"`--config` {args.config} is a file this run writes in `--out` {out}; copy it elsewhere or choose"
                       " another --out")
    cfg_path = args.config or (out / "config.yaml" if args.resume and (out / "config.yaml").is_file() else None)
    cfg = load_yaml(cfg_path, train_mod.TrainConfig, arg="--config") if cfg_path else train_mod.TrainConfig()
    cfg = apply_overrides(cfg, args.overrides) if args.overrides else cfg
    if args.resume and train_mod.latest_checkpoint(out) is None and not (out / "config.yaml").is_file():
        raise CLIError(f"`--resume`: {out} holds no run to resume (no checkpoint, no config.yaml)")
    dev = device_of(args.device)
    data = load_dataset(args.data, args.spacing, arg="--data")
    scale = physical_scale(data.shape, data.spacing)
    if scale != 1.0:  # small objects: trained as `register` sees them, as if larger (the weights record that spacing)
        data = replace(data, spacing=tuple(h / scale for h in data.spacing))
    if args.init is not None:
        from learned.weights import load_weights

        load_weights(args.init, arg="--init")  # a missing or corrupt file fails here, before --out is made or announced
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"hybridreg train: {data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test subjects,"
              f" grid {'x'.join(map(str, data.shape))} at {'x'.join(f'{s:g}' for s in data.spacing)} mm,"
              f" atlas {'yes' if data.atlas is not None else 'no'}; {cfg.steps} steps -> {out}")
    train_mod.train(cfg, data, out, resume=args.resume, device=dev, progress=not args.no_progress, init_weights=args.init)
    if rank == 0:
        wrote = [n for n in ("model_best.pt", "model_final.pt", "log.csv", "validation.csv", "history.json", "training.png")
                 if (out / n).is_file()]
        print(f"wrote {out}/: {', '.join(wrote)}")


def tune_command(args: argparse.Namespace) -> None:
    """``hybridreg tune``: :func:`hybridreg.tuning.run_tuning` with the solver's validation
    objective, then the outputs of :func:`hybridreg.tuning.write_outputs`."""
    from . import tuning

    dev = device_of(args.device)  # an unusable device fails here, before --out is made
    out = output_folder(args.out)
    if args.resume and not (out / "trials.json").is_file():
        raise CLIError(f"`--resume`: {out} holds no trials.json to resume from")
    if among_outputs(args.space, out, tuning.RUN_FILES):
        raise CLIError(f"`--space` {args.space} is a file this run writes in `--out` {out}; copy it elsewhere or choose"
                       " another --out")
    space = tuning.load_space(args.space)
    if args.solver is not None and space.solver != args.solver:
        space = replace(space, solver=args.solver)
        tuning.apply_params(space, {p.key: p.from_unit(0.5) for p in space.parameters})
    objective = partial(tuning.OBJECTIVES[space.solver], device=str(dev))  # picklable: --workers' processes take it
    result = tuning.run_tuning(space, objective, args.trials, args.out, method=args.method,
                               resume=args.resume, progress=not args.no_progress, device=str(dev))
    summary = tuning.write_outputs(space, result, args.out)
    print(f"wrote {args.out}/: {', '.join(summary['outputs'])}")
    if result.best:
        print(f"best of {summary['finished']} trials: validation Dice {result.best['dice']:.4f} (folding {result.best['folding']:.4f}%,"
              f" SDlogJ {result.best['sdlogj']:.3f}) with {result.best['params']}")
    else:
        print(f"no feasible trial among {summary['finished']}: {summary['infeasible']}")


def _print_summary(m: dict, out: Path, command: str) -> None:
    for w in m.get("warnings", []):
        print(f"hybridreg {command}: warning: {w}", file=sys.stderr)
    print(f"wrote {out}/: " + ", ".join(m.get("outputs", OUTPUT_FILES)))
    if m.get("physical_scale", 1.0) < 1.0:
        print(f"FIXED spans under {SMALL_EXTENT_MM:g} mm: it was registered as if {1 / m['physical_scale']:.3g} times larger"
              " (the settings in mm are made for human anatomy); images, transforms and metrics are in true mm,"
              " config.yaml keeps the settings as given")
    for name, n in m["inputs"].get("nan_voxels", {}).items():
        if n:
            print(f"{name.upper()}: {n} NaN voxels treated as outside the image (left out of the image match)")
    if "dice_after" in m:
        print(f"mean Dice over {len(m['labels_scored'])} structures: {m['dice_before']['mean']:.3f} -> {m['dice_after']['mean']:.3f}")
    if "hd95_mm_after" in m:
        h = m["hd95_mm_after"]
        lost = h.get("lost", [])
        over = f" over {h['structures']} of {h['structures'] + len(lost)} structures" if lost else ""
        mean = f"{h['mean']:.2f} mm" if h["structures"] else "undefined"
        print(f"mean HD95 after: {mean}{over}" + (f" (lost after registration, HD95 undefined: {', '.join(map(str, lost))})"
                                                 if lost else ""))
    if "tre_mm" in m:
        t = m["tre_mm"]
        print(f"TRE over {t['after']['n']} landmarks: {t['before']['mean']:.2f} mm before, {t['after_affine']['mean']:.2f} mm"
              f" after the affine stage, {t['after']['mean']:.2f} mm after (median {t['after']['median']:.2f}, max {t['after']['max']:.2f})")
    print(f"%|J|<=0: {m['folding_percent']:.4f} %   NDV: {m['ndv_percent']:.4f} %   SDlogJ: {m['sdlogj']:.3f}   λ mean {m['lambda']['mean']:.3f} (std {m['lambda']['std']:.3f})")
    print(f"time: {m['seconds']['registration']:.1f} s registration, {m['seconds']['total']:.1f} s total;"
          f" peak memory {m['peak_memory_mb']:.0f} MB ({m['device']})")


def _prealign_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--affine", default="affine", choices=("none", "rigid", "affine"),
                   help="affine stage before the deformable one: rigid then affine (default, as ANTs), rigid, or none")
    p.add_argument("--init", default="geometry", choices=("geometry", "moments"),
                   help="initial alignment: image centres (default) or centres of mass")
    p.add_argument("--affine-metric", default="ncc", choices=("ncc", "mi"),
                   help="the affine stage's image match: normalised cross-correlation (default; one modality) or"
                        " mutual information (different modalities or contrasts)")


def _solver_options(p: argparse.ArgumentParser) -> None:
    """The solver's options, the same for ``register``, ``batch`` and ``demo``."""
    p.add_argument("--config", help="YAML with `objective:` and solver keys (see README)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key after --config, e.g. --set objective.w_reg=2.5 (repeatable; any key,"
                        " dotted for nested ones; the value is read as YAML)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N")
    p.add_argument("--solver", default="instance", choices=available_solvers() or None,
                   help="instance (optimization, default), learned (the network, inverse-consistent, with one recursive pass), learned+refine (network, then a short"
                        " instance optimization), learned-lambda (a network's λ, then instance optimization),"
                        " learned-conditional[+refine] (one network for every objective.w_reg / hyper_strength set by --set)")
    p.add_argument("--weights", help="weight file for the learned solvers, or a shipped name (shipped, stage1, stage2, stage3,"
                                     " uniform, conditional, fixed-w1, fixed-w2, fixed-w8, fixed-w16; default: the shipped"
                                     " bundled-data weights, or the conditional ones)")
    p.add_argument("--region-lambda", metavar="FILE.yaml",
                   help="learned-conditional: one λ per structure of --fixed-labels (`label: λ` per line; others get"
                        " region_default), painted into the map the network is conditioned on (CSAIN)")


def _outputs_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--outputs", default=default, choices=tuple(OUTPUT_SETS),
                   help=f"which files to write (default {default}): all; transforms (affine.mat, displacement.nii.gz,"
                        " transform.h5, metrics.json, config.yaml: no inverse, images or figure); metrics (metrics.json, config.yaml)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hybridreg", description="Diffeomorphic registration with spatially varying regularization.")
    p.add_argument("--version", action="version", version=f"hybridreg {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("register", help="register MOVING to FIXED (any grids) and write all outputs to --out")
    r.add_argument("fixed", metavar="FIXED", help="an image file (NIfTI, MHA, NRRD, ...) or a DICOM series (its folder, or one of its files)")
    r.add_argument("moving", metavar="MOVING", help="an image file (NIfTI, MHA, NRRD, ...) or a DICOM series (its folder, or one of its files)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--fixed-labels")
    r.add_argument("--moving-labels")
    _solver_options(r)
    r.add_argument("--eval-labels", default="auto", type=_eval_labels, help="auto (the 30 standard FreeSurfer structures if present, else all common), all, or 2,3,4,...")
    r.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    _outputs_option(r, "all")
    r.add_argument("--fixed-mask", help="binary mask on FIXED's grid: restricts the image match (both stages)")
    r.add_argument("--moving-mask", help="binary mask on MOVING's grid: restricts the image match (both stages)")
    r.add_argument("--fixed-landmarks", help="landmarks of FIXED, one point per row (CSV; header x,y,z: LPS mm, the default;"
                                             " i,j,k: voxel indices): scored by TRE with --moving-landmarks")
    r.add_argument("--moving-landmarks", help="the corresponding landmarks of MOVING, in the same row order")
    _prealign_options(r)
    r.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("batch", help="register every pair of a manifest (CSV/JSON or Learn2Reg/LUMIR dataset.json);"
                                     " resumable; torchrun shards the pairs over processes")
    b.add_argument("pairs", metavar="PAIRS", help=".csv with fixed,moving[,fixed_labels,moving_labels,fixed_mask,moving_mask,"
                                                  "fixed_landmarks,moving_landmarks,id],"
                                                  " a .json list of such objects, or a Learn2Reg / LUMIR dataset.json")
    b.add_argument("--out", required=True, help="batch folder: pairs/<id>/ (as register), metrics.csv, summary.json/.md")
    b.add_argument("--split", help="the dataset.json pair list (default: registration_val, registration_test, validation or test)")
    _solver_options(b)
    b.add_argument("--eval-labels", default="auto", type=_eval_labels, help="as for register")
    _outputs_option(b, "transforms")
    b.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="solve B pairs that share their grids in one optimization (batched instance optimization;"
                        " the same results as one at a time, more pairs per second where the device has room; default 1)")
    _prealign_options(b)
    b.add_argument("--no-progress", action="store_true")

    a = sub.add_parser("apply", help="resample IMAGE through a transform written by register")
    a.add_argument("transform", metavar="TRANSFORM",
                   help="a register output folder, an ITK transform file (.h5, .mat, .txt) or a displacement field image")
    a.add_argument("image", metavar="IMAGE", help="an image file (NIfTI, MHA, NRRD, ...) or a DICOM series (its folder, or one of its files)")
    a.add_argument("--out", required=True, help="output image file (.nii.gz, .mha, .nrrd)")
    a.add_argument("--labels", action="store_true", help="IMAGE is a label map: nearest-neighbour interpolation")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    a.add_argument("--inverse", action="store_true",
                   help="map a fixed-space image or labels onto the moving image's grid (inverse_transform.h5)")
    a.add_argument("--reference", help="image whose grid the output takes (needed with a transform file)")

    t = sub.add_parser("train", help="train the learned solver (unsupervised) on a data source; torchrun-aware")
    t.add_argument("--data", required=True, help="bundled, a .csv/.json manifest, or an OASIS / IXI (TransMorph) folder")
    t.add_argument("--config", help="training YAML (learned.train.TrainConfig); defaults if omitted")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key after --config, e.g. --set objective.w_reg=2 (repeatable)")
    t.add_argument("--out", required=True, help="run folder (logs, checkpoints, weights)")
    t.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --out")
    t.add_argument("--init", help="fine-tune: start from this weight file (e.g. the shipped weights) instead of random weights")
    t.add_argument("--spacing", type=float, nargs="+", help="resample the data to this voxel size in mm (one value or one per axis)")
    t.add_argument("--device", help="cpu (default), cuda, cuda:N")
    t.add_argument("--no-progress", action="store_true")

    u = sub.add_parser("tune", help="tune hyperparameters by Bayesian optimization (BoTorch) on the bundled validation pairs")
    u.add_argument("--solver", choices=("instance", "learned", "learned-conditional"),
                   help="the search space's `solver:` (default: instance) unless given: instance, learned (each trial trains"
                        " a network), learned-conditional (each trial is a forward pass of the conditional network at the"
                        " trial's values: seconds per trial)")
    u.add_argument("--space", required=True, help="search-space YAML (see configs/tune_instance.yaml)")
    u.add_argument("--trials", type=int, required=True, help="number of finished trials to reach")
    u.add_argument("--out", required=True, help="output folder (trials.json, best_config.yaml, figures)")
    u.add_argument("--method", default="botorch", choices=("botorch", "turbo", "random", "tpe"),
                   help="botorch (default), turbo (trust-region BO, for many parameters), random search, or Optuna TPE")
    u.add_argument("--device", help="cpu (default), cuda, cuda:N: where each trial registers the pairs (and, with"
                        " --solver learned, trains its network)")
    u.add_argument("--resume", action="store_true", help="continue the run in --out (finished trials are kept)")
    u.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("demo", help="register the bundled default pair (real T1 + another subject) with labels")
    d.add_argument("--out", default="hybridreg-demo", help="output folder (default ./hybridreg-demo)")
    d.add_argument("--resolution", type=int, default=2, choices=(1, 2), help="2 mm (default) or 1 mm")
    _solver_options(d)
    d.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    _outputs_option(d, "all")
    _prealign_options(d)
    d.add_argument("--no-progress", action="store_true")
    return p


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that staging folders are cleaned up on the way out."""


KNOWN_ERRORS = (CLIError, ValueError, FileNotFoundError, OSError, torch.cuda.OutOfMemoryError)
"""Failures with a known cause, reported in one line with exit code 2: bad input and config
(ValueError, naming the argument), files (OSError: missing, unreadable, read-only, disk full),
and running out of device memory."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess in the tests
    raise Terminated()


def _log_traceback(command: str) -> Path:
    """Write the current exception's full traceback to a log file and return its path."""
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"hybridreg-{command}-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        traceback.print_exc(file=fh)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the CLI's one error boundary.

    Exit codes: 0 success; 3 ``batch`` finished with some pair failed or not run; 2 a known failure (one line on stderr naming the argument; nothing
    written to ``--out``); 130 interrupted (Ctrl-C) and 143 terminated (SIGTERM), with staging
    folders removed and ``--out`` as it was; 1 an unexpected error (a short message and the
    path of the log file holding the full traceback).
    """
    args = _parser().parse_args(argv)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's C++ warnings would bypass the one-line errors
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    command = provenance.COMMAND.set(("hybridreg", *(sys.argv[1:] if argv is None else argv)))  # metrics.json's record
    try:
        for name in ("config", "space"):  # the README's configs/NAME.yaml from any folder (a pip install has none)
            if getattr(args, name, None) and (copy := shipped_config(getattr(args, name))) is not None:
                print(f"hybridreg {args.command}: `--{name}` {getattr(args, name)} is not in this folder: reading the copy"
                      f" shipped with hybridreg, {copy}", file=sys.stderr)
                setattr(args, name, str(copy))
        code = _run(args)
    except KNOWN_ERRORS as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"hybridreg {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hybridreg {args.command}: interrupted; {_KEPT.get(args.command, _NOTHING_WRITTEN)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"hybridreg {args.command}: terminated; {_KEPT.get(args.command, _NOTHING_WRITTEN)}", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 -- the boundary: anything else is a bug, logged in full
        log = _log_traceback(args.command)
        print(f"hybridreg {args.command}: unexpected error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
              f" (full traceback in {log})", file=sys.stderr)
        return 1
    finally:
        provenance.COMMAND.reset(command)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code


def _prealign(args: argparse.Namespace) -> dict:
    return {"affine": args.affine, "init": args.init, "affine_metric": args.affine_metric}


def batch_command(args: argparse.Namespace) -> int:
    """``hybridreg batch``: :func:`hybridreg.batch.run_batch` over the manifest's pairs; exit
    code 3 when some pair failed or was not run (the table lists which and why)."""
    from .batch import read_pairs, run_batch

    pairs = read_pairs(args.pairs, args.split)
    s = run_batch(pairs, args.out, solver=args.solver, config=args.config, overrides=args.overrides, weights=args.weights,
                  device=args.device, eval_labels=args.eval_labels, outputs=args.outputs, batch_size=args.batch_size,
                  progress=not args.no_progress, region_lambda=args.region_lambda,
                  **_prealign(args))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"hybridreg batch: {len(s.done)} of {len(pairs)} pairs registered, {len(s.failed)} failed, {len(s.missing)} not run;"
          f" wrote {args.out}/: pairs/, metrics.csv, dice_per_structure.csv, summary.json, summary.md")
    for pid in s.failed:
        print(f"  failed: {pid} ({Path(args.out) / 'failed' / (pid + '.json')})")
    for pid, ws in s.warnings.items():
        for w in ws:
            print(f"hybridreg batch: warning: {pid}: {w}", file=sys.stderr)
    return 3 if s.failed or s.missing else 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "register":
        m = register_files(args.fixed, args.moving, args.out, fixed_labels=args.fixed_labels,
                           moving_labels=args.moving_labels, config=args.config, device=args.device,
                           solver=args.solver, weights=args.weights, eval_labels=args.eval_labels,
                           progress=not args.no_progress, overwrite=args.overwrite, fixed_mask=args.fixed_mask,
                           moving_mask=args.moving_mask, overrides=args.overrides, outputs=args.outputs,
                           fixed_landmarks=args.fixed_landmarks, moving_landmarks=args.moving_landmarks,
                           region_lambda=args.region_lambda, **_prealign(args))
        _print_summary(m, Path(args.out), args.command)
    elif args.command == "batch":
        return batch_command(args)
    elif args.command == "apply":
        for w in apply_file(args.transform, args.image, args.out, labels=args.labels, overwrite=args.overwrite,
                            inverse=args.inverse, reference=args.reference):
            print(f"hybridreg apply: warning: {w}", file=sys.stderr)
        print(f"wrote {args.out}")
    elif args.command == "train":
        train_command(args)
    elif args.command == "tune":
        tune_command(args)
    elif args.command == "demo":
        from . import data

        fid, mid = data.demo_pair()
        fs, ms = data.load_subject(fid, args.resolution), data.load_subject(mid, args.resolution)
        check_outputs(args.out, {}, overwrite=args.overwrite)  # a refusal comes before the banner
        print(f"hybridreg demo: registering bundled subject {mid} (moving) to {fid} (fixed, real T1) at {args.resolution} mm")
        m = register_files(fs.image_path, ms.image_path, args.out, fixed_labels=fs.labels_path,
                           moving_labels=ms.labels_path, config=args.config, device=args.device,
                           solver=args.solver, weights=args.weights, eval_labels="auto", progress=not args.no_progress,
                           overwrite=args.overwrite, overrides=args.overrides, outputs=args.outputs,
                           region_lambda=args.region_lambda, **_prealign(args))
        _print_summary(m, Path(args.out), args.command)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
