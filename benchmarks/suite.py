"""Benchmark suites: a registry of datasets and a runner that registers every pair with
every method, one fresh process per (pair, method), and collects one row per run.

A row (``rows.jsonl`` in the output folder, one JSON object per line, rewritten atomically
as runs finish so that an interrupted suite continues where it stopped) holds: pair, kind, method,
Dice per structure and its mean (:func:`hybridreg.metrics.score_dice`, label policy ``"auto"``),
mean HD95 (mm) over the same structures, %|J|≤0 and SDlogJ of the displacement, wall
seconds of the registration alone, the process's peak RSS (MB), the Dice-against-time trace
when the method records one, and the λ statistics inside the fixed brain.

The ``realworld`` dataset (:mod:`benchmarks.realworld`) gives its pairs as files on two grids
(:class:`~benchmarks.methods.FilePair`); its rows have the same fields, measured as
:func:`hybridreg.service.register_files` measures them (:func:`evaluate_files`): Dice on the
pair's own label IDs, "before" = the scans as they lie in physical space, plus
``dice_affine`` (after the affine stage alone) and ``label_names``; the Jacobian statistics
are those of the deformable displacement on the fixed grid (the affine stage excluded).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks.common import rss_mb, run_child
from benchmarks.methods import BUILT_IN, METHODS, AnyPair, FilePair, MethodOutput, Pair, available, front_methods
from hybridreg.config import atomic_write_text
from hybridreg.provenance import cpu_name, gpu_name


@dataclass(frozen=True)
class Dataset:
    """A registry entry: ``pairs()`` lists the benchmark pairs (loaded in each child);
    ``missing()`` (optional) says which pairs are left out here and how to get them."""

    name: str
    description: str
    pairs: Callable[[], list[AnyPair]]
    resolution_mm: float
    missing: Callable[[], str | None] | None = None

    def notes(self) -> list[str]:
        """The ``missing()`` message, if any, as a list (for logs and the report's "Skipped")."""
        msg = self.missing() if self.missing else None
        return [msg] if msg else []


def _bundled_pairs(resolution: int) -> Callable[[], list[Pair]]:
    from hybridreg.data.sources import bundled

    return _source_pairs(lambda: bundled(resolution))


def _source_pairs(load: Callable) -> Callable[[], list[Pair]]:
    """The test pairs of a training data source (:mod:`hybridreg.data.sources`, one grid): the
    atlas ← each labelled test subject, and consecutive test subjects."""

    def pairs() -> list[Pair]:
        ds = load()
        out = [Pair(f"{f.subject_id}<-{m.subject_id}", "atlas", f, m, ds.spacing, ds.geometry) for f, m in ds.pairs("test")]
        subj = [v for v in ds.test if v.labels is not None]
        out += [Pair(f"{a.subject_id}<-{b.subject_id}", "subject", a, b, ds.spacing, ds.geometry) for a, b in zip(subj, subj[1:])]
        return out

    return pairs


def _realworld_pairs() -> list[FilePair]:
    from benchmarks import realworld

    return [FilePair.of(p) for p in realworld.realworld_pairs(warn=False)]


def _colin27_missing() -> str | None:
    from benchmarks import realworld

    return realworld.colin27_missing()


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("bundled", "bundled test split at 2 mm: atlas vxm ← the 5 test subjects, and the 4 consecutive "
                "test-subject pairs", _bundled_pairs(2), 2),
        Dataset("bundled-1mm", "the same pairs at 1 mm (the subjects with a bundled 1 mm image)", _bundled_pairs(1), 1),
        Dataset("realworld", "real scans from different sources as they come (1 mm, each on its own grid, orientation "
                "and intensity range, not aligned; docs/realworld.md), both directions: colin27 ↔ vxm scored on 12 "
                "subcortical structures (AAL relabelled into aseg IDs; colin27 is fetched by "
                "`python scripts/fetch_realworld.py`) and ICBM152 ↔ vxm scored on GM/WM",
                _realworld_pairs, 1, _colin27_missing),
    )
}

DATASET_KINDS = ("manifest", "lumir", "oasis")
"""Datasets named by a spec instead of the registry: ``manifest:PAIRS.csv`` (or ``.json``),
``lumir:dataset.json`` (a Learn2Reg / LUMIR ``dataset.json``; ``#SPLIT`` picks its pair list) and
``oasis:DIR`` (the neurite / Learn2Reg OASIS folder the training sources read)."""


