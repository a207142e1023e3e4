"""Regularization prediction (method §3.1; Wang & Zhang, "Deep learning for regularization
prediction in diffeomorphic image registration", MELBA 2022): a CNN regresses a pair's global
λ from the two images, trained (supervised) on per-pair MAP estimates of λ
(``lambda_mode: map`` of the instance solver, ``configs/instance_map.yaml``); the solver
``learned-lambda`` then registers the pair by instance optimization with λ fixed at the
prediction, on the energy whose MAP the network learned (same grid, same likelihood), so the
MAP estimation's cost is replaced by one network pass.

* :class:`RegressorConfig`, :class:`LambdaRegressor` -- two image streams (5³ convolutions,
  batch norm, max-pooling), fused, global pooling and two fully connected layers → log λ.
* :func:`map_targets` -- the training targets: MAP λ of training pairs (real and scan-like).
* :func:`train_regressor`, :func:`save_regressor`, :func:`load_regressor`, :func:`predict_lambda`.
* :func:`map_config` -- the MAP estimation whose λ is learned; :data:`LEARNED_LAMBDA` -- the
  :class:`hybridreg.solvers.Solver` ``learned-lambda``.

``python -m learned.regressor --out DIR`` computes the targets on the bundled training split and
trains (the shipped weights: ``learned/weights/lambda_regressor/``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Sequence

import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from hybridreg.config import apply_overrides, atomic_output, atomic_write_text, bounded, check_bounds, from_dict, to_dict
from hybridreg.objective import ObjectiveConfig
from hybridreg.progress import bar as progress_bar, log as log_line
from hybridreg.regularization import check_spacing
from hybridreg.solvers import RegistrationResult, check_images
from hybridreg.spatial import gaussian_smooth, rescale_voxel_map, resize_image, warp
from instance_opt import InstanceOptConfig
from instance_opt import register_pair as instance_register_pair

from .weights import LEGACY_LNCC_EPS, read_weight_file

__all__ = ["RegressorConfig", "LambdaRegressor", "regressor_inputs", "training_frame", "TRAINING_ORIENTATION",
           "TRAINING_EXTENT_MM", "map_targets", "target_images", "train_regressor", "save_regressor",
           "load_regressor", "predict_lambda", "LearnedLambdaConfig", "LearnedLambdaSolver", "LEARNED_LAMBDA",
           "REGRESSOR_WEIGHTS", "map_config"]

REGRESSOR_FORMAT = "hybridreg-lambda-regressor-v1"
REGRESSOR_WEIGHTS = Path(__file__).parent / "weights" / "lambda_regressor" / "lambda_regressor.pt"
"""The shipped regressor (trained here on the bundled training split at 2 mm; README, log and
targets next to it)."""


def map_config() -> InstanceOptConfig:
    """The MAP estimation of a global λ whose estimates the regressor learns: the instance
    solver's defaults with ``lambda_mode: map``, the velocity on a 4× coarser grid and the
    8/4/2 mm pyramid (150/80/30 iterations: the instance default's before its one step at 1 mm,
    stop 47; the same settings as ``configs/instance_map.yaml``), with LNCC's ε at the 1e-5 the shipped
    regressor's targets and the strategies suites' MAP rows were computed with
    (:data:`learned.weights.LEGACY_LNCC_EPS`; the instance default is now 1e-6), on the whole grid
    (``crop`` off: MAP's λ depends on the domain's size through the prior's rank)."""
    return InstanceOptConfig(lambda_mode="map", control_factor=(4,), level_spacing=(8.0, 4.0, 2.0), iterations=(150, 80, 30),
                             objective=ObjectiveConfig(lncc_eps=LEGACY_LNCC_EPS), crop=False)


@dataclass(frozen=True)
class RegressorConfig:
    """The regressor network and its training (every number has a range, checked on construction).

    Attributes:
        channels: feature channels of each stream's first level (doubled per level).
        levels: convolution + pooling levels per stream.
        input_spacing: voxel size (mm) the images are resampled to before the network.
        steps: training steps. batch_size: pairs per step. lr: Adam learning rate.
        seed: seed of the weights' initialisation and the batches.
    """

    channels: int = bounded(8, 1, 128)
    levels: int = bounded(3, 1, 6)
    input_spacing: float = bounded(4.0, 0.5, 32.0)
    steps: int = bounded(1500, 0, 1_000_000)
    batch_size: int = bounded(4, 1, 256)
    lr: float = bounded(1e-3, 1e-6, 1.0)
    seed: int = bounded(0, 0, 2**31 - 1)

    def __post_init__(self) -> None:
        for name in ("channels", "levels", "steps", "batch_size", "seed"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"RegressorConfig: `{name}` must be an int, got {getattr(self, name)!r}")
        check_bounds(self)


def _stream(cfg: RegressorConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for k in range(cfg.levels):
        c = cfg.channels * 2**k
        layers += [nn.Conv3d(c_in, c, 5, padding=2), nn.BatchNorm3d(c), nn.ReLU(inplace=True), nn.MaxPool3d(2, ceil_mode=True)]
        c_in = c
    return nn.Sequential(*layers)


class LambdaRegressor(nn.Module):
    """``(fixed, moving) → log λ``: two convolutional streams (one per image; 5³ convolutions,
    batch norm, ReLU, 2× max-pooling per level), fused by concatenation and a 3³ convolution,
    averaged over space, then two fully connected layers (Wang & Zhang 2022, Fig. 3; method §3.1).

    ``forward(fixed, moving)``: ``(B, 1, *spatial)`` 3D images on one grid (any size, resampled by
    :func:`regressor_inputs` to ``input_spacing``) → ``(B,)`` log λ.
    """

    def __init__(self, config: RegressorConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or RegressorConfig()
        self.fixed_stream, self.moving_stream = _stream(cfg), _stream(cfg)
        c = cfg.channels * 2 ** (cfg.levels - 1)
        self.fusion = nn.Sequential(nn.Conv3d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm3d(2 * c), nn.ReLU(inplace=True),
                                    nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * c, 32), nn.ReLU(inplace=True), nn.Linear(32, 1))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if fixed.dim() != 5 or fixed.shape != moving.shape or fixed.shape[1] != 1:
            raise ValueError(f"LambdaRegressor: `fixed` and `moving` must be (B, 1, *spatial) 3D images on one grid, got"
                             f" {tuple(fixed.shape)} and {tuple(moving.shape)}")
        h = torch.cat([self.fixed_stream(fixed), self.moving_stream(moving)], 1)
        return self.head(self.fusion(h))[:, 0]


TRAINING_ORIENTATION = "LIA"
"""The orientation of the regressor's training grid (the bundled data's, :mod:`hybridreg.data`),
as SimpleITK names it (``DICOMOrientImageFilter``): tensor axes ``(z, y, x)`` point to
Anterior, Inferior, Left."""

TRAINING_EXTENT_MM = (224.0, 192.0, 160.0)
"""The physical extent (mm, tensor axis order in :data:`TRAINING_ORIENTATION`) of the training
grid: the field of view every training pair filled."""

_OPPOSITE = dict(zip("LRAPSI", "RLPAIS"))


def training_frame(image: torch.Tensor, spacing: Sequence[float], fixed_direction: Sequence[float]) -> torch.Tensor:
    """``image`` ``(B, C, *spatial)`` (3D, tensor axes in array order ``(z, y, x)``) on FIXED's
    (resized) grid, with voxel size ``spacing`` (mm per tensor axis) and FIXED's direction
    cosines ``fixed_direction`` (row-major 3×3 in ITK's axis order, as :attr:`hybridreg.io.Geometry.direction`), put into the training frame: its axes
    permuted and flipped to :data:`TRAINING_ORIENTATION` (the nearest, for an oblique grid, as
    SimpleITK's ``DICOMOrientImageFilter`` names it) and its extent cut or padded with zeros about
    the grid's centre to :data:`TRAINING_EXTENT_MM`. Whole voxels only: no interpolation, so a
    grid already in the training frame is returned unchanged.

    The regressor's prediction depends on the order of the axes (up to 5× over the six orders of
    a bundled pair, ``docs/results.md``), which the network learned from its one training
    orientation; the physical frame is what is common to every input.

    Raises:
        ValueError: not a 3D image, or ``fixed_direction`` not 9 numbers.
    """
    if image.dim() != 5 or len(spacing) != 3:
        raise ValueError(f"training_frame(): `image` must be (B, C, *spatial) 3D with 3 spacings, got {tuple(image.shape)}")
    if len(fixed_direction) != 9:
        raise ValueError(f"training_frame(): `fixed_direction` must be 9 direction cosines, got {len(fixed_direction)}")
    have = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in fixed_direction])[::-1]
    want = TRAINING_ORIENTATION[::-1]  # tensor axis order
    perm = [next(i for i, c in enumerate(have) if c in (w, _OPPOSITE[w])) for w in want]
    out = image.permute(0, 1, *[i + 2 for i in perm])
    flips = [j + 2 for j, (w, i) in enumerate(zip(want, perm)) if have[i] != w]
    if flips:
        out = out.flip(flips)
    pad: list[int] = []
    for j in reversed(range(3)):  # F.pad lists the last axis first; negative pads crop
        n, target = out.shape[2 + j], max(1, round(TRAINING_EXTENT_MM[j] / float(spacing[perm[j]])))
        lo = (target - n) // 2
        pad += [lo, target - n - lo]
    return F.pad(out, pad)


