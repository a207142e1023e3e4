"""Training/evaluation data sources for the learned solver: one in-memory
:class:`RegistrationDataset` from the bundled data, a CSV/JSON manifest, the OASIS layout of
neurite / Learn2Reg, or the IXI layout of TransMorph's preprocessed release.

Every source returns volumes on **one grid** (pairs are assumed affinely pre-aligned, as in
all four sources), intensities mapped to about [0, 1] by
:func:`hybridreg.io.normalize_intensity`, labels as int32 (or ``None`` when a source has
none). ``spacing=`` resamples every volume onto a grid of that voxel size with SimpleITK
(linear for images, nearest neighbour for labels), keeping the physical extent
(cell-centred: the new voxel centres tile the same box).

Layouts
-------
* ``bundled`` -- :mod:`hybridreg.data` (atlas ``vxm``, train/val/test splits), 2 mm.
* manifest -- a ``.csv`` with a header ``image,labels,split[,id]`` or a ``.json`` list (or
  ``{"subjects": [...]}``) of objects with those keys; ``split`` is ``train``, ``val``,
  ``test`` or ``atlas`` (at most one); relative paths are relative to the manifest's folder;
  ``labels`` may be empty for training subjects.
* OASIS (neurite-oasis / Learn2Reg 2021 task 3) -- a folder of
  ``OASIS_OAS1_<nnnn>_MR1/aligned_norm.nii.gz`` and ``aligned_seg35.nii.gz``. There is no
  atlas (subject-to-subject pairs); subjects sorted by name are split 80 / 10 / 10 % into
  train / val / test (at least one each).
* IXI (TransMorph's ``IXI_data``) -- ``atlas.pkl`` plus ``Train/*.pkl``, ``Val/*.pkl`` and
  ``Test/*.pkl``, each a pickled ``(image, labels)`` pair of 160×192×224 arrays at 1 mm
  (voxel order as stored; no physical geometry is recorded in that release).

Use :func:`load_dataset` with a spec string (``"bundled"``, a manifest path, or a folder
whose layout is detected).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..config import existing_file
from ..io import Geometry, check_same_grid, normalize_intensity, read_image, read_labels

__all__ = ["Volume", "RegistrationDataset", "load_dataset", "bundled", "from_manifest", "oasis", "ixi"]

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Volume:
    """One subject. ``image``: float32 ``(*spatial)`` in about [0, 1]; ``labels``: int32 of
    the same shape or ``None``; ``subject_id``: a name for logs."""

    subject_id: str
    image: np.ndarray
    labels: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class RegistrationDataset:
    """Volumes of one data source on one grid.

    Attributes:
        name: source description (for logs).
        spacing: voxel size in mm, array-axis order.
        train, val, test: the splits. atlas: the fixed image of atlas-to-subject pairs, or
        ``None`` (subject-to-subject only).
        geometry: the physical grid (``None`` where the source records none).
    """

    name: str
    spacing: tuple[float, ...]
    train: list[Volume]
    val: list[Volume] = field(default_factory=list)
    test: list[Volume] = field(default_factory=list)
    atlas: Volume | None = None
    geometry: Geometry | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(next(v for v in self.train + self.val + self.test if v is not None).image.shape)

    def pairs(self, split: str = "val") -> list[tuple[Volume, Volume]]:
        """(fixed, moving) evaluation pairs of ``split`` (``"val"`` or ``"test"``): atlas ←
        each labelled subject of the split, or (without an atlas) consecutive labelled
        subjects.

        Raises:
            ValueError: ``split`` is not ``"val"`` or ``"test"``.
        """
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        lab = [v for v in getattr(self, split) if v.labels is not None]
        if self.atlas is not None and self.atlas.labels is not None:
            return [(self.atlas, v) for v in lab]
        return [(lab[i], lab[i + 1]) for i in range(len(lab) - 1)]

    def validation_pairs(self) -> list[tuple[Volume, Volume]]:
        """``pairs("val")``: the pairs of the per-epoch validation Dice."""
        return self.pairs("val")


def _resample(arr: np.ndarray, spacing: Sequence[float], target: Sequence[float], labels: bool) -> np.ndarray:
    """SimpleITK resampling onto the cell-centred grid of voxel size ``target`` (same extent)."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in reversed(spacing)])
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(arr.shape, spacing, target)]
    ref = sitk.Image([int(n) for n in reversed(size)], img.GetPixelID())
    ref.SetSpacing([float(t) for t in reversed(target)])
    ref.SetOrigin([0.5 * (t - s) for s, t in zip(reversed(spacing), reversed(target))])
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), interp, 0.0))


