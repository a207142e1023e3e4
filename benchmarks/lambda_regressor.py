"""The λ regressor against per-pair MAP (issue 19, method §3.1; Wang & Zhang 2022's table: MAP
against network prediction, in λ and in time).

``python -m benchmarks lambda-regressor [--weights W]`` runs, per pair of the bundled test split
(2 mm, ``benchmarks/data/bundled_test_pairs_2mm.csv``) and of ``realworld`` (1 mm, when fetched),
after one affine stage shared by both:

* MAP: ``configs/instance_map.yaml`` (:func:`learned.regressor.map_config`) -- λ, registration
  seconds, Dice, SDlogJ, %|J|≤0;
* the regressor's prediction alone (resampling + one network pass) -- λ, seconds;
* ``learned-lambda`` -- registration at the predicted λ on the same energy: Dice, SDlogJ, seconds;
* with ``--compare W``, the prediction of a second regressor (a candidate) against the same MAP
  run (prediction only): MAP's λ moves by up to 21 % between runs (one torch thread against two,
  ``docs/results.md``), so two regressors are compared on one run.

It writes ``benchmarks/results/lambda_regressor.json`` and ``.md`` (``--out``): per pair λ_pred / λ_MAP
and the prediction's time as a fraction of MAP's (the issue's criteria: within 20 %, ≤ 1/50).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import RESULTS, ROOT, environment, environment_markdown
from hybridreg.config import atomic_write_text

PAIRS = ROOT / "benchmarks" / "data" / "bundled_test_pairs_2mm.csv"


def _pairs() -> list[tuple[str, str, str, str, str, str, list | str]]:
    from benchmarks.realworld import colin27_missing, realworld_pairs
    from hybridreg.batch import read_pairs

    out = [("bundled 2 mm", p.id, p.fixed, p.moving, p.fixed_labels, p.moving_labels, "auto") for p in read_pairs(PAIRS)]
    if colin27_missing() is None:
        out += [("realworld", p.name, str(p.fixed_image), str(p.moving_image), str(p.fixed_labels), str(p.moving_labels),
                 list(p.labels)) for p in realworld_pairs(warn=False)]
    return out


def _predict(net, inputs, fixed: torch.Tensor, moving: torch.Tensor, vm: torch.Tensor | None) -> float:
    """The regressor's λ for a pair read by :func:`hybridreg.service.read_inputs` (normalised
    images, MOVING on its own grid through the affine stage's voxel map ``vm``)."""
    from learned.regressor import predict_lambda

    return float(predict_lambda(net, fixed, moving, inputs.geometry.array_spacing, vm,
                                (inputs.moving_geometry or inputs.geometry).array_spacing, inputs.geometry.direction)[0])


