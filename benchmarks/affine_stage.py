"""The affine stage measured (issue: any two scans): on the bundled pre-aligned test pairs,
Dice after registration with the default affine stage (rigid → affine, Mattes MI) against none,
and the stage's share of the default registration's time at 2 mm and 1 mm.

``python -m benchmarks.affine_stage [--pairs N] [--out benchmarks/results/affine_stage.json]``
runs each registration through the register service exactly as ``hybridreg register`` does
(fresh outputs in a temporary folder) and writes the rows and a Markdown table next to them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, environment, environment_markdown
from hybridreg import data
from hybridreg.config import atomic_write_text
from hybridreg.service import register_files


def run(pairs: int, resolutions: tuple[int, ...]) -> list[dict]:
    rows = []
    fid = data.demo_pair()[0]
    for res in resolutions:
        movings = [s for s in data.list_subjects("test") if data.subject_info(s).get("t1_1mm_bundled", True)][:pairs]
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


def markdown(rows: list[dict], env: dict) -> str:
    out = ["# The affine stage on the bundled pre-aligned pairs", "", environment_markdown(env), "",
           "| grid | pairs | Dice, default (rigid → affine, MI) | Dice, `--affine none` | Δ mean (min) | affine s | registration s | affine / registration |",
           "|---|---|---|---|---|---|---|---|"]
    for res in sorted({r["resolution_mm"] for r in rows}):
        a = [r for r in rows if r["resolution_mm"] == res and r["affine"] == "affine"]
        n = {r["pair"]: r for r in rows if r["resolution_mm"] == res and r["affine"] == "none"}
        delta = [r["dice"] - n[r["pair"]]["dice"] for r in a if r["pair"] in n]
        aff, reg = np.median([r["seconds_affine"] for r in a]), np.median([n[r["pair"]]["seconds_registration"] for r in a])
        out.append(f"| {res} mm | {len(a)} | {np.mean([r['dice'] for r in a]):.4f} | {np.mean([x['dice'] for x in n.values()]):.4f}"
                   f" | {np.mean(delta):+.4f} ({min(delta):+.4f}) | {aff:.1f} | {reg:.1f} | {aff / reg:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--resolutions", type=int, nargs="+", default=[2, 1])
    p.add_argument("--out", default=str(RESULTS / "affine_stage.json"))
    a = p.parse_args(argv)
    env = environment()
    rows = run(a.pairs, tuple(a.resolutions))
    out = Path(a.out)
    atomic_write_text(out, json.dumps({"environment": env, "rows": rows}, indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
