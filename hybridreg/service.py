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
lost), as :func:`prepare_pair` (checks, reading, the affine stage), :func:`solve` and
:func:`finish_pair` (metrics, files); the CLI (``hybridreg register`` / ``demo``) calls it,
the tuning objectives and the benchmarks call :func:`run_solver`. ``hybridreg batch
--batch-size B`` prepares B pairs, solves them together (:func:`solve_pairs`: batched instance
optimization) and finishes each.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import resource
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__, provenance
from .affine import LEVELS_MM, AffineResult, align, composite, inverse_composite, voxel_map, write_affine, write_transform
from .config import apply_overrides, atomic_write_text, dump_yaml, load_yaml, read_yaml, to_dict, write_json
from .io import (Geometry, check_same_grid, displacement_to_itk, normalize_intensity, physical_scale, placement_warnings, read_image,
                 read_labels, read_landmarks, resample, write_displacement, write_image)
from .metrics import LabelPolicy, dice_through, jacobian_stats, score_dice, score_registration, scored_labels, tre_stages
from .solvers import (DivergenceError, RegistrationResult, Solver, available_solvers, check_result, divergence, get_solver,
                      result_warnings, synchronize)
from .spatial import jacobian_determinant, warp

__all__ = ["OUTPUT_FILES", "TRANSFORM_FILES", "OUTPUT_SETS", "output_names", "Inputs", "Solved", "solver_and_config", "device_of", "peak_memory_mb", "output_folder", "check_outputs",
           "read_inputs", "run_solver_pairs", "run_solver", "batch_key", "solve_pairs", "solve", "measure",
           "write_outputs", "INVERSE_TOLERANCE_MM", "Prepared", "prepare_pair", "finish_pair", "register_files"]

OUTPUT_FILES = ("warped.nii.gz", "displacement.nii.gz", "affine.mat", "transform.h5", "inverse_displacement.nii.gz",
                "inverse_transform.h5", "lambda.nii.gz", "jacobian.nii.gz", "metrics.json", "figure.png", "config.yaml")
# written by ITK's transform IO (HDF5 for .h5), which is not thread-safe: :func:`write_outputs` writes them one at a time
TRANSFORM_FILES = ("affine.mat", "transform.h5", "inverse_transform.h5")

OUTPUT_SETS = {
    "all": OUTPUT_FILES,
    "transforms": ("displacement.nii.gz", "affine.mat", "transform.h5", "metrics.json", "config.yaml"),
    "metrics": ("metrics.json", "config.yaml"),
}
"""What ``--outputs`` writes: ``all`` (``register``'s default), ``transforms`` (the forward
transform and the metrics: ``batch``'s default, without the inverse, which is most of the
writing time, nor the images and the figure), ``metrics`` (the numbers only)."""

INVERSE_TOLERANCE_MM = 0.05
"""The written inverse is refined by least squares (:func:`hybridreg.spatial.invert_displacement`)
only where its relaxed fixed point leaves a larger mean composition error than this, in mm (over
the largest voxel size): on 2 mm grids it does (about 0.07 mm before, 4 s), on 1 mm grids the fixed
point is within it (0.010–0.020 mm), where the step would cost 40–65 s for 0.01 mm
(``docs/results.md``, "The inverse's tolerance in mm")."""


@dataclass
class Inputs:
    """A checked pair read from files, each array on its own image's grid (SimpleITK array order).

    Attributes:
        fixed, moving: float32 intensity arrays. geometry, moving_geometry: their grids (ITK,
            LPS, mm); registration happens on the fixed grid.
        fixed_labels, moving_labels: int label maps (on FIXED's / MOVING's grid) or ``None``.
        labels: the labels scored. fixed_mask, moving_mask: binary masks or ``None``.
        paths: the input paths as given (for ``metrics.json``).
        fixed_landmarks, moving_landmarks: corresponding points ``(n, d)``, LPS mm, or ``None``.
        fixed_nan, moving_nan: where each image had NaN voxels (no data; boolean, on its grid)
            or ``None``: filled with the image's lowest value, and left out of the deformable
            stage's image match (:meth:`match_mask`).
        warnings: what other tools may place differently in the images' headers
            (:func:`hybridreg.io.placement_warnings`), one line each (``metrics.json``'s ``warnings``).
    """

    fixed: np.ndarray
    moving: np.ndarray
    geometry: Geometry
    fixed_labels: np.ndarray | None
    moving_labels: np.ndarray | None
    labels: tuple[int, ...]
    paths: dict[str, str | None]
    moving_geometry: Geometry | None = None
    fixed_mask: np.ndarray | None = None
    moving_mask: np.ndarray | None = None
    fixed_landmarks: np.ndarray | None = None
    moving_landmarks: np.ndarray | None = None
    fixed_nan: np.ndarray | None = None
    moving_nan: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        """:func:`hybridreg.io.physical_scale` of the fixed grid (1 for images of human size)."""
        return physical_scale(self.geometry.size, self.geometry.spacing)

    def image(self, which: str) -> sitk.Image:
        """``"fixed"``, ``"moving"``, ``"fixed_mask"`` or ``"moving_mask"`` as a SimpleITK image on its grid."""
        arr = getattr(self, which)
        geo = self.geometry if which.startswith("fixed") else self.moving_geometry
        return None if arr is None else geo.apply(sitk.GetImageFromArray(arr))

    def match_mask(self, which: str) -> np.ndarray | None:
        """``"fixed"`` or ``"moving"``: the voxels of that image in the deformable stage's image
        match, the user's mask without the NaN voxels (float32 0/1), or ``None`` for all of them.
        (The affine stage takes the user's masks alone: its fill is flat background, and a moving
        mask biases ITK's affine metrics.)"""
        mask, nan = getattr(self, f"{which}_mask"), getattr(self, f"{which}_nan")
        if nan is None:
            return None if mask is None else mask.astype(np.float32)
        return ((mask > 0) & ~nan if mask is not None else ~nan).astype(np.float32)

    @property
    def nan_voxels(self) -> dict[str, int]:
        """``{"fixed": n, "moving": n}``: each image's NaN voxels (``metrics.json``'s ``inputs``)."""
        return {k: 0 if a is None else int(a.sum()) for k, a in (("fixed", self.fixed_nan), ("moving", self.moving_nan))}


@dataclass
class Solved:
    """One pair's result with its cost: ``seconds`` of ``register_pair`` (for a pair solved in a
    batch of ``batch_size`` pairs, its share: the batch's seconds / ``batch_size``),
    ``peak_memory_mb`` (the batch's), and the solver configuration it ran with (written to
    ``config.yaml``)."""

    result: RegistrationResult
    seconds: float
    peak_memory_mb: float
    device: torch.device
    config: Any
    batch_size: int = 1


def solver_and_config(name: str, config: str | os.PathLike | None = None, weights: str | None = None,
                      progress: bool = True, overrides: Sequence[str] = (),
                      region_lambda: str | os.PathLike | None = None) -> tuple[Solver, Any]:
    """The solver registered as ``name`` and its config: ``config`` (YAML of
    ``solver.config_class``) or the solver's defaults, then the ``KEY=VALUE`` ``overrides``
    (``--set``, :func:`hybridreg.config.apply_overrides`), with ``weights`` (learned solvers),
    ``region_lambda`` (a YAML file ``label: λ``, and optionally ``default: λ`` for the labels it
    does not list, for configs with a ``region_lambda`` key: the conditional network's
    region-wise λ, method §3.2) and ``progress`` set (for a config with that field: a plug-in's
    need not have it), and the fields the solver name fixes
    (:meth:`Solver.configure`).

    Raises:
        ValueError: unknown solver, invalid config or override, ``weights`` or
            ``region_lambda`` for a solver without them, a malformed ``region_lambda`` file.
        FileNotFoundError: a missing ``config``, ``weights`` or ``region_lambda`` file.
    """
    solver = get_solver(name)
    try:
        cfg = load_yaml(config, solver.config_class, arg="--config") if config else solver.default_config()
    except ValueError as e:
        raise ValueError(f"{e}{_solver_of_config(config, name)}") from None
    cfg = apply_overrides(cfg, overrides) if overrides else cfg
    if weights is not None:
        if not hasattr(cfg, "weights"):
            raise ValueError(f"`--weights` applies to the learned solvers, not to --solver {name}")
        cfg = replace(cfg, weights=str(weights))  # a file or a name the solver knows: its configure() checks
    if region_lambda is not None:
        if not hasattr(cfg, "region_lambda"):
            raise ValueError(f"`--region-lambda` applies to --solver learned-conditional[+refine], not to --solver {name}")
        values = read_yaml(region_lambda, arg="--region-lambda")
        if not isinstance(values, dict) or not values:
            raise ValueError(f"`--region-lambda`: {region_lambda} must map labels to λ, one `label: value` per line")
        default = {"region_default": values.pop("default")} if "default" in values else {}
        try:
            cfg = replace(cfg, region_lambda=values, **default)
        except ValueError as e:
            raise ValueError(f"`--region-lambda`: {e}") from None
    if any(f.name == "progress" for f in dataclasses.fields(cfg)):  # a plug-in's config need not have it
        cfg = replace(cfg, progress=progress)
    return solver, solver.configure(cfg)


def _solver_of_config(config: str | os.PathLike | None, name: str) -> str:
    """For a ``--config`` that ``--solver name`` refuses: the solvers whose config it is, as a hint
    to append to the message (else ``""``): the one a ``config.yaml``'s first line names (written
    by a run, :func:`write_outputs`), or those that read and accept it."""
    if not config:
        return ""
    try:
        with open(config, encoding="utf-8-sig") as fh:
            written = re.match(r"# The configuration of --solver (\S+) ", fh.readline())
    except (OSError, UnicodeDecodeError):
        written = None
    if written and written.group(1) != name:
        return f" (it is the config of a --solver {written.group(1)} run: give --solver {written.group(1)} with it)"
    fits = []
    for other in available_solvers():
        if other == name:
            continue
        try:
            solver = get_solver(other)
            solver.configure(load_yaml(config, solver.config_class, arg="--config"))  # read, and accepted by it
        except Exception:  # noqa: BLE001 -- not this one's (or a plug-in that fails to load): no hint from it
            continue
        fits.append(other)
    return f" (it is a config of --solver {' or '.join(fits)}: give --solver with it)" if fits else ""


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


# bytes per voxel (per component for a field) of the large output files, uncompressed
_BYTES_PER_VOXEL = {"warped.nii.gz": (4, False), "lambda.nii.gz": (4, False), "jacobian.nii.gz": (4, False),
                    "displacement.nii.gz": (4, True), "inverse_displacement.nii.gz": (4, True), "transform.h5": (8, True),
                    "inverse_transform.h5": (8, True)}


def output_bytes(names: Sequence[str], voxels: int, d: int) -> int:
    """An upper bound of the disk space the output files ``names`` take for a FIXED grid of
    ``voxels`` voxels in ``d`` dimensions, as they would be uncompressed: float32 images, float32
    displacements of ``d`` components, and the ITK transforms holding their field in float64; the
    small files (metrics, figure, affine, config) count 1 MB together. The staging folder lies in
    ``--out``, so moving the files into place takes no more."""
    per_voxel = sum(b * (d if field else 1) for n, (b, field) in _BYTES_PER_VOXEL.items() if n in names)
    return per_voxel * voxels + 2**20


def output_names(outputs: str) -> tuple[str, ...]:
    """The files of the output set ``outputs`` (:data:`OUTPUT_SETS`).

    Raises:
        ValueError: an unknown set, naming ``--outputs``.
    """
    if outputs not in OUTPUT_SETS:
        raise ValueError(f"`--outputs` must be one of {sorted(OUTPUT_SETS)}, got {outputs!r}")
    return OUTPUT_SETS[outputs]


def _nearest_folder(out: Path) -> Path:
    """``out`` if it exists, else its nearest existing parent (where it will be made)."""
    return next((p for p in (out, *out.parents) if p.exists()), Path("."))


def output_folder(out: str | os.PathLike) -> Path:
    """``--out`` as a folder path: not an empty string, not an existing file, not below one, and
    in a folder this process can write in (its nearest existing folder is tried with a temporary
    file: a read-only file system is refused before any work).

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
    parent = _nearest_folder(out)
    try:  # a read-only file system or folder would otherwise fail only once the work is done
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"`--out` {out}: cannot write in {parent}: {e.strerror or e}") from None
    return out


def check_outputs(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *, overwrite: bool = False,
                  needed_bytes: int = 0) -> Path:
    """Refuse, before any work, an output folder that would lose something.

    Every name of :data:`OUTPUT_FILES` counts, whichever ``--outputs`` set the run writes:
    :func:`write_outputs` replaces the set's files and removes the others of an earlier run, so
    that ``out`` never mixes two runs' files.

    Args:
        out: the ``--out`` folder. inputs: ``{argument name: path}`` of every input file.
        overwrite: allow replacing (or removing) the files of :data:`OUTPUT_FILES` in ``out``.
        needed_bytes: a rough size of the outputs, checked against the free disk space.

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: ``out`` empty or an existing file; an input among the outputs (always,
            even with ``overwrite``); earlier results in ``out`` without ``overwrite``; a folder
            this process cannot write in (read-only, no permission); not enough free disk
            space. Each message names the argument.
    """
    out = output_folder(out)
    targets = {(out / n).resolve() for n in OUTPUT_FILES}
    for arg, path in inputs.items():
        if path is not None and Path(path).resolve() in targets:
            raise ValueError(f"`{arg}` is {path}, which `--out` {out} would overwrite; choose another --out")
    earlier = [n for n in OUTPUT_FILES if (out / n).exists()]
    if earlier and not overwrite:
        raise ValueError(f"`--out` {out} already holds results of an earlier run ({', '.join(earlier)});"
                         " pass --overwrite to replace them or choose a new --out")
    parent = _nearest_folder(out)
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes:
        raise ValueError(f"`--out`: {free / 2**20:.0f} MB free on the disk of {parent}, the outputs need about"
                         f" {needed_bytes / 2**20:.0f} MB")
    return out


def parse_eval_labels(value: LabelPolicy) -> LabelPolicy:
    """The CLI's ``--eval-labels`` string as a label policy of
    :func:`hybridreg.metrics.scored_labels`: ``"auto"`` and ``"all"`` as they are, ``"2,3,4"``
    as ``[2, 3, 4]``; a policy that is not a string is returned unchanged.

    Raises:
        ValueError: a string that is none of these, naming ``--eval-labels``.
    """
    if not isinstance(value, str) or value in ("auto", "all"):
        return value
    try:
        return [int(t) for t in value.split(",")]
    except ValueError:
        raise ValueError(f"`--eval-labels` must be 'auto', 'all' or comma-separated ints, got {value!r}") from None


def read_inputs(fixed: str | os.PathLike, moving: str | os.PathLike, fixed_labels: str | os.PathLike | None = None,
                moving_labels: str | os.PathLike | None = None, eval_labels: LabelPolicy = "auto", *,
                fixed_mask: str | os.PathLike | None = None, moving_mask: str | os.PathLike | None = None,
                fixed_landmarks: str | os.PathLike | None = None,
                moving_landmarks: str | os.PathLike | None = None) -> Inputs:
    """Read and check a pair: FIXED and MOVING on any grids (own size, spacing, origin,
    direction; same dimension), each label map and mask on its own image's grid.

    NaN voxels of FIXED or MOVING mean "no data" (SPM, for one, writes NaN outside the brain):
    they are filled with the image's lowest value (flat background for the affine stage) and
    left out of the deformable stage's image match (:meth:`Inputs.match_mask`);
    ``Inputs.nan_voxels`` counts them.

    Args:
        eval_labels: label policy of :func:`hybridreg.metrics.scored_labels`, or the CLI's
            ``--eval-labels`` string (``auto``, ``all`` or ``2,3,...``).
        fixed_mask, moving_mask: binary (0/1) masks restricting the image match.
        fixed_landmarks, moving_landmarks: corresponding points, one per row
            (:func:`hybridreg.io.read_landmarks`: LPS mm, or voxel indices of their image),
            scored by TRE.

    Raises:
        FileNotFoundError, ValueError: missing or corrupt files, images of different
            dimensions, an image with one voxel along an axis, a label map or mask not on its
            image's grid, Inf, an image with no number (every voxel NaN, or every one inside
            its mask), labels given for one image only or sharing no label, empty or non-binary
            masks, landmarks given for one image only or in different numbers; each names its
            argument.
    """
    f_arr, f_geo = read_image(fixed, arg="FIXED", nan="keep")
    m_arr, m_geo = read_image(moving, arg="MOVING", nan="keep")
    if f_geo.dim != m_geo.dim:
        raise ValueError(f"`MOVING` is {m_geo.dim}D but `FIXED` is {f_geo.dim}D")
    for name, geo in (("FIXED", f_geo), ("MOVING", m_geo)):
        if min(geo.size) < 2:  # no derivative (the prior, the Jacobian) along an axis of one voxel
            raise ValueError(f"`{name}` has one voxel along an axis (size {'x'.join(map(str, geo.size))}): a {geo.dim}D image"
                             f" needs at least 2 along every axis; save a single slice as a {geo.dim - 1}D image")
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("`--fixed-labels` and `--moving-labels` must be given together")
    on_grid = {}
    for arg, path, geo, name in (("--fixed-labels", fixed_labels, f_geo, "FIXED"), ("--moving-labels", moving_labels, m_geo, "MOVING"),
                                 ("--fixed-mask", fixed_mask, f_geo, "FIXED"), ("--moving-mask", moving_mask, m_geo, "MOVING")):
        if path is not None:
            arr, g = read_labels(path, arg=arg)
            check_same_grid(geo, g, (name, arg))
            if "mask" in arg:
                values = np.unique(arr)
                if not arr.any() or len(values) > 2:  # 0 and one foreground value: 1, or 255 as image editors save it
                    raise ValueError(f"`{arg}`: {path} must be a binary mask (0 and one other value, such as 1 or 255)"
                                     f" with at least one voxel of it, got values {values.tolist()[:5]}")
                arr = (arr > 0).astype(arr.dtype)
            on_grid[arg] = arr
    fl, ml = on_grid.get("--fixed-labels"), on_grid.get("--moving-labels")
    labels: tuple[int, ...] = ()
    eval_labels = parse_eval_labels(eval_labels)  # checked with or without label maps
    if fl is not None:
        try:
            labels = scored_labels(fl, ml, eval_labels)
        except ValueError as e:
            raise ValueError(f"`--eval-labels` / `--fixed-labels` / `--moving-labels`: {str(e).removeprefix('`labels`: ')}") from None
    nans = {}
    for name, arr, mask_arg in (("FIXED", f_arr, "--fixed-mask"), ("MOVING", m_arr, "--moving-mask")):
        nan = np.isnan(arr)
        if nan.any():
            valid = ~nan if mask_arg not in on_grid else (on_grid[mask_arg] > 0) & ~nan
            if not valid.any():
                raise ValueError(f"`{name}` holds no number inside `{mask_arg}`: its voxels there are NaN (no data)"
                                 if mask_arg in on_grid else f"`{name}` holds no number: every voxel is NaN (no data)")
            arr[nan] = arr[~nan].min()
            nans[name] = nan
        if float(arr.max()) == float(arr.min()):
            raise ValueError(f"`{name}` is constant: there is nothing to register")
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ValueError("`--fixed-landmarks` and `--moving-landmarks` must be given together")
    fp = mp = None
    if fixed_landmarks is not None:
        fp = read_landmarks(fixed_landmarks, f_geo, arg="--fixed-landmarks")
        mp = read_landmarks(moving_landmarks, m_geo, arg="--moving-landmarks")
        if len(fp) != len(mp):
            raise ValueError(f"`--moving-landmarks` holds {len(mp)} points but `--fixed-landmarks` {len(fp)}: the rows"
                             " of the two files are corresponding points")
    paths = {"fixed": str(fixed), "moving": str(moving), "fixed_labels": str(fixed_labels) if fixed_labels else None,
             "moving_labels": str(moving_labels) if moving_labels else None,
             "fixed_mask": str(fixed_mask) if fixed_mask else None, "moving_mask": str(moving_mask) if moving_mask else None,
             "fixed_landmarks": str(fixed_landmarks) if fixed_landmarks else None,
             "moving_landmarks": str(moving_landmarks) if moving_landmarks else None}
    warnings = [*placement_warnings(fixed, f_geo, arg="FIXED"), *placement_warnings(moving, m_geo, arg="MOVING")]
    return Inputs(f_arr, m_arr, f_geo, fl, ml, labels, paths, m_geo, on_grid.get("--fixed-mask"), on_grid.get("--moving-mask"),
                  fp, mp, nans.get("FIXED"), nans.get("MOVING"), warnings)


@dataclass
class Prealigned:
    """The affine stage's result: ``transform`` (FIXED → MOVING physical points, LPS mm),
    ``voxel_map`` ``(d, d + 1)`` (FIXED voxel index → MOVING voxel index, array order) and the
    :class:`hybridreg.affine.AffineResult` (parameters, metric, seconds). ``voxel_map`` is
    ``None`` when the grids are equal and no affine stage ran: the same-grid path."""

    transform: sitk.Transform
    voxel_map: np.ndarray | None
    result: AffineResult


def prealign(inputs: Inputs, kind: str = "affine", init: str = "geometry", metric: str = "ncc") -> Prealigned:
    """The affine stage (:func:`hybridreg.affine.align`: SimpleITK, masks applied) and the
    voxel map through which the deformable stage samples MOVING on its own grid.

    Raises:
        ValueError: as :func:`hybridreg.affine.align` (bad option, masks, no overlap, singular).
    """
    res = align(inputs.image("fixed"), inputs.image("moving"), kind=kind, init=init, metric=metric,
                fixed_mask=inputs.image("fixed_mask"), moving_mask=inputs.image("moving_mask"),
                levels_mm=tuple(mm * inputs.scale for mm in LEVELS_MM))
    same = kind == "none" and inputs.geometry.matches(inputs.moving_geometry, tol=1e-6)
    vmap = None if same else voxel_map(inputs.geometry, inputs.moving_geometry, res.transform)
    return Prealigned(res.transform, vmap, res)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MB so far: ``torch.cuda.max_memory_allocated`` on a GPU, the process's
    peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_solver_pairs(solver: Solver, config: Any, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float],
                     device: torch.device | None = None, **grids) -> list[Solved | DivergenceError]:
    """Run ``solver.register_pair`` on a batch of B pairs at once, time it, and judge each
    pair's result on its own (:func:`hybridreg.solvers.divergence`): the one place every caller
    registers pairs (through :func:`run_solver`, :func:`solve` and :func:`solve_pairs`).

    Args:
        fixed, moving: ``(B, C, *spatial)`` images, intensities about [0, 1].
        spacing: voxel size in mm per tensor axis. device: default the inputs' device.
        grids: ``moving_map``, ``moving_spacing``, ``fixed_mask``, ``moving_mask`` for a moving
            image on its own grid and masks, ``fixed_direction`` for FIXED's orientation
            (:meth:`hybridreg.solvers.Solver.register_pair`).

    Returns:
        Per pair, its :class:`Solved` (:meth:`RegistrationResult.pair`), or the
        :class:`DivergenceError` naming why it is not a registration.
    """
    dev = torch.device(device) if device is not None else fixed.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    synchronize(dev)  # the clock reads once the device has finished (a GPU runs kernels asynchronously)
    t0 = time.perf_counter()
    result = solver.register_pair(fixed, moving, config, spacing=spacing, device=dev, **grids)
    synchronize(dev)
    seconds = time.perf_counter() - t0
    check_result(result, fixed, solver.name)
    peak, n = peak_memory_mb(dev), result.batch_size
    out: list[Solved | DivergenceError] = []
    for b in range(n):
        pair = result.pair(b)
        why = divergence(pair)
        out.append(DivergenceError(f"--solver {solver.name} diverged: {why}") if why
                   else Solved(pair, seconds / n, peak, dev, config, n))
    return out


def run_solver(solver: Solver, config: Any, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float],
               device: torch.device | None = None, **grids) -> Solved:
    """:func:`run_solver_pairs` for one pair (``(1, C, *spatial)`` images): its result, or
    the error.

    Raises:
        DivergenceError: the solver diverged or collapsed (:func:`hybridreg.solvers.divergence`);
            the message names the likely cause.
        ValueError: more than one pair.
    """
    if fixed.shape[0] != 1:
        raise ValueError(f"run_solver(): one pair, got a batch of {fixed.shape[0]}: call run_solver_pairs")
    (solved,) = run_solver_pairs(solver, config, fixed, moving, spacing, device, **grids)
    if isinstance(solved, DivergenceError):
        raise solved
    return solved


def _tensor(arr: np.ndarray | None) -> torch.Tensor | None:
    return None if arr is None else torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]


def batch_key(inputs: Inputs, pre: Prealigned | None = None) -> tuple:
    """What pairs solved in one batch (:func:`solve_pairs`) must share: the fixed and moving
    grids' shapes and spacings, the fixed grid's direction, whether MOVING is sampled through
    an affine map. (A pair without a mask is matched on a mask of ones: the same energy.)"""
    moving_geo = inputs.moving_geometry or inputs.geometry
    return (inputs.fixed.shape, tuple(np.round(inputs.geometry.array_spacing, 6)),
            tuple(np.round(inputs.geometry.direction, 6)), inputs.moving.shape, tuple(np.round(moving_geo.array_spacing, 6)),
            pre is not None and pre.voxel_map is not None)


def solve_pairs(inputs: Sequence[Inputs], solver: Solver, config: Any, device: torch.device,
                pre: Sequence[Prealigned | None] | None = None) -> list[Solved | DivergenceError]:
    """Normalise each pair's images (:func:`hybridreg.io.normalize_intensity`) and solve them
    together (:func:`run_solver_pairs`) on ``device`` with the fixed grid's spacing (array
    order, mm; over :attr:`Inputs.scale` for a small object, the histories' spacings given back
    in true mm) and direction; with ``pre``, each MOVING stays on its own grid and is sampled
    through its ``voxel_map``; masks (:meth:`Inputs.match_mask`) restrict the image match.

    Raises:
        ValueError: pairs that cannot share a batch (:func:`batch_key` differs), or
            ``lambda_mode: regions`` for a pair without FIXED's labels.
    """
    pre = list(pre) if pre is not None else [None] * len(inputs)
    keys = {batch_key(i, p) for i, p in zip(inputs, pre)}
    if len(keys) != 1:
        raise ValueError(f"solve_pairs(): the pairs of a batch must share their grids and affine mapping,"
                         f" got {len(keys)} kinds")
    cat = lambda arrays: torch.cat([_tensor(a) for a in arrays])  # noqa: E731
    scale = inputs[0].scale  # the pairs share their grids (batch_key)
    grids: dict[str, Any] = dict(fixed_direction=inputs[0].geometry.direction)
    if pre[0] is not None and pre[0].voxel_map is not None:
        grids.update(moving_map=torch.stack([torch.from_numpy(p.voxel_map) for p in pre]),
                     moving_spacing=tuple(h / scale for h in inputs[0].moving_geometry.array_spacing))
    for which in ("fixed", "moving"):
        masks = [i.match_mask(which) for i in inputs]
        if any(m is not None for m in masks):  # a pair without one: ones, the same energy (the fields of view stay)
            grids[f"{which}_mask"] = cat([np.ones(getattr(i, which).shape, np.float32) if m is None else m
                                          for i, m in zip(inputs, masks)])
    if getattr(config, "lambda_mode", None) == "regions":  # one λ per structure of FIXED's labels (method §3.2)
        if any(i.fixed_labels is None for i in inputs):
            raise ValueError("`--fixed-labels` is required with lambda_mode 'regions' or `--region-lambda` (one λ per"
                             " labelled structure)")
        grids["regions"] = torch.cat([torch.from_numpy(np.ascontiguousarray(i.fixed_labels)).long()[None, None] for i in inputs])
    solved = run_solver_pairs(solver, config, cat([normalize_intensity(i.fixed) for i in inputs]),
                              cat([normalize_intensity(i.moving) for i in inputs]),
                              tuple(h / scale for h in inputs[0].geometry.array_spacing), device, **grids)
    return solved if scale == 1.0 else [s if isinstance(s, DivergenceError) else _in_true_mm(s, scale) for s in solved]


def _in_true_mm(solved: Solved, scale: float) -> Solved:
    """``solved`` with its levels' voxel sizes in true mm (the solver saw them over ``scale``)."""
    rescale = lambda hs: None if hs is None else [replace(h, spacing=tuple(x * scale for x in h.spacing)) for h in hs]  # noqa: E731
    res = solved.result
    return replace(solved, result=replace(res, history=rescale(res.history),
                                          pair_histories=[rescale(hs) for hs in res.pair_histories] if res.pair_histories else None))


