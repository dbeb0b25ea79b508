"""Shift-tolerant LPIPS (AlexNet trunk) as our own module, with the weights of the
``stlpips-pytorch`` 0.0.2 wheel.

The network reproduces ``stlpips_pytorch.stlpips.LPIPS(net="alex",
variant="shift_tolerant", version="0.1")`` (Ghildyal & Liu, "Shift-tolerant
Perceptual Similarity Metric", ECCV 2022) layer for layer, with the same state-dict
key names, so the wheel's ``alex_shift_tolerant.pth`` loads with ``strict=True``.
Only that weight file is read; the package's Python modules are never imported (they
import torchvision, IPython and torchsummary).

Trunk (``net``), input [B, 3, H, W] after the scaling layer ``(x - shift) / scale``::

    slice1: conv 3->64 k11 s1 p2 -> BlurPool(64) -> ReLU                        relu1
    slice2: MaxPool k3 s1 -> BlurPool(64) -> conv 64->192 k5 p2 -> ReLU          relu2
    slice3: MaxPool k3 s1 -> BlurPool(192) -> conv 192->384 k3 p1 -> ReLU        relu3
    slice4: conv 384->256 k3 p1 -> ReLU                                          relu4
    slice5: conv 256->256 k3 p1 -> ReLU                                          relu5

BlurPool = reflect pad 2 on every side, then a depthwise 3x3 binomial filter
([1, 2, 1] outer [1, 2, 1] / 16) with stride 2 (``Downsample(pad_more=True)`` in the
package). The distance is

    d(x, y) = sum_k mean_{h,w} lin_k((n(f_k(x)) - n(f_k(y)))^2)

with n() the unit-length normalisation over channels (``+ 1e-10`` on the norm) and
lin_k a 1x1 convolution without bias (non-negative weights). The package's lin layers
put a Dropout in front of the 1x1 convolution; it is inactive in eval mode, which is
the only mode this module has, so it is an ``nn.Identity`` here (same keys:
``lin{k}.model.1.weight``).

One deliberate difference: the channel norm is computed with
``torch.linalg.vector_norm``, whose gradient at a zero feature vector is 0; the
package's ``sqrt(sum(f**2))`` has an infinite derivative there, which gives NaN
gradients wherever a layer's ReLU output is zero in every channel. Forward values agree
with the package's formulation to float rounding.
"""
from __future__ import annotations

import base64
import functools
import importlib.metadata
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from deeprecon.runtime.errors import UnavailableError
from deeprecon.runtime.publish import sha256_file

log = logging.getLogger(__name__)

DISTRIBUTION = "stlpips-pytorch"
DISTRIBUTION_VERSION = "0.0.2"
WEIGHTS_IN_WHEEL = "stlpips_pytorch/weights/vST0.0/alex_shift_tolerant.pth"
# SHA-256 of WEIGHTS_IN_WHEEL as the wheel's RECORD writes it (urlsafe base64, no
# padding), pinned so that a file given by path is checked as well.
WEIGHTS_SHA256 = "s1azgvlgEPd9CF7oND7Nn9Mi0KVujeKy0FSfr8rYue4"
MIN_SIZE = 64  # smaller inputs are resized up (see LPIPS.forward)
CHANNELS = (64, 192, 384, 256, 256)  # of relu1 .. relu5

_INSTALL_HINT = f"pip install {DISTRIBUTION}=={DISTRIBUTION_VERSION} (or: pip install 'deeprecon-rt[train]')"


class LpipsWeightsError(UnavailableError):
    """The LPIPS weight file is missing, unreadable, corrupt or not the expected file
    (exit 69, like any other unusable model bundle: the file belongs to the
    installation, not to the user's data; reinstalling the wheel fixes it)."""


# ----------------------------------------------------------------------------- network


class BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling: reflect pad 2 on every side, then a
    depthwise 3x3 binomial filter with stride 2.

    [B, C, H, W] -> [B, C, floor((H + 1) / 2), floor((W + 1) / 2)]; H, W >= 3 (the
    reflect pad of 2 needs it). Buffer ``filt`` [C, 1, 3, 3] (key name of the package).
    """

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        filt = a[:, None] * a[None, :]
        filt = filt / filt.sum()  # [3, 3], sums to 1
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1))  # [C, 1, 3, 3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (2, 2, 2, 2), mode="reflect")  # [B, C, H + 4, W + 4]
        return F.conv2d(x, self.filt, stride=2, groups=x.shape[1])


class ScalingLayer(nn.Module):
    """LPIPS v0.1 input scaling ``(x - shift) / scale`` per RGB channel (buffers
    ``shift``, ``scale`` [1, 3, 1, 1], loaded from the weight file)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class ShiftTolerantAlexNet(nn.Module):
    """The shift-tolerant AlexNet trunk: [B, 3, H, W] -> (relu1 .. relu5), feature maps
    [B, 64, H1, W1], [B, 192, ...], [B, 384, ...], [B, 256, ...], [B, 256, ...].
    For a 64x64 input: 30x30, 15x15, 8x8, 8x8, 8x8."""

    def __init__(self):
        super().__init__()
        # Module names are the indices of the package's `features` Sequential, so the
        # state-dict keys match (net.slice1.0.weight, net.slice2.4.filt, ...).
        self.slice1 = nn.Sequential(OrderedDict([
            ("0", nn.Conv2d(3, 64, kernel_size=11, stride=1, padding=2)),
            ("1", BlurPool(64)),
            ("2", nn.ReLU()),
        ]))
        self.slice2 = nn.Sequential(OrderedDict([
            ("3", nn.MaxPool2d(kernel_size=3, stride=1)),
            ("4", BlurPool(64)),
            ("5", nn.Conv2d(64, 192, kernel_size=5, padding=2)),
            ("6", nn.ReLU()),
        ]))
        self.slice3 = nn.Sequential(OrderedDict([
            ("7", nn.MaxPool2d(kernel_size=3, stride=1)),
            ("8", BlurPool(192)),
            ("9", nn.Conv2d(192, 384, kernel_size=3, padding=1)),
            ("10", nn.ReLU()),
        ]))
        self.slice4 = nn.Sequential(OrderedDict([
            ("11", nn.Conv2d(384, 256, kernel_size=3, padding=1)),
            ("12", nn.ReLU()),
        ]))
        self.slice5 = nn.Sequential(OrderedDict([
            ("13", nn.Conv2d(256, 256, kernel_size=3, padding=1)),
            ("14", nn.ReLU()),
        ]))
        # The package's features[15:17] (MaxPool, BlurPool) come after relu5 and are unused.

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for s in (self.slice1, self.slice2, self.slice3, self.slice4, self.slice5):
            x = s(x)
            feats.append(x)
        return feats