def regressor_inputs(fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float], input_spacing: float,
                     moving_map: torch.Tensor | None = None, moving_spacing: Sequence[float] | None = None,
                     fixed_direction: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images on FIXED's extent at about ``input_spacing`` mm, each normalised to zero
    mean and unit variance per pair. With ``moving_map`` (the affine stage's ``(B, 3, 4)`` map
    from FIXED's to MOVING's voxel indices) MOVING lies on its own grid (voxel size
    ``moving_spacing`` mm): it is resized on that grid first and then sampled on the coarse
    FIXED grid through the map, so a 1 mm pair costs no full-resolution interpolation. With
    ``fixed_direction`` (FIXED's direction cosines, :attr:`hybridreg.io.Geometry.direction`) both
    are then put into the training frame (:func:`training_frame`); without it the tensor axes
    are taken to be in that frame already.

    Returns:
        ``(fixed, moving)``, each ``(B, 1, *grid)`` on the coarse grid (in the training frame with
        ``fixed_direction``: extent :data:`TRAINING_EXTENT_MM`).
    """
    def coarse(shape, h):
        return tuple(max(8, int(round(n * hk / input_spacing))) for n, hk in zip(shape, h))

    shape = coarse(fixed.shape[2:], spacing)
    f = resize_image(fixed.mean(1, keepdim=True), shape)
    if moving_map is None:
        m = resize_image(moving.mean(1, keepdim=True), shape)
    else:
        m_shape = coarse(moving.shape[2:], moving_spacing if moving_spacing is not None else spacing)
        vm = rescale_voxel_map(moving_map, (fixed.shape[2:], shape), (moving.shape[2:], m_shape))
        m = warp(resize_image(moving.mean(1, keepdim=True), m_shape),
                 torch.zeros((fixed.shape[0], len(shape)) + shape, dtype=fixed.dtype, device=fixed.device), voxel_map=vm)
    if fixed_direction is not None:
        h_coarse = [n * hk / c for n, hk, c in zip(fixed.shape[2:], spacing, shape)]
        f, m = (training_frame(x, h_coarse, fixed_direction) for x in (f, m))
    return tuple((x - x.mean((1, 2, 3, 4), keepdim=True)) / x.std(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6) for x in (f, m))


def save_regressor(path: str | os.PathLike, net: LambdaRegressor, info: dict | None = None) -> None:
    """Write a regressor weight file atomically (``format``, ``config``, ``info``, ``state_dict``)."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_output(path) as tmp:
        torch.save({"format": REGRESSOR_FORMAT, "config": to_dict(net.config), "info": info or {}, "state_dict": state}, tmp)


def load_regressor(path: str | os.PathLike, device: torch.device | str | None = None, *, arg: str = "--weights"
                   ) -> tuple[LambdaRegressor, dict]:
    """Read a file written by :func:`save_regressor`: ``(network in eval mode, info)``.

    Raises:
        FileNotFoundError: missing file. ValueError: not (or a damaged) regressor weight file; names ``arg``.
    """
    p = Path(path)
    payload = read_weight_file(p, REGRESSOR_FORMAT, arg=arg)
    try:
        net = LambdaRegressor(from_dict(RegressorConfig, payload["config"], where="weights config"))
        net.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"`{arg}`: {p} is a damaged {REGRESSOR_FORMAT} weight file: {type(e).__name__}") from None
    return net.eval().to(device or "cpu"), payload.get("info", {})


