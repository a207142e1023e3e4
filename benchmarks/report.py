"""Statistics, figures, CSV files and the markdown report of a benchmark suite."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import environment_markdown, processor, save_figure
from benchmarks.methods import CONDITIONAL_SWEEP, METHODS
from hybridreg.config import atomic_write_text

# (comparison, method, its baseline) of the paired comparisons: voxelwise against uniform λ per solver, the other
# strategies of the instance solver (MAP-estimated global λ, region-wise λ) against uniform λ, and the regressor's λ
# against the MAP λ it was trained on
PAIRED = (("instance", "instance", "instance-uniform"), ("learned", "learned-stage1", "learned-uniform"),
          ("learned+refine", "learned+refine-stage1", "learned+refine-uniform"),
          ("instance, MAP λ", "instance-map", "instance-uniform"), ("instance, region-wise λ", "instance-regions", "instance-uniform"),
          ("regressed against MAP λ", "learned-lambda", "instance-map"),
          ("conditional network against a network per value, w_reg 4", "learned-conditional", "learned"),
          ("conditional network against a network per value, w_reg 2", "learned-conditional@w_reg=2", "learned@w_reg=2"),
          ("conditional network against a network per value, w_reg 8", "learned-conditional@w_reg=8", "learned@w_reg=8"),
          ("conditional network, tuned region-wise λ", "learned-conditional-regions", "learned-conditional"))
BASELINES = ("instance-uniform",)
"""Families that every other hybridreg front is read against at equal SDlogJ, besides the
classical tools: the uniform-λ baseline (issue: every strategy against the principled baseline)."""
AMORTIZED_PEER = "instance"
"""The family the learned solvers' fronts are also read against: the instance solver they amortize."""
LEVEL = 0.0005
"""Dice difference (absolute) under which a point and a peer's front are *level*: below the
report's printed precision (three decimals), where neither is ahead."""


def verdict(difference: float | None, folding: float) -> str | None:
    """A point against a peer's front at the same SDlogJ: ``"yes"`` (ahead: at least
    :data:`LEVEL` more Dice and no folding), ``"level"`` (within :data:`LEVEL`, no folding),
    ``"no"`` (behind, or any folding), ``None`` (outside the SDlogJ range the front covers)."""
    if difference is None:
        return None
    if folding > 0.0 or difference <= -LEVEL:
        return "no"
    return "yes" if difference >= LEVEL else "level"


def _peers(fam: str, families) -> list[str]:
    """The families ``fam``'s front is read against at equal SDlogJ: the classical tools, the
    :data:`BASELINES` and, for a learned solver, :data:`AMORTIZED_PEER`."""
    learned = METHODS[fam].solver.startswith("learned")
    return [f for f in families if f != fam and (METHODS[f].solver == "classical" or f in BASELINES
                                                 or (learned and f == AMORTIZED_PEER))]


def _label_names(rows: list[dict] = ()) -> dict[int, str]:
    """FreeSurfer's structure names, overridden by the ``label_names`` rows carry (a dataset
    with labels of its own, e.g. ``realworld``'s tissue classes 1 = GM, 2 = WM)."""
    from hybridreg.data import label_names

    names = dict(label_names())
    for r in rows:
        names.update({int(k): v for k, v in r.get("label_names", {}).items()})
    return names


def _ordered(rows: list[dict]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in METHODS if m in present]


def _by(rows, method):
    return sorted((r for r in rows if r["method"] == method), key=lambda r: r["pair"])


# ----------------------------------------------------------------------------- statistics

def summary(rows: list[dict]) -> list[dict]:
    """One row per method: means over pairs (max for folding), medians for time."""
    out = []
    for m in _ordered(rows):
        rs = _by(rows, m)
        d = [r["dice_mean"] for r in rs]
        out.append({"method": m, "label": METHODS[m].label, "pairs": len(rs), "dice_mean": statistics.mean(d),
                    "dice_sd": statistics.stdev(d) if len(d) > 1 else 0.0, "dice_before": statistics.mean(r["dice_before"] for r in rs),
                    "hd95_mean": statistics.mean(r["hd95_mean"] for r in rs),
                    "folding_max": max(r["folding_percent"] for r in rs),
                    "ndv_max": max(r["ndv_percent"] for r in rs) if all("ndv_percent" in r for r in rs) else None,
                    "tre_mean": statistics.mean(r["tre_mm"] for r in rs) if all("tre_mm" in r for r in rs) else None,
                    "sdlogj_mean": statistics.mean(r["sdlogj"] for r in rs),
                    "seconds_median": statistics.median(r["seconds"] for r in rs),
                    "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rs),
                    "lambda_std_brain": (statistics.mean(r["lambda_std_brain"] for r in rs)
                                         if all("lambda_std_brain" in r for r in rs) else None)})
    return out


def hardware_note(rows: list[dict]) -> list[str]:
    """Report lines naming the processor each method's rows ran on -- the GPU for rows run on
    one (``gpu``, ``benchmarks run --device cuda``), else the CPU (``cpu``; rows from before it
    was recorded: "not recorded") -- or none when every row ran on one. A suite resumed on
    another machine, or with hybridreg on a GPU and the classical tools on the CPU, mixes them,
    and its seconds then compare only within one processor."""
    where: dict[str, list[str]] = {}
    for m in _ordered(rows):
        for c in sorted({processor(r) for r in _by(rows, m)}):
            where.setdefault(c, []).append(METHODS[m].label)
    gpu = any(c.startswith("GPU ") for c in where)
    if len(where) < 2:
        return ["", f"Every row ran on the {next(iter(where))}."] if gpu else []
    kind = "processor" if gpu else "CPU"
    return ["", f"The rows ran on more than one {kind}: seconds compare only between methods on the same one. "
            + "; ".join(f"{c}: {', '.join(labels)}" for c, labels in where.items()) + "."]


