"""MambaVision (Hatamizadeh & Kautz 2024, arXiv 2407.08083): a hierarchical hybrid Mamba / Transformer backbone — and a
plain ViT of the same blocks and sizes (vit-tiny, vit-small) to compare it with.

Paper map:
    section 3.1, Figure 2   stem -> stage 1, 2 of residual conv blocks (eq. 1) -> stage 3, 4 of token blocks (eq. 2),
                            the first half MambaVision mixers, the second half self-attention; a 3×3 stride-2
                            convolution downsamples between stages; BatchNorm, average pool, linear head
    section 3.2, Figure 3   the MambaVision mixer: in_proj into two halves; the SSM half is a non-causal ('same')
                            depthwise conv1d + SiLU then the selective scan (no z gate); the other half is the same
                            conv1d + SiLU without the scan, so both see the whole sequence; concatenated -> out_proj
    section 3.3             the token blocks: x = x + γ₁·Mixer(LN(x)), x = x + γ₂·MLP(LN(x)), with drop-path

Adaptations to 32×32 (CIFAR) and 28×28 (Fashion-MNIST) inputs, where the paper's design assumes 224 px:
    - The stem's two 3×3 convolutions keep stride 1 (the paper's stride 2 + 2 brings 224 px to 56×56 for stage 1;
      a 32 px image is already that coarse), so stages 1-4 run at 32, 16, 8, 4 px (28, 14, 7, 4 for Fashion-MNIST).
    - Stages 3-4 mix the whole feature map as one window: 8×8 = 64 and 4×4 = 16 tokens (7×7 and 4×4). The paper's
      14×14 and 7×7 windows would cover a 2×2 map almost entirely with zero padding; here every token is a real
      image location and the scan reads the map in raster order, as the paper does inside a window.
    - Widths and depths are smaller (SIZES), with head dimension 32 and the mixer's d_state 8, d_conv 3, expand 1 as
      in the paper.
    - Every γ starts at 0.1. The official code has no γ in its T and S models and starts the B and L models'
      token-block γ at 1e-5; under our SGD recipe a branch's gradient is scaled by its γ, so from 1e-5 the blocks
      learn slowly at first. From 0.1 the default Fashion-MNIST run gained about 0.1 points over 1e-5, one seed
      each: less than the 0.28 points that five seeds of it span (README).

Glossary: b batch, c channels (width of the stage), h, w the feature map, l = h·w tokens, d_inner the mixer's width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .mamba import SelectiveSSM


@dataclass
class VisionConfig:
    in_channels: int = 3
    num_classes: int = 100
    dims: tuple[int, ...] = (64, 128, 256, 512)     # width of stages 1-4
    depths: tuple[int, ...] = (2, 4, 4, 2)          # blocks per stage
    stem_dim: int = 32
    d_state: int = 8
    d_conv: int = 3
    expand: int = 1
    mlp_ratio: int = 4
    head_dim: int = 32
    drop_path: float = 0.1                          # the last block's drop-path rate; earlier ones scale linearly
    layer_scale: float = 0.1                        # γ's initial value (see the adaptations above)
    arch: str = "mambavision"                       # or "vit": ViT below, one width dims[0] and depth depths[0]
    patch: int = 4                                  # ViT: patch side in pixels
    image_size: int = 32                            # ViT: the images' side, which sizes its position embeddings


SIZES = {
    "tiny": dict(dims=(32, 64, 128, 256), depths=(1, 2, 2, 2), drop_path=0.05),
    "small": dict(dims=(64, 128, 256, 512), depths=(2, 4, 4, 2), drop_path=0.1),
    "base": dict(dims=(96, 192, 384, 768), depths=(1, 3, 8, 4), drop_path=0.2),
    "vit-tiny": dict(arch="vit", dims=(192,), depths=(5,), drop_path=0.05),       # parameters within 10% of tiny's
    "vit-small": dict(arch="vit", dims=(384,), depths=(6,), drop_path=0.1),       # and of small's
}


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop the residual branch x for a random fraction p of the samples."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], *(1,) * (x.dim() - 1), device=x.device) >= p
    return x * keep / (1 - p)


class ConvBlock(nn.Module):
    """Eq. 1: x + γ · BN(Conv3×3(GELU(BN(Conv3×3(x))))) on a (b, c, h, w) map."""

    def __init__(self, dim: int, drop: float, layer_scale: float):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(dim)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), layer_scale))
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x)))))
        return x + drop_path(self.gamma * y, self.drop, self.training)


class MambaVisionMixer(nn.Module):
    """Section 3.2: the symmetric two-branch mixer; (b, l, c) -> (b, l, c).

        x, z = in_proj(X)                                (b, l, d_inner/2) each
        x = SSM(SiLU(Conv1d_same(x)))                    the selective scan, no z gate
        z = SiLU(Conv1d_same(z))                         the branch without SSM
        out = out_proj(concat(x, z))
    """

    def __init__(self, dim: int, d_state: int, d_conv: int, expand: int):
        super().__init__()
        half = expand * dim // 2
        self.in_proj = nn.Linear(dim, 2 * half, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.ssm = SelectiveSSM(half, d_state, dt_rank=math.ceil(dim / 16))
        self.out_proj = nn.Linear(2 * half, dim, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, z = rearrange(self.in_proj(hidden), "b l d -> b d l").chunk(2, dim=1)   # (b, d_inner/2, l) each
        x = self.ssm(F.silu(self.conv1d_x(x)))
        z = F.silu(self.conv1d_z(z))
        return self.out_proj(rearrange(torch.cat([x, z], dim=1), "b d l -> b l d"))


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no causal mask): (b, l, c) -> (b, l, c)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l e -> b l (h e)"))


class TokenBlock(nn.Module):
    """Eq. 2 / section 3.3: x + γ₁·Mixer(LN(x)), then x + γ₂·MLP(LN(x)); the mixer is MambaVision's or attention."""

    def __init__(self, dim: int, mixer: nn.Module, config: VisionConfig, drop: float):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(dim), mixer
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, config.mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(config.mlp_ratio * dim, dim))
        self.gamma1 = nn.Parameter(torch.full((dim,), config.layer_scale))
        self.gamma2 = nn.Parameter(torch.full((dim,), config.layer_scale))
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.gamma1 * self.mixer(self.norm1(x)), self.drop, self.training)
        return x + drop_path(self.gamma2 * self.mlp(self.norm2(x)), self.drop, self.training)