def _finish(name: str, spacing: Sequence[float], splits: dict[str, list[Volume]], atlas: Volume | None,
            geometry: Geometry | None, target: Sequence[float] | None, *, require_train: bool = True) -> RegistrationDataset:
    if require_train and not splits.get("train"):
        raise ValueError(f"data source {name}: no training subjects")
    if not any(splits.values()):
        raise ValueError(f"data source {name}: no subjects")
    spacing = tuple(float(s) for s in spacing)
    if target is not None:
        target = tuple(float(t) for t in target)
        if len(target) == 1:
            target = target * len(spacing)
        if len(target) != len(spacing) or any(t <= 0 for t in target):
            raise ValueError(f"`spacing` must be one positive value or one per axis ({len(spacing)}), got {target}")

        def rs(v: Volume | None) -> Volume | None:
            if v is None:
                return None
            img = _resample(v.image, spacing, target, False).astype(np.float32)
            lab = _resample(v.labels, spacing, target, True).astype(np.int32) if v.labels is not None else None
            return Volume(v.subject_id, img, lab)

        splits = {k: [rs(v) for v in vs] for k, vs in splits.items()}
        atlas = rs(atlas)
        spacing, geometry = target, None
    shape = next(v for vs in splits.values() for v in vs).image.shape
    if min(shape) < 2:  # as the solvers refuse such images (hybridreg.solvers.check_images)
        raise ValueError(f"data source {name}: the grid {'x'.join(map(str, shape))} at {spacing} mm has an axis of one"
                         " voxel" + (": choose a smaller `spacing`" if target is not None else ""))
    for v in [atlas] + [v for vs in splits.values() for v in vs]:
        if v is None:
            continue
        if v.image.shape != shape or (v.labels is not None and v.labels.shape != shape):
            raise ValueError(f"data source {name}: subject {v.subject_id!r} has shape {v.image.shape}, "
                             f"others {shape}; all volumes must share one grid")
        if not np.isfinite(v.image).all():
            raise ValueError(f"data source {name}: subject {v.subject_id!r} contains NaN or Inf")
    return RegistrationDataset(name, spacing, splits.get("train", []), splits.get("val", []),
                               splits.get("test", []), atlas, geometry)


def bundled(resolution: int = 2, spacing: Sequence[float] | None = None) -> RegistrationDataset:
    """The bundled data (:mod:`hybridreg.data`) at ``resolution`` mm (2: every subject has
    an image; 1: only those whose 1 mm image is bundled -- the test split -- so the 1 mm
    source evaluates and cannot train). Atlas = ``vxm``."""
    from . import list_subjects, load_subject, subject_info

    splits: dict[str, list[Volume]] = {}
    for split in SPLIT_NAMES:
        ids = [s for s in list_subjects(split) if subject_info(s)["files"].get(f"t1_{resolution}mm")]
        splits[split] = []
        for s in ids:
            sub = load_subject(s, resolution)
            splits[split].append(Volume(s, normalize_intensity(sub.image), sub.labels))
    a = load_subject("vxm", resolution)
    geo = Geometry.of(sitk.ReadImage(str(a.image_path)))
    return _finish(f"bundled ({resolution} mm)", a.spacing, splits,
                   Volume("vxm", normalize_intensity(a.image), a.labels), geo, spacing, require_train=resolution == 2)


def _read_pair(image: Path, labels: Path | None, arg: str) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    img, geo = read_image(image, arg=arg)
    lab = None
    if labels is not None:
        lab, lgeo = read_labels(labels, arg=f"{arg} labels")
        check_same_grid(geo, lgeo, (arg, f"{arg} labels"))
    return normalize_intensity(img, arg=f"{arg} {image}"), lab, geo


