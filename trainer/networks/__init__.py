"""The networks of the DeepRecon method, built from the frozen configs of
:mod:`deeprecon.trainer.config`:

- ``G``    :class:`Generator`      StyleGAN2, z -> w+ (mapping), w+ -> image (forward)
- ``D``    :class:`Discriminator`  StyleGAN2 residual D, image -> logit
- ``E``    :class:`Encoder`        pSp/e4e-style, image -> w+
- ``Seg``  :class:`UNet`           image -> class logits
- ``WSeg`` :class:`WSegNet`        w+ -> class logits

All are deterministic given ``torch.manual_seed`` and export with ``torch.export`` and
to ONNX (see :mod:`deeprecon.export.onnx`).
"""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .discriminator import Discriminator
from .encoder import Encoder
from .generator import Generator, MappingNetwork, SynthesisNetwork
from .unet import UNet
from .wseg import WSegNet


def build_networks(model_cfg: ModelConfig) -> dict[str, nn.Module]:
    """Every network of a preset, freshly initialised from the global torch RNG:
    keys "G", "D", "E", "Seg", "WSeg" (built in that order)."""
    return {"G": Generator(model_cfg.generator),
            "D": Discriminator(model_cfg.discriminator),
            "E": Encoder(model_cfg.encoder),
            "Seg": UNet(model_cfg.unet),
            "WSeg": WSegNet(model_cfg.wseg)}


def count_parameters(module: nn.Module) -> int:
    """The number of scalar parameters of ``module`` (buffers not counted)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["Generator", "MappingNetwork", "SynthesisNetwork", "Discriminator", "Encoder",
           "UNet", "WSegNet", "build_networks", "count_parameters"]
