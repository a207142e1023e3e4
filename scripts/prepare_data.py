#!/usr/bin/env python
"""Build the small data set that ships inside ``hybridreg`` (``hybridreg/data/bundled``).

Run from the repository root::

    python scripts/prepare_data.py --shared ../shared/data --out hybridreg/data/bundled

Inputs (read-only, see ``<shared>/MANIFEST.md``):

* ``voxelmorph-test-scan/test_scan.npz`` - one real skull-stripped T1 (``vol``, float64 in
  [0, 1]) with its FreeSurfer aseg (``seg``), 160x192x224 voxels, 1 mm, FreeSurfer-conformed
  LIA voxel order, no affine; ``labels.npz`` lists the 30 evaluation labels.
* ``synthseg-label-maps/training_seg_01..20.nii.gz`` - 20 whole-head label maps of real
  subjects (256^3, 1 mm, LIA), no intensity images.

What it does (all of it deterministic: fixed seeds, single-threaded ITK):

1. Common grid = the voxelmorph subject's grid: SimpleITK size (160, 192, 224), spacing 1 mm,
   direction (1,0,0, 0,0,-1, 0,-1,0) (LIA expressed in ITK's LPS frame), origin chosen so
   that the grid centre is at physical (0, 0, 0).  The 2 mm grid has size (80, 96, 112),
   spacing 2 mm, same direction, and its voxel centres are the centres of the 2x2x2 blocks of
   the 1 mm grid (same physical extent).
2. Subject ``vxm``: the real T1 and aseg on that grid; intensities are set to 0 wherever
   aseg == 0 (no dilation), so "brain mask" == "aseg > 0" for every bundled subject.
3. For each SynthSeg map: label cleaning (see ``clean_synthseg_labels``), affine alignment
   to the real T1 (moments initialiser, then mean-squares affine registration, 3 levels),
   nearest-neighbour resampling onto the common grid, then synthesis of a T1-like image on
   the common grid from per-label intensity statistics measured on the real T1.
4. 2 mm versions: images are Gaussian-smoothed (sigma = 0.75 mm, the FWHM-matching sigma for
   going from 1 mm to 2 mm: sqrt(2^2 - 1^2) / 2.3548) and linearly resampled at the 2 mm
   voxel centres (which, at block centres, is the mean of the 2x2x2 block) and masked by the
   2 mm labels; labels are down-sampled by a 2x2x2 majority vote (ties -> the smallest
   non-zero label; background only wins with a strict plurality, see ``majority_2x``).
5. Writes NIfTI files (uint8), ``subjects.json``, ``labels.json``, ``README.md`` and the
   licence files, and enforces a size budget by dropping 1 mm T1 images of train/val
   subjects if needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk

# ----------------------------------------------------------------------------- constants

GRID_SIZE_1MM = (160, 192, 224)  # SimpleITK (x, y, z) order
GRID_SIZE_2MM = (80, 96, 112)
DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)  # LIA in ITK's LPS frame

EXPECTED_EVAL_LABELS = [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31,
                 41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63]

SPLITS = {
    "atlas": ["vxm"],
    "train": [f"synthseg_{i:02d}" for i in range(1, 13)],
    "val": [f"synthseg_{i:02d}" for i in range(13, 16)],
    "test": [f"synthseg_{i:02d}" for i in range(16, 21)],
}

# FreeSurferColorLUT names for every label that occurs in the voxelmorph aseg.
FS_NAMES = {
    0: "Unknown",
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex",
    4: "Left-Lateral-Ventricle", 5: "Left-Inf-Lat-Vent",
    7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum",
    14: "3rd-Ventricle", 15: "4th-Ventricle", 16: "Brain-Stem",
    17: "Left-Hippocampus", 18: "Left-Amygdala", 24: "CSF",
    26: "Left-Accumbens-area", 28: "Left-VentralDC", 30: "Left-vessel",
    31: "Left-choroid-plexus",
    41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle", 44: "Right-Inf-Lat-Vent",
    46: "Right-Cerebellum-White-Matter", 47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen", 52: "Right-Pallidum",
    53: "Right-Hippocampus", 54: "Right-Amygdala", 58: "Right-Accumbens-area",
    60: "Right-VentralDC", 62: "Right-vessel", 63: "Right-choroid-plexus",
    72: "5th-Ventricle", 77: "WM-hypointensities", 80: "non-WM-hypointensities",
    85: "Optic-Chiasm",
    251: "CC_Posterior", 252: "CC_Mid_Posterior", 253: "CC_Central",
    254: "CC_Mid_Anterior", 255: "CC_Anterior",
}

# Synthesis parameters (documented in README.md / labels.json).
SYNTH = {
    "texture_sigma_mm": 1.0,        # spatial correlation of the within-label texture
    "paint_statistics": "interior",  # label interior (1-voxel erosion, >= 100 voxels) mean/std
    "texture_fraction_of_std": 0.8,  # texture amplitude = fraction * interior per-label std
    "partial_volume_sigma_mm": 0.6,  # Gaussian blur of the painted image
    "bias_control_points": 4,        # per axis; cubic-spline upsampled random field
    "bias_amplitude_range": [0.10, 0.15],  # field = 1 + a * f, |f| <= 1, a ~ U(range)
    "noise_sigma": 0.01,             # additive white Gaussian noise (image in [0, 1])
    "seed_base": 20240,              # seed of synthseg_XX = seed_base + XX
}
REG = {
    "initializer": "CenteredTransformInitializer(MOMENTS) on the skull-stripped images",
    "transform": "AffineTransform(3)",
    "metric": "MeanSquares, RANDOM sampling within the fixed mask "
              "(aseg > 0 dilated by 5 voxels), sampling seed = subject seed",
    "sampling_percentage_per_level": [0.5, 0.25, 0.1],
    "optimizer": "RegularStepGradientDescent(learningRate=2.0, minStep=1e-3, "
                 "numberOfIterations=200, relaxationFactor=0.5, "
                 "gradientMagnitudeTolerance=1e-8), scales from physical shift",
    "shrink_factors": [4, 2, 1],
    "smoothing_sigmas_mm": [2.0, 1.0, 0.0],
    "moving_image": "quick synthetic image: each cleaned SynthSeg label painted with its mean "
                    "real-T1 intensity, Gaussian blur sigma 1 mm",
    "fixed_image": "vxm skull-stripped real T1 on the common grid",
    "threads": 1,
}
DOWNSAMPLE_SIGMA_MM = 0.75
BUDGET_BYTES_DEFAULT = 28_000_000


# ----------------------------------------------------------------------------- helpers

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def grid_origin(size, spacing):
    """Origin such that the grid centre lies at physical (0, 0, 0)."""
    d = np.array(DIRECTION).reshape(3, 3)
    centre_index = (np.array(size, dtype=float) - 1.0) / 2.0
    return tuple(float(v) for v in -(d @ (centre_index * spacing)))


def reference_image(size, spacing) -> sitk.Image:
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing((float(spacing),) * 3)
    ref.SetDirection(DIRECTION)
    ref.SetOrigin(grid_origin(size, spacing))
    return ref


def to_image(arr_zyx: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx)
    img.CopyInformation(ref)
    return img


def write(arr_zyx, ref, path: Path):
    sitk.WriteImage(to_image(arr_zyx, ref), str(path), useCompression=True, compressionLevel=9)


def dice_per_label(a, b, labels):
    out = {}
    for l in labels:
        ma, mb = a == l, b == l
        s = int(ma.sum()) + int(mb.sum())
        out[int(l)] = float(2.0 * np.logical_and(ma, mb).sum() / s) if s else float("nan")
    return out


def read_synthseg_names(table: Path) -> dict[int, str]:
    names = {}
    started = False
    for line in table.read_text().splitlines():
        if line.strip().startswith("labels") and "structures" in line:
            started = True
            continue
        if started and line.strip():
            parts = line.split(None, 1)
            if parts[0].isdigit() and len(parts) == 2:
                names[int(parts[0])] = parts[1].strip()
    return names


def to_uint8(img01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img01, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- label cleaning

def clean_synthseg_labels(a: np.ndarray, kept: set[int]) -> tuple[np.ndarray, dict]:
    """Map a SynthSeg whole-head label map onto the label set of the real aseg (skull-strip).

    * SynthSeg labels >= 500 are head / extra-cerebral classes; labels in (0, 500) that the
      real aseg does not have (25, 57, 136, 137, 163, 164 in these maps: undocumented
      intra-cerebral classes next to the lateral ventricles / white matter) are
      "other intra-cerebral" labels.
    * Label 24: SynthSeg calls *all* non-ventricular CSF 24 (extra-cerebral, sulcal,
      cisterns: ~0.3-0.5 litre), whereas a FreeSurfer aseg's 24 is one small region
      (1.3 cm^3 in the real subject) and sulcal / extra-cerebral CSF is 0.  SynthSeg's 24 is
      therefore set to 0 everywhere, as FreeSurfer would (keeping only the CSF pockets
      enclosed by tissue was tried: their Dice with the real 24 was 0.000 in 20/20 subjects).
    * tissue = aseg labels other than 24, plus the other intra-cerebral labels;
      brain = 3-D binary hole filling of tissue.  Outside ``brain`` everything becomes 0.
      Inside, aseg labels other than 24 are kept and the other intra-cerebral labels (and
      any enclosed head label) are replaced by the nearest aseg tissue label (Euclidean
      distance), so they leave no holes; enclosed CSF (24) becomes 0 like sulcal CSF.
    """
    kept_arr = np.array(sorted(kept - {24}))
    core = np.isin(a, kept_arr)
    other_intra = (a > 0) & (a < 500) & (a != 24) & ~np.isin(a, np.array(sorted(kept)))
    brain = ndi.binary_fill_holes(core | other_intra)
    out = np.where(brain & core, a, 0).astype(np.int32)
    stats = {"csf24_voxels_removed": int((a == 24).sum()),
             "csf24_voxels_enclosed_by_tissue": int(((a == 24) & brain).sum())}
    fill = brain & ~core & (a != 24) & (a != 0)
    stats["relabelled_to_nearest_tissue"] = {
        str(int(l)): int(c) for l, c in zip(*np.unique(a[fill], return_counts=True))}
    stats["other_labels_removed"] = {
        str(int(l)): int(c) for l, c in zip(*np.unique(a[~brain & ~core & (a > 0) & (a != 24)],
                                                      return_counts=True))}
    if fill.any():
        idx = np.argwhere(brain)
        lo = idx.min(0)
        hi = idx.max(0) + 1
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        _, ind = ndi.distance_transform_edt(~core[sl], return_indices=True)
        sub = out[sl]  # a view: edits write through to ``out``
        nearest = sub[tuple(ind)]
        f = fill[sl]
        sub[f] = nearest[f]
    return out, stats


# ----------------------------------------------------------------------------- synthesis

def label_stats(t1: np.ndarray, seg: np.ndarray) -> dict[int, dict]:
    """Per-label mean/std of the real T1: over the whole label, and over its interior
    (label eroded by one voxel, 6-connectivity), which excludes most partial-volume voxels.
    Labels whose interior has < 100 voxels use the whole-label values as "interior"."""
    stats = {}
    for l in np.unique(seg):
        l = int(l)
        if l == 0:
            continue
        m = seg == l
        v = t1[m]
        inner = ndi.binary_erosion(m)
        vi = t1[inner] if inner.sum() >= 100 else v
        stats[l] = {"mean": float(v.mean()), "std": float(v.std()), "n_voxels": int(v.size),
                    "interior_mean": float(vi.mean()), "interior_std": float(vi.std()),
                    "interior_n_voxels": int(vi.size)}
    return stats


def lut(stats, key):
    table = np.zeros(256, dtype=np.float32)
    for l, s in stats.items():
        table[l] = s[key]
    return table


def synthesize(labels: np.ndarray, stats, seed: int) -> tuple[np.ndarray, dict]:
    """T1-like image in [0, 1] (float32) painted from a label map on the 1 mm grid."""
    rng = np.random.default_rng(seed)
    shape = labels.shape
    mask = labels > 0
    mean_img = lut(stats, "interior_mean")[labels]
    std_img = lut(stats, "interior_std")[labels]
    tex = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32),
                              SYNTH["texture_sigma_mm"])
    tex /= tex.std()
    img = mean_img + np.float32(SYNTH["texture_fraction_of_std"]) * std_img * tex
    img[~mask] = 0.0
    img = ndi.gaussian_filter(img, SYNTH["partial_volume_sigma_mm"])
    n = SYNTH["bias_control_points"]
    coarse = rng.standard_normal((n, n, n))
    field = ndi.zoom(coarse, [s / n for s in shape], order=3, mode="nearest")[
        : shape[0], : shape[1], : shape[2]]
    field = field - field[mask].mean()
    field /= np.abs(field[mask]).max()
    amp = float(rng.uniform(*SYNTH["bias_amplitude_range"]))
    img = img * (1.0 + amp * field).astype(np.float32)
    img = img + rng.normal(0.0, SYNTH["noise_sigma"], shape).astype(np.float32)
    img = np.clip(img, 0.0, 1.0)
    img[~mask] = 0.0
    return img.astype(np.float32), {"bias_amplitude": amp}


# ----------------------------------------------------------------------------- alignment

def align(fixed: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image, seed: int):
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    r = sitk.ImageRegistrationMethod()
    r.SetNumberOfThreads(REG["threads"])
    r.SetMetricAsMeanSquares()
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentagePerLevel(REG["sampling_percentage_per_level"], seed)
    r.SetMetricFixedMask(fixed_mask)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel(REG["shrink_factors"])
    r.SetSmoothingSigmasPerLevel(REG["smoothing_sigmas_mm"])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    r.SetInitialTransform(init, inPlace=False)
    tx = r.Execute(fixed, moving)
    info = {
        "final_metric": float(r.GetMetricValue()),
        "metric_name": "mean squared intensity difference (image in [0, 1]; lower is "
                       "better), finest level, sampled",
        "optimizer_iterations_last_level": int(r.GetOptimizerIteration()),
        "stop_condition": r.GetOptimizerStopConditionDescription(),
    }
    return tx, info


def affine_params(tx: sitk.Transform) -> dict:
    """Flatten a (composite) result into a single affine: x_moving = A x_fixed + t."""
    if isinstance(tx, sitk.CompositeTransform) or tx.GetName() == "CompositeTransform":
        tx = sitk.CompositeTransform(tx).GetNthTransform(0)
    a = sitk.AffineTransform(tx)
    m = np.array(a.GetMatrix()).reshape(3, 3)
    c = np.array(a.GetCenter())
    t = np.array(a.GetTranslation())
    offset = t + c - m @ c
    return {"matrix_row_major": [round(float(v), 6) for v in m.ravel()],
            "offset_mm": [round(float(v), 4) for v in offset],
            "maps": "fixed (common-grid, ITK LPS mm) -> moving (SynthSeg file, ITK LPS mm)"}


# ----------------------------------------------------------------------------- 2 mm

def majority_2x(labels: np.ndarray) -> np.ndarray:
    """2x2x2 majority (plurality) vote.  Ties are broken in favour of the smallest non-zero
    label; background (0) only wins if it has strictly more votes than every other label."""
    z, y, x = (s // 2 for s in labels.shape)
    blocks = labels[: 2 * z, : 2 * y, : 2 * x].reshape(z, 2, y, 2, x, 2)
    cands = [int(l) for l in np.unique(labels) if l != 0] + [0]
    best = np.zeros((z, y, x), dtype=labels.dtype)
    best_count = np.full((z, y, x), -1, dtype=np.int8)
    for l in cands:
        c = (blocks == l).sum(axis=(1, 3, 5), dtype=np.int8)
        upd = c > best_count
        best[upd] = l
        best_count[upd] = c[upd]
    return best


def downsample_image(img_u8: np.ndarray, labels2: np.ndarray, ref1, ref2) -> np.ndarray:
    im = to_image(img_u8.astype(np.float32) / 255.0, ref1)
    im = sitk.SmoothingRecursiveGaussian(im, DOWNSAMPLE_SIGMA_MM)
    im2 = sitk.Resample(im, ref2, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(im2)
    a[labels2 == 0] = 0.0
    return to_uint8(a)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("hybridreg/data/bundled"))
    p.add_argument("--budget-bytes", type=int, default=BUDGET_BYTES_DEFAULT)
    p.add_argument("--only", default=None,
                   help="debug: comma-separated SynthSeg indices to process (e.g. 1,16); "
                        "the JSON/README are then incomplete")
    args = p.parse_args(argv)

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(REG["threads"])
    t_start = time.time()
    shared: Path = args.shared
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.nii.gz"):
        old.unlink()

    vxm_dir = shared / "voxelmorph-test-scan"
    ss_dir = shared / "synthseg-label-maps"
    npz_path = vxm_dir / "test_scan.npz"
    eval_labels = [int(v) for v in np.load(vxm_dir / "labels.npz")["labels"]]
    assert eval_labels == EXPECTED_EVAL_LABELS, eval_labels
    ss_names = read_synthseg_names(ss_dir / "labels table.txt")

    inputs = {str(p_.relative_to(shared)): sha256(p_) for p_ in
              [npz_path, vxm_dir / "labels.npz", vxm_dir / "LICENSE.md",
               ss_dir / "labels table.txt", ss_dir / "LICENSE.txt"]
              + [ss_dir / f"training_seg_{i:02d}.nii.gz" for i in range(1, 21)]}

    ref1 = reference_image(GRID_SIZE_1MM, 1.0)
    ref2 = reference_image(GRID_SIZE_2MM, 2.0)

    # ---- real subject
    d = np.load(npz_path)
    vol = d["vol"].transpose(2, 1, 0)  # numpy (x,y,z) -> ITK array order (z,y,x)
    seg = np.rint(d["seg"]).astype(np.int32).transpose(2, 1, 0)
    seg = np.ascontiguousarray(seg)
    vol = np.ascontiguousarray(np.where(seg > 0, vol, 0.0).astype(np.float32))
    stats = label_stats(vol, seg)
    kept = set(stats)
    for l in kept:
        assert l in FS_NAMES, l

    fixed = to_image(vol, ref1)
    fixed_mask = to_image(ndi.binary_dilation(seg > 0, iterations=5).astype(np.uint8), ref1)

    subjects = []
    all_labels_seen: set[int] = {0}

    def save_subject(sid, kind, split, source, img01, labels, extra):
        img_u8 = to_uint8(img01)
        labels_u8 = labels.astype(np.uint8)
        assert np.array_equal(labels_u8.astype(np.int32), labels)
        labels2 = majority_2x(labels_u8)
        img2 = downsample_image(img_u8, labels2, ref1, ref2)
        files = {
            "t1_1mm": (img_u8, ref1), "aseg_1mm": (labels_u8, ref1),
            "t1_2mm": (img2, ref2), "aseg_2mm": (labels2, ref2),
        }
        entry = {"id": sid, "kind": kind, "split": split, "source": source, "files": {}}
        for key, (arr, ref) in files.items():
            fn = f"{sid}_{key}.nii.gz"
            write(arr, ref, out / fn)
            entry["files"][key] = {"path": fn}
        entry["labels_present_1mm"] = [int(v) for v in np.unique(labels_u8)]
        entry["labels_present_2mm"] = [int(v) for v in np.unique(labels2)]
        all_labels_seen.update(entry["labels_present_1mm"])
        entry["missing_evaluation_labels"] = sorted(
            set(eval_labels) - set(entry["labels_present_2mm"]))
        dice = dice_per_label(labels, seg, eval_labels)
        dice30 = float(np.mean([0.0 if np.isnan(v) else v for v in dice.values()]))
        both = [l for l in eval_labels if (labels == l).any() and (seg == l).any()]
        entry["dice_to_vxm_1mm"] = {
            "mean_over_30": round(dice30, 4),
            "mean_over_labels_present_in_both": round(float(np.mean([dice[l] for l in both])), 4),
            "n_labels_present_in_both": len(both),
            "per_label": {str(k): round(v, 4) for k, v in dice.items()},
        }
        entry.update(extra)
        subjects.append(entry)
        return entry

    print("[vxm] real subject", flush=True)
    save_subject("vxm", "real", "atlas",
                 {"file": "voxelmorph-test-scan/test_scan.npz", "sha256": inputs[
                     "voxelmorph-test-scan/test_scan.npz"]},
                 vol, seg, {"seed": None, "alignment": None,
                            "notes": "real T1 (voxelmorph test scan); intensities outside "
                                     "aseg > 0 set to 0"})

    # ---- synthetic subjects
    indices = range(1, 21) if args.only is None else [int(v) for v in args.only.split(",")]
    mean_lut = lut(stats, "mean")
    for i in indices:
        t0 = time.time()
        sid = f"synthseg_{i:02d}"
        split = next(k for k, v in SPLITS.items() if sid in v)
        seed = SYNTH["seed_base"] + i
        src = ss_dir / f"training_seg_{i:02d}.nii.gz"
        ss_img = sitk.ReadImage(str(src))
        a = np.rint(sitk.GetArrayFromImage(ss_img)).astype(np.int32)
        a_clean, clean_stats = clean_synthseg_labels(a, kept)
        quick = ndi.gaussian_filter(mean_lut[a_clean], 1.0)
        moving = sitk.GetImageFromArray(quick.astype(np.float32))
        moving.CopyInformation(ss_img)
        tx, reg_info = align(fixed, fixed_mask, moving, seed)
        lab_img = sitk.GetImageFromArray(a_clean.astype(np.uint8))
        lab_img.CopyInformation(ss_img)
        lab_rs = sitk.Resample(lab_img, ref1, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        labels = sitk.GetArrayFromImage(lab_rs).astype(np.int32)
        img, syn_info = synthesize(labels, stats, seed)
        reg_info["affine"] = affine_params(tx)
        entry = save_subject(
            sid, "synthetic", split,
            {"file": f"synthseg-label-maps/training_seg_{i:02d}.nii.gz",
             "sha256": inputs[f"synthseg-label-maps/training_seg_{i:02d}.nii.gz"]},
            img, labels,
            {"seed": seed, "alignment": reg_info, "label_cleaning": clean_stats,
             "synthesis": {"bias_amplitude": round(syn_info["bias_amplitude"], 4)}})
        print(f"[{sid}] split={split} MS={reg_info['final_metric']:.4f} "
              f"dice30={entry['dice_to_vxm_1mm']['mean_over_30']:.3f} "
              f"dice_both={entry['dice_to_vxm_1mm']['mean_over_labels_present_in_both']:.3f} "
              f"({time.time() - t0:.0f}s)", flush=True)

    # ---- size budget
    def total_bytes():
        return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())

    dropped = []
    slack = 120_000  # JSON + README + licences written below
    if total_bytes() + slack > args.budget_bytes:
        for e in subjects:
            if e["split"] in ("train", "val"):
                (out / e["files"]["t1_1mm"]["path"]).unlink()
                e["files"]["t1_1mm"] = None
                dropped.append(e["id"])
    for e in subjects:
        e["t1_1mm_bundled"] = e["files"]["t1_1mm"] is not None
        for key, f in e["files"].items():
            if f is not None:
                path = out / f["path"]
                f["sha256"] = sha256(path)
                f["bytes"] = path.stat().st_size

    # ---- licences
    lic = out / "licenses"
    lic.mkdir(exist_ok=True)
    shutil.copyfile(vxm_dir / "LICENSE.md", lic / "voxelmorph-LICENSE.md")
    shutil.copyfile(ss_dir / "LICENSE.txt", lic / "SynthSeg-LICENSE.txt")

    # ---- labels.json
    labels_json = {
        "evaluation_labels": eval_labels,
        "evaluation_labels_source": "voxelmorph data/labels.npz",
        "absent_in_all_synthetic_subjects": sorted(
            set(eval_labels).intersection(*[set(e["missing_evaluation_labels"])
                                            for e in subjects if e["kind"] == "synthetic"]))
        if any(e["kind"] == "synthetic" for e in subjects) else [],
        "names": {str(l): FS_NAMES[l] for l in sorted(all_labels_seen | set(eval_labels))},
        "synthseg_names": {str(l): ss_names[l] for l in sorted(ss_names)
                           if l in all_labels_seen},
        "intensity_stats": {
            "description": "per-label statistics of the real (vxm) skull-stripped T1 in [0, 1] "
                           "within its aseg, 1 mm. mean/std: whole label (mean used for the "
                           "quick alignment image); interior_*: label eroded by 1 voxel "
                           "(whole label if < 100 interior voxels), used to paint the "
                           "synthetic images",
            "labels": {str(l): {k: (round(v, 5) if isinstance(v, float) else v)
                                for k, v in st.items()}
                       for l, st in sorted(stats.items())},
        },
        "synthesis_parameters": SYNTH,
    }
    (out / "labels.json").write_text(json.dumps(labels_json, indent=1) + "\n")

    subjects_json = {
        "format_version": 1,
        "grid": {
            "1mm": {"sitk_size": list(GRID_SIZE_1MM), "spacing_mm": 1.0,
                    "direction": list(DIRECTION), "origin": list(grid_origin(GRID_SIZE_1MM, 1.0)),
                    "numpy_shape": list(GRID_SIZE_1MM[::-1])},
            "2mm": {"sitk_size": list(GRID_SIZE_2MM), "spacing_mm": 2.0,
                    "direction": list(DIRECTION), "origin": list(grid_origin(GRID_SIZE_2MM, 2.0)),
                    "numpy_shape": list(GRID_SIZE_2MM[::-1])},
            "frame": "voxel axes LIA (x->Left, y->Inferior, z->Anterior); ITK LPS physical "
                     "coordinates; grid centre at (0,0,0)",
        },
        "splits": {k: [s for s in v if any(e["id"] == s for e in subjects)]
                   for k, v in SPLITS.items()},
        "t1_1mm_dropped_for_size": dropped,
        "intensity_encoding": "uint8; value / 255 gives the [0, 1] intensity",
        "label_downsampling_2mm": "2x2x2 majority vote; ties -> smallest non-zero label",
        "image_downsampling_2mm": f"Gaussian sigma {DOWNSAMPLE_SIGMA_MM} mm, linear resampling "
                                  "at 2 mm voxel centres, masked by 2 mm labels > 0",
        "alignment_parameters": REG,
        "subjects": subjects,
    }
    (out / "subjects.json").write_text(json.dumps(subjects_json, indent=1) + "\n")

    write_readme(out, inputs, subjects, dropped, eval_labels, labels_json)

    # ---- report
    total = total_bytes()
    print("\n== report ==")
    print(f"{'subject':13s} {'split':6s} {'dice30':>7s} {'dice_both':>9s} {'MS':>8s}  "
          f"{'t1_1mm':>8s} {'aseg_1mm':>8s} {'t1_2mm':>8s} {'aseg_2mm':>8s}")
    for e in subjects:
        dd = e["dice_to_vxm_1mm"]
        mi = e["alignment"]["final_metric"] if e["alignment"] else float("nan")
        sz = [e["files"][k]["bytes"] if e["files"][k] else 0
              for k in ("t1_1mm", "aseg_1mm", "t1_2mm", "aseg_2mm")]
        print(f"{e['id']:13s} {e['split']:6s} {dd['mean_over_30']:7.3f} "
              f"{dd['mean_over_labels_present_in_both']:9.3f} {mi:8.4f}  "
              + " ".join(f"{s:8d}" for s in sz))
    syn = [e for e in subjects if e["kind"] == "synthetic"]
    if syn:
        print(f"mean dice30 (synthetic) = "
              f"{np.mean([e['dice_to_vxm_1mm']['mean_over_30'] for e in syn]):.3f}")
    print(f"1 mm T1 dropped for size: {dropped or 'none'}")
    print(f"total bundled size: {total} bytes ({total / 1e6:.2f} MB; budget "
          f"{args.budget_bytes / 1e6:.1f} MB) in {time.time() - t_start:.0f}s")
    if total > args.budget_bytes:
        print("ERROR: over the size budget", file=sys.stderr)
        return 1
    return 0


def write_readme(out: Path, inputs, subjects, dropped, eval_labels, labels_json):
    syn = [e for e in subjects if e["kind"] == "synthetic"]
    absent = labels_json["absent_in_all_synthetic_subjects"]
    rows = []
    for e in subjects:
        dd = e["dice_to_vxm_1mm"]
        mi = f"{e['alignment']['final_metric']:.4f}" if e["alignment"] else "-"
        rows.append(f"| {e['id']} | {e['kind']} | {e['split']} | {mi} | "
                    f"{dd['mean_over_30']:.3f} | {dd['mean_over_labels_present_in_both']:.3f} | "
                    f"{'yes' if e['t1_1mm_bundled'] else 'no'} |")
    inp_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(inputs.items()))
    names = labels_json["names"]
    if syn:
        per = [(l, float(np.mean([e["dice_to_vxm_1mm"]["per_label"][str(l)] for e in syn])))
               for l in eval_labels]
        per_label_table = "| label | name | mean Dice |\n|---|---|---|\n" + "\n".join(
            f"| {l} | {names[str(l)]} | {v:.3f} |" for l, v in per)
    else:
        per_label_table = "(no synthetic subjects built)"
    if dropped:
        have = ", ".join(f"`{e['id']}`" for e in subjects if e["t1_1mm_bundled"])
        size_note = (
            f"**1 mm T1 images are bundled only for {have}** (size budget 28 MB: a 1 mm T1 "
            "is ~1.2-1.3 MB even as gzip-compressed uint8 with zero background, so all 21 "
            "would take the package to ~36 MB).  The 1 mm T1 of the train/val subjects "
            f"({dropped[0]} .. {dropped[-1]}) was dropped; regenerate with the command "
            "below to get them (`--budget-bytes` raises the budget).  1 mm label maps and all "
            "2 mm files are bundled for every subject.")
    else:
        size_note = "1 mm and 2 mm files are bundled for every subject."
    s = SYNTH
    text = f"""# hybridreg bundled brain data

