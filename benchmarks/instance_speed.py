"""Speed and memory of the real instance solver on the bundled demo pair.

For each resolution (2 mm, 1 mm), in a fresh process (so that the peak RSS belongs to that
resolution alone): the default schedule once (wall seconds per pyramid level and per
iteration, from the solver's own history), SimpleITK diffeomorphic demons with the suite's
settings on the same pair right after it (the time ratio instance / demons, measured within
one process so that a busy machine slows both alike), then every level alone under
:mod:`torch.profiler` (:func:`profile_level`), with voxelwise λ and with the uniform-λ
baseline. What the numbers mean: ``docs/benchmarks.md``.

Usage::

    python -m benchmarks instance-speed --out benchmarks/results/instance_speed.md
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import environment, environment_markdown, rss_mb, run_child, warm_up_torch
from hybridreg.config import atomic_write_text

NOT_STEPS = ("total", "shape", "control", "ops")


def profile_level(fixed, moving, spacing, config, level: int, repeats: int) -> dict:
    """Profile ``repeats`` iterations of the instance solver on pyramid level ``level`` of
    ``config`` alone (starting from zero velocity: the cost does not depend on it).

    The solver (``get_solver("instance")``, unchanged) runs ``repeats + 1`` iterations under
    :func:`torch.profiler.profile` (CPU). Only the events between the end of the first
    optimizer step and the end of the last are counted: set-up, the warm-up iteration and the
    final evaluation are left out. Returns seconds per iteration: ``total`` (wall), its
    top-level ``steps`` -- every range the code opens (named ``evaluate.*``), the other
    ``forward`` operators (energy, preconditioner, λ transform), ``backward``, ``optimizer``
    (Adam's step and zero_grad), ``other`` (Python between operators) -- and ``ops``, the
    eight operators with the most self CPU time, ``[[name, seconds], ...]``.
    """
    from torch.profiler import profile

    from hybridreg.solvers import get_solver

    one = replace(config, level_spacing=(config.level_spacing[level],), control_factor=(config.control_factors()[level],),
                  iterations=(repeats + 1,), tol=0.0, progress=False)
    with profile() as prof:
        get_solver("instance").register_pair(fixed, moving, one, spacing=spacing)
    events = prof.events()
    ends = [e.time_range.end for e in events if e.name.startswith("Optimizer.step")]
    t0, t1 = min(ends), max(ends)
    inside = [e for e in events if t0 < e.time_range.start and e.time_range.end <= t1]
    total = (t1 - t0) / 1e6 / repeats
    steps, ops = {}, {}
    for e in inside:
        ops[e.name] = ops.get(e.name, 0.0) + e.self_cpu_time_total / 1e6 / repeats
        if e.cpu_parent is None:
            k = ("backward" if e.name.startswith("autograd::engine") else "optimizer" if e.name.startswith("Optimizer.")
                 else e.name if e.name.startswith("evaluate.") else "forward")
            steps[k] = steps.get(k, 0.0) + e.cpu_time_total / 1e6 / repeats
    kinds = ("forward", "backward", "optimizer")  # after the code's own ranges
    steps = {**{k: v for k, v in steps.items() if k not in kinds}, **{k: steps.get(k, 0.0) for k in kinds}}
    return {**steps, "other": total - sum(steps.values()), "total": total,
            "ops": [[k, v] for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8]]}


def run_resolution(resolution: int, repeats: int) -> dict:
    """Whole registration and every level profiled, in this process."""
    import torch

    from hybridreg import data
    from hybridreg.io import normalize_intensity
    from hybridreg.solvers import get_solver
    from instance_opt.solver import levels_run

    fs, ms = (data.load_subject(s, resolution) for s in data.demo_pair())
    f, m = (torch.from_numpy(normalize_intensity(s.image))[None, None] for s in (fs, ms))
    solver = get_solver("instance")
    cfg = replace(solver.default_config(), progress=False)
    warm_up_torch()
    res = solver.register_pair(f, m, cfg, spacing=fs.spacing)
    demons_seconds = _demons_seconds(fs, f[0, 0].numpy(), m[0, 0].numpy())
    levels = [{"spacing_mm": h.spacing[0], "shape": list(h.shape), "control": list(h.control_shape), "iterations": h.iterations,
               "seconds": h.seconds, "seconds_per_iteration": h.seconds_per_iteration} for h in res.history]
    # the levels that ran (on a 2 mm image the default's 1 mm level is skipped: its grids are the 2 mm level's)
    steps = [{"voxelwise": profile_level(f, m, fs.spacing, cfg, level, repeats),
              "uniform": profile_level(f, m, fs.spacing, replace(cfg, lambda_mode="uniform"), level, repeats)}
             for level in levels_run(tuple(f.shape[2:]), fs.spacing, cfg)]
    return {"resolution_mm": resolution, "image_shape": list(fs.image.shape), "registration_seconds": res.seconds,
            "demons_seconds": demons_seconds,
            "levels": levels, "steps": steps, "peak_rss_mb": rss_mb(), "threads": torch.get_num_threads()}


def _demons_seconds(subject, fixed: np.ndarray, moving: np.ndarray) -> float:
    """Seconds of the suite's SimpleITK demons (:data:`benchmarks.methods.METHODS`) on the
    normalised images ``fixed`` and ``moving`` on ``subject``'s grid."""
    from benchmarks.methods import METHODS, Pair
    from hybridreg.data.sources import Volume
    from hybridreg.io import read_image

    pair = Pair("demo", "atlas", Volume("fixed", fixed), Volume("moving", moving), tuple(subject.spacing),
                read_image(subject.image_path, arg="FIXED")[1])
    return METHODS["sitk-demons"].run(pair, None).seconds


def _grid(shape) -> str:
    return "×".join(map(str, shape))


def to_markdown(results) -> str:
    """The report: numbers only (``{"environment", "resolutions"}``, or the list of
    resolutions that earlier versions wrote)."""
    results = {"environment": None, "resolutions": results} if isinstance(results, list) else results
    lines = ["# Instance optimization: speed and memory", "", environment_markdown(results["environment"])]
    for r in results["resolutions"]:
        lines += [f"## {r['resolution_mm']} mm ({_grid(r['image_shape'])})", "",
                  f"Whole registration: **{r['registration_seconds']:.1f} s**, peak RSS **{r['peak_rss_mb']:.0f} MB**."
                  + (f" SimpleITK demons (the suite's settings) on the same pair in the same process: {r['demons_seconds']:.1f} s;"
                     f" instance / demons **{r['registration_seconds'] / r['demons_seconds']:.2f}**." if r.get("demons_seconds") else ""), "",
                  "| level | grid | control grid | iterations | level s | s / iteration |", "|---|---|---|---|---|---|"]
        lines += [f"| {i + 1} ({lv['spacing_mm']:g} mm) | {_grid(lv['shape'])} | {_grid(lv['control'])} | {lv['iterations']} | "
                  f"{lv['seconds']:.2f} | {lv['seconds_per_iteration']:.3f} |" for i, lv in enumerate(r["levels"])]
        names = list(dict.fromkeys(k for st in r["steps"] for k in st["voxelwise"] if k not in NOT_STEPS))
        lines += ["", "Seconds per iteration by step (share), voxelwise λ, and voxelwise / uniform-λ total:", "",
                  "| level | " + " | ".join(names) + " | total | ratio vs uniform |", "|---|" + "---|" * (len(names) + 2)]
        for i, st in enumerate(r["steps"]):
            v, u = st["voxelwise"], st["uniform"]
            cells = [f"{v[k]:.3f} ({100 * v[k] / v['total']:.0f}%)" if k in v else "–" for k in names]
            lines.append(f"| {st.get('label', i + 1)} | " + " | ".join(cells) + f" | {v['total']:.3f} | {v['total'] / u['total']:.2f} |")
        if all("ops" in st["voxelwise"] for st in r["steps"]):
            lines += ["", "Operators with the most self CPU time (seconds per iteration), voxelwise λ:", "", "| level | operators |", "|---|---|"]
            lines += [f"| {st.get('label', i + 1)} | " + ", ".join(f"`{k}` {s:.3f}" for k, s in st["voxelwise"]["ops"]) + " |"
                      for i, st in enumerate(r["steps"])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default="2,1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/instance_speed.md")
    a = p.parse_args(argv)
    results = {"environment": environment(), "resolutions": []}
    for res in (int(x) for x in a.resolutions.split(",")):
        results["resolutions"].append(run_child("benchmarks.instance_speed:run_resolution", resolution=res, repeats=a.repeats))
        print(f"{res} mm done: {results['resolutions'][-1]['registration_seconds']:.1f} s", file=sys.stderr)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    atomic_write_text(out, to_markdown(results))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