def fronts(rows: list[dict]) -> dict[str, list[dict]]:
    """Each regularity sweep with a point present: ``{family: [point, ...]}``, each
    point ``{"method", "setting", "default", "sdlogj", "dice", "folding_max", "pairs"}`` (means
    over the pairs every point of the front ran; folding: worst pair), sorted by SDlogJ.

    The front's pairs are those its default setting ran on, and a point that has not run on all
    of them is left out (a sweep point run on a few pairs does not shrink the front to those
    pairs); without the default, or with it alone left, the pairs every point ran on."""
    by_family: dict[str, list[str]] = {}
    for m in _ordered(rows):
        if METHODS[m].setting:
            by_family.setdefault(METHODS[m].family or m, []).append(m)
    out = {}
    for fam, members in by_family.items():
        ran = {m: {r["pair"] for r in _by(rows, m)} for m in members}
        complete = [m for m in members if fam in ran and ran[m] >= ran[fam]]
        if len(complete) > 1:
            members = complete
        pairs = set.intersection(*(ran[m] for m in members))
        if not pairs:
            continue
        pts = []
        for m in members:
            rs = [r for r in _by(rows, m) if r["pair"] in pairs]
            pts.append({"method": m, "setting": METHODS[m].setting, "default": not METHODS[m].family,
                        "sdlogj": statistics.mean(r["sdlogj"] for r in rs), "dice": statistics.mean(r["dice_mean"] for r in rs),
                        "folding_max": max(r["folding_percent"] for r in rs), "pairs": sorted(pairs)})
        out[fam] = sorted(pts, key=lambda p: p["sdlogj"])
    return out


def at_equal_regularity(rows: list[dict]) -> list[dict]:
    """Every point of hybridreg's fronts against each classical tool's front, against the
    uniform-λ baseline's (:data:`BASELINES`) and, for the learned solvers, against the instance
    solver's (:data:`AMORTIZED_PEER`), at the same SDlogJ: the peer's Dice interpolated
    linearly along its front (``None`` outside the SDlogJ range it covers), on the pairs both
    families ran. ``verdict``: :func:`verdict` of the difference and our points' folding (for a
    peer at one setting, the folding of the two points of ours read at its SDlogJ); ``ahead``:
    whether it is ``"yes"``."""
    out = []
    fr = fronts(rows)
    for fam, pts in fr.items():
        if METHODS[fam].solver == "classical":
            continue
        for peer in _peers(fam, fr):
            common = set(pts[0]["pairs"]) & set(fr[peer][0]["pairs"])
            sub_rows = [r for r in rows if r["pair"] in common]
            both = fronts(sub_rows)
            ours, theirs = both.get(fam, []), both.get(peer, [])
            if not ours or not theirs:
                continue
            xs, ys = [p["sdlogj"] for p in theirs], [p["dice"] for p in theirs]
            if len(theirs) == 1:  # a tool run at one setting: our front read at its SDlogJ instead
                ox, oy = [p["sdlogj"] for p in ours], [p["dice"] for p in ours]
                t = theirs[0]
                inside = len(ours) > 1 and ox[0] <= t["sdlogj"] <= ox[-1]
                ours_dice = float(np.interp(t["sdlogj"], ox, oy)) if inside else None
                i = int(np.clip(np.searchsorted(ox, t["sdlogj"]), 1, len(ours) - 1)) if len(ours) > 1 else 0
                near = ours[max(i - 1, 0):i + 1]
                read = [p for p in near if p["sdlogj"] == t["sdlogj"]] or near  # the point at its SDlogJ, else both
                folding = max(p["folding_max"] for p in read)
                diff = None if ours_dice is None else ours_dice - t["dice"]
                v = verdict(diff, folding)
                out.append({"method": fam, "setting": "front", "default": False, "peer": peer, "sdlogj": t["sdlogj"],
                            "dice": ours_dice, "folding_max": folding, "peer_dice": t["dice"], "difference": diff,
                            "verdict": v, "ahead": None if v is None else v == "yes", "pairs": len(common)})
                continue
            for p in ours:
                inside = xs[0] <= p["sdlogj"] <= xs[-1]
                peer_dice = float(np.interp(p["sdlogj"], xs, ys)) if inside else None
                diff = None if peer_dice is None else p["dice"] - peer_dice
                v = verdict(diff, p["folding_max"])
                out.append({"method": p["method"], "setting": p["setting"], "default": p["default"], "peer": peer,
                            "sdlogj": p["sdlogj"], "dice": p["dice"], "folding_max": p["folding_max"], "peer_dice": peer_dice,
                            "difference": diff, "verdict": v, "ahead": None if v is None else v == "yes",
                            "pairs": len(common)})
    return out


