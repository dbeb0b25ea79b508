"""Tiny seeded model bundles for tests (imported by conftest.py and the bundle tests).

:func:`make_tiny_bundle` writes :func:`deeprecon.export.bundle.random_bundle` of the
``tiny`` preset (32 x 32 grid, w+ [8, 32]): seeded untrained networks and the real
shift-tolerant LPIPS. It takes a few seconds on a CPU.
"""
from __future__ import annotations

from pathlib import Path

from deeprecon.export.bundle import random_bundle, random_networks

PRESET = "tiny"
COMMAND = "tests/bundles.py make_tiny_bundle"


def tiny_networks(*, seed: int = 0):
    """The seeded tiny-preset networks: ``encoder``, ``generator``, ``segmenter``."""
    return random_networks(PRESET, seed=seed)


def make_tiny_bundle(out: Path, *, seed: int = 0, **inversion_overrides) -> Path:
    """Write a tiny-preset bundle of seeded random networks at ``out``; returns ``out``.
    ``inversion_overrides`` replace inversion defaults (``steps=5``, ...)."""
    return random_bundle(out, preset=PRESET, seed=seed, inversion=inversion_overrides or None,
                         command=COMMAND)


__all__ = ["PRESET", "tiny_networks", "make_tiny_bundle"]
