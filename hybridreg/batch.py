"""Batch registration of a dataset (``hybridreg batch``): a list of pairs, one register-service
run per pair, resumable, failures recorded, sharded over ``torchrun`` ranks, one table at the end.

* :func:`read_pairs` -- the pairs of a manifest: a ``.csv`` with a header
  ``fixed,moving[,fixed_labels,moving_labels,fixed_mask,moving_mask,fixed_landmarks,moving_landmarks,id]``
  (landmarks: :func:`hybridreg.io.read_landmarks`, scored by TRE), a ``.json`` list of
  such objects, or a Learn2Reg / LUMIR ``dataset.json`` (its pair lists such as
  ``registration_val`` or ``validation`` hold ``{"fixed", "moving"}`` objects; labels and masks
  come from the entries of the same image in its other lists (``{"image", "label", "mask"}``) or
  from the sibling ``labels*`` / ``masks*`` folder of an ``images*`` folder). Relative paths are
  relative to the manifest's folder.
* :func:`run_batch` -- every pair through the stages of :func:`hybridreg.service.register_files`
  into ``OUT/pairs/<id>/`` (the same files as ``hybridreg register``); with ``--batch-size B``
  the solver takes B pairs that share their grids at once (batched instance optimization). A
  pair whose folder holds ``metrics.json`` is finished (it is moved into place last) and never
  redone, so a killed run re-run with the same command goes on where it stopped (a
  ``metrics.json`` that does not read, damaged, counts as not finished: the pair runs again); a pair that
  fails (an unreadable file, a failed affine stage, a diverged optimization) is recorded in
  ``OUT/failed/<id>.json`` with its error (and its traceback, for an error that is not the input's:
  a plug-in solver's crash, say) and the others go on. A label map or mask off its
  image's grid is found from the headers when the manifest is read, and refuses the whole
  manifest (naming the row) before any pair runs. Under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` of ``W`` takes
  pairs ``r, r + W, ...`` (on ``cuda:LOCAL_RANK`` for a CUDA device, as CPU processes otherwise);
  the ranks meet at a barrier (gloo / nccl) and rank 0 merges.
* :func:`merge` -- ``OUT/metrics.csv`` (one row per pair, manifest order, with its status,
  error and warnings: ``metrics.json``'s, :func:`hybridreg.io.placement_warnings` and
  :func:`hybridreg.solvers.result_warnings`, joined by `` | ``),
  ``OUT/dice_per_structure.csv``, ``OUT/summary.json`` and ``OUT/summary.md`` (means,
  per-structure Dice, the seconds of each stage: reading, affine, registration, metrics,
  writing; the pairs registered with a warning).

``OUT/batch.json`` records the run's settings (solver, config, overrides, options, the pairs); a
re-run into the same ``OUT`` with other settings is refused, so one table never mixes settings.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import atomic_output, atomic_write_text, existing_file, read_yaml, write_json
from .io import Geometry, check_same_grid, image_stem, read_geometry
from .progress import bar as progress_bar, log
from .service import Prepared, batch_key, device_of, finish_pair, output_folder, output_names, parse_eval_labels, prepare_pair, \
    solve_pairs, solver_and_config
from .solvers import kept_start_warning

__all__ = ["PairEntry", "read_pairs", "run_batch", "merge", "BatchSummary", "PAIR_KEYS"]

PAIR_KEYS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask", "fixed_landmarks",
             "moving_landmarks")
"""The file columns of a manifest row (``fixed`` and ``moving`` required)."""

L2R_PAIR_LISTS = ("registration_val", "registration_test", "validation", "test")
"""Learn2Reg / LUMIR ``dataset.json`` lists of pairs, the first present being the default split."""


@dataclass(frozen=True)
class PairEntry:
    """One pair of a manifest: ``id`` (the output folder's name) and absolute file paths
    (``None`` where not given); FIXED and MOVING may be on any grids (``hybridreg register``)."""

    id: str
    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    fixed_mask: str | None = None
    moving_mask: str | None = None
    fixed_landmarks: str | None = None
    moving_landmarks: str | None = None


def _sibling(image: Path, kind: str) -> str | None:
    """``labelsTr/x.nii.gz`` for ``imagesTr/x.nii.gz`` (``kind`` = labels / masks), if it exists."""
    folder = image.parent.name
    if not folder.startswith("images"):
        return None
    candidate = image.parent.parent / (kind + folder[len("images"):]) / image.name
    return str(candidate) if candidate.is_file() else None


def _l2r_rows(doc: dict, split: str | None, arg: str) -> list[dict]:
    """The pair rows of a Learn2Reg / LUMIR ``dataset.json``, with labels and masks looked up."""
    pair_lists = [k for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(e, dict) and "fixed" in e
                                                                                and "moving" in e for e in v)]
    if not pair_lists:
        raise ValueError(f"`{arg}`: the dataset.json has no list of {{\"fixed\", \"moving\"}} pairs")
    if split is None:
        split = next((k for k in L2R_PAIR_LISTS if k in pair_lists), pair_lists[0])
    if split not in pair_lists:
        raise ValueError(f"`--split`: {split!r} is not a pair list of {arg}; it has {pair_lists}")
    by_image: dict[str, dict] = {}
    for key, entries in doc.items():
        if isinstance(entries, list):
            for e in entries:
                if isinstance(e, dict) and "image" in e:
                    by_image[str(e["image"])] = e
    rows = []
    for e in doc[split]:
        row = {"fixed": e["fixed"], "moving": e["moving"]}
        for side in ("fixed", "moving"):
            known = by_image.get(str(e[side]), {})
            if "label" in known:
                row[f"{side}_labels"] = known["label"]
            if "mask" in known:
                row[f"{side}_mask"] = known["mask"]
        rows.append(row)
    return rows


def read_pairs(path: str | os.PathLike, split: str | None = None, *, arg: str = "PAIRS") -> list[PairEntry]:
    """The pairs listed in a manifest (module docstring), in order, with unique ids.

    Args:
        path: ``.csv``, ``.json`` list, or Learn2Reg / LUMIR ``dataset.json``.
        split: the dataset.json pair list to use (default: the first of
            :data:`L2R_PAIR_LISTS` present); not allowed with a plain manifest.

    Raises:
        FileNotFoundError: the manifest, or a file it lists, is missing (names the row).
        ValueError: unreadable manifest, a row without ``fixed``/``moving``, an unknown column,
            labels or landmarks for one image of a pair only, a label map or mask (listed, or a
            Learn2Reg sibling) whose header puts it on another grid than its image's, an invalid
            or repeated id, no pairs. Messages name ``arg``.
    """
    p = existing_file(path, arg, "manifest")
    try:
        if p.suffix.lower() == ".csv":
            with open(p, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" starts with a BOM
                rows: Any = list(csv.DictReader(fh))
        elif p.suffix.lower() == ".json":
            rows = json.loads(p.read_text(encoding="utf-8-sig"))
        else:
            raise ValueError(f"`{arg}`: a manifest must be .csv or .json, got {p.name}")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise ValueError(f"`{arg}`: cannot read {p}: {' '.join(str(e).split())}") from None
    l2r = isinstance(rows, dict)
    if l2r:
        rows = _l2r_rows(rows, split, arg)
    elif split is not None:
        raise ValueError(f"`--split` applies to a Learn2Reg / LUMIR dataset.json, not to the manifest {p.name}")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"`{arg}`: {p} lists no pairs")
    root = p.parent
    pairs, seen, headers = [], set(), {}
    for i, row in enumerate(rows, start=1):
        where = f"`{arg}` row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with `fixed` and `moving`, got {row!r}")
        unknown = sorted(set(row) - set(PAIR_KEYS) - {"id"})
        if unknown:
            raise ValueError(f"{where}: unknown column(s) {unknown}; valid are {['id', *PAIR_KEYS]}")
        files: dict[str, str | None] = {}
        for key in PAIR_KEYS:
            value = row.get(key)
            if value in (None, ""):
                files[key] = None
                continue
            f = Path(os.path.abspath(root / str(value)))  # absolute, normalised (symbolic links kept)
            if not (f.is_file() or key in ("fixed", "moving") and f.is_dir()):  # an image may be a DICOM series' folder
                raise FileNotFoundError(f"{where}: `{key}` {'is a folder' if f.is_dir() else 'not found'}: {f}")
            files[key] = str(f)
        if files["fixed"] is None or files["moving"] is None:
            raise ValueError(f"{where} needs non-empty `fixed` and `moving`")
        for side in ("fixed", "moving"):  # the Learn2Reg folder convention: imagesTr/ -> labelsTr/, masksTr/
            for kind, key in (("labels", f"{side}_labels"), ("masks", f"{side}_mask")):
                if l2r and files[key] is None:
                    files[key] = _sibling(Path(files[side]), kind)
        for a, b in (("fixed_labels", "moving_labels"), ("fixed_landmarks", "moving_landmarks")):
            if (files[a] is None) != (files[b] is None):
                if l2r and a == "fixed_labels":
                    files[a] = files[b] = None  # the dataset has one image's labels: this pair is scored without Dice
                else:
                    raise ValueError(f"{where}: `{a}` and `{b}` must be given together")
        _check_row_grids(files, where, headers)
        pid = str(row.get("id") or f"{image_stem(files['fixed'])}__{image_stem(files['moving'])}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", pid):
            made = "" if row.get("id") else " (made from the file names: give the row an `id` column)"
            raise ValueError(f"{where}: `id` {pid!r}{made} must be a folder name of letters, digits and . _ + -")
        if pid in seen:
            raise ValueError(f"{where}: id {pid!r} repeats an earlier row (give each pair its own `id`)")
        seen.add(pid)
        pairs.append(PairEntry(pid, **files))
    return pairs


def _check_row_grids(files: dict[str, str | None], where: str, headers: dict[str, Geometry | None]) -> None:
    """Raise ValueError (naming the row and the columns) when a row's label map or mask is not
    on its image's grid, from the files' headers alone, so that a bad row is found before any
    pair runs; a header that cannot be read is left to that pair's own reading (a failed pair).
    ``headers`` caches the grids by path across the manifest's rows."""
    def header(path: str) -> Geometry | None:
        if path not in headers:
            try:
                headers[path] = read_geometry(path)
            except ValueError:
                headers[path] = None
        return headers[path]

    for side in ("fixed", "moving"):
        image = None
        for key in (f"{side}_labels", f"{side}_mask"):
            if files[key] is None:
                continue
            image = image or header(str(files[side]))
            other = header(str(files[key]))
            if image is not None and other is not None:
                try:
                    check_same_grid(image, other, (side, key))
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None


@dataclass
class BatchSummary:
    """What a batch run did: ``done`` / ``failed`` / ``missing`` pair ids (``missing``: not
    finished by any rank, e.g. a rank was killed), the paths of the merged outputs, and the
    finished pairs' warnings (pair id → the lines of their ``metrics.json``: headers other tools
    place otherwise, :func:`hybridreg.io.placement_warnings`, and
    :func:`hybridreg.solvers.result_warnings`; filled by :func:`merge`)."""

    done: list[str]
    failed: list[str]
    missing: list[str]
    table: Path
    summary: Path
    warnings: dict[str, list[str]] = field(default_factory=dict)


def _dist_info() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), ws) if ws > 1 else (0, 1)