def solve(inputs: Inputs, solver: Solver, config: Any, device: torch.device, pre: Prealigned | None = None) -> Solved:
    """:func:`solve_pairs` for one pair.

    Raises:
        DivergenceError: the solver diverged or collapsed.
    """
    (solved,) = solve_pairs([inputs], solver, config, device, [pre])
    if isinstance(solved, DivergenceError):
        raise solved
    return solved


def measure(inputs: Inputs, solved: Solved, solver_name: str, pre: Prealigned | None = None, *,
            with_hd95: bool = True) -> dict:
    """The ``metrics.json`` dictionary: inputs and their grids, the affine stage (kind, matrix,
    translation, centre, metric, seconds), Jacobian and λ statistics, seconds per stage, peak
    memory, every stage's history, the warnings (:func:`hybridreg.solvers.result_warnings`),
    the config, (with labels) Dice before registration,
    after the affine stage and after registration, per label, and HD95 (mm), and (with
    landmarks) the TRE (mm) at the same three points (:func:`hybridreg.metrics.tre_stages`)."""
    res, dev = solved.result, solved.device
    disp = res.displacement.detach()
    lam = res.lambda_on_image_grid()[0, 0].cpu().numpy()
    metrics: dict = {
        "hybridreg_version": __version__,
        "solver": solver_name,
        "device": str(dev),
        "physical_scale": inputs.scale,  # < 1: a small object, registered as if larger (hybridreg.io.physical_scale)
        "inputs": {**inputs.paths, "grid": inputs.geometry.to_dict(),
                   "moving_grid": (inputs.moving_geometry or inputs.geometry).to_dict(),
                   "nan_voxels": dict(inputs.nan_voxels)},  # treated as outside the image (read_inputs)
        "jacobian_method": "central differences (torch.gradient), whole image grid",
        # the solver's λ strategy, or for a network's λ (learned, its refinement, learned-lambda) what the result holds;
        # map: "mean" is the pair's MAP estimate
        "lambda": {"mode": getattr(solved.config, "lambda_mode", None)
                   or ("uniform" if float(np.ptp(lam)) <= 1e-6 * float(np.abs(lam).max()) else "voxelwise"),
                   "mean": float(lam.mean()), "std": float(lam.std()), "min": float(lam.min()), "max": float(lam.max())},
        "seconds": {"registration": solved.seconds},
        "batch_size": solved.batch_size,
        "peak_memory_mb": solved.peak_memory_mb,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "process peak RSS (ru_maxrss) up to the end of the registration (the outputs' writing not included)",
        "levels": [
            {"spacing_mm": list(h.spacing), "shape": list(h.shape), "control_shape": list(h.control_shape),
             "iterations": h.iterations, "status": h.status, "seconds": h.seconds,
             "final_total": h.terms["total"][-1] if h.terms.get("total") else None, "kept_start": h.kept_start}
            for h in res.history
        ],
        # the inputs' placements other tools may read otherwise, levels that kept their start: what to check (the CLI prints them)
        "warnings": [*inputs.warnings, *result_warnings(res)],
        "final_terms": res.final_terms,
        "config": to_dict(solved.config),
        # the command, versions, machine and the inputs' (and a network's weights') bytes: what a rerun needs to repeat it
        "provenance": provenance.record({**inputs.paths, "weights": provenance.weights_file(solved.config)}, str(dev)),
    }
    named = getattr(solved.config, "region_lambda", None)
    if named and inputs.fixed_labels is not None:  # a label FIXED does not hold is most likely a typo
        absent = sorted(set(int(k) for k in named) - set(np.unique(inputs.fixed_labels).tolist()))
        if absent:
            metrics["warnings"].append(f"`--region-lambda` names labels that FIXED's label map does not hold, whose λ was"
                                       f" not used: {', '.join(map(str, absent))}")
    if pre is not None:
        metrics["affine"] = pre.result.to_dict()
        metrics["seconds"]["affine"] = float(sum(pre.result.seconds.values()))
    t0 = time.perf_counter()
    if inputs.fixed_labels is None:
        metrics.update(jacobian_stats(disp))
    else:
        vm = None if pre is None or pre.voxel_map is None else torch.from_numpy(pre.voxel_map)[None]
        labels, fl, ml = list(inputs.labels), inputs.fixed_labels, inputs.moving_labels
        s = score_registration(fl, ml, disp, labels, spacing=inputs.geometry.array_spacing, with_hd95=with_hd95, voxel_map=vm)
        metrics.update({k: s[k] for k in ("folding_percent", "ndv_percent", "sdlogj", "jacobian_min", "jacobian_max")})
        inside = lam[fl > 0]
        metrics["lambda"].update({"mean_inside_fixed_labels": float(inside.mean()), "std_inside_fixed_labels": float(inside.std())})
        if metrics["lambda"]["mode"] == "regions":
            metrics["lambda"]["per_region"] = {str(k): float(lam[fl == k].mean()) for k in np.unique(fl).tolist()}
        if vm is None:
            before = score_dice(fl, ml, policy=labels)
            before = {"mean": before["mean"], "per_label": {str(k): v for k, v in before["per_label"].items()}}
        else:  # as the scans lie in physical space, then after the affine stage alone
            physical = torch.from_numpy(voxel_map(inputs.geometry, inputs.moving_geometry, sitk.AffineTransform(fl.ndim)))[None]
            before = dice_through(fl, ml, physical, labels)
            metrics["dice_after_affine"] = dice_through(fl, ml, vm, labels)
        metrics["labels_scored"] = labels
        metrics["dice_before"] = before
        metrics["dice_after"] = {"mean": s["dice_mean"], "per_label": {str(k): v for k, v in s["dice"].items()}}
        if with_hd95:
            metrics["hd95_mm_after"] = hd95_summary(s)
    if inputs.fixed_landmarks is not None:
        affine_t = pre.transform if pre is not None else sitk.AffineTransform(inputs.geometry.dim)
        metrics["tre_mm"] = tre_stages(inputs.fixed_landmarks, inputs.moving_landmarks, affine_t, disp[0].cpu().numpy(),
                                       inputs.geometry)
    metrics["seconds"]["metrics"] = time.perf_counter() - t0
    return metrics


