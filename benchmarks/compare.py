"""Does a re-run reproduce a stored suite run? (``python -m benchmarks compare``)

Compares two ``rows.jsonl`` files (a reference, e.g. the committed report's, and a re-run)
pair by pair and method by method: the accuracy and regularity numbers must agree within a
tolerance (registration on CPU with the same library versions and thread count is
deterministic, so the default tolerances only absorb floating-point reordering), and the
wall times are reported as ratios (re-run / reference), since timings vary from run to run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.common import processor, shown
from benchmarks.methods import METHODS

DICE_TOL = 0.005
"""Largest per-pair |Δ mean Dice| counted as run-to-run noise."""
SDLOGJ_TOL = 0.01
"""Largest per-pair |Δ SDlogJ| counted as run-to-run noise."""


def compare_rows(reference: list[dict], rerun: list[dict], dice_tol: float = DICE_TOL,
                 sdlogj_tol: float = SDLOGJ_TOL) -> list[dict]:
    """Per method present in both runs: pairs in common, largest |Δ Dice|, |Δ SDlogJ| and
    |Δ %|J|≤0| over those pairs, the median and range of the time ratio (re-run /
    reference), and ``match`` (every pair within the tolerances).

    Raises:
        ValueError: the two runs share no (pair, method).
    """
    ref = {(r["pair"], r["method"]): r for r in reference}
    new = {(r["pair"], r["method"]): r for r in rerun}
    common = sorted(set(ref) & set(new))
    if not common:
        raise ValueError("compare_rows(): `reference` and `rerun` share no (pair, method) row")
    order = [m for m in METHODS if any(k[1] == m for k in common)]
    order += sorted({k[1] for k in common} - set(order))
    out = []
    for m in order:
        keys = [k for k in common if k[1] == m]
        dd = max(abs(new[k]["dice_mean"] - ref[k]["dice_mean"]) for k in keys)
        ds = max(abs(new[k]["sdlogj"] - ref[k]["sdlogj"]) for k in keys)
        df = max(abs(new[k]["folding_percent"] - ref[k]["folding_percent"]) for k in keys)
        ratios = [new[k]["seconds"] / ref[k]["seconds"] for k in keys if ref[k]["seconds"] > 0]
        moved = any(processor(new[k]) != processor(ref[k]) for k in keys)  # then the time ratio compares two machines
        out.append({
            "method": m, "pairs": len(keys), "dice_ref": statistics.mean(ref[k]["dice_mean"] for k in keys),
            "dice_rerun": statistics.mean(new[k]["dice_mean"] for k in keys), "max_abs_dice_diff": dd,
            "max_abs_sdlogj_diff": ds, "max_abs_folding_diff": df,
            "time_ratio_median": statistics.median(ratios) if ratios else float("nan"),
            "time_ratio_min": min(ratios, default=float("nan")), "time_ratio_max": max(ratios, default=float("nan")),
            "match": dd <= dice_tol and ds <= sdlogj_tol, "other_processor": moved,
        })
    return out


def compare_scaling(reference: list[dict], rerun: list[dict]) -> list[dict]:
    """Per scaling grid in both runs (``scaling.json``): seconds per iteration and memory of
    each run and their ratios (re-run / reference)."""
    ref = {s["grid"]: s for s in reference}
    out = []
    for s in rerun:
        r = ref.get(s["grid"])
        if r is not None:
            out.append({"grid": s["grid"], "voxels": s["voxels"], "seconds_ref": r["seconds_per_iteration"],
                        "seconds_rerun": s["seconds_per_iteration"],
                        "seconds_ratio": s["seconds_per_iteration"] / r["seconds_per_iteration"],
                        "memory_ref": r["memory_mb"], "memory_rerun": s["memory_mb"],
                        "memory_ratio": s["memory_mb"] / r["memory_mb"]})
    return out


def compare_markdown(comparison: list[dict], reference: str, rerun: str, scaling: list[dict] | None = None) -> str:
    """The comparison as a markdown section (one row per method, a verdict, and the scaling
    grids when given)."""
    label = {m: METHODS[m].label if m in METHODS else m for m in (c["method"] for c in comparison)}
    lines = ["# Reproducibility: re-run against the reference run", "",
             f"Reference rows: `{reference}`; re-run rows: `{rerun}`. Accuracy and regularity must agree pair by pair "
             f"(|Δ Dice| ≤ {DICE_TOL}, |Δ SDlogJ| ≤ {SDLOGJ_TOL}); times are re-run / reference ratios.", "",
             "| method | pairs | Dice reference | Dice re-run | max \\|Δ Dice\\| | max \\|Δ SDlogJ\\| | max \\|Δ %\\|J\\|≤0\\| "
             "| time ratio median (range) | match |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in comparison:
        lines.append(f"| {label[c['method']]} | {c['pairs']} | {c['dice_ref']:.4f} | {c['dice_rerun']:.4f} | "
                     f"{c['max_abs_dice_diff']:.4f} | {c['max_abs_sdlogj_diff']:.4f} | {c['max_abs_folding_diff']:.4f} | "
                     f"{c['time_ratio_median']:.2f} ({c['time_ratio_min']:.2f}–{c['time_ratio_max']:.2f})"
                     f"{' (another processor)' if c.get('other_processor') else ''} | "
                     f"{'yes' if c['match'] else '**no**'} |")
    lines.append("")
    if scaling:
        lines += ["Scaling (seconds and memory per iteration on the full grid):", "",
                  "| grid | voxels | s/iteration reference | re-run | ratio | memory MB reference | re-run | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['grid']} | {s['voxels']:,} | {s['seconds_ref']:.3f} | {s['seconds_rerun']:.3f} | {s['seconds_ratio']:.2f} | "
                  f"{s['memory_ref']:.0f} | {s['memory_rerun']:.0f} | {s['memory_ratio']:.2f} |" for s in scaling]
        lines.append("")
    return "\n".join(lines)


def compare_files(reference: Path, rerun: Path, out: Path | None = None) -> str:
    """Read two ``rows.jsonl`` files, compare them (and the ``scaling.json`` files next to
    them when both exist), write ``out`` (markdown) if given.

    Raises:
        FileNotFoundError: a missing rows file. ValueError: no rows in common.
    """
    from benchmarks.suite import read_rows
    from hybridreg.config import atomic_write_text

    for name, p in (("reference", reference), ("rerun", rerun)):
        if not Path(p).is_file():
            raise FileNotFoundError(f"compare: `{name}` rows file not found: {p}")
    scaling = None
    sc_ref, sc_new = Path(reference).parent / "scaling.json", Path(rerun).parent / "scaling.json"
    if sc_ref.is_file() and sc_new.is_file():
        scaling = compare_scaling(json.loads(sc_ref.read_text(encoding="utf-8")), json.loads(sc_new.read_text(encoding="utf-8")))
    md = compare_markdown(compare_rows(read_rows(Path(reference)), read_rows(Path(rerun))), shown(reference), shown(rerun),
                          scaling)
    if out is not None:
        atomic_write_text(Path(out), md)
    return md