def _settings(pairs: Sequence[PairEntry], options: dict) -> dict:
    return {"options": options, "pairs": [asdict(p) for p in pairs]}


def _region_settings(cfg) -> dict | None:
    """A conditional config's region weights as ``batch.json`` records them: every ``label: λ``
    and the ``default`` of the labels not listed (both change the result), or None."""
    values = getattr(cfg, "region_lambda", None)
    return {**{str(k): v for k, v in values.items()}, "default": cfg.region_default} if values else None


BATCH_FILES = ("metrics.csv", "dice_per_structure.csv", "summary.json", "summary.md", "failed", "pairs")
"""What a batch run writes in ``--out`` besides ``batch.json``: a fresh run (no ``batch.json`` of an
earlier one) refuses an ``--out`` that holds any of them, which it would replace (the user's own
files, the manifest itself among them)."""


def _check_settings(out: Path, settings: dict) -> None:
    """Record the run's settings in ``out/batch.json``, or refuse a resume with other settings, a
    ``batch.json`` no batch run wrote, or a fresh run into a folder holding :data:`BATCH_FILES`."""
    path = out / "batch.json"
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not isinstance(earlier, dict) or not isinstance(earlier.get("options"), dict) or "pairs" not in earlier:
            raise ValueError(f"`--out` {out} holds a batch.json that cannot be read as a batch run's settings (damaged, or"
                             " another program's; it would be replaced); choose a new --out")
        if earlier != json.loads(json.dumps(settings)):
            diff = sorted(k for k in set(earlier["options"]) | set(settings["options"])
                          if earlier["options"].get(k) != settings["options"].get(k))
            what = f"options {diff}" if diff else "the list of pairs"
            raise ValueError(f"`--out` {out} holds a batch run with other settings ({what} differ); re-run it with the"
                             " same command to resume, or choose a new --out")
    else:
        held = [name for name in BATCH_FILES if (out / name).exists()]
        if held:
            raise ValueError(f"`--out` {out} holds {', '.join(held)}, which a batch run writes, and no batch.json of an"
                             " earlier run to resume: they would be replaced; choose a new --out")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2))


