"""The StyleGAN2 generator: mapping network z -> w+ and synthesis network w+ -> image.

Deterministic (no noise inputs): rendering a latent code always gives the same image,
which GAN inversion and the exported graphs need. The exported G is the synthesis
network alone, ``forward(ws [B, L, w_dim]) -> img [B, 1, R, R]``.

Style-vector bookkeeping (StyleGAN2's convention), for resolution R and
L = 2 log2(R) - 2: the 4 x 4 block has one conv (ws[0]); each block at 8, 16, ..., R
has an upsampling conv and a conv (ws[i], ws[i + 1]); the ToRGB layer of a block uses
the index of the next block's first conv, so the last ToRGB uses ws[L - 1].
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import GeneratorConfig, channels_at
from .layers import (EqualizedConv2d, EqualizedLinear, ModulatedConv2d, normalize_2nd_moment,
                     upsample2x)


class MappingNetwork(nn.Module):
    """z [B, z_dim] -> ws [B, num_ws, w_dim]: 2nd-moment normalisation, then
    ``num_layers`` equalized linear layers (leaky ReLU, learning-rate multiplier
    ``lr_mul``), broadcast to the ``num_ws`` style vectors.

    Buffer ``w_avg`` [w_dim] float32: the running mean of w (zeros at init), the
    centre of the truncation trick and the encoder's starting point.
    """

    def __init__(self, *, z_dim: int, w_dim: int, num_ws: int, num_layers: int,
                 lr_mul: float = 0.01):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws = z_dim, w_dim, num_ws
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            EqualizedLinear(dims[i], dims[i + 1], lr_mul=lr_mul, activation="lrelu")
            for i in range(num_layers))
        self.register_buffer("w_avg", torch.zeros(w_dim, dtype=torch.float32))

    def forward(self, z: torch.Tensor, *, truncation_psi: float = 1.0, update_w_avg: bool = False,
                w_avg_beta: float = 0.995) -> torch.Tensor:
        """z [B, z_dim] (any scale: it is normalised) -> ws [B, num_ws, w_dim].

        ``update_w_avg`` moves ``w_avg`` towards the batch mean of w by an EMA with
        decay ``w_avg_beta`` (training only; no gradient). ``truncation_psi`` < 1 pulls
        every w towards ``w_avg`` (psi = 0 gives ``w_avg`` exactly).
        """
        x = normalize_2nd_moment(z)
        for layer in self.layers:
            x = layer(x)  # [B, w_dim]
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().float().mean(dim=0).lerp(self.w_avg, w_avg_beta))
        if truncation_psi != 1.0:
            w_avg = self.w_avg.to(x.dtype)
            x = w_avg + truncation_psi * (x - w_avg)
        return x.unsqueeze(1).expand(-1, self.num_ws, -1)  # [B, L, w_dim]


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network.

    ``forward(x [B, C_in, r/2, r/2] or None, img [B, img_channels, r/2, r/2] or None,
    ws [B, n, w_dim]) -> (x [B, C_out, r, r], img [B, img_channels, r, r] or None)``,
    where n = ``num_conv + num_torgb`` and the 4 x 4 block starts from its learned
    constant instead of x.
    """

    def __init__(self, *, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, architecture: str, is_last: bool):
        super().__init__()
        self.resolution, self.architecture = resolution, architecture
        self.is_first = in_channels == 0
        if self.is_first:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            self.conv0 = None
        else:
            self.conv0 = ModulatedConv2d(in_channels, out_channels, w_dim, up=2)
        resnet = architecture == "resnet" and not self.is_first
        self.conv1 = ModulatedConv2d(out_channels, out_channels, w_dim,
                                     gain=math.sqrt(0.5) if resnet else 1.0)
        self.skip = (EqualizedConv2d(in_channels, out_channels, 1, bias=False, gain=math.sqrt(0.5))
                     if resnet else None)
        self.torgb = (ModulatedConv2d(out_channels, img_channels, w_dim, kernel_size=1,
                                      demodulate=False, activation="linear")
                      if is_last or architecture == "skip" else None)
        self.num_conv = 1 if self.is_first else 2
        self.num_torgb = 0 if self.torgb is None else 1

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None,
                ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.is_first:
            x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)  # [B, C, 4, 4]
            x = self.conv1(x, ws[:, 0])
        elif self.skip is not None:
            y = upsample2x(self.skip(x))  # [B, C_out, r, r]
            x = self.conv0(x, ws[:, 0])  # [B, C_out, r, r]
            x = y + self.conv1(x, ws[:, 1])
        else:
            x = self.conv0(x, ws[:, 0])  # [B, C_out, r, r]
            x = self.conv1(x, ws[:, 1])
        if img is not None:
            img = upsample2x(img)  # [B, img_channels, r, r]
        if self.torgb is not None:
            y = self.torgb(x, ws[:, self.num_conv])  # [B, img_channels, r, r]
            img = y if img is None else img + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [B, num_ws, w_dim] -> [B, img_channels, resolution, resolution] float32.

    A learned 4 x 4 constant, then one block per resolution 4, 8, ..., ``resolution``
    with widths ``min(channel_base // r, channel_max)``. ``architecture`` "skip" sums the
    upsampled ToRGB outputs of every block; "resnet" uses residual blocks and one ToRGB
    at the end. The output is linear (no tanh): images come out roughly in [-1, 1] once
    trained; W+SegNet reuses the class with ``img_channels`` = number of classes (logits).
    """

    def __init__(self, *, w_dim: int, resolution: int, img_channels: int, channel_base: int,
                 channel_max: int, architecture: str = "skip"):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
        if architecture not in ("skip", "resnet"):
            raise ValueError(f"architecture must be 'skip' or 'resnet', got {architecture!r}")
        self.w_dim, self.resolution, self.img_channels = w_dim, resolution, img_channels
        self.resolutions = [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]
        blocks, in_ch = [], 0
        for r in self.resolutions:
            out_ch = channels_at(r, channel_base, channel_max)
            blocks.append(SynthesisBlock(in_channels=in_ch, out_channels=out_ch, w_dim=w_dim,
                                         resolution=r, img_channels=img_channels,
                                         architecture=architecture, is_last=r == resolution))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        # Block i reads ws[start_i : start_i + num_conv + num_torgb]; the next starts at
        # start_i + num_conv, so a ToRGB shares its index with the next block's first conv.
        self.ws_start = []
        start = 0
        for block in self.blocks:
            self.ws_start.append(start)
            start += block.num_conv
        self.num_ws = start + self.blocks[-1].num_torgb
        expected = 2 * int(math.log2(resolution)) - 2
        if self.num_ws != expected:  # the convention above, checked once
            raise AssertionError(f"synthesis consumes {self.num_ws} style vectors, "
                                 f"expected {expected}")

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        """ws [B, num_ws, w_dim] -> img [B, img_channels, R, R]."""
        if ws.ndim != 3 or ws.shape[1] != self.num_ws or ws.shape[2] != self.w_dim:
            raise ValueError(f"ws must be [B, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        x = img = None
        for block, start in zip(self.blocks, self.ws_start):
            n = block.num_conv + block.num_torgb
            x, img = block(x, img, ws[:, start:start + n])  # x [B, C_r, r, r]
        return img


class Generator(nn.Module):
    """StyleGAN2 generator of 2D short-axis images (see the module docstring).

    ``forward(ws [B, L, w_dim]) -> img [B, img_channels, R, R]`` float32, roughly in
    [-1, 1] once trained (the exported graph). ``mapping`` gives ws from z;
    ``sample(z)`` does both.
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.mapping = MappingNetwork(z_dim=cfg.z_dim, w_dim=cfg.w_dim, num_ws=cfg.num_ws,
                                      num_layers=cfg.mapping_layers, lr_mul=cfg.mapping_lr_mul)
        self.synthesis = SynthesisNetwork(w_dim=cfg.w_dim, resolution=cfg.resolution,
                                          img_channels=cfg.img_channels,
                                          channel_base=cfg.channel_base,
                                          channel_max=cfg.channel_max,
                                          architecture=cfg.architecture)
        if self.synthesis.num_ws != cfg.num_ws:
            raise AssertionError(f"synthesis uses {self.synthesis.num_ws} ws, "
                                 f"config says {cfg.num_ws}")

    @property
    def num_ws(self) -> int:
        return self.cfg.num_ws

    @property
    def w_dim(self) -> int:
        return self.cfg.w_dim

    @property
    def z_dim(self) -> int:
        return self.cfg.z_dim

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    @property
    def w_avg(self) -> torch.Tensor:
        """[w_dim] float32: the mapping network's running mean of w."""
        return self.mapping.w_avg

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        """ws [B, num_ws, w_dim] -> img [B, img_channels, R, R]."""
        return self.synthesis(ws)

    def sample(self, z: torch.Tensor, *, truncation_psi: float = 1.0) -> torch.Tensor:
        """z [B, z_dim] ~ N(0, 1) -> img [B, img_channels, R, R]."""
        return self.synthesis(self.mapping(z, truncation_psi=truncation_psi))


__all__ = ["MappingNetwork", "SynthesisBlock", "SynthesisNetwork", "Generator"]
