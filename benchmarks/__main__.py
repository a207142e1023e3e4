"""One entry point for hybridreg's benchmarks.

Usage::

    python -m benchmarks list                      # suites, datasets, methods (and what is missing)
    python -m benchmarks run --suite bundled       # every method on the bundled test pairs + scaling -> report
    python -m benchmarks run --suite bundled --fresh   # start over instead of continuing
    python -m benchmarks report --suite bundled    # re-render the report from the stored rows
    python -m benchmarks compare OLD/rows.jsonl --suite bundled   # does this run reproduce OLD?
    python -m benchmarks calibrate-uniform         # uniform-λ config matched to the voxelwise SDlogJ
    python -m benchmarks instance-speed | learned-solver | tuning | batched | lambda-regressor | conditional-tuning [args...]   # the focused benchmarks

``run`` writes ``benchmarks/results/<suite>/``: ``report.md``, CSV files, figures and
``rows.jsonl``; it continues an interrupted run (finished (pair, method) runs are kept), and
``run.json`` adds up the wall time of every ``run`` since the last ``--fresh``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS

FOCUSED = {"instance-speed": "benchmarks.instance_speed", "learned-solver": "benchmarks.learned_solver",
           "tuning": "benchmarks.tuning_comparison", "batched": "benchmarks.batched",
           "lambda-regressor": "benchmarks.lambda_regressor", "conditional-tuning": "benchmarks.conditional_tuning"}


def _list() -> int:
    from benchmarks.methods import METHODS, available
    from benchmarks.suite import DATASETS, SUITES

    print("suites:")
    for k, s in SUITES.items():
        print(f"  {k}: dataset {s['dataset']}, methods {', '.join(s['methods'])}{', scaling' if s['scaling'] else ''}")
    print("datasets:")
    for k, d in DATASETS.items():
        print(f"  {k}: {d.description}" + "".join(f"  [{n}]" for n in d.notes()))
    print("methods:")
    for k, m in METHODS.items():
        ok, msg = available(m)
        print(f"  {k}: {m.label}" + ("" if ok else f"  [{msg}]"))
    print("focused benchmarks: " + ", ".join(FOCUSED))
    return 0


def _render(suite: str, out: Path, scaling: list[dict], skipped: list[str], wall: float | None, stamp: bool) -> Path:
    """Write the report of ``out``'s rows; ``stamp``: this machine ran them (else keep their stamp)."""
    from benchmarks.common import environment
    from benchmarks.report import figures, markdown, paired_stats, write_csvs
    from benchmarks.suite import get_dataset, get_suite, read_rows
    from hybridreg.config import atomic_write_text

    rows = read_rows(out / "rows.jsonl")
    if not rows:
        raise SystemExit(f"{out / 'rows.jsonl'}: no finished runs to report")
    env_path = out / "environment.json"
    env = environment() if stamp or not env_path.is_file() else json.loads(env_path.read_text(encoding="utf-8"))
    atomic_write_text(env_path, json.dumps(env, indent=2))
    stats = paired_stats(rows)
    write_csvs(out, rows, stats, scaling)
    files = figures(out, rows, scaling)
    commands = [r.get("command") for r in _runs(out)]
    md = markdown(suite, get_dataset(get_suite(suite)["dataset"]).description, env, rows, stats, scaling, files, skipped, wall,
                  commands)
    rep = out / "reproducibility.md"
    if rep.is_file():  # written by `compare`: how this run matches a reference run
        body = rep.read_text(encoding="utf-8").split("\n", 1)[1]
        md = md.rstrip("\n") + "\n\n## Reproducibility: this run against a reference run\n" + body
    atomic_write_text(out / "report.md", md)
    return out / "report.md"


def _runs(out: Path) -> list[dict]:
    """The ``run`` invocations since the last ``--fresh`` (``run.json``)."""
    path = out / "run.json"
    return json.loads(path.read_text(encoding="utf-8"))["runs"] if path.is_file() else []


def _wall_minutes(out: Path, add: float | None = None, methods: list[str] | None = None,
                  command: str | None = None) -> float | None:
    """Total wall minutes of the ``run`` invocations since the last ``--fresh``
    (``run.json``), after recording one more of ``add`` minutes (and its ``command``) when given."""
    from hybridreg.config import atomic_write_text

    runs = _runs(out)
    if add is not None:
        runs.append({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "minutes": round(add, 2), "methods": methods,
                     "command": command})
        atomic_write_text(out / "run.json", json.dumps({"runs": runs}, indent=2))
    return sum(r["minutes"] for r in runs) if runs else None


