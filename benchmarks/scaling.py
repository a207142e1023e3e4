"""Seconds and peak memory of one instance-optimization iteration against voxel count.

The bundled 1 mm demo pair is resampled (trilinear) to each grid: 64³, then the brain's
field of view at 2, 1.5, 1.25 and 1 mm. Each grid runs in a fresh process; one Adam
iteration on the full image grid (velocity and voxelwise λ on the image grid) is split into
integration (preconditioner, scaling and squaring, up-sampling), warp, LNCC, regularizer +
hyperprior, backward and the Adam step (``benchmarks.instance_speed.time_level``), median
over ``repeats`` iterations after one warm-up. Memory: peak RSS of the process minus its
RSS before the first iteration (the iteration's working set on CPU).
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from benchmarks.common import rss_mb, run_python

GRIDS = ("64x64x64", "2", "1.5", "1.25", "1")


def _grid_shape(spec: str, shape_1mm: tuple[int, ...]) -> tuple[int, ...]:
    if "x" in spec:
        return tuple(int(s) for s in spec.split("x"))
    mm = float(spec)
    return tuple(max(8, int(round(n / mm))) for n in shape_1mm)


def child(spec: str, repeats: int) -> dict:
    """Time one grid in this process."""
    from benchmarks.instance_speed import STEPS, time_level
    from hybridreg import data
    from hybridreg.io import normalize_intensity
    from hybridreg.spatial import resize_image
    from instance_opt import InstanceOptConfig

    fid, mid = data.demo_pair()
    fs, ms = data.load_subject(fid, 1), data.load_subject(mid, 1)
    shape = _grid_shape(spec, fs.image.shape)
    f, m = (resize_image(torch.from_numpy(normalize_intensity(s.image))[None, None], shape) for s in (fs, ms))
    spacing = tuple(n1 * h / n for n1, h, n in zip(fs.image.shape, fs.spacing, shape))
    cfg = replace(InstanceOptConfig(), level_spacing=(0.25,), iterations=(1,), control_factor=(1,), progress=False)
    before = rss_mb()
    med = time_level(f, m, spacing, cfg, 0, uniform=False, repeats=repeats)
    peak = rss_mb()
    return {"grid": spec, "shape": list(shape), "voxels": int(torch.tensor(shape).prod()),
            "spacing_mm": [round(s, 3) for s in spacing], "steps": {k: med[k] for k in STEPS},
            "seconds_per_iteration": med["total"], "memory_mb": peak - before, "peak_rss_mb": peak,
            "device": "cpu", "threads": torch.get_num_threads(), "repeats": repeats}


def run_scaling(grids=GRIDS, repeats: int = 3, log=print) -> list[dict]:
    """One fresh process per grid; returns the rows."""
    rows = []
    for g in grids:
        r = json.loads(run_python(["-m", "benchmarks", "scaling-child", g, "--repeats", str(repeats)]).strip().splitlines()[-1])
        log(f"scaling {g}: {r['voxels']:,} voxels, {r['seconds_per_iteration']:.3f} s/iteration, {r['memory_mb']:.0f} MB")
        rows.append(r)
    return rows