def _manifest_pairs(path: str, split: str | None) -> Callable[[], list[FilePair]]:
    def pairs() -> list[FilePair]:
        from hybridreg.batch import read_pairs

        out = []
        for i, p in enumerate(read_pairs(path, split, arg="--dataset"), start=1):
            if p.fixed_labels is None or p.moving_labels is None:
                raise ValueError(f"`--dataset` {path}: pair {i} ({p.id}) has no label maps; the suite scores Dice")
            marks = {k: Path(getattr(p, k)) for k in ("fixed_landmarks", "moving_landmarks") if getattr(p, k)}
            out.append(FilePair(p.id, "manifest", Path(p.fixed), Path(p.moving), Path(p.fixed_labels), Path(p.moving_labels), (),
                                **marks))
        return out

    return pairs


def get_dataset(name: str) -> Dataset:
    """A registered dataset (:data:`DATASETS`) or one named by a spec (:data:`DATASET_KINDS`).

    Raises:
        ValueError: neither (the message lists both).
    """
    if name in DATASETS:
        return DATASETS[name]
    kind, sep, rest = name.partition(":")
    if not sep or kind not in DATASET_KINDS or not rest:
        raise ValueError(f"--dataset must be one of {sorted(DATASETS)} or KIND:PATH with KIND in {list(DATASET_KINDS)},"
                         f" got {name!r}")
    if kind == "oasis":
        from hybridreg.data.sources import oasis

        return Dataset(name, f"the OASIS folder {rest}: test split, consecutive subject pairs (and the atlas ← each)",
                       _source_pairs(lambda: oasis(rest)), 1)
    path, _, split = rest.partition("#")
    what = "manifest" if kind == "manifest" else "Learn2Reg / LUMIR dataset.json"
    return Dataset(name, f"the pairs of the {what} {path}" + (f" (split {split})" if split else "") +
                   ", scored on the labels both maps share (`auto` policy)", _manifest_pairs(path, split or None), 1)


SOLVERS = ["instance", "learned", "learned+refine"]
# the conditional network at the instance solver's regularity, alone and refined (configs/conditional_matched.yaml)
MATCHED = ["learned-matched", "learned-matched+refine"]
SUITES: dict[str, dict] = {
    "bundled": {"dataset": "bundled", "methods": [m for m in METHODS if m in BUILT_IN and not METHODS[m].family], "scaling": True},
    "bundled-1mm": {"dataset": "bundled-1mm", "methods": SOLVERS + MATCHED + ["instance-uniform", "instance-fullres", "sitk-demons", "ants-syn"], "scaling": False, "fronts": True},
    "smoke": {"dataset": "bundled", "methods": ["learned", "sitk-demons"], "scaling": False, "max_pairs": 1},
    "realworld": {"dataset": "realworld", "methods": SOLVERS + MATCHED + ["instance-uniform", "instance-fullres", "sitk-demons", "ants-syn"],
                  "scaling": False, "fronts": True},
}
# every regularization strategy on one energy (method §1, §3): uniform, MAP-estimated global, region-wise and
# voxelwise λ for the instance solver; uniform, regressed (MAP-trained) global and voxelwise λ for the learned one; each
# with its regularity sweep
STRATEGIES = ["instance-uniform", "instance-map", "instance-regions", "instance", "learned-uniform", "learned-lambda", "learned-stage1",
              "learned", "learned+refine", "learned-conditional", "learned-conditional+refine", "learned-conditional-regions"]
SUITES.update({"strategies": {"dataset": "realworld", "methods": STRATEGIES, "scaling": False, "fronts": True},
               "strategies-bundled": {"dataset": "bundled", "methods": STRATEGIES, "scaling": False, "fronts": True}})


def get_suite(suite: str) -> dict:
    """A suite of :data:`SUITES`, or the suite of a dataset spec (:func:`get_dataset`): the
    realworld suite's methods and fronts on those pairs.

    Raises:
        ValueError: neither a suite nor a dataset spec.
    """
    if suite in SUITES:
        return SUITES[suite]
    if suite.partition(":")[0] in DATASET_KINDS:
        get_dataset(suite)
        return {**SUITES["realworld"], "dataset": suite}
    raise ValueError(f"--suite must be one of {sorted(SUITES)} or a dataset KIND:PATH ({list(DATASET_KINDS)}), got {suite!r}")


