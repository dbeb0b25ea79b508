"""The E2 evaluation (issue 14): deeprecon.runtime.evaluation's sampler, baselines and ROI
metrics against independent computations (hand counts, brute-force windows, the
phantom's own truth), and benchmarks/eval_recon.py's three protocols on a phantom with
the tiny bundle."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from deeprecon.runtime import evaluation as ev
from deeprecon.runtime.errors import UsageError
from deeprecon.runtime.metrics import evaluate_segmentation
from deeprecon.runtime.phantom import make_phantom
from deeprecon.runtime.pipeline import Reconstructor
from deeprecon.runtime.study import Geometry, volume_to_sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import eval_recon  # noqa: E402

# ITK's SWIG types warn on import under Python 3.11+ (nothing of ours)
pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig:DeprecationWarning")

# 5 slices 10 mm apart, 3 mm pixels, truth every 2.5 mm (N = 4): the heart from mid-LV up
SMALL = dict(slices=5, phases=2, matrix=(64, 64), pixel_spacing_mm=3.0, hr_spacing_mm=2.5,
             lax_matrix=(64, 64), lax_pixel_spacing_mm=3.0)


@pytest.fixture(scope="module")
def ph():
    return make_phantom(seed=0, **SMALL)


@pytest.fixture(scope="module")
def rec(tiny_bundle):
    with Reconstructor(tiny_bundle, backend="onnxruntime", device="cpu") as r:
        yield r


def _hand_dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def _grid(S=6, H=20, W=24, spacing=(2.0, 1.5), gap=5.0) -> Geometry:
    return Geometry(origins=np.array([[0.0, 0.0, gap * s] for s in range(S)]),
                    row_dir=[1, 0, 0], col_dir=[0, 1, 0], pixel_spacing=spacing)


# --------------------------------------------------------------------------- metrics
def test_a_label_volume_against_itself_and_a_known_shift(ph):
    vol = ph.truth.labels[0]
    assert ev.structure_dice(vol, vol) == {"LVC": 1.0, "LVM": 1.0, "RVC": 1.0}
    m = evaluate_segmentation(vol, vol, (2.5, 3.0, 3.0))
    assert all(m[s]["dice"] == 1.0 and m[s]["hd95_mm"] == 0.0 for s in ("LVC", "LVM", "RVC"))
    # a 10 x 12 x 14 box shifted by 3 voxels along its 14 side: Dice = (14 - 3) / 14
    box = np.zeros((20, 24, 30), np.uint8)
    box[4:14, 5:17, 6:20] = 1
    shifted = np.roll(box, 3, axis=2)
    assert ev.structure_dice(shifted, box)["LVC"] == pytest.approx(11 / 14)
    # the same shift made physically: the box's volume placed 3 columns (4.5 mm) further
    # along row_dir, sampled back onto the original grid
    g = _grid(S=20, H=24, W=30)
    moved = Geometry(origins=g.origins + 3 * 1.5 * g.row_dir, row_dir=g.row_dir,
                     col_dir=g.col_dir, pixel_spacing=g.pixel_spacing)
    lab, inside = ev.resample_labels(box, moved, g, (24, 30))
    np.testing.assert_array_equal(lab[inside], shifted[inside])
    assert ev.structure_dice(lab, box)["LVC"] == pytest.approx(11 / 14)
    assert not inside[:, :, :3].any() and inside[:, :, 3:].all()
    # a mask restricts the count; a structure absent from both is NaN
    mask = np.zeros_like(box, bool)
    mask[:, :, :13] = True
    assert ev.structure_dice(shifted, box, mask=mask)["LVC"] == pytest.approx(
        _hand_dice(shifted[mask] == 1, box[mask] == 1))
    assert math.isnan(ev.structure_dice(box, box)["RVC"])


def test_volume_coordinates_by_hand():
    g = _grid()
    pts = np.array([g.origins[2] + 3 * 2.0 * g.col_dir + 4 * 1.5 * g.row_dir,   # voxel (2, 3, 4)
                    (g.origins[1] + g.origins[2]) / 2 + 1.0 * g.row_dir,          # between 1 and 2
                    g.origins[5] + 1.0 * g.normal,                                # beyond the last
                    g.origins[0] - 0.76 * 2.0 * g.col_dir])                       # above row 0
    c, inside = ev.volume_coordinates(g, (20, 24), pts)
    np.testing.assert_allclose(c[:, 0], [2, 3, 4], atol=1e-12)
    np.testing.assert_allclose(c[:, 1], [1.5, 0, 1 / 1.5], atol=1e-12)
    assert inside.tolist() == [True, True, False, False]


def test_roi_psnr_and_ssim_against_hand_and_brute_force():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 32, 32))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), -1, 1)
    roi = np.zeros(x.shape, bool)
    roi[:, 8:20, 10:26] = True
    mse = [np.mean((x[i][roi[i]] - y[i][roi[i]]) ** 2) for i in range(2)]
    np.testing.assert_allclose(ev.roi_psnr(x, y, roi, data_range=2.0),
                               [10 * math.log10(4.0 / m) for m in mse], rtol=1e-12)
    assert np.isnan(ev.roi_psnr(x, y, np.zeros_like(roi), data_range=2.0)).all()
    np.testing.assert_allclose(ev.ssim_map(x, x, data_range=2.0), 1.0, atol=1e-12)
    # brute force at interior pixels: an explicit 11 x 11 Gaussian window (sigma 1.5)
    s = ev.ssim_map(x, y, data_range=2.0)
    r = np.arange(-5, 6)
    w1 = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w1, w1) / w1.sum() ** 2
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    for (i, j) in ((10, 12), (16, 20), (5, 26)):
        px, py = x[0, i - 5:i + 6, j - 5:j + 6], y[0, i - 5:i + 6, j - 5:j + 6]
        mx, my = (w * px).sum(), (w * py).sum()
        vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
        cxy = (w * (px - mx) * (py - my)).sum()
        want = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        assert s[0, i, j] == pytest.approx(want, abs=1e-10)
    got = ev.roi_ssim(x, y, roi, data_range=2.0)
    np.testing.assert_allclose(got, [s[i][roi[i]].mean() for i in range(2)], rtol=1e-12)


# --------------------------------------------------------------------------- sampler
def test_the_sampler_reproduces_the_phantoms_own_planes(ph):
    tr = ph.truth
    for p in range(2):   # a volume sampled at its own voxel centres is itself
        lab, inside = ev.resample_labels(tr.labels[p], tr.geometry, tr.geometry, tr.matrix)
        assert inside.all()
        np.testing.assert_array_equal(lab, tr.labels[p])
    for view, plane in ph.lax.items():
        for p in range(2):
            pts = ev.plane_points(plane.geometry, plane.labels.shape[1:])[0]
            lab, inside = ev.sample_labels(tr.labels[p], tr.geometry, pts)
            assert inside.mean() > 0.1, view
            d = ev.structure_dice(lab, plane.labels[p], mask=inside)
            assert d["LVC"] > 0.95, (view, p, d)
            assert d["LVM"] > 0.8, (view, p, d)      # a thin wall at 3 mm pixels
    # the SAX slices (centre-plane labels, no shift) are truth planes
    idx = np.rint(ph.truth_slice_index).astype(int)
    lab, _ = ev.resample_labels(tr.labels[1], tr.geometry, ph.study.geometry, ph.study.matrix)
    np.testing.assert_array_equal(lab, ph.study.labels[1])
    np.testing.assert_array_equal(ph.study.labels[1], tr.labels[1, idx])


def test_plane_transform_reproduces_the_pipelines_own_grid(ph, rec):
    res = rec.reconstruct(ph.study, steps=0, interp=2, phases="all")
    st = ph.study
    pt = ev.plane_transform(res.transform, st.geometry, res.model_geometry())
    np.testing.assert_allclose(pt.centres, res.transform.centres, atol=1e-9)
    np.testing.assert_allclose(pt.to_model(st.images), res.model_images, atol=1e-5)
    # an HR plane between slices 1 and 2 and the matching truth plane
    idx = np.rint(ph.truth_slice_index).astype(int)
    k = (idx[1] + idx[2]) // 2
    hr_k = 2 * 1 + 1
    truth_plane = ph.truth.geometry.subset([k])
    pt = ev.plane_transform(res.transform, truth_plane, res.hr_geometry.subset([hr_k]))
    np.testing.assert_allclose(np.asarray(pt.centres), np.asarray(res.transform.centres)[:1],
                               atol=1e-9)
    with pytest.raises(UsageError, match="off its native plane"):
        ev.plane_transform(res.transform, ph.truth.geometry.subset([k + 1]),
                           res.hr_geometry.subset([hr_k]))


# --------------------------------------------------------------------------- baselines
def test_nearest_slice_on_the_phantom_equals_a_hand_computation(ph):
    N = 4
    lab = ph.study.labels[0]
    got = ev.nearest_slices(lab, N)
    assert got.shape == ((lab.shape[0] - 1) * N + 1,) + lab.shape[1:]
    for k in range(got.shape[0]):
        s = k / N
        i = int(math.floor(s))
        pick = i if s - i <= 0.5 else i + 1       # midway: the lower slice
        np.testing.assert_array_equal(got[k], lab[pick])
    # against the truth between the first and last SAX centres, Dice by hand counts
    idx = np.rint(ph.truth_slice_index).astype(int)
    truth = ph.truth.labels[0, idx[0]:idx[-1] + 1]
    for c, name in ((1, "LVC"), (2, "LVM"), (3, "RVC")):
        want = _hand_dice(got == c, truth == c)
        assert ev.structure_dice(got, truth)[name] == pytest.approx(want, abs=1e-12)
    np.testing.assert_array_equal(got[::N], truth[::N])   # exact at the SAX planes
    assert ev.nearest_slices(lab, 2)[1].tolist() == lab[0].tolist()


def test_linear_and_shape_based_interpolation():
    a, b = np.full((1, 4, 5), 2.0), np.full((1, 4, 5), 6.0)
    out = ev.linear_slices(np.concatenate([a, b]), 4)
    np.testing.assert_allclose(out[:, 0, 0], [2, 3, 4, 5, 6])
    # discs of radius 6 and 12 px: the midway disc has radius about 9
    yy, xx = np.mgrid[:64, :64]
    disc = lambda r: ((yy - 32) ** 2 + (xx - 32) ** 2 <= r * r).astype(np.uint8)  # noqa: E731
    stack = np.stack([disc(6), disc(12)])
    out = ev.sdf_slices(stack, 2, spacing=(1.0, 1.0), structures=(1,))
    np.testing.assert_array_equal(out[0], stack[0])
    np.testing.assert_array_equal(out[2], stack[1])
    assert ev.structure_dice(out[1], disc(9), structures=(1,))["LVC"] > 0.97
    # present in one neighbour only: shrinks onto its centre, radius r (1 - f)
    stack = np.stack([disc(12), np.zeros((64, 64), np.uint8)])
    out = ev.sdf_slices(stack, 4, spacing=(1.0, 1.0), structures=(1,))
    for k, r in ((1, 9), (2, 6), (3, 3)):
        assert out[k].sum() == pytest.approx(np.pi * r * r, rel=0.15)
    assert not out[4].any()
    # nested structures keep their order: a ring around a cavity
    ring = disc(14) - disc(9)
    two = (disc(9) + 2 * ring).astype(np.uint8)
    out = ev.sdf_slices(np.stack([two, two]), 2, spacing=(1.5, 1.5))
    np.testing.assert_array_equal(out[1], two)


def test_morphological_contour_interpolation():
    pytest.importorskip("itk")
    ok, why = ev.mci_available()
    assert ok, why
    yy, xx = np.mgrid[:48, :48]
    disc = lambda r: ((yy - 24) ** 2 + (xx - 24) ** 2 <= r * r).astype(np.uint8)  # noqa: E731
    stack = np.stack([disc(8), disc(8), disc(14)])
    out = ev.mci_slices(stack, 4, structures=(1,))
    assert out.shape == (9, 48, 48)
    np.testing.assert_array_equal(out[::4], stack)            # known slices kept
    for k in (1, 2, 3):                                       # between equal discs: the disc
        assert ev.structure_dice(out[k], disc(8), structures=(1,))["LVC"] > 0.98
    areas = [int(out[k].sum()) for k in range(4, 9)]
    assert areas == sorted(areas) and areas[0] < areas[2] < areas[4]


def test_drop_every_other(ph):
    sub, kept, removed = ev.drop_every_other(ph.study)
    assert kept.tolist() == [0, 2, 4] and removed.tolist() == [1, 3]
    np.testing.assert_array_equal(sub.labels, ph.study.labels[:, kept])
    np.testing.assert_allclose(sub.geometry.origins, ph.study.geometry.origins[kept])
    six = make_phantom(**{**SMALL, "slices": 6}).study
    _, kept, removed = ev.drop_every_other(six)
    assert kept.tolist() == [0, 2, 4] and removed.tolist() == [1, 3]   # slice 5: neither
    with pytest.raises(UsageError, match="at least 3"):
        ev.drop_every_other(make_phantom(**{**SMALL, "slices": 2}).study)


# --------------------------------------------------------------------------- protocols
def test_phantom_and_lax_protocols_with_the_tiny_bundle(ph, rec):
    pics: dict = {"phantom": {}, "lax": {}}
    case = eval_recon.phantom_case(rec, ph, name="p0", steps=0, protocols=("phantom", "lax"),
                                   pictures=pics)
    assert case["interp"] == 4
    # the figures' arrays are the ones the metrics were computed on
    for m, lab in pics["phantom"]["labels"].items():
        assert pics["phantom"]["dice"][m]["LVC"] == pytest.approx(
            _hand_dice(lab == 1, pics["phantom"]["truth"] == 1), abs=1e-12)
    four = pics["lax"]["views"]["4ch"]
    first_4ch = next(v for v in case["lax"] if v["view"] == "4ch" and v["phase"] == 0)
    assert ev.structure_dice(four["labels"]["SDF (manual)"], four["ref"], mask=four["mask"]) \
        == pytest.approx(first_4ch["dice"]["SDF (manual)"], nan_ok=True)
    idx = np.rint(ph.truth_slice_index).astype(int)
    for p, row in enumerate(case["phantom"]):
        m = row["methods"]
        assert {"DeepRecon", "linear+Seg", "nearest (Seg)", "SDF (Seg)", "nearest (manual)",
                "SDF (manual)"} <= set(m)
        # nearest of the exact SAX labels, by hand, against the truth slab
        hand = ev.nearest_slices(ph.study.labels[p], 4)
        truth = ph.truth.labels[p, idx[0]:idx[-1] + 1]
        for c, s in ((1, "LVC"), (2, "LVM"), (3, "RVC")):
            assert m["nearest (manual)"][s]["dice"] == pytest.approx(
                _hand_dice(hand == c, truth == c), abs=1e-12)
            vox_ml = 2.5 * 3.0 * 3.0 / 1000
            assert m["nearest (manual)"][s]["truth_volume_ml"] == pytest.approx(
                np.sum(truth == c) * vox_ml)
            assert m["SDF (manual)"][s]["dice"] > 0.9      # interpolation of exact labels
        for meth in m.values():
            for s in ("LVC", "LVM", "RVC"):
                assert math.isnan(meth[s]["dice"]) or 0.0 <= meth[s]["dice"] <= 1.0
    assert {v["view"] for v in case["lax"]} == {"2ch", "3ch", "4ch"}
    for v in case["lax"]:
        assert v["mask_fraction"] > 0.1
        assert v["dice"]["truth"]["LVC"] > 0.95              # the sampler's ceiling
        assert v["dice"]["nearest (manual)"]["LVC"] > 0.85
    summary = eval_recon.summarise({"phantom": [case], "lax": [case]})
    assert summary["phantom"]["nearest (manual)"]["LVC"]["dice"]["n"] == 2
    assert summary["lax"]["truth"]["LVC 4ch"]["n"] == 2


def test_slice_drop_protocol_with_the_tiny_bundle(ph, rec, tmp_path):
    pic: dict = {}
    case = eval_recon.slice_drop_case(rec, ph.study, name="p0", steps=0, picture=pic)
    # the figure's arrays are the ones the Dice was computed on
    for m, lab in pic["labels"].items():
        assert ev.structure_dice(lab, ph.study.labels[0, [1, 3]]) == pytest.approx(
            case["phases"][0]["dice"][m], nan_ok=True)
    assert pic["render"].shape == pic["render_labels"].shape == pic["linear"].shape
    png = eval_recon.figure_slice_drop(pic, tmp_path / "sd.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert case["removed"] == [1, 3] and case["position_offset_mm"] < 1e-6
    assert case["images"]["crop_misalignment_px"] < 1e-6
    for p, row in enumerate(case["phases"]):
        ref = ph.study.labels[p, [1, 3]]
        below = ph.study.labels[p, [0, 2]]                   # nearest at midway: the lower
        for c, s in ((1, "LVC"), (2, "LVM"), (3, "RVC")):
            assert row["dice"]["nearest (manual)"][s] == pytest.approx(
                _hand_dice(below == c, ref == c), abs=1e-12)
        assert set(row["image_roi"]) == {"DeepRecon", "nearest", "linear"}
        assert all(math.isfinite(q["psnr"]) and -1 <= q["ssim"] <= 1
                   for q in row["image_roi"].values())
        assert row["image_roi"]["linear"]["psnr"] > row["image_roi"]["DeepRecon"]["psnr"]
    s = eval_recon.summarise({"slice-drop": [case]})
    assert s["slice-drop"]["nearest (manual)"]["LVC"]["n"] == 2
    assert s["slice-drop images"]["linear"]["psnr"]["n"] == 2


def _write_mnms2(ph, folder: Path, pid: str = "001") -> None:
    import SimpleITK as sitk

    st = ph.study
    g = st.geometry
    for name, arr in (("", st.images[0]), ("_gt", st.labels[0])):
        sitk.WriteImage(volume_to_sitk(arr, g), str(folder / f"{pid}_SA_ED{name}.nii.gz"))
    plane = ph.lax["4ch"]
    th = plane.geometry.slice_thickness
    for name, arr in (("", plane.images[:1]), ("_gt", plane.labels[:1])):
        sitk.WriteImage(volume_to_sitk(arr, plane.geometry, slice_spacing=th),
                        str(folder / f"{pid}_LA_ED{name}.nii.gz"))


def test_lax_on_a_real_layout_pair(ph, rec, tmp_path):
    (tmp_path / "001").mkdir()
    _write_mnms2(ph, tmp_path / "001")
    (tmp_path / "002").mkdir()   # no labels: not a pair
    _write_mnms2(ph, tmp_path / "002", pid="002")
    for f in (tmp_path / "002").glob("*_gt.nii.gz"):
        f.unlink()
    pairs = ev.find_sax_lax_pairs(tmp_path)
    assert [(p["id"], p["phase"]) for p in pairs] == [("001", "ED")]
    images, labels, geo = ev.load_lax_plane(pairs[0]["la"])
    np.testing.assert_array_equal(labels[0], ph.lax["4ch"].labels[0])
    np.testing.assert_allclose(geo.origins, ph.lax["4ch"].geometry.origins, atol=1e-4)
    np.testing.assert_allclose(geo.direction, ph.lax["4ch"].geometry.direction, atol=1e-5)
    case = eval_recon.pair_case(rec, pairs[0], steps=0, interp=4, baselines=("nearest", "sdf"))
    assert case["case"] == "001_ED" and len(case["lax"]) == 1
    d = case["lax"][0]["dice"]
    assert d["SDF (manual)"]["LVC"] > 0.85     # header geometry placed the plane right
    assert set(d) == {"DeepRecon", "nearest (Seg)", "SDF (Seg)", "nearest (manual)",
                      "SDF (manual)"}


def test_main_writes_json_markdown_and_figures(tiny_bundle, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    opts = [f"--phantom-option={k}={json.dumps(v)}" for k, v in SMALL.items()]
    eval_recon.main(["--bundle", str(tiny_bundle), "--protocol", "phantom", "lax",
                     "--phantoms", "1", "--steps", "0", "--baselines", "nearest", "linear",
                     "--out", str(out), "--md", str(md), "--figures", str(tmp_path / "fig"), *opts])
    for protocol in ("phantom", "lax"):
        png = tmp_path / "fig" / f"eval_recon_{protocol}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    r = json.loads(out.read_text())
    assert r["protocols"] == ["phantom", "lax"] and r["bundle_trained"] is False
    assert set(r["summary"]) == {"phantom", "lax"}
    assert r["cpu_s"] > 0 and r["config"]["steps"] == 0
    text = md.read_text()
    assert "Untrained bundle" in text and "tiny-random-seed0" in text
    assert "| DeepRecon |" in text and "| nearest (manual) |" in text


def test_slice_drop_on_acdc(acdc_root, rec):
    from deeprecon.runtime.io import load_study

    study = load_study(acdc_root / "patient001")
    case = eval_recon.slice_drop_case(rec, study, name="patient001", steps=0,
                                      baselines=("nearest", "sdf"))
    assert case["position_offset_mm"] < 0.01
    ref = study.labels[:, case["removed"]]
    below = study.labels[:, [r - 1 for r in case["removed"]]]
    for p, row in enumerate(case["phases"]):
        assert row["dice"]["nearest (manual)"]["LVC"] == pytest.approx(
            _hand_dice(below[p] == 1, ref[p] == 1), abs=1e-12)
        assert row["dice"]["SDF (manual)"]["LVC"] > 0.6
