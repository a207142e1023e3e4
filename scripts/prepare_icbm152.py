#!/usr/bin/env python
"""Derive the committed ICBM152 files of the ``realworld`` data set (``benchmarks/data/icbm152``).

Run from the repository root::

    python scripts/prepare_icbm152.py --shared ../shared/data --out benchmarks/data/icbm152

Inputs (``<shared>/icbm152-2009a-sym-nilearn/``: byte copies of the files nilearn 0.14.1
ships, see ``<shared>/MANIFEST.md``): the ICBM152 2009a *symmetric* non-linear T1 template
and its GM and WM probability maps, nilearn's "converted" uint8 copies (0..255), 197x233x189
voxels at 1 mm, RAS, MNI space; the MNI COPYING notice and nilearn's BSD-3 licence.

Outputs (every image on the template's native grid, uint8):

* ``t1_brain.nii.gz`` -- the T1 template **as it comes** (a byte copy).  nilearn's copy is
  already skull-stripped: every voxel outside its brain mask is 0 (checked here: fewer than
  0.1 % of the non-zero voxels lie more than 3 mm from GM/WM; 3 voxels do), so this file is
  the skull-stripped T1 and no second "with skull" T1 exists to keep.
* ``brain_mask.nii.gz`` -- 1 where the T1 is non-zero (the brain mask nilearn applied, CSF
  and ventricles included), holes filled (3-D ``binary_fill_holes``), else 0.
* ``tissue_labels.nii.gz`` -- 1 = GM, 2 = WM, 0 = other.  Inside the brain mask each voxel
  takes the most probable of three classes, ``argmax(p_other, p_GM, p_WM)`` with
  ``p_other = 255 - p_GM - p_WM`` (CSF and background: the maps sum to at most 255); ties go
  to the earlier class (other, then GM).  So a voxel is GM when ``p_GM > p_other`` and
  ``p_GM >= p_WM``, WM when ``p_WM > p_GM`` and ``p_WM > p_other``: the winning probability
  is at least 1/3 by construction (no further threshold).  0 outside the mask.
* ``README.md`` (provenance: input and output sha256, the derivation, measured numbers),
  ``provenance.json`` (the same, for code), ``COPYING.ICBM152-2009.txt`` and
  ``LICENSE.nilearn-BSD3.txt`` (copied unchanged: the MNI notice must accompany every copy).

Deterministic (no randomness; files written with SimpleITK, gzip level 9).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk

from hybridreg.io import file_sha256

SRC_DIR = "icbm152-2009a-sym-nilearn"
T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
NOTICES = ("COPYING.ICBM152-2009.txt", "LICENSE.nilearn-BSD3.txt")
OUT_T1, OUT_MASK, OUT_TISSUE = "t1_brain.nii.gz", "brain_mask.nii.gz", "tissue_labels.nii.gz"
SIZE_BUDGET = 4_000_000  # bytes for the whole output folder


def read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def write(arr: np.ndarray, ref: sitk.Image, path: Path) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(path), useCompression=True, compressionLevel=9)


def tissue_labels(gm: np.ndarray, wm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """1 = GM, 2 = WM, 0 = other: ``argmax(p_other, p_GM, p_WM)`` inside ``mask`` (see the
    module docstring), from uint8 probability maps (0..255)."""
    g, w = gm.astype(np.int16), wm.astype(np.int16)
    other = np.clip(255 - g - w, 0, None)
    lab = np.argmax(np.stack([other, g, w]), axis=0).astype(np.uint8)
    lab[~mask] = 0
    return lab


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/data/icbm152"))
    a = ap.parse_args(argv)
    src = a.shared / SRC_DIR
    inputs = [T1, GM, WM, *NOTICES]
    missing = [n for n in inputs if not (src / n).is_file()]
    if missing:
        print(f"prepare_icbm152: error: {src} lacks {missing}", file=sys.stderr)
        return 1
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    t1_img, t1 = read(src / T1)
    gm_img, gm = read(src / GM)
    wm_img, wm = read(src / WM)
    for name, img in ((GM, gm_img), (WM, wm_img)):
        same = (img.GetSize() == t1_img.GetSize() and np.allclose(img.GetOrigin(), t1_img.GetOrigin())
                and np.allclose(img.GetDirection(), t1_img.GetDirection())
                and np.allclose(img.GetSpacing(), t1_img.GetSpacing()))
        if not same:
            print(f"prepare_icbm152: error: {name} is not on the T1's grid", file=sys.stderr)
            return 1
    if (gm.astype(int) + wm).max() > 255:
        print("prepare_icbm152: error: p_GM + p_WM exceeds 255", file=sys.stderr)
        return 1

    nonzero = t1 > 0
    mask = ndi.binary_fill_holes(nonzero)
    labels, n_comp = ndi.label(nonzero)
    # skull-stripped? a head scan has skull/scalp outside GM/WM; here nothing is non-zero where
    # GM + WM are zero beyond a thin partial-volume rim (measured and reported).
    tissue_any = (gm.astype(int) + wm) > 0
    outside_tissue = int((nonzero & ~ndi.binary_dilation(tissue_any, iterations=3)).sum())
    lab = tissue_labels(gm, wm, mask)

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / T1, out / OUT_T1)
    write(mask, t1_img, out / OUT_MASK)
    write(lab, t1_img, out / OUT_TISSUE)
    for n in NOTICES:
        shutil.copyfile(src / n, out / n)

    inside = t1[mask]
    stats = {
        "grid": {"size_xyz": list(t1_img.GetSize()), "spacing_mm": list(t1_img.GetSpacing()),
                 "origin_lps_mm": list(t1_img.GetOrigin()), "direction_lps": list(t1_img.GetDirection()),
                 "orientation": "RAS"},
        "t1": {"dtype": "uint8", "min": int(t1.min()), "max": int(t1.max()),
               "p1_p50_p99_in_mask": [float(v) for v in np.percentile(inside, [1, 50, 99])],
               "median_gm": float(np.median(t1[lab == 1])), "median_wm": float(np.median(t1[lab == 2]))},
        "mask": {"voxels": int(mask.sum()), "nonzero_t1_voxels": int(nonzero.sum()),
                 "filled_holes": int(mask.sum() - nonzero.sum()), "connected_components": int(n_comp),
                 "nonzero_t1_voxels_3mm_beyond_gm_wm": outside_tissue},
        "tissue": {"gm_voxels": int((lab == 1).sum()), "wm_voxels": int((lab == 2).sum()),
                   "other_in_mask_voxels": int(((lab == 0) & mask).sum())},
    }
    if stats["t1"]["min"] != 0 or outside_tissue > 0.001 * nonzero.sum():
        print(f"prepare_icbm152: error: the T1 does not look skull-stripped ({outside_tissue} non-zero "
              f"voxels more than 3 mm from any GM/WM)", file=sys.stderr)
        return 1
    prov = {
        "inputs": {f"{SRC_DIR}/{n}": file_sha256(src / n) for n in inputs},
        "outputs": {n: {"sha256": file_sha256(out / n), "bytes": (out / n).stat().st_size}
                    for n in (OUT_T1, OUT_MASK, OUT_TISSUE, *NOTICES)},
        "command": "python scripts/prepare_icbm152.py --shared ../shared/data --out benchmarks/data/icbm152",
        "tissue_rule": "inside the brain mask: argmax(255 - p_GM - p_WM, p_GM, p_WM) -> 0, 1 (GM), 2 (WM); ties to the earlier class; 0 outside",
        "mask_rule": "fill_holes(T1 > 0)",
        **stats,
    }
    (out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(readme(prov), encoding="utf-8")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out}: {OUT_T1}, {OUT_MASK}, {OUT_TISSUE}, README.md, provenance.json, notices "
          f"({total / 1e6:.2f} MB)")
    if total > SIZE_BUDGET:
        print(f"prepare_icbm152: error: {total} bytes exceed the {SIZE_BUDGET} byte budget", file=sys.stderr)
        return 1
    return 0


def readme(p: dict) -> str:
    ins = "\n".join(f"| `{n}` | `{h}` |" for n, h in p["inputs"].items())
    outs = "\n".join(f"| `{n}` | {o['bytes']} | `{o['sha256']}` |" for n, o in p["outputs"].items())
    g, t, m, ts = p["grid"], p["t1"], p["mask"], p["tissue"]
    return f"""# ICBM152 2009a (symmetric) template: T1, brain mask, GM/WM labels