def write_outputs(out: str | os.PathLike, inputs: Inputs, solved: Solved, metrics: dict, pre: Prealigned,
                  names: Sequence[str] = OUTPUT_FILES, *, overwrite: bool = True) -> None:
    """Write the files ``names`` (of :data:`OUTPUT_FILES`) into ``out``: staged in a hidden
    folder inside ``out`` (or beside it when it does not exist yet: either way on the file system
    of ``out``, a mount point included), moved into place only when all are written (a failure
    leaves ``out`` as it was), with ``metrics.json`` moved last, so that its presence marks a
    finished folder; the other files of an earlier run in ``out`` (``--overwrite``) are removed.
    Without ``overwrite``, results that appeared in ``out`` while this run worked (another run
    given the same ``--out``, after :func:`check_outputs` had found it free) are kept and this
    run's are not moved in. Staging folders left by a killed run (``SIGKILL``: no clean-up ran) are
    removed once no process holds their lock (:func:`remove_stale_staging`).
    Only what the files need is computed (the inverse only for the ``inverse_*`` files). The image
    files are written in parallel, on ``torch.get_num_threads()`` threads (at 1 mm: 10.4–11.2 s of
    writing against 13.8–14.2 s on one thread, for 100–200 MB more peak memory; ``docs/results.md``),
    the transform files (:data:`TRANSFORM_FILES`) one after the other on the calling thread,
    with the figure: ITK's HDF5 transform writer is not thread-safe.

    Files (every transform maps FIXED physical points to MOVING ones, LPS mm, ITK's and ANTs'
    convention for resampling MOVING onto FIXED; the inverses map back):
    ``warped.nii.gz`` (MOVING resampled once, linearly, by SimpleITK through ``transform.h5``'s
    affine ∘ (id + D) onto the fixed grid; MOVING's lowest value outside it: :func:`hybridreg.io.resample`), ``displacement.nii.gz`` (D: ITK
    displacement field, mm, on the fixed grid, applied before the affine), ``affine.mat``
    (ITK/ANTs), ``transform.h5`` (the whole map ``p ↦ affine(p + D(p))`` as one ITK composite
    transform), ``inverse_displacement.nii.gz`` (Dinv from exp(−v)), ``inverse_transform.h5``
    (MOVING → FIXED), ``lambda.nii.gz``, ``jacobian.nii.gz`` (det J of id + D), ``metrics.json``,
    ``figure.png``, ``config.yaml``.

    Raises:
        OSError: the file system refused (the staging folder is removed, ``out`` untouched).
        ValueError: without ``overwrite``, ``out`` came to hold results while this run worked
            (naming ``--out``; ``out`` untouched).
    """
    out = Path(out)
    t0 = time.perf_counter()
    names = [n for n in OUTPUT_FILES if n in set(names)]
    res, geo = solved.result, inputs.geometry
    disp = res.displacement.detach()
    disp_np = disp[0].cpu().numpy()
    inv_np = res.inverse_displacement(INVERSE_TOLERANCE_MM * inputs.scale / max(geo.spacing))[0].cpu().numpy() \
        if any(n.startswith("inverse_") for n in names) else None
    vm = None if pre.voxel_map is None else torch.from_numpy(pre.voxel_map)[None].to(solved.device)
    # the figure's MOVING after the affine stage: normalised first, so that the warp's 0 outside MOVING's field of
    # view is its lowest value, as in warped.nii.gz (CT's air, not water)
    moving = torch.from_numpy(normalize_intensity(inputs.moving))[None, None].to(solved.device)
    forward = (composite(pre.transform, displacement_to_itk(disp_np, geo))  # what transform.h5 holds
               if {"transform.h5", "warped.nii.gz", "figure.png"} & set(names) else None)
    # MOVING resampled by SimpleITK through that very transform, so that `hybridreg apply` (and sitk.Resample with
    # MOVING's lowest value as the default) with transform.h5 reproduce warped.nii.gz exactly, at MOVING's field-of-view edge too (the solver's own warp fades to
    # 0 over the voxel beyond MOVING's outermost voxel centres, ITK keeps the edge value up to half a voxel)
    warped = (sitk.GetArrayFromImage(resample(inputs.image("moving"), forward, geo, check_overlap=False))
              if {"warped.nii.gz", "figure.png"} & set(names) else None)
    lam = res.lambda_on_image_grid()[0, 0].cpu().numpy() if {"lambda.nii.gz", "figure.png"} & set(names) else None
    jac = jacobian_determinant(disp)[0].cpu().numpy() if {"jacobian.nii.gz", "figure.png"} & set(names) else None
    writers = {
        "warped.nii.gz": lambda p: write_image(p, warped, geo),
        "displacement.nii.gz": lambda p: write_displacement(p, disp_np, geo),
        "inverse_displacement.nii.gz": lambda p: write_displacement(p, inv_np, geo),
        "affine.mat": lambda p: write_affine(p, pre.transform),
        "transform.h5": lambda p: write_transform(p, forward),
        "inverse_transform.h5": lambda p: write_transform(p, inverse_composite(pre.transform, displacement_to_itk(inv_np, geo))),
        "lambda.nii.gz": lambda p: write_image(p, lam, geo),
        "jacobian.nii.gz": lambda p: write_image(p, jac, geo),
        "figure.png": lambda p: _figure(p, inputs, metrics, warped, lam, disp_np, jac, moving, disp, vm),
        "config.yaml": lambda p: dump_yaml(solved.config, p, header=(
            f"The configuration of --solver {metrics['solver']} in this run (hybridreg {__version__}). Repeat the run with\n"
            f"  hybridreg register FIXED MOVING --solver {metrics['solver']} --config config.yaml [options]\n"
            "where the options (the affine stage, masks, label maps, --eval-labels, landmarks) are the run's own:"
            " metrics.json's\nprovenance.command holds its command line.")),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # staged on the file system of ``out`` (os.replace cannot cross file systems): inside ``out``
    # when it exists, which may be a mount point (a container's volume), else beside it
    # (it holds a lock file this process keeps locked: a later run removes a folder whose lock it can take, one a
    # SIGKILL left behind)
    remove_stale_staging(out)
    stage = Path(tempfile.mkdtemp(dir=out if out.is_dir() else out.parent, prefix=_staging_prefix(out)))
    lock = None
    try:
        lock = open(stage / STAGING_LOCK, "w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # SimpleITK releases the GIL while it compresses (two 1 mm displacement fields: 2.2 s in
        # parallel against 4.2 s one after the other); the figure (matplotlib) and ITK's transform
        # files stay on this thread, one after the other: its HDF5 writer is not thread-safe (two
        # transform.h5 files written at once crashed the process)
        here = [n for n in names if n in ("figure.png", "config.yaml") or n in TRANSFORM_FILES]
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            files = [pool.submit(writers[n], stage / n) for n in names if n not in here and n != "metrics.json"]
            for name in here:
                writers[name](stage / name)
            for f in files:
                f.result()  # a writer's error (e.g. a full disk) is raised here; the staging folder goes
        metrics["outputs"] = list(names)
        metrics["seconds"]["writing"] = time.perf_counter() - t0
        metrics["seconds"]["total"] = metrics["seconds"].get("total", 0.0) + time.perf_counter() - t0
        write_json(stage / "metrics.json", metrics)
        out.mkdir(parents=True, exist_ok=True)
        earlier = [n for n in OUTPUT_FILES if (out / n).exists()]
        if earlier and not overwrite:  # check_outputs found none: another run wrote them since
            raise ValueError(f"`--out` {out}: another run wrote results there while this one worked"
                             f" ({', '.join(earlier)}); they are kept and this run's were not written: give each run"
                             " its own --out, or pass --overwrite")
        # an earlier run's files go first (metrics.json before the others), the new metrics.json comes last:
        # a folder holding metrics.json is always one finished run's
        for name in sorted(OUTPUT_FILES, key=lambda n: n != "metrics.json"):
            if name not in names:
                (out / name).unlink(missing_ok=True)
        for name in sorted(names, key=lambda n: n == "metrics.json"):
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if lock is not None:
            lock.close()


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


STAGING_LOCK = ".lock"
"""The file inside a staging folder that its run keeps locked (``fcntl.flock``) while it writes."""


def remove_stale_staging(out: str | os.PathLike, *, min_age_s: float = 10.0) -> list[Path]:
    """Remove the staging folders of ``out`` (:func:`write_outputs`: ``.<name>.partial-*``, inside
    ``out`` or beside it) that no running process holds: what a run killed with ``SIGKILL`` (or by the
    out-of-memory killer) while writing leaves behind. A run keeps its folder's :data:`STAGING_LOCK`
    locked while it writes, and the kernel releases the lock when the process ends, whichever way
    (and in whichever PID namespace); a folder whose lock this call can take is stale. Folders
    without a lock file (of an earlier version) and folders younger than ``min_age_s`` (their run may
    not have taken its lock yet) stay.

    Returns:
        The folders removed.
    """
    out = Path(out)
    removed = []
    for parent in (out, out.parent):
        if not parent.is_dir():
            continue
        for q in parent.glob(f"{_staging_prefix(out)}*"):
            lock_path = q / STAGING_LOCK
            try:
                if q.is_symlink() or time.time() - lock_path.stat().st_mtime < min_age_s:
                    continue
                with open(lock_path, "a") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its run is alive
                    shutil.rmtree(q, ignore_errors=True)
            except OSError:  # no lock file, a live run's lock, or removed meanwhile
                continue
            removed.append(q)
    return removed


def _figure(path: Path, inputs: Inputs, metrics: dict, warped: np.ndarray, lam: np.ndarray, disp_np: np.ndarray,
            jac: np.ndarray, moving: torch.Tensor, disp: torch.Tensor, vm: torch.Tensor | None) -> None:
    from .figures import registration_figure

    affine_only = warp(moving, torch.zeros_like(disp), voxel_map=vm)[0, 0].cpu().numpy()
    title = f"{Path(inputs.paths['moving']).name} → {Path(inputs.paths['fixed']).name}"
    if "dice_after" in metrics:
        title += f"   Dice {metrics['dice_before']['mean']:.3f} → {metrics['dice_after']['mean']:.3f}"
    registration_figure(path, normalize_intensity(inputs.fixed), normalize_intensity(affine_only),
                        normalize_intensity(warped), lam, disp_np, jac, inputs.geometry.array_spacing, title=title,
                        direction=inputs.geometry.direction, moving_title="moving" if vm is None else "moving, affine only")


def hd95_summary(scores: dict) -> dict:
    """``metrics.json``'s ``hd95_mm_after`` from :func:`hybridreg.metrics.score_registration`'s
    ``scores``: ``mean`` (mm, over the structures whose HD95 is finite), ``structures`` (how many
    that is), ``lost`` (the labels the warped moving map no longer holds) and ``per_label``."""
    return {"mean": scores["hd95_mean"], "structures": len(scores["hd95"]) - len(scores["hd95_lost"]),
            "lost": scores["hd95_lost"], "per_label": {str(k): v for k, v in scores["hd95"].items()}}


def align_solve_measure(inputs: Inputs, solver: Solver, config: Any, device: torch.device, *, affine: str = "affine",
                        init: str = "geometry", affine_metric: str = "ncc",
                        with_hd95: bool = True) -> tuple[Prealigned, Solved, dict]:
    """The stages of :func:`register_files` that make and score a result, without writing:
    :func:`prealign`, :func:`solve`, :func:`measure` (the benchmarks call this directly).

    Raises:
        as :func:`prealign` and :func:`solve` (a failed affine stage, a diverged solver).
    """
    pre = prealign(inputs, affine, init, affine_metric)
    solved = solve(inputs, solver, config, device, pre)
    return pre, solved, measure(inputs, solved, solver.name, pre, with_hd95=with_hd95)


@dataclass
class Prepared:
    """A pair ready for the solver: its output folder ``out`` and files ``names`` (checked),
    its :class:`Inputs`, the affine stage's :class:`Prealigned`, and ``reading_seconds``."""

    out: Path
    names: tuple[str, ...]
    inputs: Inputs
    pre: Prealigned
    reading_seconds: float
    overwrite: bool = False


def prepare_pair(fixed: str | os.PathLike, moving: str | os.PathLike, out: str | os.PathLike, *,
                 fixed_labels: str | os.PathLike | None = None, moving_labels: str | os.PathLike | None = None,
                 fixed_mask: str | os.PathLike | None = None, moving_mask: str | os.PathLike | None = None,
                 eval_labels: LabelPolicy = "auto", outputs: str = "all", overwrite: bool = False,
                 affine: str = "affine", init: str = "geometry", affine_metric: str = "ncc",
                 config: str | os.PathLike | None = None, weights: str | None = None,
                 fixed_landmarks: str | os.PathLike | None = None, moving_landmarks: str | os.PathLike | None = None,
                 region_lambda: str | os.PathLike | None = None) -> Prepared:
    """The stages of :func:`register_files` before the solver: :func:`check_outputs` (``config``,
    ``weights`` and ``region_lambda`` only to keep them from being overwritten), :func:`read_inputs`,
    :func:`prealign`.

    Raises:
        as :func:`register_files` (nothing is written).
    """
    names = output_names(outputs)
    given = {"FIXED": fixed, "MOVING": moving, "--fixed-labels": fixed_labels, "--moving-labels": moving_labels,
             "--fixed-mask": fixed_mask, "--moving-mask": moving_mask, "--fixed-landmarks": fixed_landmarks,
             "--moving-landmarks": moving_landmarks, "--config": config, "--weights": weights, "--region-lambda": region_lambda}
    check_outputs(out, given, overwrite=overwrite)
    t_read = time.perf_counter()
    inputs = read_inputs(fixed, moving, fixed_labels, moving_labels, eval_labels, fixed_mask=fixed_mask, moving_mask=moving_mask,
                         fixed_landmarks=fixed_landmarks, moving_landmarks=moving_landmarks)
    t_read = time.perf_counter() - t_read
    check_outputs(out, given, overwrite=overwrite, needed_bytes=output_bytes(names, inputs.fixed.size, inputs.fixed.ndim))
    return Prepared(Path(out), names, inputs, prealign(inputs, affine, init, affine_metric), t_read, overwrite)


def finish_pair(prepared: Prepared, solved: Solved, solver_name: str, *, with_hd95: bool = True) -> dict:
    """The stages of :func:`register_files` after the solver: :func:`measure`, then
    :func:`write_outputs`. ``seconds.total`` is the sum of the pair's stages (reading, affine,
    registration, metrics, writing).

    Returns:
        The metrics dictionary written to ``metrics.json``.
    """
    metrics = measure(prepared.inputs, solved, solver_name, prepared.pre, with_hd95=with_hd95)
    metrics["seconds"]["reading"] = prepared.reading_seconds
    metrics["seconds"]["total"] = sum(metrics["seconds"].values())
    write_outputs(prepared.out, prepared.inputs, solved, metrics, prepared.pre, prepared.names,
                  overwrite=prepared.overwrite)
    return metrics


def register_files(fixed: str | os.PathLike, moving: str | os.PathLike, out: str | os.PathLike, *,
                   fixed_labels: str | os.PathLike | None = None, moving_labels: str | os.PathLike | None = None,
                   config: str | os.PathLike | None = None, device: str | None = None, solver: str = "instance",
                   weights: str | None = None, eval_labels: LabelPolicy = "auto", progress: bool = True,
                   hd95_metric: bool = True, overwrite: bool = False, affine: str = "affine", init: str = "geometry",
                   affine_metric: str = "ncc", fixed_mask: str | os.PathLike | None = None,
                   moving_mask: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                   outputs: str = "all", fixed_landmarks: str | os.PathLike | None = None,
                   moving_landmarks: str | os.PathLike | None = None, region_lambda: str | os.PathLike | None = None) -> dict:
    """Register two scans as they come (any grids, orientations, misaligned) and write every
    output into ``out`` (:func:`write_outputs`): the affine stage (:func:`prealign`:
    ``affine`` = ``none``, ``rigid`` or ``affine``; ``init`` = ``geometry`` or ``moments``;
    ``affine_metric`` = ``ncc`` or ``mi``), then the deformable solver on FIXED's grid with
    MOVING sampled on its own grid through the affine; masks restrict the image match in both.
    ``overrides``: ``KEY=VALUE`` settings applied to the solver's config (``--set``);
    ``outputs``: which files (:data:`OUTPUT_SETS`); ``fixed_landmarks``, ``moving_landmarks``:
    corresponding points scored by TRE (:func:`read_inputs`); ``region_lambda``: a ``label: λ``
    YAML file for the conditional network (:func:`solver_and_config`). The stages: :func:`prepare_pair`,
    :func:`solve`, :func:`finish_pair`.

    Returns:
        The metrics dictionary written to ``metrics.json``.

    Raises:
        FileNotFoundError, ValueError: missing/corrupt files, Inf, all-NaN images, labels or masks off their
        image's grid, labels with nothing in common, ``eval_labels`` other than ``"auto"``
        without label maps, invalid configs, unknown solver or device, a failed affine stage, an ``out`` that would lose an input or (without
        ``overwrite``) an earlier result. Nothing is written then.
        DivergenceError: the solver diverged (nothing is written).
    """
    if not (isinstance(eval_labels, str) and eval_labels == "auto") and fixed_labels is None and moving_labels is None:
        raise ValueError("`--eval-labels` chooses the labels Dice is scored on: give --fixed-labels and --moving-labels")
    solver_obj, cfg = solver_and_config(solver, config, weights, progress, overrides, region_lambda)
    dev = device_of(device)
    prepared = prepare_pair(fixed, moving, out, fixed_labels=fixed_labels, moving_labels=moving_labels,
                            fixed_mask=fixed_mask, moving_mask=moving_mask, eval_labels=eval_labels, outputs=outputs,
                            overwrite=overwrite, affine=affine, init=init, affine_metric=affine_metric, config=config,
                            weights=weights, fixed_landmarks=fixed_landmarks, moving_landmarks=moving_landmarks,
                            region_lambda=region_lambda)
    return finish_pair(prepared, solve(prepared.inputs, solver_obj, cfg, dev, prepared.pre), solver_obj.name,
                       with_hd95=hd95_metric)
