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
