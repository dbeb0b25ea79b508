"""Network configurations and the model presets (frozen dataclasses, JSON-serialised).

A preset fixes the model grid (crop size and pixel spacing of the foundation's
preprocessing) and the shape of every network trained on it:

- ``tiny``:     32 x 32 at 6 mm, a few thousand parameters per network: the test suite
                trains every stage on the CPU in seconds.
- ``small128``: 128 x 128 at 1.5 mm, w_dim 256: a model that trains on one GPU in hours.
- ``base128``:  128 x 128 at 1.5 mm, w_dim 512: the StyleGAN2 widths of the paper.
- ``cpu64``:    64 x 64 at 2.5 mm, w_dim 128, narrow widths: the reference model, sized
                for 2-core CPUs (an inversion step for 20 images costs a few GFLOP;
                the measurements behind the choice are in docs/models.md).
- ``cpu64w``:   ``cpu64`` with a 1.5x wider generator (24 channels at 64 px instead of
                16) paid for by a cheaper perceptual term (LPIPS over relu1-relu2):
                the step stays within the same 30 GFLOP budget. The candidate for when
                ``cpu64``'s generator is what limits the reconstruction.

``CPU_PRESETS`` names the presets sized for CPUs: the training stages give them the same
schedules.

Channel widths follow StyleGAN2: the width at resolution r is
``min(channel_base // r, channel_max)``.

This module imports no torch: the CLI and the bundle manifest read configs without it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

from deeprecon.runtime.errors import UsageError
from deeprecon.runtime.preprocess import PreprocessConfig

N_CLASSES = 4  # 0 background, 1 LVC, 2 LVM, 3 RVC (the project's label convention)

T = TypeVar("T")


def _check_resolution(resolution: int) -> None:
    if resolution < 8 or resolution & (resolution - 1):
        raise UsageError(f"resolution must be a power of two >= 8, got {resolution}")


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    """StyleGAN2's width at resolution ``res``."""
    return max(1, min(channel_base // res, channel_max))


@dataclass(frozen=True)
class GeneratorConfig:
    """StyleGAN2 generator: mapping network z -> w, synthesis w+ [num_ws, w_dim] -> image.

    No noise inputs (deterministic rendering, which inversion and export need).
    ``architecture`` is the output structure: "skip" (toRGB skips, the StyleGAN2
    default for G) or "resnet".
    """

    resolution: int = 128
    img_channels: int = 1
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    mapping_lr_mul: float = 0.01
    channel_base: int = 16384
    channel_max: int = 512
    architecture: str = "skip"

    def __post_init__(self):
        _check_resolution(self.resolution)
        if self.architecture not in ("skip", "resnet"):
            raise UsageError(f"generator architecture must be 'skip' or 'resnet', "
                             f"got {self.architecture!r}")

    @property
    def num_ws(self) -> int:
        """L, the number of style vectors in w+: two per resolution from 4 x 4 on."""
        return 2 * int(math.log2(self.resolution)) - 2


@dataclass(frozen=True)
class DiscriminatorConfig:
    """StyleGAN2 residual discriminator with a minibatch-standard-deviation layer."""

    resolution: int = 128
    img_channels: int = 1
    channel_base: int = 16384
    channel_max: int = 512
    mbstd_group: int = 4

    def __post_init__(self):
        _check_resolution(self.resolution)


@dataclass(frozen=True)
class EncoderConfig:
    """pSp/e4e-style encoder: a feature pyramid mapped to the num_ws style vectors,
    predicted as offsets from G's average latent."""

    resolution: int = 128
    img_channels: int = 1
    num_ws: int = 12
    w_dim: int = 512
    channel_base: int = 8192
    channel_max: int = 256

    def __post_init__(self):
        _check_resolution(self.resolution)


@dataclass(frozen=True)
class UNetConfig:
    """2D U-Net: ``depth`` poolings, ``base_channels`` doubling per level (capped)."""

    resolution: int = 128
    in_channels: int = 1
    n_classes: int = N_CLASSES
    base_channels: int = 32
    max_channels: int = 256
    depth: int = 4

    def __post_init__(self):
        _check_resolution(self.resolution)
        if self.resolution >> self.depth < 2:
            raise UsageError(f"U-Net depth {self.depth} is too deep for {self.resolution} px")


@dataclass(frozen=True)
class WSegConfig:
    """W+SegNet: a synthesis network of its own driven by w+ whose output is the
    ``n_classes`` logits of the mask instead of the image."""

    resolution: int = 128
    num_ws: int = 12
    w_dim: int = 512
    n_classes: int = N_CLASSES
    channel_base: int = 8192
    channel_max: int = 256

    def __post_init__(self):
        _check_resolution(self.resolution)


@dataclass(frozen=True)
class ModelConfig:
    """A preset: the model grid, every network's shape, and the depth of the LPIPS
    term (``lpips_layers``: relu1 .. relu_k of the shift-tolerant AlexNet; 5 is the
    published LPIPS) that every stage and the bundle's inversion share."""

    name: str
    preprocess: PreprocessConfig
    generator: GeneratorConfig
    discriminator: DiscriminatorConfig
    encoder: EncoderConfig
    unet: UNetConfig
    wseg: WSegConfig
    lpips_layers: int = 5

    def __post_init__(self):
        if self.lpips_layers not in range(1, 6):
            raise UsageError(f"preset {self.name!r}: lpips_layers must be 1 to 5, "
                             f"got {self.lpips_layers}")
        r = self.preprocess.size
        for part in (self.generator, self.discriminator, self.encoder, self.unet, self.wseg):
            if part.resolution != r:
                raise UsageError(f"preset {self.name!r}: {type(part).__name__} resolution "
                                 f"{part.resolution} differs from the model grid {r}")
        g = self.generator
        for part in (self.encoder, self.wseg):
            if (part.num_ws, part.w_dim) != (g.num_ws, g.w_dim):
                raise UsageError(f"preset {self.name!r}: {type(part).__name__} w+ shape "
                                 f"{(part.num_ws, part.w_dim)} differs from G's "
                                 f"{(g.num_ws, g.w_dim)}")

    @property
    def resolution(self) -> int:
        return self.preprocess.size

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        return cls(name=d.pop("name"),
                   preprocess=PreprocessConfig.from_dict(d.pop("preprocess")),
                   generator=from_dict(GeneratorConfig, d.pop("generator")),
                   discriminator=from_dict(DiscriminatorConfig, d.pop("discriminator")),
                   encoder=from_dict(EncoderConfig, d.pop("encoder")),
                   unet=from_dict(UNetConfig, d.pop("unet")),
                   wseg=from_dict(WSegConfig, d.pop("wseg")),
                   **_no_unknown(cls, d))


def _preset(name: str, *, size: int, spacing_mm: float, z_dim: int, w_dim: int,
            mapping_layers: int, g_base: int, g_max: int, d_base: int, d_max: int,
            e_base: int, e_max: int, unet_base: int, unet_max: int, unet_depth: int,
            s_base: int, s_max: int, lpips_layers: int = 5) -> ModelConfig:
    g = GeneratorConfig(resolution=size, z_dim=z_dim, w_dim=w_dim,
                        mapping_layers=mapping_layers, channel_base=g_base, channel_max=g_max)
    return ModelConfig(
        name=name,
        preprocess=PreprocessConfig(size=size, spacing_mm=spacing_mm),
        generator=g,
        discriminator=DiscriminatorConfig(resolution=size, channel_base=d_base,
                                          channel_max=d_max),
        encoder=EncoderConfig(resolution=size, num_ws=g.num_ws, w_dim=w_dim,
                              channel_base=e_base, channel_max=e_max),
        unet=UNetConfig(resolution=size, base_channels=unet_base, max_channels=unet_max,
                        depth=unet_depth),
        wseg=WSegConfig(resolution=size, num_ws=g.num_ws, w_dim=w_dim,
                        channel_base=s_base, channel_max=s_max),
        lpips_layers=lpips_layers,
    )


_CPU64 = dict(size=64, spacing_mm=2.5, z_dim=128, w_dim=128, mapping_layers=2,
              d_base=1024, d_max=128, e_base=1024, e_max=64, unet_base=32, unet_max=256,
              unet_depth=4, s_base=1024, s_max=64)

PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset("tiny", size=32, spacing_mm=6.0, z_dim=32, w_dim=32, mapping_layers=2,
                    g_base=256, g_max=16, d_base=256, d_max=16, e_base=256, e_max=16,
                    unet_base=8, unet_max=32, unet_depth=3, s_base=128, s_max=8),
    "small128": _preset("small128", size=128, spacing_mm=1.5, z_dim=256, w_dim=256,
                        mapping_layers=4, g_base=8192, g_max=256, d_base=8192, d_max=256,
                        e_base=4096, e_max=128, unet_base=32, unet_max=256, unet_depth=4,
                        s_base=4096, s_max=128),
    "base128": _preset("base128", size=128, spacing_mm=1.5, z_dim=512, w_dim=512,
                       mapping_layers=8, g_base=16384, g_max=512, d_base=16384, d_max=512,
                       e_base=8192, e_max=256, unet_base=32, unet_max=512, unet_depth=4,
                       s_base=8192, s_max=256),
    "cpu64": _preset("cpu64", g_base=1024, g_max=128, lpips_layers=3, **_CPU64),
    "cpu64w": _preset("cpu64w", g_base=1536, g_max=128, lpips_layers=2, **_CPU64),
}

CPU_PRESETS = ("cpu64", "cpu64w")


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; UsageError naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}", hint=f"known: {', '.join(PRESETS)}") from None


