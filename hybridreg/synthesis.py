"""Scan-like images synthesised from label maps: random contrast, texture, bias field,
resolution, noise and gamma, on a randomly deformed copy of the labels.

This is the label-to-image generative model of SynthSeg and SynthMorph (Billot et al., "SynthSeg:
segmentation of brain MRI scans of any contrast and resolution without retraining", MedIA 86,
2023, §3.1; Hoffmann et al., "SynthMorph: learning contrast-invariant registration without
acquired images", IEEE TMI 41(3), 2022, §III-A, eqs. 4-8), used so that training (``hybridreg
train``, ``TrainConfig.synth_prob``) and tuning (``SearchSpace.synth_contrasts``) do not fit one
contrast. Each call draws, with a ``torch.Generator``:

1. a smooth random diffeomorphism ``exp(v)`` (``v`` Gaussian on a coarse control grid, std
   ``deform_std_mm``) applied to the labels (nearest neighbour), so the image and the returned
   labels always agree;
2. per label ``k`` a mean ``μ_k ~ U(0, 1)`` and a texture std ``σ_k ~ U(0, texture_std)``: the
   image is ``μ[labels] + σ[labels]·ε`` with ``ε ~ N(0, 1)`` per voxel (label 0 keeps
   ``μ_0 = 0`` with probability ``background_zero``: skull-stripped scans);
3. a Gaussian blur of std ``U(0, blur_mm)`` mm per axis (partial volume, resolution);
4. a multiplicative bias field ``exp(b)``, ``b`` Gaussian with std ``bias_std`` on a
   ``bias_control``-per-axis grid, up-sampled linearly;
5. a rescale to [0, 1], a gamma ``x^exp(g)`` with ``g ~ N(0, gamma_std)``, and additive
   Gaussian noise of std ``U(0, noise_std)`` (clipped to [0, 1]).

The draws come from a CPU ``torch.Generator`` (reproducible on any device); the label
deformation runs on the labels' device and the image is returned there, ``float32`` (or the
requested dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import bounded, check_bounds
from .spatial import gaussian_smooth, resize_image, scaling_and_squaring, warp

__all__ = ["SynthConfig", "synthesize", "random_deformation"]


@dataclass(frozen=True)
class SynthConfig:
    """Ranges of the label-to-image model (module docstring; SynthMorph §III-A).

    Attributes:
        deform_std_mm: std (mm) of the SVF control points of the labels' random deformation
            (0: none); deform_control: control points per axis.
        texture_std: upper bound of each label's within-label std (image units, [0, 1] means).
        background_zero: probability that label 0 is black (a skull-stripped scan).
        blur_mm: upper bound of the per-axis Gaussian blur std in mm.
        bias_std: std of the log bias field; bias_control: its control points per axis.
        gamma_std: std of the log gamma exponent.
        noise_std: upper bound of the additive noise std after rescaling to [0, 1].
    """

    deform_std_mm: float = bounded(2.0, 0.0, 50.0)
    deform_control: int = bounded(5, 2, 64)
    texture_std: float = bounded(0.05, 0.0, 1.0)
    background_zero: float = bounded(0.8, 0.0, 1.0)
    blur_mm: float = bounded(1.0, 0.0, 10.0)
    bias_std: float = bounded(0.3, 0.0, 2.0)
    bias_control: int = bounded(4, 2, 64)
    gamma_std: float = bounded(0.25, 0.0, 2.0)
    noise_std: float = bounded(0.03, 0.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("deform_control", "bias_control"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"SynthConfig: `{name}` must be an int, got {v!r}")
        check_bounds(self)


def random_deformation(image: torch.Tensor, std_mm: float, control: int, spacing: Sequence[float],
                       gen: torch.Generator, mode: str = "bilinear") -> torch.Tensor:
    """Warp ``image`` ``(1, C, *spatial)`` by ``exp(v)``, ``v`` Gaussian noise (std ``std_mm``
    mm per component, drawn with ``gen``) on a ``control``-per-axis grid, up-sampled linearly:
    smooth and diffeomorphic by construction (scaling and squaring of a smooth SVF, 6 steps;
    SynthMorph §III-A). ``mode``: ``"bilinear"`` for images, ``"nearest"`` for label maps."""
    d = image.dim() - 2
    dtype = image.dtype if image.is_floating_point() else torch.float32
    v = torch.randn((1, d) + (control,) * d, generator=gen).to(device=image.device, dtype=dtype)
    v = v * torch.tensor([std_mm / s for s in spacing], dtype=dtype, device=image.device).view(1, d, *(1,) * d)
    v = resize_image(v, image.shape[2:])  # already in voxels of the image grid: interpolate only
    return warp(image, scaling_and_squaring(v, 6), mode=mode)


def _uniform(gen: torch.Generator, hi: float) -> float:
    return float(torch.rand((), generator=gen)) * hi


def _coarse_noise(gen: torch.Generator, channels: int, control: int, d: int) -> torch.Tensor:
    return torch.randn((1, channels) + (control,) * d, generator=gen, dtype=torch.float64)


def synthesize(labels: torch.Tensor, spacing: Sequence[float], config: SynthConfig | None = None, *,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One scan-like image drawn from a label map (module docstring, SynthMorph §III-A).

    Args:
        labels: ``(1, 1, *spatial)`` integer label map, 2D or 3D, labels ≥ 0 (0 = background).
        spacing: voxel size in mm per array axis.
        config: the ranges (default :class:`SynthConfig()`).
        generator: the random source (CPU ``torch.Generator``; seed it for reproducible draws).
        dtype: floating dtype of the image.

    Returns:
        ``(image, labels)``: ``(1, 1, *spatial)`` image in [0, 1] on ``labels``' device, and the
        deformed label map it was drawn from (same dtype as ``labels``).

    Raises:
        ValueError: ``labels`` not an integer ``(1, 1, *spatial)`` 2D/3D map with values ≥ 0,
            or ``spacing`` of the wrong length or not positive.
    """
    cfg = config or SynthConfig()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if labels.dim() not in (4, 5) or labels.shape[:2] != (1, 1) or labels.is_floating_point():
        raise ValueError(f"synthesize(): `labels` must be an integer (1, 1, *spatial) 2D or 3D map, got {labels.dtype}"
                         f" {tuple(labels.shape)}")
    d = labels.dim() - 2
    if len(spacing) != d or any(float(s) <= 0 for s in spacing):
        raise ValueError(f"synthesize(): `spacing` must hold {d} positive values, got {tuple(spacing)}")
    if int(labels.min()) < 0:
        raise ValueError("synthesize(): `labels` must be >= 0")
    dev, spatial = labels.device, labels.shape[2:]

    if cfg.deform_std_mm > 0:
        labels = random_deformation(labels, cfg.deform_std_mm, cfg.deform_control, spacing, gen, mode="nearest")

    n = int(labels.max()) + 1
    mean = torch.rand(n, generator=gen, dtype=torch.float64)
    std = torch.rand(n, generator=gen, dtype=torch.float64) * cfg.texture_std
    if _uniform(gen, 1.0) < cfg.background_zero:
        mean[0], std[0] = 0.0, 0.0
    eps = torch.randn(spatial, generator=gen, dtype=torch.float64)
    idx = labels[0, 0].long().cpu()
    image = (mean[idx] + std[idx] * eps)[None, None]

    if cfg.blur_mm > 0:
        image = gaussian_smooth(image, [_uniform(gen, cfg.blur_mm) / float(s) for s in spacing])  # voxels per axis
    if cfg.bias_std > 0:
        image = image * torch.exp(resize_image(_coarse_noise(gen, 1, cfg.bias_control, d) * cfg.bias_std, spatial))
    lo, hi = image.amin(), image.amax()
    image = (image - lo) / (hi - lo).clamp_min(1e-12)
    if cfg.gamma_std > 0:
        image = image ** float(torch.exp(torch.randn((), generator=gen, dtype=torch.float64) * cfg.gamma_std))
    if cfg.noise_std > 0:
        image = image + torch.randn(image.shape, generator=gen, dtype=torch.float64) * _uniform(gen, cfg.noise_std)
    return image.clamp(0.0, 1.0).to(device=dev, dtype=dtype), labels
