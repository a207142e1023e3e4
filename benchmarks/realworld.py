"""The ``realworld`` development data set (issue 16): real scans of different subjects, from
different scanners, on different grids, in different orientations and intensity ranges.

Three scans, none on another's grid, none pre-aligned to another (see ``docs/realworld.md``):

* ``vxm`` -- the bundled real T1 (:func:`hybridreg.data.load_subject` ``("vxm", 1)``):
  160x192x224 (x, y, z) at 1 mm, LIA, grid centre at (0, 0, 0) mm, uint8 0..185, FreeSurfer aseg.
* ``colin27`` -- colin27 skull-stripped T1 (``ch2bet.nii.gz``) with the AAL atlas drawn on it,
  181x217x181 at 1 mm, RAS, MNI space, uint8 0..133; **fetched, never committed**
  (``python scripts/fetch_realworld.py``, Debian's ``mricron-data`` package).
* ``icbm152`` -- the ICBM152 2009a symmetric template (nilearn's skull-stripped uint8 copy),
  197x233x189 at 1 mm, RAS, MNI space, uint8 0..255, with a GM/WM label map derived from its
  tissue probability maps; committed in ``benchmarks/data/icbm152`` (derived by
  ``scripts/prepare_icbm152.py``).

Label correspondences
---------------------
* colin27/AAL <-> aseg: the 12 structures both atlases have, scored in aseg IDs
  (:data:`AAL_ASEG`, :func:`relabel_aal`, :func:`restrict_aseg`).
* ICBM152 tissue <-> aseg tissue: aseg structures grouped into GM (1) and WM (2)
  (:data:`ASEG_GM`, :data:`ASEG_WM`, :func:`aseg_to_tissue`).

:func:`realworld_pairs` lists the pairs (fixed <- moving, both directions of each scan pair)
as :class:`RealPair` records of file paths; the relabelled label maps are written on their own
image's grid into ``<root>/cache``.  This module only reads and relabels; it registers nothing.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from hybridreg.config import atomic_output
from hybridreg.io import file_sha256

__all__ = [
    "AAL_ASEG", "AAL_STANDARD_NAMES", "ASEG_GM", "ASEG_WM", "ASEG_TISSUE_EXCLUDED", "COLIN27_FILES",
    "COLIN27_LABELS", "ENV_VAR", "FETCH_COMMAND", "GM", "ICBM152_DIR", "ICBM152_FILES", "TISSUE_LABELS",
    "TISSUE_NAMES", "WM", "RealPair", "aal_to_aseg_table", "aseg_to_tissue", "cache_dir", "check_colin27",
    "colin27_missing", "default_root", "read_aal_label_list", "realworld_pairs", "relabel_aal",
    "restrict_aseg", "scan_summary",
]

#: Environment variable naming the data folder (``$HYBRIDREG_DATA/realworld``).
ENV_VAR = "HYBRIDREG_DATA"
#: The command that fetches colin27 + AAL.
FETCH_COMMAND = "python scripts/fetch_realworld.py"
#: Committed ICBM152 files (``scripts/prepare_icbm152.py``).
ICBM152_DIR = Path(__file__).resolve().parent / "data" / "icbm152"
ICBM152_FILES = {"t1": "t1_brain.nii.gz", "mask": "brain_mask.nii.gz", "tissue": "tissue_labels.nii.gz"}
#: Files ``scripts/fetch_realworld.py`` puts in the data folder (besides PROVENANCE.md, provenance.json).
COLIN27_FILES = ("ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt", "copyright")

# ----------------------------------------------------------------------------- AAL <-> aseg

#: (AAL name, index in the standard 116-region AAL numbering, FreeSurfer aseg ID).  The
#: ``mricron-data`` copy of AAL uses this numbering (its ``aal.nii.txt`` lists
#: ``index name code``, e.g. ``37 Hippocampus_L 4101``; voxel values are the index, 1..116);
#: ``_L`` structures are odd, the left hemisphere (x < 0 mm in MNI/RAS).  The aseg IDs are
#: FreeSurferColorLUT's Left-/Right- structures (17 Left-Hippocampus, 53 Right-Hippocampus...).
AAL_ASEG: tuple[tuple[str, int, int], ...] = (
    ("Hippocampus_L", 37, 17), ("Hippocampus_R", 38, 53),
    ("Amygdala_L", 41, 18), ("Amygdala_R", 42, 54),
    ("Caudate_L", 71, 11), ("Caudate_R", 72, 50),
    ("Putamen_L", 73, 12), ("Putamen_R", 74, 51),
    ("Pallidum_L", 75, 13), ("Pallidum_R", 76, 52),
    ("Thalamus_L", 77, 10), ("Thalamus_R", 78, 49),
)
#: Standard AAL index -> name, for the 12 structures of :data:`AAL_ASEG`.
AAL_STANDARD_NAMES: dict[int, str] = {idx: name for name, idx, _ in AAL_ASEG}
#: The aseg IDs colin27 <-> vxm pairs are scored on (sorted).
COLIN27_LABELS: tuple[int, ...] = tuple(sorted(a for _, _, a in AAL_ASEG))
_ASEG_NAMES = {10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum",
               17: "Left-Hippocampus", 18: "Left-Amygdala", 49: "Right-Thalamus", 50: "Right-Caudate",
               51: "Right-Putamen", 52: "Right-Pallidum", 53: "Right-Hippocampus", 54: "Right-Amygdala"}


def read_aal_label_list(path: str | os.PathLike) -> dict[int, str]:
    """Parse an AAL label list (``aal.nii.txt`` of ``mricron-data``: lines ``index name
    [code]``) into ``{index: name}``.

    Raises:
        ValueError: a line that does not start with an integer and a name, or a repeated index.
    """
    out: dict[int, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit():
            raise ValueError(f"{path}:{n}: expected 'index name [code]', got {line!r}")
        idx = int(parts[0])
        if idx in out:
            raise ValueError(f"{path}:{n}: index {idx} listed twice")
        out[idx] = parts[1]
    return out


def aal_to_aseg_table(label_list: Mapping[int, str] | None = None) -> dict[int, int]:
    """``{AAL voxel value: aseg ID}`` for the 12 shared structures.

    Args:
        label_list: the atlas's own ``{value: name}`` list (:func:`read_aal_label_list`); the
            values are then looked up by structure name, so an atlas with another numbering
            (e.g. AAL's 2001-style codes, or AAL3) maps correctly.  None: the standard
            116-region numbering (:data:`AAL_ASEG`).

    Raises:
        ValueError: a structure is missing from ``label_list`` or named twice.
    """
    if label_list is None:
        return {idx: aseg for _, idx, aseg in AAL_ASEG}
    by_name: dict[str, int] = {}
    for value, name in label_list.items():
        if name in by_name:
            raise ValueError(f"AAL label list names {name!r} twice ({by_name[name]} and {value})")
        by_name[name] = int(value)
    missing = [name for name, _, _ in AAL_ASEG if name not in by_name]
    if missing:
        raise ValueError(f"AAL label list lacks {missing}")
    return {by_name[name]: aseg for name, _, aseg in AAL_ASEG}


def _lookup(labels, table: Mapping[int, int], what: str) -> np.ndarray:
    a = np.asarray(labels)
    if a.dtype.kind not in "iub":
        if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{what}: a label map must hold integers, got dtype {a.dtype}")
        a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError(f"{what}: negative label {int(a.min())}")
    top = int(a.max()) if a.size else 0
    lut = np.zeros(max(top, max(table, default=0)) + 1, dtype=np.uint8)
    for k, v in table.items():
        lut[int(k)] = v
    return lut[a.astype(np.int64, copy=False)]


def relabel_aal(aal, table: Mapping[int, int] | None = None) -> np.ndarray:
    """An AAL label map relabelled into aseg IDs: the 12 shared structures get their aseg ID
    (:data:`AAL_ASEG`: 37 -> 17, 38 -> 53, ..., 78 -> 49), every other label 0.

    Args:
        aal: integer array (any shape) of AAL values.
        table: ``{AAL value: aseg ID}`` (default :func:`aal_to_aseg_table` ``()``, the standard
            numbering; pass ``aal_to_aseg_table(read_aal_label_list(txt))`` for another one).

    Returns:
        uint8 array of the same shape.
    """
    return _lookup(aal, aal_to_aseg_table() if table is None else table, "aal")


def restrict_aseg(aseg, keep=COLIN27_LABELS) -> np.ndarray:
    """An aseg label map with only the labels in ``keep`` (default the 12 structures shared
    with AAL), every other label set to 0; uint8 of the same shape."""
    keep = [int(k) for k in keep]
    if any(not 0 < k < 256 for k in keep):
        raise ValueError(f"keep: aseg IDs must be in 1..255, got {keep}")
    return _lookup(aseg, {k: k for k in keep}, "aseg")


# ----------------------------------------------------------------------------- tissue classes

GM, WM = 1, 2
TISSUE_LABELS: tuple[int, ...] = (GM, WM)
TISSUE_NAMES: dict[int, str] = {GM: "GM", WM: "WM"}

#: aseg structures grouped into grey matter (label 1 of :func:`aseg_to_tissue`): cerebral
#: cortex 3/42, cerebellar cortex 8/47, thalamus 10/49, caudate 11/50, putamen 12/51,
#: hippocampus 17/53, amygdala 18/54, accumbens 26/58, and the brain stem 16 (the ICBM
#: tissue maps call ~70 % of it GM: only its large WM tracts come out WM; see
#: ``docs/realworld.md``).  Subcortical structures follow the ICBM class holding most of them.
ASEG_GM: tuple[int, ...] = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 17, 53, 18, 54, 26, 58, 16)
#: aseg structures grouped into white matter (label 2): cerebral WM 2/41, cerebellar WM 7/46,
#: pallidum 13/52 (T1-bright; the ICBM tissue maps put ~80 % of AAL's pallidum in WM), the
#: corpus callosum 251-255 (aseg's CC labels are cut out of 2/41), WM hypointensities 77.
ASEG_WM: tuple[int, ...] = (2, 41, 7, 46, 13, 52, 251, 252, 253, 254, 255, 77)
#: Left out of both classes (label 0): CSF and ventricles (4, 5, 14, 15, 24, 43, 44, 72),
#: choroid plexus 31/63, vessels 30/62, non-WM hypointensities 80, optic chiasm 85 (outside
#: the ICBM brain mask), and the ventral DC 28/60 (GM nuclei crossed by WM tracts: the ICBM
#: maps split it almost evenly between GM and WM, see ``docs/realworld.md``).
ASEG_TISSUE_EXCLUDED: tuple[int, ...] = (4, 5, 14, 15, 24, 43, 44, 72, 31, 63, 30, 62, 80, 85, 28, 60)


def aseg_to_tissue(aseg) -> np.ndarray:
    """An aseg label map grouped into tissue classes: 1 = GM (:data:`ASEG_GM`), 2 = WM
    (:data:`ASEG_WM`), 0 = everything else; uint8 of the same shape."""
    table = {**{k: GM for k in ASEG_GM}, **{k: WM for k in ASEG_WM}}
    return _lookup(aseg, table, "aseg")


# ----------------------------------------------------------------------------- files

def default_root() -> Path:
    """The folder of the fetched data and the label cache: ``$HYBRIDREG_DATA/realworld`` if
    ``HYBRIDREG_DATA`` is set (and not empty), else ``~/.cache/hybridreg/realworld``."""
    env = os.environ.get(ENV_VAR)
    return (Path(env).expanduser() / "realworld") if env else Path.home() / ".cache" / "hybridreg" / "realworld"


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """``<root>/cache``: the relabelled label maps :func:`realworld_pairs` writes."""
    return Path(root if root is not None else default_root()) / "cache"


def _orientation(img: sitk.Image) -> str:
    """Axis codes in nibabel's convention (the direction each voxel axis points *to*, in
    RAS+ terms), e.g. ``"RAS"`` or ``"LIA"``."""
    d = np.array(img.GetDirection()).reshape(3, 3)  # columns: voxel axes in LPS
    codes = []
    for col in d.T:
        ax = int(np.argmax(np.abs(col)))
        pos = col[ax] > 0  # towards +LPS
        codes.append({0: "LR", 1: "PA", 2: "SI"}[ax][0 if pos else 1])
    return "".join(codes)


def scan_summary(path: str | os.PathLike, mask_nonzero: bool = True) -> dict:
    """The geometry and intensity range of one image file: ``size`` (x, y, z), ``spacing``
    (mm), ``origin`` (mm, ITK's LPS frame), ``orientation`` (nibabel axis codes, e.g.
    ``"RAS"``), ``dtype``, ``min``, ``max``, ``p1``/``p50``/``p99`` over the non-zero voxels,
    ``nonzero_fraction`` and the centroid of the non-zero voxels in LPS mm (``centroid_lps``)."""
    img = sitk.ReadImage(str(path))
    a = sitk.GetArrayFromImage(img)
    nz = np.nonzero(a) if mask_nonzero else np.nonzero(np.ones_like(a))
    vals = a[nz]
    idx = np.stack([np.mean(nz[2]), np.mean(nz[1]), np.mean(nz[0])]) if vals.size else np.zeros(3)
    centroid = img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in idx))
    pct = np.percentile(vals, [1, 50, 99]) if vals.size else [0, 0, 0]
    return {"size": list(img.GetSize()), "spacing": [round(s, 4) for s in img.GetSpacing()],
            "origin": [round(o, 3) for o in img.GetOrigin()], "orientation": _orientation(img),
            "dtype": img.GetPixelIDTypeAsString(), "min": float(a.min()), "max": float(a.max()),
            "p1": float(pct[0]), "p50": float(pct[1]), "p99": float(pct[2]),
            "nonzero_fraction": round(float(vals.size / a.size), 4),
            "centroid_lps": [round(c, 1) for c in centroid]}


def check_colin27(folder: str | os.PathLike) -> dict:
    """Check the fetched colin27 + AAL files in ``folder`` and return what was measured.

    Checks: both images 181x217x181 at 1 mm, RAS, with the same geometry; AAL values in
    0..116; ``aal.nii.txt`` lists the 116 regions with the standard numbering for the 12
    structures of :data:`AAL_ASEG`; each ``_L`` structure's centroid lies at x < 0 mm (RAS)
    and each ``_R`` one at x > 0.

    Raises:
        ValueError: naming the failed check.  FileNotFoundError: a file is missing.
    """
    folder = Path(folder)
    for n in COLIN27_FILES:
        if not (folder / n).is_file():
            raise FileNotFoundError(f"{folder / n} is missing; run {FETCH_COMMAND}")
    t1 = sitk.ReadImage(str(folder / "ch2bet.nii.gz"))
    aal = sitk.ReadImage(str(folder / "aal.nii.gz"))
    for name, img in (("ch2bet.nii.gz", t1), ("aal.nii.gz", aal)):
        if img.GetSize() != (181, 217, 181) or not np.allclose(img.GetSpacing(), 1):
            raise ValueError(f"{name}: grid {img.GetSize()} spacing {img.GetSpacing()}, expected 181x217x181 at 1 mm")
        if _orientation(img) != "RAS":
            raise ValueError(f"{name}: orientation {_orientation(img)}, expected RAS")
    if not (np.allclose(t1.GetOrigin(), aal.GetOrigin()) and np.allclose(t1.GetDirection(), aal.GetDirection())):
        raise ValueError("ch2bet.nii.gz and aal.nii.gz are not on the same grid")
    a = sitk.GetArrayFromImage(aal)
    values = np.unique(a)
    if values.min() < 0 or values.max() > 116:
        raise ValueError(f"aal.nii.gz: values {values.min()}..{values.max()}, expected 0..116")
    names = read_aal_label_list(folder / "aal.nii.txt")
    if sorted(names) != list(range(1, 117)):
        raise ValueError("aal.nii.txt does not list the 116 AAL regions 1..116")
    table = aal_to_aseg_table(names)
    if table != aal_to_aseg_table():
        raise ValueError(f"aal.nii.txt numbers the shared structures {table}, not the standard numbering")
    sides = {}
    for name, idx, _ in AAL_ASEG:
        vox = np.argwhere(a == idx)
        if len(vox) == 0:
            raise ValueError(f"aal.nii.gz: no voxel of {name} ({idx})")
        c = vox.mean(0)[::-1]  # (x, y, z) index
        x_lps = aal.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c))[0]
        x_ras = -x_lps
        if (x_ras < 0) != name.endswith("_L"):
            raise ValueError(f"aal.nii.gz: {name} ({idx}) centroid at x = {x_ras:.1f} mm (RAS), wrong side")
        sides[name] = round(x_ras, 1)
    st = sitk.GetArrayFromImage(t1)
    return {"size": list(t1.GetSize()), "spacing": list(t1.GetSpacing()), "orientation": "RAS",
            "origin_lps": list(t1.GetOrigin()), "t1_dtype": t1.GetPixelIDTypeAsString(),
            "t1_min": int(st.min()), "t1_max": int(st.max()), "aal_dtype": aal.GetPixelIDTypeAsString(),
            "aal_n_labels": int((values > 0).sum()), "aal_min_label": int(values[values > 0].min()),
            "aal_max_label": int(values.max()), "centroid_x_ras_mm": sides}


def colin27_missing(root: str | os.PathLike | None = None) -> str | None:
    """None if colin27 + AAL are fetched into ``root`` (default :func:`default_root`), else
    the message :func:`realworld_pairs` warns with."""
    root = Path(root) if root is not None else default_root()
    missing = [n for n in COLIN27_FILES if not (root / n).is_file()]
    if not missing:
        return None
    return f"skipped colin27 pairs: run {FETCH_COMMAND} (missing in {root}: {', '.join(missing)})"


def _derived_labels(src: Path, dst: Path, rule: str, fn) -> Path:
    """``dst`` = ``fn(labels of src)`` on ``src``'s grid (uint8), rebuilt when ``src`` or the
    rule changed (recorded in ``dst``'s ``.json`` sidecar); written atomically."""
    key = {"source": str(src), "source_sha256": file_sha256(src), "rule": rule}
    side = dst.with_name(dst.name.replace(".nii.gz", ".json"))
    if dst.is_file() and side.is_file():
        try:
            if json.loads(side.read_text(encoding="utf-8")) == key:
                return dst
        except ValueError:
            pass
    dst.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.ReadImage(str(src))
    out = sitk.GetImageFromArray(fn(sitk.GetArrayFromImage(img)))
    out.CopyInformation(img)
    with atomic_output(dst) as tmp:
        sitk.WriteImage(out, str(tmp), useCompression=True)
    with atomic_output(side) as tmp:
        tmp.write_text(json.dumps(key, indent=1), encoding="utf-8")
    return dst


# ----------------------------------------------------------------------------- pairs

@dataclass(frozen=True)
class RealPair:
    """One pair of the ``realworld`` set: ``moving`` is to be registered to ``fixed``.

    The images are on their own grids (different sizes, orientations, physical frames;
    not pre-aligned).  The label files hold only the scored IDs (every other voxel 0), each
    on its own image's grid.

    Attributes:
        name: ``"<fixed><-<moving>"``, e.g. ``"colin27<-vxm"``.
        kind: ``"aal-aseg"`` (12 subcortical structures, aseg IDs) or ``"tissue"`` (1 GM, 2 WM).
        fixed, moving: scan names (``"vxm"``, ``"colin27"``, ``"icbm152"``).
        fixed_image, moving_image, fixed_labels, moving_labels: NIfTI paths.
        labels: the label IDs to score (Dice with :func:`hybridreg.metrics.score_dice`, policy
            ``list(labels)``). label_names: ``{id: name}``.
        description: one line.
    """

    name: str
    kind: str
    fixed: str
    moving: str
    fixed_image: Path
    moving_image: Path
    fixed_labels: Path
    moving_labels: Path
    labels: tuple[int, ...]
    label_names: dict[int, str] = field(compare=False)
    description: str


def _both(kind, a, b, files, labels, names, what) -> list[RealPair]:
    out = []
    for f, m in ((a, b), (b, a)):
        out.append(RealPair(f"{f}<-{m}", kind, f, m, files[f][0], files[m][0], files[f][1], files[m][1],
                            labels, dict(names), f"{m} registered to {f}: {what}"))
    return out


def realworld_pairs(root: str | os.PathLike | None = None, *, warn: bool = True) -> list[RealPair]:
    """The pairs of the ``realworld`` set, fixed <- moving, both directions:

    * ``colin27<-vxm``, ``vxm<-colin27`` (kind ``"aal-aseg"``): the 12 structures of
      :data:`AAL_ASEG` in aseg IDs (:data:`COLIN27_LABELS`) -- only when colin27 + AAL are
      fetched into ``root``;
    * ``icbm152<-vxm``, ``vxm<-icbm152`` (kind ``"tissue"``): GM (1) and WM (2).

    Args:
        root: the fetched-data folder (default :func:`default_root`:
            ``$HYBRIDREG_DATA/realworld`` or ``~/.cache/hybridreg/realworld``).  The relabelled
            label maps are written (once; rebuilt if their source changes) into
            ``<root>/cache``.
        warn: warn (``UserWarning``, message ``"skipped colin27 pairs: run python
            scripts/fetch_realworld.py ..."``) when colin27 is not fetched.

    Returns:
        The colin27 pairs (when fetched), then the ICBM152 pairs.

    Raises:
        FileNotFoundError: the committed ICBM152 files or the bundled 1 mm ``vxm`` files are missing.
    """
    from hybridreg.data import label_names, load_subject

    root = Path(root) if root is not None else default_root()
    cache = cache_dir(root)
    vxm = load_subject("vxm", 1)
    icbm = {k: ICBM152_DIR / v for k, v in ICBM152_FILES.items()}
    for p in icbm.values():
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing (committed data; regenerate with "
                                    f"python scripts/prepare_icbm152.py)")
    pairs: list[RealPair] = []
    msg = colin27_missing(root)
    if msg is None:
        table = aal_to_aseg_table(read_aal_label_list(root / "aal.nii.txt"))
        rule = f"aal->aseg {sorted(table.items())}"
        colin_lab = _derived_labels(root / "aal.nii.gz", cache / "colin27_aal_as_aseg.nii.gz", rule,
                                    lambda a: relabel_aal(a, table))
        vxm_lab = _derived_labels(vxm.labels_path, cache / "vxm_aseg_aal12.nii.gz",
                                  f"restrict aseg {COLIN27_LABELS}", restrict_aseg)
        names = {k: v for k, v in label_names().items() if k in COLIN27_LABELS} or _ASEG_NAMES
        files = {"colin27": (root / "ch2bet.nii.gz", colin_lab), "vxm": (vxm.image_path, vxm_lab)}
        pairs += _both("aal-aseg", "colin27", "vxm", files, COLIN27_LABELS, names,
                       "12 subcortical structures (hippocampus, amygdala, caudate, putamen, pallidum, "
                       "thalamus; left/right), AAL relabelled into aseg IDs")
    elif warn:
        warnings.warn(msg, UserWarning, stacklevel=2)
    vxm_tissue = _derived_labels(vxm.labels_path, cache / "vxm_aseg_tissue.nii.gz",
                                 f"tissue GM {ASEG_GM} WM {ASEG_WM}", aseg_to_tissue)
    files = {"icbm152": (icbm["t1"], icbm["tissue"]), "vxm": (vxm.image_path, vxm_tissue)}
    pairs += _both("tissue", "icbm152", "vxm", files, TISSUE_LABELS, TISSUE_NAMES,
                   "GM (1) and WM (2): ICBM152 tissue-probability argmax against grouped aseg")
    return pairs
