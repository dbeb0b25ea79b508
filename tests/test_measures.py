"""Clinical measures: the formulas by hand on tiny arrays, the voxel volume from the
geometry, and agreement with the phantom's exact analytic volumes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deeprecon.runtime.errors import InvalidStudyError, UsageError
from deeprecon.runtime.measures import (MEASURE_COLUMNS, clinical_measures, plausibility_flags,
                                        study_measures,
                                        volume_curves_ml, voxel_volume_ml)
from deeprecon.runtime.phantom import make_phantom
from deeprecon.runtime.study import Geometry


def _tiny() -> np.ndarray:
    """[3, 2, 4, 4] labels: LV cavity 6, 10, 4 voxels; myocardium 5 at phase 1; RV 8, 9, 3."""
    lab = np.zeros((3, 2, 4, 4), np.uint8)
    for p, (lv, myo, rv) in enumerate([(6, 4, 8), (10, 5, 9), (4, 6, 3)]):
        flat = lab[p].reshape(-1)
        flat[:lv] = 1
        flat[lv:lv + myo] = 2
        flat[lv + myo:lv + myo + rv] = 3
    return lab


def test_measures_by_hand():
    vv = 2.0  # mL per voxel
    m = clinical_measures(_tiny(), vv)
    # ED = largest LV (phase 1, not 0), ES = smallest LV (phase 2)
    assert (m["ed_phase"], m["es_phase"]) == (1, 2)
    assert m["LVEDV (mL)"] == 20.0 and m["LVESV (mL)"] == 8.0
    assert m["LVSV (mL)"] == 12.0
    assert m["LVEF (%)"] == pytest.approx(60.0)
    assert m["LVM (g)"] == pytest.approx(5 * 2.0 * 1.05)
    assert m["RVEDV (mL)"] == 18.0 and m["RVESV (mL)"] == 6.0 and m["RVSV (mL)"] == 12.0
    assert m["RVEF (%)"] == pytest.approx(100.0 * 12.0 / 18.0)
    assert m["volume_curves_ml"]["LVC"] == [12.0, 20.0, 8.0]
    assert all(k in m for k in MEASURE_COLUMNS)


def test_measures_given_phases_single_phase_and_output():
    lab = _tiny()
    m = clinical_measures(lab, 1.0, ed_phase=0, es_phase=2)   # ukbb: frame 0 is ED
    assert m["LVEDV (mL)"] == 6.0 and m["LVEF (%)"] == pytest.approx(100 * 2 / 6)
    assert m["LVM (g)"] == pytest.approx(4 * 1.05) and m["ed_es_from"] == "given"
    one = clinical_measures(lab[1], 1.0)                       # [S, H, W]: one phase
    assert one["ed_phase"] == 0 and one["es_phase"] is None
    assert one["LVEDV (mL)"] == 10.0 and math.isnan(one["LVEF (%)"])
    assert "not named ED or ES" in one["ed_es_from"] and "ED columns" in one["ed_es_from"]
    # one phase the input names ES: ES volumes only, nothing called EDV or LVM
    es = clinical_measures(lab[1], 1.0, es_phase=0)
    assert (es["ed_phase"], es["es_phase"]) == (None, 0) and es["LVESV (mL)"] == 10.0
    assert all(math.isnan(es[k]) for k in ("LVEDV (mL)", "LVM (g)", "LVEF (%)", "RVEDV (mL)"))
    assert "named ES" in es["ed_es_from"]
    assert [f for f in plausibility_flags(es) if f["code"] == "non_finite"] == []
    co = clinical_measures(lab, 1.0, rr_interval_ms=800.0)
    assert co["LVCO (L/min)"] == pytest.approx(6.0 * 75.0 / 1000.0)
    empty = clinical_measures(np.zeros((2, 1, 2, 2), np.uint8), 1.0)
    assert math.isnan(empty["LVEF (%)"])
    with pytest.raises(UsageError):
        clinical_measures(lab, 1.0, es_phase=3)
    with pytest.raises(UsageError):
        clinical_measures(lab, 0.0)


def test_voxel_volume_from_geometry():
    g = Geometry(origins=np.array([[0, 0, 0], [0, 0, 8.0], [0, 0, 16.0]]), row_dir=[1, 0, 0],
                 col_dir=[0, 1, 0], pixel_spacing=(1.25, 1.5), slice_thickness=6.0)
    assert voxel_volume_ml(g) == pytest.approx(1.25 * 1.5 * 8.0 / 1000)   # spacing, not thickness
    assert voxel_volume_ml(g, slice_spacing=1.0) == pytest.approx(1.25 * 1.5 / 1000)
    single = g.subset([0])
    assert voxel_volume_ml(single) == pytest.approx(1.25 * 1.5 * 6.0 / 1000)
    import dataclasses
    with pytest.raises(InvalidStudyError):
        voxel_volume_ml(dataclasses.replace(single, slice_thickness=None))
    curves = volume_curves_ml(_tiny(), voxel_volume_ml(g))
    assert curves["RVC"][0] == pytest.approx(8 * 1.25 * 1.5 * 8.0 / 1000)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(slices=10, phases=8, seed=0, matrix=(112, 128))


def test_measures_agree_with_phantom_exact_volumes(phantom):
    exact = phantom.exact_measures()
    native = study_measures(phantom.study)        # 8 mm slices every 10 mm
    hr = study_measures(phantom.truth)            # 1.25 mm truth
    assert native["ed_phase"] == 0 and native["es_phase"] == phantom.study.es_phase
    for key in ("LVEDV (mL)", "LVESV (mL)", "LVM (g)", "RVEDV (mL)", "RVESV (mL)"):
        assert native[key] == pytest.approx(exact[key], rel=0.06), key
        assert hr[key] == pytest.approx(exact[key], rel=0.03), key
    for key in ("LVEF (%)", "RVEF (%)"):
        assert native[key] == pytest.approx(exact[key], abs=3.0), key
        assert hr[key] == pytest.approx(exact[key], abs=1.5), key
    # trigger times are regular: the RR interval is recovered for the cardiac output
    assert native["heart_rate_bpm"] == pytest.approx(60.0)
    # without the study's phases, ED/ES come from the LV volume curve
    auto = study_measures(phantom.truth, use_study_phases=False)
    assert auto["ed_phase"] == int(np.argmax(hr["volume_curves_ml"]["LVC"]))
    assert auto["es_phase"] == int(np.argmin(hr["volume_curves_ml"]["LVC"]))
