"""The learned solver against instance optimization, its inference and its training step.

* **accuracy and regularity** -- the benchmark harness's rows of the methods
  :data:`~benchmarks.suite.SOLVERS` (``instance``, ``learned``, ``learned+refine``) on suite
  ``bundled`` (atlas ← test subject and consecutive test subjects, 2 mm) and, with
  ``--one-mm``, suite ``bundled-1mm``; missing rows are run (the suites continue where their
  ``rows.jsonl`` stops), existing ones are read;
* **inference** -- one call of the learned solver (network pass, integration, warp) on the
  demo pair at 2 mm and 1 mm, median of ``--repeats`` after one warm-up, in a fresh process;
* **training** -- seconds per step of :func:`learned.train.train` itself for each stage of
  the shipped weights (:data:`TRAIN_CONFIGS`, :func:`train_step`).

Usage::

    python -m benchmarks learned-solver --out benchmarks/results/learned_solver.md [--one-mm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, environment, environment_markdown, processor, rss_mb, run_child
from hybridreg.config import atomic_write_text

TRAIN_CONFIGS = ("learned_bundled_2mm.yaml", "learned_bundled_2mm_fullres.yaml", "learned_bundled_2mm_fullres_mixed.yaml")
"""The shipped weights' training stages (``configs/``): the half-grid network, the
fine-tuning with the full-resolution velocity stage, and the second fine-tuning."""
FIELDS = ("pair", "kind", "method", "dice_before", "dice_mean", "hd95_mean", "folding_percent", "sdlogj", "lambda_std_brain",
          "seconds", "peak_rss_mb", "cpu")
RENAMED = {"solver": "method", "dice_after": "dice_mean", "hd95_mm": "hd95_mean", "lambda_std": "lambda_std_brain",
           "seconds_per_step_median": "seconds_per_step"}
"""Field names of results written before the accuracy rows came from the harness."""


def inference(resolution: int, repeats: int) -> dict:
    import torch

    from hybridreg import data
    from hybridreg.io import normalize_intensity
    from hybridreg.solvers import get_solver

    f, m = (data.load_subject(s, resolution) for s in data.demo_pair())
    ft, mt = (torch.from_numpy(normalize_intensity(s.image))[None, None] for s in (f, m))
    solver = get_solver("learned")
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        solver.register_pair(ft, mt, solver.default_config(), spacing=f.spacing)
        times.append(time.perf_counter() - t)
    return {"resolution_mm": resolution, "seconds_median": statistics.median(times[1:]), "seconds_first": times[0],
            "peak_rss_mb": rss_mb(), "threads": torch.get_num_threads()}


def train_step(config: str, steps: int) -> dict:
    """Seconds per step of :func:`learned.train.train` on ``configs/<config>`` and the bundled
    training split: two fresh runs of 2 and ``2 + steps`` steps, the difference of their wall
    times over ``steps`` (set-up and the two first steps cancel). The runs validate and
    checkpoint only after their last step, and the λ warm-up is cut to the two first steps, so
    every timed step trains every parameter group."""
    import torch

    from hybridreg.config import load_yaml
    from hybridreg.data.sources import bundled
    from learned.train import TrainConfig, train

    cfg = load_yaml(ROOT / "configs" / config, TrainConfig)
    cfg = replace(cfg, epoch_steps=cfg.steps, checkpoint_every=cfg.steps, lambda_warmup_steps=min(cfg.lambda_warmup_steps, 2))
    ds = bundled(2)
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (2, 2 + steps):
            t = time.perf_counter()
            net = train(cfg, ds, Path(tmp) / str(n), stop_after=n, progress=False)
            seconds.append(time.perf_counter() - t)
    return {"config": config, "seconds_per_step": (seconds[1] - seconds[0]) / steps, "steps": steps,
            "parameters": sum(p.numel() for p in net.parameters()), "peak_rss_mb": rss_mb(), "grid": list(ds.shape),
            "threads": torch.get_num_threads()}


def harness_rows(suites: list[str]) -> list[dict]:
    """The :data:`FIELDS` of the suites' rows of the three solvers, running what is missing."""
    from benchmarks.suite import DATASETS, SOLVERS, SUITES, run_suite

    return [{**{k: r.get(k) for k in FIELDS}, "resolution_mm": DATASETS[SUITES[s]["dataset"]].resolution_mm}
            for s in suites for r in run_suite(s, RESULTS / s, SOLVERS)]


def _mean(rows, key):
    return statistics.mean(r[key] for r in rows) if rows else float("nan")


def _time_ratio(rows: list[dict], inst: list[dict]) -> str:
    """Mean seconds of ``rows`` over the instance solver's (``inst``), or "–" unless every row of
    both ran on one CPU (:func:`~benchmarks.common.processor`; a row without one recorded
    counts as another): seconds from two processors do not compare."""
    where = {processor(r) for r in rows + inst}
    return f"{_mean(rows, 'seconds') / _mean(inst, 'seconds'):.3f}" if len(where) == 1 and "not recorded" not in where else "–"


