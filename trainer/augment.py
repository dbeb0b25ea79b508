"""Adaptive discriminator augmentation (ADA; Karras et al., "Training Generative
Adversarial Networks with Limited Data", NeurIPS 2020) for grey images.

:class:`AugmentPipe` applies the paper's 'bgc' pipeline without its colour-only
transforms (hue, saturation, luma flip make no sense for one channel):

    pixel blitting   x-flip, rotation by k * 90 degrees, integer translation
    geometric        isotropic scaling, arbitrary rotation, anisotropic scaling,
                     arbitrary rotation, fractional translation
    colour           brightness, contrast

Each transform is applied to each image independently with probability ``p`` (times
its multiplier); the two arbitrary rotations each with ``1 - sqrt(1 - p)``, so that
"rotated at all" has probability p. All geometric transforms of an image are composed
into one affine matrix and applied with a single ``F.affine_grid`` + ``F.grid_sample``
(bilinear, reflection padding, ``align_corners=False``). Two differences from the
paper's implementation: the resampling is plain bilinear (ADA upsamples 2x with a
wavelet low-pass filter around its resampling), and contrast scales around each
image's mean instead of around 0 (a cine MRI slice is mostly black background).

:class:`AdaController` tunes ``p`` from the overfitting heuristic
``r_t = E[sign(D(real))]``: every ``interval`` D steps,
``p <- clamp(p + sign(r_t - target) * batch_size * interval / (speed_kimg * 1000), 0, 1)``.

All random numbers come from torch's global generator (CPU or the images' CUDA
device), a fixed number of them per call for a given batch shape and configuration,
so that saving and restoring the RNG state resumes bit-exactly.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecon.runtime.errors import UsageError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- matrices


def _matrix(rows: list[list], like: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] from a 3x3 nested list of Python numbers and [B] tensors (like: [B])."""
    b = like.shape[0]
    elems = [e if isinstance(e, torch.Tensor) else like.new_full((b,), float(e))
             for row in rows for e in row]
    return torch.stack(elems, dim=1).reshape(b, 3, 3)


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


# ----------------------------------------------------------------------------- pipeline


