"""Tests of the ``realworld`` data set's access code (benchmarks/realworld.py,
scripts/fetch_realworld.py, the committed benchmarks/data/icbm152).  Fast; never downloads
anything: colin27 is either absent (a temporary ``HYBRIDREG_DATA``) or a synthetic stand-in
written by the test."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import SimpleITK as sitk

from benchmarks import realworld as rw
from hybridreg import data
from hybridreg.metrics import score_dice

REPO = Path(__file__).resolve().parents[1]
SKIP_MSG = "skipped colin27 pairs: run python scripts/fetch_realworld.py"
PAIRS_12 = {37: 17, 38: 53, 41: 18, 42: 54, 71: 11, 72: 50, 73: 12, 74: 51, 75: 13, 76: 52, 77: 10, 78: 49}


# ----------------------------------------------------------------------------- relabelling

def test_aal_aseg_table_is_the_standard_numbering_and_sides_match():
    assert rw.aal_to_aseg_table() == PAIRS_12
    assert rw.COLIN27_LABELS == (10, 11, 12, 13, 17, 18, 49, 50, 51, 52, 53, 54)
    names = data.label_names()
    for name, idx, aseg in rw.AAL_ASEG:
        left = name.endswith("_L")
        assert (idx % 2 == 1) == left  # AAL: left structures are odd
        assert names[aseg].startswith("Left-" if left else "Right-")
        stem = name[:-2].lower()
        assert stem in names[aseg].lower()  # Hippocampus_L <-> Left-Hippocampus, ...


def test_relabel_aal_tiny():
    aal = np.array([[[0, 37, 38, 41], [42, 71, 72, 73]], [[74, 75, 76, 77], [78, 1, 116, 39]]], dtype=np.uint8)
    out = rw.relabel_aal(aal)
    expect = np.array([[[0, 17, 53, 18], [54, 11, 50, 12]], [[51, 13, 52, 10], [49, 0, 0, 0]]])
    assert out.dtype == np.uint8 and out.shape == aal.shape
    np.testing.assert_array_equal(out, expect)
    # int and integral float inputs give the same; labels above every table key map to 0
    np.testing.assert_array_equal(rw.relabel_aal(aal.astype(np.int32)), expect)
    np.testing.assert_array_equal(rw.relabel_aal(aal.astype(np.float32)), expect)
    assert rw.relabel_aal(np.array([200, 37])).tolist() == [0, 17]
    for bad in (np.array([0.5, 37.0]), np.array([-1, 37]), np.array([np.nan])):
        with pytest.raises(ValueError):
            rw.relabel_aal(bad)


def test_aal_table_from_the_atlas_own_label_list(tmp_path):
    # another numbering (AAL's 2001-style codes): the mapping is built by structure name
    txt = tmp_path / "aal_codes.txt"
    lines = [f"{code} {name}" for name, code in [("Precentral_L", 2001), ("Hippocampus_L", 4101),
             ("Hippocampus_R", 4102), ("Amygdala_L", 4201), ("Amygdala_R", 4202), ("Caudate_L", 7001),
             ("Caudate_R", 7002), ("Putamen_L", 7011), ("Putamen_R", 7012), ("Pallidum_L", 7021),
             ("Pallidum_R", 7022), ("Thalamus_L", 7101), ("Thalamus_R", 7102)]]
    txt.write_text("\n".join(lines) + "\n\n")
    table = rw.aal_to_aseg_table(rw.read_aal_label_list(txt))
    assert table[4101] == 17 and table[4102] == 53 and table[7101] == 10 and 2001 not in table
    aal = np.array([0, 2001, 4101, 4102, 7022, 37], dtype=np.int32)
    assert rw.relabel_aal(aal, table).tolist() == [0, 0, 17, 53, 52, 0]
    # mricron-data's format "index name code" reads as {index: name}
    txt.write_text("37 Hippocampus_L 4101\n38 Hippocampus_R 4102\n")
    assert rw.read_aal_label_list(txt) == {37: "Hippocampus_L", 38: "Hippocampus_R"}
    with pytest.raises(ValueError, match="lacks"):
        rw.aal_to_aseg_table(rw.read_aal_label_list(txt))
    txt.write_text("37 Hippocampus_L\n37 Hippocampus_R\n")
    with pytest.raises(ValueError, match="twice"):
        rw.read_aal_label_list(txt)
    txt.write_text("Hippocampus_L 37\n")
    with pytest.raises(ValueError, match="expected"):
        rw.read_aal_label_list(txt)


def test_restrict_aseg_tiny():
    aseg = np.array([0, 2, 3, 10, 11, 12, 13, 16, 17, 18, 26, 41, 49, 50, 51, 52, 53, 54, 255])
    out = rw.restrict_aseg(aseg)
    assert out.tolist() == [0, 0, 0, 10, 11, 12, 13, 0, 17, 18, 0, 0, 49, 50, 51, 52, 53, 54, 0]
    assert rw.restrict_aseg(aseg, keep=(17, 53)).tolist().count(0) == len(aseg) - 2


def test_aseg_to_tissue_tiny_and_the_grouping_is_a_partition():
    gm, wm, ex = set(rw.ASEG_GM), set(rw.ASEG_WM), set(rw.ASEG_TISSUE_EXCLUDED)
    assert not (gm & wm) and not (gm & ex) and not (wm & ex)
    assert {3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 17, 53, 18, 54, 26, 58, 16} == gm
    assert {2, 41, 7, 46, 13, 52, 251, 255} <= wm and {28, 60, 4, 43, 24} <= ex
    ids = np.array(sorted(gm | wm | ex | {0, 1000}))
    out = rw.aseg_to_tissue(ids)
    assert out.dtype == np.uint8
    expect = [rw.GM if i in gm else rw.WM if i in wm else 0 for i in ids]
    assert out.tolist() == expect
    # every label of the real subject is decided (GM, WM or excluded)
    present = set(np.unique(data.load_subject("vxm", 2).labels).tolist()) - {0}
    assert present <= gm | wm | ex


# ----------------------------------------------------------------------------- committed ICBM152

def test_committed_icbm152_files_match_their_provenance():
    d = rw.ICBM152_DIR
    prov = json.loads((d / "provenance.json").read_text())
    for name, rec in prov["outputs"].items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == rec["sha256"], name
    assert (d / "COPYING.ICBM152-2009.txt").read_text().startswith("Copyright (C) 1993-2004 Louis Collins")
    assert "nilearn" in (d / "LICENSE.nilearn-BSD3.txt").read_text()
    assert sum(p.stat().st_size for p in d.iterdir()) < 4_000_000
    t1 = sitk.ReadImage(str(d / rw.ICBM152_FILES["t1"]))
    assert t1.GetSize() == (197, 233, 189) and t1.GetSpacing() == (1.0, 1.0, 1.0)
    assert rw.scan_summary(d / rw.ICBM152_FILES["t1"])["orientation"] == "RAS"
    a = sitk.GetArrayFromImage(t1)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(d / rw.ICBM152_FILES["mask"])))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(d / rw.ICBM152_FILES["tissue"])))
    assert a.dtype == mask.dtype == lab.dtype == np.uint8
    np.testing.assert_array_equal(mask.astype(bool), ndi.binary_fill_holes(a > 0))
    assert set(np.unique(lab).tolist()) == {0, 1, 2} and not lab[mask == 0].any()
    # T1-weighted: WM brighter than GM
    assert np.median(a[lab == 2]) > np.median(a[lab == 1])


# ----------------------------------------------------------------------------- pairs

def _label_image(path: Path) -> tuple[sitk.Image, np.ndarray]:
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin())
            and np.allclose(a.GetDirection(), b.GetDirection()) and np.allclose(a.GetSpacing(), b.GetSpacing()))


def test_icbm_pairs_without_colin27(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDREG_DATA", str(tmp_path))
    assert rw.default_root() == tmp_path / "realworld"
    with pytest.warns(UserWarning, match=SKIP_MSG):
        pairs = rw.realworld_pairs()
    assert [p.name for p in pairs] == ["icbm152<-vxm", "vxm<-icbm152"]
    assert rw.colin27_missing().startswith(SKIP_MSG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(rw.realworld_pairs(warn=False)) == 2
    fwd, back = pairs
    assert fwd.fixed == back.moving == "icbm152" and fwd.moving == back.fixed == "vxm"
    assert fwd.kind == "tissue" and fwd.labels == (1, 2) and fwd.label_names == {1: "GM", 2: "WM"}
    assert fwd.fixed_image == back.moving_image and fwd.fixed_labels == back.moving_labels
    vxm = data.load_subject("vxm", 1)
    assert fwd.moving_image == vxm.image_path
    assert fwd.moving_labels.parent == tmp_path / "realworld" / "cache"
    for image, labels in ((fwd.fixed_image, fwd.fixed_labels), (fwd.moving_image, fwd.moving_labels)):
        img, lab = _label_image(labels)
        assert _same_grid(img, sitk.ReadImage(str(image)))  # labels on their own image's grid
        assert set(np.unique(lab).tolist()) == {0, 1, 2}
    _, vlab = _label_image(fwd.moving_labels)
    np.testing.assert_array_equal(vlab, rw.aseg_to_tissue(vxm.labels))
    # scored by the ordinary metrics on the common IDs
    s = score_dice(vlab, vlab, policy=list(fwd.labels))
    assert s["labels"] == (1, 2) and s["mean"] == 1.0
    # the cache is reused, and rebuilt when it no longer matches its source
    t0 = fwd.moving_labels.stat().st_mtime_ns
    assert rw.realworld_pairs(warn=False)[0].moving_labels.stat().st_mtime_ns == t0
    side = fwd.moving_labels.with_name("vxm_aseg_tissue.json")
    side.write_text(json.dumps({"source_sha256": "stale"}))
    rw.realworld_pairs(warn=False)
    assert json.loads(side.read_text())["source_sha256"] != "stale"


def _write(arr_zyx: np.ndarray, path: Path, spacing=1.0, origin=(0.0, 0.0, 0.0), direction=None) -> None:
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path), useCompression=True)


AAL_TXT = "".join(f"{i} {n} {c}\n" for i, n, c in
                  [(1, "Precentral_L", 2001), (37, "Hippocampus_L", 4101), (38, "Hippocampus_R", 4102),
                   (41, "Amygdala_L", 4201), (42, "Amygdala_R", 4202), (71, "Caudate_L", 7001),
                   (72, "Caudate_R", 7002), (73, "Putamen_L", 7011), (74, "Putamen_R", 7012),
                   (75, "Pallidum_L", 7021), (76, "Pallidum_R", 7022), (77, "Thalamus_L", 7101),
                   (78, "Thalamus_R", 7102)])


def test_colin27_pairs_from_a_synthetic_stand_in(tmp_path):
    root = tmp_path / "rw"
    root.mkdir()
    aal = np.zeros((6, 7, 8), np.uint8)
    aal[1, 1, 1:4] = [37, 38, 1]
    aal[2, 3, 4:7] = [77, 78, 75]
    _write(aal, root / "aal.nii.gz", origin=(5.0, 6.0, 7.0))
    _write((aal > 0).astype(np.uint8) * 90, root / "ch2bet.nii.gz", origin=(5.0, 6.0, 7.0))
    (root / "aal.nii.txt").write_text(AAL_TXT)
    (root / "copyright").write_text("BSD-3-clause\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = rw.realworld_pairs(root)
    assert [p.name for p in pairs] == ["colin27<-vxm", "vxm<-colin27", "icbm152<-vxm", "vxm<-icbm152"]
    c = pairs[0]
    assert c.kind == "aal-aseg" and c.labels == rw.COLIN27_LABELS and c.label_names[17] == "Left-Hippocampus"
    assert c.fixed_image == root / "ch2bet.nii.gz" and pairs[1].moving_labels == c.fixed_labels
    img, lab = _label_image(c.fixed_labels)
    assert img.GetOrigin() == (5.0, 6.0, 7.0)
    assert lab[1, 1, 1:4].tolist() == [17, 53, 0] and lab[2, 3, 4:7].tolist() == [10, 49, 13]
    assert lab.sum() == 17 + 53 + 10 + 49 + 13
    _, vlab = _label_image(c.moving_labels)
    np.testing.assert_array_equal(vlab, rw.restrict_aseg(data.load_subject("vxm", 1).labels))


# ----------------------------------------------------------------------------- fetch script (offline)

def _load_fetch_script():
    spec = importlib.util.spec_from_file_location("fetch_realworld", REPO / "scripts" / "fetch_realworld.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _fake_deb(path: Path, files: dict[str, bytes], version: str = "9.9-test") -> Path:
    control = f"Package: mricron-data\nVersion: {version}\nArchitecture: all\nMaintainer: test <t@t>\nDescription: test\n"
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_xz({"control": control.encode()})),
               ("data.tar.xz", _tar_xz(files))]
    out = bytearray(b"!<arch>\n")
    for name, blob in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def _colin27_like(tmp: Path) -> dict[str, bytes]:
    """Synthetic files with the real geometry (181x217x181, 1 mm, RAS, MNI origin)."""
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    origin = (90.0, 125.0, -71.0)
    aal = np.zeros((181, 217, 181), np.uint8)  # z, y, x; x index 90 is x = 0 mm
    for name, idx, _ in rw.AAL_ASEG:
        x = 60 if name.endswith("_L") else 120  # left (x < 0 mm RAS) for _L
        aal[40 + idx, 100:104, x:x + 3] = idx
    t1 = np.where(aal > 0, 100, 0).astype(np.uint8)
    _write(aal, tmp / "aal.nii.gz", origin=origin, direction=direction)
    _write(t1, tmp / "ch2bet.nii.gz", origin=origin, direction=direction)
    txt = "".join(f"{i} Region{i:03d}_{'L' if i % 2 else 'R'} 0\n" for i in range(1, 117))
    for name, idx, _ in rw.AAL_ASEG:
        txt = txt.replace(f"{idx} Region{idx:03d}_{name[-1]} 0", f"{idx} {name} 0")
    return {"usr/share/mricron/templates/ch2bet.nii.gz": (tmp / "ch2bet.nii.gz").read_bytes(),
            "usr/share/mricron/templates/aal.nii.gz": (tmp / "aal.nii.gz").read_bytes(),
            "usr/share/mricron/templates/aal.nii.txt": txt.encode(),
            "usr/share/doc/mricron-data/copyright": b"License: BSD-3-clause\n"}


@pytest.mark.parametrize("python_extract", [False, True], ids=["dpkg", "python"])
def test_fetch_script_offline_with_a_local_deb(tmp_path, monkeypatch, capsys, python_extract):
    fetch = _load_fetch_script()
    if python_extract:  # pretend dpkg is not installed
        real_which = shutil.which
        monkeypatch.setattr(fetch.shutil, "which", lambda n: None if n.startswith("dpkg") else real_which(n))
    elif shutil.which("dpkg") is None:
        pytest.skip("dpkg not installed")
    work = tmp_path / "work"
    work.mkdir()
    deb = _fake_deb(tmp_path / "mricron-data_9.9-test_all.deb", _colin27_like(work))
    dest = tmp_path / "dest"
    assert fetch.main(["--deb", str(deb), "--dest", str(dest)]) == 0
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted([*rw.COLIN27_FILES, "PROVENANCE.md", "provenance.json"])  # no staging left
    prov = json.loads((dest / "provenance.json").read_text())
    assert prov["version"] == "9.9-test" and prov["checks"]["orientation"] == "RAS"
    for n in rw.COLIN27_FILES:
        assert prov["files"][n]["sha256"] == hashlib.sha256((dest / n).read_bytes()).hexdigest()
    md = (dest / "PROVENANCE.md").read_text()
    assert "Tzourio-Mazoyer" in md and "BSD-3-clause" in md and "9.9-test" in md
    assert rw.colin27_missing(dest) is None
    # idempotent: a second run changes nothing and needs no package
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    capsys.readouterr()
    assert fetch.main(["--dest", str(dest)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before


def test_fetch_script_rejects_wrong_sides(tmp_path, capsys):
    fetch = _load_fetch_script()
    work = tmp_path / "work"
    work.mkdir()
    files = _colin27_like(work)
    img = sitk.ReadImage(str(work / "aal.nii.gz"))
    mirrored = sitk.GetImageFromArray(sitk.GetArrayFromImage(img)[:, :, ::-1].copy())  # voxels mirrored in x
    mirrored.CopyInformation(img)  # header unchanged: every _L structure now lies at x > 0 mm
    sitk.WriteImage(mirrored, str(work / "aal.nii.gz"), useCompression=True)
    files["usr/share/mricron/templates/aal.nii.gz"] = (work / "aal.nii.gz").read_bytes()
    deb = _fake_deb(tmp_path / "mricron-data_9.9-test_all.deb", files)
    dest = tmp_path / "dest"
    with pytest.raises(SystemExit) as e:
        fetch.main(["--deb", str(deb), "--dest", str(dest)])
    assert e.value.code == 1 and "wrong side" in capsys.readouterr().err
    assert rw.colin27_missing(dest) is not None and not any(p.suffix == ".gz" for p in dest.iterdir())
