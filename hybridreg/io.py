"""Image I/O through SimpleITK, keeping physical space, and ITK displacement fields.

Arrays are in ``SimpleITK.GetArrayFromImage`` order: array axis ``k`` is ITK index axis
``d - 1 - k`` (so a 3D array is ``(z, y, x)``). :class:`Geometry` keeps ITK's spacing,
origin and direction (ITK order, LPS physical frame, mm).

Displacement fields are written in ITK's convention: a vector image on the fixed grid whose
value at physical point ``p`` is the physical displacement ``D(p)`` in mm, so that
``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))`` samples the
moving image at ``p + D(p)``, exactly what :func:`hybridreg.spatial.warp` does with the
voxel-unit displacement ``u``: ``D = Direction · diag(spacing) · reverse(u)``.

All writes are atomic (temporary file in the same folder, then rename).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .config import atomic_output, existing_file, full_disk_named

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
"""The image file names the toolkit reads and writes (SimpleITK picks the format by suffix)."""


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the file at ``path`` (hex digest), read in 1 MiB blocks. Used to tie
    recorded runs, derived files and provenance records to the exact bytes they came from.

    Raises ``OSError`` if ``path`` cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_stem(path: str | os.PathLike) -> str:
    """The file name of ``path`` without its image suffix (``imagesTr/x_0000.nii.gz`` → ``x_0000``)."""
    name = Path(path).name
    return next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.endswith(s)), Path(name).stem)

__all__ = [
    "IMAGE_SUFFIXES",
    "image_stem",
    "Geometry",
    "read_image",
    "dicom_series_files",
    "is_dicom",
    "read_labels",
    "read_landmarks",
    "write_image",
    "displacement_to_itk",
    "displacement_from_itk",
    "write_displacement",
    "read_displacement",
    "check_same_grid",
    "read_geometry",
    "placement_warnings",
    "DICOM_SLICE_TOLERANCE",
    "DETACHED_SUFFIXES",
    "resample",
    "resample_with_field",
    "read_transform",
    "normalize_intensity",
    "physical_scale",
    "SMALL_EXTENT_MM",
    "SMALL_MIN_VOXELS",
    "SCALE_EXTENT_MM",
]


SMALL_EXTENT_MM = 64.0
SMALL_MIN_VOXELS = 96
SCALE_EXTENT_MM = 192.0
"""The settings given in mm (the instance solver's ``level_spacing`` and ``crop_margin``, the affine
stage's pyramid :data:`hybridreg.affine.LEVELS_MM`, the inverse's tolerance, the networks' training
voxel size) are made for human anatomy: images 64 mm or more across (a head about 200 mm) with voxels
of 1–2 mm. A FIXED grid under :data:`SMALL_EXTENT_MM` across but with :data:`SMALL_MIN_VOXELS` or
more voxels along an axis (a mouse brain at 0.1 mm, a micro-CT) is registered as if its voxels were
``192 / L`` times larger (``L`` its largest extent; :func:`physical_scale`; the service divides the
spacing the solvers get by it): the solvers see a head at 2 mm or finer, for which their settings
were made, and every written image, transform and metric stays in true mm. (A colin27 pair with a
known warp, scaled down 20 times to 0.1 mm voxels, 10.8 mm and 108 voxels across: mean Dice over the
116 AAL regions 0.351 before, 0.213 after the affine stage and 0.442 after registration, on 4-voxel
pyramid levels and an affine stage on 2 mm voxels; with the scale 0.972 and 0.943, against 0.975 and
0.966 for the same pair at 2 mm.) A small image of fewer voxels keeps its true spacing: a 60 mm crop of
a 1 mm scan (60 voxels) scaled so would run the 2 mm level's iterations on 3.2 mm voxels (Dice 0.640
against 0.604, but SDlogJ 0.774 against 0.362 and 0.057 % folded voxels)."""


def physical_scale(size: Sequence[int], spacing: Sequence[float]) -> float:
    """``L / SCALE_EXTENT_MM`` if ``L``, the largest extent of a grid of ``size`` voxels of ``spacing``
    mm (one axis order for both), is under :data:`SMALL_EXTENT_MM` and the grid has
    :data:`SMALL_MIN_VOXELS` or more voxels along an axis, else 1: the factor by which the settings in
    mm are scaled. The application layer applies it: ``register``, ``batch`` and ``demo``
    (:mod:`hybridreg.service`) and ``hybridreg train`` (to its data, so that a network trained on small
    objects sees them as ``register`` will); the library's functions (``register_pair``,
    :func:`learned.train.train`) take the spacing they are given."""
    extent = max(n * h for n, h in zip(size, spacing))
    return extent / SCALE_EXTENT_MM if extent < SMALL_EXTENT_MM and max(size) >= SMALL_MIN_VOXELS else 1.0


@dataclass(frozen=True)
class Geometry:
    """Physical grid of an image, in ITK order and units.

    Attributes:
        size: voxels per ITK axis (x, y[, z]).
        spacing: mm per ITK axis. origin: physical position (mm, LPS) of voxel 0.
        direction: row-major d×d direction cosines (column k = direction of ITK axis k).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> "Geometry":
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(s) for s in image.GetOrigin()),
            tuple(float(s) for s in image.GetDirection()),
        )

    @property
    def dim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape (reversed ITK size)."""
        return self.size[::-1]

    @property
    def array_spacing(self) -> tuple[float, ...]:
        """Spacing in mm per *array* axis (what the core's ``spacing`` arguments expect)."""
        return self.spacing[::-1]

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference(self) -> sitk.Image:
        """An empty image on this grid (for ``sitk.Resample``)."""
        return self.apply(sitk.Image([int(s) for s in self.size], sitk.sitkUInt8))

    def matches(self, other: "Geometry", tol: float = 1e-3) -> bool:
        """Same size, and spacing/origin/direction equal within ``tol`` (mm / cosine)."""
        return self.size == other.size and all(
            np.allclose(getattr(self, k), getattr(other, k), atol=tol, rtol=0)
            for k in ("spacing", "origin", "direction")
        )

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}