def run_batch(pairs: Sequence[PairEntry], out: str | os.PathLike, *, solver: str = "instance",
              config: str | os.PathLike | None = None, overrides: Sequence[str] = (), weights: str | None = None,
              device: str | None = None, eval_labels: str = "auto", affine: str = "affine", init: str = "geometry",
              affine_metric: str = "ncc", outputs: str = "transforms", batch_size: int = 1,
              progress: bool = True, region_lambda: str | os.PathLike | None = None) -> BatchSummary:
    """Register every pair of ``pairs`` into ``out/pairs/<id>/`` and merge the results.

    Args:
        pairs: from :func:`read_pairs`. out: the batch folder.
        solver, config, overrides, weights, device, eval_labels, affine, init, affine_metric, outputs, region_lambda:
            as ``hybridreg register`` (:func:`hybridreg.service.register_files`), the same for
            every pair (``outputs`` default ``transforms``: no inverse, images or figure, the
            per-pair writing time that dominates a dataset at 1 mm). Under torchrun a CUDA
            ``device`` becomes ``cuda:LOCAL_RANK``.
        batch_size: pairs solved together in one optimization (batched instance optimization,
            :func:`hybridreg.service.solve_pairs`): each group of ``batch_size`` consecutive
            pairs of this rank that share their grids (:func:`hybridreg.service.batch_key`)
            is solved at once; the results equal one-pair runs' up to floating-point order,
            except that with the instance solver's ``crop`` (default) the pairs of one
            optimization share one foreground box, the union of theirs, so a pair whose own box
            is smaller moves a little (``crop: false`` keeps them equal). A resume must use the
            same ``batch_size``. 1 (default): one pair at a time. Memory grows with it.
        progress: a tqdm bar over this rank's pairs (the solver's own bars stay off).

    Returns:
        :class:`BatchSummary` (on every rank; the merged files are written by rank 0).

    Raises:
        ValueError: ``out`` is a file, or holds a batch run with other settings; an invalid
            solver, config, override, device or ``batch_size`` (checked before any pair runs).
        KeyboardInterrupt: passed on (finished pairs stay finished; the running one leaves
            nothing behind).
    """
    out = output_folder(out)
    output_names(outputs)
    unlabelled = [p.id for p in pairs if p.fixed_labels is None]
    if parse_eval_labels(eval_labels) != "auto" and unlabelled:  # as `register`: no label maps, nothing to score
        raise ValueError(f"`--eval-labels` {eval_labels!r} needs label maps, and {len(unlabelled)} pair(s) have none"
                         f" ({', '.join(unlabelled[:3])}{', …' if len(unlabelled) > 3 else ''}); leave it at 'auto' or give them labels")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`--batch-size` must be an integer >= 1, got {batch_size!r}")
    rank, world = _dist_info()
    own_group = False
    solver_obj, cfg = solver_and_config(solver, config, weights, False, overrides, region_lambda)  # a bad one fails here, once
    device_of(device)
    if world > 1:
        import torch
        import torch.distributed as dist

        if device and device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(torch.device(device))
        if not dist.is_initialized():
            # pairs take minutes each and ranks finish apart: the barrier waits as long as a run can take
            dist.init_process_group("nccl" if device and device.startswith("cuda") else "gloo", timeout=timedelta(days=7))
            own_group = True
    options = {"solver": solver, "config": None if config is None else read_yaml(config, arg="--config"),
               "overrides": list(overrides), "weights": weights, "eval_labels": eval_labels, "affine": affine,
               "init": init, "affine_metric": affine_metric, "outputs": outputs,
               "region_lambda": _region_settings(cfg),
               # batched pairs share one foreground box with `crop` (instance_opt.foreground_box): results move a little
               **({"batch_size": batch_size} if batch_size > 1 else {})}
    refused = None
    if rank == 0:
        try:
            _check_settings(out, _settings(pairs, options))
        except ValueError as e:
            refused = str(e)
    if world > 1:  # every rank learns rank 0's verdict before any pair runs
        verdict = [refused]
        dist.broadcast_object_list(verdict, src=0)
        refused = verdict[0]
    if refused:
        raise ValueError(refused)
    dev = device_of(device)  # after torchrun's rank picked its GPU
    mine = [p for p in list(pairs)[rank::world] if _finished(out, p.id) is None]
    bar = progress_bar(total=len(mine), desc=f"batch (rank {rank}/{world})" if world > 1 else "batch", unit="pair",
                       enabled=progress, dynamic_ncols=True)
    ended = [0]  # pairs finished or failed, for the log lines (a bar that is not drawn does not count)
    where = f" on rank {rank}/{world}" if world > 1 else ""

    def failed(pair: PairEntry, e: Exception) -> None:
        error = f"{type(e).__name__}: {' '.join(str(e).split())}"
        # the traceback for errors that are not the input's (a plug-in solver's crash, a bug): where it happened
        trace = None if isinstance(e, (ValueError, FileNotFoundError)) else "".join(traceback.format_exception(e))[-4000:]
        (out / "failed").mkdir(parents=True, exist_ok=True)  # only when a pair fails
        atomic_write_text(out / "failed" / f"{pair.id}.json",
                          json.dumps({"id": pair.id, "error": error, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      **({"traceback": trace} if trace else {})}, indent=2))
        bar.write(f"pair {pair.id} failed: {error if len(error) <= 400 else error[:400] + ' ...'} (in full: failed/{pair.id}.json)")
        bar.update()
        ended[0] += 1

    def solve_group(group: list[tuple[PairEntry, Prepared]]) -> None:
        try:
            results = solve_pairs([p.inputs for _, p in group], solver_obj, cfg, dev, [p.pre for _, p in group])
        except Exception as e:  # noqa: BLE001 -- the group's failure is each of its pairs'; the others go on
            results = [e] * len(group)
        for (pair, prepared), solved in zip(group, results):
            try:
                if isinstance(solved, Exception):
                    raise solved
                m = finish_pair(prepared, solved, solver_obj.name)
            except Exception as e:  # noqa: BLE001
                failed(pair, e)
                continue
            (out / "failed" / f"{pair.id}.json").unlink(missing_ok=True)
            bar.update()
            if "dice_after" in m:
                bar.set_postfix(dice=f"{m['dice_after']['mean']:.3f}", sdlogj=f"{m['sdlogj']:.3f}")
            ended[0] += 1
            log(f"pair {pair.id} done ({ended[0]} of {len(mine)}{where})" + (f": Dice {m['dice_after']['mean']:.3f}, SDlogJ"
                f" {m['sdlogj']:.3f}" if "dice_after" in m else ""), enabled=progress)

    waiting: dict[tuple, list[tuple[PairEntry, Prepared]]] = {}  # pairs read and aligned, by the grids they share
    for pair in mine:
        try:
            prepared = prepare_pair(pair.fixed, pair.moving, out / "pairs" / pair.id, fixed_labels=pair.fixed_labels,
                                    moving_labels=pair.moving_labels, fixed_mask=pair.fixed_mask,
                                    moving_mask=pair.moving_mask, eval_labels=eval_labels, outputs=outputs, overwrite=True,
                                    affine=affine, init=init, affine_metric=affine_metric, config=config, weights=weights,
                                    fixed_landmarks=pair.fixed_landmarks, moving_landmarks=pair.moving_landmarks)
        except Exception as e:  # noqa: BLE001 -- one pair's failure is recorded; the others go on
            failed(pair, e)
            continue
        key = batch_key(prepared.inputs, prepared.pre)
        waiting.setdefault(key, []).append((pair, prepared))
        if len(waiting[key]) == batch_size:
            solve_group(waiting.pop(key))
    for group in waiting.values():  # the last, incomplete groups
        solve_group(group)
    bar.close()
    if world > 1:
        dist.barrier()
    summary = merge(pairs, out) if rank == 0 else _status([_row(p, out) for p in pairs], out)
    if own_group:
        dist.destroy_process_group()
    return summary