def run(weights: str | None = None, compare: str | None = None) -> dict:
    """Every pair as the module docstring says; ``compare``: a second regressor file whose
    prediction is recorded too (``lambda_compare``), or ``None``."""
    from hybridreg import service
    from hybridreg.io import normalize_intensity
    from hybridreg.solvers import get_solver
    from learned.regressor import REGRESSOR_WEIGHTS, LearnedLambdaConfig, load_regressor, map_config

    dev = torch.device("cpu")
    net, info = load_regressor(weights or REGRESSOR_WEIGHTS)
    other = load_regressor(compare, arg="--compare")[0] if compare else None
    map_cfg = replace(map_config(), progress=False)
    ll_cfg = LearnedLambdaConfig(weights=weights, progress=False)
    rows = []
    for dataset, name, f, m, fl, ml, labels in _pairs():
        inputs = service.read_inputs(f, m, fl, ml, labels)
        pre = service.prealign(inputs)
        solved = service.solve(inputs, get_solver("instance"), map_cfg, dev, pre)
        mm = service.measure(inputs, solved, "instance", pre, with_hd95=False)
        fixed = torch.from_numpy(normalize_intensity(inputs.fixed))[None, None]
        moving = torch.from_numpy(normalize_intensity(inputs.moving))[None, None]
        vm = None if pre.voxel_map is None else torch.from_numpy(pre.voxel_map)[None].float()
        t0 = time.perf_counter()
        lam_pred = _predict(net, inputs, fixed, moving, vm)
        t_pred = time.perf_counter() - t0
        lam_other = None if other is None else _predict(other, inputs, fixed, moving, vm)
        solved_ll = service.solve(inputs, get_solver("learned-lambda"), ll_cfg, dev, pre)
        ml_ = service.measure(inputs, solved_ll, "learned-lambda", pre, with_hd95=False)
        row = {"dataset": dataset, "pair": name, "lambda_map": mm["lambda"]["mean"], "lambda_pred": lam_pred,
               "ratio": lam_pred / mm["lambda"]["mean"], "seconds_map": mm["seconds"]["registration"], "seconds_pred": t_pred,
               "time_fraction": t_pred / mm["seconds"]["registration"],
               "dice_map": mm["dice_after"]["mean"], "sdlogj_map": mm["sdlogj"], "folding_map": mm["folding_percent"],
               "dice_pred": ml_["dice_after"]["mean"], "sdlogj_pred": ml_["sdlogj"], "folding_pred": ml_["folding_percent"],
               "seconds_pred_registration": ml_["seconds"]["registration"]}
        if lam_other is not None:
            row.update(lambda_compare=lam_other, ratio_compare=lam_other / mm["lambda"]["mean"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"environment": environment(), "weights": str(weights or REGRESSOR_WEIGHTS), "weights_info": info,
            "compare": compare, "rows": rows}


def markdown(r: dict) -> str:
    lines = ["# λ regressor against per-pair MAP", "",
             "Regenerate with `python -m benchmarks lambda-regressor`. MAP: `configs/instance_map.yaml` (the instance solver",
             "estimating one global λ with the prior's log-determinant); prediction: the regressor alone (resampling +",
             "one pass); learned-lambda: registration with λ fixed at the prediction, same energy. Seconds: registration",
             "stage only (the affine stage is shared).", "",
             "| data | pair | λ MAP | λ predicted | ratio | MAP s | prediction s | fraction | Dice MAP | SDlogJ MAP | Dice pred. | SDlogJ pred. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['dataset']} | {x['pair']} | {x['lambda_map']:.3f} | {x['lambda_pred']:.3f} | {x['ratio']:.2f} | "
                     f"{x['seconds_map']:.1f} | {x['seconds_pred']:.3f} | 1/{1 / x['time_fraction']:.0f} | {x['dice_map']:.4f} | "
                     f"{x['sdlogj_map']:.3f} | {x['dice_pred']:.4f} | {x['sdlogj_pred']:.3f} |")
    lines.append("")
    for ds in sorted({x["dataset"] for x in r["rows"]}):
        xs = [x for x in r["rows"] if x["dataset"] == ds]
        within = sum(abs(x["ratio"] - 1) <= 0.2 for x in xs)
        lines.append(f"* {ds}: λ within 20 % of MAP on {within} of {len(xs)} pairs (median ratio "
                     f"{statistics.median(x['ratio'] for x in xs):.2f}); prediction time, median "
                     f"1/{statistics.median(1 / x['time_fraction'] for x in xs):.0f} of MAP's; Dice at the prediction minus "
                     f"Dice at MAP, mean {statistics.mean(x['dice_pred'] - x['dice_map'] for x in xs):+.4f}.")
        if all("ratio_compare" in x for x in xs):
            lines.append(f"  The compared regressor (`{Path(r['compare']).name}`) against the same MAP run: within 20 % on "
                         f"{sum(abs(x['ratio_compare'] - 1) <= 0.2 for x in xs)} of {len(xs)} pairs (ratios "
                         + ", ".join(f"{x['ratio_compare']:.2f}" for x in xs) + ").")
    lines += ["", environment_markdown(r["environment"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks lambda-regressor", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", help="regressor weight file (default: the shipped one)")
    ap.add_argument("--compare", help="a second regressor file, predicted against the same MAP run")
    ap.add_argument("--out", default=str(RESULTS / "lambda_regressor"), help="output path without suffix")
    a = ap.parse_args(argv)
    for name, path in (("--weights", a.weights), ("--compare", a.compare)):
        if path and not Path(path).is_file():
            ap.error(f"`{name}`: file not found: {path}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # before the minutes of runs, not after
    r = run(a.weights, a.compare)
    atomic_write_text(a.out + ".json", json.dumps(r, indent=1))
    atomic_write_text(a.out + ".md", markdown(r))
    print(f"wrote {a.out}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
