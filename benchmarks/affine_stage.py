"""The affine stage measured (issue: any two scans): on the bundled pre-aligned test pairs,
Dice after registration with the default affine stage (rigid → affine, correlation) against none,
and the stage's share of the default registration's time at 2 mm and 1 mm; and the misaligned
pair: ``vxm`` ← ``synthseg_17`` with the moving scan and labels moved onto another grid (1.2 ×
1.0 × 1.5 mm, permuted and flipped axes) by a known similarity (12°, 12 mm, 5 %), registered
from the files with the defaults, against the aligned pair (Dice gap, the recovered affine's
RMS error over the brain, and how far ``inverse_transform.h5`` ∘ ``transform.h5`` moves points).

``python -m benchmarks.affine_stage [--pairs N] [--pairs-1mm N] [--resolutions 2 1] [--misaligned]
[--out benchmarks/results/affine_stage.json] [--merge]`` runs each registration through the register
service exactly as ``hybridreg register`` does (fresh outputs in a temporary folder) and writes
the rows and a Markdown table next to them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks.common import RESULTS, environment, environment_markdown
from hybridreg import data
from hybridreg.config import atomic_write_text
from hybridreg.service import register_files


def run(pairs: int, resolutions: tuple[int, ...], pairs_1mm: int = 1) -> list[dict]:
    rows = []
    fid = data.demo_pair()[0]
    for res in resolutions:
        n = pairs_1mm if res == 1 else pairs
        movings = [s for s in data.list_subjects("test") if data.subject_info(s).get("t1_1mm_bundled", True)][:n]
        for mid in movings:
            f, m = data.load_subject(fid, res), data.load_subject(mid, res)
            for affine in ("affine", "none"):
                with tempfile.TemporaryDirectory() as tmp:
                    met = register_files(f.image_path, m.image_path, Path(tmp) / "out", fixed_labels=f.labels_path,
                                         moving_labels=m.labels_path, affine=affine, progress=False, hd95_metric=False)
                rows.append({"resolution_mm": res, "pair": f"{fid}<-{mid}", "affine": affine,
                             "dice_before": met["dice_before"]["mean"], "dice_after_affine": met.get("dice_after_affine", {}).get("mean"),
                             "dice": met["dice_after"]["mean"], "sdlogj": met["sdlogj"], "folding_percent": met["folding_percent"],
                             "seconds_registration": met["seconds"]["registration"], "seconds_affine": met["seconds"].get("affine", 0.0)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


MISALIGNED_PAIR = ("vxm", "synthseg_17")


def similarity_truth(center) -> sitk.Similarity3DTransform:
    """The known misalignment: 12° about an oblique axis, 12 mm shift, 5 % scale about ``center``."""
    tx = sitk.Similarity3DTransform()
    tx.SetCenter(tuple(center))
    tx.SetRotation((0.3, 0.2, 0.93), np.deg2rad(12.0))
    tx.SetTranslation((8.0, -6.0, 6.0))
    tx.SetScale(1.05)
    return tx


def move_to_another_grid(image: sitk.Image, transform: sitk.Transform, labels: bool) -> sitk.Image:
    """``image`` resampled (linear, or nearest for ``labels``) onto a grid of its own -- 1.2 ×
    1.0 × 1.5 mm, permuted and flipped axes, covering it with a 15 % margin -- so that the new
    image's content at ``q`` is the old one's at ``transform(q)``."""
    spacing = (1.2, 1.0, 1.5)
    direction = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    size = [int(np.ceil(1.15 * max(extent) / s)) for s in spacing]
    ref = sitk.Image(size, image.GetPixelID())
    ref.SetSpacing(spacing)
    ref.SetDirection(direction)
    center = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    half = np.array(direction).reshape(3, 3) @ (np.array(spacing) * (np.array(size) - 1) / 2)
    ref.SetOrigin(tuple(center - half))
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, ref, transform, interp, 0.0, image.GetPixelID())


def misaligned_runs(res: int, root: Path) -> dict:
    """Register the aligned pair and its misaligned copy at ``res`` mm into ``root``/aligned and
    ``root``/moved with the defaults; returns the paths, the truth and both metrics."""
    f, m = (data.load_subject(s, res) for s in MISALIGNED_PAIR)
    fixed = sitk.ReadImage(str(f.image_path))
    truth = similarity_truth(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    moved = {}
    for key, path, labels in (("image", m.image_path, False), ("labels", m.labels_path, True)):
        moved[key] = root / f"moved_{key}.nii.gz"
        sitk.WriteImage(move_to_another_grid(sitk.ReadImage(str(path)), truth.GetInverse(), labels), str(moved[key]))
    out, met = {}, {}
    for name, moving, labels in (("aligned", m.image_path, m.labels_path), ("moved", moved["image"], moved["labels"])):
        out[name] = root / name
        met[name] = register_files(f.image_path, moving, out[name], fixed_labels=f.labels_path, moving_labels=labels,
                                   progress=False)
    return {"f": f, "m": m, "truth": truth, "moved": moved, "out": out, "metrics": met}


def brain_points(labels_path, step: int) -> list[tuple[float, ...]]:
    """Physical points (LPS mm) of every ``step``-th voxel inside the label map's foreground."""
    img = sitk.ReadImage(str(labels_path))
    idx = np.argwhere(sitk.GetArrayViewFromImage(img) > 0)[::step]
    return [img.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in idx]