def per_pair_at_equal_regularity(rows: list[dict]) -> list[dict]:
    """Each hybridreg family's default against each classical tool's front, pair by pair (issue
    17's criterion is per pair): :func:`at_equal_regularity` on one pair's rows at a time, each
    entry with its ``pair`` added; a peer at one setting on a pair is left out."""
    out = []
    for pair in sorted({r["pair"] for r in rows}):
        out += [x | {"pair": pair} for x in at_equal_regularity([r for r in rows if r["pair"] == pair])
                if x["default"] and METHODS[x["peer"]].solver == "classical"]
    return out


def _per_pair_front_lines(rows: list[dict]) -> list[str]:
    """The report's per-pair table of :func:`per_pair_at_equal_regularity`: one line per
    (default, tool), each pair's difference and verdict, and how many pairs are ahead."""
    per = per_pair_at_equal_regularity(rows)
    if not per:
        return []
    pairs = sorted({x["pair"] for x in per})
    lines = ["", "Per pair: each hybridreg default against each classical tool's front on that pair alone (difference "
             "in Dice at the default's SDlogJ, verdict as above; – : the tool did not run on the pair, or its front "
             "does not reach the default's SDlogJ there; ahead on: of the pairs where it does):", "",
             "| method | peer | " + " | ".join(pairs) + " | ahead on |", "|---|---|" + "---|" * len(pairs) + "---|"]
    for key in dict.fromkeys((x["method"], x["peer"]) for x in per):
        got = {x["pair"]: x for x in per if (x["method"], x["peer"]) == key}
        cells = ["–" if p not in got or got[p]["verdict"] is None else f"{got[p]['difference']:+.3f} {got[p]['verdict']}"
                 for p in pairs]
        ahead = sum(got[p]["verdict"] == "yes" for p in got)
        read = sum(got[p]["verdict"] is not None for p in got)  # pairs where the tool's front covers the default
        lines.append(f"| {METHODS[key[0]].label} | {METHODS[key[1]].label} | " + " | ".join(cells) + f" | {ahead} of {read} |")
    return lines


def _entry(name: str, w: float) -> str:
    """The suite method of family ``name`` at ``w_reg`` ``w`` (4: the family's own entry)."""
    return name if w == 4.0 else f"{name}@w_reg={w:g}"


def conditional_sweep(rows: list[dict]) -> list[dict]:
    """The conditional network (alone and refined) at each ``w_reg`` of :data:`CONDITIONAL_SWEEP`
    against the network trained at that value (``learned``: the shipped one at 4, the fixed-value
    fine-tunes at 2 and 8; over the same pairs) and instance optimization at that value (over the
    pairs both ran, ``instance_n``): mean Dice and SDlogJ. The refined conditional network is
    compared with instance optimization only: ``learned+refine`` refines the instance solver's
    energy with its own schedule (7 iterations at 2 mm, 2 at 1.75 mm), the conditional refinement its code's energy for 12."""
    def mean(rs, key):
        return statistics.mean(r[key] for r in rs)

    out = []
    for solver, fixed_family in (("learned-conditional", "learned"), ("learned-conditional+refine", None)):
        for w in CONDITIONAL_SWEEP:
            ours = _by(rows, _entry(solver, w))
            if not ours:
                continue
            pairs = {r["pair"] for r in ours}
            e = {"solver": solver, "w_reg": w, "n": len(ours), "dice": mean(ours, "dice_mean"), "sdlogj": mean(ours, "sdlogj"),
                 "folding_max": max(r["folding_percent"] for r in ours)}
            fixed = [r for r in _by(rows, _entry(fixed_family, w)) if r["pair"] in pairs] if fixed_family else []
            if len(fixed) == len(ours):
                e["fixed"] = {"dice": mean(fixed, "dice_mean"), "sdlogj": mean(fixed, "sdlogj")}
            inst = [r for r in _by(rows, _entry("instance", w)) if r["pair"] in pairs]
            if inst:
                common = {r["pair"] for r in inst}
                mine = [r for r in ours if r["pair"] in common]
                e["instance"] = {"n": len(inst), "dice": mean(inst, "dice_mean"), "sdlogj": mean(inst, "sdlogj"),
                                 "ours_dice": mean(mine, "dice_mean"), "ours_sdlogj": mean(mine, "sdlogj")}
            out.append(e)
    return out


