"""A run's outputs: ``best_config.yaml``, ``pareto.json``, ``summary.json`` and figures (matplotlib's
object-oriented API, no pyplot), every file written through :func:`hybridreg.config.atomic_output`."""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import atomic_output, dump_yaml, json_safe, write_json
from .loop import TuningResult, best_so_far, fit_gp, pareto_front
from .space import SearchSpace, apply_params


def partial_dependence(space: SearchSpace, trials: list[dict], n: int = 41) -> dict[str, tuple[list, list, list]]:
    """GP partial dependence of Dice on each parameter: a ``SingleTaskGP`` on the finished
    trials; for each parameter its value sweeps the range while the others take the
    observed trials' values, and the posterior mean (and sd) is averaged over them.

    Returns:
        ``{key: (values, mean, sd)}``; empty with fewer than 3 finished trials.
    """
    done = [t for t in trials if t["status"] == "done"]
    if len(done) < 3:
        return {}
    X = torch.tensor([t["x"] for t in done], dtype=torch.double)
    model = fit_gp(X, torch.tensor([[t["dice"]] for t in done], dtype=torch.double))
    grid = torch.linspace(0, 1, n, dtype=torch.double)
    out = {}
    with torch.no_grad():
        for k, p in enumerate(space.parameters):
            means, sds = [], []
            for u in grid:
                Xk = X.clone()
                Xk[:, k] = u
                post = model.posterior(Xk)
                means.append(float(post.mean.mean()))
                sds.append(float(post.variance.clamp_min(0).sqrt().mean()))
            out[p.key] = ([p.from_unit(float(u)) for u in grid], means, sds)
    return out


def tuning_figures(space: SearchSpace, trials: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """``best_so_far.png``, ``pareto.png`` (Dice against SDlogJ, feasible and infeasible
    trials, the front) and ``partial_dependence.png``."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    paths = []
    bound = f"folding ≤ {space.folding_max:g}%" + (f", SDlogJ ≤ {space.sdlogj_max:g}" if space.sdlogj_max > 0 else "")

    def save(fig, name):
        with atomic_output(out / name) as tmp:
            fig.savefig(tmp, dpi=110)
        paths.append(out / name)

    ax = Figure(figsize=(5, 3.5), layout="tight").subplots()
    bsf = best_so_far(trials, space)
    ax.plot(range(1, len(bsf) + 1), bsf, "o-", ms=3)
    ax.set(xlabel="finished trials", ylabel="best validation Dice", title=f"best so far ({bound})")
    save(ax.figure, "best_so_far.png")

    ax = Figure(figsize=(5, 3.8), layout="tight").subplots()
    done = [t for t in trials if t["status"] == "done"]
    ok = [t for t in done if space.feasible(t)]
    bad = [t for t in done if not space.feasible(t)]
    ax.scatter([t["sdlogj"] for t in ok], [t["dice"] for t in ok], s=18, label="feasible")
    if bad:
        ax.scatter([t["sdlogj"] for t in bad], [t["dice"] for t in bad], s=18, marker="x", color="C3", label=f"infeasible (not {bound})")
    front = pareto_front(trials, space)
    if front:
        ax.step([t["sdlogj"] for t in front], [t["dice"] for t in front], "k-", where="post", lw=1, label="Pareto front")
    ax.set(xlabel="SDlogJ (lower = smoother)", ylabel="mean validation Dice", title="Dice against regularity")
    ax.legend(fontsize=8)
    save(ax.figure, "pareto.png")

    pd = partial_dependence(space, trials)
    if pd:
        fig = Figure(figsize=(4 * len(pd), 3.3), layout="tight")
        axes = fig.subplots(1, len(pd), squeeze=False)
        for ax, p in zip(axes[0], space.parameters):
            xs, m, s = pd[p.key]
            m, s = np.array(m), np.array(s)
            ax.plot(xs, m)
            ax.fill_between(xs, m - s, m + s, alpha=0.2)
            ax.scatter([t["params"][p.key] for t in done], [t["dice"] for t in done], s=8, color="0.4")
            if p.log:
                ax.set_xscale("log")
            ax.set(xlabel=p.key, ylabel="Dice (GP mean)")
        fig.suptitle("GP partial dependence")
        save(fig, "partial_dependence.png")
    return paths


def write_outputs(space: SearchSpace, result: TuningResult, out_dir: str | os.PathLike) -> dict:
    """Write ``best_config.yaml`` (the solver config of the best trial; ``hybridreg
    register --config`` / ``hybridreg train --config`` accept it), ``pareto.json``,
    ``summary.json`` and the figures. All are written into a staging folder inside
    ``out_dir`` first and moved into place together at the end, so an interruption leaves
    the earlier set of files, never a mix. Returns the summary, whose ``outputs`` lists the
    files the run's folder holds (``partial_dependence.png`` needs 3 completed trials,
    ``best_config.yaml`` a feasible one) and ``infeasible`` says why no trial is feasible
    (:meth:`SearchSpace.why_infeasible`; ``None`` when one is)."""
    out = Path(out_dir)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    try:
        if result.best is not None:
            dump_yaml(apply_params(space, result.best["params"]), stage / "best_config.yaml")
        write_json(stage / "pareto.json", result.pareto)
        summary = {"finished": sum(t["status"] in ("done", "failed") for t in result.trials),
                   "failed": sum(t["status"] == "failed" for t in result.trials), "best": result.best,
                   "best_so_far": best_so_far(result.trials, space),
                   "pareto_size": len(result.pareto),
                   "infeasible": None if result.best is not None else space.why_infeasible(result.trials)}
        tuning_figures(space, result.trials, stage)
        summary["outputs"] = ["trials.json", "summary.json"] + sorted(f.name for f in stage.iterdir())
        # a run with no feasible trial yet has no best: null, never a NaN number (as metrics.json), in the
        # summary returned as in the file
        summary = json_safe(summary)
        write_json(stage / "summary.json", summary)
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary
