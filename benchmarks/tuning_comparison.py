"""Hyperparameter tuning of the instance solver: BoTorch against random search and
Optuna's TPE, the tuned configuration on the test split, and the Dice/SDlogJ Pareto front.

Three parts, each resumable (every tuning run keeps its ``trials.json``):

1. **The full-objective run** (``--main``, made by ``hybridreg tune --solver instance
   --space configs/tune_instance.yaml --trials 30``): its best feasible configuration and
   the default configuration are both registered on the bundled **test** pairs, which the
   tuner never saw (cached in the JSON next to the report).
2. **Tuner comparisons** (:data:`COMPARISONS`), seeds 0, 1, 2, the best feasible validation
   Dice after each trial:

   - ``full``: BoTorch against random search on the objective of
     ``configs/tune_instance.yaml`` itself (every validation pair, about 2 min per trial),
     15 trials each; BoTorch seed 0 is the first 15 trials of the full-objective run.
   - ``proxy``: BoTorch (8 and 5 Sobol points), random search and TPE on the cheaper
     objective of ``configs/tune_instance_proxy.yaml``, 20 trials each.
3. **Pareto run**: ``configs/tune_instance_pareto.yaml`` (qLogNEHVI on Dice against
   SDlogJ); the front and its plot.

Usage::

    python -m benchmarks.tuning_comparison            # runs what is missing, writes the report
    python -m benchmarks.tuning_comparison --comparisons full --skip test pareto   # one part
    python -m benchmarks.tuning_comparison --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.common import environment, environment_markdown
from hybridreg.config import atomic_output, atomic_write_text
from hybridreg.tuning import (METHODS, OBJECTIVES, SearchSpace, TuningResult, base_params, best_so_far, best_trial,
                              load_space, pareto_front, run_tuning, write_outputs)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tuning"


@dataclass(frozen=True)
class Comparison:
    """One tuner comparison: every method (and BoTorch Sobol-design size) × seed on one
    search space, ``trials`` trials each, runs kept in ``folder/<method>[_sobol<n>]_seed<s>``."""

    space: Path
    folder: Path
    trials: int
    methods: tuple[str, ...]
    botorch_initial: tuple[int, ...]
    title: str
    objective: str  # the objective, described for the report


COMPARISONS = {
    "full": Comparison(
        ROOT / "configs" / "tune_instance.yaml", RESULTS / "compare_full", 15, ("random", "botorch"), (8,),
        "on the full validation objective",
        "`configs/tune_instance.yaml` itself: every trial registers the 3 validation pairs at 2 mm with the default "
        "schedule (about 2 minutes). BoTorch seed 0 is the first 15 trials of the run above."),
    "proxy": Comparison(
        ROOT / "configs" / "tune_instance_proxy.yaml", RESULTS / "compare", 20, METHODS, (8, 5),
        "on a cheaper proxy objective, with TPE",
        "`configs/tune_instance_proxy.yaml`: the same parameters, bounds and folding constraint, but each trial "
        "registers one validation pair with the velocity on the 4 mm level (about a tenth of the full objective's cost)."),
}


def _load_trials(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "trials.json").read_text())["trials"]


def run_or_resume(space: SearchSpace, n_trials: int, out_dir: Path, method: str, outputs: bool = True) -> TuningResult:
    """Run a tuning loop into ``out_dir``, continuing it when ``trials.json`` exists; with
    ``outputs`` also write the best config, summary and figures."""
    obj = OBJECTIVES[space.solver]
    res = run_tuning(space, obj, n_trials, out_dir, method=method, resume=(out_dir / "trials.json").is_file())
    if outputs:
        write_outputs(space, res, out_dir)
    return res


def _neighbour_differences(trials: list[dict], floor: float, radius: float = 0.1) -> list[float]:
    """|ΔDice| between trials closer than ``radius`` on the unit cube, both above ``floor``."""
    good = [t for t in trials if t["dice"] >= floor]
    out = []
    for i, a in enumerate(good):
        for b in good[i + 1:]:
            if float(np.linalg.norm(np.subtract(a["x"], b["x"]))) < radius:
                out.append(abs(a["dice"] - b["dice"]))
    return out


def comparison_figure(curves: dict[str, list[list[float]]], path: Path, mark: int,
                      title: str = "Tuners on the same objective") -> None:
    """Best-so-far validation Dice against trials: median over seeds (line) and range (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (method, runs) in enumerate(curves.items()):
        n = min(len(r) for r in runs)
        a = np.array([r[:n] for r in runs], dtype=float)
        x = np.arange(1, n + 1)
        ax.plot(x, np.nanmedian(a, axis=0), "-o", ms=3, color=f"C{i}", label=f"{method} (median of {len(runs)} seeds)")
        ax.fill_between(x, np.nanmin(a, axis=0), np.nanmax(a, axis=0), color=f"C{i}", alpha=0.15)
    ax.axvline(mark, color="0.5", lw=0.8, ls="--")
    ax.set(xlabel="finished trials", ylabel="best feasible validation Dice", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def run_comparison(c: Comparison, seeds: list[int], skip: set[str], mark: int):
    """Run (or resume) every tuner × seed of ``c`` unless ``"compare"`` is in ``skip``; return
    ``(space, runs)`` of the runs that exist (``runs[tuner][seed]`` is the trial list) and
    plot their best-so-far curves to ``c.folder/best_so_far.png``."""
    space = load_space(c.space)
    curves: dict[str, list[list[float]]] = {}
    runs: dict[str, dict[int, list[dict]]] = {}
    variants = [(m, m, space.initial_trials) for m in c.methods if m != "botorch" or space.initial_trials in c.botorch_initial]
    if "botorch" in c.methods:
        variants += [(f"botorch ({n} Sobol)", "botorch", n) for n in c.botorch_initial if n != space.initial_trials]
    for name, method, n_init in variants:
        for seed in seeds:
            tag = method if n_init == space.initial_trials else f"{method}_sobol{n_init}"
            d = c.folder / f"{tag}_seed{seed}"
            if "compare" not in skip:
                print(f"comparison {c.folder.name}: {name} seed {seed}", flush=True)
                run_or_resume(replace(space, seed=seed, initial_trials=n_init), c.trials, d, method, outputs=False)
            if (d / "trials.json").is_file():
                tr = _load_trials(d)
                runs.setdefault(name, {})[seed] = tr
                curves.setdefault(name, []).append(best_so_far(tr, space.folding_max)[:c.trials])
    if curves:
        comparison_figure(curves, c.folder / "best_so_far.png", mark, f"Tuners {c.title}")
    return space, runs


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--main", default=str(RESULTS / "instance_botorch_seed0"), help="folder of the full-objective run")
    p.add_argument("--main-space", default=str(ROOT / "configs" / "tune_instance.yaml"))
    p.add_argument("--pareto-space", default=str(ROOT / "configs" / "tune_instance_pareto.yaml"))
    p.add_argument("--comparisons", nargs="+", default=list(COMPARISONS), choices=list(COMPARISONS),
                   help="tuner comparisons to run (see COMPARISONS); the report shows every one that has runs")
    p.add_argument("--pareto-trials", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mark", type=int, default=15, help="the trial count the comparisons are read at")
    p.add_argument("--skip", nargs="*", default=[], choices=["test", "compare", "pareto"], help="parts not to run")
    p.add_argument("--report-only", action="store_true", help="only write the report from what exists")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tuning.md"))
    a = p.parse_args(argv)
    out = Path(a.out)
    cache_path = out.with_suffix(".json")
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    skip = set(a.skip) | ({"test", "compare", "pareto"} if a.report_only else set())

    # 1. the full-objective run, checked on the test split
    main_space, main_dir = load_space(a.main_space), Path(a.main)
    main_trials = _load_trials(main_dir)
    best = best_trial(main_trials, main_space.folding_max)
    if best is None:
        raise SystemExit(f"{main_dir}: no feasible finished trial")
    dflt = base_params(main_space)
    tests = cache.get("test_check", {})
    for name, params in (("default", dflt), ("tuned", best["params"])):
        key = json.dumps(params, sort_keys=True)
        if name not in tests or tests[name]["key"] != key:
            if "test" in skip:
                continue
            print(f"test split: {name} {params}", flush=True)
            val = OBJECTIVES["instance"](main_space, params, split="val") if name == "default" else best
            r = OBJECTIVES["instance"](main_space, params, split="test")
            tests[name] = {"key": key, "params": params, "test": r,
                           "val": {k: val[k] for k in ("dice", "folding", "sdlogj")}}
        cache["test_check"] = tests
        atomic_write_text(cache_path, json.dumps(cache, indent=2))

    # 2. tuner comparisons
    # (the report shows every comparison that has runs; --comparisons chooses which to run)
    compared = {k: run_comparison(c, a.seeds, skip if k in a.comparisons else skip | {"compare"}, a.mark)
                for k, c in COMPARISONS.items()}

    # 3. Pareto run
    pspace = load_space(a.pareto_space)
    pdir = RESULTS / "instance_pareto_seed0"
    if "pareto" not in skip:
        print("pareto run", flush=True)
        run_or_resume(pspace, a.pareto_trials, pdir, "botorch")

    cache["environment"] = environment()
    atomic_write_text(cache_path, json.dumps(cache, indent=2))
    atomic_write_text(out, report(a, cache, main_space, main_trials, best, compared, pspace, pdir))
    print(f"wrote {out}")
    return 0


def comparison_section(c: Comparison, space: SearchSpace, runs: dict[str, dict[int, list[dict]]], mark: int, rel) -> list[str]:
    """The report's section of one tuner comparison: best-so-far table, the issue's criterion
    (BoTorch's best-so-far after ``mark`` trials against random search's median over seeds),
    and the scale of Dice differences between neighbouring configurations."""
    n = c.trials
    ticks = sorted({k for k in (5, 10, mark, n) if k <= n})
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    lines = [f"### {c.title[0].upper()}{c.title[1:]}", "",
             f"Objective: {c.objective} {len(runs)} tuner settings × {len(seeds)} seeds × {n} trials.", "",
             "| tuner | seed | " + " | ".join(f"after {k}" for k in ticks) + " | seconds per trial (median) |",
             "|---|---|" + "---|" * (len(ticks) + 1)]
    at = {}
    for method, by_seed in runs.items():
        for seed, tr in sorted(by_seed.items()):
            tr = tr[:n]
            cv = best_so_far(tr, space.folding_max)
            if len(cv) >= mark:  # seeds that have not reached the mark yet are left out of the medians
                at.setdefault(method, {})[seed] = cv[mark - 1]
            vals = [cv[k - 1] if len(cv) >= k else float("nan") for k in ticks]
            secs = statistics.median(t["seconds"] for t in tr if t["status"] == "done")
            lines.append(f"| {method} | {seed} | " + " | ".join(_fmt(v) for v in vals) + f" | {secs:.1f} |")
    lines.append("")
    if not at:
        return lines
    unfinished = [f"{m} seed {sd}" for m, by_seed in runs.items() for sd in by_seed if sd not in at.get(m, {})]
    if unfinished:
        lines += [f"Not yet at {mark} trials (left out below): {', '.join(unfinished)}.", ""]
    lines += [f"Median over seeds after {mark} trials: "
              + ", ".join(f"{m} {_fmt(statistics.median(v.values()))} ({len(v)} seed{'s' * (len(v) > 1)})" for m, v in at.items()) + "."]
    if "random" in at:
        rmed = statistics.median(at["random"].values())
        for name in (n for n in at if n.startswith("botorch")):
            v = at[name]
            ok = all(x >= rmed for x in v.values())
            med_ok = statistics.median(v.values()) >= rmed
            lines += ["", f"**{name}**: best-so-far after {mark} trials {', '.join(_fmt(x) for x in v.values())} for seeds "
                          f"{', '.join(map(str, v))} (median {_fmt(statistics.median(v.values()))}); random "
                          f"search's median over seeds {', '.join(map(str, at['random']))} is {_fmt(rmed)}: "
                          f"BoTorch's median is {'at least' if med_ok else 'below'} it, and "
                          f"{'every' if ok else 'not every'} BoTorch seed is at least it."]
    allv = [x for v in at.values() for x in v.values()]
    if allv:
        bests = [best_trial(tr[:n], space.folding_max) for by_seed in runs.values() for tr in by_seed.values()]
        wr = [b["params"]["objective.w_reg"] for b in bests if b]
        lines += ["", f"Across all runs the best-so-far after {mark} trials lies between {min(allv):.4f} and {max(allv):.4f} "
                      f"(a spread of {max(allv) - min(allv):.4f} Dice); the runs' best trials have w_reg between {min(wr):.2f} "
                      f"and {max(wr):.2f}."]
        meds = [statistics.median(v.values()) for v in at.values()]
        gap = max(meds) - min(meds)
        near = _neighbour_differences([t for by_seed in runs.values() for tr in by_seed.values() for t in tr[:n]
                                       if t["status"] == "done"], min(allv) - 0.005)
        if near:
            lines += [f"For scale: trials of these runs that lie within 0.1 of each other on the unit cube and score above "
                      f"{min(allv) - 0.005:.4f} differ by {statistics.median(near):.4f} Dice (median over {len(near)} such "
                      f"pairs of trials); the tuners' medians after {mark} trials differ by {gap:.4f}, "
                      + (f"less than that: on this objective the tuners are not separable with {len(seeds)} seeds."
                         if gap < statistics.median(near) else "more than that.")]
    lines += ["", f"![tuner comparison, {c.title}]({rel(c.folder / 'best_so_far.png')})", ""]
    return lines


def report(a, cache, main_space, main_trials, best, compared, pspace, pdir) -> str:
    out_dir = Path(a.out).resolve().parent

    def rel(q) -> str:
        return os.path.relpath(Path(q).resolve(), out_dir)

    tau = main_space.folding_max
    keys = [q.key for q in main_space.parameters]
    lines = ["# Hyperparameter tuning of the instance solver", "",
             "Generated by `python -m benchmarks.tuning_comparison` (issue 4).", "",
             environment_markdown(cache["environment"]), ""]
    # --- full objective
    done = [t for t in main_trials if t["status"] == "done"]
    lines += ["## Tuned on the validation split, checked on the test split", "",
              f"`hybridreg tune --solver instance --space configs/tune_instance.yaml --trials 30` (BoTorch, seed 0): "
              f"{len(done)} trials, each registers every bundled validation pair "
              f"(vxm ← synthseg_13–15, 2 mm, default schedule) and scores mean Dice over the standard structures, "
              f"with at most {tau:g} % of voxels folded (%|J|≤0) as the constraint. "
              f"Median {statistics.median(t['seconds'] for t in done):.0f} s per trial (trial seconds here and below "
              "include periods when other benchmark runs shared the 2 cores).", "",
              "| configuration | " + " | ".join(keys) + " | val Dice | val SDlogJ | test Dice | test %\\|J\\|≤0 (max) | test SDlogJ |",
              "|---|" + "---|" * (len(keys) + 5)]
    tc = cache.get("test_check", {})
    for name in ("default", "tuned"):
        if name in tc:
            x = tc[name]
            lines.append(f"| {name} | " + " | ".join(f"{x['params'][k]:.3g}" for k in keys)
                         + f" | {x['val']['dice']:.4f} | {x['val']['sdlogj']:.3f} | {x['test']['dice']:.4f} | "
                         f"{x['test']['folding']:.4f} | {x['test']['sdlogj']:.3f} |")
    if "default" in tc and "tuned" in tc:
        g = tc["tuned"]["test"]["dice"] - tc["default"]["test"]["dice"]
        lines += ["", f"On the 5 test pairs the tuned configuration scores {g:+.4f} mean Dice against the default "
                      f"({'at least' if g >= 0 else 'below'} the default's). Its SDlogJ is "
                      f"{tc['tuned']['test']['sdlogj']:.3f} against {tc['default']['test']['sdlogj']:.3f}: "
                      "the Dice-only objective buys Dice with a less regular deformation, which the Pareto run below shows."]
    md = Path(a.main)
    lines += ["", "Trials (in order):", "", "| trial | " + " | ".join(keys) + " | val Dice | %\\|J\\|≤0 (max) | SDlogJ | s |",
              "|---|" + "---|" * (len(keys) + 4)]
    for t in done:
        lines.append(f"| {t['id']} | " + " | ".join(f"{t['params'][k]:.3g}" for k in keys)
                     + f" | {t['dice']:.4f} | {t['folding']:.4f} | {t['sdlogj']:.3f} | {t['seconds']:.0f} |")
    lines += ["", f"![best so far]({rel(md / 'best_so_far.png')}) ![partial dependence]({rel(md / 'partial_dependence.png')})",
              "", f"![Dice against SDlogJ, full-objective run]({rel(md / 'pareto.png')})", ""]
    # --- comparisons
    if any(runs for _, runs in compared.values()):
        lines += ["## BoTorch against random search and TPE", "",
                  "BoTorch starts from scrambled Sobol points (8 unless stated), TPE from Optuna's default 10 random "
                  "startup trials; random search draws uniformly on the unit cube (log scale for both parameters). "
                  f"Each tuner runs with seeds {', '.join(map(str, a.seeds))} and the same trial budget; the tables give the best feasible "
                  "validation Dice after the given number of finished trials.", ""]
    for k, (space, runs) in compared.items():
        if runs:
            lines += comparison_section(COMPARISONS[k], space, runs, a.mark, rel)
    # --- pareto
    if (pdir / "trials.json").is_file():
        ptr = _load_trials(pdir)
        pdone = [t for t in ptr if t["status"] == "done"]
        front = pareto_front(ptr, pspace.folding_max)
        lines += ["## Pareto front: Dice against SDlogJ", "",
                  f"`configs/tune_instance_pareto.yaml`: qLogNoisyExpectedHypervolumeImprovement on (Dice, −SDlogJ) with the "
                  f"folding constraint, {len(pdone)} trials, every validation pair, velocity on the 4 mm level. "
                  f"{len(front)} trials are on the front:", "",
                  "| " + " | ".join(keys) + " | val Dice | SDlogJ | %\\|J\\|≤0 (max) |", "|" + "---|" * (len(keys) + 3)]
        for t in front:
            lines.append("| " + " | ".join(f"{t['params'][k]:.3g}" for k in keys)
                         + f" | {t['dice']:.4f} | {t['sdlogj']:.3f} | {t['folding']:.4f} |")
        lines += ["", f"![Pareto front]({rel(pdir / 'pareto.png')})", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
