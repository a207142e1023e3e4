"""Data sources of the learned solver: bundled, CSV/JSON manifests, the OASIS (neurite /
Learn2Reg) layout and TransMorph's IXI layout, on tiny fixtures written here in each layout."""

import json
import pickle

import numpy as np
import pytest

from hybridreg.data.sources import bundled, from_manifest, ixi, load_dataset, oasis
from hybridreg.io import Geometry, normalize_intensity, write_image

SHAPE = (10, 12, 14)
GEO = Geometry(size=(14, 12, 10), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _volume(seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    img = rng.random(shape).astype(np.float32) * 100
    lab = np.zeros(shape, np.int32)
    lab[2:6, 3:8, 4:9] = 2
    lab[5:9, 6:10, 7:12] = 41 + seed % 2
    return img, lab


def _write_subjects(root, n, geo=GEO):
    rows = []
    for i in range(n):
        img, lab = _volume(i)
        write_image(root / f"s{i}_t1.nii.gz", img, geo)
        write_image(root / f"s{i}_seg.nii.gz", lab, geo, dtype=np.int32)
        rows.append({"id": f"s{i}", "image": f"s{i}_t1.nii.gz", "labels": f"s{i}_seg.nii.gz"})
    return rows


def test_bundled_source_has_the_documented_splits():
    ds = bundled(2)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 3, 5)
    assert ds.atlas.subject_id == "vxm" and ds.spacing == (2.0, 2.0, 2.0) and ds.shape == (112, 96, 80)
    assert [m.subject_id for _, m in ds.validation_pairs()] == ["synthseg_13", "synthseg_14", "synthseg_15"]
    assert [(f.subject_id, m.subject_id) for f, m in ds.pairs("test")] == [("vxm", f"synthseg_{i}") for i in range(16, 21)]
    with pytest.raises(ValueError, match="split"):
        ds.pairs("train")
    assert 0.9 < float(np.percentile(ds.train[0].image[ds.train[0].image > 0], 99.5)) < 1.1  # normalised


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_manifest_source(tmp_path, fmt):
    rows = _write_subjects(tmp_path, 5)
    splits = ["atlas", "train", "train", "val", "test"]
    for r, s in zip(rows, splits):
        r["split"] = s
    rows[2]["labels"] = ""  # training subjects may come without labels
    if fmt == "csv":
        man = tmp_path / "data.csv"
        man.write_text("id,image,labels,split\n" + "".join(f"{r['id']},{r['image']},{r['labels']},{r['split']}\n" for r in rows))
    else:
        man = tmp_path / "data.json"
        man.write_text(json.dumps({"subjects": rows}))
    ds = load_dataset(str(man))
    assert ds.atlas.subject_id == "s0" and [v.subject_id for v in ds.train] == ["s1", "s2"]
    assert ds.train[1].labels is None and ds.val[0].labels is not None
    assert ds.shape == SHAPE and ds.spacing == (1.0, 1.0, 1.0)
    img, lab = _volume(3)
    assert np.array_equal(ds.val[0].labels, lab)
    assert np.allclose(ds.val[0].image, normalize_intensity(img))
    # resampling to 2 mm keeps the extent and the label values
    ds2 = from_manifest(man, spacing=[2.0])
    assert ds2.shape == (5, 6, 7) and ds2.spacing == (2.0, 2.0, 2.0)
    assert set(np.unique(ds2.val[0].labels)) <= {0, 2, 41, 42}
    # a spacing that leaves one voxel along an axis gave a 1x1x1 grid, a NaN validation Dice and a useless network
    with pytest.raises(ValueError, match="grid 1x1x1 at .* has an axis of one voxel: choose a smaller `spacing`"):
        from_manifest(man, spacing=[50.0])


@pytest.mark.parametrize("content,exc,match", [
    ("image,split\ns0_t1.nii.gz,holdout\n", ValueError, "split"),
    ("image,labels\ns0_t1.nii.gz,\n", ValueError, "split"),
    ("image,split\ns0_t1.nii.gz,atlas\ns1_t1.nii.gz,atlas\ns2_t1.nii.gz,train\n", ValueError, "more than one atlas"),
    ("image,split\nmissing.nii.gz,train\n", FileNotFoundError, "missing.nii.gz"),
    ("image,split\ns0_t1.nii.gz,val\n", ValueError, "no training subjects"),
    ("image,split\ns0_t1.nii.gz,train\nodd.nii.gz,train\n", ValueError, "different grids"),
])
def test_manifest_errors_name_the_problem(tmp_path, content, exc, match):
    _write_subjects(tmp_path, 3)
    other = Geometry(size=(14, 12, 11), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=GEO.direction)
    write_image(tmp_path / "odd.nii.gz", np.random.default_rng(0).random((11, 12, 14)).astype(np.float32), other)
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(exc, match=match):
        from_manifest(bad)


def test_unreadable_sources(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read manifest"):
        from_manifest(tmp_path / "broken.json")
    # the messages name the argument as the caller knows it: `spec` in Python, --data on the CLI, a space's train_data
    with pytest.raises(FileNotFoundError, match="^`spec`: "):
        load_dataset(str(tmp_path / "nowhere.csv"))
    with pytest.raises(FileNotFoundError, match="^`--data`: "):
        load_dataset(str(tmp_path / "nowhere.csv"), arg="--data")
    with pytest.raises(FileNotFoundError, match="^`train_data`: .* is neither"):
        load_dataset(str(tmp_path / "broken.csv"), arg="train_data")
    with pytest.raises(ValueError, match="neither the OASIS layout"):
        load_dataset(str(tmp_path))


def test_oasis_layout(tmp_path):
    for i in range(10):
        d = tmp_path / f"OASIS_OAS1_{i + 1:04d}_MR1"
        d.mkdir()
        img, lab = _volume(i)
        write_image(d / "aligned_norm.nii.gz", img, GEO)
        write_image(d / "aligned_seg35.nii.gz", lab, GEO, dtype=np.int32)
    ds = load_dataset(str(tmp_path))
    assert ds.name.startswith("OASIS") and ds.atlas is None
    assert [v.subject_id for v in ds.val] == ["OASIS_OAS1_0009_MR1"] and len(ds.train) == 8 and len(ds.test) == 1
    assert ds.validation_pairs() == []  # one val subject, no atlas: no pair
    ds = oasis(tmp_path)
    assert np.array_equal(ds.train[3].labels, _volume(3)[1])


def test_ixi_transmorph_layout(tmp_path):
    for split, n in (("Train", 3), ("Val", 2), ("Test", 1)):
        (tmp_path / split).mkdir()
        for i in range(n):
            with open(tmp_path / split / f"subject_{split}{i}.pkl", "wb") as fh:
                pickle.dump(_volume(i), fh)
    with open(tmp_path / "atlas.pkl", "wb") as fh:
        pickle.dump(_volume(99), fh)
    ds = load_dataset(str(tmp_path))
    assert ds.name.startswith("IXI") and ds.atlas is not None
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3, 2, 1) and ds.spacing == (1.0, 1.0, 1.0)
    assert len(ds.validation_pairs()) == 2
    (tmp_path / "Train" / "subject_Train0.pkl").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot unpickle"):
        ixi(tmp_path)


def test_bundled_1mm_source_evaluates_but_cannot_train():
    """Only the test subjects have a bundled 1 mm image: the 1 mm source yields the suite's
    test pairs, and training on it names the missing split."""
    from learned.train import TrainConfig, train

    ds = bundled(1)
    assert not ds.train and ds.test and ds.spacing == (1.0, 1.0, 1.0)
    assert [f.subject_id for f, _ in ds.pairs("test")] == ["vxm"] * len(ds.test)
    with pytest.raises(ValueError, match="no training subjects"):
        train(TrainConfig(steps=1), ds, "unused")