def predict_lambda(net: LambdaRegressor, fixed: torch.Tensor, moving: torch.Tensor, spacing: Sequence[float],
                   moving_map: torch.Tensor | None = None, moving_spacing: Sequence[float] | None = None,
                   fixed_direction: Sequence[float] | None = None) -> torch.Tensor:
    """The predicted global λ, ``(B,)``, for ``(B, 1, *spatial)`` images on FIXED's grid (voxel
    size ``spacing`` mm), or MOVING on its own grid through ``moving_map``; with FIXED's
    ``fixed_direction`` both in the training frame (:func:`regressor_inputs`).

    Raises:
        ValueError: images that are not 3D ``(B, 1, *spatial)``, or a ``fixed_direction`` that is
            not 9 numbers (:func:`training_frame`).
    """
    with torch.no_grad():
        f, m = regressor_inputs(fixed, moving, spacing, net.config.input_spacing, moving_map, moving_spacing,
                                fixed_direction)
        return net(f.to(next(net.parameters()).dtype), m.to(next(net.parameters()).dtype)).exp().to(fixed.dtype)


# ----------------------------------------------------------------------------- training data and training

def _pair_image(vol, draw: int | None, spacing: Sequence[float], blur_mm: float = 0.0) -> torch.Tensor:
    """A training volume's image ``(1, 1, *spatial)``, or (``draw`` = a seed) a scan-like draw
    from its label map (:func:`hybridreg.synthesis.synthesize`); blurred by a Gaussian of std
    ``blur_mm`` mm when it is positive."""
    from hybridreg.synthesis import synthesize

    if draw is None:
        image = torch.from_numpy(vol.image)[None, None].float()
    else:
        image = synthesize(torch.from_numpy(vol.labels)[None, None].long(), spacing,
                           generator=torch.Generator().manual_seed(draw))[0]
    return gaussian_smooth(image, [blur_mm / float(h) for h in spacing]) if blur_mm > 0 else image