class TokenStage(nn.Module):
    """Stages 3-4: the (b, c, h, w) map read as h·w tokens in raster order; the first ⌈depth/2⌉ blocks use the
    MambaVision mixer, the rest self-attention (section 3.1: attention last, to recover global context)."""

    def __init__(self, dim: int, depth: int, config: VisionConfig, drops: list[float]):
        super().__init__()
        n_mixers = depth - depth // 2
        self.blocks = nn.ModuleList(
            TokenBlock(dim, MambaVisionMixer(dim, config.d_state, config.d_conv, config.expand) if i < n_mixers
                       else Attention(dim, config.head_dim), config, drops[i]) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = rearrange(x, "b c h w -> b (h w) c")
        for block in self.blocks:
            x = block(x)
        return rearrange(x, "b (h w) c -> b c h w", h=h)


class MambaVision(nn.Module):
    """Stem -> 4 stages (conv, conv, mixer/attention, mixer/attention) with downsampling between -> BN, pool, head."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = c = config
        self.stem = nn.Sequential(
            nn.Conv2d(c.in_channels, c.stem_dim, 3, padding=1, bias=False), nn.BatchNorm2d(c.stem_dim), nn.ReLU(),
            nn.Conv2d(c.stem_dim, c.dims[0], 3, padding=1, bias=False), nn.BatchNorm2d(c.dims[0]), nn.ReLU())
        drops = torch.linspace(0, c.drop_path, sum(c.depths)).tolist()
        self.stages = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(c.dims, c.depths)):
            stage_drops, drops = drops[:depth], drops[depth:]
            if i < 2:
                self.stages.append(nn.Sequential(*(ConvBlock(dim, d, c.layer_scale) for d in stage_drops)))
            else:
                self.stages.append(TokenStage(dim, depth, c, stage_drops))
            if i + 1 < len(c.dims):
                self.downsample.append(nn.Conv2d(dim, c.dims[i + 1], 3, stride=2, padding=1, bias=False))
        self.norm = nn.BatchNorm2d(c.dims[-1])
        self.head = nn.Linear(c.dims[-1], c.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, in_channels, H, W) -> the normalised last feature map (b, dims[-1], h, w), before pooling."""
        x = self.stem(images)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.downsample):
                x = self.downsample[i](x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, in_channels, H, W) -> class logits (b, num_classes)."""
        return self.head(self.features(images).mean(dim=(2, 3)))


class ViT(nn.Module):
    """A plain Vision Transformer (Dosovitskiy et al. 2021) of the same token blocks, to compare MambaVision with.
    What differs: no conv stages and no Mamba mixer — a strided conv cuts the image into patches (4 px: 8×8 tokens at
    32 px, 7×7 at 28 px), learned position embeddings are added, and every block is self-attention, at one
    resolution throughout; then LayerNorm, average pool, linear head."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = c = config
        dim, depth, side = c.dims[0], c.depths[0], c.image_size // c.patch
        self.patch_embed = nn.Conv2d(c.in_channels, dim, c.patch, stride=c.patch)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, side * side, dim))
        drops = torch.linspace(0, c.drop_path, depth).tolist()
        self.blocks = nn.ModuleList(TokenBlock(dim, Attention(dim, c.head_dim), c, d) for d in drops)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, c.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, in_channels, H, W) -> the normalised token map (b, dim, H/patch, W/patch), as MambaVision's."""
        x = self.patch_embed(images)                                    # (b, dim, h, w)
        h = x.shape[2]
        x = rearrange(x, "b c h w -> b (h w) c") + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return rearrange(self.norm(x), "b (h w) c -> b c h w", h=h)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, in_channels, H, W) -> class logits (b, num_classes)."""
        return self.head(self.features(images).mean(dim=(2, 3)))


def make_vision(config: VisionConfig) -> nn.Module:
    """The model a config describes: MambaVision, or ViT when config.arch is "vit"."""
    return ViT(config) if config.arch == "vit" else MambaVision(config)


def build_model(size: str, in_channels: int, num_classes: int, drop_path: float | None = None,
                image_size: int = 32) -> nn.Module:
    """A named size of SIZES for images of in_channels channels and image_size pixels, num_classes classes (and, if
    given, a drop-path rate other than the size's)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: choose one of {', '.join(SIZES)}")
    config = VisionConfig(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **SIZES[size])
    if drop_path is not None:
        config.drop_path = drop_path
    return make_vision(config)
