"""Tests of the bundled data and its loader (hybridreg.data).  Fast; reads only the package."""

from __future__ import annotations

import ast
import hashlib
import json
import inspect

import numpy as np
import pytest
import SimpleITK as sitk

from hybridreg import data

EVAL = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31,
        41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63)
ABSENT_SYNTHETIC = {24, 31, 63}  # no choroid plexus in SynthSeg maps; their CSF 24 removed
SHAPE = {1: (224, 192, 160), 2: (112, 96, 80)}
DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)


@pytest.fixture(scope="module")
def index():
    return json.loads((data.BUNDLED_DIR / "subjects.json").read_text())


@pytest.fixture(scope="module")
def subjects_2mm():
    return {sid: data.load_subject(sid, 2) for sid in data.list_subjects()}


# ----------------------------------------------------------------------------- listing

def test_list_subjects_and_splits():
    all_ids = data.list_subjects()
    assert len(all_ids) == 21 and all_ids[0] == "vxm"
    sizes = {s: len(data.list_subjects(s)) for s in data.SPLITS}
    assert sizes == {"atlas": 1, "train": 12, "val": 3, "test": 5}
    assert data.list_subjects("atlas") == ["vxm"]
    assert data.list_subjects("train") == [f"synthseg_{i:02d}" for i in range(1, 13)]
    assert data.list_subjects("val") == [f"synthseg_{i:02d}" for i in range(13, 16)]
    assert data.list_subjects("test") == [f"synthseg_{i:02d}" for i in range(16, 21)]
    seen = [s for split in data.SPLITS for s in data.list_subjects(split)]
    assert len(seen) == len(set(seen)) and set(seen) == set(all_ids)  # disjoint, complete


def test_pairs_and_demo_pair():
    assert data.demo_pair() == ("vxm", "synthseg_16") == data.demo_pair(1)
    for split in ("train", "val", "test"):
        p = data.pairs(split)
        assert p == [("vxm", s) for s in data.list_subjects(split)]
    assert data.demo_pair()[1] in data.list_subjects("test")


def test_labels_metadata():
    assert data.evaluation_labels() == EVAL
    names = data.label_names()
    assert all(lab in names for lab in EVAL)
    assert names[31] == "Left-choroid-plexus" and names[63] == "Right-choroid-plexus"
    assert names[2] == "Left-Cerebral-White-Matter" and names[16] == "Brain-Stem"


# ----------------------------------------------------------------------------- loading

def test_load_2mm_all_subjects(subjects_2mm):
    for sid, s in subjects_2mm.items():
        assert s.subject_id == sid
        assert s.image.shape == SHAPE[2] and s.labels.shape == SHAPE[2]
        assert s.image.dtype == np.float32 and s.labels.dtype == np.int32
        assert s.spacing == (2.0, 2.0, 2.0)
        assert s.image_path.is_file() and s.labels_path.is_file()
        assert s.image_path.name == f"{sid}_t1_2mm.nii.gz"
        assert float(s.image.min()) >= 0.0 and float(s.image.max()) <= 1.0
        assert not s.image[s.labels == 0].any(), "non-zero intensity outside the labels"
        assert s.image[s.labels > 0].mean() > 0.15  # a brain, not an empty image


def test_evaluation_labels_present_2mm(subjects_2mm):
    for sid, s in subjects_2mm.items():
        present = set(np.unique(s.labels).tolist())
        missing = set(EVAL) - present
        info = data.subject_info(sid)
        if info["kind"] == "real":
            assert missing == set(), sid
        else:
            # documented gaps of the synthetic subjects, nothing else missing
            assert missing == ABSENT_SYNTHETIC, (sid, missing)
        assert sorted(missing) == info["missing_evaluation_labels"]


def test_load_1mm():
    for sid in ("vxm", "synthseg_16"):
        s = data.load_subject(sid, resolution=1)
        assert s.image.shape == SHAPE[1] and s.labels.shape == SHAPE[1]
        assert s.image.dtype == np.float32 and s.labels.dtype == np.int32
        assert s.spacing == (1.0, 1.0, 1.0)
        assert not s.image[s.labels == 0].any()
        assert set(EVAL) - ABSENT_SYNTHETIC <= set(np.unique(s.labels).tolist())


def test_1mm_images_bundled_where_declared(index):
    for e in index["subjects"]:
        if e["split"] in ("atlas", "test"):
            assert e["t1_1mm_bundled"], e["id"]
        assert e["files"]["aseg_1mm"] is not None  # 1 mm labels are kept for everyone
        if not e["t1_1mm_bundled"]:
            with pytest.raises(FileNotFoundError, match="not bundled"):
                data.load_subject(e["id"], 1)


