"""NIfTI and ACDC loaders: geometry, phases, label remapping, dispatch, broken inputs."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from deeprecon.runtime.errors import InvalidStudyError, NoInputError, UsageError
from deeprecon.runtime.io import (AmbiguousInputError, LabelError, NoImagesError,
                                  NonFiniteError, is_acdc_folder, load_acdc, load_nifti,
                                  load_study, validate_study)
from deeprecon.runtime.study import ACDC_TO_PROJECT

REPO = Path(__file__).resolve().parents[1]
ACDC = REPO.parent / "shared" / "data" / "acdc" / "training"

sitk.ProcessObject_SetGlobalWarningDisplay(False)


@pytest.fixture(scope="module")
def acdc() -> Path:
    if not ACDC.is_dir():
        pytest.skip(f"shared ACDC data not found at {ACDC} (it is not redistributed)")
    return ACDC


def expect(exc_type, fn, *phrases, code: int):
    with pytest.raises(exc_type) as ei:
        fn()
    assert int(ei.value.exit_code) == code, (ei.value.exit_code, str(ei.value))
    for ph in phrases:
        assert ph.lower() in str(ei.value).lower(), f"{ph!r} not in: {ei.value}"
    return ei.value


def _sitk_array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --------------------------------------------------------------------------- ACDC
def test_acdc_patient001(acdc):
    st = load_study(acdc / "patient001")
    assert st.source_format == "acdc"
    assert st.images.shape == (2, 10, 256, 216) and st.images.dtype == np.float32
    assert st.labels is not None and st.labels.dtype == np.uint8
    assert st.geometry.pixel_spacing == (1.5625, 1.5625)
    assert st.geometry.slice_spacing == pytest.approx(10.0)
    np.testing.assert_allclose(st.geometry.slice_gaps, 10.0)
    np.testing.assert_allclose(st.geometry.origins[:, :2], 0.0)
    np.testing.assert_allclose(st.geometry.direction, np.eye(3))
    assert st.phase_ids == [1, 12] and (st.ed_phase, st.es_phase) == (0, 1)
    assert np.all(np.isnan(st.trigger_times))
    assert st.info == {"patient": "patient001", "group": "DCM", "height_cm": 184.0,
                       "weight_kg": 95.0, "nb_frames": 30, "ed_frame": 1, "es_frame": 12}
    # exact voxels and the remap 1 RV -> 3, 2 MYO -> 2, 3 LV -> 1
    raw = _sitk_array(acdc / "patient001" / "patient001_frame12.nii.gz")
    assert np.array_equal(st.images[1], raw.astype(np.float32))
    gt = _sitk_array(acdc / "patient001" / "patient001_frame12_gt.nii.gz")
    assert np.array_equal(st.labels[1][gt == 3], np.ones(int((gt == 3).sum()), np.uint8))
    assert np.array_equal(st.labels[1][gt == 1], np.full(int((gt == 1).sum()), 3, np.uint8))
    assert np.array_equal(st.labels[1], ACDC_TO_PROJECT[gt])
    d = st.describe()
    assert (d["phases"], d["slices"], d["slice_gap_mm"]) == (2, 10, 10.0)
    assert d["pixel_spacing_mm"] == [1.5625, 1.5625]
    assert d["warnings"] == []


def test_to_sitk_reproduces_the_file_geometry(acdc):
    st = load_acdc(acdc / "patient001")
    img = st.to_sitk(st.images[0])
    ref = sitk.ReadImage(str(acdc / "patient001" / "patient001_frame01.nii.gz"))
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing())
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin())
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref).astype(np.float32))


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_every_acdc_patient_loads_with_sane_labels(acdc):
    """All 80 patients: 2 phases, labels {0..3}, and the remap direction: the LV cavity
    sits inside the myocardium ring (centroids close), the RV cavity beside it."""
    import csv
    rows = {r["patient"]: r for r in csv.DictReader(open(acdc.parent / "patients.csv"))}
    patients = sorted(p for p in acdc.iterdir() if p.is_dir())
    assert len(patients) == 80
    t0 = time.perf_counter()
    for folder in patients:
        st = load_study(folder)
        r = rows[folder.name]
        assert st.n_phases == 2 and st.labels is not None, folder.name
        assert set(np.unique(st.labels)) <= {0, 1, 2, 3}, folder.name
        assert st.info["group"] == r["group"]
        assert st.phase_ids == sorted({int(r["ed_frame"]), int(r["es_frame"])})
        assert st.geometry.slice_spacing == pytest.approx(float(r["spacing_z_mm"]))
        # pixel spacing (rows, cols) = NIfTI (y, x)
        assert st.geometry.pixel_spacing == pytest.approx(
            (float(r["spacing_y_mm"]), float(r["spacing_x_mm"])))
        lab = st.labels[st.ed_phase]
        spacing = np.array([st.geometry.slice_spacing, *st.geometry.pixel_spacing])
        lvc, lvm, rvc = (_centroid(lab == k) * spacing for k in (1, 2, 3))
        d_lv = np.linalg.norm((lvc - lvm)[1:])        # in-plane distance, mm
        d_rv = np.linalg.norm((rvc - lvm)[1:])
        assert d_lv < 12.0 and d_rv > d_lv, (folder.name, d_lv, d_rv)
        assert (lab == 2).sum() > 0 and (lab == 1).sum() > 0 and (lab == 3).sum() > 0
    assert time.perf_counter() - t0 < 40


def test_acdc_frame_file_and_missing_labels(acdc, tmp_path):
    src = acdc / "patient001"
    # one frame file given directly: ACDC labels recognised and remapped
    one = load_study(src / "patient001_frame01.nii.gz")
    full = load_acdc(src)
    assert one.n_phases == 1
    assert np.array_equal(one.labels[0], full.labels[0])
    assert any("ACDC" in w for w in one.warnings)
    # the label file itself is not an image
    expect(UsageError, lambda: load_study(src / "patient001_frame01_gt.nii.gz"),
           "label file", "patient001_frame01.nii.gz", code=2)
    # a copy without the ES labels: labels None and a warning
    dst = tmp_path / "patient001"
    shutil.copytree(src, dst)
    (dst / "patient001_frame12_gt.nii.gz").unlink()
    st = load_study(dst)
    assert st.labels is None and st.n_phases == 2
    assert any("no label file" in w and "frame 12" in w for w in st.warnings)
    # Info.cfg names a frame that is not there
    (dst / "Info.cfg").write_text((src / "Info.cfg").read_text().replace("ES: 12", "ES: 14"))
    expect(InvalidStudyError, lambda: load_study(dst), "frame14", "missing", "frame01, frame12",
           code=65)
    (dst / "Info.cfg").write_text("Group: DCM\n")
    expect(InvalidStudyError, lambda: load_study(dst), "ED and ES", code=65)


def test_acdc_frames_from_4d_cine(tmp_path, acdc):
    """The organisers' full distribution: frames taken from patientNNN_4d.nii.gz."""
    src = acdc / "patient001"
    dst = tmp_path / "patient001"
    dst.mkdir()
    shutil.copy(src / "Info.cfg", dst / "Info.cfg")
    ed = sitk.ReadImage(str(src / "patient001_frame01.nii.gz"))
    es = sitk.ReadImage(str(src / "patient001_frame12.nii.gz"))
    vols = [sitk.GetArrayFromImage(ed if k == 0 else es if k == 11 else ed) for k in range(30)]
    img4 = sitk.GetImageFromArray(np.stack(vols), isVector=False)
    img4.SetSpacing((*ed.GetSpacing(), 30.0))
    sitk.WriteImage(img4, str(dst / "patient001_4d.nii.gz"))
    assert is_acdc_folder(dst)
    st = load_study(dst)
    ref = load_acdc(src)
    assert np.array_equal(st.images, ref.images) and st.labels is None
    assert st.phase_ids == [1, 12]


