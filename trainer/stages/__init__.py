"""The training stages, one module and one config each, in the order they run::

    gan        G and D (StyleGAN2 + adaptive augmentation)      needs --data
    encoder    E: image -> w+, G frozen                          needs --data, --gan
    latents    the latent bank by hybrid inversion               needs --data, --gan, --encoder
    seg        U-Net on G(w*) of the bank, real labels           needs --latents
    seg-direct the same U-Net on real images (DirectSeg)         needs --data
    wseg       W+SegNet: w* -> mask                              needs --latents

Every stage module has ``Config`` (frozen; ``Config.for_preset(name)``), ``NEEDS``
(the upstream runs it reads) and ``run(ctx, cfg) -> dict``.
"""
from __future__ import annotations

import importlib

STAGES = {
    "gan": "gan",
    "encoder": "encoder",
    "latents": "latents",
    "seg": "seg",
    "seg-direct": "seg",
    "wseg": "wseg",
}


def stage_module(name: str):
    """The module implementing stage ``name``."""
    return importlib.import_module(f"{__name__}.{STAGES[name]}")