def _read(path: str | os.PathLike, arg: str) -> tuple[sitk.Image, np.ndarray | None]:
    """The image at ``path`` and, for a NIfTI file, where its data hold NaN (a boolean array in
    ``GetArrayFromImage`` order, or ``None`` if nowhere): SimpleITK's NIfTI reader returns
    those voxels as 0. A folder, or one file of a DICOM series, is read as that series
    (:func:`_read_dicom_series`). Raises ``FileNotFoundError`` / ``ValueError`` naming ``arg``."""
    p = Path(path)
    if p.is_dir() or existing_file(path, arg) and is_dicom(p):
        return _read_dicom_series(p, arg), None
    if p.name.lower().endswith((".nii", ".nii.gz")):
        with open(p, "rb") as fh:
            head = fh.read(4)
        gzipped = head[:2] == b"\x1f\x8b"
        nifti = len(head) == 4 and (int.from_bytes(head, "little") in (348, 540) or int.from_bytes(head, "big") in (348, 540))
        if (gzipped or nifti) and gzipped != p.name.lower().endswith(".gz"):  # nibabel and other tools go by the name
            raise ValueError(f"`{arg}`: {p} is {'' if gzipped else 'not '}gzip-compressed but named"
                             f" {'.nii' if gzipped else '.nii.gz'}: rename it {p.name + '.gz' if gzipped else p.name[:-3]}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise ValueError(f"`{arg}`: cannot read {p} as an image (corrupt or unsupported format): {_itk_reason(e)}") from None
    # NIfTI by ITK's reader, not the suffix: SPM's .hdr/.img pairs too
    nan = _check_nifti(p, arg) if reader.GetImageIOFromFileName(str(p)) == "NiftiImageIO" else None
    if nan is not None:
        nan = nan.T.reshape(-1, *sitk.GetArrayViewFromImage(img).shape[:img.GetDimension()]).any(0)  # any component
    return img, nan


DICOM_SLICE_TOLERANCE = 0.1
"""The largest distance, as a fraction of the slice spacing, of a DICOM series' slice positions from
one straight, evenly spaced stack along the slices' normal (fitted to all of them): a tenth of a voxel."""


def is_dicom(p: Path) -> bool:
    """``p`` names a DICOM series: a folder, or a file SimpleITK reads with GDCM."""
    return p.is_dir() or sitk.ImageFileReader().GetImageIOFromFileName(str(p)) == "GDCMImageIO"


def _series_label(folder: Path, uid: str) -> str:
    """A series of ``folder`` as a user recognises it: number, description, files, one file's name."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    header = sitk.ImageFileReader()
    header.SetFileName(files[0])
    try:
        header.ReadImageInformation()
        tags = [header.GetMetaData(k).strip() if header.HasMetaDataKey(k) else "" for k in ("0020|0011", "0008|103e")]
    except RuntimeError:
        tags = ["", ""]
    number = f"series {tags[0]} " if tags[0] else ""
    described = f"'{tags[1]}', " if tags[1] else ""
    return f"{number}({described}{len(files)} files, e.g. {Path(files[0]).name})"


def dicom_series_files(p: str | os.PathLike, arg: str = "image") -> tuple[str, ...]:
    """The files of the DICOM series that ``p`` names, as :func:`read_image` reads them (sorted
    along the slices' normal by GDCM): the series a folder holds, or the series of the file ``p``
    among the files of its folder; a file GDCM groups with no other (a multi-frame file) alone.

    Raises:
        ValueError: a folder holding no series or several (naming them), an unreadable file; each
            names ``arg``.
    """
    p = Path(p)
    folder = p if p.is_dir() else p.parent
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if p.is_dir():
        if not series:
            raise ValueError(f"`{arg}`: {p} is a folder holding no DICOM series: give an image file"
                             f" ({', '.join(IMAGE_SUFFIXES)}) or a folder of DICOM files")
        if len(series) > 1:
            raise ValueError(f"`{arg}`: {p} holds {len(series)} DICOM series: "
                             f"{'; '.join(_series_label(folder, uid) for uid in series)}; give one file of the series wanted")
        uid = series[0]
    else:
        header = sitk.ImageFileReader()
        header.SetFileName(str(p))
        try:
            header.ReadImageInformation()
        except RuntimeError as e:
            raise ValueError(f"`{arg}`: cannot read {p} as a DICOM image: {_itk_reason(e)}") from None
        uid = header.GetMetaData("0020|000e").strip() if header.HasMetaDataKey("0020|000e") else ""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) if uid in series else ()
    if p.is_file() and str(p.resolve()) not in {str(Path(f).resolve()) for f in files}:
        files = (str(p),)  # a file GDCM does not group with others: read on its own
    return tuple(files)


def _read_dicom_series(p: Path, arg: str) -> sitk.Image:
    """One DICOM series as one image (GDCM through SimpleITK, rescale slope and intercept applied):
    the files of :func:`dicom_series_files` (a folder of several series is refused, naming them;
    pass one file of the series wanted); a file that holds the whole volume (multi-frame) is read on
    its own. The slices are sorted along their normal by GDCM; their positions
    (``ImagePositionPatient``) must lie on one straight, evenly spaced stack along it, as the
    image's grid assumes (within :data:`DICOM_SLICE_TOLERANCE`).

    Raises:
        ValueError: no DICOM series, several series, an unreadable file, images of different sizes
            in one series (a localizer), several volumes or a repeated slice (repeated positions), a
            gantry tilt (positions off the normal), or uneven or missing slices; each names ``arg``.
    """
    files = dicom_series_files(p, arg)
    folder = p if p.is_dir() else p.parent
    if len(files) == 1:  # one slice, or a multi-frame file holding the whole volume
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as e:
        reason = _itk_reason(e)
        if "does not fully contain the requested region" in reason:
            reason = "its files hold images of different sizes (a localizer in the series?): move them out"
        raise ValueError(f"`{arg}`: cannot read the DICOM series in {folder}: {reason}") from None
    if len(files) > 1 and img.GetDimension() == 3:
        _check_stack(reader, img, len(files), f"`{arg}`: the DICOM series in {folder} ({len(files)} files)")
    return img


def _check_stack(reader: sitk.ImageSeriesReader, img: sitk.Image, n: int, what: str) -> None:
    """Refuse slice positions off one straight, evenly spaced stack along the slices' normal: the
    line ``p0 + k·h·normal`` fitted to all ``n`` positions by least squares (a drift along a tall
    stack adds up where neighbouring slices would not show it), tolerance a tenth of ``h``."""
    positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                          if reader.HasMetaDataKey(i, "0020|0032") else [np.nan] * 3 for i in range(n)])
    if not np.isfinite(positions).all():
        raise ValueError(f"{what} has slices without a position (ImagePositionPatient)")
    normal = np.array(img.GetDirection()).reshape(3, 3)[:, 2]
    along = positions @ normal
    if len(np.unique(np.round(along, 3))) < n:
        raise ValueError(f"{what} repeats slice positions (several volumes, or a slice twice): keep one volume per series")
    k = np.arange(n)
    h, p0 = np.polyfit(k, along, 1)
    tol = DICOM_SLICE_TOLERANCE * abs(h)
    across = positions - np.outer(along, normal)  # the in-plane offset of each slice: one point for a straight stack
    if np.linalg.norm(across - across.mean(0), axis=1).max() > tol:
        raise ValueError(f"{what} has a gantry tilt (slice positions off the slices' normal by up to"
                         f" {np.linalg.norm(across - across[0], axis=1).max():.3g} mm): correct it (dcm2niix does)")
    if np.abs(along - (p0 + h * k)).max() > tol:
        steps = np.abs(np.diff(along))
        raise ValueError(f"{what} has uneven or missing slices (spacing {steps.min():.3g} to {steps.max():.3g} mm)")


def _itk_reason(e: RuntimeError) -> str:
    """ITK's reason for a failed read, on one line: the text after ``ITK ERROR: <object>):`` or
    ``sitk::ERROR:`` (ITK's messages start with the source file and line, and may span lines)."""
    text = " ".join(str(e).split())
    text = text.replace(" Reason: No such file or directory", "")  # a stale errno: the file exists
    for marker in ("ITK ERROR:", "sitk::ERROR:"):
        if marker in text:
            reason = text.split(marker, 1)[1].split("WARNING: In ", 1)[0].strip()  # ITK's warnings may follow
            return reason.split("): ", 1)[1] if marker == "ITK ERROR:" and "): " in reason else reason
    return text or "unreadable"


def _check_nifti(p: Path, arg: str) -> np.ndarray | None:
    """Read a NIfTI file's data a second time with nibabel, which SimpleITK's NIfTI reader
    cannot replace: that reader pads a truncated file with zeros and reads NaN/Inf voxels as
    0. nibabel raises on data shorter than the header promises and keeps NaN/Inf.

    Returns:
        where the data are NaN (boolean, nibabel's axis order), or ``None`` if nowhere.

    Raises:
        ValueError: a truncated or corrupt file, or Inf values.
    """
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(p)).dataobj)
    except Exception as e:  # noqa: BLE001 -- nibabel raises OSError, EOFError, zlib errors ... for damaged files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"`{arg}`: {p} is truncated or corrupt (less data than its header promises): {msg}") from None
    if data.dtype.kind not in "fc":
        return None
    if np.isinf(data).any():
        raise ValueError(f"`{arg}`: {p} contains Inf values")
    nan = np.isnan(data)
    return nan if nan.any() else None


def read_image(path: str | os.PathLike, *, arg: str = "image", nan: str = "refuse") -> tuple[np.ndarray, Geometry]:
    """Read a scalar 2D/3D image as float32.

    Args:
        nan: what NaN voxels mean: ``"refuse"`` (an error) or ``"keep"`` (returned as NaN,
            for the caller to treat as outside the image, as :func:`hybridreg.service.read_inputs`
            does: SPM and other tools write NaN where there are no data).

    Returns:
        ``(array, geometry)``, array in ``GetArrayFromImage`` order.

    Raises:
        FileNotFoundError: missing file. ValueError: corrupt or truncated file (NIfTI data
        are read a second time with nibabel to catch what SimpleITK's reader hides), vector
        image, wrong dimension, Inf values, or NaN values with ``nan="refuse"``. Messages
        name ``arg``.
    """
    if nan not in ("refuse", "keep"):
        raise ValueError(f"read_image(): `nan` must be 'refuse' or 'keep', got {nan!r}")
    img, nifti_nan = _read(path, arg)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"`{arg}`: expected a scalar image, {path} has {img.GetNumberOfComponentsPerPixel()} components")
    if img.GetDimension() not in (2, 3):
        raise ValueError(f"`{arg}`: expected a 2D or 3D image, {path} is {img.GetDimension()}D")
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype == np.float64:
        _check_float32_range(arr, path, arg)
    arr = arr.astype(np.float32)
    if nifti_nan is not None:
        arr[nifti_nan] = np.nan
    if np.isinf(arr).any():
        raise ValueError(f"`{arg}`: {path} contains Inf values")
    if nan == "refuse" and np.isnan(arr).any():
        raise ValueError(f"`{arg}`: {path} contains NaN values")
    return arr, Geometry.of(img)


