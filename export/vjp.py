"""Explicit vector-Jacobian products of the inversion's networks, written as ordinary
forward torch code, so that the gradient the inversion needs exports to ONNX like any
forward graph (and runs where torch is not installed).

Why not autograd: ``torch.onnx`` of ``torch.autograd.grad`` fails or bakes gradients in
as constants, and onnxruntime-training is deprecated. Here every backward rule is a
forward op with the same fixed weights: a convolution's input gradient is a transposed
convolution, a fixed spatial resampling (bilinear 2x, 2x2 average pooling, the blur
pool of LPIPS, LPIPS's resize) is multiplied by its transposed 1-D matrices, leaky ReLU
and ReLU are masks, a 3x3 max pool scatters the gradient to the maximum its indices
name (the first of each window: torch's tie rule). The modulated convolution keeps its
weight fixed (modulate the input, convolve, demodulate), so its style gradient is two
reductions.

:class:`Tape` is the bookkeeping: each op records its output, its tracked inputs and
its backward rule; :meth:`Tape.backward` runs the rules in reverse and sums the
gradients of tensors used more than once. The forward code mirrors the networks op for
op (same functions, same order), so the forward values are the networks' own; the test
suite and the exporter compare both the values and the products with
``torch.func.vjp`` of the real modules.

Modules (all ``nn.Module``, inputs and outputs float32, batch dimension free):

- :class:`GeneratorVJP`  (w [B, L, C], g_image [B, 1, R, R]) -> (image, g_w)
- :class:`EncoderVJP`    (image [B, 1, R, R], g_w [B, L, C]) -> (w, g_image)
- :class:`LpipsFeatures` x [B, 1, R, R] -> the unit-normalised LPIPS features of x
- :class:`HybridGrad`    the inversion's loss and gradient (:mod:`deeprecon.runtime.inversion`),
  the fused kernel's NCC/ROI-L2 terms in closed form (:func:`ncc_roi_terms`):
  (w, x, roi, features of x..., lambdas, ncc_window) -> (loss, grad)
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deeprecon.runtime.inversion import MAX_NCC_WINDOW
from deeprecon.trainer.lpips import LPIPS, MIN_SIZE
from deeprecon.trainer.networks.encoder import Encoder
from deeprecon.trainer.networks.generator import Generator
from deeprecon.trainer.networks.layers import LRELU_GAIN, LRELU_SLOPE, upsample2x, downsample2x

Grads = tuple  # of tensors or None, one per tracked input


class Tape:
    """Reverse-mode bookkeeping over the ops of this module (see the module docstring).

    Tensors are identified by object identity; the tape holds a reference to every
    tensor it records, so an identity is never reused while the tape lives."""

    def __init__(self):
        self._records: list[tuple[torch.Tensor, tuple, Callable[[torch.Tensor], Grads]]] = []
        self._tracked: dict[int, torch.Tensor] = {}

    def leaf(self, t: torch.Tensor) -> torch.Tensor:
        """Track ``t`` as an input that gradients are wanted for."""
        self._tracked[id(t)] = t
        return t

    def tracked(self, t: torch.Tensor | None) -> bool:
        return t is not None and id(t) in self._tracked

    def record(self, out: torch.Tensor, inputs: tuple, vjp: Callable[[torch.Tensor], Grads]
               ) -> torch.Tensor:
        """``out`` depends on ``inputs`` (untracked ones are ignored); ``vjp(g_out)``
        gives one gradient (or None) per input."""
        if any(self.tracked(t) for t in inputs):
            self._records.append((out, inputs, vjp))
            self._tracked[id(out)] = out
        return out

    def backward(self, seeds: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 wrt: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """The gradients of sum(<seed tensor, seed gradient>) with respect to ``wrt``
        (None for a tensor the seeds do not depend on)."""
        grads: dict[int, torch.Tensor] = {}

        def add(t, g):
            if g is not None and self.tracked(t):
                grads[id(t)] = g if id(t) not in grads else grads[id(t)] + g

        for t, g in seeds:
            add(t, g)
        for out, inputs, vjp in reversed(self._records):
            g = grads.pop(id(out), None)
            if g is None:
                continue
            for t, gi in zip(inputs, vjp(g)):
                add(t, gi)
        return [grads.get(id(t)) for t in wrt]


# ----------------------------------------------------------------------------- ops


def _input_grad(g, weight, *, padding: int):
    """The input gradient of a stride-1 convolution, ``conv_transpose2d(g, weight)``,
    written as a convolution of g with the transposed, flipped kernel where that is
    faster: onnxruntime's CPU ConvTranspose is slower than its Conv, except for a
    convolution onto very few channels (LPIPS's first layer, onto the grey image, ran 40
    vs 4 ms for 10 images as a Conv)."""
    k = weight.shape[-1]
    if weight.shape[1] < 8:
        return F.conv_transpose2d(g, weight, padding=padding)
    return F.conv2d(g, weight.transpose(0, 1).flip(2, 3), padding=k - 1 - padding)


def _conv(tape: Tape, x, weight, bias=None, *, stride: int = 1, padding: int = 0):
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    h, w = x.shape[-2], x.shape[-1]
    k = weight.shape[-1]

    def vjp(g):
        if stride == 1:
            return (_input_grad(g, weight, padding=padding),)
        oh = h - ((g.shape[-2] - 1) * stride - 2 * padding + k)
        ow = w - ((g.shape[-1] - 1) * stride - 2 * padding + k)
        return (F.conv_transpose2d(g, weight, stride=stride, padding=padding,
                                   output_padding=(oh, ow)),)
    return tape.record(y, (x,), vjp)


def _linear(tape: Tape, x, weight, bias=None):
    return tape.record(F.linear(x, weight, bias), (x,), lambda g: (g @ weight,))


def _bias_act(tape: Tape, x, b, *, activation: str = "linear", gain: float = 1.0):
    """:func:`deeprecon.trainer.networks.layers.bias_act`, op for op, with its VJP."""
    pre = x if b is None else x + b.to(x.dtype).reshape([1, -1] + [1] * (x.ndim - 2))
    y = pre
    if activation == "lrelu":
        y = F.leaky_relu(pre, LRELU_SLOPE)
        gain = gain * LRELU_GAIN
    if gain != 1.0:
        y = y * gain
    if activation == "lrelu":
        def vjp(g):
            return (g * torch.where(pre > 0, gain, gain * LRELU_SLOPE),)
    else:
        def vjp(g):
            return (g * gain if gain != 1.0 else g,)
    return tape.record(y, (x,), vjp)


def _relu(tape: Tape, x):
    y = F.relu(x)
    return tape.record(y, (x,), lambda g: (torch.where(y > 0, g, torch.zeros_like(g)),))


def _add(tape: Tape, a, b):
    return tape.record(a + b, (a, b), lambda g: (g, g))


def _sub_const(tape: Tape, a, c):
    return tape.record(a - c, (a,), lambda g: (g,))


def _spatial(tape: Tape, y, x, m: torch.Tensor):
    """``y`` is a fixed separable resampling of ``x``: y = M x M^T per channel, with
    ``m`` = M [n_out, n_in] (square images). Records the VJP g -> M^T g M."""
    return tape.record(y, (x,), lambda g: (torch.matmul(torch.matmul(m.t(), g), m),))


def _maxpool3(tape: Tape, x):
    """3x3 max pool, stride 1, no padding; the gradient goes to the maximum of each
    window that the pool's indices name (the first in row-major order, as torch's CPU
    kernel and onnxruntime's MaxPool pick it), summed where windows share it: one
    scatter-add (ONNX ScatterElements, reduction add) instead of nine masked windows
    (measured, docs/runtime.md)."""
    y, idx = F.max_pool2d(x, kernel_size=3, stride=1, return_indices=True)

    def vjp(g):
        gx = torch.zeros_like(x).flatten(2).scatter_add(2, idx.flatten(2), g.flatten(2))
        return (gx.reshape(x.shape),)
    return tape.record(y, (x,), vjp)


def _normalize(tape: Tape, f, eps: float = 1e-10):
    """LPIPS's f / (||f||_2 + eps) over channels, with torch's gradient (0 for the norm
    at f == 0)."""
    norm = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    r = norm + eps
    y = f / r

    def vjp(g):
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        return (g / r - f * (g * f).sum(dim=1, keepdim=True) / (r * r * safe),)
    return tape.record(y, (f,), vjp)


def _modconv(tape: Tape, x, styles, weight, *, demodulate: bool, eps: float = 1e-8):
    """:func:`deeprecon.trainer.networks.layers.modulated_conv2d` with its VJP in both
    x and the styles (the weight stays fixed)."""
    xm = x * styles[:, :, None, None]
    c = F.conv2d(xm, weight, padding=weight.shape[-1] // 2)
    d = None
    out = c
    if demodulate:
        wsq = weight.square().sum(dim=[2, 3])  # [O, I]
        d = (styles.square() @ wsq.t() + eps).rsqrt()  # [B, O]
        out = c * d[:, :, None, None]
    need_x = tape.tracked(x)

    def vjp(g):
        if demodulate:
            gc = g * d[:, :, None, None]
            gd = (g * c).sum(dim=(2, 3))  # [B, O]
            gs = 2.0 * styles * ((gd * (-0.5) * d * d * d) @ wsq)  # [B, I]
        else:
            gc, gs = g, 0.0
        gxm = _input_grad(gc, weight, padding=weight.shape[-1] // 2)
        gs = gs + (gxm * x).sum(dim=(2, 3))
        return (gxm * styles[:, :, None, None] if need_x else None, gs)
    return tape.record(out, (x, styles), vjp)


# ----------------------------------------------------------------------------- resampling


def _matrix(op: Callable[[torch.Tensor], torch.Tensor], n: int) -> torch.Tensor:
    """M [n_out, n] of a 1-D linear op (applied to [n, 1, n] rows of the identity)."""
    with torch.no_grad():
        cols = op(torch.eye(n, dtype=torch.float64)[:, None, :])  # [n, 1, n_out]
    return cols[:, 0, :].t().contiguous().float()


def upsample_matrix(n: int, size: int) -> torch.Tensor:
    """Bilinear (align_corners=False) resampling n -> size as a matrix [size, n]."""
    return _matrix(lambda e: F.interpolate(e, size=size, mode="linear", align_corners=False), n)


def avgpool_matrix(n: int) -> torch.Tensor:
    """2x2 average pooling along one axis, [n / 2, n]."""
    return _matrix(lambda e: F.avg_pool1d(e, 2), n)


def blurpool_matrix(n: int) -> torch.Tensor:
    """LPIPS's BlurPool (reflect pad 2, [1, 2, 1] / 4, stride 2) along one axis."""
    k = torch.tensor([[[0.25, 0.5, 0.25]]], dtype=torch.float64)
    return _matrix(lambda e: F.conv1d(F.pad(e, (2, 2), mode="reflect"), k, stride=2), n)


