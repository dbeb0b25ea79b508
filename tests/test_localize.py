"""Model-free heart localisation: synthetic pulsating discs and 3 ACDC patients (all 80:
benchmarks/acdc_preprocessing.py)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from deeprecon.runtime.errors import UsageError
from deeprecon.runtime.localize import HeartLocation, locate_heart, middle_slices
from deeprecon.runtime.preprocess import PreprocessConfig, prepare
from deeprecon.runtime.study import Geometry, Study

log = logging.getLogger(__name__)

ACDC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "acdc" / "training"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import acdc_preprocessing as acdc_checks  # noqa: E402  (the whole-data version of these checks)

# patient001, and the hardest of the 80 in benchmarks/results/acdc_preprocessing.json:
# patient047 (largest localisation distance, 25.5 mm), patient085 (lowest round-trip
# Dice, LVM 0.967)
ACDC_TEST_PATIENTS = ("patient001", "patient047", "patient085")


def _three_patients() -> list[Path]:
    folders = [f for f in acdc_checks.acdc_patients(ACDC) if f.name in ACDC_TEST_PATIENTS]
    if not folders:
        pytest.skip(f"shared ACDC data not found at {ACDC} (it is not redistributed)")
    assert len(folders) == len(ACDC_TEST_PATIENTS), folders
    return folders


def _geometry(S, spacing, *, row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 1.0, 0.0),
              origin=(0.0, 0.0, 0.0), gap=8.0):
    row_dir = np.asarray(row_dir, float)
    col_dir = np.asarray(col_dir, float)
    n = np.cross(row_dir, col_dir)
    return Geometry(origins=[np.asarray(origin) + s * gap * n for s in range(S)],
                    row_dir=row_dir, col_dir=col_dir, pixel_spacing=spacing)


def _phantom(P, S, H, W, centre, *, spacing=(1.4, 1.4), seed=0, static_bright=True):
    """A bright disc (blood pool, radius 12-20 mm pulsating with phase) in a darker ring
    (myocardium), on a textured background with a static bright band (fat) and noise."""
    rng = np.random.default_rng(seed)
    ii, jj = np.indices((H, W))
    r_mm = np.hypot((ii - centre[0]) * spacing[0], (jj - centre[1]) * spacing[1])
    bg = 60.0 + 25.0 * ndimage.gaussian_filter(rng.normal(size=(H, W)), 4) / 0.05
    if static_bright:
        bg[(ii > H * 0.8) & (jj > W * 0.1)] = 260.0          # static bright band, no motion
    imgs = np.empty((P, S, H, W), np.float32)
    for p in range(P):
        radius = 16.0 + 4.0 * np.cos(2 * np.pi * p / max(P, 1))
        for s in range(S):
            x = bg.copy()
            x[r_mm < radius + 9.0] = 70.0                      # myocardium
            x[r_mm < radius] = 240.0                           # blood
            imgs[p, s] = x + rng.normal(0, 8.0, size=(H, W))
    return imgs


def _err_mm(loc, centre, spacing):
    return float(np.hypot((loc.centre_rc[0] - centre[0]) * spacing[0],
                          (loc.centre_rc[1] - centre[1]) * spacing[1]))


@pytest.mark.parametrize("P", [2, 25])
def test_finds_a_pulsating_disc(P):
    S, H, W = 7, 150, 170
    centre = (62.0, 101.0)
    study = Study(images=_phantom(P, S, H, W, centre), geometry=_geometry(S, (1.4, 1.4)))
    loc = locate_heart(study)
    assert loc.method == "temporal-variance"
    # within 5 mm (the smoothing and the centre prior pull the peak by a few mm)
    assert _err_mm(loc, centre, (1.4, 1.4)) < 5.0, loc
    assert loc.score > 2.0 and loc.blob_area_mm2 > 0
    assert loc.slices == tuple(middle_slices(S, 0.5))


def test_single_phase_uses_the_bright_blob_method():
    S, H, W = 5, 140, 140
    centre = (80.0, 55.0)
    study = Study(images=_phantom(1, S, H, W, centre, static_bright=False),
                  geometry=_geometry(S, (1.5, 1.5)))
    loc = locate_heart(study)
    assert loc.method == "bright-blob"
    assert _err_mm(loc, centre, (1.5, 1.5)) < 5.0, loc
    with pytest.raises(UsageError, match="2 phases"):
        locate_heart(study, method="temporal-variance")


def test_motion_beats_a_static_bright_region():
    """The static bright band is brighter than the pool; only motion points at the heart."""
    S, H, W = 5, 150, 150
    centre = (50.0, 60.0)
    imgs = _phantom(2, S, H, W, centre)
    imgs[:, :, 95:125, 60:110] = 400.0  # big static bright blob, nearer the image centre
    study = Study(images=imgs, geometry=_geometry(S, (1.5, 1.5)))
    loc = locate_heart(study)
    assert _err_mm(loc, centre, (1.5, 1.5)) < 8.0, loc
    assert _err_mm(loc, (110.0, 85.0), (1.5, 1.5)) > 60.0, loc


def test_lps_point_and_serialisation():
    S, H, W = 6, 120, 130
    centre = (70.0, 52.0)
    g = _geometry(S, (1.3, 1.2), row_dir=(0.0, 1.0, 0.0), col_dir=(0.6, 0.0, -0.8),
                  origin=(-40.0, 15.0, 60.0))
    study = Study(images=_phantom(3, S, H, W, centre, spacing=(1.3, 1.2)), geometry=g)
    loc = locate_heart(study)
    i, j = loc.centre_rc
    want = g.origins.mean(axis=0) + j * 1.2 * g.row_dir + i * 1.3 * g.col_dir
    np.testing.assert_allclose(loc.point_lps, want, atol=1e-9)
    back = HeartLocation.from_dict(json.loads(json.dumps(loc.to_dict())))
    assert back == loc
    # prepare uses the LPS point: every slice's crop centre is the located one
    _, t = prepare(study, PreprocessConfig(size=32), centre=loc)
    np.testing.assert_allclose(np.asarray(t.centres), np.tile([i, j], (S, 1)), atol=1e-9)


@pytest.mark.parametrize("kw", [dict(method="deep"), dict(slice_fraction=0),
                                dict(smoothing_mm=-1), dict(prior_sigma_mm=0),
                                dict(brightness_power=-1), dict(blob_fraction=1.0),
                                dict(blob_sigmas_mm=(30, 10))])
def test_rejects_bad_knobs(kw):
    study = Study(images=_phantom(2, 3, 60, 60, (30, 30)), geometry=_geometry(3, (1.5, 1.5)))
    with pytest.raises(UsageError):
        locate_heart(study, **kw)


def test_middle_slices():
    assert middle_slices(10, 0.5).tolist() == [2, 3, 4, 5, 6]
    assert middle_slices(1, 0.5).tolist() == [0]
    assert middle_slices(7, 1.0).tolist() == list(range(7))


def test_acdc_localisation(record_property):
    """On 3 shared ACDC patients (benchmarks/acdc_preprocessing.py runs all 80 with the
    same function and bars): distance from the located centre to the centroid of the
    labelled heart, and whether the default 192 mm crop around it contains every
    labelled pixel."""
    summary = acdc_checks.localisation(_three_patients())
    record_property("acdc_localisation", json.dumps(summary))
    log.info("ACDC heart localisation: %s", summary)
    assert summary["failed"] == [], summary