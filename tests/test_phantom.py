"""The synthetic cine phantom: determinism, anatomy, geometry, truth/SAX/LAX consistency,
misalignment, and the files write_phantom produces."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from deeprecon.runtime.errors import UsageError
from deeprecon.runtime.metrics import dice
from deeprecon.runtime.phantom import (LAX_VIEWS, PhantomConfig, contraction, make_phantom,
                                       save_phantom_preview, write_phantom)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(matrix=(112, 128))   # the heart fits; keeps the tests fast


@pytest.fixture(scope="module")
def ph():
    return make_phantom(slices=10, phases=2, seed=0, **SMALL)


@pytest.fixture(scope="module")
def ph_cine():
    return make_phantom(slices=8, phases=12, seed=3, **SMALL)


def test_deterministic_and_seeded(ph):
    again = make_phantom(slices=10, phases=2, seed=0, **SMALL)
    assert np.array_equal(ph.study.images, again.study.images)
    assert np.array_equal(ph.study.labels, again.study.labels)
    assert np.array_equal(ph.truth.images, again.truth.images)
    for v in LAX_VIEWS:
        assert np.array_equal(ph.lax[v].images, again.lax[v].images)
    other = make_phantom(slices=10, phases=2, seed=1, **SMALL)
    assert not np.array_equal(ph.study.images, other.study.images)   # noise, texture
    assert np.array_equal(ph.study.labels, other.study.labels)       # same anatomy, no shift
    jit = make_phantom(slices=10, phases=2, seed=1, anatomy_jitter=0.08, **SMALL)
    assert not np.isclose(jit.volumes_ml["LVC"][0], ph.volumes_ml["LVC"][0])


def test_study_contents(ph):
    st = ph.study
    assert st.images.shape == (2, 10, 112, 128) and st.images.dtype == np.float32
    assert st.labels.dtype == np.uint8 and set(np.unique(st.labels)) == {0, 1, 2, 3}
    assert set(np.unique(ph.truth.labels)) == {0, 1, 2, 3}
    assert st.source_format == "phantom" and st.info["phantom"]["seed"] == 0
    assert (st.ed_phase, st.es_phase) == (0, 1)
    assert st.trigger_times.tolist() == pytest.approx([0.0, 350.0])
    # MR-like contrast: blood pools bright, myocardium dark
    blood = np.median(st.images[0][st.labels[0] == 1])
    myo = np.median(st.images[0][st.labels[0] == 2])
    assert blood > 2.5 * myo
    # realistic exact volumes and ejection fractions
    ex = ph.exact_measures()
    assert 55 <= ex["LVEF (%)"] <= 65 and 50 <= ex["RVEF (%)"] <= 65
    assert 110 <= ex["LVEDV (mL)"] <= 170 and 90 <= ex["LVM (g)"] <= 150
    assert ph.volumes_ml["LVM"][0] == pytest.approx(ph.volumes_ml["LVM"][1], rel=1e-9)


def test_volume_curve_and_phases(ph_cine):
    st = ph_cine.study
    lv = ph_cine.volumes_ml["LVC"]
    assert st.es_phase == int(np.argmin(lv)) and st.ed_phase == 0 == int(np.argmax(lv))
    assert np.allclose(np.diff(st.trigger_times), 1000.0 / 12)
    measured = (ph_cine.truth.labels == 1).sum(axis=(1, 2, 3))
    assert abs(int(np.argmin(measured)) - st.es_phase) <= 1
    assert contraction(0.0) == 0.0 and contraction(0.35) == pytest.approx(1.0)
    one = make_phantom(slices=3, phases=1, matrix=(96, 112))
    assert one.study.es_phase is None and one.study.n_phases == 1


def _touches(lab2d: np.ndarray, a: int, b: int) -> bool:
    """True if a pixel of label a has a 4-neighbour of label b (in-plane)."""
    A = lab2d == a
    B = lab2d == b
    return bool((A[1:] & B[:-1]).any() or (A[:-1] & B[1:]).any()
                or (A[:, 1:] & B[:, :-1]).any() or (A[:, :-1] & B[:, 1:]).any())


def test_myocardium_surrounds_lv_cavity(ph):
    for labels in (ph.study.labels, ph.truth.labels):
        n_with_lv = 0
        for p in range(labels.shape[0]):
            for s in range(labels.shape[1]):
                sl = labels[p, s]
                if (sl == 1).any():
                    n_with_lv += 1
                    assert not _touches(sl, 1, 0), (p, s)
                    assert not _touches(sl, 1, 3), (p, s)
        assert n_with_lv >= 8


def test_sax_geometry_oblique_right_handed(ph):
    g = ph.study.geometry
    D = g.direction
    assert np.allclose(D.T @ D, np.eye(3), atol=1e-12)
    assert np.linalg.det(D) == pytest.approx(1.0)
    assert np.abs(D).max() < 0.9                      # no axis is aligned with L, P or S
    assert np.allclose(g.slice_gaps, 10.0) and g.pixel_spacing == (1.5, 1.5)
    assert g.slice_thickness == 8.0
    # the truth: same in-plane grid and normal, 1.25 mm apart, covering the SAX slab
    t = ph.truth.geometry
    assert np.allclose(t.direction, D) and np.allclose(t.slice_gaps, 1.25)
    assert ph.truth.n_slices == 81
    idx = ph.truth_slice_index
    assert np.allclose(idx, np.round(idx))
    assert np.allclose(t.origins[np.round(idx).astype(int)], g.origins, atol=1e-9)


def test_truth_and_sax_agree_at_slice_centres(ph):
    idx = np.round(ph.truth_slice_index).astype(int)
    for k in (1, 2, 3):
        assert dice(ph.study.labels, ph.truth.labels[:, idx], k) > 0.95
    maj = make_phantom(slices=10, phases=2, seed=0, label_mode="majority", **SMALL)
    for k in (1, 2, 3):
        assert dice(maj.study.labels, maj.truth.labels[:, idx], k) > 0.95
    # thick-slice images are smoother than (but close to) the thin truth planes
    noiseless = make_phantom(slices=10, phases=2, seed=0, noise=0.0, **SMALL)
    a, b = noiseless.study.images, noiseless.truth.images[:, idx]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_breath_hold_shifts_move_slice_content():
    base = make_phantom(slices=6, phases=1, seed=4, matrix=(96, 112))
    sh = make_phantom(slices=6, phases=1, seed=4, shift_mm=3.0, matrix=(96, 112))
    assert not np.allclose(sh.shifts_mm, 0) and np.allclose(base.shifts_mm, 0)
    # the shift stream does not depend on the number of phases
    assert np.array_equal(sh.shifts_mm, make_phantom(slices=6, phases=3, seed=4, shift_mm=3.0,
                                                     matrix=(96, 112)).shifts_mm)
    assert np.array_equal(sh.truth.labels, base.truth.labels)   # the truth is not shifted
    dp = 1.5
    for s in range(6):
        m0 = base.study.labels[0, s] == 2
        m1 = sh.study.labels[0, s] == 2
        if m0.sum() < 20:
            continue
        c0 = np.argwhere(m0).mean(axis=0)
        c1 = np.argwhere(m1).mean(axis=0)
        # recorded (down, right) in mm = centroid displacement in (row, col) pixels
        assert np.allclose((c1 - c0) * dp, sh.shifts_mm[s], atol=0.75 * dp)


def test_lax_planes(ph):
    sax_normal = ph.study.geometry.normal
    for v in LAX_VIEWS:
        plane = ph.lax[v]
        assert plane.images.shape == (2, 160, 160) and plane.labels.shape == (2, 160, 160)
        assert plane.images.dtype == np.float32 and plane.labels.dtype == np.uint8
        g = plane.geometry
        assert abs(g.normal @ sax_normal) < 1e-9         # the plane contains the long axis
        assert np.allclose(g.col_dir, sax_normal)        # apex at the top, base at the bottom
        assert (plane.labels == 1).any() and (plane.labels == 2).any()
    assert (ph.lax["4ch"].labels == 3).sum() > 200
    assert (ph.lax["2ch"].labels == 3).sum() < 0.05 * (ph.lax["2ch"].labels == 1).sum()


def test_lax_labels_match_truth_on_the_physical_grid(ph):
    """Sample the HR truth (nearest voxel) at the 4ch plane's pixel positions."""
    plane, truth = ph.lax["4ch"], ph.truth
    g, tg = plane.geometry, truth.geometry
    h, w = plane.labels.shape[1:]
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pts = (g.origins[0] + (jj[..., None] * g.pixel_spacing[1]) * g.row_dir
           + (ii[..., None] * g.pixel_spacing[0]) * g.col_dir)           # [h, w, 3] LPS
    rel = pts - tg.origins[0]
    s = np.rint(rel @ tg.normal / 1.25).astype(int)
    i = np.rint(rel @ tg.col_dir / tg.pixel_spacing[0]).astype(int)
    j = np.rint(rel @ tg.row_dir / tg.pixel_spacing[1]).astype(int)
    inside = (s >= 0) & (s < truth.n_slices) & (i >= 0) & (i < truth.matrix[0]) & (j >= 0) & (j < truth.matrix[1])
    assert inside.sum() > 2000
    for p in range(2):
        sampled = truth.labels[p][s[inside], i[inside], j[inside]]
        lax = plane.labels[p][inside]
        heart = (sampled > 0) | (lax > 0)
        assert (sampled[heart] == lax[heart]).mean() > 0.9
        for k in (1, 2, 3):
            assert dice(sampled, lax, k) > 0.85


