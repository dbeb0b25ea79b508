"""Losses of the training stages (StyleGAN2 GAN terms, segmentation) and image quality
figures (PSNR, SSIM, Frechet distance)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- GAN

def g_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss softplus(-D(G(z))), mean over the batch. logits [B, 1]."""
    return F.softplus(-fake_logits).mean()


def d_logistic(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss softplus(D(G(z))) + softplus(-D(x)), mean over the batch."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_images: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """R1: mean over the batch of ||dD(x)/dx||^2 (real_images must require grad)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3]).mean()


def path_length(fake_images: torch.Tensor, ws: torch.Tensor, pl_mean: torch.Tensor,
                *, decay: float = 0.01, reduce_mean=None) -> tuple[torch.Tensor, torch.Tensor]:
    """StyleGAN2 path-length regulariser. Returns (penalty, updated pl_mean).
    fake_images [B, 1, R, R] = G(ws), ws [B, L, C] requiring grad. ``reduce_mean``
    averages the batch's mean length over the ranks (so pl_mean is the same on all)."""
    noise = torch.randn_like(fake_images) / math.sqrt(fake_images.shape[2] * fake_images.shape[3])
    (grad,) = torch.autograd.grad((fake_images * noise).sum(), ws, create_graph=True)
    lengths = grad.square().sum(dim=2).mean(dim=1).sqrt()  # [B]
    batch_mean = lengths.mean().detach()
    if reduce_mean is not None:
        batch_mean = reduce_mean(batch_mean)
    new_mean = pl_mean.lerp(batch_mean, decay)
    return (lengths - new_mean).square().mean(), new_mean


# ----------------------------------------------------------------------------- segmentation

def dice_loss(logits: torch.Tensor, labels: torch.Tensor, *, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes. logits [B, K, H, W], labels
    [B, H, W] int64 in [0, K)."""
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)  # [K]
    return 1 - dice[1:].mean()


def seg_loss(logits: torch.Tensor, labels: torch.Tensor,
             class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy + Dice (the paper's Seg loss). ``class_weights`` [K]: optional
    per-class weights of the cross-entropy (the Dice term is unweighted)."""
    return F.cross_entropy(logits, labels, weight=class_weights) + dice_loss(logits, labels)


def dice_per_class(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Hard Dice per foreground class over the whole batch, [n_classes - 1] float64 (NaN
    where a class is absent from both)."""
    out = []
    for k in range(1, n_classes):
        p, t = pred == k, labels == k
        denom = p.sum() + t.sum()
        out.append(float("nan") if denom == 0 else float(2 * (p & t).sum() / denom))
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------- encoder

def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, ws: torch.Tensor, w_avg: torch.Tensor,
                        lpips, *, lambda_l2: float, lambda_lpips: float, lambda_reg: float
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The encoder's objective for y = G(E(x)), ws = E(x):
    ``lambda_l2 mean((x - y)^2) + lambda_lpips mean(LPIPS(x, y)) + lambda_reg mean((ws - w_avg)^2)``
    (the last term keeps the codes near the region of w+ that G was trained on, e4e's
    motivation). Returns (loss, its parts, detached)."""
    l2 = (x - y).square().mean()
    lp = lpips(x, y).mean()
    reg = (ws - w_avg).square().mean()
    loss = lambda_l2 * l2 + lambda_lpips * lp + lambda_reg * reg
    return loss, {"l2": l2.detach(), "lpips": lp.detach(), "reg": reg.detach()}


# ----------------------------------------------------------------------------- quality

def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB per image of [B, 1, H, W] images (range [-1, 1] -> data_range 2)."""
    mse = (x - y).square().flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """SSIM per image (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
    valid region only) of [B, 1, H, W] images."""
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None]  # [1, 1, w, w]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    sxx = F.conv2d(x * x, k) - mu_x ** 2
    syy = F.conv2d(y * y, k) - mu_y ** 2
    sxy = F.conv2d(x * y, k) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, C] (float64)."""
    from scipy import linalg

    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # few samples (the tests) give singular covariances; the offset below handles it
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(cov_a)) * 1e-6
            covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * covmean))


__all__ = ["g_nonsaturating", "d_logistic", "r1_penalty", "path_length", "dice_loss",
           "seg_loss", "dice_per_class", "reconstruction_loss", "psnr", "ssim", "frechet_distance"]