def _command(a) -> str:
    """The ``python -m benchmarks run`` command line of the parsed arguments ``a`` (what the
    report says to regenerate it with)."""
    import shlex

    parts = ["--dataset", a.dataset] if a.dataset else ["--suite", a.suite]
    for flag, value in (("--out", a.out), ("--max-pairs", a.max_pairs), ("--device", None if a.device == "cpu" else a.device)):
        parts += [flag, str(value)] if value is not None else []
    for flag, values in (("--methods", a.methods), ("--pairs", a.pairs), ("--grids", a.grids)):
        parts += [flag, *values] if values else []
    parts += ["--repeats", str(a.repeats)] if a.repeats != 3 else []
    parts += ["--no-scaling"] if a.no_scaling else []
    return "python -m benchmarks run " + shlex.join(parts)


def _at_least_one(text: str) -> int:
    """An integer ≥ 1 (``--max-pairs``, ``--repeats``): 0 read as "all pairs" and a negative number cut the list
    from its end."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def _run(a) -> int:
    from benchmarks.methods import METHODS, available
    from benchmarks.scaling import GRIDS, run_scaling
    from benchmarks.suite import get_dataset, get_suite, run_suite, suite_methods
    from hybridreg.config import atomic_write_text
    from hybridreg.service import device_of

    if a.dataset:
        kind, _, rest = a.dataset.partition(":")
        path, hashmark, split = rest.partition("#")
        # absolute: each (pair, method) runs in a child process whose working directory is the repository's
        a.suite = f"{kind}:{Path(path).resolve()}{hashmark}{split}" if rest else a.dataset
    try:
        spec = get_suite(a.suite)
        device_of(a.device)  # an unusable device fails before --fresh discards anything
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if ":" in a.suite and not a.out:
        raise SystemExit("--out: a dataset given as KIND:PATH needs an output folder")
    out = Path(a.out or RESULTS / a.suite)
    t0 = time.perf_counter()
    if a.fresh:
        for name in ("rows.jsonl", "scaling.json", "run.json"):
            (out / name).unlink(missing_ok=True)
    methods = a.methods or suite_methods(a.suite)
    skipped = [msg for m in methods if m in METHODS for ok, msg in [available(METHODS[m])] if not ok]
    skipped += get_dataset(spec["dataset"]).notes()
    try:
        run_suite(a.suite, out, methods, a.max_pairs, device=a.device, pair_names=a.pairs)
    except (FileNotFoundError, ValueError) as e:  # a bad dataset or method: one line
        raise SystemExit(" ".join(str(e).split())) from None
    scaling = []
    sc_path = out / "scaling.json"
    if spec["scaling"] and not a.no_scaling:
        if sc_path.is_file():
            scaling = json.loads(sc_path.read_text(encoding="utf-8"))
        else:
            scaling = run_scaling(a.grids or GRIDS, a.repeats)
            atomic_write_text(sc_path, json.dumps(scaling, indent=2))
    wall = _wall_minutes(out, (time.perf_counter() - t0) / 60.0, methods, _command(a))
    report = _render(a.suite, out, scaling, skipped, wall, stamp=True)
    print(f"wrote {report}")
    return 0


def match_sdlogj(measure, target: float, start: float, evaluations: int, tol: float) -> list[tuple[float, float, dict]]:
    """Search the uniform λ whose SDlogJ is ``target``: secant steps on (log λ, log SDlogJ),
    which is close to linear (more λ = smoother); the first step is ±0.7 in log λ.

    ``measure(λ) -> {"sdlogj", ...}``. Returns every ``(log λ, log SDlogJ, result)`` tried;
    stops when ``|SDlogJ − target| < tol`` or after ``evaluations``.
    """
    import math

    pts = []
    x = math.log(start)
    for _ in range(evaluations):
        r = measure(math.exp(x))
        pts.append((x, math.log(r["sdlogj"]), r))
        if abs(r["sdlogj"] - target) < tol:
            break
        if len(pts) == 1:
            x += 0.7 if r["sdlogj"] > target else -0.7
        else:
            (x0, y0, _), (x1, y1, _) = pts[-2], pts[-1]
            slope = (y1 - y0) / (x1 - x0) if x1 != x0 else -0.5
            x = x1 + (math.log(target) - y1) / (slope if slope < -1e-3 else -0.5)
    return pts


def _calibrate(a) -> int:
    """Uniform λ whose mean validation SDlogJ equals the voxelwise solver's (secant on log λ)."""
    import math

    import yaml

    from hybridreg.config import atomic_write_text, to_dict
    from hybridreg.tuning import Parameter, SearchSpace, solver_objective
    from benchmarks.methods import UNIFORM_CONFIG

    vox = SearchSpace(parameters=(Parameter("lambda_init", 0.01, 10.0, log=True),))
    target = solver_objective(vox, {"lambda_init": 0.5})
    print(f"voxelwise: validation Dice {target['dice']:.4f}, SDlogJ {target['sdlogj']:.4f}", flush=True)
    uni = SearchSpace(parameters=vox.parameters, base_config={"lambda_mode": "uniform", "objective": {"hyperprior": "none"}})
    def measure(lam: float) -> dict:
        r = solver_objective(uni, {"lambda_init": lam})
        print(f"uniform λ {lam:.4f}: validation Dice {r['dice']:.4f}, SDlogJ {r['sdlogj']:.4f}", flush=True)
        return r

    pts = match_sdlogj(measure, target["sdlogj"], a.start, a.evaluations, a.tol)
    best = min(pts, key=lambda p: abs(p[2]["sdlogj"] - target["sdlogj"]))
    lam = round(math.exp(best[0]), 4)
    from hybridreg.tuning import apply_params

    cfg = apply_params(uni, {"lambda_init": lam})
    atomic_write_text(
        UNIFORM_CONFIG,
        "# Uniform-λ baseline at matched regularity (written by `python -m benchmarks calibrate-uniform`):\n"
        f"# one scalar λ = {lam} (no hyperprior) chosen so that the mean SDlogJ on the bundled validation pairs\n"
        f"# (each scored on its own images and on {vox.synth_contrasts} scan-like draw(s) from its labels, SearchSpace.synth_contrasts)\n"
        f"# ({best[2]['sdlogj']:.4f}) matches the default voxelwise solver's ({target['sdlogj']:.4f}).\n"
        f"# Validation Dice: uniform {best[2]['dice']:.4f}, voxelwise {target['dice']:.4f}.\n"
        + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(f"wrote {UNIFORM_CONFIG} (λ = {lam})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in FOCUSED:
        import importlib

        return importlib.import_module(FOCUSED[argv[0]]).main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="suites, datasets and methods")
    r = sub.add_parser("run", help="run a suite and write its report")
    r.add_argument("--suite", default="bundled")
    r.add_argument("--dataset", help="instead of --suite: the realworld suite's methods on manifest:PAIRS.csv,"
                                     " lumir:dataset.json[#SPLIT] or oasis:DIR (needs --out)")
    r.add_argument("--out", help="output folder (default benchmarks/results/<suite>)")
    r.add_argument("--methods", nargs="+", help="subset of the suite's methods")
    r.add_argument("--max-pairs", type=_at_least_one, help="only the first N pairs")
    r.add_argument("--pairs", nargs="+", metavar="FIXED<-MOVING", help="only these pairs, in this order (names as the"
                   " report's rows give them, e.g. 'vxm<-synthseg_18')")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N for hybridreg's solvers (the classical"
                   " tools run on the CPU; the report names the device of each method's rows)")
    r.add_argument("--fresh", action="store_true", help="discard stored rows and start over")
    r.add_argument("--no-scaling", action="store_true")
    r.add_argument("--grids", nargs="+", help="scaling grids: 64x64x64 or mm values")
    r.add_argument("--repeats", type=_at_least_one, default=3, help="timed iterations per scaling grid")
    rep = sub.add_parser("report", help="re-render the report from stored rows")
    rep.add_argument("--suite", default="bundled")
    rep.add_argument("--out")
    cmp = sub.add_parser("compare", help="compare this suite's rows with a reference run's rows.jsonl")
    cmp.add_argument("reference", help="the reference run's rows.jsonl (e.g. from git show)")
    cmp.add_argument("--suite", default="bundled")
    cmp.add_argument("--out", help="the re-run's folder (default benchmarks/results/<suite>)")
    c = sub.add_parser("calibrate-uniform", help="write configs/instance_uniform_matched.yaml")
    c.add_argument("--start", type=float, default=1.0, help="first uniform λ to try")
    c.add_argument("--evaluations", type=int, default=5)
    c.add_argument("--tol", type=float, default=0.005, help="|SDlogJ difference| that ends the search")
    a = p.parse_args(argv)
    if a.cmd == "list":
        return _list()
    if a.cmd == "run":
        return _run(a)
    if a.cmd == "report":
        out = Path(a.out or RESULTS / a.suite)
        sc = out / "scaling.json"
        print(f"wrote {_render(a.suite, out, json.loads(sc.read_text(encoding='utf-8')) if sc.is_file() else [], [], _wall_minutes(out), stamp=False)}")
        return 0
    if a.cmd == "compare":
        from benchmarks.compare import compare_files

        out = Path(a.out or RESULTS / a.suite)
        try:
            md = compare_files(Path(a.reference), out / "rows.jsonl", out / "reproducibility.md")
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
        print(md)
        print(f"wrote {out / 'reproducibility.md'}")
        return 0
    return _calibrate(a)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit as e:  # a refusal (SystemExit with its one-line message): exit code 2, as the hybridreg CLI's
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
