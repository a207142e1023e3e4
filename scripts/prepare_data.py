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
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk

from hybridreg.io import file_sha256
from hybridreg.metrics import common_labels, dice

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
# Prose of the bundled README.md; write_readme fills its ``$name`` placeholders.
README_TEMPLATE = Path(__file__).resolve().parent / "bundled_data_README.md.in"


# ----------------------------------------------------------------------------- helpers

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


REF_1MM, REF_2MM = reference_image(GRID_SIZE_1MM, 1.0), reference_image(GRID_SIZE_2MM, 2.0)


def to_image(arr_zyx: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx)
    img.CopyInformation(ref)
    return img


def write(arr_zyx, ref, path: Path):
    sitk.WriteImage(to_image(arr_zyx, ref), str(path), useCompression=True, compressionLevel=9)


def read_synthseg_names(table: Path) -> dict[int, str]:
    """``{label: name}`` from the lines after the header of SynthSeg's ``labels table.txt``."""
    lines = table.read_text(encoding="utf-8").splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith("labels")
                 and "structures" in l)
    parts = [l.split(None, 1) for l in lines[start + 1:] if l.strip()]
    return {int(p[0]): p[1].strip() for p in parts if p[0].isdigit() and len(p) == 2}


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
        sl = tuple(slice(l, h) for l, h in zip(idx.min(0), idx.max(0) + 1))
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
    for l in [int(v) for v in np.unique(seg) if v != 0]:
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
    table[list(stats)] = [s[key] for s in stats.values()]
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
    offset = np.array(a.GetTranslation()) + c - m @ c
    return {"matrix_row_major": [round(float(v), 6) for v in m.ravel()],
            "offset_mm": [round(float(v), 4) for v in offset],
            "maps": "fixed (common-grid, ITK LPS mm) -> moving (SynthSeg file, ITK LPS mm)"}


# ----------------------------------------------------------------------------- 2 mm

def majority_2x(labels: np.ndarray) -> np.ndarray:
    """2x2x2 majority (plurality) vote.  Ties are broken in favour of the smallest non-zero
    label; background (0) only wins if it has strictly more votes than every other label."""
    z, y, x = (s // 2 for s in labels.shape)
    blocks = labels[: 2 * z, : 2 * y, : 2 * x].reshape(z, 2, y, 2, x, 2)
    best = np.zeros((z, y, x), dtype=labels.dtype)
    best_count = np.full((z, y, x), -1, dtype=np.int8)
    for l in [int(l) for l in np.unique(labels) if l != 0] + [0]:
        c = (blocks == l).sum(axis=(1, 3, 5), dtype=np.int8)
        upd = c > best_count
        best[upd] = l
        best_count[upd] = c[upd]
    return best


def downsample_image(img_u8: np.ndarray, labels2: np.ndarray) -> np.ndarray:
    im = to_image(img_u8.astype(np.float32) / 255.0, REF_1MM)
    im = sitk.SmoothingRecursiveGaussian(im, DOWNSAMPLE_SIGMA_MM)
    im2 = sitk.Resample(im, REF_2MM, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(im2)
    a[labels2 == 0] = 0.0
    return to_uint8(a)


def downsample_subject(img01: np.ndarray, labels: np.ndarray) -> dict:
    """Step 3: a subject's four files ``{key: (uint8 array, grid)}``: T1 and aseg at 1 mm and
    at 2 mm (labels by :func:`majority_2x`, the image by :func:`downsample_image`)."""
    img_u8, labels_u8 = to_uint8(img01), labels.astype(np.uint8)
    assert np.array_equal(labels_u8.astype(np.int32), labels)
    labels2 = majority_2x(labels_u8)
    return {"t1_1mm": (img_u8, REF_1MM), "aseg_1mm": (labels_u8, REF_1MM),
            "t1_2mm": (downsample_image(img_u8, labels2), REF_2MM), "aseg_2mm": (labels2, REF_2MM)}


# ----------------------------------------------------------------------------- steps

@dataclass
class Inputs:
    """What :func:`read_inputs` returns; ``vol`` (in [0, 1]) and ``seg``: the real subject."""
    vxm_dir: Path
    ss_dir: Path
    checksums: dict[str, str]
    eval_labels: list[int]
    vol: np.ndarray
    seg: np.ndarray
    stats: dict[int, dict]
    fixed: sitk.Image
    fixed_mask: sitk.Image


def read_inputs(shared: Path) -> Inputs:
    """Step 1: checksum the inputs, check the evaluation labels, put the real T1 and aseg on
    the common grid (intensities 0 where aseg == 0) and measure its label statistics."""
    vxm_dir, ss_dir = shared / "voxelmorph-test-scan", shared / "synthseg-label-maps"
    eval_labels = [int(v) for v in np.load(vxm_dir / "labels.npz")["labels"]]
    assert eval_labels == EXPECTED_EVAL_LABELS, eval_labels
    checksums = {str(p.relative_to(shared)): file_sha256(p) for p in
                 [vxm_dir / "test_scan.npz", vxm_dir / "labels.npz", vxm_dir / "LICENSE.md",
                  ss_dir / "labels table.txt", ss_dir / "LICENSE.txt"]
                 + [ss_dir / f"training_seg_{i:02d}.nii.gz" for i in range(1, 21)]}
    d = np.load(vxm_dir / "test_scan.npz")  # numpy (x,y,z) -> ITK array order (z,y,x)
    seg = np.ascontiguousarray(np.rint(d["seg"]).astype(np.int32).transpose(2, 1, 0))
    vol = np.ascontiguousarray(np.where(seg > 0, d["vol"].transpose(2, 1, 0), 0.0), np.float32)
    stats = label_stats(vol, seg)
    assert all(l in FS_NAMES for l in stats), sorted(stats)
    mask = to_image(ndi.binary_dilation(seg > 0, iterations=5).astype(np.uint8), REF_1MM)
    return Inputs(vxm_dir, ss_dir, checksums, eval_labels, vol, seg, stats,
                  to_image(vol, REF_1MM), mask)


def synthetic_subject(src: Inputs, i: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Step 2 for SynthSeg map ``i``: clean its labels, align it to the real T1, resample it
    onto the 1 mm grid and synthesize its T1.  Returns (image in [0, 1], int32 labels,
    subjects.json fields: seed, alignment, label cleaning, synthesis)."""
    seed = SYNTH["seed_base"] + i
    ss_img = sitk.ReadImage(str(src.ss_dir / f"training_seg_{i:02d}.nii.gz"))
    a = np.rint(sitk.GetArrayFromImage(ss_img)).astype(np.int32)
    a_clean, clean_stats = clean_synthseg_labels(a, set(src.stats))
    quick = ndi.gaussian_filter(lut(src.stats, "mean")[a_clean], 1.0)
    tx, reg_info = align(src.fixed, src.fixed_mask, to_image(quick.astype(np.float32), ss_img),
                         seed)
    lab_rs = sitk.Resample(to_image(a_clean.astype(np.uint8), ss_img), REF_1MM, tx,
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    labels = sitk.GetArrayFromImage(lab_rs).astype(np.int32)
    img, syn_info = synthesize(labels, src.stats, seed)
    reg_info["affine"] = affine_params(tx)
    return img, labels, {"seed": seed, "alignment": reg_info, "label_cleaning": clean_stats,
                         "synthesis": {"bias_amplitude": round(syn_info["bias_amplitude"], 4)}}


def save_subject(src: Inputs, out: Path, sid, kind, split, source, img01, labels, extra):
    """Steps 3-4 for one subject: downsample, write its four NIfTI files, and return its
    subjects.json entry (files, labels present, Dice to the real aseg at 1 mm, ``extra``)."""
    entry = {"id": sid, "kind": kind, "split": split,
             "source": {"file": source, "sha256": src.checksums[source]}, "files": {}}
    files = downsample_subject(img01, labels)
    for key, (arr, ref) in files.items():
        entry["files"][key] = {"path": f"{sid}_{key}.nii.gz"}
        write(arr, ref, out / entry["files"][key]["path"])
    entry["labels_present_1mm"] = [int(v) for v in np.unique(files["aseg_1mm"][0])]
    entry["labels_present_2mm"] = present2 = [int(v) for v in np.unique(files["aseg_2mm"][0])]
    entry["missing_evaluation_labels"] = sorted(set(src.eval_labels) - set(present2))
    entry["dice_to_vxm_1mm"] = dice_to_vxm(labels, src)
    return {**entry, **extra}


def dice_to_vxm(labels: np.ndarray, src: Inputs) -> dict:
    """"Before registration" Dice of a 1 mm label map to the real aseg over the evaluation
    labels: mean (absent labels count as 0), mean over the labels present in both, per label."""
    per_label = dice(labels, src.seg, src.eval_labels)  # NaN where absent from both
    common = common_labels(labels, src.seg)
    both = [per_label[l] for l in src.eval_labels if l in common]
    return {"mean_over_30": round(float(np.mean(np.nan_to_num(list(per_label.values())))), 4),
            "mean_over_labels_present_in_both": round(float(np.mean(both)), 4),
            "n_labels_present_in_both": len(both),
            "per_label": {str(k): round(v, 4) for k, v in per_label.items()}}


def process_subjects(src: Inputs, out: Path, indices) -> list[dict]:
    """Steps 2-4 for every subject: the real ``vxm``, then SynthSeg maps ``indices``."""
    print("[vxm] real subject", flush=True)
    notes = "real T1 (voxelmorph test scan); intensities outside aseg > 0 set to 0"
    subjects = [save_subject(src, out, "vxm", "real", "atlas", "voxelmorph-test-scan/test_scan.npz",
                             src.vol, src.seg, {"seed": None, "alignment": None, "notes": notes})]
    for i in indices:
        t0, sid = time.time(), f"synthseg_{i:02d}"
        split = next(k for k, v in SPLITS.items() if sid in v)
        source = f"synthseg-label-maps/training_seg_{i:02d}.nii.gz"
        subjects.append(save_subject(src, out, sid, "synthetic", split, source,
                                     *synthetic_subject(src, i)))
        dd = subjects[-1]["dice_to_vxm_1mm"]
        print(f"[{sid}] split={split} MS={subjects[-1]['alignment']['final_metric']:.4f} "
              f"dice30={dd['mean_over_30']:.3f} dice_both="
              f"{dd['mean_over_labels_present_in_both']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    return subjects


def total_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def apply_size_budget(subjects: list[dict], out: Path, budget: int) -> list[str]:
    """Step 5: if the files (plus ~120 kB of JSON, README and licences, written later) exceed
    ``budget``, delete the 1 mm T1 of the train/val subjects; then record every remaining
    file's sha256 and size in ``subjects``.  Returns the ids whose 1 mm T1 was dropped."""
    dropped = []
    if total_bytes(out) + 120_000 > budget:
        for e in subjects:
            if e["split"] in ("train", "val"):
                (out / e["files"]["t1_1mm"]["path"]).unlink()
                e["files"]["t1_1mm"] = None
                dropped.append(e["id"])
    for e in subjects:
        e["t1_1mm_bundled"] = e["files"]["t1_1mm"] is not None
        for f in filter(None, e["files"].values()):  # None: a dropped file
            f["sha256"] = file_sha256(out / f["path"])
            f["bytes"] = (out / f["path"]).stat().st_size
    return dropped


def labels_metadata(src: Inputs, subjects: list[dict]) -> dict:
    """labels.json: evaluation labels, label names, intensity statistics, synthesis parameters."""
    seen = {0}.union(*(e["labels_present_1mm"] for e in subjects))
    synthetic = [e for e in subjects if e["kind"] == "synthetic"]
    ss_names = read_synthseg_names(src.ss_dir / "labels table.txt")
    return {
        "evaluation_labels": src.eval_labels,
        "evaluation_labels_source": "voxelmorph data/labels.npz",
        "absent_in_all_synthetic_subjects": sorted(set(src.eval_labels).intersection(
            *[set(e["missing_evaluation_labels"]) for e in synthetic])) if synthetic else [],
        "names": {str(l): FS_NAMES[l] for l in sorted(seen | set(src.eval_labels))},
        "synthseg_names": {str(l): ss_names[l] for l in sorted(ss_names) if l in seen},
        "intensity_stats": {
            "description": "per-label statistics of the real (vxm) skull-stripped T1 in [0, 1] "
                           "within its aseg, 1 mm. mean/std: whole label (mean used for the "
                           "quick alignment image); interior_*: label eroded by 1 voxel "
                           "(whole label if < 100 interior voxels), used to paint the "
                           "synthetic images",
            "labels": {str(l): {k: (round(v, 5) if isinstance(v, float) else v)
                                for k, v in st.items()}
                       for l, st in sorted(src.stats.items())},
        },
        "synthesis_parameters": SYNTH,
    }


def subjects_metadata(subjects: list[dict], dropped: list[str]) -> dict:
    """subjects.json: grids, splits, processing parameters and every subject's entry."""
    grid = {f"{int(sp)}mm": {"sitk_size": list(size), "spacing_mm": sp,
                             "direction": list(DIRECTION), "origin": list(grid_origin(size, sp)),
                             "numpy_shape": list(size[::-1])}
            for size, sp in ((GRID_SIZE_1MM, 1.0), (GRID_SIZE_2MM, 2.0))}
    return {
        "format_version": 1,
        "grid": {**grid, "frame": "voxel axes LIA (x->Left, y->Inferior, z->Anterior); ITK LPS "
                                  "physical coordinates; grid centre at (0,0,0)"},
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


def write_provenance(src: Inputs, subjects: list[dict], dropped: list[str], out: Path) -> None:
    """Step 6: the licence files, labels.json, subjects.json and README.md."""
    (out / "licenses").mkdir(exist_ok=True)
    shutil.copyfile(src.vxm_dir / "LICENSE.md", out / "licenses" / "voxelmorph-LICENSE.md")
    shutil.copyfile(src.ss_dir / "LICENSE.txt", out / "licenses" / "SynthSeg-LICENSE.txt")
    labels_json = labels_metadata(src, subjects)
    (out / "labels.json").write_text(json.dumps(labels_json, indent=1) + "\n", encoding="utf-8")
    subjects_json = subjects_metadata(subjects, dropped)
    (out / "subjects.json").write_text(json.dumps(subjects_json, indent=1) + "\n", encoding="utf-8")
    write_readme(out, src.checksums, subjects, dropped, src.eval_labels, labels_json)


def report(subjects: list[dict], dropped: list[str], out: Path, budget: int, t_start) -> int:
    """Step 7: print a per-subject table and the total size; 1 (error) if over ``budget``."""
    total = total_bytes(out)
    print("\n== report ==")
    print(f"{'subject':13s} {'split':6s} {'dice30':>7s} {'dice_both':>9s} {'MS':>8s}  "
          f"{'t1_1mm':>8s} {'aseg_1mm':>8s} {'t1_2mm':>8s} {'aseg_2mm':>8s}")
    for e in subjects:
        dd = e["dice_to_vxm_1mm"]
        mi = e["alignment"]["final_metric"] if e["alignment"] else float("nan")
        sz = [f["bytes"] if f else 0 for f in e["files"].values()]  # t1/aseg 1 mm, t1/aseg 2 mm
        print(f"{e['id']:13s} {e['split']:6s} {dd['mean_over_30']:7.3f} "
              f"{dd['mean_over_labels_present_in_both']:9.3f} {mi:8.4f}  "
              + " ".join(f"{s:8d}" for s in sz))
    syn = [e for e in subjects if e["kind"] == "synthetic"]
    if syn:
        print(f"mean dice30 (synthetic) = "
              f"{np.mean([e['dice_to_vxm_1mm']['mean_over_30'] for e in syn]):.3f}")
    print(f"1 mm T1 dropped for size: {dropped or 'none'}")
    print(f"total bundled size: {total} bytes ({total / 1e6:.2f} MB; budget "
          f"{budget / 1e6:.1f} MB) in {time.time() - t_start:.0f}s")
    if total > budget:
        print("ERROR: over the size budget", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    """Steps 1-7: read the inputs; build, downsample and write every subject; apply the size
    budget; write licences, labels.json, subjects.json and README.md; report (1: over budget)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("hybridreg/data/bundled"))
    p.add_argument("--budget-bytes", type=int, default=BUDGET_BYTES_DEFAULT)
    p.add_argument("--only", default=None, help="debug: comma-separated SynthSeg indices to "
                   "process (e.g. 1,16); the JSON/README are then incomplete")
    args = p.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(REG["threads"])
    t_start = time.time()
    src = read_inputs(args.shared)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.nii.gz"):
        old.unlink()
    indices = range(1, 21) if args.only is None else [int(v) for v in args.only.split(",")]
    subjects = process_subjects(src, args.out, indices)
    dropped = apply_size_budget(subjects, args.out, args.budget_bytes)
    write_provenance(src, subjects, dropped, args.out)
    return report(subjects, dropped, args.out, args.budget_bytes, t_start)


def write_readme(out: Path, inputs, subjects, dropped, eval_labels, labels_json):
    """README.md of the bundled data: ``README_TEMPLATE`` (provenance, files, grids, split, every
    processing step, evaluation labels) filled with the input checksums, the size note, the
    synthesis parameters and the per-label and per-subject alignment / Dice tables."""
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
    absent_note = ("Labels " + str(absent) + " are absent from every synthetic subject: "
                   "SynthSeg label maps have no choroid plexus (31, 63), and their CSF label 24 "
                   "was removed (step 3).  Dice on these labels is undefined for a synthetic "
                   "subject; score pairs on the evaluation labels present in both label maps "
                   "(27 for `vxm` <- synthetic), or count them as 0 -- both are given below."
                   ) if absent else ""
    synth = {k: SYNTH[k] for k in ("seed_base", "texture_sigma_mm", "texture_fraction_of_std",
                                   "partial_volume_sigma_mm", "bias_control_points", "noise_sigma")}
    text = Template(README_TEMPLATE.read_text(encoding="utf-8")).substitute(
        synth, bias_amplitude_range=tuple(SYNTH["bias_amplitude_range"]),
        downsample_sigma_mm=DOWNSAMPLE_SIGMA_MM, input_rows=inp_rows, size_note=size_note,
        eval_labels=eval_labels, absent_note=absent_note, n_synthetic=len(syn),
        per_label_table=per_label_table, subject_rows="\n".join(rows))
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
