"""Small helpers the stages share: seeding, sample grids, feature extractors."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deeprecon.runtime.errors import UsageError

from ..config import N_CLASSES


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

    if net.layers != 5:
        raise ValueError(f"the Frechet distance uses relu5: LPIPS built with {net.layers} layers")

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


def check_class_weights(weights: tuple[float, ...]) -> None:
    """A stage's ``class_weights`` setting: empty (unweighted) or one positive weight
    per class (background, LVC, LVM, RVC); UsageError otherwise, at config time."""
    if weights and (len(weights) != N_CLASSES or min(weights) <= 0):
        raise UsageError(f"class_weights must be {N_CLASSES} positive numbers (background, "
                         f"LVC, LVM, RVC), got {list(weights)}")


def cosine_lr(step: int, steps: int, lr: float, lr_min: float) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``: a cosine from lr to
    lr_min (constant when they are equal). A function of the step, so a resumed run
    needs no scheduler state."""
    if lr_min == lr:
        return lr
    t = min(step / max(steps, 1), 1.0)
    return lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * t))


def affine_intensity(images: torch.Tensor, labels: torch.Tensor | None, *, rotate_deg: float = 15.0,
                     scale: float = 0.1, shift: float = 0.06, gamma: float = 0.3,
                     contrast: float = 0.15):
    """Per-image random affine (rotation within +-rotate_deg, isotropic scale within
    1 +- scale, translation within +-shift of the field of view) applied to images
    [B, 1, H, W] (bilinear) and labels [B, H, W] (nearest), both with zero/background
    padding (labels None: images only, None returned for them); then a random gamma
    (exp(+-gamma)) on images mapped to [0, 1] and a contrast change (1 +- contrast)
    around each image's mean. torch's global RNG; a fixed count of random numbers per
    batch (exact resume)."""
    b = images.shape[0]
    r = torch.rand(b, 5, device=images.device) * 2 - 1  # [B, 5] in [-1, 1)
    theta = r[:, 0] * math.radians(rotate_deg)
    s = 1 + r[:, 1] * scale
    cos, sin = torch.cos(theta) / s, torch.sin(theta) / s
    mat = torch.stack([torch.stack([cos, -sin, r[:, 2] * shift * 2], 1),
                       torch.stack([sin, cos, r[:, 3] * shift * 2], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(mat, list(images.shape), align_corners=False)
    bg = -1.0  # the intensity of empty space in the model's [-1, 1] range
    out = F.grid_sample(images - bg, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False) + bg
    lab = None if labels is None else F.grid_sample(
        labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
        align_corners=False)[:, 0].to(labels.dtype)
    g = torch.exp(r[:, 4] * gamma)[:, None, None, None]
    out = ((out.clamp(-1, 1) + 1) / 2) ** g * 2 - 1
    c = 1 + (torch.rand(b, device=images.device) * 2 - 1)[:, None, None, None] * contrast
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * c + mean).clamp(-1, 1), lab
