"""Unsupervised training of :class:`RegistrationNetwork` on the shared energy (method §2.2).

The loss is :func:`hybridreg.objective.evaluate` on the network's output and nothing else;
labels are read only to report validation Dice.

Per step: draw a pair (atlas-to-subject, subject-to-subject, or a mix), augment it (with
probability ``synth_prob`` an image is replaced by a scan-like image drawn from its label map,
:mod:`hybridreg.synthesis`; random flips of both images, a random smooth diffeomorphic
deformation of each subject, a random gamma of each image's intensities), take one AdamW step; the learning rate follows a
polynomial decay ``lr · (1 − step/steps)^power``. Every ``epoch_steps`` steps the network
registers the validation pairs and their Dice is logged; the best network (by validation
Dice) and the final one are written as weight files (:func:`learned.weights.save_weights`)
that ``hybridreg register --solver learned`` reads.

Outputs in ``run_dir``: ``config.yaml``, ``log.csv`` (one row per step: learning rate and
every energy term), ``validation.csv`` and ``history.json`` (one row per epoch: mean
training loss, validation Dice), ``training.png`` (loss and validation Dice),
``checkpoint_<step>.pt`` (the newest ``keep_checkpoints``), ``model_best.pt``,
``model_final.pt``. Checkpoints, weights, figures, YAML and JSON are written atomically;
the CSV logs grow by appending (``log.csv`` every ``log_every`` steps, one row per step)
and are cut back to the checkpoint on resume.

Exact resume: a checkpoint holds the model, optimizer, scheduler, step, config, the best
validation score and each process's ``torch.Generator``, the loop's only source of
randomness (the initial weights come from ``seed`` under a forked global RNG, so
:func:`train` leaves torch's global RNG as it found it). On CPU with fixed seeds a run
interrupted at a checkpoint and resumed ends with the same weights as an uninterrupted one
(tested, also the log files).

Multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) the network is wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl on CUDA); each process draws its own pairs
(seed + rank), gradients are averaged, rank 0 validates and writes. The effective batch
is the number of processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hybridreg.config import (among_outputs, atomic_output, atomic_write_text, bounded, check_bounds, dump_yaml, load_yaml,
                              to_dict, write_json)
from hybridreg.data.sources import RegistrationDataset, Volume
from hybridreg.io import file_sha256
from hybridreg.metrics import common_labels, score_dice, warp_labels
from hybridreg.objective import EnergyTerms, ObjectiveConfig
from hybridreg.progress import bar as progress_bar
from hybridreg.priors import paint_regions
from hybridreg.solvers import DivergenceError
from hybridreg.synthesis import SynthConfig, random_deformation, synthesize

from .loss import network_energy
from .network import CODE_KEYS, NetOutput, NetworkConfig, RegistrationNetwork
from .weights import load_weights, predict, save_weights

__all__ = ["TrainConfig", "train", "latest_checkpoint", "validation_dice", "training_figure", "sample_condition"]

LOG_COLUMNS = ["step", "lr", *EnergyTerms._fields, *CODE_KEYS, "regions"]
VAL_COLUMNS = ["epoch", "step", "train_loss", "val_dice", "seconds"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (``hybridreg train --config`` reads this from YAML).

    Attributes:
        network, objective: the architecture and the energy (default: the objective's
            defaults, which are the instance solver's: both solvers minimise one energy).
        steps: optimizer steps in total; epoch_steps: steps between validations.
        lr, weight_decay: AdamW; poly_power: exponent of the polynomial decay.
        checkpoint_every: steps between checkpoints; keep_checkpoints: how many are kept.
        seed: seeds the sampling generator (plus the rank) and the initial weights.
        pairing: ``"atlas"`` (fixed = the atlas), ``"subject"`` (two different subjects,
            the atlas included) or ``"mixed"`` (atlas pairs with probability
            ``atlas_fraction``, else subject pairs).
        flip_prob: probability of flipping a pair along each axis (both images alike).
        deform_prob: probability of deforming each subject image by a random smooth
            diffeomorphism (never the atlas); deform_std_mm: standard deviation of its
            velocity control points in mm; deform_control: control points per axis.
        gamma_std: standard deviation of log γ for a random intensity gamma ``x^γ`` per
            image (0 disables).
        synth_prob: probability that an image of a pair is replaced by a scan-like image drawn
            from its label map (:func:`hybridreg.synthesis.synthesize`: random contrast,
            texture, blur, bias field, gamma, noise and deformation; SynthMorph, Hoffmann et
            al. 2022), so that the network does not fit one contrast; volumes without labels
            keep their image. synth: the generator's ranges.
        lambda_warmup_steps: for the first N steps the energy uses a uniform
            λ ≡ ``lambda_init`` instead of the λ head (which is not trained then), so the
            velocity path learns real deformations before λ adapts to them.
        lambda_init: the warm-up λ (0.5 = the instance solver's start).
        lambda_lr_factor: learning rate of the λ head relative to the rest (the instance
            solver also moves λ 10× slower than the velocity: ``lr_lambda`` 0.05 vs ``lr`` 0.5).
        log_every: steps between reads of the loss terms (one device sync) and writes to
            ``log.csv`` (one row per step; also before validation, checkpoints and the end).
        region_prob: for a network with ``region_condition``, the probability that a step
            conditions it on a random region-wise λ map (CSAIN, method §3.2): one λ_k per
            label of the fixed image's (augmented) label map, drawn log-uniformly in
            [``region_lambda_low``, 1], painted and smoothed with σ ``region_smoothing``
            (voxels; CSAIN's 0.8); the energy's λ is then that map. Other steps train the
            unconditioned path (the λ head).

    A ``conditional`` network (``network.conditional``) is trained on the energy at
    hyperparameters drawn per step: ``w_reg`` and ``hyper_strength`` log-uniformly in the
    network's ``w_reg_range`` and ``hyper_strength_range`` (``objective.w_reg`` and
    ``objective.hyper_strength`` then only set validation's values); the loss is
    :func:`hybridreg.objective.evaluate` at those values, and ``log.csv`` records them.

    Why the warm-up: the beta hyperprior pulls λ towards 1 with strength ``a`` while the
    regularizer pulls it down only where the strain is large. A network starting from the
    identity has no strain yet, so its λ head saturates at λ ≈ 1 everywhere within a few
    hundred steps, and the uniform maximal regularization then keeps deformations small
    (measured here: λ = 0.999 ± 0.002 and a validation plateau after 1,750 steps without
    the warm-up).
    """

    network: NetworkConfig = field(default_factory=NetworkConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    steps: int = bounded(1000, 1, 10_000_000)
    epoch_steps: int = bounded(100, 1, 1_000_000)
    lr: float = bounded(1e-4, 1e-8, 1.0)
    weight_decay: float = bounded(1e-5, 0.0, 1.0)
    poly_power: float = bounded(0.9, 0.0, 10.0)
    checkpoint_every: int = bounded(100, 1, 10_000_000)
    keep_checkpoints: int = bounded(2, 1, 100)
    seed: int = bounded(0, 0, 2**31 - 1)
    pairing: Literal["atlas", "subject", "mixed"] = "atlas"
    atlas_fraction: float = bounded(0.5, 0.0, 1.0)
    flip_prob: float = bounded(0.5, 0.0, 1.0)
    deform_prob: float = bounded(0.0, 0.0, 1.0)
    deform_std_mm: float = bounded(4.0, 0.0, 50.0)
    deform_control: int = bounded(5, 1, 64)
    gamma_std: float = bounded(0.0, 0.0, 2.0)
    synth_prob: float = bounded(0.0, 0.0, 1.0)
    synth: SynthConfig = field(default_factory=SynthConfig)
    lambda_warmup_steps: int = bounded(0, 0, 10_000_000)
    lambda_init: float = bounded(0.5, 1e-6, 1.0)
    lambda_lr_factor: float = bounded(1.0, 1e-6, 1e3)
    log_every: int = bounded(10, 1, 10_000)
    region_prob: float = bounded(0.0, 0.0, 1.0)
    region_lambda_low: float = bounded(0.05, 1e-6, 1.0)
    region_smoothing: float = bounded(0.8, 0.0, 10.0)

    def __post_init__(self) -> None:
        """Check the fields (``ValueError`` naming the field: out of range, wrong type, a setting that needs another)."""
        for name in ("steps", "epoch_steps", "checkpoint_every", "keep_checkpoints", "deform_control", "log_every", "seed",
                     "lambda_warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"TrainConfig: `{name}` must be an int, got {v!r}")
        check_bounds(self)
        if self.network.lambda_mode == "uniform" and self.lambda_warmup_steps:
            raise ValueError("TrainConfig: `lambda_warmup_steps` must be 0 with network.lambda_mode 'uniform' (there is no λ head"
                             " to warm up; λ is network.lambda_uniform throughout)")
        if self.region_prob > 0 and not self.network.region_condition:
            raise ValueError("TrainConfig: `region_prob` > 0 needs network.region_condition: true")
        if self.pairing not in ("atlas", "subject", "mixed"):
            raise ValueError(f"TrainConfig: `pairing` must be 'atlas', 'subject' or 'mixed', got {self.pairing!r}")


# ----------------------------------------------------------------------------- augmentation

def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def _augment(img: torch.Tensor, is_atlas: bool, cfg: TrainConfig, spacing, gen: torch.Generator,
             labels: torch.Tensor | None = None, keep_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The augmented image and its label map (``labels`` moved with it; ``None`` when
    ``labels`` is ``None`` or not ``keep_labels``: then the labels only feed the synthesis)."""
    if labels is not None and cfg.synth_prob > 0 and _uniform(gen) < cfg.synth_prob:
        img, labels = synthesize(labels, spacing, cfg.synth, generator=gen, dtype=img.dtype)
        return img, labels if keep_labels else None
    labels = labels if keep_labels else None
    if not is_atlas and cfg.deform_prob > 0 and _uniform(gen) < cfg.deform_prob:
        if labels is not None:  # the same draws deform the labels: a copy of the generator's state
            twin = torch.Generator().set_state(gen.get_state())
            labels = random_deformation(labels, cfg.deform_std_mm, cfg.deform_control, spacing, twin, mode="nearest")
        img = random_deformation(img, cfg.deform_std_mm, cfg.deform_control, spacing, gen)
    if cfg.gamma_std > 0:
        g = float(torch.randn((), generator=gen)) * cfg.gamma_std
        img = img.clamp_min(0) ** float(np.exp(g))
    return img, labels


def _sample_pair(data: RegistrationDataset, images: list[torch.Tensor], atlas: torch.Tensor | None,
                 cfg: TrainConfig, gen: torch.Generator, labels: dict[int, torch.Tensor] | None = None):
    """A training pair and the fixed image's label map (or ``None``); ``labels`` maps
    ``id(image)`` to its label map (for ``synth_prob`` and ``region_prob``)."""
    n = len(images)
    use_atlas = atlas is not None and (cfg.pairing == "atlas" or (cfg.pairing == "mixed" and _uniform(gen) < cfg.atlas_fraction))
    if use_atlas:
        i = int(torch.randint(n, (1,), generator=gen))
        fixed, moving, f_atlas = atlas, images[i], True
    else:
        pool = images + ([atlas] if atlas is not None else [])
        i = int(torch.randint(len(pool), (1,), generator=gen))
        j = int(torch.randint(len(pool) - 1, (1,), generator=gen))
        j = j + 1 if j >= i else j
        fixed, moving, f_atlas = pool[j], pool[i], (atlas is not None and j == len(pool) - 1)
    m_atlas = atlas is not None and moving is atlas
    lab = labels or {}
    # only a region-conditioned step reads the fixed labels after augmentation (sample_condition)
    keep = cfg.network.region_condition and cfg.region_prob > 0
    fixed, fixed_labels = _augment(fixed, f_atlas, cfg, data.spacing, gen, lab.get(id(fixed)), keep)
    moving, _ = _augment(moving, m_atlas, cfg, data.spacing, gen, lab.get(id(moving)), keep_labels=False)
    dims = [k + 2 for k in range(fixed.dim() - 2) if _uniform(gen) < cfg.flip_prob]
    if dims:
        fixed, moving = fixed.flip(dims), moving.flip(dims)
        fixed_labels = fixed_labels.flip(dims) if fixed_labels is not None else None
    return fixed, moving, fixed_labels


def _log_uniform(gen: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return torch.exp(math.log(low) + torch.rand(n, generator=gen, dtype=torch.float64) * (math.log(high) - math.log(low)))


def sample_condition(cfg: TrainConfig, fixed_labels: torch.Tensor | None, gen: torch.Generator
                     ) -> tuple[ObjectiveConfig, torch.Tensor | None, torch.Tensor | None]:
    """One step's conditioning (:class:`TrainConfig`'s docstring): the energy's config at the
    drawn hyperparameters, the code ``(1, 2)`` (``None`` for an unconditional network) and
    the region-wise λ map ``(1, 1, *spatial)`` on the fixed grid (``None`` unless this step
    conditions on regions). Draws from ``gen`` only what the network is conditioned on."""
    net = cfg.network
    objective, code, region = cfg.objective, None, None
    if net.conditional:
        values = {k: float(_log_uniform(gen, *getattr(net, f"{k}_range"))) for k in CODE_KEYS}
        objective = replace(objective, **values)
        code = torch.tensor([list(values.values())])
    if net.region_condition and fixed_labels is not None and cfg.region_prob > 0 and _uniform(gen) < cfg.region_prob:
        ids = torch.unique(fixed_labels).tolist()
        values = dict(zip(ids, _log_uniform(gen, cfg.region_lambda_low, 1.0, len(ids)).tolist()))
        region = paint_regions(fixed_labels, values, smooth_sigma=cfg.region_smoothing)
    return objective, code, region


# ----------------------------------------------------------------------------- helpers

RESUME_MAY_CHANGE = ("steps", "keep_checkpoints")
"""Settings that a resumed run may change (train longer, keep more checkpoints); every other
setting must equal the checkpoint's, which :func:`train` checks, since the restored weights,
optimizer and schedule would otherwise carry the old ones on under a new config.yaml."""


def _changed(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` of every setting that differs between two
    :func:`hybridreg.config.to_dict` trees (a key only one of them has, a setting added or
    removed by another version of the code, does not count)."""
    out = []
    for k in sorted(set(old) & set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def _number(text: str) -> int | float | str | None:
    """A CSV cell as the number it holds (``None`` for an empty cell; text that is no number stays)."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


INIT_RECORD = "init.json"
"""The weights a fresh run started from (``init_weights``: path and SHA-256), for a resume before its
first checkpoint."""

RUN_FILES = ("config.yaml", INIT_RECORD, "log.csv", "validation.csv", "history.json", "training.png", "model_best.pt",
             "model_final.pt", "checkpoint_*.pt")
"""The files :func:`train` writes in its run folder (patterns): a fresh run refuses a folder that
holds one, and no input may be one of them."""


def _started_from(run: Path, init_weights: str | os.PathLike | None) -> str | os.PathLike | None:
    """The weights a run with no checkpoint starts over from: those it was started from (its
    :data:`INIT_RECORD`), whether or not ``init_weights`` names them again.

    Raises:
        ValueError: ``init_weights`` other than the run's (or given to a run started without), or the
            run's own weights file missing or changed.
    """
    record = json.loads((run / INIT_RECORD).read_text(encoding="utf-8")) if (run / INIT_RECORD).is_file() else None
    if record is None:
        if init_weights is not None:
            raise ValueError(f"train(): `resume`: {run} was started without `init_weights` (`--init`); resume without it"
                             " or start a new `--out`")
        return None
    given = init_weights if init_weights is not None else record["path"]
    if not Path(given).is_file() or file_sha256(given) != record["sha256"]:
        raise ValueError(f"train(): `resume`: {run} was started from the weights {record['path']}"
                         f" (sha256 {record['sha256'][:12]}…); {given} is {'missing' if not Path(given).is_file() else 'another file'}")
    return given


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint_*.pt`` in ``run_dir`` (by step), or ``None``."""
    cks = _checkpoints(Path(run_dir))
    return cks[-1] if cks else None


def _checkpoints(run: Path) -> list[Path]:
    """``run``'s ``checkpoint_*.pt``, oldest step first."""
    return sorted(run.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def _readable_checkpoint(run: Path, report: bool) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of ``run`` that can be read, and its state; ``(None, None)`` where
    there is none. A newer one that cannot be read (cut short by a full disk, or damaged) is
    skipped with a line on stderr (``report``) and left in place: training rewrites it when it
    reaches that step again.

    Raises:
        ValueError: ``run`` holds checkpoints and none can be read (naming the newest).
    """
    cks = _checkpoints(run)
    skipped = []
    for ck in reversed(cks):
        try:
            state = torch.load(ck, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 -- torch raises many types for a cut or damaged file
            skipped.append(f"{ck.name} ({type(e).__name__}: {' '.join(str(e).split())[:80]})")
            continue
        if not isinstance(state, dict) or "step" not in state or "model" not in state:
            skipped.append(f"{ck.name} (not a training checkpoint)")
            continue
        if skipped and report:
            print(f"train(): warning: cannot read {', '.join(skipped)}: resuming from {ck.name}", file=sys.stderr)
        return ck, state
    if cks:
        raise ValueError(f"train(): `resume`: no checkpoint in {run} can be read ({', '.join(skipped)})")
    return None, None


def _tensor(v: Volume, dev) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(v.image))[None, None].to(dev)


def validation_dice(net: RegistrationNetwork, data: RegistrationDataset, objective: ObjectiveConfig,
                    device: torch.device | str = "cpu") -> float:
    """Mean over :meth:`RegistrationDataset.validation_pairs` of their mean Dice over the labels
    each pair shares (:func:`hybridreg.metrics.score_dice`, policy ``"all"``; moving labels
    warped by nearest neighbour: :func:`hybridreg.metrics.warp_labels`); NaN without pairs."""
    scores = []
    for f, m in data.validation_pairs():
        _, ev = predict(net, _tensor(f, device), _tensor(m, device), objective, data.spacing)
        wl = warp_labels(m.labels, ev.displacement)
        if common_labels(f.labels, m.labels):  # a pair sharing no label is not scored
            scores.append(score_dice(f.labels, wl, m.labels, policy="all")["mean"])
    return float(np.mean(scores)) if scores else float("nan")


def training_figure(run_dir: str | os.PathLike) -> Path:
    """Plot ``log.csv`` (total loss, moving average) and ``validation.csv`` (Dice) into
    ``training.png``."""
    from matplotlib.figure import Figure

    run = Path(run_dir)
    with open(run / "log.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(run / "validation.csv", newline="", encoding="utf-8") as fh:
        val = list(csv.DictReader(fh))
    fig = Figure(figsize=(10, 3.6))
    ax = fig.subplots(1, 2)
    if rows:
        steps = np.array([int(r["step"]) for r in rows])
        loss = np.array([float(r["total"]) for r in rows])
        k = max(1, min(50, len(loss) // 10))
        ax[0].plot(steps, loss, color="0.8", lw=0.5, label="per step")
        ax[0].plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color="C0", label=f"mean of {k}")
        ax[0].legend()
    ax[0].set(xlabel="step", ylabel="energy (total)", title="training loss")
    if val:
        ax[1].plot([int(r["step"]) for r in val], [float(r["val_dice"]) for r in val], "o-", color="C1")
    ax[1].set(xlabel="step", ylabel="mean Dice (labels shared by each pair)", title="validation Dice")
    fig.tight_layout()
    out = run / "training.png"
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110)
    return out


def _append_rows(path: Path, rows: Sequence[Sequence]) -> None:
    with open(path, "a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


def _truncate_csv(path: Path, step: int, key: str) -> None:
    """Drop rows beyond ``step`` (written after the checkpoint a resume starts from)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    head, body = rows[0], rows[1:]
    i = head.index(key)
    keep = [head] + [r for r in body if int(r[i]) <= step]
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(keep)


def _dist_info() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), ws) if ws > 1 else (0, 1)


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, data: RegistrationDataset, run_dir: str | os.PathLike, *, resume: bool = False,
          stop_after: int | None = None, device: torch.device | str | None = None, progress: bool = True,
          init_weights: str | os.PathLike | None = None) -> RegistrationNetwork:
    """Train a network on ``data`` (labels are never used in the loss).

    Args:
        cfg: :class:`TrainConfig`.
        data: a :class:`hybridreg.data.sources.RegistrationDataset` (one grid; ``data.train``
            images, optional ``data.atlas``; ``data.val`` with labels for validation Dice).
        run_dir: output folder (module docstring lists its files).
        resume: continue from the newest checkpoint in ``run_dir``, exactly, with the
            checkpoint's settings (``steps`` and ``keep_checkpoints`` may change); a run
            stopped before its first checkpoint starts over from step 0, with the settings of
            its ``config.yaml`` and the weights it was started from (``init.json``).
        stop_after: stop after this global step (an interruption, for tests).
        device: ``cpu`` (default) or ``cuda``; under torchrun each process uses
            ``cuda:LOCAL_RANK`` when ``device`` is CUDA.
        progress: show a tqdm bar (rank 0).
        init_weights: start a fresh run from this weight file (fine-tuning; the network
            configs must match, except that ``network`` may add a full-resolution stage to
            weights without one, which then starts from their output). Ignored on resume from a
            checkpoint (the checkpoint holds the weights).

    Returns:
        The trained network (unwrapped, on ``device``).

    Raises:
        ValueError: a network/data dimension mismatch, a data source without training subjects
            or without a validation pair, atlas pairing without an atlas, subject pairing with
            one subject, ``init_weights`` of another network config, ``resume`` of a folder
            that holds no run (no checkpoint and no ``config.yaml``), with settings other than
            the run's (but :data:`RESUME_MAY_CHANGE`), with another ``init_weights`` than the
            run was started from, with another number of processes than wrote the checkpoint,
            or with fewer ``steps`` than the checkpoint has trained; a fresh run into a folder
            that holds any of :data:`RUN_FILES`; or ``init_weights`` that is one of them.
        DivergenceError: the energy stopped being finite (the last checkpoint stays as it was).
    """
    d = len(data.shape)
    if cfg.network.ndim != d:
        raise ValueError(f"train(): `network.ndim` is {cfg.network.ndim} but the data are {d}D")
    if not data.train:
        raise ValueError(f"train(): data source {data.name} has no training subjects")
    if not data.validation_pairs():
        raise ValueError(f"train(): data source {data.name} has no validation pair (labelled validation subjects: an atlas"
                         " and one, or two without an atlas), so validation Dice and model_best.pt cannot be computed")
    if cfg.pairing == "atlas" and data.atlas is None:
        raise ValueError("train(): pairing='atlas' needs a data source with an atlas")
    if cfg.pairing != "atlas" and len(data.train) + (data.atlas is not None) < 2:
        raise ValueError(f"train(): pairing={cfg.pairing!r} needs at least two subjects")
    rank, world = _dist_info()
    dev = torch.device(device or "cpu")
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    run = Path(run_dir)
    if init_weights is not None and among_outputs(init_weights, run, RUN_FILES):
        raise ValueError(f"train(): `init_weights` (`--init`) {init_weights} is a file this run writes in {run}; copy it"
                         " elsewhere or choose another `--out`")
    ck, state = _readable_checkpoint(run, rank == 0) if resume else (None, None)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        held = sorted(f.name for f in run.iterdir() if among_outputs(f, run, RUN_FILES)) if not resume else []
        if held:
            raise ValueError(f"train(): {run} already holds a training run's files ({', '.join(held)}); pass resume=True"
                             " (`--resume`) to continue it or choose a new `--out`")
    if resume and ck is None:  # stopped before its first checkpoint: it starts over, with its own settings
        if not (run / "config.yaml").is_file():
            raise ValueError(f"train(): `resume` was requested but {run} holds no run (no checkpoint, no config.yaml)")
        started = to_dict(load_yaml(run / "config.yaml", TrainConfig, arg="config.yaml"))
        other = [f"{k} {a!r} -> {b!r}" for k, a, b in _changed(started, to_dict(cfg)) if k not in RESUME_MAY_CHANGE]
        if other:
            raise ValueError(f"train(): `resume`: {run} was started with other settings ({'; '.join(other)}); resume with"
                             f" the run's own (only {' and '.join(RESUME_MAY_CHANGE)} may change) or start a new `--out`")
        init_weights = _started_from(run, init_weights)

    with torch.random.fork_rng(devices=[]):  # the seed sets the initial weights; torch's global RNG is left as it was
        torch.manual_seed(cfg.seed)
        net = RegistrationNetwork(cfg.network).to(dev)
        init_net = load_weights(init_weights)[0] if init_weights is not None and ck is None else None
    if init_net is not None:
        # Weights of the same network without the full-resolution stage may start one with it
        # (the stage's residual starts near zero), and unconditional weights may start a
        # conditional network (the modulation starts as the identity): every other parameter must match.
        added = ("conditional", "w_reg_range", "hyper_strength_range", "region_condition", "region_lambda", "modulation_channels")
        plain = not (init_net.config.conditional or init_net.config.region_condition)
        grown = replace(init_net.config, full_resolution_channels=cfg.network.full_resolution_channels,
                        **({k: getattr(cfg.network, k) for k in added} if plain else {}))
        if grown != cfg.network or (init_net.config.full_resolution_channels not in (0, cfg.network.full_resolution_channels)):
            raise ValueError(f"train(): `init_weights` {init_weights} holds a different network config than `network`"
                             " (only a full-resolution stage or the conditioning may be added)")
        net.load_state_dict(init_net.state_dict(), strict=init_net.config == cfg.network)
    lam_params = list(net.lambda_head.parameters()) if net.lambda_head is not None else []
    lam_ids = {id(p) for p in lam_params}
    opt = torch.optim.AdamW([{"params": [p for p in net.parameters() if id(p) not in lam_ids], "lr": cfg.lr},
                             {"params": lam_params, "lr": cfg.lr * cfg.lambda_lr_factor}], weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.steps) ** cfg.poly_power)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    start, best, epoch_losses = 0, -1.0, []
    if ck is not None:
        if state.get("world_size", 1) != world:
            raise ValueError(f"train(): checkpoint {ck.name} was written by {state.get('world_size', 1)} processes, now {world}")
        changed = _changed(state.get("config") or to_dict(cfg), to_dict(cfg))
        other = [f"{k} {a!r} -> {b!r}" for k, a, b in changed if k not in RESUME_MAY_CHANGE]
        if other:
            raise ValueError(f"train(): `resume`: {ck.name} was trained with other settings ({'; '.join(other)}); resume with"
                             f" the run's own (only {' and '.join(RESUME_MAY_CHANGE)} may change) or start a new `--out`")
        if cfg.steps < state["step"]:
            raise ValueError(f"train(): `resume`: {ck.name} has trained {state['step']} steps, more than `steps` {cfg.steps}:"
                             f" nothing would be trained; give steps > {state['step']} to train on (--set steps=N)")
        if changed and rank == 0:
            dump_yaml(cfg, run / "config.yaml")  # steps or keep_checkpoints changed: the run's config says so
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generators"][rank])
        start, best, epoch_losses = state["step"], state["best_val_dice"], list(state["epoch_losses"])
        if rank == 0:
            _truncate_csv(run / "log.csv", start, "step")
            _truncate_csv(run / "validation.csv", start, "step")
    elif rank == 0:
        dump_yaml(cfg, run / "config.yaml")
        (run / INIT_RECORD).unlink(missing_ok=True)
        if init_weights is not None:  # a resume before the first checkpoint starts from them again
            atomic_write_text(run / INIT_RECORD, json.dumps({"path": str(Path(init_weights).resolve()),
                                                             "sha256": file_sha256(init_weights)}))
        for name, cols in (("log.csv", LOG_COLUMNS), ("validation.csv", VAL_COLUMNS)):
            with atomic_output(run / name) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(cols)
    unused = cfg.lambda_warmup_steps > 0 or 0 < cfg.region_prob < 1  # a step may leave the λ head or CSAIN out
    model = (torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=unused)
             if world > 1 else net)

    images = [_tensor(v, dev) for v in data.train]
    atlas = _tensor(data.atlas, dev) if data.atlas is not None else None
    labels = {id(t): torch.from_numpy(v.labels.astype(np.int64))[None, None].to(dev)
              for t, v in zip(images + [atlas], data.train + [data.atlas]) if v is not None and v.labels is not None
              } if cfg.synth_prob > 0 or cfg.region_prob > 0 else None
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    info = {"data": data.name, "world_size": world, "steps": cfg.steps}
    bar = progress_bar(range(start, end), initial=start, total=cfg.steps, desc="train", enabled=progress and rank == 0,
                       dynamic_ncols=True)
    t_epoch = time.perf_counter()
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, terms) not yet read from the device
    net.train()
    for step in bar:
        fixed, moving, fixed_labels = _sample_pair(data, images, atlas, cfg, gen, labels)
        objective, code, region = sample_condition(cfg, fixed_labels, gen)
        out = model(fixed, moving, None if code is None else code.to(dev, fixed.dtype), region)
        if step < cfg.lambda_warmup_steps and region is None:
            out = NetOutput(out.velocity, torch.full_like(out.lam, cfg.lambda_init))
        terms = network_energy(out, fixed, moving, objective, data.spacing).terms
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        sched.step()
        done = step + 1
        pending.append((done, sched.get_last_lr()[0], torch.stack([t.detach() for t in terms]),
                        (*(getattr(objective, k) for k in CODE_KEYS), int(region is not None))))
        validate = done % cfg.epoch_steps == 0 or done == cfg.steps
        checkpoint = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if done % cfg.log_every == 0 or validate or checkpoint or done == end:  # one device sync per flush
            rows = [[s, lr, *v, *c] for (s, lr, _, c), v in zip(pending, torch.stack([t for _, _, t, _ in pending]).tolist())]
            pending = []
            epoch_losses += [r[2] for r in rows]
            if rank == 0:
                _append_rows(run / "log.csv", rows)
                bar.set_postfix(loss=f"{rows[-1][2]:.4f}", refresh=False)
            bad = next((r[0] for r in rows if not np.isfinite(r[2:]).all()), None)
            if bad is not None:  # the weights are NaN from here on: stop, keep the last good checkpoint
                raise DivergenceError(f"training diverged: the energy stopped being finite at step {bad}; lower `lr` in"
                                      " --config (the last checkpoint and model_best.pt are kept)")
        if validate:
            if rank == 0:
                vd = validation_dice(net.eval(), data, cfg.objective, dev)
                net.train()
                _append_rows(run / "validation.csv", [[-(-done // cfg.epoch_steps), done, float(np.mean(epoch_losses)), vd,
                                                       time.perf_counter() - t_epoch]])
                if np.isfinite(vd) and vd > best:
                    best = vd
                    save_weights(run / "model_best.pt", net, cfg.objective, data.spacing, {**info, "step": done, "val_dice": vd})
                training_figure(run)
                bar.write(f"step {done}: train loss {np.mean(epoch_losses):.4f}  validation Dice {vd:.4f}")
            epoch_losses, t_epoch = [], time.perf_counter()
        if checkpoint:
            gens = [gen.get_state()]
            if world > 1:
                gens = [None] * world
                dist.all_gather_object(gens, gen.get_state())
            if rank == 0:
                with atomic_output(run / f"checkpoint_{done}.pt") as tmp:
                    torch.save({"step": done, "model": net.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "generators": gens,
                                "world_size": world, "best_val_dice": best, "epoch_losses": epoch_losses, "config": to_dict(cfg)}, tmp)
                for old in _checkpoints(run)[:-cfg.keep_checkpoints]:
                    old.unlink(missing_ok=True)
        if done == cfg.steps and rank == 0:
            save_weights(run / "model_final.pt", net, cfg.objective, data.spacing, {**info, "step": done})
            with open(run / "validation.csv", newline="", encoding="utf-8") as fh:
                hist = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
            # a run whose validation pairs share no label has no Dice: null, never a NaN number (strict JSON, as
            # metrics.json)
            write_json(run / "history.json", {"best_val_dice": best if best >= 0 else None, "epochs": hist, **info})
    bar.close()
    if world > 1:
        dist.barrier()
    return net
