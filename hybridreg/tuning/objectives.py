"""Trial objectives: a trial's config run on the bundled validation (or test) pairs and on copies
of them drawn from their label maps with random contrasts (``SearchSpace.synth_contrasts``), registered by
the register service (:func:`hybridreg.service.run_solver`: a diverged trial fails) and scored
by :func:`hybridreg.metrics.score_registration`: ``dice`` (mean over the pairs, label policy
``"auto"``; maximised), ``folding`` (the largest %|J|≤0, the
outcome constraint ``folding ≤ τ``) and ``sdlogj`` (mean SDlogJ, the second Pareto objective).
"""

import tempfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.sources import Volume, bundled, load_dataset
from ..metrics import score_registration
from ..service import device_of, run_solver
from ..solvers import get_solver
from ..synthesis import synthesize
from .space import SearchSpace, apply_params


def _synthetic(v: Volume, spacing: tuple, gen: torch.Generator) -> Volume:
    image, labels = synthesize(torch.from_numpy(v.labels.astype(np.int64))[None, None], spacing, generator=gen)
    return Volume(f"{v.subject_id}~synth", image[0, 0].numpy(), labels[0, 0].numpy().astype(np.int32))


def _pairs(space: SearchSpace, split: str) -> tuple[list, tuple]:
    """The bundled pairs of ``split`` (the first ``space.max_pairs``; 0 = all), then
    ``space.synth_contrasts`` copies of each with both images drawn from their label maps
    (seeded by ``space.seed``: every trial sees the same images), and their spacing. Loaded and
    drawn once per process and setting (:func:`_load_pairs`), not once per trial."""
    pairs, spacing = _load_pairs(space.resolution, split, space.max_pairs, space.synth_contrasts, space.seed)
    return list(pairs), spacing


@lru_cache(maxsize=4)
def _load_pairs(resolution: float, split: str, max_pairs: int, synth_contrasts: int, seed: int) -> tuple[tuple, tuple]:
    ds = bundled(resolution)
    pairs = ds.pairs(split)[: max_pairs or None]
    gen = torch.Generator().manual_seed(seed)
    synth = [(_synthetic(f, ds.spacing, gen), _synthetic(m, ds.spacing, gen))
             for _ in range(synth_contrasts) for f, m in pairs]
    return tuple(pairs + synth), ds.spacing


def _score(register: Callable[..., torch.Tensor], pairs: list) -> dict:
    """Mean Dice, max %|J|≤0 and mean SDlogJ of ``register(fixed, moving, fixed_labels) ->
    displacement`` (:func:`hybridreg.metrics.score_registration`)."""
    scores = [score_registration(f.labels, m.labels, register(torch.from_numpy(f.image)[None, None],
                                                             torch.from_numpy(m.image)[None, None],
                                                             torch.from_numpy(f.labels.astype(np.int64))[None, None]), "auto")
              for f, m in pairs]
    return {"dice": float(np.mean([s["dice_mean"] for s in scores])),
            "folding": float(np.max([s["folding_percent"] for s in scores])),
            "sdlogj": float(np.mean([s["sdlogj"] for s in scores]))}


def solver_objective(space: SearchSpace, params: dict, split: str = "val", device: str | None = None) -> dict:
    """Trial of a solver run with the trial's config (the instance solver, or the conditional
    network at the trial's hyperparameters and region weights): register every bundled pair of
    ``split`` (atlas ← subject, ``space.resolution`` mm; ``"val"`` while tuning, ``"test"`` to
    check the chosen configuration) on ``device`` (``cpu``, the default, ``cuda`` or ``cuda:N``:
    ``hybridreg tune --device``), with the fixed labels as regions where the config's λ is
    region-wise; returns mean Dice, max %|J|≤0 and mean SDlogJ.

    Raises:
        ValueError: an unknown ``split`` or an unusable ``device`` (:func:`hybridreg.service.device_of`).
    """
    dev = device_of(device)
    solver = get_solver(space.solver)
    cfg = replace(apply_params(space, params), progress=False)
    pairs, spacing = _pairs(space, split)
    regions = getattr(cfg, "lambda_mode", None) == "regions"
    return _score(lambda f, m, fl: run_solver(solver, cfg, f, m, spacing, dev, **({"regions": fl} if regions else {}))
                  .result.displacement, pairs)


def learned_objective(space: SearchSpace, params: dict, split: str = "val", device: str | None = None) -> dict:
    """Trial of the learned solver: train with the trial's config (its ``steps`` is the
    per-trial training budget) on ``space.train_data`` on ``device`` (as :func:`solver_objective`),
    then score the network on the bundled pairs of ``split``."""
    from learned.train import train
    from learned.weights import predict

    dev = device_of(device)
    cfg = apply_params(space, params)
    data = load_dataset(space.train_data, arg="train_data")
    pairs, spacing = _pairs(space, split)
    with tempfile.TemporaryDirectory() as tmp:
        net = train(cfg, data, Path(tmp) / "run", progress=False, device=dev)
    net.eval()
    return _score(lambda f, m, fl: predict(net, f.to(dev), m.to(dev), cfg.objective, spacing)[1].displacement, pairs)


OBJECTIVES = {"instance": solver_objective, "learned": learned_objective, "learned-conditional": solver_objective}
