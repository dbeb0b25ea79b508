"""Pure-PyTorch reference of the fused NCC + ROI-L2 loss: the specification.

Everything the compiled kernels compute is defined here, with plain convolutions and
autograd; the kernels are tested against it. Nothing here is fast on purpose.

Definition, per image b of a batch (x, y, roi of shape [B, 1, H, W]; roi may also
be [1, 1, H, W] and is then shared by all images):

    w      k x k window weights centred on the pixel, k = window (odd):
           box:       w = 1                                   (n = k * k)
           gaussian:  w(di, dj) = g(di) g(dj), g(d) = exp(-d^2 / (2 sigma^2)),
                      d in [-k//2, k//2], not normalised      (n = (sum_d g(d))^2)
    S_f    local weighted sum of f over the window at every pixel, zero padding
           (a 'same' correlation with w): Sx, Sy, Sxx, Syy, Sxy for f = x, y, x*x,
           y*y, x*y
    cross  = Sxy - Sx * Sy / n
    varx   = Sxx - Sx^2 / n
    vary   = Syy - Sy^2 / n
    cc     = cross^2 / (varx * vary + eps)                     eps = 1e-5
    ncc_b  = mean of cc over the image's H * W pixels
    roi_b  = sum(roi * (x - y)^2) / (sum(roi) + eps)
    loss_b = lambda_roi * roi_b - lambda_ncc * ncc_b

The op's gradient is d loss_b / d y (x is the target image, roi a weight map).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5
MODES = ("box", "gaussian")
DEFAULT_SIGMA = 1.5


def window_taps(window: int, mode: str = "box", sigma: float = DEFAULT_SIGMA, *,
                dtype: torch.dtype = torch.float64,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """The separable window: 1D taps g [k] (the 2D weights are g[:, None] * g[None, :])
    and n, the sum of the 2D weights (k * k for the box; (sum g)^2 for the Gaussian).

    n is computed in float64 whatever `dtype` is, as the compiled kernels do.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window}")
    r = window // 2
    if mode == "box":
        taps = torch.ones(window, dtype=torch.float64)
    elif mode == "gaussian":
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 for the gaussian window, got {sigma}")
        d = torch.arange(-r, r + 1, dtype=torch.float64)
        taps = torch.exp(-d * d / (2.0 * sigma * sigma))
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n = float(taps.sum()) ** 2
    return taps.to(dtype=dtype, device=device), n


def _local_sum(t: torch.Tensor, w2d: torch.Tensor) -> torch.Tensor:
    """'same' correlation of t [B, 1, H, W] with w2d [k, k], zero padding."""
    r = w2d.shape[-1] // 2
    return F.conv2d(t, w2d[None, None], padding=r)  # [B, 1, H, W]


def _combine(x, y, roi, sx, sy, sxx, syy, sxy, n, lambda_roi, lambda_ncc):
    cross = sxy - sx * sy / n
    varx = sxx - sx * sx / n
    vary = syy - sy * sy / n
    cc = cross * cross / (varx * vary + EPS)                     # [B, 1, H, W]
    ncc = cc.mean(dim=(1, 2, 3))                                 # [B]
    roi_l2 = (roi * (x - y) ** 2).sum(dim=(1, 2, 3)) / (roi.sum(dim=(1, 2, 3)) + EPS)  # [B]
    return lambda_roi * roi_l2 - lambda_ncc * ncc                # [B]


def ncc_roi_loss_reference(x: torch.Tensor, y: torch.Tensor, roi: torch.Tensor, *,
                           window: int = 9, mode: str = "box", sigma: float = DEFAULT_SIGMA,
                           lambda_roi: float = 1.0, lambda_ncc: float = 1.0) -> torch.Tensor:
    """The loss per image, by five separate convolutions (see the module docstring).

    Args:
        x: target images [B, 1, H, W], floating point.
        y: generated images [B, 1, H, W], same dtype and device as x.
        roi: weights in [0, 1], [B, 1, H, W] or [1, 1, H, W] (broadcast over B).
        window: odd window size k.
        mode: "box" or "gaussian" (weights exp(-d^2 / (2 sigma^2)), radius k // 2).
        sigma: the Gaussian's standard deviation in pixels (ignored for "box").
    Returns:
        loss [B], differentiable by autograd with respect to all inputs.
    """
    taps, n = window_taps(window, mode, sigma, dtype=x.dtype, device=x.device)
    w2d = taps[:, None] * taps[None, :]                          # [k, k]
    sx, sy = _local_sum(x, w2d), _local_sum(y, w2d)
    sxx, syy, sxy = _local_sum(x * x, w2d), _local_sum(y * y, w2d), _local_sum(x * y, w2d)
    return _combine(x, y, roi, sx, sy, sxx, syy, sxy, n, lambda_roi, lambda_ncc)


def ncc_roi_loss_grouped_conv(x: torch.Tensor, y: torch.Tensor, roi: torch.Tensor, *,
                              window: int = 9, mode: str = "box",
                              sigma: float = DEFAULT_SIGMA, lambda_roi: float = 1.0,
                              lambda_ncc: float = 1.0) -> torch.Tensor:
    """The same loss [B] as `ncc_roi_loss_reference`, with the five local sums taken by
    one grouped convolution over the stacked [B, 5, H, W] products (a faster pure-PyTorch
    formulation; the benchmark's middle competitor). Differentiable by autograd."""
    taps, n = window_taps(window, mode, sigma, dtype=x.dtype, device=x.device)
    k = taps.shape[0]
    w2d = (taps[:, None] * taps[None, :]).expand(5, 1, k, k)    # [5, 1, k, k]
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)        # [B, 5, H, W]
    s = F.conv2d(stack, w2d, padding=k // 2, groups=5)           # [B, 5, H, W]
    sx, sy, sxx, syy, sxy = s.split(1, dim=1)                    # 5 x [B, 1, H, W]
    return _combine(x, y, roi, sx, sy, sxx, syy, sxy, n, lambda_roi, lambda_ncc)


def loss_and_grad(fn, x: torch.Tensor, y: torch.Tensor, roi: torch.Tensor,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], d loss_b / d y [B, 1, H, W]) of a differentiable loss function `fn`
    (the reference or the grouped-convolution formulation) by autograd.

    The returned loss keeps its graph to y when y requires grad."""
    y_ = y if y.requires_grad else y.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = fn(x, y_, roi, **kwargs)
        # loss_b depends on image b only, so the gradient of the sum is the per-image one
        (grad,) = torch.autograd.grad(loss.sum(), y_, retain_graph=y.requires_grad)
    return (loss if y.requires_grad else loss.detach()), grad


__all__ = ["EPS", "MODES", "DEFAULT_SIGMA", "window_taps", "ncc_roi_loss_reference",
           "ncc_roi_loss_grouped_conv", "loss_and_grad"]