def test_real_subject_is_real():
    info = data.subject_info("vxm")
    assert info["kind"] == "real" and info["split"] == "atlas"
    assert all(data.subject_info(s)["kind"] == "synthetic" for s in data.list_subjects()[1:])


# ----------------------------------------------------------------------------- geometry

def _info(path):
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return r


def _corners(r):
    """Physical positions of the outer faces' extreme corners (voxel edges, not centres)."""
    d = np.array(r.GetDirection()).reshape(3, 3)
    sp = np.array(r.GetSpacing())
    size = np.array(r.GetSize())
    o = np.array(r.GetOrigin())
    lo = o + d @ (-0.5 * sp)
    hi = o + d @ ((size - 0.5) * sp)
    return lo, hi, o + d @ ((size - 1) / 2 * sp)


@pytest.mark.parametrize("sid", ["vxm", "synthseg_16", "synthseg_01"])
def test_grid_geometry(sid, index):
    e = {x["id"]: x for x in index["subjects"]}[sid]
    boxes = []
    for res in (1, 2):
        for kind in ("t1", "aseg"):
            f = e["files"][f"{kind}_{res}mm"]
            if f is None:
                continue
            r = _info(data.BUNDLED_DIR / f["path"])
            assert r.GetSize() == tuple(SHAPE[res][::-1])
            assert r.GetSpacing() == pytest.approx((float(res),) * 3)
            assert r.GetDirection() == pytest.approx(DIRECTION, abs=1e-6)
            lo, hi, centre = _corners(r)
            assert centre == pytest.approx((0.0, 0.0, 0.0), abs=1e-4)
            boxes.append((lo, hi))
    for lo, hi in boxes[1:]:  # 1 mm and 2 mm grids cover the same physical extent
        assert lo == pytest.approx(boxes[0][0], abs=1e-4)
        assert hi == pytest.approx(boxes[0][1], abs=1e-4)


def test_2mm_labels_agree_with_1mm():
    s1 = data.load_subject("vxm", 1)
    s2 = data.load_subject("vxm", 2)
    # every 2 mm label occurs in its 2x2x2 block at 1 mm (majority vote)
    blocks = s1.labels.reshape(112, 2, 96, 2, 80, 2).transpose(0, 2, 4, 1, 3, 5).reshape(
        112, 96, 80, 8)
    assert (blocks == s2.labels[..., None]).any(-1).all()
    # and the 2 mm image is close to the block mean of the 1 mm image inside the brain
    m = s2.labels > 0
    block_mean = s1.image.reshape(112, 2, 96, 2, 80, 2).mean((1, 3, 5))
    assert np.abs(block_mean[m] - s2.image[m]).mean() < 0.03


# ----------------------------------------------------------------------------- integrity

def test_sha256_of_bundled_files(index):
    n = 0
    for e in index["subjects"]:
        for f in e["files"].values():
            if f is None:
                continue
            path = data.BUNDLED_DIR / f["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"], path.name
            assert path.stat().st_size == f["bytes"]
            n += 1
    assert n >= 21 * 3


def test_bundle_size_and_licences():
    total = sum(p.stat().st_size for p in data.BUNDLED_DIR.rglob("*") if p.is_file())
    assert total <= 28_000_000
    lic = data.BUNDLED_DIR / "licenses"
    assert (lic / "voxelmorph-LICENSE.md").is_file() and (lic / "SynthSeg-LICENSE.txt").is_file()
    assert "Apache License" in (lic / "SynthSeg-LICENSE.txt").read_text()
    readme = (data.BUNDLED_DIR / "README.md").read_text()
    assert "scripts/prepare_data.py" in readme and "66342c1f" in readme


def test_loader_does_not_import_torch():
    tree = ast.parse(inspect.getsource(data))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call, name", [
    (lambda: data.load_subject("nope"), "subject_id"),
    (lambda: data.load_subject(16), "subject_id"),
    (lambda: data.load_subject("vxm", 3), "resolution"),
    (lambda: data.load_subject("vxm", resolution=True), "resolution"),
    (lambda: data.load_subject("vxm", "2"), "resolution"),
    (lambda: data.demo_pair(4), "resolution"),
    (lambda: data.list_subjects("training"), "split"),
    (lambda: data.pairs("atlas"), "split"),
    (lambda: data.pairs(None), "split"),
    (lambda: data.subject_info("synthseg_21"), "subject_id"),
])
def test_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_unknown_subject_message_lists_valid_ids():
    with pytest.raises(ValueError, match="synthseg_20"):
        data.load_subject("subject_99")