class _Matrices(nn.Module):
    """The resampling matrices a network needs, as buffers (constants of the graph)."""

    def __init__(self):
        super().__init__()
        self._names: dict[tuple, str] = {}

    def get(self, kind: str, n: int, size: int = 0) -> torch.Tensor:
        key = (kind, n, size)
        if key not in self._names:
            m = {"up": lambda: upsample_matrix(n, size), "avg": lambda: avgpool_matrix(n),
                 "blur": lambda: blurpool_matrix(n)}[kind]()
            name = f"m_{kind}_{n}_{size}"
            self.register_buffer(name, m, persistent=False)
            self._names[key] = name
        return getattr(self, self._names[key])


def _up2(tape: Tape, mats: _Matrices, x):
    n = x.shape[-1]
    return _spatial(tape, upsample2x(x), x, mats.get("up", n, 2 * n))


def _down2(tape: Tape, mats: _Matrices, x):
    return _spatial(tape, downsample2x(x), x, mats.get("avg", x.shape[-1]))


# ----------------------------------------------------------------------------- layers


def _eq_conv(tape: Tape, mats: _Matrices, layer, x):
    """EqualizedConv2d.forward with its VJP."""
    if layer.down == 2:
        x = _down2(tape, mats, x)
    x = _conv(tape, x, layer.weight * layer.weight_gain, stride=layer.stride,
              padding=layer.kernel_size // 2)
    return _bias_act(tape, x, layer.bias, activation=layer.activation, gain=layer.gain)


def _eq_linear(tape: Tape, layer, x):
    """EqualizedLinear.forward (linear or lrelu) with its VJP."""
    w = layer.weight * layer.weight_gain
    b = None if layer.bias is None else layer.bias * layer.bias_gain
    if layer.activation == "linear":
        return _linear(tape, x, w, b)
    return _bias_act(tape, _linear(tape, x, w), b, activation=layer.activation)


def _mod_layer(tape: Tape, mats: _Matrices, layer, x, w):
    """ModulatedConv2d.forward with its VJP in x and w."""
    styles = _eq_linear(tape, layer.affine, w)
    if layer.up == 2:
        x = _up2(tape, mats, x)
    x = _modconv(tape, x, styles, layer.weight * layer.weight_gain, demodulate=layer.demodulate)
    return _bias_act(tape, x, layer.bias, activation=layer.activation, gain=layer.gain)


# ----------------------------------------------------------------------------- networks


def generator_forward(tape: Tape, mats: _Matrices, synthesis, ws: Sequence[torch.Tensor]):
    """SynthesisNetwork.forward on the style vectors ``ws`` (L tensors [B, C])."""
    x = img = None
    for block, start in zip(synthesis.blocks, synthesis.ws_start):
        if block.is_first:
            x = block.const.to(ws[0].dtype).unsqueeze(0).expand(ws[0].shape[0], -1, -1, -1)
            x = _mod_layer(tape, mats, block.conv1, x, ws[start])
        elif block.skip is not None:
            y = _up2(tape, mats, _eq_conv(tape, mats, block.skip, x))
            x = _mod_layer(tape, mats, block.conv0, x, ws[start])
            x = _add(tape, y, _mod_layer(tape, mats, block.conv1, x, ws[start + 1]))
        else:
            x = _mod_layer(tape, mats, block.conv0, x, ws[start])
            x = _mod_layer(tape, mats, block.conv1, x, ws[start + 1])
        if img is not None:
            img = _up2(tape, mats, img)
        if block.torgb is not None:
            y = _mod_layer(tape, mats, block.torgb, x, ws[start + block.num_conv])
            img = y if img is None else _add(tape, img, y)
    return img


def encoder_forward(tape: Tape, mats: _Matrices, enc: Encoder, img):
    """Encoder.forward: (ws, the per-head offsets [B, C] (L tensors) that ws stacks)."""
    coarse, middle, fine = enc.sizes
    feats = {}
    x = _eq_conv(tape, mats, enc.stem, img)
    feats[x.shape[-1]] = x
    for block in enc.blocks:
        s = _eq_conv(tape, mats, block.skip, x)
        x = _add(tape, s, _eq_conv(tape, mats, block.conv1, _eq_conv(tape, mats, block.conv0, x)))
        feats[x.shape[-1]] = x

    def up_to(t, size):
        n = t.shape[-1]
        if n == size:
            return t
        y = F.interpolate(t, scale_factor=size / n, mode="bilinear", align_corners=False)
        return _spatial(tape, y, t, mats.get("up", n, size))

    p_coarse = feats[coarse]
    p_middle = _add(tape, up_to(p_coarse, middle), _eq_conv(tape, mats, enc.lateral_middle, feats[middle]))
    p_fine = _add(tape, up_to(p_middle, fine), _eq_conv(tape, mats, enc.lateral_fine, feats[fine]))
    offsets = []
    for i, head in enumerate(enc.heads):
        h = p_coarse if i < enc.end_coarse else p_middle if i < enc.end_middle else p_fine
        for conv in head.convs:
            h = _eq_conv(tape, mats, conv, h)
        shape = h.shape
        flat = tape.record(h.flatten(1), (h,), lambda g, shape=shape: (g.reshape(shape),))
        offsets.append(_eq_linear(tape, head.linear, flat))
    ws = enc.w_avg.to(offsets[0].dtype)[None, None] + torch.stack(offsets, dim=1)
    return ws, offsets


def lpips_features(tape: Tape, mats: _Matrices, lp: LPIPS, x):
    """LPIPS.features on a grey image [B, 1, R, R] with the VJP (the unnormalised
    relu1 .. relu_layers maps)."""
    n = x.shape[-1]
    if n < MIN_SIZE:
        y = lp._prepare(x, "x")
        x = _spatial(tape, y, x, mats.get("up", n, y.shape[-1]))
    conv = lp.net.slice1[0]
    shift, scale = lp.scaling_layer.shift, lp.scaling_layer.scale
    w_grey = (conv.weight / scale.reshape(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    w_const = (conv.weight * (shift / scale).reshape(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    const = F.conv2d(torch.ones_like(x[:1]), w_const, padding=conv.padding)
    h = _sub_const(tape, _conv(tape, x, w_grey, conv.bias, padding=conv.padding[0]), const)

    def blur(pool, t):
        return _spatial(tape, pool(t), t, mats.get("blur", t.shape[-1]))

    h = _relu(tape, blur(lp.net.slice1[1], h))                           # relu1
    feats = [h]
    for k in range(1, lp.layers):
        if k in (1, 2):         # slice2, slice3: max pool, blur pool, conv, ReLU
            s = (lp.net.slice2, lp.net.slice3)[k - 1]
            conv_k = s[2]
            h = blur(s[1], _maxpool3(tape, h))
        else:                   # slice4, slice5: conv, ReLU
            conv_k = (lp.net.slice4, lp.net.slice5)[k - 3][0]
        h = _relu(tape, _conv(tape, h, conv_k.weight, conv_k.bias, padding=conv_k.padding[0]))
        feats.append(h)
    return feats


def lpips_distance(tape: Tape, lp: LPIPS, x_features: Sequence[torch.Tensor], feats):
    """LPIPS.distance_to from the normalised features of x and the trunk features of y
    (a tape op per layer: the gradient of the layer's term at n(f_y))."""
    dist = None
    for fx, f, lin in zip(x_features, feats, lp.lins):
        ny = _normalize(tape, f)
        wl = lin.model[1].weight  # [1, C, 1, 1]
        term = F.conv2d((fx - ny).square(), wl).mean(dim=(1, 2, 3))  # [B]
        hw = ny.shape[-2] * ny.shape[-1]

        def vjp(g, fx=fx, ny=ny, wl=wl, hw=hw):
            return (g[:, None, None, None] * (-2.0 / hw) * (fx - ny) * wl,)
        term = tape.record(term, (ny,), vjp)
        dist = term if dist is None else _add(tape, dist, term)
    return dist


def _box_sums(t: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Per channel, the 'same' sum of t [B, C, H, W] over a separable window of 1-D
    ``taps`` [K] (K odd), zero padding."""
    c, k = t.shape[1], taps.shape[0]
    t = F.conv2d(t, taps.view(1, 1, k, 1).expand(c, 1, k, 1), padding=(k // 2, 0), groups=c)
    return F.conv2d(t, taps.view(1, 1, 1, k).expand(c, 1, 1, k), padding=(0, k // 2), groups=c)


def ncc_roi_terms(x: torch.Tensor, y: torch.Tensor, roi: torch.Tensor, ncc_window: torch.Tensor,
                  lambda_roi: torch.Tensor, lambda_ncc: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel's loss (box window; definition in ``deeprecon.cpp_ext.reference``)
    and its gradient with respect to y, in closed form, as plain forward ops.

    x, y, roi [B, 1, H, W]; ncc_window int64 [1], odd, <= MAX_NCC_WINDOW (the box is a
    MAX_NCC_WINDOW-tap filter whose middle ncc_window taps are 1: with zero padding that
    is exactly the ncc_window box); lambda_roi, lambda_ncc scalars.
    Returns (loss [B], dloss/dy [B, 1, H, W]).

    The window's weights are symmetric, so the adjoint of a local sum is the same local
    sum; with S = local sum, n = k * k, cross, varx, vary and cc as in the reference and
    D = varx vary + eps:  dcc/dSxy = 2 cross / D, dcc/dSyy = -cc varx / D,
    dcc/dSy = -(Sx dcc/dSxy + 2 Sy dcc/dSyy) / n, and
    dloss/dy = S(g_Sy) + 2 y S(g_Syy) + x S(g_Sxy) - 2 lambda_roi roi (x - y) / (sum roi + eps).
    """
    from deeprecon.cpp_ext.reference import EPS

    half = torch.div(ncc_window, 2, rounding_mode="floor").to(x.dtype)           # [1]
    centre = torch.arange(MAX_NCC_WINDOW, dtype=x.dtype) - MAX_NCC_WINDOW // 2
    taps = (centre.abs() <= half).to(x.dtype)                                   # [K]
    n = taps.sum().square()
    sx, sy, sxx, syy, sxy = _box_sums(torch.cat([x, y, x * x, y * y, x * y], 1), taps).split(1, 1)
    cross = sxy - sx * sy / n
    varx = sxx - sx * sx / n
    vary = syy - sy * sy / n
    den_cc = varx * vary + EPS
    cc = cross * cross / den_cc                                                  # [B, 1, H, W]
    den_roi = roi.sum(dim=(1, 2, 3), keepdim=True) + EPS                        # [B, 1, 1, 1]
    diff = x - y
    loss = (lambda_roi * (roi * diff * diff).sum(dim=(1, 2, 3), keepdim=True) / den_roi).flatten() \
        - lambda_ncc * cc.mean(dim=(1, 2, 3))
    a = -lambda_ncc / (x.shape[2] * x.shape[3])                                  # dloss/dcc
    g_sxy = a * 2.0 * cross / den_cc
    g_syy = -a * cc * varx / den_cc
    g_sy = -(g_sxy * sx + 2.0 * g_syy * sy) / n
    s_sy, s_syy, s_sxy = _box_sums(torch.cat([g_sy, g_syy, g_sxy], 1), taps).split(1, 1)
    grad = s_sy + 2.0 * y * s_syy + x * s_sxy - 2.0 * lambda_roi * roi * diff / den_roi
    return loss, grad


# ----------------------------------------------------------------------------- modules


class GeneratorVJP(nn.Module):
    """(w [B, L, C], g_image [B, 1, R, R]) -> (G(w), g_image^T dG/dw [B, L, C])."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.synthesis = generator.synthesis
        self.mats = _Matrices()
        with torch.no_grad():  # register the matrices before export
            generator_forward(Tape(), self.mats, self.synthesis,
                              list(torch.zeros(1, generator.num_ws, generator.w_dim).unbind(1)))

    def forward(self, w: torch.Tensor, g_image: torch.Tensor):
        tape = Tape()
        ws = [tape.leaf(t) for t in w.unbind(1)]
        img = generator_forward(tape, self.mats, self.synthesis, ws)
        gws = tape.backward([(img, g_image)], ws)
        return img, torch.stack([g if g is not None else torch.zeros_like(t)
                                 for g, t in zip(gws, ws)], dim=1)


class EncoderVJP(nn.Module):
    """(image [B, 1, R, R], g_w [B, L, C]) -> (E(image), g_w^T dE/dimage [B, 1, R, R])."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.mats = _Matrices()
        r = encoder.cfg.resolution
        with torch.no_grad():
            encoder_forward(Tape(), self.mats, encoder, torch.zeros(1, encoder.cfg.img_channels, r, r))

    def forward(self, image: torch.Tensor, g_w: torch.Tensor):
        tape = Tape()
        img = tape.leaf(image)
        ws, offsets = encoder_forward(tape, self.mats, self.encoder, img)
        (g,) = tape.backward(list(zip(offsets, g_w.unbind(1))), [img])
        return ws, g


class LpipsFeatures(nn.Module):
    """x [B, 1, R, R] -> the unit-normalised LPIPS features of x (``layers`` maps),
    :meth:`LPIPS.reference_features`: what the inversion computes once per image."""

    def __init__(self, lpips: LPIPS):
        super().__init__()
        self.lpips = lpips

    def forward(self, x: torch.Tensor):
        return tuple(self.lpips.reference_features(x))


class LpipsVJP(nn.Module):
    """(features of x..., y [B, 1, R, R], g [B]) -> (LPIPS(x, y) [B], g^T dLPIPS/dy)."""

    def __init__(self, lpips: LPIPS, resolution: int):
        super().__init__()
        self.lpips = lpips
        self.mats = _Matrices()
        with torch.no_grad():
            lpips_features(Tape(), self.mats, lpips, torch.zeros(1, 1, resolution, resolution))

    def forward(self, *args: torch.Tensor):
        *fx, y, g = args
        tape = Tape()
        y = tape.leaf(y)
        d = lpips_distance(tape, self.lpips, fx, lpips_features(tape, self.mats, self.lpips, y))
        (gy,) = tape.backward([(d, g)], [y])
        return d, gy


class HybridGrad(nn.Module):
    """The inversion loss (:func:`deeprecon.runtime.inversion.hybrid_loss`) and its
    gradient with respect to w, as one graph.

    Inputs: w [B, L, C]; x, roi [B, 1, R, R]; the normalised LPIPS features of x
    (:class:`LpipsFeatures`, one input per layer); lambdas [3] = (lambda1, lambda2,
    lambda3); ncc_window int64 [1] (odd, 3 .. MAX_NCC_WINDOW).

    Outputs: loss [B] = lambda1 (LPIPS(x, y) + ROI-L2) - lambda2 NCC + lambda3
    mean((w - E(y))^2) with y = G(w), and grad [B, L, C] = dloss/dw. The ROI-L2 and NCC
    terms are :func:`ncc_roi_terms` (closed form): computing them here instead of in
    the fused kernel between two graphs spares a second forward pass of G per step
    (docs/runtime.md has the measurement).
    """

    def __init__(self, generator: Generator, encoder: Encoder, lpips: LPIPS):
        super().__init__()
        self.synthesis = generator.synthesis
        self.encoder = encoder
        self.lpips = lpips
        self.mats = _Matrices()
        r, L, C = generator.resolution, generator.num_ws, generator.w_dim
        with torch.no_grad():
            tape = Tape()
            y = generator_forward(tape, self.mats, self.synthesis, list(torch.zeros(1, L, C).unbind(1)))
            encoder_forward(tape, self.mats, encoder, y)
            lpips_features(tape, self.mats, lpips, y)

    def forward(self, w: torch.Tensor, x: torch.Tensor, roi: torch.Tensor, *args: torch.Tensor):
        *fx, lambdas, ncc_window = args
        lam1, lam2, lam3 = lambdas[0], lambdas[1], lambdas[2]
        tape = Tape()
        ws = [tape.leaf(t) for t in w.unbind(1)]
        y = generator_forward(tape, self.mats, self.synthesis, ws)
        loss_fused, g_fused = ncc_roi_terms(x, y, roi, ncc_window, lam1, lam2)
        d = lpips_distance(tape, self.lpips, fx, lpips_features(tape, self.mats, self.lpips, y))
        e, offsets = encoder_forward(tape, self.mats, self.encoder, y)
        n = w.shape[1] * w.shape[2]
        diff = w - e
        loss = loss_fused + lam1 * d + lam3 * diff.square().mean(dim=(1, 2))
        g_latent = (2.0 / n) * lam3 * diff                                 # d/dw, direct
        seeds = [(y, g_fused), (d, lam1 * torch.ones_like(d))]
        seeds += list(zip(offsets, (-g_latent).unbind(1)))                  # through E(G(w))
        gws = tape.backward(seeds, ws)
        grad = torch.stack([g if g is not None else torch.zeros_like(t)
                            for g, t in zip(gws, ws)], dim=1)
        return loss, grad + g_latent


__all__ = ["Tape", "GeneratorVJP", "EncoderVJP", "LpipsFeatures", "LpipsVJP", "HybridGrad",
           "ncc_roi_terms",
           "upsample_matrix", "avgpool_matrix", "blurpool_matrix"]
