"""The reconstruct pipeline (Reconstructor) and motion adaptation with a tiny bundle:
shapes, geometry of the high-resolution volume, measures, the inversion's behaviour, and
the pieces (phase selection, latent interpolation, ROI, R_S) on their own."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeprecon.runtime.backends import InversionSettings
from deeprecon.runtime.errors import UnavailableError, UsageError
from deeprecon.runtime.measures import MEASURE_COLUMNS, clinical_measures, voxel_volume_ml
from deeprecon.runtime.motion import adapt_motion, adapted_codes, resample_slices
from deeprecon.runtime.phantom import make_phantom
from deeprecon.runtime.pipeline import (Reconstructor, default_interp, heart_roi, hr_geometry,
                                        hr_slice_weights, interpolate_codes, parse_phases)


# ----------------------------------------------------------------------------- pieces
def _phantom(**kw):
    kw = {"slices": 6, "phases": 2, "seed": 0, "matrix": (64, 72), "pixel_spacing_mm": 3.0, **kw}
    return make_phantom(**kw).study


def test_parse_phases():
    st = _phantom(phases=4)
    st.ed_phase, st.es_phase = 0, 2
    assert parse_phases(None, st) == (0, 2)
    assert parse_phases("all", st) == (0, 1, 2, 3)
    assert parse_phases("es, ed", st) == (0, 2)
    assert parse_phases("3,1", st) == (1, 3)
    assert parse_phases([2, 2, 0], st) == (0, 2)
    for bad in ("4", "x", "", "-1"):
        with pytest.raises(UsageError):
            parse_phases(bad, st)
    st.es_phase = None
    assert parse_phases(None, st) == (0, 1, 2, 3)  # ED/ES unknown -> every phase
    with pytest.raises(UsageError, match="which phase is ES"):
        parse_phases("ed,es", st)


def test_interpolate_codes_and_hr_geometry():
    w = np.arange(3 * 2, dtype=np.float32).reshape(3, 2) * 4
    hr = interpolate_codes(w, 4)
    assert hr.shape == (9, 2)
    np.testing.assert_allclose(hr[::4], w)                       # native slices kept
    np.testing.assert_allclose(hr[1], 0.75 * w[0] + 0.25 * w[1])
    np.testing.assert_allclose(interpolate_codes(w, 1), w)
    st = _phantom()
    g = st.geometry
    h = hr_geometry(g, 5)
    assert h.n_slices == (st.n_slices - 1) * 5 + 1
    np.testing.assert_allclose(h.origins[::5], g.origins, atol=1e-9)
    assert h.slice_spacing == pytest.approx(g.slice_spacing / 5)
    np.testing.assert_allclose(h.direction, g.direction)
    w8 = hr_slice_weights(4, 8)
    assert w8.sum() == pytest.approx(4 * 8)   # the same extent as 4 native slices
    assert default_interp(st, 1.5) == round(st.geometry.slice_spacing / 1.5)


def test_heart_roi_dilates_and_falls_back_to_a_disc():
    lab = np.zeros((2, 32, 32), np.uint8)
    lab[0, 14:18, 14:18] = 2
    valid = np.ones((2, 32, 32), bool)
    valid[:, :, :2] = False
    roi, fb = heart_roi(lab, valid, spacing_mm=2.0, dilation_mm=4.0, fallback_radius_mm=10.0)
    assert fb.tolist() == [False, True]
    assert roi[0, 12:20, 14:18].all() and not roi[0, 10, 16] and not roi[0, 16, 10]
    assert roi[1, 16, 16] == 1 and roi[1, 16, 21] == 1 and roi[1, 16, 22] == 0
    assert roi[:, :, :2].sum() == 0


def test_motion_equation():
    rng = np.random.default_rng(0)
    src_ed = rng.normal(size=(5, 3, 4)).astype(np.float32)
    tgt = rng.normal(size=(4, 7, 3, 4)).astype(np.float32)
    out = adapted_codes(src_ed, tgt, target_ed=1)
    assert out.shape == (4, 5, 3, 4)
    np.testing.assert_allclose(out[1], src_ed, atol=1e-6)   # at the target's ED: the source
    # the telescoped sum of the paper: w_S(i) = w_S(0) + sum_n R_S(w_T(n+1) - w_T(n))
    steps = [resample_slices(tgt[n + 1] - tgt[n], 5) for n in range(1, 3)]
    np.testing.assert_allclose(out[3], src_ed + steps[0] + steps[1], atol=1e-5)
    r = resample_slices(np.arange(7.0), 4)
    np.testing.assert_allclose(r, [0, 2, 4, 6])
    np.testing.assert_allclose(resample_slices(np.arange(3.0)[:, None], 5)[:, 0],
                               [0, 0.5, 1, 1.5, 2])


def test_inversion_settings_validate():
    s = InversionSettings.from_manifest({"steps": 7, "lr": 0.05, "future_knob": 1}, batch=3)
    assert (s.steps, s.lr, s.batch) == (7, 0.05, 3)
    with pytest.raises(UsageError):
        InversionSettings(steps=-1)
    with pytest.raises(UsageError):
        InversionSettings(ncc_window=4)
    with pytest.raises(UsageError, match="unknown inversion"):
        InversionSettings.from_manifest({}, nope=1)


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def rec(tiny_bundle):
    with Reconstructor(tiny_bundle, device="cpu") as r:
        yield r


def _check_result(res, study, interp):
    P = len(res.phases)
    S, (H, W) = study.n_slices, study.matrix
    R = res.model_images.shape[-1]
    assert res.labels.shape == (P, S, H, W) and res.labels.dtype == np.uint8
    assert res.model_recon.shape == (P, S, R, R)
    assert res.latents.shape[:2] == (P, S)
    S_hr = (S - 1) * interp + 1
    assert res.hr_images.shape == res.hr_labels.shape == (P, S_hr, R, R)
    assert np.isfinite(res.hr_images).all()
    # every interp-th high-resolution slice is a native slice's G(w*) and Seg(G(w*))
    np.testing.assert_array_equal(res.hr_images[:, ::interp], res.model_recon)
    np.testing.assert_array_equal(res.hr_labels[:, ::interp], res.model_labels)
    # geometry: directions from the study, slice spacing / interp, native slices in place
    g, h = study.geometry, res.hr_geometry
    np.testing.assert_allclose(h.direction, g.direction, atol=1e-9)
    assert h.slice_spacing == pytest.approx(g.slice_spacing / interp)
    assert h.pixel_spacing == (res.transform.spacing_mm,) * 2
    model_geo = res.transform.model_geometry(g)
    np.testing.assert_allclose(h.origins[::interp], model_geo.origins, atol=1e-6)
    # every native slice centre lies on the line of the hr origins, in order
    d = (h.origins - h.origins[0]) @ g.normal
    assert np.all(np.diff(d) > 0)
    # measures: recomputed from the arrays
    native = clinical_measures(res.labels, voxel_volume_ml(g), ed_phase=res.ed_index,
                               es_phase=res.es_index)
    for k in MEASURE_COLUMNS:
        np.testing.assert_allclose(res.measures["native"][k], native[k], equal_nan=True)
    hr = clinical_measures(res.hr_labels, voxel_volume_ml(h, slice_spacing=g.slice_spacing / interp),
                           ed_phase=res.ed_index, es_phase=res.es_index,
                           slice_weights=hr_slice_weights(S, interp))
    for k in MEASURE_COLUMNS:
        np.testing.assert_allclose(res.measures["hr"][k], hr[k], equal_nan=True)
    stages = list(res.timings)
    assert stages[:3] == ["load", "preprocess", "encode"]
    assert {"invert", "segment", "map_back", "interpolate", "measures"} <= set(stages)
    assert all(v >= 0 for v in res.timings.values())
    assert len(res.inversion["psnr"]) == P * S


def test_reconstruct_acdc_patient(rec, acdc_patient001):
    res = rec.reconstruct(acdc_patient001, steps=3, interp=2)
    from deeprecon.runtime.io import load_study
    study = load_study(acdc_patient001)
    assert res.phases == (study.ed_phase, study.es_phase)
    _check_result(res, study, 2)
    assert res.options["steps"] == 3 and res.bundle["sha256"] == rec.bundle.sha256
    assert max(res.inversion["steps"]) <= 3


def test_reconstruct_phantom_k0_and_progress(rec):
    st = _phantom()
    seen = []
    res = rec.reconstruct(st, steps=0, interp=3, phases="all",
                          progress=lambda stage, done, total: seen.append((stage, done, total)))
    _check_result(res, st, 3)
    assert "roi" not in res.timings            # no inversion, no ROI
    assert res.inversion["steps"] == [0] * (2 * st.n_slices)
    stages = {s for s, _, _ in seen}
    assert {"encode", "segment", "interpolate"} <= stages
    assert all(done <= total for _, done, total in seen)


def test_inversion_improves_and_stops_early(rec):
    st = _phantom(slices=4)
    res = rec.reconstruct(st, steps=12, interp=1, phases="ed", early_stop_patience=0)
    inv = res.inversion
    assert inv["steps"] == [12] * 4 and not any(inv["stopped_early"])
    assert all(b <= a + 1e-9 for a, b in zip(inv["loss_init"], inv["loss"]))
    assert np.mean(inv["loss"]) < np.mean(inv["loss_init"])
    # a huge tolerance: every image stops after `patience` steps without improvement
    res2 = rec.reconstruct(st, steps=12, interp=1, phases="ed", early_stop_patience=2,
                           early_stop_rel_tol=1e6)
    assert res2.inversion["steps"] == [3] * 4 and all(res2.inversion["stopped_early"])


def test_inversion_does_not_depend_on_the_batch(rec):
    st = _phantom(slices=4)
    a = rec.reconstruct(st, steps=4, interp=1, phases="all", batch=8)
    b = rec.reconstruct(st, steps=4, interp=1, phases="all", batch=3)
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-4)


def test_motion_adaptation_with_phantoms(rec):
    src = _phantom(seed=1, slices=6)
    tgt = _phantom(seed=2, slices=5, phases=3)
    tgt.ed_phase, tgt.es_phase = 0, 1
    res = adapt_motion(rec, src, tgt, steps=2, interp=2, target_phases="all")
    assert res.kind == "motion_adaptation"
    s, t = res.extra["source"], res.extra["target"]
    assert res.latents.shape[:2] == (3, src.n_slices)
    np.testing.assert_allclose(res.latents[t.ed_index], s.latents[s.ed_index], atol=1e-6)
    assert res.labels.shape == (3, src.n_slices) + src.matrix
    assert res.hr_labels.shape[1] == (src.n_slices - 1) * 2 + 1
    assert res.study.phase_ids == [t.study.phase_ids[p] for p in t.phases]
    assert len(res.measures["native"]["volume_curves_ml"]["LVC"]) == 3


def test_reconstructor_errors(tiny_bundle, monkeypatch):
    with pytest.raises(UsageError, match="unknown backend"):
        Reconstructor(tiny_bundle, backend="nope")
    with pytest.raises(UsageError, match="not part of this version"):
        Reconstructor(tiny_bundle, backend="tensorrt")
    for backend in ("auto", "torch", "onnxruntime"):
        with pytest.raises(UsageError, match="unknown device"):
            Reconstructor(tiny_bundle, backend=backend, device="gpu")
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(UnavailableError, match="cuda"):
            Reconstructor(tiny_bundle, device="cuda:0")
    from deeprecon.runtime import bundle as runtime_bundle

    monkeypatch.delenv("DEEPRECON_BUNDLE", raising=False)
    monkeypatch.setattr(runtime_bundle, "SHIPPED_BUNDLE", Path(tiny_bundle).parent / "none")
    with pytest.raises(UnavailableError, match="no reference bundle"):
        Reconstructor(None)


def test_reconstruct_keeps_each_structures_largest_part(rec):
    """By default each structure keeps its largest 3D part, in the native and the
    high-resolution labels, and the run records it; largest_component=False keeps the
    network's labels, which differ from the default's only where voxels became
    background."""
    from deeprecon.runtime.postprocess import keep_largest_component

    st = _phantom()
    raw = rec.reconstruct(st, steps=0, interp=2, largest_component=False)
    res = rec.reconstruct(st, steps=0, interp=2)
    assert raw.options["largest_component"] is None
    info = res.options["largest_component"]
    assert set(info) == {"bridge_mm", "removed_native", "removed_hr"}
    np.testing.assert_array_equal(
        res.labels, keep_largest_component(raw.labels, st.geometry.pixel_spacing)[0])
    np.testing.assert_allclose(
        info["removed_native"],
        keep_largest_component(raw.labels, st.geometry.pixel_spacing)[1], atol=1e-6)
    changed = res.hr_labels != raw.hr_labels
    assert (res.hr_labels[changed] == 0).all()
    np.testing.assert_array_equal(res.hr_labels[:, ::2], res.model_labels)
    assert "postprocess" in res.timings and "postprocess" not in raw.timings


def test_a_model_below_its_validation_bar_is_a_warning_and_in_the_report_header():
    """A bundle whose recorded validation says it is below the bar gives every result a
    warning with its Dice, and the HTML header shows it as a warning; a bundle that meets
    the bar shows its Dice without one, and a bundle with no validation record shows neither."""
    from deeprecon.runtime.outputs.html_report import _validation_html
    from deeprecon.runtime.pipeline import model_warnings

    val = {"dataset": "ACDC", "patients": 20, "dice": {"LVC": 0.81, "LVM": 0.66, "RVC": 0.47},
           "meets_bar": False, "bar": "within 0.03 of DirectSeg"}
    below = {"name": "ref", "provenance": {"validation": val}}
    (w,) = model_warnings(below)
    assert "ref" in w and "LVC 0.81 / LVM 0.66 / RVC 0.47" in w and "20 ACDC" in w
    assert "below the project's bar" in _validation_html(below) and 'class="warn"' in _validation_html(below)
    met = {"name": "ref", "provenance": {"validation": {**val, "meets_bar": True}}}
    assert model_warnings(met) == [] and "LVM 0.66" in _validation_html(met)
    assert "warn" not in _validation_html(met)
    for none in ({"name": "x", "provenance": {"runs": {}}}, {}):
        assert model_warnings(none) == [] and _validation_html(none) == ""
