"""Building blocks shared by the networks: equalized-learning-rate layers, the
modulated convolution, the minibatch-standard-deviation statistic.

Equalized learning rate (StyleGAN): every weight is stored as N(0, 1) (divided by
``lr_mul`` for the mapping network) and scaled at run time by ``lr_mul / sqrt(fan_in)``,
so that Adam's per-parameter step is the same relative size in every layer. Biases are
scaled by ``lr_mul``. Hidden activations are leaky ReLU(0.2) times sqrt(2), which keeps
the signal's second moment about constant from layer to layer.

Everything here exports with ``torch.export`` and to ONNX: plain aten ops, no custom
kernels, no data-dependent Python control flow (every branch depends on constructor
arguments or static shapes only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
ACTIVATIONS = ("linear", "lrelu")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def bias_act(x: torch.Tensor, b: torch.Tensor | None, *, activation: str = "linear",
             gain: float = 1.0) -> torch.Tensor:
    """``act(x + b) * gain`` with the bias broadcast over dim 1.

    x: [B, C] or [B, C, H, W]; b: [C] or None. ``activation`` "lrelu" is leaky
    ReLU(0.2) times sqrt(2); "linear" is the identity. Returns x's shape and dtype.
    """
    if b is not None:
        x = x + b.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
        gain = gain * LRELU_GAIN
    if gain != 1.0:
        x = x * gain
    return x


def normalize_2nd_moment(x: torch.Tensor, *, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """x divided by its root-mean-square along ``dim`` (StyleGAN's "pixel norm" of z)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, 2H, 2W], bilinear (align_corners=False)."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H/2, W/2], 2 x 2 average pooling (H, W even)."""
    return F.avg_pool2d(x, 2)


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalized learning rate.

    x [B, in_features] -> [B, out_features], ``act(x @ (W * g).T + b * lr_mul)`` with
    ``g = lr_mul / sqrt(in_features)``. ``weight_init`` scales the N(0, 1) initial
    weight (a small value makes a near-zero output at init that still passes gradients).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 bias_init: float = 0.0, lr_mul: float = 1.0, activation: str = "linear",
                 weight_init: float = 1.0):
        super().__init__()
        _check_activation(activation)
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * (weight_init / lr_mul))
        self.bias = (nn.Parameter(torch.full([out_features], float(bias_init) / lr_mul))
                     if bias else None)
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.weight_gain
        b = None if self.bias is None else self.bias * self.bias_gain
        if self.activation == "linear":
            return F.linear(x, w, b)
        return bias_act(F.linear(x, w), b, activation=self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activation={self.activation}")


class EqualizedConv2d(nn.Module):
    """2D convolution with equalized learning rate ("same" padding, odd kernel).

    x [B, in_channels, H, W] -> [B, out_channels, H / down, W / down]. ``down=2``
    average-pools 2 x 2 before the convolution (an anti-aliased stride 2 that costs the
    convolution at the low resolution); ``stride=2`` is a plain strided convolution
    (pSp's map2style heads). ``gain`` multiplies the output after the
    activation (sqrt(0.5) in residual sums).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 bias: bool = True, activation: str = "linear", down: int = 1,
                 stride: int = 1, gain: float = 1.0):
        super().__init__()
        _check_activation(activation)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if down not in (1, 2):
            raise ValueError(f"down must be 1 or 2, got {down}")
        if stride not in (1, 2) or (stride == 2 and down == 2):
            raise ValueError(f"stride must be 1 or 2 (not with down=2), got {stride}")
        self.stride = stride
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.activation = kernel_size, activation
        self.down, self.gain = down, gain
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down == 2:
            x = downsample2x(x)  # [B, Cin, H/2, W/2]
        x = F.conv2d(x, self.weight * self.weight_gain, stride=self.stride,
                     padding=self.kernel_size // 2)  # [B, Cout, H', W']
        return bias_act(x, self.bias, activation=self.activation, gain=self.gain)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"activation={self.activation}, down={self.down}, stride={self.stride}, "
                f"gain={self.gain:g}")


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *,
                     demodulate: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """StyleGAN2's modulated convolution as "modulate the input, convolve with the fixed
    weight, demodulate the output" (no per-sample weights, no grouped convolution).

    x: [B, I, H, W]; weight: [O, I, k, k] (already scaled, odd k, "same" padding);
    styles: [B, I]. Returns [B, O, H, W] equal to convolving each sample with its own
    weight ``w[b, o, i] = weight[o, i] * styles[b, i]``, divided (if ``demodulate``) by
    ``d[b, o] = sqrt(sum_{i, kh, kw} w[b, o, i, kh, kw]^2 + eps)``.
    """
    x = x * styles[:, :, None, None]  # [B, I, H, W]
    x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)  # [B, O, H, W]
    if demodulate:
        wsq = weight.square().sum(dim=[2, 3])  # [O, I]
        dcoefs = (styles.square() @ wsq.t() + eps).rsqrt()  # [B, O]
        x = x * dcoefs[:, :, None, None]
    return x


class ModulatedConv2d(nn.Module):
    """A synthesis layer: modulated k x k convolution driven by one style vector.

    ``forward(x [B, in_channels, H, W], w [B, w_dim]) -> [B, out_channels, H*up, W*up]``.
    ``style = affine(w)`` (an equalized linear layer, bias init 1); ``up=2`` upsamples
    the input bilinearly before the convolution. With ``demodulate`` (the 3 x 3 layers)
    the output is bias + leaky ReLU; without it (ToRGB, 1 x 1) it is linear plus bias.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, *, kernel_size: int = 3,
                 up: int = 1, demodulate: bool = True, activation: str = "lrelu",
                 gain: float = 1.0):
        super().__init__()
        _check_activation(activation)
        if up not in (1, 2):
            raise ValueError(f"up must be 1 or 2, got {up}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.up, self.demodulate = kernel_size, up, demodulate
        self.activation, self.gain = activation, gain
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)  # [B, I]
        if self.up == 2:
            x = upsample2x(x)  # [B, I, 2H, 2W]
        x = modulated_conv2d(x, self.weight * self.weight_gain, styles,
                             demodulate=self.demodulate)  # [B, O, H, W]
        return bias_act(x, self.bias, activation=self.activation, gain=self.gain)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"up={self.up}, demodulate={self.demodulate}, activation={self.activation}")


