"""W+SegNet (the DeepRecon paper): a network from a latent code w+ straight to the mask."""
from __future__ import annotations

import torch
from torch import nn

from ..config import WSegConfig
from .generator import SynthesisNetwork


class WSegNet(nn.Module):
    """ws [B, num_ws, w_dim] -> logits [B, n_classes, R, R] float32.

    A synthesis network of its own (same structure as G's, "skip" architecture, widths
    ``min(channel_base // r, channel_max)``) whose ToRGB-like output layers give the
    ``n_classes`` logits (1 x 1 modulated conv, no demodulation, no activation).
    """

    def __init__(self, cfg: WSegConfig):
        super().__init__()
        self.cfg = cfg
        self.synthesis = SynthesisNetwork(w_dim=cfg.w_dim, resolution=cfg.resolution,
                                          img_channels=cfg.n_classes,
                                          channel_base=cfg.channel_base,
                                          channel_max=cfg.channel_max, architecture="skip")
        if self.synthesis.num_ws != cfg.num_ws:
            raise ValueError(f"WSegConfig.num_ws is {cfg.num_ws}, but a {cfg.resolution} px "
                             f"synthesis network uses {self.synthesis.num_ws}")

    @property
    def num_ws(self) -> int:
        return self.cfg.num_ws

    @property
    def w_dim(self) -> int:
        return self.cfg.w_dim

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        """ws [B, num_ws, w_dim] -> logits [B, n_classes, R, R]."""
        return self.synthesis(ws)


__all__ = ["WSegNet"]