def test_invalid_configuration():
    with pytest.raises(UsageError):
        make_phantom(slices=0)
    with pytest.raises(UsageError):
        make_phantom(slice_count=3)
    with pytest.raises(UsageError):
        make_phantom(hr_spacing_mm=20.0)
    with pytest.raises(UsageError):
        PhantomConfig(thickness_samples=4)


def test_write_phantom_files(tmp_path, ph):
    files = write_phantom(ph, tmp_path / "out", preview=True)
    expected = {"sax", "sax_gt", "hr_image", "hr_labels", "json", "preview"} | {
        f"lax_{v}{sfx}" for v in LAX_VIEWS for sfx in ("", "_gt")}
    assert set(files) == expected
    for p in files.values():
        assert Path(p).is_file() and Path(p).stat().st_size > 0
    st = ph.study
    g = st.geometry
    sax = sitk.ReadImage(files["sax"])
    gt = sitk.ReadImage(files["sax_gt"])
    assert sax.GetSize() == (128, 112, 10, 2) and gt.GetSize() == sax.GetSize()
    assert sax.GetSpacing() == pytest.approx((1.5, 1.5, 10.0, 350.0), abs=1e-4)
    assert np.allclose(sax.GetOrigin()[:3], g.origins[0], atol=1e-3)
    D4 = np.asarray(sax.GetDirection()).reshape(4, 4)
    assert np.allclose(D4[:3, :3], g.direction, atol=1e-5)
    assert gt.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(gt), st.labels)
    assert np.allclose(sitk.GetArrayFromImage(sax), st.images)
    hr = sitk.ReadImage(files["hr_labels"])
    assert hr.GetSize() == (128, 112, 81, 2)
    assert hr.GetSpacing()[2:] == pytest.approx((1.25, 350.0))
    assert np.allclose(hr.GetOrigin()[:3], ph.truth.geometry.origins[0], atol=1e-3)
    for v in LAX_VIEWS:
        img = sitk.ReadImage(files[f"lax_{v}"])
        assert img.GetSize() == (160, 160, 1, 2)
        lg = ph.lax[v].geometry
        assert np.allclose(np.asarray(img.GetDirection()).reshape(4, 4)[:3, :3], lg.direction, atol=1e-5)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(files[f"lax_{v}_gt"]))[:, 0],
                              ph.lax[v].labels)
    meta = json.loads(Path(files["json"]).read_text())
    assert meta["seed"] == 0 and meta["ed_phase"] == 0 and meta["es_phase"] == 1
    assert meta["exact_volumes_ml"]["LVC"] == pytest.approx(ph.volumes_ml["LVC"].tolist())
    assert meta["phase_interval_ms"] == 350.0 and meta["config"]["matrix"] == [112, 128]
    assert PhantomConfig(**meta["config"]) == ph.config        # the JSON regenerates the phantom
    assert set(meta["files"]) == set(files)
    assert all((tmp_path / "out" / rel).is_file() for rel in meta["files"].values())
    assert Path(files["preview"]).stat().st_size < 300_000


def test_written_phantom_loads_with_the_study_loader(tmp_path, ph):
    from deeprecon.runtime import io   # in-tree: an import error fails, never skips
    files = write_phantom(ph, tmp_path / "out")
    st = io.load_study(files["sax"])
    assert st.images.shape == ph.study.images.shape
    assert np.array_equal(st.labels, ph.study.labels)
    assert np.allclose(st.geometry.origins, ph.study.geometry.origins, atol=1e-3)
    assert np.allclose(st.trigger_times, ph.study.trigger_times)


def test_preview_and_docs_picture(tmp_path, ph):
    out = save_phantom_preview(ph, tmp_path / "p.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000
    doc = REPO / "docs" / "phantom.png"
    assert doc.is_file() and doc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc.stat().st_size < 300_000