def suite_methods(suite: str) -> list[str]:
    """The methods a suite runs by default: its list, plus the other points of each regularity
    sweep (:data:`benchmarks.methods.FRONTS`) where the suite draws Pareto fronts (``fronts``)."""
    spec = get_suite(suite)
    return front_methods(spec["methods"]) if spec.get("fronts") else list(spec["methods"])


def _on_image_grid(lam: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from hybridreg.spatial import resize_image

    return resize_image(torch.from_numpy(np.ascontiguousarray(lam, dtype=np.float32))[None, None], shape)[0, 0].numpy()


def evaluate_pair(pair: Pair, disp: np.ndarray, lam: np.ndarray | None = None) -> dict:
    """The suite's metrics of a displacement ``(d, *shape)`` (voxels) on ``pair``
    (:func:`hybridreg.metrics.score_registration`, label policy ``"auto"``, with HD95); ``lam``
    (optional) is λ on the fixed image grid."""
    from hybridreg.metrics import score_registration

    f = pair.fixed.labels
    s = score_registration(f, pair.moving.labels, torch.from_numpy(np.ascontiguousarray(disp, dtype=np.float32)), "auto",
                           spacing=pair.spacing, with_hd95=True)
    row = {"dice": {str(k): v for k, v in s["dice"].items()}, "dice_mean": s["dice_mean"],
           "dice_before": s["dice_before_mean"], "hd95_mean": s["hd95_mean"],
           "folding_percent": s["folding_percent"], "ndv_percent": s["ndv_percent"], "sdlogj": s["sdlogj"]}
    if lam is not None:
        inside = lam[f > 0]
        row["lambda_mean_brain"], row["lambda_std_brain"] = float(inside.mean()), float(inside.std())
    return row


def evaluate_files(pair: FilePair, disp: np.ndarray, voxel_map: np.ndarray | None) -> dict:
    """The label and Jacobian metrics of a registration of a :class:`FilePair`, as
    :func:`hybridreg.service.measure` computes them (same keys: ``dice_after``,
    ``dice_before``, ``dice_after_affine``, ``hd95_mm_after``, ``folding_percent``,
    ``sdlogj``...): MOVING's labels warped by nearest neighbour through ``voxel_map ∘ (id +
    disp)`` (``disp``: ``(d, *shape)`` voxels of FIXED's grid; ``voxel_map``: ``(d, d + 1)``
    FIXED → MOVING voxel indices, ``None`` = physical identity), Dice on ``pair.labels`` (none
    given: the labels both maps share, ``auto`` policy);
    "before" = through the physical identity (the scans as they lie); with landmark files,
    ``tre_mm`` (:func:`hybridreg.metrics.tre_stages`, the affine rebuilt from ``voxel_map``)."""
    import SimpleITK as sitk

    from hybridreg.affine import transform_of_voxel_map
    from hybridreg.affine import voxel_map as affine_voxel_map
    from hybridreg.io import read_labels, read_landmarks
    from hybridreg.metrics import dice_through, score_registration, scored_labels, tre_stages
    from hybridreg.service import hd95_summary

    fl, f_geo = read_labels(pair.fixed_labels, arg="fixed labels")
    ml, m_geo = read_labels(pair.moving_labels, arg="moving labels")
    labels = list(pair.labels) or list(scored_labels(fl, ml, "auto"))
    physical = affine_voxel_map(f_geo, m_geo, sitk.AffineTransform(f_geo.dim))
    vm = physical if voxel_map is None else voxel_map
    d = torch.from_numpy(np.ascontiguousarray(disp, dtype=np.float32))
    s = score_registration(fl, ml, d, labels, spacing=f_geo.array_spacing, with_hd95=True, voxel_map=torch.from_numpy(vm)[None])
    tre = {}
    if pair.fixed_landmarks is not None:
        # each label map lies on its image's grid: its geometry places the landmarks
        tre = {"tre_mm": tre_stages(read_landmarks(pair.fixed_landmarks, f_geo, arg="fixed landmarks"),
                                    read_landmarks(pair.moving_landmarks, m_geo, arg="moving landmarks"),
                                    transform_of_voxel_map(f_geo, m_geo, vm), np.asarray(disp, dtype=np.float64), f_geo)}
    return {**tre, "labels_scored": labels, "dice_before": dice_through(fl, ml, torch.from_numpy(physical)[None], labels),
            "dice_after_affine": dice_through(fl, ml, torch.from_numpy(vm)[None], labels),
            "dice_after": {"mean": s["dice_mean"], "per_label": {str(k): v for k, v in s["dice"].items()}},
            "hd95_mm_after": hd95_summary(s),
            **{k: s[k] for k in ("folding_percent", "ndv_percent", "sdlogj", "jacobian_min", "jacobian_max")}}


def file_pair_row(pair: FilePair, method: str, out: MethodOutput) -> dict:
    """The suite's row of one run on a :class:`FilePair`: the service's metrics when the
    method ran through it (:attr:`MethodOutput.metrics`), else :func:`evaluate_files`."""
    m = out.metrics if out.metrics is not None else evaluate_files(pair, out.displacement, out.voxel_map)
    row = {"pair": pair.name, "kind": pair.kind, "method": method, "seconds": out.seconds, "peak_rss_mb": rss_mb(),
           "dice": {str(k): v for k, v in m["dice_after"]["per_label"].items()}, "dice_mean": m["dice_after"]["mean"],
           "dice_before": m["dice_before"]["mean"], "dice_affine": m["dice_after_affine"]["mean"],
           "hd95_mean": m["hd95_mm_after"]["mean"], "folding_percent": m["folding_percent"], "ndv_percent": m["ndv_percent"],
           "sdlogj": m["sdlogj"], "label_names": {str(k): v for k, v in pair.label_names.items()}}
    if "tre_mm" in m:
        row["tre_before_mm"], row["tre_mm"] = m["tre_mm"]["before"]["mean"], m["tre_mm"]["after"]["mean"]
    lam = m.get("lambda", {})
    if "mean_inside_fixed_labels" in lam:
        row["lambda_mean_brain"], row["lambda_std_brain"] = lam["mean_inside_fixed_labels"], lam["std_inside_fixed_labels"]
    return row


def child(dataset: str, pair_name: str, method: str, lam_out: str | None, device: str = "cpu") -> dict:
    """Run one (pair, method) in this process, hybridreg's solvers on ``device`` (the classical
    tools on the CPU); returns the row, which records the CPU and, for a row run on a GPU, the
    device and the GPU's name."""
    from hybridreg.figures import centre_slices
    from hybridreg.metrics import score_registration

    pair = next(p for p in get_dataset(dataset).pairs() if p.name == pair_name)
    torch.manual_seed(0)
    if isinstance(pair, FilePair):
        from hybridreg.io import normalize_intensity, read_image

        out = METHODS[method].run(pair, None, device)
        row = file_pair_row(pair, method, out)
        img, geometry = (read_image(pair.fixed_image, arg="FIXED") if lam_out and out.lam is not None
                         else (None, None))
        img = normalize_intensity(img) if img is not None else None
        lt = out.lam
    else:
        f, m = pair.fixed.labels, pair.moving.labels
        out = METHODS[method].run(pair, lambda disp: score_registration(f, m, torch.from_numpy(disp), "auto")["dice_mean"],
                                  device)
        peak = rss_mb()
        img, geometry = pair.fixed.image, pair.geometry
        lt = _on_image_grid(out.lam, img.shape) if out.lam is not None else None
        row = {"pair": pair.name, "kind": pair.kind, "method": method, "seconds": out.seconds, "peak_rss_mb": peak,
               **evaluate_pair(pair, out.displacement, lt)}
    row["cpu"] = cpu_name()  # the seconds compare only between rows run on the same CPU (the report says so)
    gpu = gpu_name(device) if METHODS[method].solver != "classical" else None
    if gpu:  # peak_rss_mb stays the host's
        from hybridreg.service import peak_memory_mb

        row.update(device=device, gpu=gpu, peak_gpu_mb=peak_memory_mb(torch.device(device)))
    if out.trace:
        row["trace"] = out.trace
    if lam_out and lt is not None and out.lam.size > 1:
        # the centre slices in the radiological layout (axial, coronal, sagittal): the figure's input, small
        # enough to commit
        views = {f"{key}{k}": v.astype(np.float16) for key, vol in (("lam", lt), ("img", img))
                 for k, v in enumerate(centre_slices(vol, getattr(geometry, "direction", None)) if vol.ndim == 3 else [vol])}
        np.savez_compressed(lam_out, layout="radiological", **views)
    return row


def read_rows(path: Path) -> list[dict]:
    """Rows of ``rows.jsonl`` (rewritten atomically after every run)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def select_pairs(every: list[str], max_pairs: int | None = None, names: list[str] | None = None) -> list[str]:
    """The pairs a suite run registers: the first ``max_pairs`` of ``every`` (the dataset's
    order), then, if ``names`` is given, those of them in ``names``' order (duplicates once).

    Raises:
        ValueError: a name not among the (first ``max_pairs``) pairs, naming ``--pairs``.
    """
    pairs = every[:max_pairs] if max_pairs else list(every)
    if not names:
        return pairs
    unknown = [n for n in names if n not in pairs]
    if unknown:
        raise ValueError(f"--pairs: unknown {unknown}; the suite's pairs: {pairs}")
    return list(dict.fromkeys(names))


def run_suite(suite: str, out_dir: Path, methods: list[str] | None = None, max_pairs: int | None = None,
              log: Callable[[str], None] = print, device: str = "cpu", pair_names: list[str] | None = None) -> list[dict]:
    """Register every pair of the suite's dataset with every available method (resumable),
    hybridreg's solvers on ``device`` (``cpu``, ``cuda``, ``cuda:N``; the classical tools run
    on the CPU whatever it is). Rows already stored are kept, whatever device made them.
    ``pair_names`` (``FIXED<-MOVING``, as the rows name them) runs those pairs only, in that
    order (after ``max_pairs`` has cut the list).

    Rows of a dataset given as ``KIND:PATH`` record their pair's files (``pair_files``,
    :meth:`FilePair.fingerprint`).

    Raises:
        ValueError: unknown suite, method or pair name, an unusable ``device``; ``out_dir``
            holding rows of a selected pair made from other files than the dataset now lists.
    """
    from hybridreg.progress import bar as progress_bar

    from hybridreg.service import device_of

    device = str(device_of(device))  # an unusable device fails before anything runs
    spec = get_suite(suite)
    names = methods or suite_methods(suite)
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; known: {sorted(METHODS)}")
    runnable = []
    for m in names:
        ok, msg = available(METHODS[m])
        if ok:
            runnable.append(m)
        else:
            log(msg)
    for msg in get_dataset(spec["dataset"]).notes():
        log(msg)
    listed = get_dataset(spec["dataset"]).pairs()
    every = [p.name for p in listed]
    # a dataset given as KIND:PATH (the user's pairs): its rows record their files; a registry suite's files are
    # the package's and the fetched data's, whose paths differ from machine to machine
    files = {p.name: p.fingerprint() for p in listed if hasattr(p, "fingerprint")} if ":" in spec["dataset"] else {}
    pairs = select_pairs(every, max_pairs if max_pairs is not None else spec.get("max_pairs"), pair_names)
    rows_path = out_dir / "rows.jsonl"
    rows = read_rows(rows_path)
    stale = sorted({r["pair"] for r in rows if r["pair"] in pairs and "pair_files" in r
                    and r["pair_files"] != files.get(r["pair"])})
    if stale:
        raise ValueError(f"--out {out_dir} holds rows of {stale} made from other files than the dataset now lists"
                         f" ({rows_path}: pair_files); use --fresh to start over, or another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {(r["pair"], r["method"]) for r in rows}
    jobs = [(p, m) for p in pairs for m in runnable if (p, m) not in done]
    lam_dir = out_dir / "lambda"
    lam_dir.mkdir(exist_ok=True)
    for p, m in progress_bar(jobs, desc=f"suite {suite}", dynamic_ncols=True):
        lam_out = str(lam_dir / f"{m}.npz") if p == every[0] else None  # the λ figure's pair, whichever run
        t = time.perf_counter()
        row = run_child("benchmarks.suite:child", dataset=spec["dataset"], pair_name=p, method=m, lam_out=lam_out,
                        device=device)
        if p in files:
            row["pair_files"] = files[p]
        log(f"{p} {m}: Dice {row['dice_mean']:.3f}, SDlogJ {row['sdlogj']:.3f}, {row['seconds']:.1f} s "
            f"(process {time.perf_counter() - t:.0f} s)")
        rows.append(row)
        atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
    return [r for r in rows if r["pair"] in pairs and r["method"] in names]