Small, redistributable 3-D brain MRI data for demos, tests, training and evaluation of
`hybridreg`.  Everything in this folder is generated by `scripts/prepare_data.py`;
do not edit by hand.  Load it with `hybridreg.data` (`list_subjects`, `load_subject`,
`demo_pair`, `pairs`, `evaluation_labels`, `label_names`).

**Only one subject (`vxm`) is a real MRI.  The 20 `synthseg_XX` subjects have real anatomy
(label maps of real subjects) but synthetic, T1-like intensities.**

## Provenance

| upstream | commit | licence |
|---|---|---|
| github voxelmorph/voxelmorph: data/test_scan.npz, data/labels.npz, LICENSE.md | ca28315d0ba24cd8946ac4f6ed081e049e5264fe (test_scan.npz last changed in 860b4887354d2ebe5e6e70f62c5aaecf11945a1e) | Apache-2.0 (`licenses/voxelmorph-LICENSE.md`) |
| github BBillot/SynthSeg: data/training_label_maps/training_seg_01..20.nii.gz, data/labels table.txt, LICENSE.txt | 66342c1f05e520f3729a6d7ca1042eb7f01b6266 | Apache-2.0 (`licenses/SynthSeg-LICENSE.txt`) |

The upstream subjects are not documented by either project.  The files here are derived
works (modified as described below), distributed under the same Apache-2.0 licence.

