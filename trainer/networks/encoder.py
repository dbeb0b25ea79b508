"""The image -> w+ encoder (pSp / e4e style).

Scales. The backbone (a 3 x 3 stem and one StyleGAN2 residual block per halving)
produces feature maps at three resolutions:

- coarse ``c = max(R / 16, 4)`` (R/16 as in pSp, but never below 4 x 4),
- middle ``min(2c, R)``,
- fine ``min(4c, R)``.

So 128 px gives 8 / 16 / 32 and the 32 px ``tiny`` preset 4 / 8 / 16 (64 px: 4 / 8 / 16;
256 px: 16 / 32 / 64). An FPN-style top-down pass merges them (bilinear upsampling plus
a lateral 1 x 1 projection to the coarse width). Each of the L style vectors has its
own "map2style" head: stride-2 3 x 3 convs that halve the map down to 1 x 1, then an
equalized linear layer to w_dim. Heads of ws[0 : L//3] read the coarse map,
ws[L//3 : 2L//3] the middle one and the rest the fine one (the fine group gets the
remainder: L = 8 -> 2/3/3, L = 12 -> 4/4/4), matching G's low-, mid- and
high-resolution layers. As in pSp, the heads hold most of the parameters.

The output is ``w_avg + offsets``; the last linear layer of every head starts small
(weights 0.01 x N(0, 1), zero bias), so at init the encoder returns about ``w_avg``
while every parameter still receives a gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EncoderConfig, channels_at
from .layers import EqualizedConv2d, EqualizedLinear, ResidualDownBlock

HEAD_INIT = 0.01  # scale of the initial weights of each head's last linear layer


def pyramid_sizes(resolution: int) -> tuple[int, int, int]:
    """The (coarse, middle, fine) feature-map sizes for an input of ``resolution`` px."""
    coarse = max(resolution // 16, 4)
    return coarse, min(2 * coarse, resolution), min(4 * coarse, resolution)


def style_groups(num_ws: int) -> tuple[int, int]:
    """The ends of the coarse and middle groups of style vectors: (L // 3, 2 L // 3)."""
    return num_ws // 3, 2 * num_ws // 3


class Map2Style(nn.Module):
    """[B, C, s, s] -> [B, w_dim]: log2(s) stride-2 3 x 3 convs (leaky ReLU) to
    1 x 1, then an equalized linear layer with small initial weights."""

    def __init__(self, in_channels: int, w_dim: int, spatial: int):
        super().__init__()
        n = int(math.log2(spatial))
        self.convs = nn.Sequential(*[EqualizedConv2d(in_channels, in_channels, 3,
                                                     activation="lrelu", stride=2)
                                     for _ in range(n)])
        self.linear = EqualizedLinear(in_channels, w_dim, weight_init=HEAD_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)  # [B, C, 1, 1]
        return self.linear(x.flatten(1))  # [B, w_dim]


class Encoder(nn.Module):
    """img [B, img_channels, R, R] (about [-1, 1]) -> ws [B, num_ws, w_dim] float32.

    See the module docstring for the scales and the grouping of the style vectors.
    Buffer ``w_avg`` [w_dim] float32, zeros at init: the encoder training stage copies
    G's ``w_avg`` into it.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        ch = lambda r: channels_at(r, cfg.channel_base, cfg.channel_max)  # noqa: E731
        R = cfg.resolution
        self.sizes = pyramid_sizes(R)
        coarse, middle, fine = self.sizes
        self.stem = EqualizedConv2d(cfg.img_channels, ch(R), 3, activation="lrelu")
        blocks, r = [], R
        while r > coarse:
            blocks.append(ResidualDownBlock(ch(r), ch(r // 2)))
            r //= 2
        self.blocks = nn.ModuleList(blocks)
        width = ch(coarse)
        self.lateral_middle = EqualizedConv2d(ch(middle), width, 1)
        self.lateral_fine = EqualizedConv2d(ch(fine), width, 1)
        self.end_coarse, self.end_middle = style_groups(cfg.num_ws)
        self.heads = nn.ModuleList(
            Map2Style(width, cfg.w_dim, coarse if i < self.end_coarse else
                      middle if i < self.end_middle else fine)
            for i in range(cfg.num_ws))
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim, dtype=torch.float32))

    @property
    def num_ws(self) -> int:
        return self.cfg.num_ws

    @property
    def w_dim(self) -> int:
        return self.cfg.w_dim

    def pyramid(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """img [B, C_img, R, R] -> the merged (coarse, middle, fine) maps, each with the
        coarse width: [B, C, c, c], [B, C, 2c, 2c], [B, C, 4c, 4c] (sizes capped at R)."""
        coarse, middle, fine = self.sizes
        feats = {}
        x = self.stem(img)  # [B, C_R, R, R]
        feats[x.shape[-1]] = x
        for block in self.blocks:
            x = block(x)  # [B, C_r/2, r/2, r/2]
            feats[x.shape[-1]] = x
        p_coarse = feats[coarse]
        p_middle = _upsample_to(p_coarse, middle) + self.lateral_middle(feats[middle])
        p_fine = _upsample_to(p_middle, fine) + self.lateral_fine(feats[fine])
        return p_coarse, p_middle, p_fine

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, img_channels, R, R] -> ws [B, num_ws, w_dim] = w_avg + offsets."""
        p_coarse, p_middle, p_fine = self.pyramid(img)
        styles = []
        for i, head in enumerate(self.heads):
            src = p_coarse if i < self.end_coarse else p_middle if i < self.end_middle else p_fine
            styles.append(head(src))  # [B, w_dim]
        offsets = torch.stack(styles, dim=1)  # [B, L, w_dim]
        return self.w_avg.to(offsets.dtype)[None, None] + offsets


def _upsample_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, s, s] -> [B, C, size, size] bilinear (identity when s == size)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, scale_factor=size / x.shape[-1], mode="bilinear", align_corners=False)


__all__ = ["Encoder", "Map2Style", "pyramid_sizes", "style_groups"]