def _conditional_lines(rows: list[dict]) -> list[str]:
    sweep = conditional_sweep(rows)
    if not sweep:
        return []
    lines = ["## One conditional network across w_reg", "",
             "The conditional network at each `objective.w_reg` (one set of weights) against a network trained at that "
             "value (`learned`: the shipped network at 4, `--weights fixed-w1` ... `fixed-w16`; the same pairs) and instance "
             "optimization at that value (the pairs both ran); criterion (issue 18): within 0.01 Dice and 10 % SDlogJ of "
             "the network per value.", "",
             "| solver | w_reg | pairs | Dice | SDlogJ | %\\|J\\|≤0 (max) | network per value: Dice | SDlogJ | ΔDice | SDlogJ ratio "
             "| within 0.01 / 10 % | instance: pairs | Dice, conditional / instance | SDlogJ, conditional / instance |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sweep:
        f, i = e.get("fixed"), e.get("instance")
        fx = (f"{f['dice']:.3f} | {f['sdlogj']:.3f} | {e['dice'] - f['dice']:+.3f} | {e['sdlogj'] / f['sdlogj']:.2f} | "
              f"{'yes' if abs(e['dice'] - f['dice']) <= 0.01 and abs(e['sdlogj'] / f['sdlogj'] - 1) <= 0.1 else 'no'}"
              if f else "– | – | – | – | –")
        ix = (f"{i['n']} | {i['ours_dice']:.3f} / {i['dice']:.3f} | {i['ours_sdlogj']:.3f} / {i['sdlogj']:.3f}" if i
              else "– | – | –")
        lines.append(f"| {METHODS[e['solver']].label} | {e['w_reg']:g} | {e['n']} | {e['dice']:.3f} | {e['sdlogj']:.3f} | "
                     f"{e['folding_max']:.4f} | {fx} | {ix} |")
    for solver in dict.fromkeys(e["solver"] for e in sweep):
        pts = [e for e in sweep if e["solver"] == solver and e["n"] == max(x["n"] for x in sweep if x["solver"] == solver)]
        if len(pts) >= 3:
            d, j = [e["dice"] for e in pts], [e["sdlogj"] for e in pts]
            mono = lambda v: all(a >= b for a, b in zip(v, v[1:])) or all(a <= b for a, b in zip(v, v[1:]))  # noqa: E731
            ws = ", ".join(f"{e['w_reg']:g}" for e in pts)
            lines.append(f"\n{METHODS[solver].label}, w_reg {ws}: Dice "
                         f"{'moves monotonically' if mono(d) else 'does not move monotonically'}, SDlogJ "
                         f"{'moves monotonically' if mono(j) else 'does not move monotonically'}.")
    return lines + [""]


def _wilcoxon(a: list[float], b: list[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of ``a − b`` and the matched-pairs rank-biserial
    correlation r = (W+ − W−) / (W+ + W−) (Kerby 2014) as the effect size."""
    from scipy.stats import rankdata, wilcoxon

    diff = np.asarray(a) - np.asarray(b)
    nz = diff[diff != 0]
    if nz.size == 0:
        return {"n": len(diff), "n_nonzero": 0, "median_diff": 0.0, "p": 1.0, "r": 0.0}
    ranks = rankdata(np.abs(nz))
    wp, wm = ranks[nz > 0].sum(), ranks[nz < 0].sum()
    p = float(wilcoxon(a, b, zero_method="wilcox").pvalue)
    return {"n": len(diff), "n_nonzero": int(nz.size), "median_diff": float(np.median(diff)), "p": p,
            "r": float((wp - wm) / (wp + wm))}


def paired_stats(rows: list[dict]) -> list[dict]:
    """Voxelwise against uniform λ for each solver that has both: overall mean Dice, SDlogJ
    (the regularity the comparison is matched on) and every structure; per-structure p-values
    also Benjamini–Hochberg adjusted (``scipy.stats.false_discovery_control``)."""
    from scipy.stats import false_discovery_control

    names = _label_names(rows)
    out = []
    for solver, vox, uni in PAIRED:
        a, b = _by(rows, vox), _by(rows, uni)
        common = sorted({r["pair"] for r in a} & {r["pair"] for r in b})
        if len(common) < 2:
            continue
        a = [r for r in a if r["pair"] in common]
        b = [r for r in b if r["pair"] in common]
        base = {"solver": solver, "voxelwise": vox, "uniform": uni}
        out.append({**base, "measure": "mean Dice", **_wilcoxon([r["dice_mean"] for r in a], [r["dice_mean"] for r in b])})
        out.append({**base, "measure": "SDlogJ", **_wilcoxon([r["sdlogj"] for r in a], [r["sdlogj"] for r in b])})
        labs = sorted({int(k) for r in a + b for k in r["dice"]})
        per = []
        for lab in labs:
            k = str(lab)
            if all(k in r["dice"] for r in a + b):
                per.append({**base, "measure": f"Dice {names.get(lab, lab)}",
                            **_wilcoxon([r["dice"][k] for r in a], [r["dice"][k] for r in b])})
        if per:
            q = false_discovery_control([x["p"] for x in per])
            for x, qq in zip(per, q):
                x["q_bh"] = float(qq)
        out += per
    return out


# ----------------------------------------------------------------------------- CSV

def _csv(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def write_csvs(out: Path, rows: list[dict], stats: list[dict], scaling: list[dict]) -> None:
    atomic_write_text(out / "results.csv", _csv(rows, ["pair", "kind", "method", "dice_before", "dice_mean", "hd95_mean",
                                                        "folding_percent", "sdlogj", "seconds", "peak_rss_mb",
                                                        "lambda_mean_brain", "lambda_std_brain"]))
    names = _label_names(rows)
    per = [{"pair": r["pair"], "method": r["method"], "label": int(k), "structure": names.get(int(k), k), "dice": v}
           for r in rows for k, v in r["dice"].items()]
    atomic_write_text(out / "dice_per_structure.csv", _csv(per, ["pair", "method", "label", "structure", "dice"]))
    atomic_write_text(out / "paired_stats.csv", _csv(stats, ["solver", "voxelwise", "uniform", "measure", "n", "median_diff",
                                                             "r", "p", "q_bh"]))
    if scaling:
        srows = [{"grid": s["grid"], "voxels": s["voxels"], "seconds_per_iteration": s["seconds_per_iteration"],
                  "memory_mb": s["memory_mb"], **{f"s_{k}": v for k, v in s["steps"].items()}} for s in scaling]
        atomic_write_text(out / "scaling.csv", _csv(srows, list(srows[0])))


# ----------------------------------------------------------------------------- figures

def _step_names(scaling: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for s in scaling for k in s["steps"]))


# offsets (points) and alignments tried in turn for a point's label: right-above first, then around the point,
# then the same twice as far out
_NEAR = ((5, 4, "left", "bottom"), (5, -4, "left", "top"), (-5, 4, "right", "bottom"), (-5, -4, "right", "top"),
         (0, 7, "center", "bottom"), (0, -7, "center", "top"), (8, 0, "left", "center"), (-8, 0, "right", "center"))
_LABEL_PLACES = _NEAR + tuple((2 * dx, 2 * dy, ha, va) for dx, dy, ha, va in _NEAR)
_MARKER_PT = 5.0  # half the side of the box a point's marker (and a default's ring) covers, in points


def _place_labels(fig, ax, labels) -> None:
    """Annotate points so that, where the space allows, no label covers another one or a point's
    marker, on the figure's current layout (save it without another ``tight_layout``).

    ``labels``: ``[((x, y), text, color), …]`` in data coordinates. Each label takes the first place of
    :data:`_LABEL_PLACES` whose box lies inside the axes and meets no label placed before it and no
    marker (a box of :data:`_MARKER_PT` about each point, its own included); where every place meets
    something, the one that meets the fewest. Labels take their series' colour.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    renderer = FigureCanvasAgg(fig).get_renderer()
    r = _MARKER_PT * fig.dpi / 72.0
    markers = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in (ax.transData.transform(xy) for xy, _, _ in labels)]
    frame, placed = ax.get_window_extent(renderer), []
    for xy, text, color in labels:
        best = None
        for dx, dy, ha, va in _LABEL_PLACES:
            t = ax.annotate(text, xy, fontsize=6, color=color, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va)
            box = t.get_window_extent(renderer).expanded(1.05, 1.1)
            hits = (sum(box.overlaps(b) for b in placed) + sum(box.overlaps(m) for m in markers)
                    + 2 * (not frame.contains(box.x0, box.y0) or not frame.contains(box.x1, box.y1)))
            if best is None or hits < best[0]:
                if best is not None:
                    best[1].remove()
                best = (hits, t, box)
            else:
                t.remove()
            if hits == 0:
                break
        placed.append(best[2])


def figures(out: Path, rows: list[dict], scaling: list[dict]) -> dict[str, str]:
    """Write the report's figures; returns {name: file name}."""
    from matplotlib.figure import Figure

    files = {}
    methods = _ordered(rows)
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    names = _label_names(rows)

    # per-structure box plots (left/right merged by name without the hemisphere prefix)
    struct = {}
    for lab in sorted({int(k) for r in rows for k in r["dice"]}):
        struct.setdefault(names.get(lab, str(lab)).replace("Left-", "").replace("Right-", ""), []).append(str(lab))
    fig = Figure(figsize=(max(10, 0.9 * len(struct) * len(methods) / 3), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        data = [[r["dice"][k] for r in _by(rows, m) for k in ks if k in r["dice"]] for ks in struct.values()]
        pos = np.arange(len(struct)) + (j - (len(methods) - 1) / 2) * width
        for b in ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)["boxes"]:
            b.set(facecolor=colors[m], alpha=0.6)
        ax.plot([], [], "s", color=colors[m], label=METHODS[m].label)
    ax.set_xticks(range(len(struct)))
    ax.set_xticklabels(list(struct), rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="Dice", title="Dice per structure (left and right pooled; all pairs)")
    ax.legend(fontsize=7, ncol=4)
    save_figure(fig, out / "dice_per_structure.png")
    files["boxes"] = "dice_per_structure.png"

    # Dice against seconds
    ax = (fig := Figure(figsize=(6, 4.2))).subplots()
    for m in methods:
        rs = _by(rows, m)
        ax.scatter([r["seconds"] for r in rs], [r["dice_mean"] for r in rs], s=14, color=colors[m], alpha=0.5)
        ax.scatter([statistics.median(r["seconds"] for r in rs)], [statistics.mean(r["dice_mean"] for r in rs)], s=70,
                   color=colors[m], edgecolor="k", label=METHODS[m].label)
    ax.set_xscale("log")
    ax.set(xlabel="seconds per pair (log)", ylabel="mean Dice", title="Dice against time (small: pairs; large: mean)")
    ax.legend(fontsize=7)
    save_figure(fig, out / "dice_vs_time.png")
    files["scatter"] = "dice_vs_time.png"

    # Dice against regularity: the Pareto fronts of the regularity sweeps
    fr = fronts(rows)
    if fr:
        ax = (fig := Figure(figsize=(7.5, 6.5))).subplots()
        labels = []
        for fam, pts in fr.items():
            ax.plot([p["sdlogj"] for p in pts], [p["dice"] for p in pts], "o-" if len(pts) > 1 else "D", color=colors[fam],
                    label=METHODS[fam].label + ("" if len(pts) > 1 else " (one setting)"))
            for p in pts:
                labels.append(((p["sdlogj"], p["dice"]), p["setting"], colors[fam]))
                if p["default"]:
                    ax.scatter([p["sdlogj"]], [p["dice"]], s=90, facecolor="none", edgecolor="k", zorder=3)
        ax.set(xlabel="mean SDlogJ (lower: smoother)", ylabel="mean Dice",
               title="Dice against regularity (circled: defaults)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
        fig.tight_layout()
        _place_labels(fig, ax, labels)
        save_figure(fig, out / "pareto_fronts.png", layout=False)  # the labels were placed on this layout
        files["fronts"] = "pareto_fronts.png"

    # time-to-accuracy
    ax = (fig := Figure(figsize=(6.5, 4.2))).subplots()
    for m in methods:
        rs = [r for r in _by(rows, m) if r.get("trace")]
        if rs:
            grid = np.linspace(0, min(r["trace"][-1][0] for r in rs), 200)
            curves = []
            for r in rs:
                t, d = np.array(r["trace"]).T
                ax.plot(t, d, color=colors[m], lw=0.5, alpha=0.3)
                curves.append(np.interp(grid, np.r_[0.0, t], np.r_[r["dice_before"], d]))
            ax.plot(grid, np.mean(curves, axis=0), color=colors[m], lw=2, label=f"{METHODS[m].label} (as it runs)")
        elif METHODS[m].solver != "instance":
            rs = _by(rows, m)
            ax.scatter([statistics.median(r["seconds"] for r in rs)], [statistics.mean(r["dice_mean"] for r in rs)],
                       s=60, color=colors[m], edgecolor="k", zorder=3, label=METHODS[m].label)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set(xlabel="seconds (symlog)", ylabel="mean Dice", title="Time to accuracy")
    ax.legend(fontsize=7)
    save_figure(fig, out / "time_to_accuracy.png")
    files["tta"] = "time_to_accuracy.png"

    # λ maps
    lam_files = sorted((out / "lambda").glob("*.npz")) if (out / "lambda").is_dir() else []
    if lam_files:
        fig = Figure(figsize=(9, 3 * len(lam_files)))
        radiological = True
        for row_ax, p in zip(fig.subplots(len(lam_files), 3, squeeze=False), lam_files):
            z = np.load(p)
            # the radiological layout (hybridreg.figures.centre_slices); files of earlier runs hold array order
            radiological = radiological and "layout" in z.files
            for k, a in enumerate(row_ax):
                a.set_axis_off()
                if f"img{k}" not in z.files:  # a 2D suite: one slice
                    continue
                im = z[f"img{k}"].astype(np.float32)
                origin = "upper" if "layout" in z.files else "lower"
                a.imshow(im, cmap="gray", origin=origin)
                h = a.imshow(np.ma.masked_where(im <= 0.02, z[f"lam{k}"].astype(np.float32)), cmap="viridis", origin=origin,
                             alpha=0.8, vmin=0, vmax=1)
            row_ax[0].set_title(METHODS[p.stem].label if p.stem in METHODS else p.stem, fontsize=9, loc="left")
            fig.colorbar(h, ax=row_ax[-1], fraction=0.046)
        if not radiological:  # the report's caption describes the radiological layout
            fig.suptitle("λ on the first pair (inside the head), array order")
        save_figure(fig, out / "lambda_maps.png")
        files["lambda"] = "lambda_maps.png"

    if scaling:
        v = np.array([s["voxels"] for s in scaling])
        axes = (fig := Figure(figsize=(13, 3.8))).subplots(1, 3)
        axes[0].loglog(v, [s["seconds_per_iteration"] for s in scaling], "o-")
        axes[0].set(xlabel="voxels", ylabel="seconds per iteration", title="Time per iteration (CPU)")
        axes[1].loglog(v, [max(s["memory_mb"], 1.0) for s in scaling], "o-", color="C1")
        axes[1].set(xlabel="voxels", ylabel="MB", title="Peak memory of an iteration (CPU)")
        bottom = np.zeros(len(scaling))
        x = np.arange(len(scaling))
        for i, k in enumerate(_step_names(scaling)):
            share = np.array([s["steps"].get(k, 0.0) / s["seconds_per_iteration"] for s in scaling])
            axes[2].bar(x, share, bottom=bottom, label=k, color=f"C{i}")
            bottom += share
        axes[2].set_xticks(x)
        axes[2].set_xticklabels([s["grid"] + (" mm" if "x" not in s["grid"] else "") for s in scaling], fontsize=8)
        axes[2].set(ylabel="share of the iteration", title="Steps")
        axes[2].legend(fontsize=7, loc="lower left")
        save_figure(fig, out / "scaling.png")
        files["scaling"] = "scaling.png"
    return files


# ----------------------------------------------------------------------------- markdown

def _paired_regularity(rows: list[dict], stats: list[dict]) -> list[str]:
    """Per solver of the paired comparison: mean SDlogJ of both arms, whether they are within
    10 % of each other, and which λ has the higher Dice at p < 0.05 (two-sided)."""
    out = []
    for solver, vox, uni in PAIRED:
        d = next((x for x in stats if x["solver"] == solver and x["measure"] == "mean Dice"), None)
        if d is not None:
            sv, su = (statistics.mean(r["sdlogj"] for r in _by(rows, m)) for m in (vox, uni))
            higher = ("the method" if d["median_diff"] > 0 else "baseline") if d["p"] < 0.05 else "neither"
            out.append(f"| {solver} | {sv:.3f} | {su:.3f} | {'yes' if abs(sv - su) <= 0.1 * max(sv, su) else 'no'} | {higher} |")
    return ["| comparison | SDlogJ of the method | SDlogJ of the baseline | within 10 % | higher Dice (p < 0.05) |",
            "|---|---|---|---|---|"] + out + [""] if out else []


def _best(summ: list[dict]) -> list[str]:
    """The winners among the methods run on every pair of the suite (means over fewer pairs do
    not compare; all methods where none ran on every pair)."""
    most = max(s["pairs"] for s in summ)
    summ = [s for s in summ if s["pairs"] == most]
    acc = max(summ, key=lambda s: s["dice_mean"])
    fast = min(summ, key=lambda s: s["seconds_median"])
    reg = min([s for s in summ if s["folding_max"] < 0.1] or summ, key=lambda s: (s["folding_max"] > 0, s["sdlogj_mean"]))
    return ["| criterion | method | value |", "|---|---|---|", f"| highest mean Dice | {acc['label']} | {acc['dice_mean']:.3f} |",
            f"| lowest median seconds | {fast['label']} | {fast['seconds_median']:.2f} |",
            f"| lowest mean SDlogJ (max %\\|J\\|≤0 < 0.1) | {reg['label']} | {reg['sdlogj_mean']:.3f} |"]


def _subset(n: int, total: int) -> str:
    """`` (n of total pairs)`` where a mean covers fewer than the suite's pairs, else ``""``:
    means over different pairs do not compare (the equal-regularity table compares on the
    pairs both ran)."""
    return f" ({n} of {total} pairs)" if n < total else ""


def markdown(suite: str, description: str, env: dict, rows: list[dict], stats: list[dict], scaling: list[dict],
             files: dict[str, str], skipped: list[str], wall_minutes: float | None, commands: list[str] | None = None) -> str:
    """The report (Markdown). ``commands``: the ``run`` command lines that produced the rows
    (``run.json``; a run recorded without one, and no run at all, count as the suite's own command)."""
    summ = summary(rows)
    methods = _ordered(rows)
    n_pairs = len({r["pair"] for r in rows})
    own = f"python -m benchmarks run --suite {suite}"
    commands = list(dict.fromkeys(c or own for c in commands or [None]))
    lines = [f"# Benchmark suite `{suite}`", "",
             "Regenerate with " + "; then ".join(f"`{c}`" for c in commands)
             + (f" (wall time of the runs that produced these rows{', scaling included' if scaling else ''}:"
                f" {wall_minutes:.0f} minutes)." if wall_minutes else "."),
             "How it is measured and how to read it: `docs/benchmarks.md`.", "",
             environment_markdown(env), f"Pairs: {description} ({n_pairs} pairs).", "",
             "| method | what runs |", "|---|---|"] + [f"| {METHODS[m].label} | {METHODS[m].description} |" for m in methods] + [""]
    if skipped:
        lines += ["Skipped: " + "; ".join(skipped), ""]
    lines += ["## Best by criterion", ""] + _best(summ) + [""]
    lines += ["## Summary (means over pairs; seconds: median; %|J|≤0: worst pair)", "",
              "| method | Dice before | Dice | HD95 mm | %\\|J\\|≤0 (max) | NDV % (max) | SDlogJ | seconds | peak RSS MB | λ sd in brain |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summ:
        lam = f"{s['lambda_std_brain']:.3f}" if s["lambda_std_brain"] is not None else "–"
        ndv = f"{s['ndv_max']:.4f}" if s["ndv_max"] is not None else "–"
        lines.append(f"| {s['label']}{_subset(s['pairs'], n_pairs)} | {s['dice_before']:.3f} | {s['dice_mean']:.3f} ± {s['dice_sd']:.3f} | {s['hd95_mean']:.2f} | "
                     f"{s['folding_max']:.4f} | {ndv} | {s['sdlogj_mean']:.3f} | {s['seconds_median']:.2f} | {s['peak_rss_mb_max']:.0f} | {lam} |")
    lines += hardware_note(rows)
    if any(s["tre_mean"] is not None for s in summ):
        lines += ["", "Target registration error of the landmark files (mm; mean over pairs of the mean over landmarks):", "",
                  "| method | TRE mm |", "|---|---|"]
        lines += [f"| {s['label']} | {s['tre_mean']:.2f} |" for s in summ if s["tre_mean"] is not None]
    lines += ["", "Per pair (mean Dice / SDlogJ / seconds):", "",
              "| pair | " + " | ".join(METHODS[m].label for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for p in sorted({r["pair"] for r in rows}):
        x = {r["method"]: r for r in rows if r["pair"] == p}
        lines.append(f"| {p} | " + " | ".join(f"{x[m]['dice_mean']:.3f} / {x[m]['sdlogj']:.3f} / {x[m]['seconds']:.1f}"
                                              if m in x else "–" for m in methods) + " |")
    staged = sorted((r for r in rows if "dice_affine" in r), key=lambda r: (r["pair"], methods.index(r["method"])))
    if staged:  # pairs given as they come (two grids): the affine stage's share of the result
        lines += ["", "Per pair and method, from the scans as they lie in physical space (Dice before), after the affine "
                  "stage alone, and after registration:", "",
                  "| pair | method | Dice before | Dice affine | Dice | HD95 mm | %\\|J\\|≤0 | SDlogJ | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['pair']} | {METHODS[r['method']].label} | {r['dice_before']:.3f} | {r['dice_affine']:.3f} | "
                  f"{r['dice_mean']:.3f} | {r['hd95_mean']:.2f} | {r['folding_percent']:.4f} | {r['sdlogj']:.3f} | "
                  f"{r['seconds']:.1f} |" for r in staged]
    if "fronts" in files:
        lines += ["", "## Dice against regularity (Pareto fronts)", "",
                  "Each method swept over its own regularity setting (means over the pairs its default ran on; a setting that did not run on all of them is left out of the front); "
                  "hybridreg's points against each classical tool's front, and against the uniform-λ baseline's, interpolated "
                  f"at the same SDlogJ (ahead: yes, at least {LEVEL} more Dice there and no folding; level: within {LEVEL}, "
                  "below the printed precision; – : outside the SDlogJ range the peer's front covers). A front is read "
                  "linearly between its points: where a front bends (they are concave), a straight line between two "
                  "settings lies below it, so a peer needs a setting on each side of the point read, close to it.", "",
                  "| method | setting | SDlogJ | Dice | %\\|J\\|≤0 (max) | peer | peer's front at this SDlogJ | difference | ahead |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in at_equal_regularity(rows):
            if x["setting"] == "front":  # a tool at one setting against our front at its SDlogJ
                ours = "–" if x["dice"] is None else f"{x['dice']:.3f}"
                diff = "–" if x["difference"] is None else f"{x['difference']:+.3f}"
                ahead = x["verdict"] or "–"
                lines.append(f"| {METHODS[x['method']].label}{_subset(x['pairs'], n_pairs)} | its front at the tool's SDlogJ | {x['sdlogj']:.3f} | {ours} | "
                             f"{x['folding_max']:.4f} | {METHODS[x['peer']].label} (one setting) | {x['peer_dice']:.3f} | {diff} | {ahead} |")
                continue
            peer = "–" if x["peer_dice"] is None else f"{x['peer_dice']:.3f}"
            diff = "–" if x["difference"] is None else f"{x['difference']:+.3f}"
            ahead = x["verdict"] or "–"
            lines.append(f"| {METHODS[x['method']].label}{_subset(x['pairs'], n_pairs)} | {x['setting'] + (' (default)' if x['default'] else '')} | "
                         f"{x['sdlogj']:.3f} | {x['dice']:.3f} | {x['folding_max']:.4f} | {METHODS[x['peer']].label} | "
                         f"{peer} | {diff} | {ahead} |")
        lines += _per_pair_front_lines(rows)
        lines += ["", "| method | setting | SDlogJ | Dice | %\\|J\\|≤0 (max) |", "|---|---|---|---|---|"]
        for fam, pts in fronts(rows).items():
            lines += [f"| {METHODS[fam].label}{_subset(len(p['pairs']), n_pairs)} | {p['setting']} | {p['sdlogj']:.3f} | {p['dice']:.3f} | {p['folding_max']:.4f} |"
                      for p in pts]
        lines += ["", f"![Pareto fronts]({files['fronts']})"]
    lines += [""] + _conditional_lines(rows)
    lines += ["", f"![Dice per structure]({files['boxes']})", "", f"![Dice against time]({files['scatter']})", "",
              "## Time to accuracy", "", f"![time to accuracy]({files['tta']})", ""]
    if "lambda" in files:
        lines += ["## λ maps", "", "λ on FIXED of the first pair, inside the head: axial, coronal and sagittal slices through the"
                  " centre, the patient's right on the left (radiological), laid out from FIXED's direction cosines; a"
                  " 2D grid, an oblique one and files of runs before stop 69 keep the array order (the figure's title says"
                  " so for the last).", "", f"![λ maps]({files['lambda']})", ""]
    lines += ["## Each λ strategy against its baseline (paired)", ""]
    if stats:
        few = any(x.get("n_nonzero", x["n"]) < 6 for x in stats)
        lines += ["Wilcoxon signed-rank test over pairs (two-sided); r: matched-pairs rank-biserial correlation; "
                  "q: Benjamini–Hochberg within each solver."
                  + (" †: fewer than 6 pairs with a non-zero difference, where no two-sided test can reach p < 0.05:"
                     " read the median difference, not p." if few else ""), "",
                  "| comparison | method | baseline | measure | n | median difference (method − baseline) | r | p | q (BH) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in stats:
            q = f"{x['q_bh']:.3f}" if "q_bh" in x else "–"
            lines.append(f"| {x['solver']} | {x['voxelwise']} | {x['uniform']} | {x['measure']} | {x['n']} | {x['median_diff']:+.4f} | "
                         f"{x['r']:+.2f} | {x['p']:.4f}{'†' if x.get('n_nonzero', x['n']) < 6 else ''} | {q} |")
        lines += [""] + _paired_regularity(rows, stats)
    else:
        lines += ["No λ strategy has its baseline's run to compare with here.", ""]
    if scaling:
        names = _step_names(scaling)
        lines += ["## Scaling of one instance-optimization iteration (CPU)", "",
                  "| grid | voxels | s / iteration | MB | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
        for s in scaling:
            sh = " | ".join(f"{100 * s['steps'][k] / s['seconds_per_iteration']:.0f}%" if k in s["steps"] else "–" for k in names)
            lines.append(f"| {'×'.join(map(str, s['shape']))} | {s['voxels']:,} | {s['seconds_per_iteration']:.3f} | "
                         f"{s['memory_mb']:.0f} | {sh} |")
        lines += ["", f"![scaling]({files['scaling']})", ""]
    lines += ["## Files", "", f"`results.csv`, `dice_per_structure.csv`, `paired_stats.csv`, {'`scaling.csv`, ' if scaling else ''}"
              "`rows.jsonl`.", ""]
    return "\n".join(lines)