sha256 of the inputs:

| input | sha256 |
|---|---|
{inp_rows}

## Files

For each subject id: `{{id}}_t1_1mm.nii.gz`, `{{id}}_aseg_1mm.nii.gz`, `{{id}}_t1_2mm.nii.gz`,
`{{id}}_aseg_2mm.nii.gz`.  T1 images are uint8 (divide by 255 for [0, 1]); label maps are
uint8 FreeSurfer aseg IDs.  `subjects.json` lists subjects, splits, sha256 and size of every
file, alignment results and "before registration" Dice; `labels.json` holds the evaluation
labels, label names and the intensity statistics used for synthesis.

Grids (identical for all subjects, so every pair is already affinely aligned):

* 1 mm: SimpleITK size (160, 192, 224) = numpy array shape (224, 192, 160), spacing 1 mm,
  direction (1,0,0, 0,0,-1, 0,-1,0), i.e. voxel axes x->Left, y->Inferior, z->Anterior
  (FreeSurfer-conformed LIA) in ITK's LPS physical frame; origin (-79.5, 111.5, 95.5) so that
  the grid centre is at physical (0, 0, 0).
* 2 mm: SimpleITK size (80, 96, 112) = numpy shape (112, 96, 80), spacing 2 mm, same direction,
  origin (-79, 111, 95): 2 mm voxel centres are the centres of the 2x2x2 blocks of the 1 mm
  grid (same physical extent).