class ResidualDownBlock(nn.Module):
    """StyleGAN2's residual discriminator block, also the encoder's backbone block.

    x [B, in_channels, H, W] -> [B, out_channels, H/2, W/2]:
    ``(skip(x) + conv1(conv0(x))) * sqrt(0.5)``, conv0 3 x 3 (in -> in), conv1 3 x 3
    downsampling (in -> out), skip 1 x 1 downsampling without bias or activation.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        g = math.sqrt(0.5)
        self.conv0 = EqualizedConv2d(in_channels, in_channels, 3, activation="lrelu")
        self.conv1 = EqualizedConv2d(in_channels, out_channels, 3, activation="lrelu", down=2,
                                     gain=g)
        self.skip = EqualizedConv2d(in_channels, out_channels, 1, bias=False, down=2, gain=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv1(self.conv0(x))


def mbstd_group_size(batch: int, group_size: int) -> int:
    """The largest divisor of ``batch`` that is <= ``group_size`` (Python ints)."""
    for g in range(min(group_size, batch), 0, -1):
        if batch % g == 0:
            return g
    return 1


def minibatch_std(x: torch.Tensor, *, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """Append the minibatch standard deviation as one more feature map.

    x [B, C, H, W] -> [B, C + 1, H, W]. The batch is split into groups of
    ``mbstd_group_size(B, group_size)`` samples (sample i in group i mod (B / G)); the
    extra channel is the standard deviation over the group, averaged over C, H, W.
    The group size is computed from the static batch size, so any B works.
    """
    b, c, h, w = x.shape
    g = mbstd_group_size(int(b), group_size)
    y = x.reshape(g, -1, c, h, w)  # [G, n, C, H, W]
    y = y - y.mean(dim=0)
    y = (y.square().mean(dim=0) + eps).sqrt()  # [n, C, H, W]
    y = y.mean(dim=[1, 2, 3])  # [n]
    y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)  # [B, 1, H, W]
    return torch.cat([x, y.to(x.dtype)], dim=1)


__all__ = ["bias_act", "normalize_2nd_moment", "upsample2x", "downsample2x",
           "EqualizedLinear", "EqualizedConv2d", "modulated_conv2d", "ModulatedConv2d",
           "ResidualDownBlock", "mbstd_group_size", "minibatch_std"]
