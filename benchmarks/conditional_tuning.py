"""Test-time tuning of the conditional network (issue 18, method §3.2-3.3): each trial is forward
passes of one network over the bundled validation pairs (2 mm, plus one SynthMorph-contrast copy
of each), so a search costs minutes instead of a training run per trial.

Parts, each resumable (the tuning runs keep their ``trials.json``; the sweeps are cached in
``results.json``):

1. **Uniform sweep**: the network conditioned on one λ for every region (Λ ≡ c, c in
   :data:`UNIFORM_LAMBDAS`), and on its λ head (voxelwise), at ``w_reg`` 4: the best uniform
   setting ``c*`` (highest validation Dice under the folding bound).
2. **Region weights**: ``configs/tune_conditional_regions.yaml`` (30 structures, log λ in
   [0.05, 1]) with ``region_default = c*`` and the bound SDlogJ ≤ SDlogJ(c*): a tuned setting
   must beat the best uniform one at lower-or-equal SDlogJ. TuRBO, BoTorch (one GP on the
   whole cube) and random search, ``--trials`` each, seed 0; best-so-far curves; the best
   setting of each and ``c*`` re-scored on the **test** pairs; the TuRBO setting written to
   ``region_lambda.yaml`` (the suite's ``learned-conditional-regions``).
3. **Code front**: ``configs/tune_conditional.yaml`` (w_reg, hyperprior strength; Pareto mode)
   and, next to it, instance optimization at w_reg 2, 4, 8 on the same pairs.

Usage::

    python -m benchmarks conditional-tuning [--trials 40] [--skip pareto instance] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import RESULTS as ALL_RESULTS
from benchmarks.common import ROOT, environment, environment_markdown, save_figure, shown
from benchmarks.tuning_comparison import comparison_figure, run_or_resume
from hybridreg.config import atomic_write_text
from hybridreg.tuning import (Parameter, SearchSpace, best_so_far, best_trial, load_space, pareto_front, solver_objective)

RESULTS = ALL_RESULTS / "conditional"
UNIFORM_LAMBDAS = (0.1, 0.2, 0.35, 0.5, 0.7, 1.0)
REGION_METHODS = ("turbo", "botorch", "random")


def _uniform_space(base: SearchSpace, c: float | None) -> SearchSpace:
    """``base`` evaluated with Λ ≡ ``c`` in every region (``None``: the λ head's voxelwise λ)."""
    region = {"region_lambda": {0: c}, "region_default": c} if c is not None else {"region_lambda": {}}
    return replace(base, parameters=(Parameter("objective.w_reg", 1.0, 16.0, log=True),),
                   base_config={**base.base_config, **region})


def _scored(space: SearchSpace, params: dict, split: str) -> dict:
    t0 = time.perf_counter()
    r = solver_objective(space, params, split=split)
    return {**r, "seconds": time.perf_counter() - t0}


def uniform_sweep(base: SearchSpace, cache: dict, split: str = "val") -> dict:
    """Validation (or test) scores of Λ ≡ c for every c and of the voxelwise head, cached."""
    out = cache.setdefault(f"uniform_{split}", {})
    for c in (None, *UNIFORM_LAMBDAS):
        key = "voxelwise" if c is None else f"{c:g}"
        if key not in out:
            print(f"uniform sweep ({split}): {key}", flush=True)
            out[key] = _scored(_uniform_space(base, c), {"objective.w_reg": 4.0}, split)
    return out


def best_uniform(sweep: dict, space: SearchSpace) -> tuple[float, dict]:
    ok = {k: v for k, v in sweep.items() if k != "voxelwise" and v["folding"] <= space.folding_max}
    k = max(ok, key=lambda k: ok[k]["dice"])
    return float(k), ok[k]


def _pareto_figure(front: list[dict], trials: list[dict], instance: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    ax = (fig := Figure(figsize=(6, 4))).subplots()
    done = [t for t in trials if t["status"] == "done"]
    ax.plot([t["sdlogj"] for t in done], [t["dice"] for t in done], ".", color="0.6", label="conditional network: trials")
    ax.plot([t["sdlogj"] for t in front], [t["dice"] for t in front], "o-", color="C0", label="conditional network: Pareto front")
    pts = sorted(instance.values(), key=lambda r: r["sdlogj"])
    ax.plot([r["sdlogj"] for r in pts], [r["dice"] for r in pts], "s-", color="C1", label="instance optimization, w_reg 8/4/2")
    ax.set(xlabel="mean SDlogJ", ylabel="mean validation Dice", title="One conditional network vs instance optimization")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=40, help="trials per region-weight tuner")
    p.add_argument("--pareto-trials", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=list(REGION_METHODS), choices=REGION_METHODS)
    p.add_argument("--skip", nargs="*", default=[], choices=["regions", "test", "pareto", "instance"])
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache_path = RESULTS / "results.json"
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    skip = set(a.skip) | ({"regions", "test", "pareto", "instance"} if a.report_only else set())
    save = lambda: atomic_write_text(cache_path, json.dumps(cache, indent=2))  # noqa: E731

    base = load_space(ROOT / "configs" / "tune_conditional_regions.yaml")
    if not a.report_only:
        uniform_sweep(base, cache)
        save()
    c_star, u_best = best_uniform(cache["uniform_val"], base)
    space = replace(base, base_config={**base.base_config, "region_default": c_star}, sdlogj_max=round(u_best["sdlogj"], 6))
    runs = {}
    for method in a.methods:
        d = RESULTS / f"regions_{method}_seed0"
        if "regions" not in skip:
            print(f"region weights: {method}", flush=True)
            t0 = time.perf_counter()
            run_or_resume(space, a.trials, d, method)
            cache.setdefault("minutes", {})[method] = (time.perf_counter() - t0) / 60
            save()
        if (d / "trials.json").is_file():
            runs[method] = json.loads((d / "trials.json").read_text(encoding="utf-8"))["trials"]
    if runs:
        comparison_figure({m: [best_so_far(t, space)] for m, t in runs.items()}, RESULTS / "best_so_far.png", 10,
                          "Region weights of the conditional network (30 structures)")
    tests = cache.setdefault("test", {})
    if "test" not in skip:
        if "uniform" not in tests:
            tests["uniform"] = _scored(_uniform_space(base, c_star), {"objective.w_reg": 4.0}, "test")
        if "voxelwise" not in tests:
            tests["voxelwise"] = _scored(_uniform_space(base, None), {"objective.w_reg": 4.0}, "test")
        for method, trials in runs.items():
            b = best_trial(trials, space)
            if b is not None and tests.get(method, {}).get("id") != b["id"]:
                print(f"test split: {method} trial {b['id']}", flush=True)
                tests[method] = {"id": b["id"], **_scored(space, b["params"], "test")}
        save()
    best_turbo = best_trial(runs["turbo"], space) if "turbo" in runs else None
    if best_turbo is not None:
        from hybridreg.tuning import apply_params

        best = apply_params(space, best_turbo["params"])
        atomic_write_text(RESULTS / "region_lambda.yaml", f"default: {best.region_default:.6g}\n"
                          + "".join(f"{k}: {v:.6g}\n" for k, v in sorted(best.region_lambda.items())))

    pspace = load_space(ROOT / "configs" / "tune_conditional.yaml")
    pdir = RESULTS / "code_pareto_seed0"
    if "pareto" not in skip:
        t0 = time.perf_counter()
        run_or_resume(pspace, a.pareto_trials, pdir, "botorch")
        cache.setdefault("minutes", {})["pareto"] = (time.perf_counter() - t0) / 60
        save()
    inst = cache.setdefault("instance_val", {})
    if "instance" not in skip:
        ispace = replace(pspace, solver="instance", mode="single", base_config={})
        for w in (2.0, 4.0, 8.0):
            if f"{w:g}" not in inst:
                print(f"instance optimization at w_reg {w:g} on the validation pairs", flush=True)
                inst[f"{w:g}"] = _scored(ispace, {"objective.w_reg": w, "objective.hyper_strength": 0.175}, "val")
                save()
    ptrials = json.loads((pdir / "trials.json").read_text(encoding="utf-8"))["trials"] if (pdir / "trials.json").is_file() else []
    front = pareto_front(ptrials, pspace) if ptrials else []
    if front and inst:
        _pareto_figure(front, ptrials, inst, RESULTS / "pareto.png")
    if not a.report_only or "environment" not in cache:
        cache["environment"] = environment()
    save()
    atomic_write_text(RESULTS / "report.md", report(cache, space, c_star, runs, ptrials, front, inst))
    print(f"wrote {shown(RESULTS / 'report.md')}")
    return 0


def _row(name: str, r: dict) -> str:
    return f"| {name} | {r['dice']:.4f} | {r['sdlogj']:.3f} | {r['folding']:.4f} | {r['seconds']:.0f} |"


def report(cache: dict, space: SearchSpace, c_star: float, runs: dict, ptrials: list, front: list, inst: dict) -> str:
    lines = ["# Test-time tuning of the conditional network", "",
             "`python -m benchmarks conditional-tuning` (`benchmarks/conditional_tuning.py`). One network "
             "(`learned/weights/conditional/`), every trial a forward pass per pair: the bundled validation pairs "
             "(vxm ← synthseg_13..15, 2 mm) and one SynthMorph-contrast copy of each; test: the test pairs and copies.", "",
             environment_markdown(cache.get("environment")), "",
             "## One λ for every region (the network's uniform settings), w_reg 4", "",
             "| Λ | validation Dice | SDlogJ | %\\|J\\|≤0 (max) | seconds |", "|---|---|---|---|---|"]
    lines += [_row(k, v) for k, v in cache.get("uniform_val", {}).items()]
    lines += ["", f"Best uniform setting: Λ ≡ {c_star:g}; the region search keeps it for every other label and bounds "
                  f"SDlogJ by its {space.sdlogj_max:.3f}.", ""]
    if runs:
        n = max(len(t) for t in runs.values())
        feasible = ", ".join(f"{m} {sum(t['status'] == 'done' and space.feasible(t) for t in tr)}" for m, tr in runs.items())
        lines += [f"## Region weights: {len(space.parameters)} structures, {n} trials per tuner (seed 0)", "",
                  f"Feasible trials (folding ≤ {space.folding_max:g} %, SDlogJ ≤ {space.sdlogj_max:.3f}): {feasible}.", "",
                  "| tuner | best feasible validation Dice | SDlogJ | at trial | minutes | trials / minute | test Dice | test SDlogJ |",
                  "|---|---|---|---|---|---|---|---|"]
        u = cache.get("uniform_val", {}).get(f"{c_star:g}")
        tests = cache.get("test", {})
        for m, trials in runs.items():
            b = best_trial(trials, space)
            mins = cache.get("minutes", {}).get(m) or sum(t.get("seconds", 0) for t in trials) / 60
            t = tests.get(m)
            lines.append(f"| {m} | {b['dice']:.4f} | {b['sdlogj']:.3f} | {b['id'] + 1} | {mins:.1f} | {len(trials) / mins:.1f} | "
                         + (f"{t['dice']:.4f} | {t['sdlogj']:.3f} |" if t else "– | – |") if b else f"| {m} | none feasible | | | | | | |")
        if u and "uniform" in tests:
            lines.append(f"| uniform Λ ≡ {c_star:g} (no search) | {u['dice']:.4f} | {u['sdlogj']:.3f} | – | – | – | "
                         f"{tests['uniform']['dice']:.4f} | {tests['uniform']['sdlogj']:.3f} |")
        if "voxelwise" in tests:
            v = cache["uniform_val"]["voxelwise"]
            lines.append(f"| λ head (voxelwise, no search) | {v['dice']:.4f} | {v['sdlogj']:.3f} | – | – | – | "
                         f"{tests['voxelwise']['dice']:.4f} | {tests['voxelwise']['sdlogj']:.3f} |")
        lines += ["", "![best so far](best_so_far.png)", ""]
        if u and "uniform" in tests:
            verdicts = []
            for m in runs:
                b, t = best_trial(runs[m], space), tests.get(m)
                if b is None or t is None:
                    continue
                dv, dt = b["dice"] - u["dice"], t["dice"] - tests["uniform"]["dice"]
                holds = dt > 0 and t["sdlogj"] <= tests["uniform"]["sdlogj"] + 1e-9
                verdicts.append(f"- {m}: validation {dv:+.4f} Dice at SDlogJ {b['sdlogj']:.3f} ≤ {u['sdlogj']:.3f}; "
                                f"test {dt:+.4f} Dice at SDlogJ {t['sdlogj']:.3f} vs {tests['uniform']['sdlogj']:.3f} "
                                f"({'the gain holds' if holds else 'the gain does not hold'} on the test pairs).")
            lines += ["Against the best uniform setting of the same network:", ""] + verdicts + [""]
    if ptrials:
        lines += ["## The code (w_reg, hyperprior strength): Pareto front", "",
                  f"{sum(t['status'] == 'done' for t in ptrials)} trials, "
                  f"{cache.get('minutes', {}).get('pareto', float('nan')):.1f} minutes.", "",
                  "| w_reg | hyper_strength | validation Dice | SDlogJ | %\\|J\\|≤0 |", "|---|---|---|---|---|"]
        lines += [f"| {t['params']['objective.w_reg']:.2f} | {t['params']['objective.hyper_strength']:.3f} | {t['dice']:.4f} | "
                  f"{t['sdlogj']:.3f} | {t['folding']:.4f} |" for t in front]
        if inst:
            lines += ["", "Instance optimization (defaults, hyper_strength 0.175) on the same pairs:", "",
                      "| w_reg | validation Dice | SDlogJ | %\\|J\\|≤0 (max) | seconds |", "|---|---|---|---|---|"]
            lines += [_row(k, v) for k, v in inst.items()]
            lines += ["", "![Pareto](pareto.png)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
