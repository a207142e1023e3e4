"""Seconds and peak memory of one instance-optimization iteration against voxel count.

The bundled 1 mm demo pair is resampled (trilinear) to each grid: 64³, then the brain's
field of view at 2, 1.5, 1.25 and 1 mm. Each grid runs in a fresh process: the real solver
on one level on the full grid (velocity and voxelwise λ on the image grid), profiled by
:func:`benchmarks.instance_speed.profile_level`. Memory: peak RSS of the process minus its
RSS before the solver ran.
"""

from __future__ import annotations

from dataclasses import replace

from benchmarks.common import rss_mb, run_child

GRIDS = ("64x64x64", "2", "1.5", "1.25", "1")


def _grid_shape(spec: str, shape_1mm: tuple[int, ...]) -> tuple[int, ...]:
    if "x" in spec:
        return tuple(int(s) for s in spec.split("x"))
    mm = float(spec)
    return tuple(max(8, int(round(n / mm))) for n in shape_1mm)


def child(spec: str, repeats: int) -> dict:
    """Time one grid in this process."""
    import torch

    from benchmarks.instance_speed import NOT_STEPS, profile_level
    from hybridreg import data
    from hybridreg.io import normalize_intensity
    from hybridreg.solvers import get_solver
    from hybridreg.spatial import resize_image

    fs, ms = (data.load_subject(s, 1) for s in data.demo_pair())
    shape = _grid_shape(spec, fs.image.shape)
    f, m = (resize_image(torch.from_numpy(normalize_intensity(s.image))[None, None], shape) for s in (fs, ms))
    spacing = tuple(n1 * h / n for n1, h, n in zip(fs.image.shape, fs.spacing, shape))
    cfg = replace(get_solver("instance").default_config(), level_spacing=(0.25,), iterations=(1,), control_factor=(1,))
    before = rss_mb()
    med = profile_level(f, m, spacing, cfg, 0, repeats)
    peak = rss_mb()
    return {"grid": spec, "shape": list(shape), "voxels": int(torch.tensor(shape).prod()),
            "spacing_mm": [round(s, 3) for s in spacing], "steps": {k: v for k, v in med.items() if k not in NOT_STEPS},
            "seconds_per_iteration": med["total"], "memory_mb": peak - before, "peak_rss_mb": peak,
            "device": "cpu", "threads": torch.get_num_threads(), "repeats": repeats}


def run_scaling(grids=GRIDS, repeats: int = 3, log=print) -> list[dict]:
    """One fresh process per grid; returns the rows."""
    rows = []
    for g in grids:
        r = run_child("benchmarks.scaling:child", spec=g, repeats=repeats)
        log(f"scaling {g}: {r['voxels']:,} voxels, {r['seconds_per_iteration']:.3f} s/iteration, {r['memory_mb']:.0f} MB")
        rows.append(r)
    return rows