class AugmentPipe(nn.Module):
    """ADA augmentation of grey images, differentiable with respect to the images.

    Buffer ``p``: float32 0-dim tensor, the augmentation probability in [0, 1] (set by
    :class:`AdaController`; saved in the module's state dict).

    Keyword knobs (defaults are ADA's): per-transform probability multipliers
    ``xflip, rotate90, xint, scale, rotate, aniso, xfrac, brightness, contrast``
    (0 disables a transform; it then draws no random numbers) and their strengths:

    xint_max:       integer translation, uniform in +-xint_max of the size (rounded
                    to whole pixels)
    scale_std:      isotropic scale 2**N(0, scale_std) (log-normal, std scale_std*ln2)
    rotate_max:     arbitrary rotation, uniform in +-rotate_max * 180 degrees
    aniso_std:      anisotropic scale 2**N(0, aniso_std) on x and its inverse on y
    xfrac_std:      fractional translation N(0, xfrac_std) of the size
    brightness_std: additive N(0, brightness_std)
    contrast_std:   contrast 2**N(0, contrast_std) around each image's mean

    As in ADA, x-flip and the 90-degree rotation pick their outcome uniformly
    ({no flip, flip}, {0, 90, 180, 270}) when applied, so an applied flip is the
    identity half the time.
    """

    def __init__(self, *, p: float = 0.0, xflip: float = 1.0, rotate90: float = 1.0,
                 xint: float = 1.0, scale: float = 1.0, rotate: float = 1.0, aniso: float = 1.0,
                 xfrac: float = 1.0, brightness: float = 1.0, contrast: float = 1.0,
                 xint_max: float = 0.125, scale_std: float = 0.2, rotate_max: float = 1.0,
                 aniso_std: float = 0.2, xfrac_std: float = 0.125, brightness_std: float = 0.2,
                 contrast_std: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise UsageError(f"AugmentPipe: p must be in [0, 1], got {p}")
        knobs = dict(xflip=xflip, rotate90=rotate90, xint=xint, scale=scale, rotate=rotate,
                     aniso=aniso, xfrac=xfrac, brightness=brightness, contrast=contrast,
                     xint_max=xint_max, scale_std=scale_std, rotate_max=rotate_max,
                     aniso_std=aniso_std, xfrac_std=xfrac_std, brightness_std=brightness_std,
                     contrast_std=contrast_std)
        for name, value in knobs.items():
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"AugmentPipe: {name} must be a finite number >= 0, got {value}")
            setattr(self, name, float(value))
        self.register_buffer("p", torch.tensor(float(p), dtype=torch.float32))

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4f}"

    def _geometric_inverse(self, b: int, h: int, w: int, p: float, dev: torch.device
                           ) -> torch.Tensor | None:
        """[B, 3, 3] float32 map from output to input pixel coordinates (origin at the
        image centre, x right, y down), or None when every geometric multiplier is 0."""
        if not any((self.xflip, self.rotate90, self.xint, self.scale, self.rotate, self.aniso,
                    self.xfrac)):
            return None

        def rand(*shape):
            return torch.rand((b, *shape), device=dev)

        def randn(*shape):
            return torch.randn((b, *shape), device=dev)

        g = torch.eye(3, device=dev).repeat(b, 1, 1)  # [B, 3, 3]
        zeros, ones = torch.zeros(b, device=dev), torch.ones(b, device=dev)
        if self.xflip > 0:
            i = torch.floor(rand() * 2)
            i = torch.where(rand() < self.xflip * p, i, zeros)
            g = g @ _scale(1 - 2 * i, ones)
        if self.rotate90 > 0:
            i = torch.floor(rand() * 4)
            i = torch.where(rand() < self.rotate90 * p, i, zeros)
            g = g @ _rotate(-math.pi / 2 * i)
        if self.xint > 0:
            t = (rand(2) * 2 - 1) * self.xint_max  # [B, 2]
            t = torch.where(rand(1) < self.xint * p, t, torch.zeros_like(t))
            g = g @ _translate(-torch.round(t[:, 0] * w), -torch.round(t[:, 1] * h))
        if self.scale > 0:
            s = torch.exp2(randn() * self.scale_std)
            s = torch.where(rand() < self.scale * p, s, ones)
            g = g @ _scale(1 / s, 1 / s)
        p_rot = 1 - math.sqrt(min(max(1 - self.rotate * p, 0.0), 1.0))  # P(either) = p
        if self.rotate > 0:
            theta = (rand() * 2 - 1) * math.pi * self.rotate_max
            theta = torch.where(rand() < p_rot, theta, zeros)
            g = g @ _rotate(-theta)  # before the anisotropic scaling
        if self.aniso > 0:
            s = torch.exp2(randn() * self.aniso_std)
            s = torch.where(rand() < self.aniso * p, s, ones)
            g = g @ _scale(1 / s, s)
        if self.rotate > 0:
            theta = (rand() * 2 - 1) * math.pi * self.rotate_max
            theta = torch.where(rand() < p_rot, theta, zeros)
            g = g @ _rotate(-theta)  # after the anisotropic scaling
        if self.xfrac > 0:
            t = randn(2) * self.xfrac_std  # [B, 2]
            t = torch.where(rand(1) < self.xfrac * p, t, torch.zeros_like(t))
            g = g @ _translate(-t[:, 0] * w, -t[:, 1] * h)
        return g

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Augment a batch.

        images: float [B, 1, H, W] (any range; [-1, 1] in training).
        Returns [B, 1, H, W] in the input's dtype (computed in float32, or float64 for
        float64 input). With ``p == 0`` the input tensor itself is returned (no work,
        no random numbers drawn). Reads ``p`` on the host (one device sync per call).
        """
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"AugmentPipe: images must be [B, 1, H, W], got {list(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"AugmentPipe: images must be floating point, got {images.dtype}")
        p = float(self.p)
        if p <= 0:
            return images
        b, _, h, w = images.shape
        dev = images.device
        x = images if images.dtype == torch.float64 else images.float()

        g = self._geometric_inverse(b, h, w, p, dev)
        if g is not None:
            # Pixel coordinates -> affine_grid's normalised ones (x, y in [-1, 1] over
            # the image's edges with align_corners=False): theta = N @ g @ N^-1.
            n = torch.diag(torch.tensor([2.0 / w, 2.0 / h, 1.0], device=dev))
            n_inv = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], device=dev))
            theta = (n @ g @ n_inv)[:, :2, :].to(x.dtype)  # [B, 2, 3]
            grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)  # [B, H, W, 2]
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                              align_corners=False)  # [B, 1, H, W]

        if self.brightness > 0 or self.contrast > 0:
            shift = torch.zeros(b, device=dev)
            gain = torch.ones(b, device=dev)
            if self.brightness > 0:
                v = torch.randn(b, device=dev) * self.brightness_std
                shift = torch.where(torch.rand(b, device=dev) < self.brightness * p, v, shift)
            if self.contrast > 0:
                v = torch.exp2(torch.randn(b, device=dev) * self.contrast_std)
                gain = torch.where(torch.rand(b, device=dev) < self.contrast * p, v, gain)
            shift = shift.to(x.dtype)[:, None, None, None]  # [B, 1, 1, 1]
            gain = gain.to(x.dtype)[:, None, None, None]
            # Brightness, then contrast around the (brightened) image's mean:
            # ((x + b) - m') * c + m' with m' = mean(x) + b, written so that an image
            # with neither (b = 0, c = 1) comes out bit-identical.
            mean = x.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
            x = x + (x - mean) * (gain - 1) + shift
        return x.to(images.dtype)


# ----------------------------------------------------------------------------- controller


class AdaController:
    """Adjusts an :class:`AugmentPipe`'s ``p`` from the sign of D's logits on reals.

    Per D step the trainer calls :meth:`accumulate` with the real logits, then (in
    distributed training) ``set_stats(all_reduce_sum(stats_tensor()))``, then
    :meth:`step`. Every ``interval``-th call of :meth:`step` computes
    ``r_t = sum(sign(logits)) / count`` over the interval (all ranks) and moves p by
    ``sign(r_t - target) * batch_size * interval / (speed_kimg * 1000)``, clamped to
    [0, 1] (p can go from 0 to 1 in ``speed_kimg`` thousand images).

    batch_size: images per D step over all ranks.

    Statistics are kept as float64 tensors [2] = (sum of signs, count) on the logits'
    device (no host sync except once per interval in :meth:`step`). Two
    accumulators: the local one not yet reduced (:meth:`stats_tensor`) and the reduced
    one; :meth:`set_stats` adds a reduced tensor to the latter and clears the former,
    so the reduction may run every step or once per interval without counting any
    logit twice.
    """

    def __init__(self, *, target: float = 0.6, interval: int = 4, speed_kimg: float = 100.0,
                 batch_size: int):
        if not 0.0 < target <= 1.0:
            raise UsageError(f"AdaController: target must be in (0, 1], got {target}")
        if int(interval) != interval or interval < 1:
            raise UsageError(f"AdaController: interval must be an integer >= 1, got {interval}")
        if not (math.isfinite(speed_kimg) and speed_kimg > 0):
            raise UsageError(f"AdaController: speed_kimg must be > 0, got {speed_kimg}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise UsageError(f"AdaController: batch_size must be an integer >= 1, got {batch_size}")
        self.target = float(target)
        self.interval = int(interval)
        self.speed_kimg = float(speed_kimg)
        self.batch_size = int(batch_size)
        self._local = torch.zeros(2, dtype=torch.float64)  # not yet reduced
        self._reduced = torch.zeros(2, dtype=torch.float64)
        self._calls = 0  # step() calls since the last update, in [0, interval)
        self._last_rt: float | None = None

    @property
    def adjust_per_update(self) -> float:
        """|change of p| per update: batch_size * interval / (speed_kimg * 1000)."""
        return self.batch_size * self.interval / (self.speed_kimg * 1000)

    @property
    def last_rt(self) -> float | None:
        """r_t of the last update (None before the first)."""
        return self._last_rt

    def accumulate(self, real_logits: torch.Tensor) -> None:
        """Add sum(sign(logits)) and the number of logits. real_logits: [B] or [B, 1]
        (any shape; every element counts), any float dtype and device."""
        logits = real_logits.detach()
        sign_sum = torch.sign(logits).to(torch.float64).sum()
        count = torch.full((), float(logits.numel()), dtype=torch.float64, device=logits.device)
        self._local = self._local.to(logits.device) + torch.stack([sign_sum, count])

    def stats_tensor(self) -> torch.Tensor:
        """float64 [2] (sum of signs, count) accumulated locally since the last
        :meth:`set_stats` (a copy: an in-place all_reduce of it changes nothing here)."""
        return self._local.clone()

    def set_stats(self, t: torch.Tensor) -> None:
        """Take ``t``, the sum over ranks of :meth:`stats_tensor`, as this interval's
        contribution from every rank; clears the local accumulator."""
        if t.shape != (2,):
            raise ValueError(f"AdaController.set_stats: expected a tensor [2], got {list(t.shape)}")
        t = t.detach().to(torch.float64)
        self._reduced = self._reduced.to(t.device) + t
        self._local = torch.zeros_like(t)

    def step(self, pipe: AugmentPipe) -> bool:
        """Call once per D step; every ``interval``-th call updates ``pipe.p`` from the
        statistics of the interval (reduced plus any not reduced) and resets them.
        Returns whether p was updated (False also when no logit was accumulated)."""
        self._calls += 1
        if self._calls < self.interval:
            return False
        self._calls = 0
        stats = self._reduced + self._local.to(self._reduced.device)
        self._reduced = torch.zeros_like(self._reduced)
        self._local = torch.zeros_like(self._local)
        total, count = stats.tolist()  # the one host sync per interval
        if count <= 0:
            return False
        rt = total / count
        if not math.isfinite(rt):
            log.warning("ADA: r_t is %s (non-finite logits); p left at %.4f", rt, float(pipe.p))
            return False
        self._last_rt = rt
        sign = (rt > self.target) - (rt < self.target)
        new_p = min(max(float(pipe.p) + sign * self.adjust_per_update, 0.0), 1.0)
        with torch.no_grad():
            pipe.p.fill_(new_p)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU tensors (safetensors-ready): ``stats`` float64 [2] (the current
        interval's statistics), ``calls`` int64 [] (step calls into the interval),
        ``last_rt`` float64 [] (NaN before the first update). ``p`` itself lives in
        the AugmentPipe's state dict."""
        stats = self._reduced.cpu() + self._local.cpu()
        return {"stats": stats,
                "calls": torch.tensor(self._calls, dtype=torch.int64),
                "last_rt": torch.tensor(math.nan if self._last_rt is None else self._last_rt,
                                        dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict` (the statistics count as already reduced:
        every rank loads the same checkpoint)."""
        missing = {"stats", "calls", "last_rt"} - set(state)
        if missing:
            raise UsageError(f"AdaController.load_state_dict: missing {sorted(missing)}")
        stats = state["stats"].detach().to(torch.float64).cpu().clone()
        if stats.shape != (2,):
            raise UsageError(f"AdaController.load_state_dict: stats must be [2], got {list(stats.shape)}")
        calls = int(state["calls"])
        if not 0 <= calls < self.interval:
            raise UsageError(f"AdaController.load_state_dict: calls={calls} is outside "
                             f"[0, interval={self.interval})")
        last_rt = float(state["last_rt"])
        self._reduced = stats
        self._local = torch.zeros(2, dtype=torch.float64)
        self._calls = calls
        self._last_rt = None if math.isnan(last_rt) else last_rt