class NetLinLayer(nn.Module):
    """1x1 convolution C -> 1 without bias: [B, C, H, W] -> [B, 1, H, W]. Index 0 is
    the package's Dropout (inactive in eval mode), kept as Identity for the key names."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(OrderedDict([
            ("0", nn.Identity()),
            ("1", nn.Conv2d(channels, 1, kernel_size=1, stride=1, padding=0, bias=False)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length over channels: f / (||f||_2 + eps). [B, C, H, W] -> [B, C, H, W].
    vector_norm's gradient at f == 0 is 0 (sqrt(sum(f**2)) would give NaN)."""
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """Shift-tolerant LPIPS distance (AlexNet trunk, linear calibration, v0.1 scaling).

    ``layers`` (1 to 5) is how many trunk layers the distance sums over: 5 is the
    published LPIPS; fewer layers give a cheaper perceptual term (the ``cpu64``
    preset uses relu1 .. relu3, which costs about half of the trunk at 64 px).

    Built untrained; use :func:`load_lpips` to get one with the verified weights. The
    module is frozen (no parameter requires grad) and always in eval mode
    (``train()`` is a no-op), but the distance is differentiable with respect to both
    inputs.
    """

    def __init__(self, layers: int = 5):
        super().__init__()
        if layers not in range(1, 6):
            raise ValueError(f"LPIPS: layers must be 1 to 5, got {layers}")
        self.layers = layers
        self.scaling_layer = ScalingLayer()
        self.net = ShiftTolerantAlexNet()
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (NetLinLayer(c) for c in CHANNELS)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        """No-op: the metric has no training mode (frozen, fixed weights)."""
        return self

    @property
    def lins(self) -> tuple[NetLinLayer, ...]:
        return (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)

    def used_state_dict(self) -> dict[str, torch.Tensor]:
        """The entries of ``state_dict()`` that a distance over ``layers`` layers reads:
        the scaling, trunk slices 1 .. layers and lin0 .. lin{layers - 1} (what a model
        bundle stores)."""
        keep = ("scaling_layer.",) + tuple(f"net.slice{k + 1}." for k in range(self.layers)) \
            + tuple(f"lin{k}." for k in range(self.layers))
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}

    def _prepare(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """[B, 1|3, H, W] in [-1, 1] -> [B, 1|3, H', W'] in the module's dtype, resized
        so that the shorter side is at least MIN_SIZE (not yet scaled)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS: {name} must be [B, 1, H, W] or [B, 3, H, W], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"LPIPS: {name} must be a floating-point tensor, got {x.dtype}")
        x = x.to(self.net.slice1[0].weight.dtype)
        h, w = x.shape[-2:]
        if min(h, w) < MIN_SIZE:
            # Same factor on both sides so that the shorter one becomes MIN_SIZE: the
            # trunk's reflect pads need a few pixels at relu3 (a 64 px side gives 8).
            s = MIN_SIZE / min(h, w)
            size = (max(MIN_SIZE, round(h * s)), max(MIN_SIZE, round(w * s)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def _conv1(self, x: torch.Tensor) -> torch.Tensor:
        """The first trunk convolution of the scaled RGB input, [B, 1|3, H, W] ->
        [B, 64, H - 6, W - 6].

        A grey image repeated to RGB is not copied into 3 channels: with s_c the
        scaling (x - shift_c) / scale_c and zero padding,
        conv(s(x)) = conv(x, sum_c W_c / scale_c) - conv(1, sum_c W_c shift_c / scale_c) + b,
        where the second term does not depend on x (one single-channel convolution of a
        ones image, shared by the batch). Exact up to rounding, 3x fewer multiplies.
        """
        conv = self.net.slice1[0]
        if x.shape[1] == 3:
            return conv(self.scaling_layer(x))
        shift, scale = self.scaling_layer.shift, self.scaling_layer.scale  # [1, 3, 1, 1]
        w_grey = (conv.weight / scale.reshape(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        w_const = (conv.weight * (shift / scale).reshape(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        const = F.conv2d(torch.ones_like(x[:1]), w_const, padding=conv.padding)  # [1, 64, h, w]
        return F.conv2d(x, w_grey, conv.bias, padding=conv.padding) - const

    def _trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        """relu1 .. relu_layers of a :meth:`_prepare`d input."""
        slices = (self.net.slice1, self.net.slice2, self.net.slice3, self.net.slice4,
                  self.net.slice5)
        h = self.net.slice1[2](self.net.slice1[1](self._conv1(x)))  # relu1
        feats = [h]
        for s in slices[1:self.layers]:
            h = s(h)
            feats.append(h)
        return feats

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Trunk features relu1 .. relu_layers of x (all five for the full LPIPS).

        x: float [B, 1, H, W] (grey, repeated to RGB) or [B, 3, H, W], values in
        [-1, 1]; sides under 64 px are resized up as in :meth:`forward`.
        Returns maps [B, C_k, H_k, W_k], C = (64, 192, 384, 256, 256)[:layers],
        unnormalised.
        """
        return self._trunk(self._prepare(x, "x"))

    def reference_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The unit-normalised features of a fixed image x, for :meth:`distance_to`
        (an inversion computes them once instead of at every step)."""
        return [_normalize(f) for f in self.features(x)]

    def distance_to(self, x_features: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """``forward(x, y)`` from ``reference_features(x)``: float [B]."""
        if len(x_features) != self.layers:
            raise ValueError(f"LPIPS: {len(x_features)} reference feature maps for "
                             f"{self.layers} layers")
        dist = y.new_zeros(y.shape[0], dtype=x_features[0].dtype)
        for fx, f, lin in zip(x_features, self.features(y), self.lins):
            dist = dist + lin((fx - _normalize(f)).square()).mean(dim=(1, 2, 3))  # [B]
        return dist

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance between x and y.

        x, y: float [B, 1, H, W] (grey; repeated to 3 channels) or [B, 3, H, W], same
        shape, values in [-1, 1] (the range LPIPS was calibrated for; not clipped).
        Both are cast to the module's dtype (float32 unless converted). Inputs with a
        side under 64 px are bilinearly resized (align_corners=False, one factor for
        both sides) so that the shorter side is 64 px: the trunk's reflect pads need it
        (a side of 64 px leaves 8 px at relu3-relu5). With ``layers`` < 5 the sum runs
        over relu1 .. relu_layers only.
        Returns float [B], >= 0, exactly 0 where x == y.
        """
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: x and y differ in shape: {list(x.shape)} vs {list(y.shape)}")
        # Two trunk passes, not one of the concatenated batch: backward then runs only
        # through the input that needs a gradient (the inversion's y), at half the cost.
        return self.distance_to(self.reference_features(x), y)


# ----------------------------------------------------------------------------- weights


def _sha256_b64(path: Path) -> str:
    """SHA-256 of the file, urlsafe base64 without padding (the wheel RECORD format)."""
    digest = bytes.fromhex(sha256_file(path))
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def installed_weights_path() -> Path:
    """Path of ``alex_shift_tolerant.pth`` in the installed stlpips-pytorch wheel,
    found through its metadata (the package is not imported). Raises UnavailableError
    when the distribution is missing or is not the one whose weights this module
    reproduces (its RECORD hash differs from the pinned one)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UnavailableError(
            f"the shift-tolerant LPIPS weights come with the {DISTRIBUTION} wheel, which is "
            f"not installed", hint=_INSTALL_HINT) from None
    entry = next((f for f in (dist.files or []) if f.as_posix() == WEIGHTS_IN_WHEEL), None)
    if entry is None:
        raise UnavailableError(
            f"{DISTRIBUTION} {dist.version} is installed but its file list has no "
            f"{WEIGHTS_IN_WHEEL}", hint=_INSTALL_HINT)
    if entry.hash is None or entry.hash.mode != "sha256" or entry.hash.value != WEIGHTS_SHA256:
        raise UnavailableError(
            f"{DISTRIBUTION} {dist.version} records a different {WEIGHTS_IN_WHEEL} "
            f"(sha256 {None if entry.hash is None else entry.hash.value}) than the "
            f"{DISTRIBUTION_VERSION} weights this network reproduces ({WEIGHTS_SHA256})",
            hint=_INSTALL_HINT)
    return Path(dist.locate_file(entry))


@functools.lru_cache(maxsize=4)
def _read_verified(path: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    """The verified state dict of ``path`` (cached per path, size and mtime; callers
    must not modify the tensors)."""
    del size, mtime_ns  # cache key only: a file replaced in place is read again
    p = Path(path)
    try:
        digest = _sha256_b64(p)
    except OSError as e:
        raise LpipsWeightsError(f"cannot read the LPIPS weight file {p}: {e.strerror or e}",
                                hint=_INSTALL_HINT) from None
    if digest != WEIGHTS_SHA256:
        raise LpipsWeightsError(
            f"the LPIPS weight file {p} is corrupt or not the expected file: its sha256 is "
            f"{digest}, {DISTRIBUTION} {DISTRIBUTION_VERSION} records {WEIGHTS_SHA256}",
            hint=f"reinstall it: pip install --force-reinstall {DISTRIBUTION}=={DISTRIBUTION_VERSION}")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise LpipsWeightsError(f"cannot load the LPIPS weight file {p}: {e}",
                                hint=_INSTALL_HINT) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LpipsWeightsError(f"the LPIPS weight file {p} is not a state dict of tensors")
    log.debug("LPIPS: read %d tensors from %s (sha256 verified)", len(sd), p)
    return dict(sd)


def load_lpips(*, device: str | torch.device = "cpu", weights_path: str | os.PathLike | None = None,
               layers: int = 5) -> LPIPS:
    """A new frozen :class:`LPIPS` on ``device`` with the shift-tolerant AlexNet weights.

    weights_path: the weight file; default the one in the installed stlpips-pytorch
        wheel (found through ``importlib.metadata``; the package is not imported).
        Either way the file's SHA-256 must equal the wheel RECORD's hash of
        ``alex_shift_tolerant.pth`` (pinned in :data:`WEIGHTS_SHA256`).

    layers: how many trunk layers the distance sums over (5, the full LPIPS; the
        ``cpu64`` preset uses 3, see :class:`LPIPS`).

    The verified tensors are cached per process (per path, size and mtime); each call
    builds a new module from them.
    Raises UnavailableError when the wheel is not installed (and no path is given), and
    LpipsWeightsError (an UnavailableError, exit 69) when the file is missing,
    unreadable, corrupt or not the expected one.
    """
    path = installed_weights_path() if weights_path is None else Path(weights_path)
    try:
        st = path.resolve().stat()
    except FileNotFoundError:
        raise LpipsWeightsError(f"the LPIPS weight file {path} does not exist",
                                hint=_INSTALL_HINT) from None
    except OSError as e:
        raise LpipsWeightsError(f"cannot read the LPIPS weight file {path}: {e.strerror or e}",
                                hint=_INSTALL_HINT) from None
    sd = _read_verified(str(path.resolve()), st.st_size, st.st_mtime_ns)
    model = LPIPS(layers)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise LpipsWeightsError(f"the LPIPS weight file {path} does not fit the network: "
                                f"{str(e).splitlines()[0]}") from None
    return model.to(device)
