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

    python -m benchmarks tuning            # runs what is missing, writes the report
    python -m benchmarks tuning --comparisons full --skip test pareto   # one part
    python -m benchmarks tuning --report-only
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

from benchmarks.common import RESULTS as ALL_RESULTS
from benchmarks.common import ROOT, environment, environment_markdown, save_figure, shown
from hybridreg.config import atomic_write_text
from hybridreg.tuning import (METHODS, OBJECTIVES, SearchSpace, TuningResult, base_params, best_so_far, best_trial,
                              load_space, pareto_front, run_tuning, write_outputs)

RESULTS = ALL_RESULTS / "tuning"


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


COMPARISONS = {
    "full": Comparison(ROOT / "configs" / "tune_instance.yaml", RESULTS / "compare_full", 15, ("random", "botorch"), (8,),
                       "on the full validation objective"),
    "proxy": Comparison(ROOT / "configs" / "tune_instance_proxy.yaml", RESULTS / "compare", 20, METHODS, (8, 5),
                        "on a cheaper proxy objective, with TPE"),
}


def _load_trials(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "trials.json").read_text(encoding="utf-8"))["trials"]


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
    from matplotlib.figure import Figure

    ax = (fig := Figure(figsize=(6, 4))).subplots()
    for i, (method, runs) in enumerate(curves.items()):
        n = min(len(r) for r in runs)
        a = np.array([r[:n] for r in runs], dtype=float)
        x = np.arange(1, n + 1)
        ax.plot(x, np.nanmedian(a, axis=0), "-o", ms=3, color=f"C{i}", label=f"{method} (median of {len(runs)} seeds)")
        ax.fill_between(x, np.nanmin(a, axis=0), np.nanmax(a, axis=0), color=f"C{i}", alpha=0.15)
    ax.axvline(mark, color="0.5", lw=0.8, ls="--")
    ax.set(xlabel="finished trials", ylabel="best feasible validation Dice", title=title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


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
                curves.setdefault(name, []).append(best_so_far(tr, space)[:c.trials])
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
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    skip = set(a.skip) | ({"test", "compare", "pareto"} if a.report_only else set())

    # 1. the full-objective run, checked on the test split
    main_space, main_dir = load_space(a.main_space), Path(a.main)
    main_trials = _load_trials(main_dir)
    best = best_trial(main_trials, main_space)
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

    if not a.report_only or "environment" not in cache:  # the stamp of the machine that ran
        cache["environment"] = environment()
    atomic_write_text(cache_path, json.dumps(cache, indent=2))
    atomic_write_text(out, report(a, cache, main_space, main_trials, best, compared, pspace, pdir))
    print(f"wrote {out}")
    return 0


def comparison_section(c: Comparison, space: SearchSpace, runs: dict[str, dict[int, list[dict]]], mark: int, rel) -> list[str]:
    """The report's section of one tuner comparison: every run's best-so-far at a few trial
    counts; per tuner at ``mark`` trials the median over the seeds that reached it and whether
    that median (and every seed) is at least random search's median; and the scale of Dice
    differences between neighbouring configurations (``docs/benchmarks.md``)."""
    n = c.trials
    ticks = sorted({k for k in (5, 10, mark, n) if k <= n})
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    lines = [f"### {c.title[0].upper()}{c.title[1:]}", "", f"Objective: `{shown(c.space)}`; {len(runs)} tuner settings × "
             f"{len(seeds)} seeds × {n} trials.", "",
             "| tuner | seed | " + " | ".join(f"after {k}" for k in ticks) + " | seconds per trial (median) |",
             "|---|---|" + "---|" * (len(ticks) + 1)]
    at = {}
    for method, by_seed in runs.items():
        for seed, tr in sorted(by_seed.items()):
            tr = tr[:n]
            cv = best_so_far(tr, space)
            if len(cv) >= mark:  # seeds that have not reached the mark yet are left out of the medians
                at.setdefault(method, {})[seed] = cv[mark - 1]
            vals = [cv[k - 1] if len(cv) >= k else float("nan") for k in ticks]
            secs = statistics.median(t["seconds"] for t in tr if t["status"] == "done")
            lines.append(f"| {method} | {seed} | " + " | ".join(_fmt(v) for v in vals) + f" | {secs:.1f} |")
    lines.append("")
    if not at:
        return lines
    rmed = statistics.median(at["random"].values()) if "random" in at else None
    lines += [f"At {mark} trials (seeds that have not reached it are left out):", "",
              "| tuner | seeds | median | min | max | median ≥ random's median | every seed ≥ random's median |",
              "|---|---|---|---|---|---|---|"]
    for m, v in at.items():
        med = statistics.median(v.values())
        vs = ["–", "–"] if rmed is None or m == "random" else [_yes(med >= rmed), _yes(min(v.values()) >= rmed)]
        lines.append(f"| {m} | {', '.join(map(str, v))} | {_fmt(med)} | {_fmt(min(v.values()))} | {_fmt(max(v.values()))} | "
                     f"{vs[0]} | {vs[1]} |")
    allv = [x for v in at.values() for x in v.values()]
    wr = [b["params"]["objective.w_reg"] for by_seed in runs.values() for tr in by_seed.values()
          if (b := best_trial(tr[:n], space))]
    meds = [statistics.median(v.values()) for v in at.values()]
    near = _neighbour_differences([t for by_seed in runs.values() for tr in by_seed.values() for t in tr[:n]
                                   if t["status"] == "done"], min(allv) - 0.005)
    lines += ["", "| scale | value |", "|---|---|", f"| spread of all runs' best-so-far at {mark} trials | {max(allv) - min(allv):.4f} |",
              f"| spread of the tuners' medians at {mark} trials | {max(meds) - min(meds):.4f} |"]
    if near:
        lines.append(f"| median \\|ΔDice\\| of trials within 0.1 on the unit cube, both above {min(allv) - 0.005:.4f} "
                     f"({len(near)} pairs) | {statistics.median(near):.4f} |")
    if wr:
        lines.append(f"| w_reg of the runs' best trials | {min(wr):.2f}–{max(wr):.2f} |")
    return lines + ["", f"![tuner comparison, {c.title}]({rel(c.folder / 'best_so_far.png')})", ""]


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def report(a, cache, main_space, main_trials, best, compared, pspace, pdir) -> str:
    out_dir = Path(a.out).resolve().parent

    def rel(q) -> str:
        return os.path.relpath(Path(q).resolve(), out_dir)

    keys = [q.key for q in main_space.parameters]
    done = [t for t in main_trials if t["status"] == "done"]
    lines = ["# Hyperparameter tuning of the instance solver", "",
             "Generated by `python -m benchmarks tuning`; what runs and how to read it: `docs/benchmarks.md`.", "",
             environment_markdown(cache["environment"]), "## Tuned on the validation split, checked on the test split", "",
             f"Run `{shown(a.main)}` on `{shown(a.main_space)}`: {len(done)} trials, constraint %|J|≤0 ≤ {main_space.folding_max:g}"
             + (f", SDlogJ ≤ {main_space.sdlogj_max:g}" if main_space.sdlogj_max else "") + ", "
             f"median {statistics.median(t['seconds'] for t in done):.0f} s per trial.", "",
             "| configuration | " + " | ".join(keys) + " | val Dice | val SDlogJ | test Dice | test %\\|J\\|≤0 (max) | test SDlogJ |",
             "|---|" + "---|" * (len(keys) + 5)]
    tc = cache.get("test_check", {})
    for name in (x for x in ("default", "tuned") if x in tc):
        x = tc[name]
        lines.append(f"| {name} | " + " | ".join(f"{x['params'][k]:.3g}" for k in keys) + f" | {x['val']['dice']:.4f} | "
                     f"{x['val']['sdlogj']:.3f} | {x['test']['dice']:.4f} | {x['test']['folding']:.4f} | {x['test']['sdlogj']:.3f} |")
    md = Path(a.main)
    lines += ["", "Trials (in order):", "", "| trial | " + " | ".join(keys) + " | val Dice | %\\|J\\|≤0 (max) | SDlogJ | s |",
              "|---|" + "---|" * (len(keys) + 4)]
    lines += [f"| {t['id']} | " + " | ".join(f"{t['params'][k]:.3g}" for k in keys)
              + f" | {t['dice']:.4f} | {t['folding']:.4f} | {t['sdlogj']:.3f} | {t['seconds']:.0f} |" for t in done]
    lines += ["", f"![best so far]({rel(md / 'best_so_far.png')}) ![partial dependence]({rel(md / 'partial_dependence.png')})",
              "", f"![Dice against SDlogJ, full-objective run]({rel(md / 'pareto.png')})", ""]
    if any(runs for _, runs in compared.values()):
        lines += ["## BoTorch against random search and TPE", "", f"Seeds {', '.join(map(str, a.seeds))}; best feasible "
                  "validation Dice after the given number of finished trials.", ""]
    for k, (space, runs) in compared.items():
        if runs:
            lines += comparison_section(COMPARISONS[k], space, runs, a.mark, rel)
    if (pdir / "trials.json").is_file():
        ptr = _load_trials(pdir)
        front = pareto_front(ptr, pspace)
        lines += ["## Pareto front: Dice against SDlogJ", "",
                  f"Run `{shown(pdir)}` on `{shown(a.pareto_space)}`: {sum(t['status'] == 'done' for t in ptr)} trials, "
                  f"{len(front)} on the front.", "",
                  "| " + " | ".join(keys) + " | val Dice | SDlogJ | %\\|J\\|≤0 (max) |", "|" + "---|" * (len(keys) + 3)]
        lines += ["| " + " | ".join(f"{t['params'][k]:.3g}" for k in keys) + f" | {t['dice']:.4f} | {t['sdlogj']:.3f} | "
                  f"{t['folding']:.4f} |" for t in front]
        lines += ["", f"![Pareto front]({rel(pdir / 'pareto.png')})", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
