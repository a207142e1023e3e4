"""The learned solver against instance optimization on the bundled test split.

Measured, each in a fresh subprocess (so a peak RSS belongs to one measurement):

* **accuracy and regularity** -- for every test pair (atlas ``vxm`` ← ``synthseg_16..20``; with
  ``--subject-pairs`` also ``synthseg_16 ← 17``, ``17 ← 18`` ..., pairs without the atlas) and
  every solver (``instance`` default schedule, ``learned``, ``learned+refine``), through
  :func:`hybridreg.cli.register_files` exactly as ``hybridreg register`` runs: mean Dice over
  the standard structures present in both maps, %|J|≤0, SDlogJ, registration seconds,
  peak RSS; at 2 mm and (``--one-mm``) at 1 mm;
* **inference** -- seconds of one network pass plus integration and warping at 2 mm and 1 mm
  (median of ``--repeats`` after one warm-up) and its peak RSS;
* **training** -- seconds per training step of each stage of the shipped weights
  (:data:`TRAIN_CONFIGS`; median of ``--repeats`` steps after two warm-up steps).

Ratios are against the instance solver run in the same invocation. Usage::

    python -m benchmarks.learned_solver --out benchmarks/results/learned_solver.md [--one-mm]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import rss_mb, run_python

SOLVERS = ("instance", "learned", "learned+refine")
ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = ("learned_bundled_2mm.yaml", "learned_bundled_2mm_fullres.yaml", "learned_bundled_2mm_fullres_mixed.yaml")
"""The shipped weights' training stages (``configs/``): the half-grid network, the
fine-tuning with the full-resolution velocity stage, and the second fine-tuning."""


def child_register(solver: str, fid: str, moving: str, resolution: int) -> dict:
    from hybridreg import data
    from hybridreg.cli import register_files

    f, m = data.load_subject(fid, resolution), data.load_subject(moving, resolution)
    with tempfile.TemporaryDirectory() as tmp:
        met = register_files(f.image_path, m.image_path, Path(tmp) / "out", fixed_labels=f.labels_path,
                             moving_labels=m.labels_path, solver=solver, progress=False, hd95_metric=True)
    return {"solver": solver, "pair": f"{fid}<-{moving}", "resolution_mm": resolution,
            "dice_before": met["dice_before"]["mean"], "dice_after": met["dice_after"]["mean"],
            "hd95_mm": met["hd95_mm_after"]["mean"], "folding_percent": met["folding_percent"], "sdlogj": met["sdlogj"],
            "lambda_std": met["lambda"]["std_inside_fixed_labels"], "seconds": met["seconds"]["registration"], "peak_rss_mb": met["peak_memory_mb"]}


def child_inference(resolution: int, repeats: int) -> dict:
    from hybridreg import data
    from hybridreg.io import normalize_intensity
    from learned.solver import LearnedConfig, register_pair

    fid, mid = data.demo_pair()
    f, m = data.load_subject(fid, resolution), data.load_subject(mid, resolution)
    ft = torch.from_numpy(normalize_intensity(f.image))[None, None]
    mt = torch.from_numpy(normalize_intensity(m.image))[None, None]
    base = rss_mb()
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        register_pair(ft, mt, LearnedConfig(), spacing=f.spacing)
        times.append(time.perf_counter() - t)
    return {"resolution_mm": resolution, "seconds_median": statistics.median(times[1:]), "seconds_first": times[0],
            "peak_rss_mb": rss_mb(), "rss_before_mb": base, "threads": torch.get_num_threads()}


def child_train_step(config: str, repeats: int) -> dict:
    from hybridreg.config import load_yaml
    from hybridreg.data.sources import bundled
    from learned.train import TrainConfig, _sample_pair, _tensor
    from learned.loss import network_energy
    from learned.network import RegistrationNetwork

    cfg = load_yaml(ROOT / "configs" / config, TrainConfig)
    ds = bundled(2)
    images, atlas = [_tensor(v, "cpu") for v in ds.train], _tensor(ds.atlas, "cpu")
    net = RegistrationNetwork(cfg.network)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        f, m = _sample_pair(ds, images, atlas, cfg, gen)
        loss = network_energy(net(f, m), f, m, cfg.objective, ds.spacing).terms.total
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    n_params = sum(p.numel() for p in net.parameters())
    return {"config": config, "seconds_per_step_median": statistics.median(times[2:]), "parameters": n_params, "peak_rss_mb": rss_mb(),
            "grid": list(ds.shape), "threads": torch.get_num_threads()}


def _run_child(args: list[str]) -> dict:
    return json.loads(run_python(["-m", "benchmarks.learned_solver", "--child", *args], cwd=str(ROOT)).strip().splitlines()[-1])


def _mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def to_markdown(res: dict) -> str:
    env = res["environment"]
    out = ["# Learned solver vs instance optimization (bundled test split)", "",
           f"Machine: {env['machine']}, {env['threads']} torch threads, torch {env['torch']}, Python {env['python']}, "
           f"no GPU. Weights: `{env['weights']}`. Generated by `python -m benchmarks.learned_solver`.", ""]
    groups = sorted({(row.get("kind", "atlas"), row["resolution_mm"]) for row in res["pairs"]}, key=lambda g: (g[0] != "atlas", -g[1]))
    sections = []
    for kind, r in groups:
        what = "atlas (vxm, real T1) ← test subject" if kind == "atlas" else "test subject ← next test subject (no atlas)"
        sections.append((f"{r} mm, {what}", [row for row in res["pairs"] if row["resolution_mm"] == r and row.get("kind", "atlas") == kind], True))
    for r in sorted({r for _, r in groups}, reverse=True):
        if len({k for k, rr in groups if rr == r}) > 1:  # both kinds at this grid: their pooled summary
            sections.append((f"{r} mm, all test pairs (atlas and subject-to-subject)",
                              [row for row in res["pairs"] if row["resolution_mm"] == r], False))
    for title, rows, per_pair in sections:
        inst = [row for row in rows if row["solver"] == "instance"]
        t_inst = statistics.mean(row["seconds"] for row in inst) if inst else float("nan")
        d_inst = statistics.mean(row["dice_after"] for row in inst) if inst else float("nan")
        out += [f"## {title}: mean over {len(inst) or len(rows)} pairs", "",
                "| solver | Dice before | Dice after (± sd) | Δ vs instance | HD95 mm | %\\|J\\|≤0 | SDlogJ | λ sd (brain) | seconds | time / instance | peak RSS MB |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in SOLVERS:
            sr = [row for row in rows if row["solver"] == s]
            if not sr:
                continue
            dm, dsd = _mean_sd([x["dice_after"] for x in sr])
            sec = statistics.mean(x["seconds"] for x in sr)
            out.append(f"| {s} | {statistics.mean(x['dice_before'] for x in sr):.3f} | {dm:.3f} ± {dsd:.3f} | {dm - d_inst:+.3f} | "
                       f"{statistics.mean(x['hd95_mm'] for x in sr):.2f} | {max(x['folding_percent'] for x in sr):.4f} (max) | "
                       f"{statistics.mean(x['sdlogj'] for x in sr):.3f} | {statistics.mean(x['lambda_std'] for x in sr):.3f} | "
                       f"{sec:.2f} | {sec / t_inst:.3f} | {max(x['peak_rss_mb'] for x in sr):.0f} |")
        if per_pair:
            out += ["", "Per pair (Dice after / SDlogJ / seconds):", "", "| pair | " + " | ".join(SOLVERS) + " |",
                    "|---|" + "---|" * len(SOLVERS)]
            for pair in sorted({row["pair"] for row in rows}):
                cells = []
                for s in SOLVERS:
                    x = next((row for row in rows if row["pair"] == pair and row["solver"] == s), None)
                    cells.append(f"{x['dice_after']:.3f} / {x['sdlogj']:.3f} / {x['seconds']:.1f}" if x else "–")
                out.append(f"| {pair} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## Inference (one network pass, integration, warp; demo pair)", "",
            "| input grid | median seconds | first call | peak RSS MB (process) |", "|---|---|---|---|"]
    for x in res["inference"]:
        out.append(f"| {x['resolution_mm']} mm | {x['seconds_median']:.3f} | {x['seconds_first']:.3f} | {x['peak_rss_mb']:.0f} |")
    out += ["", "## Training", "",
            "One training step (batch 1, 2 mm images) of each stage of the shipped weights:", "",
            "| config | grid | parameters | median seconds per step | peak RSS MB |", "|---|---|---|---|---|"]
    for t in res["train_step"]:
        out.append(f"| `configs/{t['config']}` | {'x'.join(map(str, t['grid']))} | {t['parameters']:,} | "
                   f"{t['seconds_per_step_median']:.3f} | {t['peak_rss_mb']:.0f} |")
    out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/learned_solver.md")
    p.add_argument("--pairs", nargs="+", help="moving subjects (default: the test split)")
    p.add_argument("--one-mm", action="store_true", help="also register every test pair at 1 mm")
    p.add_argument("--subject-pairs", action="store_true",
                   help="also register consecutive test subjects to each other (no atlas; 2 mm)")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, *rest = a.child
        if kind == "register":
            r = child_register(rest[0], rest[1], rest[2], int(rest[3]))
        elif kind == "inference":
            r = child_inference(int(rest[0]), a.repeats)
        else:
            r = child_train_step(rest[0], a.repeats)
        print(json.dumps(r))
        return 0
    from hybridreg import data
    from hybridreg.config import atomic_write_text
    from learned.solver import DEFAULT_WEIGHTS

    movers = a.pairs or data.list_subjects("test")
    res = {"environment": {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version(),
                           "weights": str(DEFAULT_WEIGHTS.relative_to(ROOT))},
           "pairs": [], "inference": [], "train_step": []}
    atlas = data.demo_pair()[0]
    jobs = [(atlas, mv, r) for r in ([2, 1] if a.one_mm else [2]) for mv in movers]
    if a.subject_pairs:
        jobs += [(movers[i], movers[i + 1], 2) for i in range(len(movers) - 1)]
    for fid, mv, r in jobs:
        for s in a.solvers:
            row = _run_child(["register", s, fid, mv, str(r)])
            row["kind"] = "atlas" if fid == atlas else "subject"
            print(json.dumps(row), flush=True)
            res["pairs"].append(row)
    for r in (2, 1):
        res["inference"].append(_run_child(["inference", str(r)] + ["--repeats", str(a.repeats)]))
        print(json.dumps(res["inference"][-1]), flush=True)
    for name in TRAIN_CONFIGS:
        res["train_step"].append(_run_child(["train_step", name, "--repeats", str(a.repeats)]))
        print(json.dumps(res["train_step"][-1]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=2))
    atomic_write_text(out, to_markdown(res))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
