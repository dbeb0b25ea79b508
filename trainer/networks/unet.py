"""The 2D U-Net of Seg (trained on G's synthetic images) and DirectSeg (real images).

A classic U-Net: at each level two 3 x 3 convs, each followed by GroupNorm and leaky
ReLU; 2 x 2 max pooling down; bilinear upsampling plus a 1 x 1 conv up, concatenated
with the skip connection. Plain PyTorch layers with their default initialisation (the
normalisation makes the equalized learning rate of the StyleGAN networks unnecessary).
Exports to ONNX (GroupNorm becomes GroupNormalization / InstanceNorm-based ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig

NEG_SLOPE = 0.01


def group_count(channels: int, *, max_groups: int = 8) -> int:
    """The largest number of GroupNorm groups <= ``max_groups`` that divides ``channels``."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class DoubleConv(nn.Module):
    """[B, in_channels, H, W] -> [B, out_channels, H, W]: (conv 3 x 3, GroupNorm,
    leaky ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        layers = []
        for c_in in (in_channels, out_channels):
            layers += [nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False),
                       nn.GroupNorm(group_count(out_channels), out_channels),
                       nn.LeakyReLU(NEG_SLOPE)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Up(nn.Module):
    """Decoder level: x [B, C_in, h, w], skip [B, C_out, 2h, 2w] -> [B, C_out, 2h, 2w]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, out_channels, 1)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.reduce(x)  # [B, C_out, 2h, 2w]
        return self.conv(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """img [B, in_channels, R, R] (about [-1, 1]) -> logits [B, n_classes, R, R] float32.

    ``cfg.depth`` poolings; the width at level i is
    ``min(base_channels * 2**i, max_channels)``, the bottleneck at level ``depth``.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [min(cfg.base_channels * 2 ** i, cfg.max_channels) for i in range(cfg.depth + 1)]
        self.widths = widths
        self.down = nn.ModuleList(
            [DoubleConv(cfg.in_channels, widths[0])]
            + [DoubleConv(widths[i - 1], widths[i]) for i in range(1, cfg.depth + 1)])
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(cfg.depth)))
        self.head = nn.Conv2d(widths[0], cfg.n_classes, 1)

    @property
    def feature_dim(self) -> int:
        """C of :meth:`features`: the bottleneck width."""
        return self.widths[-1]

    def _encode(self, img: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        x = img
        for i, level in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)  # [B, C, H/2, W/2]
            x = level(x)
            skips.append(x)
        return skips  # level i: [B, widths[i], R / 2**i, R / 2**i]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, in_channels, R, R] -> logits [B, n_classes, R, R]."""
        skips = self._encode(img)
        x = skips[-1]  # [B, C_depth, R / 2**depth, ...]
        for up, skip in zip(self.up, reversed(skips[:-1])):
            x = up(x, skip)  # [B, C_i, R / 2**i, R / 2**i]
        return self.head(x)

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, in_channels, R, R] -> [B, feature_dim]: the bottleneck, globally
        average-pooled (features for a Frechet distance)."""
        return self._encode(img)[-1].mean(dim=(2, 3))


__all__ = ["UNet", "DoubleConv", "Up", "group_count"]