{size_note}

## Split (fixed)

* atlas: `vxm` (the only real T1; fixed image of the default demo pair `vxm` <- `synthseg_16`
  and the atlas for atlas-to-subject training/evaluation)
* train: `synthseg_01` .. `synthseg_12`
* val: `synthseg_13` .. `synthseg_15`
* test: `synthseg_16` .. `synthseg_20`

## What the script did

1. **Real subject `vxm`.** `vol` and `seg` from `test_scan.npz` were put on the common grid
   (numpy axis 0 = ITK x).  Skull-strip: intensities set to 0 wherever aseg == 0 (no dilation),
   so for every bundled subject the brain mask is exactly `aseg > 0`.  Intensities kept as
   they are (float [0, 1] -> uint8 rounding).
2. **Per-label intensity statistics** of the skull-stripped real T1 were measured on `vxm`
   for every aseg label: mean and std over the whole label, and over its interior (label
   eroded by one voxel); see `labels.json` (`intensity_stats`).
3. **SynthSeg label maps: cleaning** (keep only labels of the real aseg; skull-strip).
   SynthSeg labels >= 500 are head/extra-cerebral classes.  SynthSeg's label 24 is *all*
   non-ventricular CSF (extra-cerebral, sulcal, cisterns), while a FreeSurfer aseg's 24 is
   one small CSF region and sulcal/extra-cerebral CSF is 0; SynthSeg's 24 was therefore set
   to 0 everywhere (a first build that kept the CSF pockets enclosed by tissue as 24 gave
   Dice 0.000 with the real subject's 24 in 20/20 subjects: a different structure).
   Labels in (0, 500) that the aseg does not have (25, 57, 136, 137, 163, 164: undocumented
   intra-cerebral classes next to the lateral ventricles/white matter) are "other
   intra-cerebral".  tissue = aseg labels except 24, plus the other intra-cerebral labels;
   brain = 3-D hole filling of tissue.  Outside brain everything -> 0; inside, aseg labels
   are kept and the other intra-cerebral labels are replaced by the nearest aseg tissue
   label (Euclidean), so they leave no holes.  Counts per subject: `subjects.json`
   (`label_cleaning`).
4. **Affine alignment** (SimpleITK, single-threaded, deterministic): fixed = `vxm` T1;
   moving = a quick synthetic image (each cleaned label painted with its mean real-T1
   intensity, Gaussian sigma 1 mm) on the SynthSeg grid; centred moments initialiser, then
   `ImageRegistrationMethod` with `AffineTransform(3)`, mean-squares metric (the moving image
   is painted with the real T1's own label means, so intensities match; Mattes MI was tried
   and was less robust: its result depended on the sampling seed), 50 / 25 / 10 % random
   samples per level inside the fixed brain mask dilated by 5 voxels (seed = subject seed), regular-step gradient descent (learning rate 2, min step 1e-3,
   relaxation 0.5, <= 200 iterations per level, scales from physical shift),
   shrink factors [4, 2, 1] with smoothing sigmas [2, 1, 0] mm.  The cleaned label map was
   resampled onto the common grid with nearest-neighbour interpolation.
5. **Synthesis on the common grid** (numpy `default_rng(seed)`, seed = {s['seed_base']} + XX for
   `synthseg_XX`): paint per-label interior means (statistics of the real T1 inside each label
   eroded by one voxel, which excludes partial-volume voxels; whole label if the interior has
   < 100 voxels); add within-label texture = Gaussian-smoothed
   (sigma {s['texture_sigma_mm']} mm) white noise, normalised to unit std, times
   {s['texture_fraction_of_std']} x the label's interior std; zero outside the label mask;
   partial-volume blur (Gaussian sigma {s['partial_volume_sigma_mm']} mm); multiplicative bias
   field 1 + a f, f = cubic-spline upsampled {s['bias_control_points']}^3 random normal grid
   scaled to max |f| = 1 in the brain, a ~ U{tuple(s['bias_amplitude_range'])}; additive Gaussian
   noise sigma {s['noise_sigma']}; clip to [0, 1]; zero outside `aseg > 0`.
6. **2 mm versions.** Images: Gaussian smoothing sigma {DOWNSAMPLE_SIGMA_MM} mm (FWHM-matched
   1 mm -> 2 mm: sqrt(2^2 - 1^2) / 2.355), linear resampling at the 2 mm voxel centres (= mean
   of each 2x2x2 block), then zero outside the 2 mm labels.  Labels: 2x2x2 **majority vote**,
   ties broken in favour of the smallest non-zero label (background only when it has a
   strict plurality).
7. Files are written with SimpleITK (gzip level 9); their sha256 and sizes are in
   `subjects.json`.

## Evaluation labels and known gaps

The 30 evaluation labels are those of voxelmorph's `labels.npz`:
{eval_labels}.
{("Labels " + str(absent) + " are absent from every synthetic subject: SynthSeg label maps have no choroid plexus (31, 63), and their CSF label 24 was removed (step 3).  Dice on these labels is undefined for a synthetic subject; score pairs on the evaluation labels present in both label maps (27 for `vxm` <- synthetic), or count them as 0 -- both are given below.") if absent else ""}

Note on choroid plexus: after alignment, SynthSeg's undocumented labels 136+137 overlap the
real subject's Left-choroid-plexus (31) and 163+164 its Right-choroid-plexus (63) more than
anything else they touch (Dice about 0.1-0.36 in the subjects checked, ~0 for the opposite
side), so they may be choroid plexus; because this is not documented upstream they were
not renamed (they were merged into the nearest tissue label, step 3).

Mean "before registration" Dice over the {len(syn)} synthetic subjects, per evaluation label:

{per_label_table}

## Alignment and "before registration" Dice (1 mm, to `vxm`)

MS = final mean-squares metric value of the alignment (finest level, on the sampled voxels;
lower is better).  dice30 = mean over the 30 evaluation labels (absent labels count as 0);
dice_both = mean over the evaluation labels present in both label maps.

| id | kind | split | MS | dice30 | dice_both | 1 mm T1 bundled |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Regenerate

```
python scripts/prepare_data.py --shared ../shared/data --out hybridreg/data/bundled
```

(from the repository root; the inputs are listed in the shared data `MANIFEST.md`; the
output is deterministic for a given SimpleITK / numpy / scipy version.)
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