# --------------------------------------------------------------------------- NIfTI
def _write_4d(folder: Path, *, direction=None, origin=(10.0, -20.0, 30.0), with_labels=True,
              spacing=(1.25, 1.5, 8.0), dt=30.0, name="sax") -> tuple[np.ndarray, np.ndarray]:
    """A 4D cine [T=3, Z=5, Y=12, X=10] (time last in the file) and its label sibling."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 500, size=(3, 5, 12, 10)).astype(np.int16)
    lab = rng.integers(0, 4, size=arr.shape).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for a, suffix in ((arr, ""), (lab, "_gt")):
        if suffix and not with_labels:
            continue
        img = sitk.GetImageFromArray(a, isVector=False)
        img.SetSpacing((*spacing, dt))
        img.SetOrigin((*origin, 0.0))
        if direction is not None:
            d4 = np.eye(4)
            d4[:3, :3] = direction
            img.SetDirection(d4.ravel().tolist())
        sitk.WriteImage(img, str(folder / f"{name}{suffix}.nii.gz"))
    return arr, lab


def test_nifti_4d_cine_folder(tmp_path):
    c, s = np.cos(0.5), np.sin(0.5)
    D = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])          # columns x, y, z directions
    arr, lab = _write_4d(tmp_path / "ph", direction=D)
    st = load_study(tmp_path / "ph")                            # folder with one image NIfTI
    assert st.source_format == "nifti"
    assert st.images.shape == (3, 5, 12, 10)
    assert np.array_equal(st.images, arr.astype(np.float32))
    assert np.array_equal(st.labels, lab)                        # project convention, as is
    np.testing.assert_allclose(st.trigger_times, [0.0, 30.0, 60.0])
    g = st.geometry
    assert g.pixel_spacing == (1.5, 1.25)                        # (rows = y, cols = x)
    np.testing.assert_allclose(g.row_dir, D[:, 0])
    np.testing.assert_allclose(g.col_dir, D[:, 1])
    expected = np.array([10.0, -20.0, 30.0]) + np.arange(5)[:, None] * 8.0 * D[:, 2]
    np.testing.assert_allclose(g.origins, expected)
    np.testing.assert_allclose(g.slice_gaps, 8.0)
    # physical position of voxel (s=2, i=3, j=4) agrees with ITK's
    img = sitk.ReadImage(str(tmp_path / "ph" / "sax.nii.gz"))
    np.testing.assert_allclose(g.index_to_physical(2, 3, 4),
                               img.TransformContinuousIndexToPhysicalPoint((4, 3, 2, 0))[:3])


def test_nifti_3d_and_explicit_labels_acdc_convention(tmp_path):
    arr = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5) / 7.0
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 0.8, 6.0))
    sitk.WriteImage(img, str(tmp_path / "vol.nii"))
    lab = np.zeros((4, 6, 5), np.uint8)
    lab[1, 2, 2], lab[1, 3, 3], lab[2, 4, 4] = 1, 2, 3            # ACDC: RV, MYO, LV
    limg = sitk.GetImageFromArray(lab)
    limg.CopyInformation(img)
    sitk.WriteImage(limg, str(tmp_path / "manual.nii.gz"))
    st = load_nifti(tmp_path / "vol.nii", labels=tmp_path / "manual.nii.gz",
                    label_convention="acdc")
    assert st.images.shape == (1, 4, 6, 5)
    assert np.array_equal(st.images[0], arr)                      # float32 kept exactly
    assert (st.labels[0, 1, 2, 2], st.labels[0, 1, 3, 3], st.labels[0, 2, 4, 4]) == (3, 2, 1)
    assert np.all(np.isnan(st.trigger_times))
    expect(UsageError, lambda: load_nifti(tmp_path / "vol.nii", label_convention="xyz"),
           "label_convention", code=2)


def test_left_handed_nifti_is_reversed(tmp_path):
    D = np.diag([1.0, 1.0, -1.0])                               # slice axis against x cross y
    arr, lab = _write_4d(tmp_path / "lh", direction=D)
    st = load_study(tmp_path / "lh" / "sax.nii.gz")
    assert np.all(np.diff(st.geometry.positions) > 0)
    assert np.array_equal(st.images, arr[:, ::-1].astype(np.float32))
    assert np.array_equal(st.labels, lab[:, ::-1])
    np.testing.assert_allclose(st.geometry.origins[-1], [10.0, -20.0, 30.0])
    assert st.info.get("slice_order_reversed") is True


def test_nifti_broken_variants(tmp_path):
    _write_4d(tmp_path / "a", with_labels=False)
    img = sitk.ReadImage(str(tmp_path / "a" / "sax.nii.gz"))
    # label values outside 0..3
    bad = sitk.GetImageFromArray(np.full((3, 5, 12, 10), 5, np.uint8), isVector=False)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(tmp_path / "a" / "sax_seg.nii.gz"))
    expect(LabelError, lambda: load_study(tmp_path / "a" / "sax.nii.gz"),
           "label values [5]", "sax_seg.nii.gz", code=65)
    # label grid differs from the image's
    (tmp_path / "a" / "sax_seg.nii.gz").unlink()
    small = sitk.GetImageFromArray(np.zeros((3, 5, 12, 9), np.uint8), isVector=False)
    sitk.WriteImage(small, str(tmp_path / "a" / "sax_label.nii.gz"))
    expect(LabelError, lambda: load_study(tmp_path / "a"), "label size", "(9, 12, 5, 3)",
           code=65)
    shifted = sitk.GetImageFromArray(np.zeros((3, 5, 12, 10), np.uint8), isVector=False)
    shifted.CopyInformation(img)
    shifted.SetOrigin((0.0, 0.0, 0.0, 0.0))
    sitk.WriteImage(shifted, str(tmp_path / "a" / "sax_label.nii.gz"))
    expect(LabelError, lambda: load_study(tmp_path / "a"), "label origin", code=65)
    # NaN / inf pixels (ITK's NIfTI reader zeroes them, so check the validator itself)
    st = load_nifti(tmp_path / "a" / "sax.nii.gz", labels=False)
    st.images[1, 2, :4, 0] = np.nan
    st.images[2, 0, 0, 0] = np.inf
    expect(NonFiniteError, lambda: validate_study(st), "5 NaN or infinite",
           "phase 1, slice 2: 4", "phase 2, slice 0: 1", code=65)
    # truncated file
    raw = (tmp_path / "a" / "sax.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    expect(InvalidStudyError, lambda: load_study(tmp_path / "cut.nii.gz"),
           "cannot read this NIfTI", "cut.nii.gz", "cut short", code=65)
    img_u = sitk.ReadImage(str(tmp_path / "a" / "sax.nii.gz"))
    sitk.WriteImage(img_u, str(tmp_path / "full.nii"))
    raw = (tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-100])
    expect(InvalidStudyError, lambda: load_study(tmp_path / "cut.nii"),
           "100 bytes of voxel data missing", code=65)
    # missing path, empty folder, several NIfTIs, --series on NIfTI
    expect(NoInputError, lambda: load_study(tmp_path / "missing.nii.gz"), "no such", code=66)
    (tmp_path / "empty").mkdir()
    expect(NoImagesError, lambda: load_study(tmp_path / "empty"), "no images", code=66)
    _write_4d(tmp_path / "two", name="one", with_labels=False)
    _write_4d(tmp_path / "two", name="other")
    expect(AmbiguousInputError, lambda: load_study(tmp_path / "two"), "2 image NIfTI files",
           "one.nii.gz", "other.nii.gz", code=65)
    expect(UsageError, lambda: load_study(tmp_path / "two" / "one.nii.gz", series="1.2"),
           "--series", code=2)


def test_nifti_time_spacing_units(tmp_path):
    """Trigger times from the 4th axis: ms as written; seconds recognised; 1.0 = unknown."""
    _write_4d(tmp_path / "s", dt=0.045, with_labels=False)
    np.testing.assert_allclose(load_study(tmp_path / "s").trigger_times, [0.0, 45.0, 90.0])
    _write_4d(tmp_path / "u", dt=1.0, with_labels=False)
    assert np.all(np.isnan(load_study(tmp_path / "u").trigger_times))


# --------------------------------------------------------------------------- hostile headers
def _patched_nifti(path: Path, patches, dtype=np.int16) -> Path:
    """A 4D NIfTI-1 (2 phases x 4 slices x 8 x 8) with raw header bytes overwritten:
    patches = [(offset, struct format, value)]."""
    import struct
    a = (np.arange(2 * 4 * 8 * 8).reshape(2, 4, 8, 8) % 50).astype(dtype)
    img = sitk.GetImageFromArray(a, isVector=False)
    img.SetSpacing((1.5, 1.5, 8.0, 40.0))
    sitk.WriteImage(img, str(path))
    b = bytearray(path.read_bytes())
    for off, fmt, v in patches:
        struct.pack_into(fmt, b, off, v)
    path.write_bytes(bytes(b))
    return path


@pytest.mark.parametrize("name, patches, phrase", [
    ("pixdim0", [(80, "<f", 0.0)], "pixdim[1]"),
    ("pixdim_nan", [(88, "<f", float("nan"))], "pixdim[3]"),
    ("dim_neg", [(46, "<h", -5)], "dim[3]"),
    ("sform_nan", [(280 + 4 * k, "<f", float("nan")) for k in range(12)], "srow"),
    ("sform_skew", [(280, "<f", 1.0), (284, "<f", 1.0)], "srow"),
    ("qoffset_inf", [(268, "<f", float("inf"))], "qoffset"),
    ("quatern_big", [(256, "<f", 2.5)], "not a rotation"),
    ("bitpix_wrong", [(70, "<h", 2)], "bitpix"),   # datatype uint8, bitpix still 16
])
def test_nifti_hostile_headers_are_refused(tmp_path, name, patches, phrase):
    """Header fields ITK repairs silently (pixdim 0 -> 1 mm, dim -5 -> 1 slice, a NaN or
    sheared sform ignored) are refused with 65, naming the file and the field."""
    path = _patched_nifti(tmp_path / f"{name}.nii", patches)
    err = expect(InvalidStudyError, lambda: load_study(path), phrase, path.name, code=65)
    assert "Traceback" not in str(err)


def test_nifti_nan_voxels_are_refused_not_zeroed(tmp_path):
    import struct
    path = _patched_nifti(tmp_path / "nan.nii", [], dtype=np.float32)
    b = bytearray(path.read_bytes())
    off = int(struct.unpack_from("<f", b, 108)[0])
    struct.pack_into("<ff", b, off, float("nan"), float("inf"))
    path.write_bytes(bytes(b))
    expect(InvalidStudyError, lambda: load_study(path), "2 NaN or infinite voxel", code=65)


@pytest.mark.parametrize("ed", ["inf", "nan", "1e308", "0", "-3", "99", "1.5"])
def test_acdc_info_cfg_ed_out_of_range(acdc, tmp_path, ed):
    shutil.copytree(acdc / "patient001", tmp_path / "p")
    cfg = tmp_path / "p" / "Info.cfg"
    cfg.write_text("\n".join(f"ED: {ed}" if ln.startswith("ED") else ln
                             for ln in cfg.read_text().splitlines()))
    expect(InvalidStudyError, lambda: load_study(tmp_path / "p"), "Info.cfg", code=65)


def test_nifti_declared_size_is_capped_before_reading(tmp_path):
    """dim fields declaring terabytes, or more data than an uncompressed file holds, are
    refused from the raw header before ITK allocates anything."""
    path = _patched_nifti(tmp_path / "huge.nii", [(42, "<h", 32767), (44, "<h", 32767),
                                                  (46, "<h", 32767), (48, "<h", 32767)])
    expect(InvalidStudyError, lambda: load_study(path), "dim", "nothing was allocated", code=65)
    path = _patched_nifti(tmp_path / "short.nii", [(46, "<h", 40)])
    expect(InvalidStudyError, lambda: load_study(path), "dim", "bytes of voxel data missing",
           code=65)
