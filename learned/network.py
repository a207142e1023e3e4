"""Registration network with a λ head: ``g(fixed, moving) → (velocity, λ)`` (method §2.2).

The backbone is pluggable (:data:`BACKBONES`); the default is a VoxelMorph-like 3D/2D U-Net.
Two heads read the decoder's last features: a velocity head (a convolution initialised
near zero, so training starts at the identity) and the λ head of the reference
(conv3 16→48, conv3 48→48 with instance norm and LeakyReLU, conv3 48→1, then sigmoid
under the beta hyperprior or softplus under the normal one, clamped as in
:data:`hybridreg.priors.LAMBDA_BOUNDS`).

The network may run on a down-sampled grid (``resolution_factor = 2`` halves every axis, as
TM-SPR does). Its outputs are then on that grid: the velocity in voxels of that grid, which
:func:`hybridreg.objective.evaluate` integrates there (the control grid) and up-samples,
exactly like the instance optimizer's control grid; λ likewise. An optional full-resolution
velocity stage (``NetworkConfig.full_resolution_channels``) brings both back to the input grid
with a residual SVF at that resolution (:class:`FullResolutionStage`). The training loss is
:func:`hybridreg.objective.evaluate` and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridreg.config import bounded, check_bounds
from hybridreg.priors import LAMBDA_BOUNDS, lambda_from_param
from hybridreg.spatial import resize_field, resize_image

__all__ = ["NetworkConfig", "NetOutput", "UNetBackbone", "SwinBackbone", "LambdaHead", "FullResolutionStage",
           "Modulation", "RegistrationNetwork", "BACKBONES", "CODE_KEYS"]

CODE_KEYS = ("w_reg", "hyper_strength")
"""The energy's hyperparameters a conditional network takes as its code (``objective.<key>``), in
the order of the code's columns (method §3.3)."""


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of :class:`RegistrationNetwork`.

    Attributes:
        ndim: 2 or 3 spatial dimensions.
        backbone: key of :data:`BACKBONES`.
        encoder: channels of the encoder stages (each halves the grid).
        decoder: channels of the decoder stages (the last is the feature width the heads read).
        lambda_prior: ``"beta"`` (sigmoid) or ``"normal"`` (softplus) λ head.
        lambda_channels: hidden width of the λ head (48 in the reference).
        resolution_factor: the network runs on the image grid divided by this (1 or 2).
        full_resolution_channels: width of a full-resolution velocity stage (0: none; needs
            ``resolution_factor`` 2). The backbone, velocity head and λ head run on the half
            grid as without it; the stage up-samples the backbone's features to the input
            grid, concatenates a conv block of the input images, convolves, and adds the
            resulting residual velocity to the coarse velocity resampled to the input grid
            (:func:`hybridreg.spatial.resize_field`); λ is up-sampled linearly (it stays in
            the prior's range). The outputs are then on the input grid: the SVF is no
            longer limited to the half grid's detail (VoxelMorph's ``int_downsize`` 2 has
            the same limit).
        lambda_mode: ``"voxelwise"`` (the λ head, method §2.2) or ``"uniform"``: no λ head,
            λ ≡ ``lambda_uniform`` everywhere -- the spatially uniform baseline of the
            learned solver, trained on the same energy (the instance solver's
            ``lambda_mode="uniform"`` counterpart).
        lambda_uniform: the fixed λ of the uniform mode, inside the ``lambda_prior``'s
            range :data:`hybridreg.priors.LAMBDA_BOUNDS`; the regularizer's weight is
            ``w_reg · λ``, so a uniform λ calibrated with another ``w_reg`` is rescaled by
            the ratio of the two.
        conditional: condition the network on the energy's hyperparameters :data:`CODE_KEYS`
            (``objective.w_reg``, ``objective.hyper_strength``; method §3.3, HyperMorph /
            HyperTMSPR): each is log-scaled to [−1, 1] over its range and the code modulates
            the features of every decoder stage and of the full-resolution stage by FiLM
            (:class:`Modulation`), so one network serves the whole range at test time.
        w_reg_range, hyper_strength_range: ``(low, high)``, the range of each hyperparameter
            that training samples (log-uniformly) and that test time accepts.
        region_condition: condition the network on a region-wise λ map Λ (method §3.2,
            CSAIN: one λ_k per labelled region, painted and Gaussian-smoothed) through
            spatially adaptive modulation of the same features (:class:`Modulation`); the
            energy's λ is then Λ (``region_lambda: "map"``) or Λ times the λ head
            (``"product"``).
        region_lambda: how a region-conditioned output's λ is formed (above).
        modulation_channels: hidden width of the modulation networks.
        swin_embed_dim, swin_depths, swin_heads, swin_window: the ``"swin"`` backbone's
            Swin-transformer encoder (MONAI ``SwinTransformer``: patch size 2, four stages,
            so ``swin_depths`` and ``swin_heads`` have 4 entries and ``decoder`` 5).
    """

    ndim: int = bounded(3, 2, 3)
    backbone: str = "unet"
    encoder: tuple[int, ...] = bounded(lambda: (16, 32, 32, 32), 1, 512, factory=True)
    decoder: tuple[int, ...] = bounded(lambda: (32, 32, 32, 16), 1, 512, factory=True)
    lambda_prior: Literal["beta", "normal"] = "beta"
    lambda_channels: int = bounded(48, 1, 512)
    resolution_factor: int = bounded(2, 1, 2)
    full_resolution_channels: int = bounded(0, 0, 256)
    lambda_mode: Literal["voxelwise", "uniform"] = "voxelwise"
    lambda_uniform: float = bounded(1.0, 1e-6, 5.0)
    conditional: bool = False
    w_reg_range: tuple[float, ...] = bounded(lambda: (1.0, 16.0), 1e-4, 1e4, factory=True)
    hyper_strength_range: tuple[float, ...] = bounded(lambda: (0.02, 1.0), 1e-6, 1e4, factory=True)
    region_condition: bool = False
    region_lambda: Literal["map", "product"] = "map"
    modulation_channels: int = bounded(32, 1, 512)
    swin_embed_dim: int = bounded(24, 1, 384)
    swin_depths: tuple[int, ...] = bounded(lambda: (2, 2, 2, 2), 1, 12, factory=True)
    swin_heads: tuple[int, ...] = bounded(lambda: (3, 6, 12, 24), 1, 64, factory=True)
    swin_window: int = bounded(5, 1, 32)

    def __post_init__(self) -> None:
        """Check the fields (``ValueError`` naming the field: out of range, wrong type, unknown key or mode)."""
        if self.ndim not in (2, 3):
            raise ValueError(f"NetworkConfig: `ndim` must be 2 or 3, got {self.ndim!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"NetworkConfig: `backbone` must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        check_bounds(self)  # channel counts and widths: every number has a range (docs/configuration.md)
        if self.backbone == "unet" and (not self.encoder or len(self.decoder) != len(self.encoder)):
            raise ValueError("NetworkConfig: `encoder` and `decoder` must be non-empty lists of equal length for the unet backbone")
        if self.backbone == "swin":
            if len(self.swin_depths) != 4 or len(self.swin_heads) != 4 or len(self.decoder) != 5:
                raise ValueError("NetworkConfig: the swin backbone (MONAI SwinTransformer) has 4 stages: "
                                 "`swin_depths` and `swin_heads` need 4 entries and `decoder` 5")
            if any(self.swin_embed_dim * 2**i % h for i, h in enumerate(self.swin_heads)):
                raise ValueError("NetworkConfig: `swin_heads[i]` must divide the stage width swin_embed_dim * 2**i")
        if self.lambda_prior not in LAMBDA_BOUNDS:
            raise ValueError(f"NetworkConfig: `lambda_prior` must be 'beta' or 'normal', got {self.lambda_prior!r}")
        if self.resolution_factor not in (1, 2):
            raise ValueError(f"NetworkConfig: `resolution_factor` must be 1 or 2, got {self.resolution_factor!r}")
        if self.full_resolution_channels < 0 or (self.full_resolution_channels and self.resolution_factor != 2):
            raise ValueError("NetworkConfig: `full_resolution_channels` must be 0, or a positive width with"
                             f" resolution_factor 2; got {self.full_resolution_channels!r} with resolution_factor"
                             f" {self.resolution_factor!r}")
        if self.lambda_mode not in ("voxelwise", "uniform"):
            raise ValueError(f"NetworkConfig: `lambda_mode` must be 'voxelwise' or 'uniform', got {self.lambda_mode!r}")
        for name in ("w_reg_range", "hyper_strength_range"):
            r = getattr(self, name)
            if len(r) != 2 or not r[0] < r[1]:
                raise ValueError(f"NetworkConfig: `{name}` must be [low, high] with low < high, got {list(r)!r}")
        if self.region_lambda not in ("map", "product"):
            raise ValueError(f"NetworkConfig: `region_lambda` must be 'map' or 'product', got {self.region_lambda!r}")
        if self.region_condition and self.region_lambda == "product" and self.lambda_mode != "voxelwise":
            raise ValueError("NetworkConfig: `region_lambda: product` needs the λ head (lambda_mode 'voxelwise')")
        lo, hi = LAMBDA_BOUNDS[self.lambda_prior]
        if not lo <= self.lambda_uniform <= hi:
            raise ValueError(f"NetworkConfig: `lambda_uniform` must be in [{lo:g}, {hi:g}] under the {self.lambda_prior}"
                             f" prior, got {self.lambda_uniform!r}")


class NetOutput(NamedTuple):
    """Network outputs on the network's grid (the control grid of the objective).

    velocity: ``(B, d, *grid)`` SVF in voxels of that grid. lam: ``(B, 1, *grid)`` λ.
    """

    velocity: torch.Tensor
    lam: torch.Tensor


def _conv(ndim: int):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _norm(ndim: int):
    return nn.InstanceNorm3d if ndim == 3 else nn.InstanceNorm2d


class _Block(nn.Sequential):
    def __init__(self, ndim: int, cin: int, cout: int, stride: int = 1):
        super().__init__(_conv(ndim)(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


Modulate = Callable[[int, torch.Tensor], torch.Tensor]
"""``modulate(stage, features) -> features``: the conditioning applied after each decoder stage."""


def _identity(stage: int, h: torch.Tensor) -> torch.Tensor:
    return h


def _decode(h: torch.Tensor, skips: list[torch.Tensor], ups: nn.ModuleList, out: nn.Module,
            modulate: Modulate = _identity) -> torch.Tensor:
    """U-Net decoder: up-sample ``h`` to the next skip (popped from the end), concatenate,
    convolve, ``modulate``; repeat for every layer of ``ups``; then ``out`` and ``modulate``
    (stage ``len(ups)``)."""
    mode = "trilinear" if h.dim() == 5 else "bilinear"
    for i, layer in enumerate(ups):
        s = skips.pop()
        h = F.interpolate(h, size=s.shape[2:], mode=mode, align_corners=False)
        h = modulate(i, layer(torch.cat([h, s], dim=1)))
    return modulate(len(ups), out(h))


class UNetBackbone(nn.Module):
    """VoxelMorph-like U-Net (Balakrishnan et al., IEEE TMI 2019): strided-conv encoder,
    up-sampling decoder with skip connections. ``forward(x)``: ``(B, in_channels, *grid)`` →
    ``(B, decoder[-1], *grid)`` features on the input grid (each grid size divisible by
    ``2^(len(encoder) − 1)``, as the network's resizing ensures)."""

    def __init__(self, cfg: NetworkConfig, in_channels: int = 2):
        super().__init__()
        nd = cfg.ndim
        self.inc = _Block(nd, in_channels, cfg.encoder[0])
        self.down = nn.ModuleList(_Block(nd, cfg.encoder[i], cfg.encoder[i + 1], stride=2) for i in range(len(cfg.encoder) - 1))
        self.up = nn.ModuleList()
        ch = cfg.encoder[-1]
        for i in range(len(cfg.encoder) - 1):
            skip = cfg.encoder[-2 - i]
            self.up.append(_Block(nd, ch + skip, cfg.decoder[i]))
            ch = cfg.decoder[i]
        self.out = _Block(nd, ch, cfg.decoder[-1])
        self.out_channels = cfg.decoder[-1]

    def forward(self, x: torch.Tensor, modulate: Modulate = _identity) -> torch.Tensor:
        skips = [self.inc(x)]
        for layer in self.down:
            skips.append(layer(skips[-1]))
        return _decode(skips.pop(), skips, self.up, self.out, modulate)


class SwinBackbone(nn.Module):
    """TransMorph-style backbone (Chen et al., MedIA 2022): a Swin-transformer encoder
    (MONAI's ``SwinTransformer``, patch size 2: the patch embedding and its four stages give
    features at 1/2 … 1/32 of the input with ``swin_embed_dim · 2^i`` channels) and a
    convolutional decoder with skip connections from every stage plus a full-resolution
    convolutional skip, ending in ``decoder[-1]`` features on the input grid. Needs the optional dependency MONAI (``pip install
    hybridreg[swin]``)."""

    def __init__(self, cfg: NetworkConfig, in_channels: int = 2):
        super().__init__()
        try:
            from monai.networks.nets.swin_unetr import SwinTransformer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the 'swin' backbone needs MONAI and einops: pip install 'hybridreg[swin]'") from e
        nd = cfg.ndim
        self.encoder = SwinTransformer(
            in_chans=in_channels, embed_dim=cfg.swin_embed_dim, window_size=(cfg.swin_window,) * nd,
            patch_size=(2,) * nd, depths=tuple(cfg.swin_depths), num_heads=tuple(cfg.swin_heads), spatial_dims=nd,
        )
        n = len(cfg.swin_depths) + 1  # patch embedding + 4 stages, each output is used
        widths = [cfg.swin_embed_dim * 2**i for i in range(n)]
        self.full_skip = _Block(nd, in_channels, cfg.decoder[-1])
        self.up = nn.ModuleList()
        ch = widths[-1]
        skips = widths[-2::-1] + [cfg.decoder[-1]]
        for i, skip in enumerate(skips):
            self.up.append(_Block(nd, ch + skip, cfg.decoder[i]))
            ch = cfg.decoder[i]
        self.out = _Block(nd, ch, cfg.decoder[-1])
        self.out_channels = cfg.decoder[-1]
        self.n_stages = n

    def forward(self, x: torch.Tensor, modulate: Modulate = _identity) -> torch.Tensor:
        feats = self.encoder(x, normalize=True)[: self.n_stages]
        skips = [self.full_skip(x)] + list(feats[:-1])
        return _decode(feats[-1], skips, self.up, self.out, modulate)


BACKBONES = {"unet": UNetBackbone, "swin": SwinBackbone}
"""Backbone name → class taking ``(NetworkConfig, in_channels)`` and exposing ``out_channels``."""


class LambdaHead(nn.Module):
    """λ head of the reference (method §2.2): conv3 C→hidden, conv3 hidden→hidden + norm +
    LeakyReLU, conv3 hidden→1, then sigmoid (beta) or softplus (normal), clamped to
    :data:`hybridreg.priors.LAMBDA_BOUNDS` (the reference's hidden width is 48,
    ``NetworkConfig.lambda_channels``). ``forward(h)``: features ``(B, cin, *grid)`` →
    λ ``(B, 1, *grid)``."""

    def __init__(self, ndim: int, cin: int, hidden: int, prior: str):
        super().__init__()
        conv = _conv(ndim)
        self.body = nn.Sequential(conv(cin, hidden, 3, padding=1), conv(hidden, hidden, 3, padding=1), _norm(ndim)(hidden),
                                  nn.LeakyReLU(0.2), conv(hidden, 1, 3, padding=1))
        self.prior = prior

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return lambda_from_param(self.body(h), self.prior)


class FullResolutionStage(nn.Module):
    """Full-resolution velocity stage (``NetworkConfig.full_resolution_channels``): the
    coarse velocity resampled to the input grid plus a residual predicted from the up-sampled
    backbone features and a conv block of the input images. The residual head starts near
    zero, so a network fine-tuned from half-grid weights starts from their output.
    ``forward(h, x, velocity)``: features ``(B, features, *half)``, images ``(B, in_channels,
    *grid)``, velocity ``(B, d, *half)`` in half-grid voxels → ``(B, d, *grid)`` in voxels of
    ``x``'s grid."""

    def __init__(self, ndim: int, features: int, channels: int, in_channels: int = 2):
        super().__init__()
        self.image = _Block(ndim, in_channels, channels)
        self.block = _Block(ndim, features + channels, channels)
        self.velocity_head = _conv(ndim)(channels, ndim, 3, padding=1)
        nn.init.normal_(self.velocity_head.weight, std=1e-5)
        nn.init.zeros_(self.velocity_head.bias)

    def forward(self, h: torch.Tensor, x: torch.Tensor, velocity: torch.Tensor, modulate: Modulate = _identity) -> torch.Tensor:
        """Velocity on the grid of ``x`` from features ``h`` and ``velocity`` on the half grid;
        ``modulate`` conditions the stage's features (as stage −1: a conditional network's last)."""
        size = tuple(x.shape[2:])
        residual = self.velocity_head(modulate(-1, self.block(torch.cat([resize_image(h, size), self.image(x)], dim=1))))
        return resize_field(velocity, size) + residual


class Modulation(nn.Module):
    """Conditioning of one stage's features ``h`` ``(B, C, *grid)`` (method §3.2–3.3).

    * FiLM by the code (Perez et al., AAAI 2018; the HyperTMSPR / HyperMorph role): an MLP of
      the code ``(B, k)`` gives per-channel ``γ, β`` and ``h ← (1 + γ) ⊙ h + β``.
    * CSAIN by a region-wise λ map Λ ``(B, 1, *any grid)`` (conditional spatially adaptive
      instance normalisation, CSAIN §3.2): Λ is resampled to ``h``'s grid, 1×1×1 convolutions
      give per-voxel ``γ(Λ), β(Λ)``, and ``h ← h + γ(Λ) ⊙ norm(h) + β(Λ)`` with ``norm`` the
      instance norm -- CSAIN's ``γ ⊙ norm(h) + β`` kept as a residual, so the unconditioned
      path survives.

    FiLM rather than a hypernetwork: a few thousand parameters instead of a second network
    that writes every weight, and the same features serve every code. Both last layers start
    at zero, so a conditional network made from unconditional weights starts from their
    output (the modulation is the identity). The convolutions are pointwise, so a constant Λ
    gives a spatially constant modulation: CSAIN with one λ everywhere is conditional
    instance normalisation on the scalar λ.
    """

    def __init__(self, ndim: int, channels: int, code_dim: int, region: bool, hidden: int):
        super().__init__()
        self.film = nn.Sequential(nn.Linear(code_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 2 * channels)) \
            if code_dim else None
        conv = _conv(ndim)
        self.csain = nn.Sequential(conv(1, hidden, 1), nn.LeakyReLU(0.2), conv(hidden, 2 * channels, 1)) if region else None
        self.norm = _norm(ndim)(channels, affine=False)
        for net in (self.film, self.csain):
            if net is not None:
                nn.init.zeros_(net[-1].weight)
                nn.init.zeros_(net[-1].bias)

    def forward(self, h: torch.Tensor, code: torch.Tensor | None, region: torch.Tensor | None) -> torch.Tensor:
        if self.film is not None and code is not None:
            gamma, beta = self.film(code.to(h.dtype)).reshape(h.shape[0], 2, h.shape[1], *(1,) * (h.dim() - 2)).unbind(1)
            h = (1 + gamma) * h + beta
        if self.csain is not None and region is not None:
            gamma, beta = self.csain(resize_image(region.to(h.dtype), h.shape[2:])).chunk(2, dim=1)
            h = h + gamma * self.norm(h) + beta
        return h


class RegistrationNetwork(nn.Module):
    """``g(fixed, moving) → NetOutput(velocity, λ)`` on the network grid (module docstring).

    Args (forward):
        fixed, moving: ``(B, 1, *spatial)`` images, intensities about [0, 1].
        code: ``(B, 2)`` the hyperparameters :data:`CODE_KEYS` (``w_reg``,
            ``hyper_strength``, their own units) of a ``conditional`` network; required by one,
            refused by others. Values outside the configured ranges are extrapolated, not
            clamped (the solvers refuse them).
        region: ``(B, 1, *spatial)`` region-wise λ map Λ on the image grid (values in the
            prior's range) for a ``region_condition`` network; ``None`` = the unconditioned
            path (the λ head's λ).

    Returns:
        :class:`NetOutput` on ``spatial / resolution_factor``, or on ``spatial`` with a
        full-resolution stage; λ is constant under ``lambda_mode="uniform"``; with ``region``
        it is Λ on the output grid (or Λ times the head's λ, ``region_lambda: product``).

    Raises:
        ValueError: images of different shapes or the wrong number of dimensions, a code
            missing or unexpected, not ``(B, 2)`` or not positive, a region map on a network
            without region conditioning or not ``(B, 1, *spatial)``.
    """

    def __init__(self, config: NetworkConfig | None = None):
        super().__init__()
        self.config = cfg = config or NetworkConfig()
        self.backbone = BACKBONES[cfg.backbone](cfg, in_channels=2)
        c = self.backbone.out_channels
        self.velocity_head = _conv(cfg.ndim)(c, cfg.ndim, 3, padding=1)
        nn.init.normal_(self.velocity_head.weight, std=1e-5)
        nn.init.zeros_(self.velocity_head.bias)
        self.lambda_head = (LambdaHead(cfg.ndim, c, cfg.lambda_channels, cfg.lambda_prior)
                            if cfg.lambda_mode == "voxelwise" else None)
        self.full_resolution = (FullResolutionStage(cfg.ndim, c, cfg.full_resolution_channels)
                                if cfg.full_resolution_channels else None)
        self.modulation = None
        if cfg.conditional or cfg.region_condition:
            widths = [layer[0].out_channels for layer in self.backbone.up] + [c]
            widths += [cfg.full_resolution_channels] if cfg.full_resolution_channels else []
            self.modulation = nn.ModuleList(Modulation(cfg.ndim, w, len(CODE_KEYS) if cfg.conditional else 0,
                                                       cfg.region_condition, cfg.modulation_channels) for w in widths)

    def normalized_code(self, code: torch.Tensor) -> torch.Tensor:
        """The code ``(B, 2)`` (``w_reg``, ``hyper_strength``) log-scaled to [−1, 1] over the
        configured ranges (the modulation's input)."""
        lo, hi = torch.tensor([getattr(self.config, f"{k}_range") for k in CODE_KEYS], dtype=code.dtype,
                              device=code.device).log().unbind(1)
        return 2 * (code.log() - lo) / (hi - lo) - 1

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, code: torch.Tensor | None = None,
                region: torch.Tensor | None = None) -> NetOutput:
        cfg, nd = self.config, self.config.ndim
        for name, t in (("fixed", fixed), ("moving", moving)):
            if t.dim() != nd + 2 or t.shape[1] != 1:
                raise ValueError(f"RegistrationNetwork: `{name}` must be (B, 1, *spatial) with {nd} spatial dims, got {tuple(t.shape)}")
        if fixed.shape != moving.shape:
            raise ValueError(f"RegistrationNetwork: `fixed` {tuple(fixed.shape)} and `moving` {tuple(moving.shape)} differ")
        if cfg.conditional != (code is not None):
            raise ValueError("RegistrationNetwork: `code` (B, 2) is required by a conditional network and refused by others")
        if code is not None and (tuple(code.shape) != (fixed.shape[0], len(CODE_KEYS)) or not bool((code > 0).all())):
            raise ValueError(f"RegistrationNetwork: `code` must be (B={fixed.shape[0]}, {len(CODE_KEYS)}) positive values, got"
                             f" {tuple(code.shape)}")
        if region is not None and (not cfg.region_condition or tuple(region.shape) != (fixed.shape[0], 1, *fixed.shape[2:])):
            raise ValueError("RegistrationNetwork: `region` must be a (B, 1, *spatial) λ map, for a network with region_condition")
        x = torch.cat([fixed, moving], dim=1)
        f = cfg.resolution_factor
        xn = resize_image(x, [max(4, n // f) for n in x.shape[2:]]) if f > 1 else x
        modulate = _identity
        if self.modulation is not None:
            z = self.normalized_code(code) if code is not None else None
            modulate = lambda i, h: self.modulation[i](h, z, region)  # noqa: E731
        h = self.backbone(xn, modulate)
        velocity = self.velocity_head(h)
        if self.full_resolution is not None:
            velocity = self.full_resolution(h, x, velocity, modulate)
        grid = velocity.shape[2:]
        if self.lambda_head is None:
            lam = torch.full_like(velocity[:, :1], cfg.lambda_uniform)
        else:  # the λ head runs on the half grid; with a full-resolution stage λ follows the velocity up
            lam = resize_image(self.lambda_head(h), grid)
        if region is not None:
            painted = resize_image(region.to(lam.dtype), grid)
            lam = painted * lam if cfg.region_lambda == "product" else painted
        return NetOutput(velocity, lam)
