"""Speed and memory of instance optimization on the bundled demo pair.

For each resolution (2 mm, 1 mm) this runs, in a fresh subprocess (so that the peak RSS
belongs to that resolution alone):

* the default ``hybridreg register`` schedule once, reporting wall time per pyramid level
  and per iteration;
* for every level, ``--repeats`` timed iterations split into steps — integration (scaling
  and squaring + up-sampling), warp, LNCC, regularizer + priors, backward, Adam step —
  reporting medians, and the same for the uniform-λ baseline in the same process (ratio
  voxelwise / uniform).

Usage::

    python -m benchmarks.instance_speed --out benchmarks/results/instance_speed.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import rss_mb, run_python
from hybridreg import data
from hybridreg.config import atomic_write_text
from hybridreg.io import normalize_intensity
from hybridreg.objective import control_spacing
from hybridreg.priors import lambda_from_param
from hybridreg.regularization import diffusion_energy, reference_scale
from hybridreg.similarity import lncc
from hybridreg.spatial import gaussian_smooth, resize_field, resize_image, scaling_and_squaring, warp
from instance_opt import InstanceOptConfig, register_pair
from instance_opt.solver import level_grids

STEPS = ("integration", "warp", "lncc", "regularizer", "backward", "adam")


def _tensor(x):
    return torch.from_numpy(normalize_intensity(x))[None, None]


def time_level(f, m, spacing, cfg: InstanceOptConfig, level: int, uniform: bool, repeats: int) -> dict:
    """Median seconds of each step of one Adam iteration on pyramid level ``level``."""
    obj = cfg.objective
    shape, control, h = level_grids(f.shape[2:], spacing, cfg.level_spacing[level], cfg.control_factors()[level])
    fl, ml = resize_image(f, shape), resize_image(m, shape)
    gen = torch.Generator().manual_seed(0)
    w = (gaussian_smooth(torch.randn((1, 3) + control, generator=gen), 3.0) * 3.0).requires_grad_()
    th = torch.zeros((1, 1) + control, requires_grad=True)
    params = [w] if uniform else [w, th]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rows = {k: [] for k in STEPS}
    for it in range(repeats + 1):
        t = [time.perf_counter()]
        v = gaussian_smooth(w, cfg.velocity_smoothing) if cfg.velocity_smoothing > 0 else w
        disp_c = scaling_and_squaring(v, obj.svf_steps)
        disp = resize_field(disp_c, shape)
        t.append(time.perf_counter())
        warped = warp(ml, disp)
        t.append(time.perf_counter())
        sim = lncc(fl, warped, obj.lncc_window)
        t.append(time.perf_counter())
        lam = torch.ones((1, 1, 1, 1, 1)) if uniform else lambda_from_param(th, "beta")
        reg = obj.w_reg * reference_scale(3) * diffusion_energy(disp_c, lam, control_spacing(h, shape, control), reduction="mean")
        if not uniform:
            reg = reg - obj.hyper_strength * torch.log(lam).mean()
        loss = sim + reg
        t.append(time.perf_counter())
        opt.zero_grad()
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if it > 0:  # first iteration is warm-up
            for k, name in enumerate(STEPS):
                rows[name].append(t[k + 1] - t[k])
    med = {k: statistics.median(v) for k, v in rows.items()}
    med["total"] = sum(med.values())
    med["shape"] = list(shape)
    med["control"] = list(control)
    return med


def run_resolution(resolution: int, repeats: int) -> dict:
    fid, mid = data.demo_pair()
    fs, ms = data.load_subject(fid, resolution), data.load_subject(mid, resolution)
    f, m = _tensor(fs.image), _tensor(ms.image)
    cfg = replace(InstanceOptConfig(), progress=False)
    t0 = time.perf_counter()
    res = register_pair(f, m, cfg, spacing=fs.spacing)
    total = time.perf_counter() - t0
    levels = [
        {"spacing_mm": h.spacing[0], "shape": list(h.shape), "control": list(h.control_shape), "iterations": h.iterations,
         "seconds": h.seconds, "seconds_per_iteration": h.seconds_per_iteration}
        for h in res.history
    ]
    steps = []
    for lev in range(len(cfg.level_spacing)):
        vox = time_level(f, m, fs.spacing, cfg, lev, uniform=False, repeats=repeats)
        uni = time_level(f, m, fs.spacing, cfg, lev, uniform=True, repeats=repeats)
        steps.append({"voxelwise": vox, "uniform": uni})
    if resolution == 1:
        # not in the default schedule: what a full-resolution level would cost (velocity on
        # the 2 mm control grid, image match at 1 mm)
        extra = replace(cfg, level_spacing=(1.0,), iterations=(1,), control_factor=(2,))
        steps.append({"label": "1 mm level, control 2 mm (optional)",
                      "voxelwise": time_level(f, m, fs.spacing, extra, 0, uniform=False, repeats=max(2, repeats // 2)),
                      "uniform": time_level(f, m, fs.spacing, extra, 0, uniform=True, repeats=max(2, repeats // 2))})
    return {
        "resolution_mm": resolution,
        "image_shape": list(fs.image.shape),
        "registration_seconds": total,
        "levels": levels,
        "steps": steps,
        "peak_rss_mb": rss_mb(),
        "threads": torch.get_num_threads(),
    }


def to_markdown(results: list[dict]) -> str:
    lines = ["# Instance optimization: speed and memory", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, Python {platform.python_version()}. Default `InstanceOptConfig`, bundled demo pair. "
             "Per-iteration numbers are medians over the repeats (first iteration discarded).", ""]
    for r in results:
        lines += [f"## {r['resolution_mm']} mm ({'×'.join(map(str, r['image_shape']))})", "",
                  f"Whole registration: **{r['registration_seconds']:.1f} s**, peak RSS **{r['peak_rss_mb']:.0f} MB**.", "",
                  "| level | grid | control grid | iterations | level s | s / iteration |", "|---|---|---|---|---|---|"]
        for i, lv in enumerate(r["levels"]):
            lines.append(f"| {i + 1} ({lv['spacing_mm']:g} mm) | {'×'.join(map(str, lv['shape']))} | {'×'.join(map(str, lv['control']))} | "
                         f"{lv['iterations']} | {lv['seconds']:.2f} | {lv['seconds_per_iteration']:.3f} |")
        lines += ["", "Median seconds per iteration by step (share of the iteration), voxelwise λ; last column: "
                  "voxelwise / uniform-λ baseline total, measured in the same process.", "",
                  "| level | " + " | ".join(STEPS) + " | total | ratio vs uniform |", "|---|" + "---|" * (len(STEPS) + 2)]
        for i, st in enumerate(r["steps"]):
            v, u = st["voxelwise"], st["uniform"]
            cells = [f"{v[k]:.3f} ({100 * v[k] / v['total']:.0f}%)" for k in STEPS]
            lines.append(f"| {st.get('label', i + 1)} | " + " | ".join(cells) + f" | {v['total']:.3f} | {v['total'] / u['total']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default="2,1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/instance_speed.md")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(run_resolution(a.child, a.repeats)))
        return 0
    results = []
    for res in (int(x) for x in a.resolutions.split(",")):
        out = run_python(["-m", "benchmarks.instance_speed", "--child", str(res), "--repeats", str(a.repeats)])
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{res} mm done: {results[-1]['registration_seconds']:.1f} s", file=sys.stderr)
    md = to_markdown(results)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, md)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