def from_manifest(path: str | os.PathLike, spacing: Sequence[float] | None = None, *, arg: str = "path") -> RegistrationDataset:
    """Volumes listed in a CSV or JSON manifest (module docstring); ``arg`` names the manifest in
    the messages.

    Raises:
        FileNotFoundError: the manifest or a listed file is missing.
        ValueError: unreadable manifest, missing ``image``/``split`` keys, an unknown split,
            more than one atlas, images on different grids.
    """
    p = existing_file(path, arg, "manifest")
    try:
        if p.suffix.lower() == ".csv":
            with open(p, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        elif p.suffix.lower() == ".json":
            obj = json.loads(p.read_text(encoding="utf-8-sig"))
            rows = obj["subjects"] if isinstance(obj, dict) else obj
        else:
            raise ValueError(f"`{arg}`: a manifest must be .csv or .json, got {p.name}")
    except (json.JSONDecodeError, KeyError, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"`{arg}`: cannot read manifest {p}: {e}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"`{arg}`: manifest {p} lists no subjects")
    splits: dict[str, list[Volume]] = {k: [] for k in SPLIT_NAMES}
    atlas = None
    geo0: Geometry | None = None
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("image") or not row.get("split"):
            raise ValueError(f"`{arg}`: manifest {p} row {i + 1} needs non-empty `image` and `split`")
        split = str(row["split"]).strip()
        if split not in SPLIT_NAMES + ("atlas",):
            raise ValueError(f"`{arg}`: manifest {p} row {i + 1}: `split` must be train, val, test or atlas, got {split!r}")
        img_p = (p.parent / str(row["image"]).strip())
        lab_p = (p.parent / str(row["labels"]).strip()) if row.get("labels") else None
        sid = str(row.get("id") or Path(str(row["image"])).name.split(".")[0])
        img, lab, geo = _read_pair(img_p, lab_p, f"manifest row {i + 1} image")
        if geo0 is None:
            geo0 = geo
        check_same_grid(geo0, geo, ("manifest row 1 image", f"manifest row {i + 1} image"))
        v = Volume(sid, img, lab)
        if split == "atlas":
            if atlas is not None:
                raise ValueError(f"`{arg}`: manifest {p} has more than one atlas row")
            atlas = v
        else:
            splits[split].append(v)
    return _finish(f"manifest {p}", geo0.array_spacing, splits, atlas, geo0, spacing)


def _split_sorted(items: list, fractions=(0.8, 0.1)) -> dict[str, list]:
    n = len(items)
    n_val = max(1, int(round(n * fractions[1]))) if n >= 3 else 0
    n_test = n_val
    n_train = n - n_val - n_test
    return {"train": items[:n_train], "val": items[n_train:n_train + n_val], "test": items[n_train + n_val:]}


def oasis(root: str | os.PathLike, spacing: Sequence[float] | None = None, *, arg: str = "root") -> RegistrationDataset:
    """The neurite-oasis / Learn2Reg layout (module docstring); ``arg`` names ``root`` in the
    messages.

    Raises:
        FileNotFoundError: no ``OASIS_OAS1_*_MR1`` folder with ``aligned_norm.nii.gz``.
    """
    root = Path(root)
    dirs = sorted(d for d in root.glob("OASIS_OAS1_*_MR1") if (d / "aligned_norm.nii.gz").is_file())
    if not dirs:
        raise FileNotFoundError(f"`{arg}`: no OASIS_OAS1_*_MR1/aligned_norm.nii.gz under {root}")
    vols, geo0 = [], None
    for d in dirs:
        seg = d / "aligned_seg35.nii.gz"
        img, lab, geo = _read_pair(d / "aligned_norm.nii.gz", seg if seg.is_file() else None, d.name)
        geo0 = geo0 or geo
        check_same_grid(geo0, geo, (dirs[0].name, d.name))
        vols.append(Volume(d.name, img, lab))
    return _finish(f"OASIS {root}", geo0.array_spacing, _split_sorted(vols), None, geo0, spacing)


def _load_pkl(path: Path, arg: str) -> Volume:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)  # noqa: S301 -- the user's own dataset files
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise ValueError(f"`{arg}`: cannot unpickle {path}: {e}") from None
    if not isinstance(obj, (tuple, list)) or len(obj) < 1:
        raise ValueError(f"`{arg}`: {path} must hold an (image, labels) tuple")
    img = np.asarray(obj[0], dtype=np.float32)
    lab = np.asarray(obj[1]).astype(np.int32) if len(obj) > 1 and obj[1] is not None else None
    if img.ndim not in (2, 3):
        raise ValueError(f"`{arg}`: {path}: image must be 2D or 3D, got shape {img.shape}")
    return Volume(path.stem, normalize_intensity(img, arg=f"{arg} {path}"), lab)


def ixi(root: str | os.PathLike, spacing: Sequence[float] | None = None, *, arg: str = "root") -> RegistrationDataset:
    """TransMorph's preprocessed IXI layout (module docstring); voxel size 1 mm. ``arg`` names
    ``root`` in the messages.

    Raises:
        FileNotFoundError: ``atlas.pkl`` or ``Train/`` missing.
    """
    root = Path(root)
    if not (root / "atlas.pkl").is_file() or not (root / "Train").is_dir():
        raise FileNotFoundError(f"`{arg}`: {root} is not TransMorph's IXI layout (atlas.pkl, Train/, Val/, Test/)")
    splits = {k: [_load_pkl(f, arg) for f in sorted((root / d).glob("*.pkl"))]
              for k, d in (("train", "Train"), ("val", "Val"), ("test", "Test"))}
    atlas = _load_pkl(root / "atlas.pkl", arg)
    return _finish(f"IXI {root}", (1.0,) * atlas.image.ndim, splits, atlas, None, spacing)


def load_dataset(spec: str, spacing: Sequence[float] | None = None, *, arg: str = "spec") -> RegistrationDataset:
    """Open a data source from a spec: ``"bundled"`` (2 mm), ``"bundled:1"``, a ``.csv`` /
    ``.json`` manifest, or a folder in the OASIS or IXI layout (detected).

    Raises:
        FileNotFoundError: the path does not exist. ValueError: a folder in neither layout
        (the message names ``arg``: ``--data`` on the CLI, ``train_data`` in a tuning space), or
        the source's own errors.
    """
    if spec in ("bundled", "bundled:2", "bundled:1"):
        return bundled(1 if spec.endswith(":1") else 2, spacing)
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"`{arg}`: {spec!r} is neither 'bundled' nor an existing manifest or folder")
    if p.is_file():
        return from_manifest(p, spacing, arg=arg)
    if any(p.glob("OASIS_OAS1_*_MR1")):
        return oasis(p, spacing, arg=arg)
    if (p / "atlas.pkl").is_file():
        return ixi(p, spacing, arg=arg)
    raise ValueError(f"`{arg}`: folder {p} is in neither the OASIS layout (OASIS_OAS1_*_MR1/) nor the IXI layout (atlas.pkl, Train/)")
