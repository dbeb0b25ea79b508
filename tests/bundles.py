"""Tiny seeded model bundles for tests (imported by conftest.py and the bundle tests).

:func:`make_tiny_bundle` builds the four networks of the ``tiny`` preset (32 x 32 grid,
w+ [8, 32]) from a seeded random initialisation, with the generator's ``w_avg`` set to
the mean of its mapping network over seeded z (so it is not zero, as in a trained G),
and the real shift-tolerant LPIPS, and writes them with
:func:`deeprecon.export.bundle.build_bundle`. It takes a few seconds on a CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

from deeprecon.export.bundle import build_bundle
from deeprecon.trainer.config import get_preset
from deeprecon.trainer.lpips import load_lpips
from deeprecon.trainer.networks import Encoder, Generator, UNet

PRESET = "tiny"


def tiny_networks(*, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The seeded tiny-preset networks: ``encoder``, ``generator``, ``segmenter`` (eval,
    float32, CPU; the LPIPS is added by :func:`make_tiny_bundle`)."""
    model = get_preset(PRESET)
    torch.manual_seed(seed)
    G = Generator(model.generator).eval()
    E = Encoder(model.encoder).eval()
    S = UNet(model.unet).eval()
    with torch.no_grad():
        z = torch.randn(256, model.generator.z_dim, generator=torch.Generator().manual_seed(seed))
        G.mapping.w_avg.copy_(G.mapping(z)[:, 0].mean(dim=0))  # [w_dim]
        E.w_avg.copy_(G.mapping.w_avg)  # as the encoder stage does
    return {"encoder": E, "generator": G, "segmenter": S}


def make_tiny_bundle(out: Path, *, seed: int = 0, **inversion_overrides) -> Path:
    """Write a tiny-preset bundle of seeded random networks at ``out``; returns ``out``.
    ``inversion_overrides`` replace inversion defaults (``steps=5``, ...)."""
    nets = tiny_networks(seed=seed)
    return build_bundle(out, model=get_preset(PRESET), lpips=load_lpips(),
                        name=f"tiny-seed{seed}", inversion=inversion_overrides or None,
                        provenance={"runs": {}, "command": "tests/bundles.py make_tiny_bundle"},
                        **nets)


__all__ = ["PRESET", "tiny_networks", "make_tiny_bundle"]
