"""The StyleGAN2 residual discriminator (used for GAN training only; never exported)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import DiscriminatorConfig, channels_at
from .layers import EqualizedConv2d, EqualizedLinear, ResidualDownBlock, minibatch_std


class Discriminator(nn.Module):
    """img [B, img_channels, R, R] (real or generated, about [-1, 1]) -> logits [B, 1].

    FromRGB (1 x 1 conv) at R, one residual block per resolution R, R/2, ..., 8 halving
    the size (widths ``min(channel_base // r, channel_max)``), then at 4 x 4 the
    minibatch-standard-deviation channel, a 3 x 3 conv, a linear layer over the
    flattened map and the output linear layer. Works for any batch size: the mbstd
    group is the largest divisor of B not above ``cfg.mbstd_group``.
    """

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        ch = lambda r: channels_at(r, cfg.channel_base, cfg.channel_max)  # noqa: E731
        r = cfg.resolution
        self.fromrgb = EqualizedConv2d(cfg.img_channels, ch(r), 1, activation="lrelu")
        blocks = []
        while r > 4:
            blocks.append(ResidualDownBlock(ch(r), ch(r // 2)))
            r //= 2
        self.blocks = nn.ModuleList(blocks)
        c4 = ch(4)
        self.mbstd_group = cfg.mbstd_group
        self.conv = EqualizedConv2d(c4 + 1, c4, 3, activation="lrelu")
        self.fc = EqualizedLinear(c4 * 16, c4, activation="lrelu")
        self.out = EqualizedLinear(c4, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, img_channels, R, R] -> logits [B, 1] (dtype of img)."""
        x = self.fromrgb(img)  # [B, C_R, R, R]
        for block in self.blocks:
            x = block(x)  # [B, C_r/2, r/2, r/2]
        x = minibatch_std(x, group_size=self.mbstd_group)  # [B, C_4 + 1, 4, 4]
        x = self.conv(x)  # [B, C_4, 4, 4]
        x = self.fc(x.flatten(1))  # [B, C_4]
        return self.out(x)  # [B, 1]


__all__ = ["Discriminator"]