def _check_float32_range(arr: np.ndarray, path, arg: str) -> None:
    """Refuse a float64 image whose finite values float32 cannot hold: beyond its largest value
    (the cast would make them Inf) or all below its smallest normal one (they would become 0 or
    lose their precision)."""
    finite = np.abs(arr[np.isfinite(arr)])
    big = float(finite.max()) if finite.size else 0.0
    tiny, most = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
    if big > most or 0.0 < big < tiny:
        where = "beyond" if big > most else "below"
        raise ValueError(f"`{arg}`: {path} holds float64 values up to {big:.3g}, {where} float32's range"
                         f" ({tiny:.3g} to {most:.3g}), in which images are registered: rescale its intensities")


def placement_warnings(path: str | os.PathLike, geometry: Geometry, *, arg: str = "image") -> list[str]:
    """What other tools may place differently in a NIfTI or Analyze file read as ``geometry``
    (SimpleITK's reading): one line each, naming ``arg``; ``[]`` for other files and DICOM series.

    * **qform and sform disagree**, and ITK's rule (which ANTs, ITK-SNAP and 3D Slicer share: the
      sform only with ``sform_code`` 1 and no shear, else the qform) picks another placement than
      nibabel's, FSL's and SPM's (the sform whenever ``sform_code`` > 0): the line gives the largest
      distance between the two placements of the grid's corners, in mm, when it exceeds a tenth of
      the smallest voxel size (quaternion rounding leaves smaller ones).
    * **no orientation** (``qform_code`` and ``sform_code`` 0): the placement is unknown.
    * **an Analyze 7.5 file** (``.hdr``/``.img`` without NIfTI's magic): it holds no orientation.

    hybridreg keeps SimpleITK's reading (its transforms are ITK's), and writes its outputs with the
    placement it used in both the qform and the sform. A 2D image's placement is not compared (ITK
    drops its out-of-plane part). Source: the NIfTI-1 header's qform/sform definitions (NIfTI DFWG,
    nifti1.h); ITK's ``NiftiImageIO``.

    Raises nothing: a file nibabel cannot read gives ``[]`` (:func:`read_image` refuses it)."""
    import nibabel as nib

    p = Path(path)
    if p.is_dir() or sitk.ImageFileReader().GetImageIOFromFileName(str(p)) != "NiftiImageIO":
        return []
    try:
        img = nib.load(str(p))
    except Exception:  # noqa: BLE001 -- a file nibabel cannot read has been refused by read_image already
        return []
    if not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):
        return [f"`{arg}`: {p} is an Analyze 7.5 file, which holds no orientation: it was read as ITK reads it, and"
                " SPM and nibabel assume another left-right layout; convert it to NIfTI with its orientation known"]
    header = img.header
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode == 0 and scode == 0:
        return [f"`{arg}`: {p} holds no orientation (its qform_code and sform_code are 0): its placement in space is"
                " unknown, and tools differ on it; it was read as ITK reads it (direction"
                f" {[round(v, 3) for v in geometry.direction]}, origin {[round(v, 1) for v in geometry.origin]} mm LPS)"]
    d = geometry.dim
    if d != 3:  # ITK drops a 2D image's out-of-plane placement, which nibabel's affine keeps
        return []
    itk = np.eye(4)
    itk[:d, :d] = np.reshape(geometry.direction, (d, d)) * np.asarray(geometry.spacing)
    itk[:d, 3] = geometry.origin
    itk = np.diag([-1.0, -1.0, 1.0, 1.0]) @ itk  # LPS -> RAS, nibabel's frame
    size = list(geometry.size)
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]).T
    apart = float(np.linalg.norm((itk - img.affine) @ corners, axis=0).max())
    tol = 0.1 * min(geometry.spacing)
    if apart <= tol:
        return []
    used = "the qform" if qcode and np.linalg.norm((itk - header.get_qform()) @ corners, axis=0).max() <= tol else \
        "neither header's placement exactly"
    return [f"`{arg}`: {p}'s qform (code {qcode}) and sform (code {scode}) place it up to {apart:.1f} mm apart:"
            f" it was read by {used}, as ITK reads it (and ANTs, ITK-SNAP, 3D Slicer), while FSL, SPM and"
            " nibabel follow the sform; the outputs' headers hold the placement used. Write the one meant into both"
            " (nibabel: img.set_qform(img.get_sform())) if that is not it"]


