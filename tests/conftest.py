"""Shared fixtures: where the shared ACDC data lives, and skipping when it is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACDC = REPO.parent / "shared" / "data" / "acdc" / "training"


@pytest.fixture(scope="session")
def acdc_root() -> Path:
    """The ACDC training folder (../shared/data/acdc/training); skips the test if absent."""
    if not ACDC.is_dir():
        pytest.skip(f"shared ACDC data not found at {ACDC} (it is not redistributed with the project)")
    return ACDC


@pytest.fixture(scope="session")
def acdc_patient001(acdc_root) -> Path:
    return acdc_root / "patient001"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny-preset model bundle of seeded random networks and the real LPIPS
    (tests/bundles.py: make_tiny_bundle(seed=0)), built once per session (~10 s)."""
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from bundles import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle") / "bundle")