Part of the `realworld` development data set (`benchmarks/realworld.py`,
[`docs/realworld.md`](../../../docs/realworld.md)). Generated by

```bash
{p['command']}
```

from nilearn's copies of the **MNI ICBM152 2009a symmetric non-linear** template (Fonov et al.,
NeuroImage 2011 and 2009; Collins et al. 1999), files `mni_icbm152_{{t1,gm,wm}}_tal_nlin_sym_09a_converted.nii.gz`
of the nilearn 0.14.1 wheel (`nilearn/datasets/data/`; "converted": uint8 0..255 and masked
to the brain by nilearn). nilearn's description page calls its template "asymmetrical"; the
file names (`_sym_09a`) say symmetric 2009a, which is what these are.

## Files

| file | what |
|---|---|
| `{OUT_T1}` | the T1 template as it comes (byte copy), uint8, already skull-stripped |
| `{OUT_MASK}` | brain mask: `{p['mask_rule']}` |
| `{OUT_TISSUE}` | 1 = GM, 2 = WM, 0 = other (rule below) |
| `provenance.json` | everything on this page, for code |
| `COPYING.ICBM152-2009.txt` | the MNI ICBM152 notice (must accompany every copy) |
| `LICENSE.nilearn-BSD3.txt` | nilearn's BSD-3-clause licence |

