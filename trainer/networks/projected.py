"""A Projected-GAN discriminator on the frozen shift-tolerant AlexNet that the project
already ships for LPIPS (used for GAN training only; never exported).

After Sauer et al., "Projected GANs Converge Faster" (NeurIPS 2021): the real or
generated image goes through a frozen pretrained feature network; its multi-scale
features are mixed by fixed random 1 x 1 convolutions, across channels (CCM) and
across scales (CSM, top-down: each deeper map, upsampled, is added to the next
shallower one); a small trainable discriminator per scale turns each mixed map into
a map of logits. The frozen features make D's task easier to learn from few images
than a D trained from pixels, which is why it needs several times fewer images.

Here the feature network is the trunk of :class:`..lpips.LPIPS` (relu1 .. relu3; for
a 64 px slice 30 x 30 x 64, 15 x 15 x 192, 8 x 8 x 384). The heads are spectrally
normalised convolutions with leaky ReLUs, as in the paper; BatchNorm is left out. The
frozen trunk is held outside the module's parameters and state dict (it comes with
the installation, verified by hash), so ``requires_grad_`` and the optimiser see only
the heads, and a checkpoint stores the heads and the fixed mixing weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..lpips import LPIPS

MIXED_CHANNELS = (64, 128, 256)  # of the mixed relu1, relu2, relu3 maps


def _fixed_1x1(c_in: int, c_out: int, gen: torch.Generator) -> torch.Tensor:
    """A random 1 x 1 convolution weight [c_out, c_in, 1, 1] (Kaiming-normal scale)."""
    return torch.randn(c_out, c_in, 1, 1, generator=gen) * (2.0 / c_in) ** 0.5


def _head(c_in: int, widths: tuple[int, ...], final_kernel: int) -> nn.Sequential:
    """Stride-2 4 x 4 convolutions to ``widths``, then a 1-channel convolution of
    ``final_kernel`` without padding: [B, c_in, H, W] -> [B, 1, h, w] logits."""
    layers: list[nn.Module] = []
    for c in widths:
        layers += [spectral_norm(nn.Conv2d(c_in, c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        c_in = c
    layers.append(spectral_norm(nn.Conv2d(c_in, 1, final_kernel)))
    return nn.Sequential(*layers)


class ProjectedDiscriminator(nn.Module):
    """img [B, 1, R, R] (about [-1, 1]) -> logits [B, n]: the flattened logit maps of
    the three per-scale heads, concatenated (for a 64 px input n = 16 + 16 + 1); a loss
    averages over them, as in the paper.

    features: a frozen :class:`LPIPS` with at least 3 layers (only its trunk is used).
    seed: of the fixed random mixing weights (stored as buffers, so a checkpoint
    restores them exactly).
    """

    def __init__(self, features: LPIPS, *, seed: int = 0):
        super().__init__()
        if features.layers < 3:
            raise ValueError(f"ProjectedDiscriminator needs relu1 .. relu3: LPIPS has {features.layers} layers")
        # Not a submodule: frozen, installed weights (see the module docstring).
        object.__setattr__(self, "_features", features)
        gen = torch.Generator().manual_seed(seed)
        c1, c2, c3 = MIXED_CHANNELS
        self.register_buffer("ccm1", _fixed_1x1(64, c1, gen))
        self.register_buffer("ccm2", _fixed_1x1(192, c2, gen))
        self.register_buffer("ccm3", _fixed_1x1(384, c3, gen))
        self.register_buffer("csm32", _fixed_1x1(c3, c2, gen))
        self.register_buffer("csm21", _fixed_1x1(c2, c1, gen))
        self.head1 = _head(c1, (128, 256), 4)  # 30 -> 15 -> 7 -> 4 x 4 logits
        self.head2 = _head(c2, (256,), 4)      # 15 -> 7 -> 4 x 4
        self.head3 = _head(c3, (256,), 4)      # 8 -> 4 -> 1 x 1

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .half() reach the frozen trunk too, although it is no submodule.
        self._features._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def project(self, img: torch.Tensor) -> list[torch.Tensor]:
        """img [B, 1, R, R] -> the three mixed feature maps [B, 64|128|256, h_k, w_k]."""
        f1, f2, f3 = self._features.features(img)[:3]
        p3 = F.conv2d(f3, self.ccm3.to(f3.dtype))
        p2 = F.conv2d(f2, self.ccm2.to(f2.dtype)) + F.interpolate(
            F.conv2d(p3, self.csm32.to(p3.dtype)), size=f2.shape[-2:], mode="bilinear",
            align_corners=False)
        p1 = F.conv2d(f1, self.ccm1.to(f1.dtype)) + F.interpolate(
            F.conv2d(p2, self.csm21.to(p2.dtype)), size=f1.shape[-2:], mode="bilinear",
            align_corners=False)
        return [p1, p2, p3]

    def heads(self, mixed: list[torch.Tensor]) -> torch.Tensor:
        """The mixed maps of :meth:`project` -> logits [B, n]."""
        return torch.cat([h(p).flatten(1) for h, p in
                          zip((self.head1, self.head2, self.head3), mixed)], dim=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.heads(self.project(img))


__all__ = ["ProjectedDiscriminator"]