def target_images(spec: dict, by_id: dict, spacing: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed and moving images ``(1, 1, *spatial)`` of a :func:`map_targets` entry (its
    subjects, scan-like draws and blurs), as its MAP estimate saw them."""
    blur = spec.get("blur", [0.0, 0.0])
    return tuple(_pair_image(by_id[spec[k]], spec["synth"][i], spacing, blur[i]) for i, k in enumerate(("fixed", "moving")))


def _specs(train: list, n: int, synth_prob: float, gen: torch.Generator, first_index: int, blur_mm: float) -> list[dict]:
    """``n`` random pairs of ``train``, each image a scan-like draw with probability ``synth_prob``;
    with ``blur_mm`` > 0 one image of each pair (fixed or moving, at random) blurred by a Gaussian of
    std U(blur_mm / 4, blur_mm) mm."""
    specs = []
    for i in range(n):
        a, b = torch.randperm(len(train), generator=gen)[:2].tolist()
        draws = [int(torch.randint(0, 2**31 - 1, (), generator=gen)) if float(torch.rand((), generator=gen)) < synth_prob
                 else None for _ in range(2)]
        spec = {"fixed": train[a].subject_id, "moving": train[b].subject_id, "synth": draws, "index": first_index + i}
        if blur_mm > 0:
            sigma = blur_mm * (0.25 + 0.75 * float(torch.rand((), generator=gen)))
            spec["blur"] = [sigma, 0.0] if float(torch.rand((), generator=gen)) < 0.5 else [0.0, sigma]
        specs.append(spec)
    return specs


BLUR_INDEX = 1_000_000
"""Index of the first blurred pair of :func:`map_targets` (the plain pairs count from 0)."""


def map_targets(dataset, n_pairs: int, map_config: InstanceOptConfig, *, synth_prob: float = 0.5, seed: int = 0,
                blur_pairs: int = 0, blur_mm: float = 4.0, cache: str | os.PathLike | None = None,
                progress: bool = True) -> list[dict]:
    """MAP estimates of λ for ``n_pairs`` random (fixed, moving) pairs of the dataset's training
    split, each image replaced with probability ``synth_prob`` by a scan-like draw from its label
    map (:func:`hybridreg.synthesis.synthesize`, seeded per pair): the regressor's supervised
    targets (Wang & Zhang's scheme). Then ``blur_pairs`` more pairs, drawn the same way from a
    second random stream, with one image (fixed or moving, at random) blurred by a Gaussian of std
    U(``blur_mm``/4, ``blur_mm``) mm: a template (an average of many subjects) is smoother than a
    subject's scan, and MAP's λ depends on which image is the smooth one (on two bundled pairs,
    blurring the fixed image by 3 mm lowered it by 26 % and 31 %, blurring the moving one raised it
    by 20 % and 120 %), which the plain pairs never show. With ``cache`` (a JSON file) finished
    pairs are kept and the file is rewritten after each pair, so an interrupted run resumes (and
    a run with more pairs reuses the pairs it shares with an earlier one).

    Returns:
        One dict per pair: ``fixed``, ``moving`` (subject ids), ``synth`` (the two draws' seeds or
        ``None``), ``blur`` (the two images' blur in mm; blurred pairs only), ``index`` (from 0,
        blurred pairs from :data:`BLUR_INDEX`), ``lam`` (the MAP λ), ``seconds`` (its registration).
    """
    train = [v for v in dataset.train if v.labels is not None]
    specs = _specs(train, n_pairs, synth_prob, torch.Generator().manual_seed(seed), 0, 0.0)
    specs += _specs(train, blur_pairs, synth_prob, torch.Generator().manual_seed(seed + 1), BLUR_INDEX, blur_mm)
    wanted = {s["index"]: s for s in specs}
    done = json.loads(Path(cache).read_text(encoding="utf-8")) if cache is not None and Path(cache).is_file() else []
    out = [d for d in done if d["index"] in wanted and {k: d.get(k) for k in wanted[d["index"]]} == wanted[d["index"]]]
    have = {d["index"] for d in out}
    by_id = {v.subject_id: v for v in train}

    for spec in progress_bar([s for s in specs if s["index"] not in have], desc="MAP λ of training pairs", enabled=progress):
        f, m = target_images(spec, by_id, dataset.spacing)
        res = instance_register_pair(f, m, replace(map_config, progress=False), spacing=dataset.spacing)
        out.append({**spec, "lam": float(res.lam.reshape(-1)[0]), "seconds": res.seconds})
        log_line(f"MAP λ of training pair {spec['index']}: {out[-1]['lam']:.4g} ({res.seconds:.1f} s; {len(out)} of {len(specs)})",
                 enabled=progress)
        if cache is not None:
            atomic_write_text(cache, json.dumps(sorted(out, key=lambda d: d["index"]), indent=1))
    return sorted(out, key=lambda d: d["index"])


def train_regressor(inputs: list[tuple[torch.Tensor, torch.Tensor]], targets: Sequence[float], config: RegressorConfig,
                    *, progress: bool = True) -> tuple[LambdaRegressor, list[dict]]:
    """Fit a :class:`LambdaRegressor` to ``log targets`` by Adam on the mean squared error of
    log λ, with random flips of both images (the same axes) as augmentation.

    Args:
        inputs: per pair, ``(fixed, moving)`` from :func:`regressor_inputs` (``(1, 1, *grid)``, one grid).
        targets: the pairs' λ (> 0).

    Returns:
        ``(network in eval mode, log)``: the log has one row per 50 steps (``step``, ``loss``).

    Raises:
        ValueError: ``inputs`` empty or of another length than ``targets``, or a target ≤ 0.
    """
    if len(inputs) != len(targets) or not inputs:
        raise ValueError("train_regressor(): `inputs` and `targets` must be non-empty and of equal length")
    if not all(t > 0 for t in targets):
        raise ValueError("train_regressor(): `targets` must be λ values > 0")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = LambdaRegressor(config).train()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(config.steps, 1))
    fx = torch.cat([f for f, _ in inputs])
    mx = torch.cat([m for _, m in inputs])
    y = torch.tensor([math.log(t) for t in targets], dtype=fx.dtype)
    log, running = [], []
    for step in progress_bar(range(1, config.steps + 1), desc="λ regressor", enabled=progress):
        idx = torch.randint(0, len(inputs), (config.batch_size,), generator=gen)
        f, m = fx[idx], mx[idx]
        flips = [a + 2 for a in range(3) if float(torch.rand((), generator=gen)) < 0.5]
        if flips:
            f, m = f.flip(flips), m.flip(flips)
        loss = F.mse_loss(net(f, m), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if step % 50 == 0:
            log.append({"step": step, "loss": sum(running) / len(running)})
            running = []
            if step % max(50, config.steps // 10 // 50 * 50) == 0:  # about ten lines in a log file
                log_line(f"λ regressor step {step} of {config.steps}: loss {log[-1]['loss']:.4f}", enabled=progress)
    return net.eval(), log


# ----------------------------------------------------------------------------- the solver

def _default_register() -> InstanceOptConfig:
    """The MAP config's energy with λ fixed (uniform mode; the log-determinant is then a
    constant, the likelihood stays the profiled one), so the predicted λ means what it was
    trained on."""
    return apply_overrides(map_config(), ["lambda_mode=uniform", "objective.log_det=true"])


@dataclass(frozen=True)
class LearnedLambdaConfig:
    """Settings of ``--solver learned-lambda``.

    Attributes:
        weights: the regressor weight file (``None``: the shipped :data:`REGRESSOR_WEIGHTS`).
        register: the instance optimization run with λ fixed at the prediction (its
            ``lambda_init`` is replaced; default: ``configs/instance_map.yaml``'s energy with
            ``lambda_mode: uniform``).
        progress: show the registration's progress bars.
    """

    weights: str | None = None
    register: InstanceOptConfig = field(default_factory=_default_register)
    default_weights: ClassVar[Path] = REGRESSOR_WEIGHTS  # the file ``None`` means (metrics.json's provenance)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.register.lambda_mode != "uniform":
            raise ValueError(f"LearnedLambdaConfig: `register.lambda_mode` must be 'uniform' (λ is the prediction), got"
                             f" {self.register.lambda_mode!r}")


class LearnedLambdaSolver:
    """``learned-lambda``: λ predicted by the regressor, then instance optimization with λ fixed
    (method §3.1). ``RegistrationResult.lam`` is the predicted λ; ``seconds`` includes the
    prediction."""

    name = "learned-lambda"
    config_class = LearnedLambdaConfig

    def default_config(self) -> LearnedLambdaConfig:
        return LearnedLambdaConfig()

    def configure(self, config: LearnedLambdaConfig) -> LearnedLambdaConfig:
        """``config`` with its weight file checked (``FileNotFoundError`` naming ``--weights``)."""
        path = Path(config.weights or REGRESSOR_WEIGHTS)
        if not path.is_file():
            raise FileNotFoundError(f"`--weights`: file not found: {path}")
        return config

    def register_pair(self, fixed: torch.Tensor, moving: torch.Tensor, config: LearnedLambdaConfig | None = None, *,
                      spacing: Sequence[float] | None = None, device: str | torch.device | None = None,
                      moving_map: torch.Tensor | None = None, moving_spacing: Sequence[float] | None = None,
                      fixed_direction: Sequence[float] | None = None, **kwargs) -> RegistrationResult:
        """Predict λ (:func:`predict_lambda`, in the training frame given ``fixed_direction``),
        then :func:`instance_opt.register_pair` with ``config.register`` at that λ. Arguments,
        shapes and errors as the instance solver's; one 3D pair at a time (B > 1 or a 2D
        pair raises ``ValueError``: each pair has its own λ, and the network is 3D)."""
        cfg = config or LearnedLambdaConfig()
        check_images(fixed, moving, fn="learned-lambda", same_grid=moving_map is None, moving_map=moving_map,
                     moving_spacing=moving_spacing)
        if fixed.shape[0] != 1:
            raise ValueError(f"learned-lambda(): `fixed` must hold one pair (B = 1; `--batch-size 1` on the CLI), got"
                             f" {fixed.shape[0]}: each pair has its own λ")
        if fixed.dim() != 5:
            raise ValueError(f"`--solver learned-lambda`: the λ regressor registers 3D images, FIXED and MOVING are"
                             f" {fixed.dim() - 2}D (`fixed` must be (1, C, D, H, W), got {tuple(fixed.shape)}); `--solver"
                             " instance` registers 2D and 3D images")
        h = check_spacing(spacing, fixed.dim() - 2, fn="learned-lambda")
        dev = torch.device(device) if device is not None else fixed.device
        t0 = time.perf_counter()
        net, _ = _cached_regressor(cfg.weights or str(REGRESSOR_WEIGHTS), str(dev))
        lam = float(predict_lambda(net, fixed.to(dev), moving.to(dev), h,
                                   None if moving_map is None else moving_map.to(dev, fixed.dtype), moving_spacing,
                                   fixed_direction)[0])
        lam = min(max(lam, 1e-6), 1e3)  # InstanceOptConfig.lambda_init's range
        seconds = time.perf_counter() - t0
        res = instance_register_pair(fixed, moving, replace(cfg.register, lambda_init=lam, progress=cfg.progress), spacing=h, device=dev,
                                     moving_map=moving_map, moving_spacing=moving_spacing, **kwargs)
        return replace(res, seconds=res.seconds + seconds, config=cfg)


_REGRESSORS: dict = {}


def _cached_regressor(path: str, device: str) -> tuple[LambdaRegressor, dict]:
    key = (path, device, os.path.getmtime(path) if os.path.isfile(path) else None)
    if key not in _REGRESSORS:
        _REGRESSORS[key] = load_regressor(path, device)
    return _REGRESSORS[key]


LEARNED_LAMBDA = LearnedLambdaSolver()
"""The entry point ``learned-lambda`` of the ``hybridreg.solvers`` group."""


# ----------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m learned.regressor --out DIR [--pairs N] [--blur-pairs N] [--steps S] [--seed K]``: MAP targets on the
    bundled training split at 2 mm (cached in ``DIR/targets.json``, resumable), training, and
    ``DIR/lambda_regressor.pt``, ``log.csv``, ``config.yaml``."""
    from hybridreg.config import dump_yaml
    from hybridreg.data.sources import bundled

    ap = argparse.ArgumentParser(prog="python -m learned.regressor", description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs", type=int, default=48, help="training pairs (MAP estimates)")
    ap.add_argument("--blur-pairs", type=int, default=0,
                    help="more training pairs with one image blurred (template-like), see map_targets")
    ap.add_argument("--blur-mm", type=float, default=4.0, help="largest blur std of those pairs, mm")
    ap.add_argument("--steps", type=int, default=RegressorConfig().steps)
    ap.add_argument("--seed", type=int, default=RegressorConfig().seed,
                    help="seed of the weights' initialisation and the batches (the targets keep theirs)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    for name, value, ok in (("--pairs", a.pairs, a.pairs >= 1), ("--blur-pairs", a.blur_pairs, a.blur_pairs >= 0),
                            ("--blur-mm", a.blur_mm, 0 < a.blur_mm <= 20), ("--steps", a.steps, a.steps >= 1),
                            ("--seed", a.seed, 0 <= a.seed < 2**31)):
        if not ok:
            ap.error(f"`{name}` out of range, got {value}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = bundled(2)
    targets = map_targets(ds, a.pairs, map_config(), blur_pairs=a.blur_pairs, blur_mm=a.blur_mm, cache=out / "targets.json",
                          progress=not a.no_progress)
    cfg = RegressorConfig(steps=a.steps, seed=a.seed)
    by_id = {v.subject_id: v for v in ds.train}
    inputs = [regressor_inputs(*target_images(t, by_id, ds.spacing), ds.spacing, cfg.input_spacing) for t in targets]
    t0 = time.perf_counter()
    net, log = train_regressor(inputs, [t["lam"] for t in targets], cfg, progress=not a.no_progress)
    info = {"pairs": len(targets), "training_seconds": time.perf_counter() - t0, "map_config": to_dict(map_config()),
            "data": "bundled training split, 2 mm, half the images scan-like draws (hybridreg.synthesis)"
                    + (f"; {a.blur_pairs} more pairs with one image blurred by up to {a.blur_mm:g} mm" if a.blur_pairs else "")}
    save_regressor(out / "lambda_regressor.pt", net, info)
    with atomic_output(out / "log.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["step", "loss"])
        w.writeheader()
        w.writerows(log)
    dump_yaml(cfg, out / "config.yaml")
    print(f"wrote {out / 'lambda_regressor.pt'} ({len(targets)} pairs, final loss {log[-1]['loss'] if log else float('nan'):.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
