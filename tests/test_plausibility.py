"""Plausibility flags of the measures: each check fires on a constructed case and stays
quiet on a plausible one (the phantom); the flags reach the Result's outputs:
run_report.json, measures.json (no NaN anywhere) and report.html's warning box."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deeprecon.runtime.measures import (FLAG_CODES, PLAUSIBLE_RANGES,
                                        clinical_measures, mid_ventricular_slices,
                                        plausibility_flags, study_measures)
from deeprecon.runtime.outputs import pictures, write_outputs
from deeprecon.runtime.phantom import make_phantom

KEYS = {"code", "source", "measure", "value", "range", "phase", "frame", "slices", "message"}


def _plausible() -> dict:
    """A plausible two-phase measures dict (ED 0, ES 1)."""
    return {"LVEDV (mL)": 150.0, "LVESV (mL)": 60.0, "LVSV (mL)": 90.0, "LVEF (%)": 60.0,
            "LVM (g)": 120.0, "RVEDV (mL)": 160.0, "RVESV (mL)": 70.0, "RVSV (mL)": 90.0,
            "RVEF (%)": 56.25, "ed_phase": 0, "es_phase": 1,
            "volume_curves_ml": {"LVC": [150.0, 60.0], "LVM": [114.3, 110.0],
                                 "RVC": [160.0, 70.0]}}


def _labels(phases: int = 2, slices: int = 9) -> np.ndarray:
    """Every structure on every slice at every phase."""
    lab = np.zeros((phases, slices, 12, 12), np.uint8)
    lab[..., 2:5, 2:5] = 1
    lab[..., 5:7, 2:5] = 2
    lab[..., 2:5, 7:10] = 3
    return lab


def _json_strict(obj) -> str:
    return json.dumps(obj, allow_nan=False)


def test_plausible_cases_raise_no_flag():
    assert plausibility_flags(_plausible(), labels=_labels()) == []
    ph = make_phantom(slices=10, phases=2, seed=0)          # an analytic, healthy heart
    assert plausibility_flags(study_measures(ph.study), labels=ph.study.labels) == []
    # one phase: the ES measures are NaN by definition and not flagged
    one = clinical_measures(ph.study.labels[:1], 1.0)
    assert math.isnan(one["LVEF (%)"])
    assert [f for f in plausibility_flags(one) if f["code"] == "non_finite"] == []


@pytest.mark.parametrize("measure,value", [
    ("LVEF (%)", 3.0), ("LVEF (%)", 95.0), ("RVEF (%)", 4.0), ("RVEF (%)", 92.0),
    ("LVEDV (mL)", 15.0), ("LVEDV (mL)", 700.0), ("RVEDV (mL)", 19.0), ("RVEDV (mL)", 650.0),
    ("LVM (g)", 10.0), ("LVM (g)", 450.0)])
def test_out_of_range(measure, value):
    m = _plausible()
    m[measure] = value
    flags = [f for f in plausibility_flags(m, source="hr", frame_ids=[1, 9])
             if f["code"] == "out_of_range"]
    assert len(flags) == 1
    f = flags[0]
    assert set(f) == KEYS
    assert (f["measure"], f["value"], f["source"]) == (measure, value, "hr")
    assert f["range"] == list(PLAUSIBLE_RANGES[measure])
    assert f["message"].startswith("hr: ") and measure.split(" (")[0] in f["message"]
    assert "\n" not in f["message"]
    # the edges of a range are plausible
    m[measure] = PLAUSIBLE_RANGES[measure][value > PLAUSIBLE_RANGES[measure][1]]
    assert [f for f in plausibility_flags(m) if f["code"] == "out_of_range"] == []


@pytest.mark.parametrize("side", ["LV", "RV"])
def test_esv_not_below_edv(side):
    m = _plausible()
    m[f"{side}ESV (mL)"] = m[f"{side}EDV (mL)"] + 5.0
    flags = [f for f in plausibility_flags(m, frame_ids=[1, 9])
             if f["code"] == "esv_not_below_edv"]
    assert len(flags) == 1
    assert flags[0]["measure"] == f"{side}ESV (mL)" and flags[0]["phase"] == 1
    assert flags[0]["frame"] == 9


def test_zero_rv_volume():
    m = _plausible()
    m["volume_curves_ml"]["RVC"] = [160.0, 0.0]
    m["RVESV (mL)"], m["RVSV (mL)"], m["RVEF (%)"] = 0.0, 160.0, 100.0
    flags = plausibility_flags(m, frame_ids=[1, 9])
    zero = [f for f in flags if f["code"] == "zero_rv_volume"]
    assert len(zero) == 1 and zero[0]["phase"] == 1 and zero[0]["value"] == 0.0
    assert "ES (frame 9)" in zero[0]["message"]
    assert {f["code"] for f in flags} == {"zero_rv_volume", "out_of_range"}   # RVEF 100 %


@pytest.mark.parametrize("structure,k", [("LVC", 1), ("LVM", 2), ("RVC", 3)])
def test_missing_on_mid_slice(structure, k):
    lab = _labels(slices=9)
    assert list(mid_ventricular_slices(9)) == [3, 4, 5]
    lab[1, 4][lab[1, 4] == k] = 0          # mid-ventricular: flagged
    lab[0, 0][lab[0, 0] == k] = 0          # the apex/base third: not flagged
    lab[1, 8][lab[1, 8] == k] = 0
    flags = plausibility_flags(_plausible(), labels=lab, frame_ids=[1, 9])
    assert len(flags) == 1
    f = flags[0]
    assert (f["code"], f["measure"], f["phase"], f["slices"], f["value"]) == \
        ("missing_on_mid_slice", structure, 1, [4], 1.0)
    assert "slice 4" in f["message"] and "frame 9" in f["message"]


def test_structure_on_the_crop_edge():
    """A structure on the model grid's outermost pixels may extend beyond the crop the
    model saw: flagged per structure and phase, with the slices; one pixel inside the
    edge is not."""
    lab = _labels(slices=4)
    assert plausibility_flags(_plausible(), model_labels=lab, field_of_view_mm=160.0) == []
    lab[1, 2, 3:6, 11] = 3                  # RV at ES on the right edge, slice 2
    lab[1, 3, 0, 4] = 3                     # and on the top edge, slice 3
    lab[0, 1, 3:6, 10] = 3                  # one pixel inside at ED: not flagged
    flags = plausibility_flags(_plausible(), model_labels=lab, field_of_view_mm=160.0,
                               frame_ids=[1, 9])
    assert len(flags) == 1
    f = flags[0]
    assert (f["code"], f["measure"], f["phase"], f["slices"], f["value"]) == \
        ("touches_crop_edge", "RVC", 1, [2, 3], 2.0)
    assert "RV cavity reaches the edge of the 160 mm crop" in f["message"]
    assert "slices 2, 3 at ES (frame 9)" in f["message"]
    lab[:, :, -1, :] = 2                    # the myocardium along the bottom everywhere
    codes = [(f["measure"], f["phase"]) for f in
             plausibility_flags(_plausible(), model_labels=lab[0], field_of_view_mm=192.0)]
    assert codes == [("LVM", 0)]           # [S, R, R]: one phase (ED, whose RV is inside)
    with pytest.raises(ValueError, match="field_of_view_mm"):
        plausibility_flags(_plausible(), model_labels=lab)
    with pytest.raises(ValueError, match="model_labels must be"):
        plausibility_flags(_plausible(), model_labels=lab[0, 0], field_of_view_mm=160.0)


def test_mid_ventricular_slices():
    assert list(mid_ventricular_slices(1)) == [0]
    assert list(mid_ventricular_slices(2)) == [0, 1]
    assert list(mid_ventricular_slices(3)) == [1]
    assert list(mid_ventricular_slices(10)) == [3, 4, 5, 6]


def test_non_finite_and_json_safe():
    m = _plausible()
    m["LVEDV (mL)"], m["LVEF (%)"], m["LVM (g)"] = 0.0, float("nan"), float("inf")
    flags = plausibility_flags(m)
    got = {(f["code"], f["measure"]) for f in flags}
    assert ("non_finite", "LVEF (%)") in got and ("non_finite", "LVM (g)") in got
    assert ("out_of_range", "LVEDV (mL)") in got
    assert all(f["code"] in FLAG_CODES for f in flags)
    assert all(f["value"] is None for f in flags if f["code"] == "non_finite")
    _json_strict(flags)                        # no NaN, no inf
    # an empty segmentation, measured for real
    empty = clinical_measures(np.zeros((2, 3, 4, 4), np.uint8), 1.0)
    codes = {f["code"] for f in plausibility_flags(empty, labels=np.zeros((2, 3, 4, 4)))}
    assert {"non_finite", "out_of_range", "zero_rv_volume", "missing_on_mid_slice"} <= codes
    _json_strict(plausibility_flags(empty))


def test_flags_reach_run_report_measures_json_and_report(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from PIL import Image
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_outputs import make_result

    def tiny(result, stage):                   # one tiny picture instead of the QC set
        (stage / "qc").mkdir()
        Image.new("L", (4, 4)).save(stage / "qc" / "tiny.png")
        return {"volume_curves": "qc/tiny.png"}

    monkeypatch.setattr(pictures, "write_pictures", tiny)
    result = make_result(evil=False)
    ids = [result.study.phase_ids[p] for p in result.phases]
    assert plausibility_flags(result.measures["native"], labels=result.labels) == []
    result.measures["native"]["LVEF (%)"] = 3.0
    result.measures["hr"]["LVM (g)"] = float("nan")
    result.plausibility = (
        plausibility_flags(result.measures["native"], labels=result.labels, frame_ids=ids)
        + plausibility_flags(result.measures["hr"], source="hr", frame_ids=ids))
    result.warnings = [f["message"] for f in result.plausibility]
    assert {(f["source"], f["code"], f["measure"]) for f in result.plausibility} == \
        {("native", "out_of_range", "LVEF (%)"), ("hr", "non_finite", "LVM (g)")}
    result.bundle = dict(result.bundle, provenance={
        "runs": {"seg": "/runs/seg"}, "command": "deeprecon-rt export /runs/seg -o b",
        "validation": {"dice_lvc": 0.91},
        "training": {"seg": {"config": {f"key{i}": i for i in range(100)},
                             "summary": {"val_dice": 0.88}}}})
    out = write_outputs(result, tmp_path / "case")

    no_nan = {"parse_constant": lambda c: pytest.fail(f"{c} in JSON")}
    rr = json.loads((out / "run_report.json").read_text(), **no_nan)
    assert [f["code"] for f in rr["plausibility"]] == ["out_of_range", "non_finite"]
    assert rr["plausibility"][0]["value"] == 3.0 and rr["plausibility"][0]["range"] == [5.0, 90.0]
    assert rr["plausibility"][1]["value"] is None
    assert result.plausibility[0]["message"] in rr["warnings"]
    assert rr["bundle"]["preset"] == "tiny" and rr["bundle"]["sha256"] == "ab" * 32
    mj = json.loads((out / "measures.json").read_text(), **no_nan)
    assert mj["flagged"] == {"native": {"LVEF (%)": ["out_of_range"]},
                             "hr": {"LVM (g)": ["non_finite"]}}
    assert mj["measures"]["hr"]["LVM (g)"] is None
    assert len(mj["plausibility"]) == 2

    page = (out / "report.html").read_text()
    box = page.index('<div class="alert"')
    assert box < page.index("<table><tr><th>measure</th>")    # above the measures table
    assert page.index('id="measures"') < box < page.index('id="inversion"')
    assert page.count("2 plausibility warnings") == 2     # header and box
    assert "native: LVEF 3.0 % is outside the plausible 5-90 %" in page
    assert '<td class="num flag"' in page and "&#9888; 3.0</td>" in page
    assert 'href="#measures"' in page                         # the header points to it
    # the model that ran: bundle name, preset, manifest hash, and its recorded provenance
    assert "preset tiny" in page and "ab" * 8 in page
    assert "<h3>Model provenance</h3>" in page
    assert "<th>runs: seg</th><td>/runs/seg</td>" in page
    assert "<th>validation: dice_lvc</th><td>0.91</td>" in page
    assert "<th>training: seg: summary</th><td>{&quot;val_dice&quot;: 0.88}</td>" in page
    assert "<th>training: seg: config</th><td><details>" in page   # long: folded

    # a plausible result: no warning box, a quiet line of the ranges
    ok = make_result(evil=False)
    out2 = write_outputs(ok, tmp_path / "ok")
    page2 = (out2 / "report.html").read_text()
    assert 'class="alert"' not in page2 and "Plausibility checks passed" in page2
    assert json.loads((out2 / "run_report.json").read_text())["plausibility"] == []