def read_labels(path: str | os.PathLike, *, arg: str = "labels") -> tuple[np.ndarray, Geometry]:
    """Read an integer label map (int32 array).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_image`, plus non-integer values and
        labels outside ``0 .. 2**31 - 1`` (negative IDs, or uint32 IDs that would wrap).
    """
    img, nifti_nan = _read(path, arg)
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() not in (2, 3):
        raise ValueError(f"`{arg}`: expected a scalar 2D or 3D label map: {path}")
    arr = sitk.GetArrayFromImage(img)
    if nifti_nan is not None:
        raise ValueError(f"`{arg}`: {path} contains NaN values")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError(f"`{arg}`: {path} contains NaN or Inf values")
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"`{arg}`: {path} has non-integer values; it must hold integers")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0 or hi > np.iinfo(np.int32).max:
        raise ValueError(f"`{arg}`: {path} has labels outside 0..{np.iinfo(np.int32).max} (min {lo:g}, max {hi:g});"
                         " label IDs must be non-negative 32-bit integers")
    return arr.astype(np.int32), Geometry.of(img)


def read_landmarks(path: str | os.PathLike, geometry: Geometry, *, arg: str = "landmarks") -> np.ndarray:
    """Read landmarks (one point per row) as physical points, ``(n, d)`` LPS mm (ITK's frame,
    the frame of every transform hybridreg writes).

    The file is a CSV (comma, semicolon, tab or space separated) of d numbers per row, with
    an optional header row naming the columns: ``x,y[,z]`` (or no header): physical
    coordinates, LPS mm; ``i,j[,k]``: continuous voxel indices of the landmarks' image, in
    ITK axis order (the NIfTI ``i, j, k`` of Learn2Reg's keypoint files), turned into physical
    points through ``geometry`` (``TransformContinuousIndexToPhysicalPoint``). Extra leading
    columns (an id, a name) are allowed when a header names the coordinate columns.

    Raises:
        FileNotFoundError: no such file. ValueError: no points, a row that is not d numbers
            (without a header: exactly d columns), a header naming a third coordinate for a 2D
            image, NaN/Inf, a point outside the image (beyond half a voxel past its outermost
            voxel centres); each names ``arg``.
    """
    import csv

    p = existing_file(path, arg)
    text = p.read_text(encoding="utf-8-sig", errors="replace")
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t ")
    except csv.Error:
        dialect = csv.excel
    rows = [[c.strip() for c in r if c.strip()] for r in csv.reader(text.splitlines(), dialect)]
    rows = [r for r in rows if r and not r[0].startswith("#")]
    d = geometry.dim
    names = ("i", "j", "k")[:d] if rows and {"i", "j"} <= {c.lower() for c in rows[0]} else ("x", "y", "z")[:d]
    cols, header = list(range(d)), None
    if rows and not _numbers(rows[0]):
        header = [c.lower() for c in rows.pop(0)]
        if not set(names) <= set(header):
            raise ValueError(f"`{arg}`: {path}: the header {header} must name the columns {list(names)}"
                             " (x, y, z: LPS mm; i, j, k: voxel indices)")
        third = sorted({"z", "k"} & set(header))
        if d == 2 and third:  # a third coordinate would be dropped: the points are not this image's
            raise ValueError(f"`{arg}`: {path}: the header names a third coordinate ({third[0]}) but the image is 2D")
        cols = [header.index(n) for n in names]
    points = []
    for n, r in enumerate(rows, 1):
        try:
            if header is None and len(r) != d:  # without a header every column is a coordinate: none is dropped
                raise IndexError
            points.append([float(r[c]) for c in cols])
        except (ValueError, IndexError):
            raise ValueError(f"`{arg}`: {path}: point {n} is not {d} numbers: {r}") from None
    pts = np.asarray(points, dtype=float).reshape(-1, d)
    if not len(pts):
        raise ValueError(f"`{arg}`: {path} holds no points")
    if not np.isfinite(pts).all():
        raise ValueError(f"`{arg}`: {path} holds NaN or Inf coordinates")
    ref = geometry.apply(sitk.Image([1] * d, sitk.sitkUInt8))  # the grid's index <-> physical maps (not its size)
    if names[0] == "i":
        pts = np.array([ref.TransformContinuousIndexToPhysicalPoint(tuple(map(float, q))) for q in pts])
    index = np.array([ref.TransformPhysicalPointToContinuousIndex(tuple(map(float, q))) for q in pts])
    outside = np.flatnonzero(np.any((index < -0.5 - 1e-6) | (index > np.asarray(geometry.size) - 0.5 + 1e-6), axis=1))
    if len(outside):  # no image there to measure a registration by (typically indices of another grid, or mm given as indices)
        n = int(outside[0])
        raise ValueError(f"`{arg}`: {path}: point {n + 1} ({', '.join(f'{v:g}' for v in pts[n])} mm LPS, voxel index"
                         f" {', '.join(f'{v:.1f}' for v in index[n])}) lies outside its image (size"
                         f" {'x'.join(map(str, geometry.size))}); {len(outside)} of {len(pts)} points do")
    return pts


