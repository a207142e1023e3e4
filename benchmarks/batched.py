"""Batched instance optimization against one pair at a time, and the device figures (CPU or GPU).

``python -m benchmarks batched [--device cuda] [--n 4] [--batch-size 4]`` runs, each in a fresh
process (so that its peak memory is its own):

1. ``hybridreg batch`` over the first ``--n`` pairs of a manifest (default: the bundled test
   pairs at 2 mm, ``benchmarks/data/bundled_test_pairs_2mm.csv``) one pair at a time, then
   with ``--batch-size`` pairs in one optimization (:func:`hybridreg.service.solve_pairs`), the
   instance solver's defaults, ``--outputs metrics``: per-pair Dice, SDlogJ and %|J|≤0 of both
   runs and their difference, the registration seconds per pair, pairs per minute, peak memory.
2. The instance and the learned solver on the bundled 1 mm pair (``hybridreg register``'s
   stages, ``--outputs metrics``): Dice, SDlogJ, %|J|≤0, seconds per stage and peak memory
   (``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on a GPU). On a GPU the instance
   solver also runs on the same machine's CPU right after, the baseline of the device ratio.
3. With ``--realworld``, both solvers on every pair of the ``realworld`` set
   (:func:`benchmarks.realworld.realworld_pairs`: real scans as they come, 1 mm, affine stage
   included) on ``--device``, one process per solver.

It writes ``benchmarks/results/batched.json`` and ``.md`` (``--out`` to change), stamped with
the hardware, the GPU named when there was one, and saying so when there was none. Ratios
compare runs of the same invocation only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, environment, environment_markdown, run_child, shown, warm_up_device

PAIRS = ROOT / "benchmarks" / "data" / "bundled_test_pairs_2mm.csv"
KEYS = ("dice", "sdlogj", "folding_percent", "seconds_registration", "seconds_total", "peak_memory_mb")


def child_batch(manifest: str, n: int, batch_size: int, device: str) -> dict:
    """``hybridreg batch`` over the first ``n`` pairs of ``manifest`` in this process, after
    :func:`warm_up_device`."""
    from hybridreg.batch import read_pairs, run_batch

    warm_up_device("instance", device)
    pairs = read_pairs(manifest)[:n]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = run_batch(pairs, Path(tmp) / "out", device=device, outputs="metrics", batch_size=batch_size, progress=False)
        wall = time.perf_counter() - t0
        with open(s.table, newline="", encoding="utf-8") as fh:
            rows = [{"id": r["id"], "status": r["status"], **{k: float(r[k]) for k in KEYS if r.get(k)}}
                    for r in csv.DictReader(fh)]
    return {"wall_seconds": wall, "rows": rows, "batch_size": batch_size}


def one_mm_pairs(which: str) -> list[dict]:
    """The 1 mm pairs of the device figures, as ``register_files`` arguments with a ``name``:
    ``demo`` (the bundled 1 mm demo pair) or ``realworld`` (every pair of that set present here,
    :func:`benchmarks.realworld.realworld_pairs`, scored on its own labels).

    Raises:
        ValueError: another ``which``.
    """
    if which == "demo":
        from hybridreg import data

        fs, ms = (data.load_subject(s, 1) for s in data.demo_pair())
        return [dict(name=f"{fs.subject_id}<-{ms.subject_id}", fixed=fs.image_path, moving=ms.image_path,
                     fixed_labels=fs.labels_path, moving_labels=ms.labels_path, eval_labels="auto")]
    if which == "realworld":
        from benchmarks.realworld import realworld_pairs

        return [dict(name=p.name, fixed=p.fixed_image, moving=p.moving_image, fixed_labels=p.fixed_labels,
                     moving_labels=p.moving_labels, eval_labels=list(p.labels)) for p in realworld_pairs()]
    raise ValueError(f"one_mm_pairs(): `which` must be 'demo' or 'realworld', got {which!r}")


def child_one_mm(solver: str, device: str, pairs: str = "demo") -> list[dict]:
    """``solver`` on each of :func:`one_mm_pairs` ``(pairs)`` in this process (``--outputs
    metrics``), after :func:`warm_up_device`."""
    from hybridreg.service import register_files

    warm_up_device(solver, device)
    rows = []
    for p in one_mm_pairs(pairs):
        name = p.pop("name")
        with tempfile.TemporaryDirectory() as tmp:
            m = register_files(p.pop("fixed"), p.pop("moving"), Path(tmp) / "out", solver=solver, device=device,
                               progress=False, outputs="metrics", **p)
        rows.append({"pair": name, "solver": solver, "device": m["device"], "grid": m["inputs"]["grid"]["size"],
                     "dice": m["dice_after"]["mean"], "sdlogj": m["sdlogj"], "folding_percent": m["folding_percent"],
                     "seconds": m["seconds"], "peak_memory_mb": m["peak_memory_mb"],
                     "peak_memory_kind": m["peak_memory_kind"]})
    return rows


def run(manifest: Path, n: int, batch_size: int, device: str, one_mm: bool, realworld: bool = False) -> dict:
    env = environment()
    out = {"environment": env, "device": device, "manifest": shown(manifest), "n": n, "realworld": realworld}
    for key, b in (("one_at_a_time", 1), ("batched", batch_size)):
        print(f"batch of {n} pairs, --batch-size {b} ...", file=sys.stderr, flush=True)
        out[key] = run_child("benchmarks.batched:child_batch", manifest=str(manifest), n=n, batch_size=b, device=device)
    runs = [("demo", s, device) for s in ("instance", "learned") if one_mm]
    if one_mm and device != "cpu":
        runs.append(("demo", "instance", "cpu"))  # the same machine's CPU: the baseline of the device ratio
    runs += [("realworld", s, device) for s in ("instance", "learned") if realworld]
    out["one_mm"] = []
    for pairs, solver, dev in runs:
        print(f"1 mm, {pairs} pairs, --solver {solver} --device {dev} ...", file=sys.stderr, flush=True)
        out["one_mm"] += run_child("benchmarks.batched:child_one_mm", solver=solver, device=dev, pairs=pairs)
    return out


def markdown(r: dict) -> str:
    env, one, bat = r["environment"], r["one_at_a_time"], r["batched"]
    B, n = bat["batch_size"], r["n"]
    gpu = env.get("gpu")
    lines = ["# Batched instance optimization and device figures", "",
             f"`python -m benchmarks batched --device {r['device']} --n {n} --batch-size {B}"
             f"{' --realworld' if r.get('realworld', len({m.get('pair') for m in r.get('one_mm', [])}) > 1) else ''}`"
             f" (manifest `{r['manifest']}`), each configuration in a fresh process.", "",
             environment_markdown(env)]
    if r["device"].startswith("cuda"):
        lines += [f"GPU: **{gpu}**.", ""]
    else:
        lines += [("No GPU was available to the session that ran this benchmark" if not gpu else
                   f"A GPU ({gpu}) was present but not used") + ": the figures below are CPU figures. On a machine with"
                  " one, `python -m benchmarks batched --device cuda` gives the GPU figures (seconds per pair, peak"
                  " GPU memory, batched throughput) in the same form.", ""]
    lines += [f"## {n} pairs, one at a time against {B} per optimization", "",
              "| pair | Dice (1 at a time) | Dice (batched) | \\|ΔDice\\| | SDlogJ (1) | SDlogJ (B) | %\\|J\\|≤0 (1) | %\\|J\\|≤0 (B) |",
              "|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for a, b in zip(one["rows"], bat["rows"]):
        if a["status"] != "done" or b["status"] != "done":
            lines.append(f"| {a['id']} | {a['status']} | {b['status']} | | | | | |")
            continue
        dd = abs(a.get("dice", float("nan")) - b.get("dice", float("nan")))
        worst = max(worst, dd)
        lines.append(f"| {a['id']} | {a.get('dice', float('nan')):.4f} | {b.get('dice', float('nan')):.4f} | {dd:.4f} |"
                     f" {a['sdlogj']:.4f} | {b['sdlogj']:.4f} | {a['folding_percent']:.4f} | {b['folding_percent']:.4f} |")

    def per_pair(res: dict, key: str) -> float:
        v = [row[key] for row in res["rows"] if key in row]
        return sum(v) / max(len(v), 1)

    reg1, regB = per_pair(one, "seconds_registration"), per_pair(bat, "seconds_registration")
    mem1, memB = max(row.get("peak_memory_mb", 0) for row in one["rows"]), max(row.get("peak_memory_mb", 0) for row in bat["rows"])
    lines += ["", f"Largest Dice difference: **{worst:.4f}**.", "",
              "| run | registration s per pair | whole run s | pairs per minute (whole run) | peak memory MB |",
              "|---|---|---|---|---|",
              f"| one at a time | {reg1:.1f} | {one['wall_seconds']:.1f} | {60 * n / one['wall_seconds']:.2f} | {mem1:.0f} |",
              f"| {B} per optimization | {regB:.1f} | {bat['wall_seconds']:.1f} | {60 * n / bat['wall_seconds']:.2f} | {memB:.0f} |",
              "", f"Throughput ratio (batched / one at a time): registration stage **{reg1 / regB:.2f}×**, whole run"
              f" **{one['wall_seconds'] / bat['wall_seconds']:.2f}×**; peak memory ratio {memB / max(mem1, 1e-9):.2f}."
              " The registration seconds of a batched pair are its share of the batch's (the batch's / B)."]
    if r.get("one_mm"):
        stages = ("reading", "affine", "registration", "metrics", "writing", "total")
        lines += ["", "## 1 mm pairs through the register service (`--outputs metrics`)", "",
                  "| pair | solver | device | grid | Dice | SDlogJ | %\\|J\\|≤0 | " + " | ".join(f"{k} s" for k in stages)
                  + " | peak memory MB |", "|---|---|---|---|---|---|---|" + "---|" * len(stages) + "---|"]
        for m in r["one_mm"]:
            lines.append(f"| {m.get('pair', 'demo')} | {m['solver']} | {m.get('device', r['device'])} |"
                         f" {'x'.join(map(str, m['grid']))} | {m['dice']:.4f} | {m['sdlogj']:.4f} |"
                         f" {m['folding_percent']:.4f} | " + " | ".join(f"{m['seconds'].get(k, 0.0):.1f}" for k in stages)
                         + f" | {m['peak_memory_mb']:.0f} ({m['peak_memory_kind']}) |")
        lines += device_ratio(r)
    return "\n".join(lines) + "\n"


def device_ratio(r: dict) -> list[str]:
    """The report's lines comparing the instance solver's registration seconds on the device
    with the same machine's CPU (rows of the first pair run on both; none without both)."""
    rows = [m for m in r.get("one_mm", []) if m["solver"] == "instance"]
    cpu = next((m for m in rows if m.get("device") == "cpu"), None)
    dev = next((m for m in rows if cpu and m.get("device") != "cpu" and m.get("pair") == cpu.get("pair")), None)
    if cpu is None or dev is None:
        return []
    ratio = cpu["seconds"]["registration"] / dev["seconds"]["registration"]
    return ["", f"Instance solver on {dev['pair']}, registration stage: {dev['seconds']['registration']:.1f} s on"
            f" {dev['device']} against {cpu['seconds']['registration']:.1f} s on this machine's CPU"
            f" ({r['environment'].get('torch_threads', '?')} torch threads) in the same invocation: **{ratio:.1f}×**;"
            f" Dice {dev['dice']:.4f} against {cpu['dice']:.4f}, SDlogJ {dev['sdlogj']:.4f} against {cpu['sdlogj']:.4f}."]


def main(argv=None) -> int:
    from hybridreg.config import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=Path, default=PAIRS, help="a batch manifest (default: the bundled test pairs, 2 mm)")
    p.add_argument("--n", type=int, default=4, help="pairs to register (default 4)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimization in the batched run (default 4)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--no-1mm", dest="one_mm", action="store_false", help="skip the 1 mm pair")
    p.add_argument("--realworld", action="store_true",
                   help="also both solvers on the realworld pairs (fetched colin27 pairs included when present)")
    p.add_argument("--out", type=Path, default=RESULTS / "batched", help="results stem (.json and .md are written)")
    a = p.parse_args(argv)
    r = run(a.pairs, a.n, a.batch_size, a.device, a.one_mm, a.realworld)
    atomic_write_text(a.out.with_suffix(".json"), json.dumps(r, indent=2))
    atomic_write_text(a.out.with_suffix(".md"), markdown(r))
    print(f"wrote {shown(a.out.with_suffix('.md'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