**Skull-stripped.** nilearn's T1 is zero outside its brain mask: only
{m['nonzero_t1_voxels_3mm_beyond_gm_wm']} non-zero voxels lie more than 3 mm from every voxel
with GM or WM probability > 0 (no skull, no scalp), so the template is already the
skull-stripped T1 (like colin27's `ch2bet` and `vxm`) and is the only T1 kept.

**Brain mask.** The non-zero T1 voxels ({m['nonzero_t1_voxels']}, {m['connected_components']}
connected component(s); CSF and ventricles included), holes filled
(+{m['filled_holes']} voxels): {m['voxels']} voxels.

**Tissue labels.** Inside the brain mask each voxel takes the most probable of three
classes, `argmax(p_other, p_GM, p_WM)` with `p_other = 255 - p_GM - p_WM` (CSF and
background), ties to the earlier class (other, then GM): GM when `p_GM > p_other` and
`p_GM >= p_WM`, WM when `p_WM > p_GM` and `p_WM > p_other`. The winner's probability is at
least 1/3 by construction; no other threshold. GM {ts['gm_voxels']} voxels, WM
{ts['wm_voxels']}, other inside the mask {ts['other_in_mask_voxels']}. The ICBM classes put
most of the brain stem and the thalamus in GM and the pallidum in WM; how the FreeSurfer aseg
structures are grouped to match is in `benchmarks/realworld.py` (`ASEG_GM`, `ASEG_WM`).

## Grid and intensities

{g['size_xyz'][0]}x{g['size_xyz'][1]}x{g['size_xyz'][2]} voxels (x, y, z) at {g['spacing_mm'][0]:g} mm,
orientation {g['orientation']} (nibabel codes), MNI space: ITK (LPS) origin {g['origin_lps_mm']} mm,
direction {g['direction_lps']}. The T1's NIfTI header (as it comes) has sform code 2
(aligned) and qform code 0; the derived files were written by SimpleITK on the same grid.
T1 uint8 {t['min']}..{t['max']}; inside the mask 1st/50th/99th percentile
{t['p1_p50_p99_in_mask']}; median GM {t['median_gm']:g}, median WM {t['median_wm']:g}.

## Provenance

Inputs (`../shared/data/`, byte copies of the nilearn 0.14.1 wheel's files, see its `MANIFEST.md`):

| file | sha256 |
|---|---|
{ins}

Outputs:

| file | bytes | sha256 |
|---|---|---|
{outs}

## Licence

The template data fall under the MNI ICBM152-2009 notice in `COPYING.ICBM152-2009.txt`
(permission to use, copy, modify and distribute, provided the notice appears in all copies).
That notice is a transcription (the nilearn wheel does not ship it; see the shared data's
`MANIFEST.md`), not checked against the original MNI archive. nilearn's code is BSD-3-clause
(`LICENSE.nilearn-BSD3.txt`). Cite Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC,
Collins DL. *Unbiased average age-appropriate atlases for pediatric studies.* NeuroImage
2011;54(1):313-327, and Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. *Unbiased
nonlinear average age-appropriate brain templates from birth to adulthood.* NeuroImage
2009;47:S102.
"""


if __name__ == "__main__":
    sys.exit(main())