def to_markdown(res: dict) -> str:
    from benchmarks.report import hardware_note
    from benchmarks.suite import SOLVERS

    env = res["environment"]
    rows = [{RENAMED.get(k, k): v for k, v in r.items()} for r in res["pairs"]]
    out = ["# Learned solver vs instance optimization (bundled test split)", "", environment_markdown(env).rstrip("\n"),
           f"- Weights: `{env['weights']}`", *hardware_note(rows), "",
           "time / instance: \"–\" where the solver's rows and the instance solver's did not all run on one CPU.", ""]
    groups = sorted({(r.get("kind", "atlas"), r["resolution_mm"]) for r in rows}, key=lambda g: (g[0] != "atlas", -g[1]))
    sections = [(f"{mm} mm, {'atlas ← test subject' if kind == 'atlas' else 'test subject ← next test subject'}",
                 [r for r in rows if r["resolution_mm"] == mm and r.get("kind", "atlas") == kind], True) for kind, mm in groups]
    sections += [(f"{mm} mm, all test pairs", [r for r in rows if r["resolution_mm"] == mm], False)
                 for mm in sorted({mm for _, mm in groups}, reverse=True) if len({k for k, x in groups if x == mm}) > 1]
    for title, rs, per_pair in sections:
        inst = [r for r in rs if r["method"] == "instance"]
        d_inst = _mean(inst, "dice_mean")
        out += [f"## {title}: mean over {len(inst) or len(rs)} pairs", "",
                "| solver | Dice before | Dice after (± sd) | Δ vs instance | HD95 mm | %\\|J\\|≤0 (max) | SDlogJ | λ sd (brain) | "
                "seconds | time / instance | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in SOLVERS:
            sr = [r for r in rs if r["method"] == s]
            if sr:
                dm, dsd = _mean(sr, "dice_mean"), statistics.stdev(r["dice_mean"] for r in sr) if len(sr) > 1 else 0.0
                out.append(f"| {s} | {_mean(sr, 'dice_before'):.3f} | {dm:.3f} ± {dsd:.3f} | {dm - d_inst:+.3f} | "
                           f"{_mean(sr, 'hd95_mean'):.2f} | {max(r['folding_percent'] for r in sr):.4f} | {_mean(sr, 'sdlogj'):.3f} | "
                           f"{_mean(sr, 'lambda_std_brain'):.3f} | {_mean(sr, 'seconds'):.2f} | {_time_ratio(sr, inst)} | "
                           f"{max(r['peak_rss_mb'] for r in sr):.0f} |")
        if per_pair:
            out += ["", "Per pair (Dice after / SDlogJ / seconds):", "", "| pair | " + " | ".join(SOLVERS) + " |",
                    "|---|" + "---|" * len(SOLVERS)]
            for pair in sorted({r["pair"] for r in rs}):
                x = {r["method"]: r for r in rs if r["pair"] == pair}
                out.append(f"| {pair} | " + " | ".join(f"{x[s]['dice_mean']:.3f} / {x[s]['sdlogj']:.3f} / {x[s]['seconds']:.1f}"
                                                      if s in x else "–" for s in SOLVERS) + " |")
        out.append("")
    out += ["## Inference (one call of the learned solver, demo pair)", "",
            "| input grid | median seconds | first call | peak RSS MB (process) |", "|---|---|---|---|"]
    out += [f"| {x['resolution_mm']} mm | {x['seconds_median']:.3f} | {x['seconds_first']:.3f} | {x['peak_rss_mb']:.0f} |"
            for x in res["inference"]]
    out += ["", "## Training (one step of `learned.train.train`, batch 1, 2 mm images)", "",
            "| config | grid | parameters | seconds per step | peak RSS MB |", "|---|---|---|---|---|"]
    for t in ({RENAMED.get(k, k): v for k, v in t.items()} for t in res["train_step"]):
        out.append(f"| `configs/{t['config']}` | {'×'.join(map(str, t['grid']))} | {t['parameters']:,} | "
                   f"{t['seconds_per_step']:.3f} | {t['peak_rss_mb']:.0f} |")
    return "\n".join(out + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "learned_solver.md"))
    p.add_argument("--one-mm", action="store_true", help="also the suite bundled-1mm (every test pair at 1 mm)")
    p.add_argument("--repeats", type=int, default=5, help="timed inference calls and training steps")
    a = p.parse_args(argv)
    from learned.solver import DEFAULT_WEIGHTS

    res = {"environment": {**environment(), "weights": str(DEFAULT_WEIGHTS.relative_to(ROOT))},
           "pairs": harness_rows(["bundled"] + (["bundled-1mm"] if a.one_mm else [])), "inference": [], "train_step": []}
    for r in (2, 1):
        res["inference"].append(run_child("benchmarks.learned_solver:inference", resolution=r, repeats=a.repeats))
        print(json.dumps(res["inference"][-1]), flush=True)
    for name in TRAIN_CONFIGS:
        res["train_step"].append(run_child("benchmarks.learned_solver:train_step", config=name, steps=a.repeats))
        print(json.dumps(res["train_step"][-1]), flush=True)
    out = Path(a.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=2))
    atomic_write_text(out, to_markdown(res))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
