"""Small helpers the stages share: seeding, sample grids, feature extractors."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed torch's CPU and CUDA generators and Python's and numpy's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_grid(path: Path, images: torch.Tensor, *, ncol: int | None = None) -> None:
    """A PNG grid of [B, 1, H, W] images in [-1, 1] (grey, clipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = images.detach().float().cpu().clamp(-1, 1)[:, 0].numpy()  # [B, H, W]
    b, h, w = x.shape
    ncol = ncol or math.ceil(math.sqrt(b))
    nrow = math.ceil(b / ncol)
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2), -1.0, dtype=np.float32)
    for i in range(b):
        r, c = divmod(i, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid, cmap="gray", vmin=-1, vmax=1)


def fd_features_alex(net):
    """Feature function [B, 1, H, W] -> [B, 256]: the relu5 map of the shift-tolerant
    LPIPS AlexNet ``net``, global-average pooled (the GAN stage's Frechet distance)."""

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return net.features(images)[-1].mean(dim=(2, 3))

    return features


def batched(fn, x: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """``fn`` applied to ``x`` in batches on ``device``; results concatenated on the CPU."""
    out = [fn(x[i:i + batch].to(device)).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def flip_rot(images: torch.Tensor, labels: torch.Tensor | None):
    """The same random x-flip and rotation by a multiple of 90 degrees (torch's global
    RNG) for a whole batch of images [B, C, H, W] and labels [B, H, W]."""
    k = int(torch.randint(4, (1,)))
    flip = bool(torch.randint(2, (1,)))
    images = torch.rot90(images, k, dims=(2, 3))
    if flip:
        images = images.flip(3)
    if labels is not None:
        labels = torch.rot90(labels, k, dims=(1, 2))
        if flip:
            labels = labels.flip(2)
    return images, labels