def _finished(out: Path, pair_id: str) -> dict | None:
    """A finished pair's ``metrics.json``, or ``None`` where the pair has none that can be read (a
    damaged file counts as not finished: the pair runs again and replaces it)."""
    try:
        m = json.loads((out / "pairs" / pair_id / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    complete = isinstance(m, dict) and isinstance(m.get("lambda"), dict) and "mean" in m["lambda"] and isinstance(
        m.get("seconds"), dict)
    return m if complete else None


def _status(rows: Sequence[dict], out: Path) -> BatchSummary:
    """The pairs' states from their :func:`_row` (each pair's files read once)."""
    ids = {state: [r["id"] for r in rows if r["status"] == state] for state in ("done", "failed", "missing")}
    return BatchSummary(ids["done"], ids["failed"], ids["missing"], out / "metrics.csv", out / "summary.json")


STAGES = ("reading", "affine", "registration", "metrics", "writing", "total")
"""The seconds of each stage of a pair, as ``metrics.json`` records them."""

COLUMNS = ("id", "status", "error", "fixed", "moving", "dice_before", "dice_affine", "dice", "hd95_mm", "tre_before_mm",
           "tre_affine_mm", "tre_mm", "folding_percent",
           "ndv_percent", "sdlogj", "jacobian_min", "lambda_mean", *(f"seconds_{s}" for s in STAGES), "peak_memory_mb",
           "device", "warnings")


def _row(pair: PairEntry, out: Path) -> dict:
    row: dict[str, Any] = {"id": pair.id, "fixed": pair.fixed, "moving": pair.moving}
    failed_path = out / "failed" / f"{pair.id}.json"
    if (m := _finished(out, pair.id)) is not None:
        mean = lambda key: (m.get(key) or {}).get("mean")  # noqa: E731
        row.update(status="done", dice_before=mean("dice_before"), dice_affine=mean("dice_after_affine"), dice=mean("dice_after"),
                   hd95_mm=mean("hd95_mm_after"), folding_percent=m.get("folding_percent"), ndv_percent=m.get("ndv_percent"),
                   **{f"tre_{k}mm": (m.get("tre_mm") or {}).get(s, {}).get("mean")
                      for k, s in (("before_", "before"), ("affine_", "after_affine"), ("", "after"))},
                   sdlogj=m.get("sdlogj"), jacobian_min=m.get("jacobian_min"), lambda_mean=m["lambda"]["mean"],
                   peak_memory_mb=m.get("peak_memory_mb"), device=m.get("device"),
                   **{f"seconds_{s}": m["seconds"].get(s) for s in STAGES})
        row["_per_label"] = (m.get("dice_after") or {}).get("per_label", {})
        levels = m.get("levels", [])  # a pair finished before metrics.json recorded warnings: from its levels
        row["_warnings"] = m["warnings"] if "warnings" in m else [
            kept_start_warning(k + 1, len(levels), h["shape"], h["spacing_mm"], h["iterations"])
            for k, h in enumerate(levels) if h.get("kept_start")]
        row["warnings"] = " | ".join(row["_warnings"])
    elif failed_path.is_file():
        try:
            error = json.loads(failed_path.read_text(encoding="utf-8"))["error"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError):
            error = f"(its record {failed_path} cannot be read)"
        row.update(status="failed", error=error)
    else:
        row.update(status="missing")
    return row


def _stats(values: list) -> dict | None:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not v.size:
        return None
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def merge(pairs: Sequence[PairEntry], out: str | os.PathLike) -> BatchSummary:
    """Write the batch's tables from the pair folders (module docstring); safe to re-run.

    Returns:
        :class:`BatchSummary` of the pairs' states and the finished pairs' warnings.
    """
    out = Path(out)
    rows = [_row(p, out) for p in pairs]
    labels = sorted({int(k) for r in rows for k in r.get("_per_label", {})})
    with atomic_output(out / "metrics.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with atomic_output(out / "dice_per_structure.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *labels])
        w.writerows([r["id"], *(r["_per_label"].get(str(k)) for k in labels)] for r in rows if "_per_label" in r)
    status = _status(rows, out)
    done = [r for r in rows if r["status"] == "done"]
    summary = {
        "pairs": len(rows), "done": len(status.done), "failed": {r["id"]: r["error"] for r in rows if r["status"] == "failed"},
        "missing": status.missing,
        "warnings": {r["id"]: r["_warnings"] for r in done if r["_warnings"]},
        "metrics": {k: _stats([r.get(k) for r in done]) for k in ("dice_before", "dice_affine", "dice", "hd95_mm", "tre_before_mm",
                                                                   "tre_affine_mm", "tre_mm",
                                                                   "folding_percent", "ndv_percent", "sdlogj", "peak_memory_mb")},
        "seconds": {s: _stats([r.get(f"seconds_{s}") for r in done]) for s in STAGES},
        "dice_per_structure": {str(k): _stats([r["_per_label"].get(str(k)) for r in done]) for k in labels},
    }
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", _markdown(summary))
    return replace(status, warnings=summary["warnings"])


def _markdown(s: dict) -> str:
    def fmt(st: dict | None, digits: int = 3) -> str:
        if st is None:
            return "–"
        if st["n"] == 1:  # no spread to report
            return f"{st['mean']:.{digits}f} (one pair)"
        return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} (median {st['median']:.{digits}f})"

    lines = [f"# Batch: {s['done']} of {s['pairs']} pairs registered", ""]
    if s["failed"]:
        lines += [f"Failed ({len(s['failed'])}):", ""] + [f"- `{k}`: {v}" for k, v in s["failed"].items()] + [""]
    if s["warnings"]:
        lines += [f"Registered with warnings ({len(s['warnings'])}), check these:", ""]
        lines += [f"- `{k}`: {w}" for k, ws in s["warnings"].items() for w in ws] + [""]
    if s["missing"]:
        lines += [f"Not run yet ({len(s['missing'])}): re-run the same command to finish them.", ""]
    lines += ["| metric | mean ± sd (median) |", "|---|---|"]
    lines += [f"| {k} | {fmt(v, 4 if 'percent' in k else 3)} |" for k, v in s["metrics"].items()]
    lines += ["", "| stage | seconds per pair: mean ± sd (median) |", "|---|---|"]
    lines += [f"| {k} | {fmt(v, 1)} |" for k, v in s["seconds"].items()]
    if s["dice_per_structure"]:
        lines += ["", "| structure | Dice mean ± sd (median) |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in s["dice_per_structure"].items()]
    return "\n".join(lines) + "\n"
