"""The E3 motion-transfer evaluation (issue 14 s.2): benchmarks/eval_motion.py on phantom
pairs with the tiny bundle, its numbers against hand computations from the adapted
labels, the pair selection, and adapt_reconstructions against adapt_motion."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deeprecon.runtime.measures import voxel_volume_ml
from deeprecon.runtime.motion import adapt_motion, adapt_reconstructions
from deeprecon.runtime.phantom import make_phantom
from deeprecon.runtime.pipeline import Reconstructor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import eval_motion  # noqa: E402

SMALL = dict(slices=5, matrix=(64, 64), pixel_spacing_mm=3.0, anatomy_jitter=0.15)


@pytest.fixture(scope="module")
def rec(tiny_bundle):
    with Reconstructor(tiny_bundle, backend="onnxruntime", device="cpu") as r:
        yield r


def test_adapt_reconstructions_is_adapt_motion(rec):
    src = make_phantom(seed=1, phases=2, **SMALL).study
    tgt = make_phantom(seed=2, phases=3, **SMALL).study
    a = adapt_motion(rec, src, tgt, steps=0, interp=2, target_phases="all")
    b = adapt_reconstructions(rec, rec.reconstruct(src, steps=0, interp=2),
                              rec.reconstruct(tgt, steps=0, interp=2, phases="all"))
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.hr_labels, b.hr_labels)
    assert a.measures["native"]["LVEF (%)"] == b.measures["native"]["LVEF (%)"] or (
        math.isnan(a.measures["native"]["LVEF (%)"]) and math.isnan(b.measures["native"]["LVEF (%)"]))


def test_pair_metrics_against_the_adapted_labels(rec):
    s_ph = make_phantom(seed=3, phases=2, **SMALL)
    t_ph = make_phantom(seed=4, phases=4, **SMALL)
    src = eval_motion.Subject(rec, s_ph.study, name="s", group="A", steps=0, interp=2,
                              exact=s_ph.exact_measures())
    tgt = eval_motion.Subject(rec, t_ph.study, name="t", group="B", steps=0, interp=2,
                              exact=t_ph.exact_measures())
    p = eval_motion.pair_metrics(rec, src, tgt)
    ad = adapt_reconstructions(rec, src.result, tgt.result)
    # the adapted LV volumes by hand: voxel count x voxel volume on the source's grid
    vv = voxel_volume_ml(s_ph.study.geometry)
    lv = (ad.labels == 1).sum(axis=(1, 2, 3)) * vv
    ed, es = tgt.result.ed_index, tgt.result.es_index
    assert p["adapted"]["curve"] == pytest.approx(lv.tolist())
    assert p["adapted"]["EDV"] == pytest.approx(lv[ed])
    ef = (lv[ed] - lv[es]) / lv[ed] * 100 if lv[ed] > 0 else float("nan")
    assert (math.isnan(ef) and math.isnan(p["adapted"]["EF"])) or p["adapted"]["EF"] == pytest.approx(ef)
    # the manual references: the phantoms' own SAX labels, by hand
    t_lv = (t_ph.study.labels == 1).sum(axis=(1, 2, 3)) * voxel_volume_ml(t_ph.study.geometry)
    t_ef = (t_lv[0] - t_lv[t_ph.study.es_phase]) / t_lv[0] * 100
    assert p["target_manual"]["EF"] == pytest.approx(t_ef)
    s_edv = (s_ph.study.labels[0] == 1).sum() * vv
    assert p["source_manual"]["EDV"] == pytest.approx(s_edv)
    if not math.isnan(ef):
        assert p["errors"]["ef_vs_target_manual"] == pytest.approx(abs(ef - t_ef))
    assert p["errors"]["edv_vs_source_manual"] == pytest.approx(abs(lv[ed] - s_edv))
    # at the target's ED the adapted codes are the source's: the same EDV, by construction
    assert p["errors"]["edv_vs_source_recon"] == 0.0
    assert p["exact"]["target_EF"] == pytest.approx(t_ph.exact_measures()["LVEF (%)"])
    assert len(p["target_phase_fractions"]) == 4 and p["target_phase_fractions"][0] == 0.0
    if p["adapted"]["EDV"] == 0:
        assert "empty_lv" in p["failure_codes"]
    s = eval_motion.summarise([p, p])
    assert s["pairs"] == 2 and s["edv_vs_source_recon"]["mean"] == 0.0
    assert s["failure_reasons"] == {c: 2 for c in p["failure_codes"]}


def test_pair_selection():
    groups = {"p1": "DCM", "p2": "DCM", "p3": "NOR", "p4": "HCM", "p5": "NOR"}
    assert eval_motion.round_robin(list(groups), groups) == ["p1", "p4", "p3", "p2", "p5"]
    subj = [SimpleNamespace(name=n, group=groups[n]) for n in ("p1", "p2", "p3")]
    pairs = [(a.name, b.name) for a, b in eval_motion.pairs_of(subj, None)]
    assert pairs == [("p1", "p3"), ("p2", "p3"), ("p3", "p1"), ("p3", "p2")]
    one = [SimpleNamespace(name=n, group="NOR") for n in ("a", "b")]
    assert [(a.name, b.name) for a, b in eval_motion.pairs_of(one, 1)] == [("a", "b")]


def test_main_writes_json_markdown_and_the_curves(tiny_bundle, tmp_path):
    out, md, png = tmp_path / "m.json", tmp_path / "m.md", tmp_path / "m.png"
    opts = [f"--phantom-option={k}={json.dumps(v)}" for k, v in SMALL.items() if k != "anatomy_jitter"]
    eval_motion.main(["--bundle", str(tiny_bundle), "--max-patients", "0", "--phantom-pairs", "2",
                      "--phantom-phases", "3", "--steps", "0", "--interp", "2", "--out", str(out),
                      "--md", str(md), "--figure", str(png), *opts])
    r = json.loads(out.read_text())
    assert list(r["pairs"]) == ["phantom"] and len(r["pairs"]["phantom"]) == 2
    assert r["summary"]["phantom"]["pairs"] == 2 and r["bundle_trained"] is False
    assert r["cpu_s"] > 0
    text = md.read_text()
    assert "Untrained bundle" in text and "phantom100 (phantom) -> phantom101 (phantom)" in text
    assert png.stat().st_size > 1000


def test_acdc_pairs(acdc_root, rec):
    groups = {p: "x" for p in ("patient001", "patient061")}
    subjects = eval_motion.acdc_subjects(rec, acdc_root, list(groups), steps=0, interp=2)
    assert [s.group for s in subjects] == ["DCM", "NOR"]
    pairs = eval_motion.pairs_of(subjects, None)
    res = [eval_motion.pair_metrics(rec, s, t) for s, t in pairs]
    assert [(p["source"], p["target"]) for p in res] == [("patient001", "patient061"),
                                                         ("patient061", "patient001")]
    by_name = {s.name: s.study for s in subjects}
    for p in res:
        assert p["errors"]["edv_vs_source_recon"] == 0.0
        assert 5 < p["target_manual"]["EF"] < 90   # ACDC's manual labels
        st = by_name[p["target"]]                  # ES's place in the cycle: frames / NbFrame
        es = (st.info["es_frame"] - st.info["ed_frame"]) / st.info["nb_frames"]
        assert p["target_phase_fractions"] == pytest.approx([0.0, es], abs=1e-4)
