"""Unsupervised training of :class:`RegistrationNetwork` on the shared energy (method §2.2).

The loss is :func:`hybridreg.objective.evaluate` on the network's output and nothing else;
labels are read only to report validation Dice.

Per step: draw a pair (atlas-to-subject, subject-to-subject, or a mix), augment it (random
flips of both images, a random smooth diffeomorphic deformation of each subject, a random
gamma of each image's intensities), take one AdamW step; the learning rate follows a
polynomial decay ``lr · (1 − step/steps)^power``. Every ``epoch_steps`` steps the network
registers the validation pairs and their Dice is logged; the best network (by validation
Dice) and the final one are written as weight files (:func:`save_weights`) that
``hybridreg register --solver learned`` reads.

Outputs in ``run_dir``: ``config.yaml``, ``log.csv`` (one row per step: learning rate and
every energy term), ``validation.csv`` and ``history.json`` (one row per epoch: mean
training loss, validation Dice), ``training.png`` (loss and validation Dice),
``checkpoint_<step>.pt`` (the newest ``keep_checkpoints``), ``model_best.pt``,
``model_final.pt``. Checkpoints, weights, figures, YAML and JSON are written atomically;
the CSV logs grow by one row at a time and are cut back to the checkpoint on resume.

Exact resume: a checkpoint holds the model, optimizer, scheduler, step, config, the best
validation score and every random state the loop uses (each process's ``torch.Generator``
for sampling and augmentation and torch's CPU state). On CPU with fixed seeds a run
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
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hybridreg.config import atomic_output, atomic_write_text, dump_yaml, to_dict
from hybridreg.data.sources import RegistrationDataset, Volume
from hybridreg.metrics import common_labels, dice
from hybridreg.objective import ObjectiveConfig
from hybridreg.spatial import resize_image, scaling_and_squaring, warp

from .loss import network_energy
from .network import NetOutput, NetworkConfig, RegistrationNetwork

__all__ = ["TrainConfig", "train", "latest_checkpoint", "save_weights", "load_weights", "predict", "WEIGHTS_FORMAT"]

WEIGHTS_FORMAT = "hybridreg-learned-v1"
LOG_COLUMNS = ["step", "lr", "total", "similarity", "regularization", "hyperprior", "lambda_smoothness"]
VAL_COLUMNS = ["epoch", "step", "train_loss", "val_dice", "seconds"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (``hybridreg train --config`` reads this from YAML).

    Attributes:
        network, objective: the architecture and the energy (the instance solver's
            defaults: ``w_reg`` 4, 5 squarings, so both solvers minimise one energy).
        steps: optimizer steps in total; epoch_steps: steps between validations.
        lr, weight_decay: AdamW; poly_power: exponent of the polynomial decay.
        checkpoint_every: steps between checkpoints; keep_checkpoints: how many are kept.
        seed: seeds the sampling generator (plus the rank) and torch.
        pairing: ``"atlas"`` (fixed = the atlas), ``"subject"`` (two different subjects,
            the atlas included) or ``"mixed"`` (atlas pairs with probability
            ``atlas_fraction``, else subject pairs).
        flip_prob: probability of flipping a pair along each axis (both images alike).
        deform_prob: probability of deforming each subject image by a random smooth
            diffeomorphism (never the atlas); deform_std_mm: standard deviation of its
            velocity control points in mm; deform_control: control points per axis.
        gamma_std: standard deviation of log γ for a random intensity gamma ``x^γ`` per
            image (0 disables).
        lambda_warmup_steps: for the first N steps the energy uses a uniform
            λ ≡ ``lambda_init`` instead of the λ head (which is not trained then), so the
            velocity path learns real deformations before λ adapts to them.
        lambda_init: the warm-up λ (0.5 = the instance solver's start).
        lambda_lr_factor: learning rate of the λ head relative to the rest (the instance
            solver also moves λ 10× slower than the velocity: ``lr_lambda`` 0.05 vs ``lr`` 0.5).

    Why the warm-up: the beta hyperprior pulls λ towards 1 with strength ``a`` while the
    regularizer pulls it down only where the strain is large. A network starting from the
    identity has no strain yet, so its λ head saturates at λ ≈ 1 everywhere within a few
    hundred steps, and the uniform maximal regularization then keeps deformations small
    (measured here: λ = 0.999 ± 0.002 and a validation plateau after 1,750 steps without
    the warm-up).
    """

    network: NetworkConfig = field(default_factory=NetworkConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(w_reg=4.0, svf_steps=5))
    steps: int = 1000
    epoch_steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 1e-5
    poly_power: float = 0.9
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    pairing: Literal["atlas", "subject", "mixed"] = "atlas"
    atlas_fraction: float = 0.5
    flip_prob: float = 0.5
    deform_prob: float = 0.0
    deform_std_mm: float = 4.0
    deform_control: int = 5
    gamma_std: float = 0.0
    lambda_warmup_steps: int = 0
    lambda_init: float = 0.5
    lambda_lr_factor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "epoch_steps", "checkpoint_every", "keep_checkpoints", "deform_control"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig: `{name}` must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: `lr` must be > 0, got {self.lr!r}")
        for name in ("flip_prob", "deform_prob", "atlas_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"TrainConfig: `{name}` must be in [0, 1], got {getattr(self, name)!r}")
        if not 0 < self.lambda_init <= 1 or not self.lambda_lr_factor > 0:
            raise ValueError("TrainConfig: `lambda_init` must be in (0, 1] and `lambda_lr_factor` > 0")
        if not isinstance(self.lambda_warmup_steps, int) or self.lambda_warmup_steps < 0:
            raise ValueError(f"TrainConfig: `lambda_warmup_steps` must be an int >= 0, got {self.lambda_warmup_steps!r}")
        for name in ("deform_std_mm", "gamma_std", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig: `{name}` must be >= 0, got {getattr(self, name)!r}")
        if self.network.lambda_mode == "uniform" and self.lambda_warmup_steps:
            raise ValueError("TrainConfig: `lambda_warmup_steps` must be 0 with network.lambda_mode 'uniform' (there is no λ head"
                             " to warm up; λ is network.lambda_uniform throughout)")
        if self.pairing not in ("atlas", "subject", "mixed"):
            raise ValueError(f"TrainConfig: `pairing` must be 'atlas', 'subject' or 'mixed', got {self.pairing!r}")


# ----------------------------------------------------------------------------- augmentation

def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def random_deformation(image: torch.Tensor, std_mm: float, control: int, spacing: Sequence[float],
                       gen: torch.Generator) -> torch.Tensor:
    """Warp ``image`` ``(1, 1, *spatial)`` by ``exp(v)``, ``v`` Gaussian noise (std ``std_mm``
    mm per component) on a ``control``-per-axis grid, up-sampled linearly (smooth and
    diffeomorphic by construction: scaling and squaring of a smooth SVF)."""
    d = image.dim() - 2
    v = torch.randn((1, d) + (control,) * d, generator=gen).to(image)
    v = v * torch.tensor([std_mm / s for s in spacing], dtype=image.dtype, device=image.device).view(1, d, *(1,) * d)
    v = resize_image(v, image.shape[2:])  # already in voxels of the image grid: interpolate only
    return warp(image, scaling_and_squaring(v, 6))


def _augment(img: torch.Tensor, is_atlas: bool, cfg: TrainConfig, spacing, gen: torch.Generator) -> torch.Tensor:
    if not is_atlas and cfg.deform_prob > 0 and _uniform(gen) < cfg.deform_prob:
        img = random_deformation(img, cfg.deform_std_mm, cfg.deform_control, spacing, gen)
    if cfg.gamma_std > 0:
        g = float(torch.randn((), generator=gen)) * cfg.gamma_std
        img = img.clamp_min(0) ** float(np.exp(g))
    return img


def _sample_pair(data: RegistrationDataset, images: list[torch.Tensor], atlas: torch.Tensor | None,
                 cfg: TrainConfig, gen: torch.Generator):
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
    fixed = _augment(fixed, f_atlas, cfg, data.spacing, gen)
    moving = _augment(moving, m_atlas, cfg, data.spacing, gen)
    dims = [k + 2 for k in range(fixed.dim() - 2) if _uniform(gen) < cfg.flip_prob]
    if dims:
        fixed, moving = fixed.flip(dims), moving.flip(dims)
    return fixed, moving


# ----------------------------------------------------------------------------- weights

def save_weights(path: str | os.PathLike, net: RegistrationNetwork, objective: ObjectiveConfig,
                 spacing: Sequence[float], info: dict | None = None) -> None:
    """Write a weight file (atomically): the state dict in float32 plus everything inference
    needs (network config, the energy's config, the training voxel size in mm)."""
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu() for k, v in net.state_dict().items()}
    payload = {"format": WEIGHTS_FORMAT, "network": to_dict(net.config), "objective": to_dict(objective),
               "spacing": [float(s) for s in spacing], "info": info or {}, "state_dict": state}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_weights(path: str | os.PathLike, device: torch.device | str | None = None):
    """Read a weight file written by :func:`save_weights`.

    Returns:
        ``(network in eval mode, ObjectiveConfig, training spacing, info dict)``.

    Raises:
        FileNotFoundError: missing file. ValueError: not a hybridreg weight file.
    """
    from hybridreg.config import from_dict

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"`--weights`: file not found: {p}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for corrupt files
        raise ValueError(f"`--weights`: cannot read {p} as a hybridreg weight file: {type(e).__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"`--weights`: {p} is not a {WEIGHTS_FORMAT} weight file")
    net = RegistrationNetwork(from_dict(NetworkConfig, payload["network"], where="weights network"))
    net.load_state_dict(payload["state_dict"])
    net.eval().to(device or "cpu")
    return net, from_dict(ObjectiveConfig, payload["objective"], where="weights objective"), tuple(payload["spacing"]), payload["info"]


def predict(net: RegistrationNetwork, fixed: torch.Tensor, moving: torch.Tensor, objective: ObjectiveConfig,
            spacing: Sequence[float]):
    """Network output and its :class:`hybridreg.objective.Evaluation` (displacement on the
    image grid, warped image, energy terms), without gradients."""
    with torch.no_grad():
        out = net(fixed, moving)
        return out, network_energy(out, fixed, moving, objective, spacing)


# ----------------------------------------------------------------------------- helpers

def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint_*.pt`` in ``run_dir`` (by step), or ``None``."""
    cks = sorted(Path(run_dir).glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return cks[-1] if cks else None


def _tensor(v: Volume, dev) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(v.image))[None, None].to(dev)


def validation_dice(net: RegistrationNetwork, data: RegistrationDataset, objective: ObjectiveConfig,
                    device: torch.device | str = "cpu") -> float:
    """Mean over :meth:`RegistrationDataset.validation_pairs` of the mean Dice over the labels
    the pair shares (moving labels warped by nearest neighbour); NaN without pairs."""
    scores = []
    for f, m in data.validation_pairs():
        _, ev = predict(net, _tensor(f, device), _tensor(m, device), objective, data.spacing)
        wl = warp(torch.from_numpy(m.labels)[None, None].to(device), ev.displacement, mode="nearest")[0, 0].cpu().numpy()
        labs = common_labels(f.labels, m.labels)
        if labs:
            scores.append(float(np.nanmean(list(dice(f.labels, wl, labs).values()))))
    return float(np.mean(scores)) if scores else float("nan")


def training_figure(run_dir: str | os.PathLike) -> Path:
    """Plot ``log.csv`` (total loss, moving average) and ``validation.csv`` (Dice) into
    ``training.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    with open(run / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(run / "validation.csv", newline="") as fh:
        val = list(csv.DictReader(fh))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
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
    plt.close(fig)
    return out


def _append_row(path: Path, row: Sequence) -> None:
    with open(path, "a", newline="") as fh:
        csv.writer(fh).writerow(row)


def _truncate_csv(path: Path, step: int, key: str) -> None:
    """Drop rows beyond ``step`` (written after the checkpoint a resume starts from)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    head, body = rows[0], rows[1:]
    i = head.index(key)
    keep = [head] + [r for r in body if int(r[i]) <= step]
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(keep)


def _dist_info() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), ws) if ws > 1 else (0, 1)


# ----------------------------------------------------------------------------- the loop

def train(
    cfg: TrainConfig,
    data: RegistrationDataset,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    init_weights: str | os.PathLike | None = None,
) -> RegistrationNetwork:
    """Train a network on ``data`` (labels are never used in the loss).

    Args:
        cfg: :class:`TrainConfig`.
        data: a :class:`hybridreg.data.sources.RegistrationDataset` (one grid; ``data.train``
            images, optional ``data.atlas``; ``data.val`` with labels for validation Dice).
        run_dir: output folder (module docstring lists its files).
        resume: continue from the newest checkpoint in ``run_dir``, exactly.
        stop_after: stop after this global step (an interruption, for tests).
        device: ``cpu`` (default) or ``cuda``; under torchrun each process uses
            ``cuda:LOCAL_RANK`` when ``device`` is CUDA.
        progress: show a tqdm bar (rank 0).
        init_weights: start a fresh run from this weight file (fine-tuning; the network
            configs must match, except that ``network`` may add a full-resolution stage to
            weights without one, which then starts from their output). Ignored on resume (the checkpoint holds the weights).

    Returns:
        The trained network (unwrapped, on ``device``).

    Raises:
        ValueError: a network/data dimension mismatch, atlas pairing without an atlas,
            subject pairing with one subject, ``resume`` without a checkpoint, or a fresh
            run into a folder that already holds a run.
    """
    d = len(data.shape)
    if cfg.network.ndim != d:
        raise ValueError(f"train(): `network.ndim` is {cfg.network.ndim} but the data are {d}D")
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
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        if not resume and (run / "log.csv").exists():
            raise ValueError(f"train(): {run} already holds a run; pass resume=True (`--resume`) or choose a new `--out`")

    torch.manual_seed(cfg.seed)
    net = RegistrationNetwork(cfg.network).to(dev)
    if init_weights is not None and not resume:
        init_net = load_weights(init_weights)[0]
        # Weights of the same network without the full-resolution stage may start one with it
        # (the stage's residual starts near zero): every other parameter must match.
        grown = replace(init_net.config, full_resolution_channels=cfg.network.full_resolution_channels)
        if grown != cfg.network or (init_net.config.full_resolution_channels not in (0, cfg.network.full_resolution_channels)):
            raise ValueError(f"train(): `init_weights` {init_weights} holds a different network config than `network`"
                             " (only a full-resolution stage may be added)")
        net.load_state_dict(init_net.state_dict(), strict=init_net.config == cfg.network)
    lam_params = list(net.lambda_head.parameters()) if net.lambda_head is not None else []
    lam_ids = {id(p) for p in lam_params}
    opt = torch.optim.AdamW([{"params": [p for p in net.parameters() if id(p) not in lam_ids], "lr": cfg.lr},
                             {"params": lam_params, "lr": cfg.lr * cfg.lambda_lr_factor}], weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.steps) ** cfg.poly_power)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    start, best, epoch_losses = 0, -1.0, []
    if resume:
        ck = latest_checkpoint(run)
        if ck is None:
            raise ValueError(f"train(): `resume` was requested but {run} holds no checkpoint")
        state = torch.load(ck, map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != world:
            raise ValueError(f"train(): checkpoint {ck.name} was written by {state.get('world_size', 1)} processes, now {world}")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generators"][rank])
        torch.set_rng_state(state["torch_rng"][rank])
        start, best, epoch_losses = state["step"], state["best_val_dice"], list(state["epoch_losses"])
        if rank == 0:
            _truncate_csv(run / "log.csv", start, "step")
            _truncate_csv(run / "validation.csv", start, "step")
    elif rank == 0:
        dump_yaml(cfg, run / "config.yaml")
        for name, cols in (("log.csv", LOG_COLUMNS), ("validation.csv", VAL_COLUMNS)):
            with atomic_output(run / name) as tmp, open(tmp, "w", newline="") as fh:
                csv.writer(fh).writerow(cols)
    model = (torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=cfg.lambda_warmup_steps > 0)
             if world > 1 else net)

    images = [_tensor(v, dev) for v in data.train]
    atlas = _tensor(data.atlas, dev) if data.atlas is not None else None
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    info = {"data": data.name, "world_size": world, "steps": cfg.steps}
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="train", disable=not progress or rank != 0,
               dynamic_ncols=True)
    t_epoch = time.perf_counter()
    net.train()
    for step in bar:
        fixed, moving = _sample_pair(data, images, atlas, cfg, gen)
        out = model(fixed, moving)
        if step < cfg.lambda_warmup_steps:
            out = NetOutput(out.velocity, torch.full_like(out.lam, cfg.lambda_init))
        terms = network_energy(out, fixed, moving, cfg.objective, data.spacing).terms
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
        sched.step()
        vals = [float(t.detach()) for t in terms]
        epoch_losses.append(vals[0])
        if rank == 0:
            _append_row(run / "log.csv", [step + 1, sched.get_last_lr()[0], *vals])
            bar.set_postfix(loss=f"{vals[0]:.4f}", refresh=False)
        done = step + 1
        if done % cfg.epoch_steps == 0 or done == cfg.steps:
            if rank == 0:
                net.eval()
                vd = validation_dice(net, data, cfg.objective, dev)
                net.train()
                _append_row(run / "validation.csv", [-(-done // cfg.epoch_steps), done, float(np.mean(epoch_losses)), vd,
                                                     time.perf_counter() - t_epoch])
                if np.isfinite(vd) and vd > best:
                    best = vd
                    save_weights(run / "model_best.pt", net, cfg.objective, data.spacing, {**info, "step": done, "val_dice": vd})
                training_figure(run)
                bar.write(f"step {done}: train loss {np.mean(epoch_losses):.4f}  validation Dice {vd:.4f}")
            epoch_losses, t_epoch = [], time.perf_counter()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            gens = [gen.get_state()]
            rngs = [torch.get_rng_state()]
            if world > 1:
                gens, rngs = [None] * world, [None] * world
                dist.all_gather_object(gens, gen.get_state())
                dist.all_gather_object(rngs, torch.get_rng_state())
            if rank == 0:
                with atomic_output(run / f"checkpoint_{done}.pt") as tmp:
                    torch.save({"step": done, "model": net.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "generators": gens, "torch_rng": rngs,
                                "world_size": world, "best_val_dice": best, "epoch_losses": epoch_losses, "config": to_dict(cfg)}, tmp)
                for old in sorted(run.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:-cfg.keep_checkpoints]:
                    old.unlink(missing_ok=True)
        if done == cfg.steps and rank == 0:
            save_weights(run / "model_final.pt", net, cfg.objective, data.spacing, {**info, "step": done})
            with open(run / "validation.csv", newline="") as fh:
                hist = list(csv.DictReader(fh))
            atomic_write_text(run / "history.json", json.dumps({"best_val_dice": best, "epochs": hist, **info}, indent=2))
    bar.close()
    if world > 1:
        dist.barrier()
    return net