def affine_error_mm(runs: dict, step: int = 97) -> float:
    """RMS distance (mm) over the fixed brain between the recovered affine and the truth for the
    moved pair: the known similarity on top of the affine stage's own answer for the aligned pair
    (``p ↦ truth(A0(p))``; A0 is not the identity: the bundled pairs were aligned by another
    method, and the affine optimum of two differently made images differs slightly)."""
    found = sitk.ReadTransform(str(runs["out"]["moved"] / "affine.mat"))
    expected = sitk.CompositeTransform([runs["truth"], sitk.ReadTransform(str(runs["out"]["aligned"] / "affine.mat"))])
    err = [np.linalg.norm(np.subtract(found.TransformPoint(p), expected.TransformPoint(p)))
           for p in brain_points(runs["f"].labels_path, step)]
    return float(np.sqrt(np.mean(np.square(err))))


def inverse_error_mm(folder: Path, labels_path, step: int = 53) -> float:
    """Mean distance (mm) that ``inverse_transform.h5`` ∘ ``transform.h5`` (read by SimpleITK)
    moves points of the fixed brain."""
    fwd, inv = (sitk.ReadTransform(str(folder / n)) for n in ("transform.h5", "inverse_transform.h5"))
    return float(np.mean([np.linalg.norm(np.subtract(inv.TransformPoint(fwd.TransformPoint(p)), p))
                          for p in brain_points(labels_path, step)]))


def run_misaligned(resolutions: tuple[int, ...]) -> list[dict]:
    rows = []
    for res in resolutions:
        with tempfile.TemporaryDirectory() as tmp:
            r = misaligned_runs(res, Path(tmp))
            a, m = r["metrics"]["aligned"], r["metrics"]["moved"]
            rows.append({"kind": "misaligned", "resolution_mm": res, "pair": "<-".join(MISALIGNED_PAIR),
                         "dice_aligned": a["dice_after"]["mean"], "dice_moved_before": m["dice_before"]["mean"],
                         "dice_moved": m["dice_after"]["mean"], "sdlogj_aligned": a["sdlogj"], "sdlogj_moved": m["sdlogj"],
                         "folding_percent_moved": m["folding_percent"], "affine_rms_mm": affine_error_mm(r),
                         "inverse_mean_mm": inverse_error_mm(r["out"]["moved"], r["f"].labels_path),
                         "seconds_moved": m["seconds"]["registration"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    out = ["# The affine stage on the bundled pre-aligned pairs", "", environment_markdown(env), "",
           "| grid | pairs | Dice, default (rigid → affine, correlation) | Dice, `--affine none` | Δ mean (min) | affine s | registration s | affine / registration |",
           "|---|---|---|---|---|---|---|---|"]
    for res in sorted({r["resolution_mm"] for r in rows if "affine" in r}):
        a = [r for r in rows if r["resolution_mm"] == res and r.get("affine") == "affine"]
        n = {r["pair"]: r for r in rows if r["resolution_mm"] == res and r.get("affine") == "none"}
        delta = [r["dice"] - n[r["pair"]]["dice"] for r in a if r["pair"] in n]
        aff, reg = np.median([r["seconds_affine"] for r in a]), np.median([n[r["pair"]]["seconds_registration"] for r in a])
        out.append(f"| {res} mm | {len(a)} | {np.mean([r['dice'] for r in a]):.4f} | {np.mean([x['dice'] for x in n.values()]):.4f}"
                   f" | {np.mean(delta):+.4f} ({min(delta):+.4f}) | {aff:.1f} | {reg:.1f} | {aff / reg:.2f} |")
    mis = [r for r in rows if r.get("kind") == "misaligned"]
    if mis:
        out += ["", f"## The misaligned pair ({mis[0]['pair']}, moving scan on another grid, moved by a known similarity)", "",
                "| grid | Dice aligned | Dice misaligned: before → after | gap | SDlogJ aligned / misaligned | %\\|J\\|≤0 |"
                " affine RMS error mm | inverse ∘ forward mean mm | seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for r in mis:
            out.append(f"| {r['resolution_mm']} mm | {r['dice_aligned']:.4f} | {r['dice_moved_before']:.3f} → {r['dice_moved']:.4f}"
                       f" | {r['dice_moved'] - r['dice_aligned']:+.4f} | {r['sdlogj_aligned']:.3f} / {r['sdlogj_moved']:.3f}"
                       f" | {r['folding_percent_moved']:.4f} | {r['affine_rms_mm']:.2f} | {r['inverse_mean_mm']:.3f} | {r['seconds_moved']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5, help="test pairs at 2 mm")
    p.add_argument("--pairs-1mm", type=int, default=1, help="test pairs at 1 mm (minutes each)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[2, 1])
    p.add_argument("--misaligned", action="store_true", help="also the misaligned pair at each resolution")
    p.add_argument("--out", default=str(RESULTS / "affine_stage.json"))
    p.add_argument("--merge", action="store_true", help="keep the rows of --out that this run does not measure again")
    a = p.parse_args(argv)
    env = environment()
    rows = run(a.pairs, tuple(a.resolutions), a.pairs_1mm) + (run_misaligned(tuple(a.resolutions)) if a.misaligned else [])
    for r in rows:
        r["commit"] = env.get("git")
    out = Path(a.out)
    if a.merge and out.is_file():
        def key(r):
            return r.get("kind", "pair"), r["resolution_mm"], r["pair"], r.get("affine")

        new = {key(r) for r in rows}
        rows = [r for r in json.loads(out.read_text(encoding="utf-8"))["rows"] if key(r) not in new] + rows
    atomic_write_text(out, json.dumps({"environment": env, "rows": rows}, indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