# ----------------------------------------------------------------------------- JSON

def to_dict(obj: Any) -> Any:
    """A frozen config (nested) as JSON-serialisable data."""
    if hasattr(obj, "to_dict") and not isinstance(obj, ModelConfig):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _no_unknown(cls, d: Mapping[str, Any]) -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise UsageError(f"unknown {cls.__name__} fields {sorted(unknown)}",
                         hint=f"known: {sorted(known)}")
    return dict(d)


def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """A flat frozen dataclass from :func:`to_dict`'s output (lists back to tuples);
    unknown fields are refused."""
    kw = _no_unknown(cls, d)
    for f in dataclasses.fields(cls):
        if f.name in kw and isinstance(kw[f.name], list):
            kw[f.name] = tuple(kw[f.name])
    return cls(**kw)


def replace(cfg: T, **overrides: Any) -> T:
    """``dataclasses.replace`` with a clear error for an unknown field."""
    _no_unknown(type(cfg), overrides)
    return dataclasses.replace(cfg, **overrides)


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(to_dict(data), indent=2, sort_keys=True) + "\n")


__all__ = ["N_CLASSES", "GeneratorConfig", "DiscriminatorConfig", "EncoderConfig",
           "UNetConfig", "WSegConfig", "ModelConfig", "PRESETS", "get_preset",
           "channels_at", "to_dict", "from_dict", "replace", "write_json"]
