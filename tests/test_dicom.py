"""DICOM series as inputs: a folder of one series, or one file of a series, is read as one image
with its physical geometry; series the image's grid cannot describe are refused in one line."""

import csv
import json
import locale
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hybridreg import data
from hybridreg.batch import read_pairs
from hybridreg.cli import main
from hybridreg.io import Geometry, file_sha256, read_geometry, read_image

STUDY = "1.2.826.0.1.3680043.2.1125.70"


def write_series(image: sitk.Image, folder: Path, number: int, *, shift=None, positions=None, decimals=6) -> str:
    """``image`` (3D) as a DICOM series of int16 slices, as a scanner's export writes it: one file per
    slice with the series' UID, the slices' orientation and each slice's position. ``shift(i)`` moves
    slice ``i`` in physical space (a gantry tilt, a gap); ``positions`` replaces the slice indices whose
    positions are written (repeated positions: two volumes in one series); ``decimals``: the positions'
    rounding, in mm. Returns the series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = f"{STUDY}.{number}"
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    ctype = locale.setlocale(locale.LC_CTYPE)  # GDCM's writer leaves the process in the C locale
    for i in range(image.GetDepth()):
        s = sitk.Cast(image[:, :, i], sitk.sitkInt16)
        k = i if positions is None else positions[i]
        point = np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) + (0 if shift is None else shift(i))
        for tag, value in (("0008|0060", "MR"), ("0020|000d", STUDY), ("0020|000e", uid), ("0008|103e", f"series {number}"),
                           ("0020|0037", orientation), ("0020|0032", "\\".join(f"{v:.{decimals}f}" for v in point)),
                           ("0020|0013", str(i + 1)), ("0008|0018", f"{uid}.{i + 1}"), ("0020|0011", str(number))):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{number}_{i:04d}.dcm"))
        writer.Execute(s)
    locale.setlocale(locale.LC_CTYPE, ctype)
    return uid


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """The demo pair at 2 mm, cropped, as int16 NIfTI files, with FIXED also as a DICOM series."""
    root = tmp_path_factory.mktemp("dicom")
    fid, mid = data.demo_pair()
    out = {}
    for key, subject in (("fixed", fid), ("moving", mid)):
        s = data.load_subject(subject, 2)
        img = sitk.ReadImage(str(s.image_path), sitk.sitkFloat32)[8:72, 16:80, 24:88]
        img = sitk.Cast(sitk.RescaleIntensity(img, 0, 1000), sitk.sitkInt16)
        out[key] = root / f"{key}.nii.gz"
        sitk.WriteImage(img, str(out[key]))
        labels = sitk.ReadImage(str(s.labels_path))[8:72, 16:80, 24:88]
        out[f"{key}_labels"] = root / f"{key}_labels.nii.gz"
        sitk.WriteImage(labels, str(out[f"{key}_labels"]))
    write_series(sitk.ReadImage(str(out["fixed"])), root / "fixed_dicom", 1)
    out["fixed_dicom"] = root / "fixed_dicom"
    return out


def _same_physical_image(a: np.ndarray, ga: Geometry, b: np.ndarray, gb: Geometry) -> None:
    """``a`` on grid ``ga`` holds ``b`` (on ``gb``) at the same physical points, voxel for voxel."""
    onto = sitk.Resample(ga.apply(sitk.GetImageFromArray(a)), gb.reference(), sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(onto), b)


def test_a_series_folder_or_one_of_its_files_reads_as_the_scan(scans, tmp_path):
    want, want_geo = read_image(scans["fixed"])
    for path in (scans["fixed_dicom"], scans["fixed_dicom"] / "s1_0010.dcm"):
        arr, geo = read_image(path, arg="FIXED")
        # DICOM stacks slices along the right-handed normal: the array may be stored flipped, the scan is the same
        assert arr.shape == want.shape and np.allclose(np.abs(np.linalg.det(np.reshape(geo.direction, (3, 3)))), 1.0)
        _same_physical_image(arr, geo, want, want_geo)
        assert read_geometry(path) == geo
    # a study folder of two series: refused, naming both; one file picks its series
    study = tmp_path / "study"
    image = sitk.ReadImage(str(scans["fixed"]))
    write_series(image, study, 1)
    write_series(sitk.Flip(image, [True, False, False], flipAboutOrigin=False), study, 2)
    with pytest.raises(ValueError, match=rf"`MOVING`: {study} holds 2 DICOM series: series 1 \('series 1', 64 files, e.g."
                                         r" s1_\d+.dcm\); series 2 \('series 2', 64 files, e.g. s2_\d+.dcm\); give one file of the"
                                         r" series wanted$"):
        read_image(study, arg="MOVING")
    first, second = read_image(study / "s1_0003.dcm")[0], read_image(study / "s2_0003.dcm")[0]
    assert np.array_equal(first, read_image(scans["fixed_dicom"])[0]) and not np.array_equal(first, second)
    # a multi-frame file holding the whole volume is read on its own, as the volume it is (it was stacked into 4D)
    volume = sitk.ReadImage(str(scans["fixed"]), sitk.sitkUInt16)
    volume.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0))  # right-handed: GDCM's writer drops a flip
    sitk.WriteImage(volume, str(tmp_path / "volume.dcm"))
    _same_physical_image(*read_image(tmp_path / "volume.dcm"), sitk.GetArrayFromImage(volume).astype(np.float32),
                         Geometry.of(volume))
    # positions rounded to 0.01 mm on thin slices are one stack (ITK places them within 0.005 mm)
    thin = sitk.ReadImage(str(scans["fixed"]))
    thin.SetSpacing((0.5, 0.5, 0.625))
    write_series(thin, tmp_path / "thin", 4, decimals=2)
    assert read_geometry(tmp_path / "thin").spacing[2] == pytest.approx(0.625, abs=1e-3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"`FIXED`: .*empty is a folder holding no DICOM series"):
        read_image(empty, arg="FIXED")
    # metrics.json's provenance identifies the series read, not one file of it (nor a README beside the slices)
    from hybridreg.provenance import files_record

    (study / "README.txt").write_text("notes")
    rec = files_record({"folder": scans["fixed_dicom"], "file": scans["fixed_dicom"] / "s1_0010.dcm",
                        "other": study / "s2_0003.dcm", "nifti": scans["fixed"]})
    assert rec["folder"]["files"] == rec["file"]["files"] == rec["other"]["files"] == 64
    assert rec["folder"]["sha256"] == rec["file"]["sha256"] != rec["other"]["sha256"]
    assert "files" not in rec["nifti"] and rec["nifti"]["sha256"] == file_sha256(scans["fixed"])


@pytest.mark.parametrize("fault,needle", [
    ("gap", r"uneven or missing slices \(spacing 2 to 4 mm\)"),
    ("tilt", "a gantry tilt"),
    ("drift", r"a gantry tilt \(slice positions off the slices' normal by up to 1.26 mm\)"),
    ("two-volumes", r"repeats slice positions \(several volumes, or a slice twice\)"),
])
def test_a_series_the_grid_cannot_describe_is_refused(scans, tmp_path, fault, needle):
    """ITK reads such a series with one spacing and a warning (which the CLI silences): the image
    would sit in the wrong place, so it is refused."""
    image = sitk.ReadImage(str(scans["fixed"]))
    folder = tmp_path / fault
    if fault in ("tilt", "drift"):  # each slice 0.5 mm (0.02 mm: 1 % of a slice, 1.26 mm over the stack) further along x
        write_series(image, folder, 3, shift=lambda i: np.array([(0.5 if fault == "tilt" else 0.02) * i, 0.0, 0.0]))
    elif fault == "two-volumes":
        write_series(image, folder, 3, positions=[i % 32 for i in range(image.GetDepth())])
    else:
        write_series(image, folder, 3)
        os.remove(folder / "s3_0030.dcm")
    with pytest.raises(ValueError, match=rf"`FIXED`: the DICOM series in {folder} \(\d+ files\) (has )?{needle}"):
        read_image(folder, arg="FIXED")


def test_register_and_batch_take_a_dicom_series(scans, tmp_path):
    """``register`` with FIXED as a DICOM folder registers like FIXED as NIfTI: the output lies on the
    series' grid, the labels (on the NIfTI grid, the same physical points) are scored, and ``batch``
    takes the folder in its manifest."""
    quick = tmp_path / "quick.yaml"
    quick.write_text("level_spacing: [4.0]\niterations: [10]\n")
    common = ["--affine", "none", "--config", str(quick), "--no-progress", "--moving-labels", str(scans["moving_labels"])]
    runs = {}
    for name in ("fixed", "fixed_dicom"):
        labels = scans["fixed_labels"]
        if name == "fixed_dicom":  # the label map resampled onto the series' grid (the same physical points)
            labels = tmp_path / "fixed_labels_on_series.nii.gz"
            geo = read_geometry(scans["fixed_dicom"])
            sitk.WriteImage(sitk.Resample(sitk.ReadImage(str(scans["fixed_labels"])), geo.reference(), sitk.Transform(),
                                          sitk.sitkNearestNeighbor, 0, sitk.sitkInt32), str(labels))
        out = tmp_path / name
        assert main(["register", str(scans[name]), str(scans["moving"]), "--out", str(out), "--fixed-labels", str(labels),
                     *common]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    grid = runs["fixed_dicom"]["inputs"]["grid"]
    assert grid["size"] == [64, 64, 64] and Geometry(**{k: tuple(v) for k, v in grid.items()}) == read_geometry(scans["fixed_dicom"])
    before = [runs[n]["dice_before"]["mean"] for n in runs]
    assert before[0] == pytest.approx(before[1], abs=1e-9)  # the same scan, the same labels
    after = [runs[n]["dice_after"]["mean"] for n in runs]
    assert after[1] > before[1] + 0.02 and after[1] == pytest.approx(after[0], abs=0.02)
    manifest = tmp_path / "pairs.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["fixed", "moving", "id"], [str(scans["fixed_dicom"]), str(scans["moving"]), "series"]])
    assert read_pairs(manifest)[0].fixed == str(scans["fixed_dicom"])
    # in a locale whose encoding is not UTF-8 (a C locale here, cp1252 on Windows): the summary's "±" and "λ" were
    # written in the locale's encoding, and the batch failed at its end
    ctype = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert main(["batch", str(manifest), "--out", str(tmp_path / "batch"), "--affine", "none", "--config", str(quick),
                     "--no-progress"]) == 0
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)
    assert (tmp_path / "batch" / "pairs" / "series" / "metrics.json").is_file()
    assert not (tmp_path / "batch" / "failed").exists()  # made for the first failure only
    assert "±" in (tmp_path / "batch" / "summary.md").read_text(encoding="utf-8")