def _numbers(row: Sequence[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True


def read_geometry(path: str | os.PathLike) -> Geometry:
    """The grid of an image file from its header alone (no voxel is read), or of a DICOM series
    (a folder, or one of its files: the series is read whole, :func:`_read_dicom_series`).

    Raises:
        ValueError: a file SimpleITK cannot read as an image, or a DICOM series it refuses
            (naming it).
    """
    if is_dicom(Path(path)):
        return Geometry.of(_read_dicom_series(Path(path), "path"))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ValueError(f"{path}: not an image file SimpleITK can read") from None
    return Geometry.of(reader)  # the reader answers the image's geometry getters from the header


def check_same_grid(a: Geometry, b: Geometry, names: tuple[str, str], tol: float = 1e-3) -> None:
    """Raise ``ValueError`` naming both arguments if the two grids differ: size, or spacing
    (mm), origin (mm, LPS) or direction cosines beyond ``tol`` (:meth:`Geometry.matches`)."""
    if not a.matches(b, tol):
        direction = "" if np.allclose(a.direction, b.direction, atol=tol, rtol=0) else \
            f", direction {a.direction} vs {b.direction}"
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` are on different grids (size {a.size} vs {b.size},"
            f" spacing {a.spacing} vs {b.spacing}, origin {a.origin} vs {b.origin}{direction}); resample one"
            " onto the other's grid first"
        )


DETACHED_SUFFIXES = (".mhd", ".nhdr")
"""Formats whose header names a separate data file (``X.zraw``, ``X.raw.gz``) after its own name."""


def _check_nifti_written(path: Path, image: sitk.Image, final: Path) -> None:
    """Raise ``OSError`` if the NIfTI file ``path`` that SimpleITK just wrote is shorter than
    ``image`` needs. Its NIfTI writer reports a full disk on stderr only and returns (its MetaImage
    and NRRD writers raise): the header's ``vox_offset`` plus the pixel bytes must be the file's
    size (``.nii``) or the size a ``.nii.gz`` stream's gzip trailer records (RFC 1952: ISIZE, the
    uncompressed size modulo 2³²), which a cut stream lacks. Reads at most the first block.
    ``final``: the name the message gives (``path`` is its temporary)."""
    gz = path.name.lower().endswith(".gz")
    need = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(540)
        size = int.from_bytes(head[:4], "little")
        order = "<" if size in (348, 540) else ">"
        two = struct.unpack(order + "i", head[:4])[0] == 540  # NIfTI-2: vox_offset is an int64 at byte 168
        offset = struct.unpack(order + "q", head[168:176])[0] if two else int(struct.unpack(order + "f", head[108:112])[0])
        if gz:
            with open(path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                ok = int.from_bytes(fh.read(4), "little") == (offset + need) % 2**32
        else:
            ok = path.stat().st_size == offset + need
    except (OSError, EOFError, struct.error, zlib.error):
        ok = False
    if not ok:
        raise OSError(errno.EIO, f"SimpleITK wrote {final} incompletely (a full disk?)")


def _atomic_write(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    p = Path(path)
    if not p.name.lower().endswith(DETACHED_SUFFIXES):
        with atomic_output(p) as tmp:
            sitk.WriteImage(image, str(tmp), compress, 1)  # fast zlib level: outputs are written once per run
            if p.name.lower().endswith((".nii", ".nii.gz")):
                _check_nifti_written(tmp, image, p)
        return
    # a header and its data file: both written under their final names in a hidden folder beside them, then
    # moved, the header last (a temporary name would end up in the header, naming a data file left behind)
    with tempfile.TemporaryDirectory(dir=p.parent, prefix=f".{p.name}.") as tmp, full_disk_named(p):
        sitk.WriteImage(image, str(Path(tmp) / p.name), compress, 1)
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == p.name):
            os.replace(f, p.parent / f.name)


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, dtype=np.float32) -> None:
    """Write ``array`` (array order, ``geometry.shape``: ``GetArrayFromImage``'s order) on
    ``geometry`` as ``dtype``, atomically (:func:`hybridreg.config.atomic_output`). Format from
    the suffix (.nii.gz, .mha, .nrrd).

    Raises:
        ValueError: ``array`` not of ``geometry.shape``. OSError: ``path`` cannot be written.
    """
    arr = np.asarray(array)
    if tuple(arr.shape) != geometry.shape:
        raise ValueError(f"write_image(): `array` shape {arr.shape} does not match the grid {geometry.shape}")
    img = geometry.apply(sitk.GetImageFromArray(arr.astype(dtype)))
    _atomic_write(img, path)


def displacement_to_itk(disp: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Voxel-unit displacement ``(d, *shape)`` (core convention) → ITK displacement field.

    Returns a float64 vector image on ``geometry`` holding ``D = Direction · diag(spacing) ·
    reverse(u)`` in mm (LPS), ready for ``sitk.DisplacementFieldTransform``.

    Raises:
        ValueError: ``disp`` not ``(d, *geometry.shape)`` (array order), or with NaN/Inf values.
    """
    u = np.asarray(disp, dtype=np.float64)
    d = geometry.dim
    if u.shape != (d, *geometry.shape):
        raise ValueError(f"displacement_to_itk(): `disp` must be {(d, *geometry.shape)}, got {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("displacement_to_itk(): `disp` contains NaN or Inf values")
    m = np.asarray(geometry.direction).reshape(d, d) @ np.diag(geometry.spacing)
    # channels last, components in ITK's index-axis order (x first): phys = m · reverse(u) per voxel,
    # one matrix product (np.tensordot then moveaxis took ~10x longer on a 1 mm field)
    phys = np.moveaxis(u, 0, -1)[..., ::-1] @ m.T
    return geometry.apply(sitk.GetImageFromArray(phys, isVector=True))


def displacement_from_itk(field: sitk.Image) -> tuple[np.ndarray, Geometry]:
    """ITK displacement field (mm, LPS) → voxel-unit displacement ``(d, *shape)`` on its grid:
    float64, array order (channel ``a`` along array axis ``a``), with the field's
    :class:`Geometry`. The inverse of :func:`displacement_to_itk`.

    Raises:
        ValueError: a field without one component per spatial axis.
    """
    g = Geometry.of(field)
    d = g.dim
    if field.GetNumberOfComponentsPerPixel() != d:
        raise ValueError(f"displacement_from_itk(): `field` must have {d} components per voxel")
    phys = sitk.GetArrayViewFromImage(field).astype(np.float64)  # (*shape, d), x first
    m = np.asarray(g.direction).reshape(d, d) @ np.diag(g.spacing)
    u_itk = phys @ np.linalg.inv(m).T
    return np.ascontiguousarray(np.moveaxis(u_itk[..., ::-1], -1, 0)), g


def write_displacement(path: str | os.PathLike, disp: np.ndarray, geometry: Geometry) -> None:
    """Write a voxel-unit displacement ``disp`` ``(d, *geometry.shape)`` (array order, channel
    ``a`` along array axis ``a``) as an ITK displacement field in mm (LPS) on ``geometry``,
    float32, atomically (:func:`displacement_to_itk`).

    Raises:
        ValueError: ``disp`` of another shape, or with NaN/Inf. OSError: ``path`` cannot be
            written.
    """
    img = sitk.Cast(displacement_to_itk(disp, geometry), sitk.sitkVectorFloat32)
    _atomic_write(img, path)


def read_displacement(path: str | os.PathLike, *, arg: str = "displacement") -> sitk.Image:
    """Read an ITK displacement field (vector image, mm) as float64, ready for
    ``sitk.DisplacementFieldTransform``: at each point ``x`` of its grid (FIXED's physical space,
    LPS, mm) it holds ``φ(x) − x``, where ``φ(x)`` is the matching point of MOVING's space.

    Raises:
        FileNotFoundError, ValueError: missing/corrupt file, not a d-component field, or
        NaN/Inf values.
    """
    img, nifti_nan = _read(path, arg)
    if img.GetNumberOfComponentsPerPixel() != img.GetDimension():
        raise ValueError(
            f"`{arg}`: {path} is not a displacement field ({img.GetNumberOfComponentsPerPixel()} components"
            f" for a {img.GetDimension()}D image)"
        )
    img = sitk.Cast(img, sitk.sitkVectorFloat64)
    if nifti_nan is not None or not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
        raise ValueError(f"`{arg}`: {path} contains NaN or Inf values")
    return img


def resample(image: sitk.Image, transform: sitk.Transform, reference: Geometry, *, labels: bool = False,
             check_overlap: bool = True) -> sitk.Image:
    """Resample ``image`` onto ``reference`` through ``transform`` (which maps reference
    points to ``image`` points, LPS mm: ITK's convention) with SimpleITK: linear, or nearest
    neighbour for label maps. Outside ``image``: 0 for label maps, the image's lowest value
    (NaN voxels aside) for an intensity image, which is what the solvers see there (0 after
    :func:`normalize_intensity`): air for CT (−1000 HU and below, where 0 HU would paint water),
    0 for most MR. (``sitk.Resample`` with the written transform fills 0 unless told otherwise.)

    Raises:
        ValueError: the transform's dimension is not the image's or the reference's; with
            ``check_overlap``, fewer than 10 % of the reference grid's points land inside
            ``image`` (the transform belongs to other images, or the grids do not overlap: pass
            ``check_overlap=False`` for an image known to belong to it, such as a slab).
    """
    if transform.GetDimension() != image.GetDimension() or reference.dim != image.GetDimension():
        raise ValueError(f"the transform is {transform.GetDimension()}D, the image {image.GetDimension()}D and the"
                         f" reference grid {reference.dim}D")
    ref = reference.reference()
    if check_overlap:
        rng = np.random.default_rng(0)  # a sample of reference points is enough to judge the overlap
        idx = np.stack([rng.uniform(-0.5, n - 0.5, 2000) for n in reference.size], axis=1)
        inside = 0
        for i in idx:
            q = image.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(ref.TransformContinuousIndexToPhysicalPoint(i)))
            inside += all(-0.5 <= c <= n - 0.5 for c, n in zip(q, image.GetSize()))
        if inside < 0.1 * len(idx):
            raise ValueError(f"only {100 * inside / len(idx):.1f} % of the output grid maps inside the image: the"
                             " transform does not belong to this image (or the image to this grid)")
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, ref, transform, interp, 0.0 if labels else lowest_value(image), image.GetPixelID())


def lowest_value(image: sitk.Image) -> float:
    """The lowest value of a scalar image, NaN voxels aside (0 when every voxel is NaN)."""
    arr = sitk.GetArrayViewFromImage(image)
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    return float(finite.min()) if finite.size else 0.0


def resample_with_field(image: sitk.Image, field: sitk.Image, *, labels: bool = False, reference: Geometry | None = None) -> sitk.Image:
    """Apply an ITK displacement field ``field`` (mm, LPS; the transform maps ``reference``
    points to ``image`` points) to ``image``, on ``reference`` (default: the field's grid):
    linear, or nearest neighbour for ``labels`` (:func:`resample`, whose errors it raises).
    Returns an image of ``image``'s pixel type on ``reference``."""
    tx = sitk.DisplacementFieldTransform(sitk.Image(field))  # the transform takes ownership of its copy
    return resample(image, tx, reference or Geometry.of(field), labels=labels)


def read_transform(path: str | os.PathLike, *, arg: str = "TRANSFORM") -> sitk.Transform:
    """Read an ITK transform file (``.h5`` composite, ``.mat`` / ``.txt`` / ``.tfm``).

    Like every ITK transform, it maps points of the FIXED (output) image's physical space to the
    MOVING image's (LPS, mm): resampling MOVING through it puts MOVING on FIXED's grid.

    Raises:
        FileNotFoundError, ValueError: missing file, or not a transform SimpleITK can read.
    """
    p = existing_file(path, arg)
    try:
        return sitk.ReadTransform(str(p))
    except RuntimeError:
        raise ValueError(f"`{arg}`: {p} is not an ITK transform file SimpleITK can read") from None


def normalize_intensity(x: np.ndarray, *, arg: str = "x") -> np.ndarray:
    """Map intensities to [0, 1], robust to scanner ranges and outliers: ``lo`` is the 0.5th
    percentile of all voxels (the minimum, for skull-stripped images with a zero background),
    ``hi`` the 99.5th percentile of the voxels above ``lo`` (the brain); ``(x − lo) / (hi − lo)``
    clipped to [0, 1]. Every solver and data source uses it, for both images alike.

    Args:
        x: an image array of any shape (array order), in the scanner's units.
        arg: what the messages call ``x`` (a file, a dataset's subject).

    Returns:
        float32 array of ``x``'s shape in [0, 1].

    Raises:
        ValueError: NaN/Inf values (:func:`hybridreg.service.read_inputs` fills a file's NaN
            voxels first) or a constant image, which holds nothing to register.
    """
    x = np.asarray(x)
    if not np.isfinite(x).all():
        raise ValueError(f"normalize_intensity(): `{arg}` contains NaN or Inf values")
    if x.size == 0 or x.min() == x.max():
        raise ValueError(f"normalize_intensity(): `{arg}` is constant: it holds nothing to register")
    lo = float(np.percentile(x, 0.5))
    fg = x[x > lo]
    if fg.size:
        hi = float(np.percentile(fg, 99.5))
    else:  # over 99.5 % of the voxels hold the maximum: the minimum is the only contrast left
        lo, hi = float(x.min()), float(x.max())
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
