"""DICOM loader: round trips from ACDC and synthetic studies, and every broken variant
(message, exception class, exit code)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_series import (read_back, rotated, rotation, subset,  # noqa: E402
                          synthetic_study, write_dicom_series)

from deeprecon.runtime.errors import ExitCode, InvalidStudyError, NoInputError  # noqa: E402
from deeprecon.runtime.io import (DuplicatePositionError, GeometryMismatchError,  # noqa: E402
                                  MissingSliceError, MixedSeriesError, NoImagesError,
                                  NonMRError, NoStackError, OrientationMismatchError,
                                  PhaseCountMismatchError, UnknownSeriesError,
                                  UnreadableFilesError, UnsupportedTransferSyntaxError,
                                  load_dicom, load_study)
from deeprecon.runtime.study import Geometry  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ACDC = REPO.parent / "shared" / "data" / "acdc" / "training"


def expect(exc_type, fn, *phrases, code: int):
    """Call fn, assert it raises exc_type with exit ``code`` and every phrase in the message."""
    with pytest.raises(exc_type) as ei:
        fn()
    err = ei.value
    assert int(err.exit_code) == code, (err.exit_code, str(err))
    text = str(err)
    for ph in phrases:
        assert ph.lower() in text.lower(), f"{ph!r} not in: {text}"
    return err


def assert_same_geometry(a, b, atol=1e-6):
    ga, gb = a.geometry, b.geometry
    np.testing.assert_allclose(ga.origins, gb.origins, atol=atol)
    np.testing.assert_allclose(ga.row_dir, gb.row_dir, atol=atol)
    np.testing.assert_allclose(ga.col_dir, gb.col_dir, atol=atol)
    np.testing.assert_allclose(ga.pixel_spacing, gb.pixel_spacing, atol=atol)


@pytest.fixture(scope="module")
def small():
    """4 slices x 3 phases, 32 x 32, integer-valued: exact through DICOM."""
    return synthetic_study(phases=3, slices=4, rows=32, cols=32, slice_spacing=8.0)


# --------------------------------------------------------------------------- round trips
def test_acdc_patient_as_dicom_matches_nifti(tmp_path):
    """The must-show: a DICOM series written from an ACDC patient (shuffled, no
    extensions, nested folders) loads with the NIfTI's geometry and voxels."""
    if not (ACDC / "patient001").is_dir():
        pytest.skip(f"shared ACDC data not found at {ACDC}")
    ref = load_study(ACDC / "patient001")
    paths = write_dicom_series(ref, tmp_path / "dcm", extension="", shuffle=True, nested=True,
                               seed=3)
    assert all(p.suffix == "" for p in paths)
    assert len({p.parent for p in paths}) > 1
    got = load_study(tmp_path / "dcm")
    assert got.source_format == "dicom"
    assert got.images.shape == ref.images.shape == (2, 10, 256, 216)
    assert np.array_equal(got.images, ref.images)         # exact voxels, same order
    assert_same_geometry(got, ref)
    assert got.geometry.slice_spacing == pytest.approx(10.0)
    assert got.geometry.pixel_spacing == pytest.approx((1.5625, 1.5625))
    np.testing.assert_allclose(got.trigger_times, [0.0, 11 * 40.0])   # frames 1 and 12
    assert got.warnings == []


def test_oblique_geometry_and_sorting(tmp_path, small):
    """An oblique stack (double-angled, like a real short-axis plan) whose slices are
    written in reverse order comes back sorted along row x col with the same geometry."""
    R = rotation([1.0, 0.4, -0.3], 63.0) @ rotation([0.0, 0.0, 1.0], 20.0)
    st = rotated(small, R, offset=(12.0, -40.0, 85.0))
    write_dicom_series(st, tmp_path / "obl", shuffle=True, seed=1)
    got = load_dicom(tmp_path / "obl")
    assert_same_geometry(got, st)
    assert np.array_equal(got.images, st.images)
    np.testing.assert_allclose(got.trigger_times, st.trigger_times)
    assert np.all(np.diff(got.geometry.positions) > 0)
    # slices listed against the normal (origins decreasing): the loader re-sorts them
    g = st.geometry
    rev = dataclasses.replace(st, geometry=Geometry(
        origins=g.origins[::-1], row_dir=g.row_dir, col_dir=g.col_dir,
        pixel_spacing=g.pixel_spacing, slice_thickness=g.slice_thickness))
    assert np.all(np.diff(rev.geometry.positions) < 0)
    write_dicom_series(rev, tmp_path / "rev")
    got = load_dicom(tmp_path / "rev")
    assert np.all(np.diff(got.geometry.positions) > 0)
    assert np.array_equal(got.images, rev.images[:, ::-1])
    np.testing.assert_allclose(got.geometry.origins, g.origins, atol=1e-6)


def test_float_data_uses_rescale_slope_intercept(tmp_path, small):
    st = synthetic_study(phases=2, slices=3, rows=16, cols=16, seed=5)
    st.images = st.images * 0.37 - 12.5        # non-integral: stored with slope/intercept
    write_dicom_series(st, tmp_path / "f")
    ds = read_back(next((tmp_path / "f").iterdir()))
    assert float(ds.RescaleSlope) != 1.0 and float(ds.RescaleIntercept) != 0.0
    got = load_dicom(tmp_path / "f")
    slope = float(ds.RescaleSlope)
    np.testing.assert_allclose(got.images, st.images, atol=slope)


@pytest.mark.parametrize("signed", [True, False])
def test_monochrome1_is_inverted_to_monochrome2(tmp_path, small, signed):
    # values above int16 make the writer store unsigned data
    st = dataclasses.replace(small, images=small.images + (0.0 if signed else 40000.0))
    bits = 16

    def to_monochrome1(ds, p, s):
        dtype = np.int16 if ds.PixelRepresentation == 1 else np.uint16
        a = np.frombuffer(ds.PixelData, dtype=dtype).astype(np.int64)
        inv = (-1 - a) if ds.PixelRepresentation == 1 else ((2 ** bits - 1) - a)
        ds.PixelData = inv.astype(dtype).tobytes()
        ds.PhotometricInterpretation = "MONOCHROME1"
        return ds

    write_dicom_series(st, tmp_path / "m1", edit=to_monochrome1)
    assert read_back(next((tmp_path / "m1").iterdir())).PixelRepresentation == int(signed)
    got = load_dicom(tmp_path / "m1")
    np.testing.assert_array_equal(got.images, st.images)
    assert any("MONOCHROME1" in w for w in got.warnings)


def test_phases_sorted_by_trigger_time_with_instance_tie_break(tmp_path, small):
    # instance numbers in reverse phase order: the trigger time must win
    def edit(ds, p, s):
        ds.InstanceNumber = 100 - p
        return ds
    write_dicom_series(small, tmp_path / "a", edit=edit)
    got = load_dicom(tmp_path / "a")
    assert np.array_equal(got.images, small.images)
    assert got.warnings == []
    # trigger times drifting per slice (one breath-hold per slice): matched by order, warned
    def edit3(ds, p, s):
        ds.TriggerTime = str(35.0 * p + 25.0 * s)
        return ds
    write_dicom_series(small, tmp_path / "c", edit=edit3, shuffle=True)
    got = load_dicom(tmp_path / "c")
    assert np.array_equal(got.images, small.images)
    np.testing.assert_allclose(got.trigger_times, [37.5, 72.5, 107.5])   # medians over slices
    assert any("differ across slices by up to 75.0 ms" in w for w in got.warnings)
    # no trigger times at all: InstanceNumber orders the phases, trigger times unknown
    def edit2(ds, p, s):
        del ds.TriggerTime
        ds.InstanceNumber = 10 * s + p + 1
        return ds
    write_dicom_series(small, tmp_path / "b", edit=edit2, shuffle=True)
    got = load_dicom(tmp_path / "b")
    assert np.array_equal(got.images, small.images)
    assert np.all(np.isnan(got.trigger_times))


def test_enhanced_multiframe_mr(tmp_path, small):
    st = rotated(small, rotation([0.3, 1.0, 0.2], 35.0))
    write_dicom_series(st, tmp_path / "enh", enhanced=True)
    assert len(list((tmp_path / "enh").iterdir())) == 1
    got = load_study(tmp_path / "enh")
    assert np.array_equal(got.images, st.images)
    assert_same_geometry(got, st)
    np.testing.assert_allclose(got.trigger_times, st.trigger_times)


def test_other_series_ignored_with_warning(tmp_path, small):
    """SAX cine + tri-plane localiser + a long-axis cine + a report + DICOMDIR."""
    root = tmp_path / "exam"
    write_dicom_series(small, root / "sax", description="cine_sax", series_number=7)
    loc = synthetic_study(phases=1, slices=1, rows=32, cols=32)
    for k, R in enumerate([np.eye(3), rotation([1, 0, 0], 90), rotation([0, 1, 0], 90)]):
        write_dicom_series(rotated(loc, R), root / "loc", description="localizer", series_number=1,
                           series_uid="1.2.3.4.1", study_uid="1.2.3", extension=f".{k}.dcm",
                           )
    lax = rotated(synthetic_study(phases=3, slices=1, rows=32, cols=32), rotation([1, 0, 0], 70))
    write_dicom_series(lax, root / "lax", description="cine_4ch", series_number=9)
    _write_non_image(root / "sr.dcm")
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (root / "README.txt").write_text("exported by a PACS")
    got = load_study(root)
    assert got.description == "cine_sax"
    assert np.array_equal(got.images, small.images)
    text = " ".join(got.warnings)
    assert "ignored 2 other series" in text and "localizer" in text and "cine_4ch" in text


def test_single_slice_series_merged_uk_biobank_style(tmp_path, small):
    root = tmp_path / "ukbb"
    for s in range(small.n_slices):
        write_dicom_series(subset(small, slices=[s]), root / f"sax_b{s + 1}", study_uid="1.2.3.99",
                           description=f"CINE_segmented_SAX_b{s + 1}", series_number=20 + s)
    lax = rotated(synthetic_study(phases=3, slices=1, rows=32, cols=32), rotation([1, 0, 0], 70))
    write_dicom_series(lax, root / "lax", description="CINE_segmented_LAX_4Ch")
    got = load_study(root)
    assert got.n_slices == small.n_slices and got.n_phases == small.n_phases
    assert np.array_equal(got.images, small.images)
    assert_same_geometry(got, small)
    assert any("merged 4 single-slice cine series" in w for w in got.warnings)
    assert len(got.info["merged_series"]) == 4
    # the merged UIDs are a valid --series argument
    again = load_study(root, series=got.series_uid)
    assert np.array_equal(again.images, got.images)


def test_identical_copy_of_a_file_is_ignored(tmp_path, small):
    paths = write_dicom_series(small, tmp_path / "c")
    shutil.copy(paths[0], tmp_path / "c" / "copy_of_first")
    got = load_dicom(tmp_path / "c")
    assert np.array_equal(got.images, small.images)
    assert any("ignored 1 duplicate file" in w and "copy_of_first is a copy of IM00000.dcm" in w
               for w in got.warnings), got.warnings


def test_files_without_preamble_or_file_meta(tmp_path, small):
    """Old exports: raw implicit-VR data sets, no 128-byte preamble, no file meta."""
    paths = write_dicom_series(small, tmp_path / "raw", extension="", shuffle=True)
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(p, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert paths[0].read_bytes()[128:132] != b"DICM"
    got = load_study(tmp_path / "raw")
    assert np.array_equal(got.images, small.images)
    assert_same_geometry(got, small)


def test_single_file_input(tmp_path, small):
    p = write_dicom_series(small, tmp_path / "e", enhanced=True)[0]
    got = load_study(p)
    assert got.images.shape == small.images.shape


# --------------------------------------------------------------------------- broken variants
def test_no_images(tmp_path):
    expect(NoImagesError, lambda: load_study(tmp_path), "no images found", "no files at all",
           code=66)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(b"\x01\x02" * 100)
    expect(NoImagesError, lambda: load_study(tmp_path), "no images found", "2 other file",
           "DICOM", "NIfTI", code=66)
    expect(NoInputError, lambda: load_study(tmp_path / "nope"), "no such", code=66)


def test_only_non_image_objects(tmp_path):
    _write_non_image(tmp_path / "report.dcm")
    expect(NoImagesError, lambda: load_study(tmp_path), "non-image DICOM object", code=66)


def _no_uids(*tags):
    def edit(ds, phase, slice_):
        for t in tags:
            delattr(ds, t)
        return ds
    return edit


def test_series_without_uid_are_named_by_patient_study_and_number(tmp_path, small):
    """Kaggle DSB style: no SeriesInstanceUID (nor StudyInstanceUID), two patients' cine
    stacks with the same SeriesNumber in one folder: never merged, listed by
    PatientID:StudyInstanceUID:SeriesNumber, and that key selects one."""
    other = synthetic_study(phases=3, slices=4, rows=32, cols=32, seed=9)
    for study, pid in ((small, "DSB_1"), (other, "DSB_2")):
        write_dicom_series(study, tmp_path / pid, series_number=5, patient_id=pid,
                           edit=_no_uids("SeriesInstanceUID", "StudyInstanceUID"))
    err = expect(MixedSeriesError, lambda: load_study(tmp_path), "2 patients", "'DSB_1'", "'DSB_2'",
                 "DSB_1:-:5", "DSB_2:-:5", "no SeriesInstanceUID", "--series", code=65)
    assert "one folder per patient" in err.hint
    got = load_study(tmp_path, series="DSB_2:-:5")
    assert np.array_equal(got.images, other.images)
    assert got.series_uid == "DSB_2:-:5"
    # with the StudyInstanceUID kept, it is part of the key
    write_dicom_series(small, tmp_path / "one", series_number=7, patient_id="P:1", study_uid="1.2.3",
                       edit=_no_uids("SeriesInstanceUID"))
    assert load_study(tmp_path / "one").series_uid == "P_1:1.2.3:7"


def test_one_series_uid_over_two_patients_is_refused(tmp_path, small):
    """Files of two patients sharing a SeriesInstanceUID (a bad anonymisation) are
    never stacked: exit 65 naming both PatientIDs."""
    write_dicom_series(small, tmp_path / "a", series_uid="1.2.826.0.7.1", study_uid="1.2.3",
                       patient_id="ANON",
                       edit=lambda ds, p, s: (setattr(ds, "PatientID", "OTHER") if s == 0 else None) or ds)
    expect(MixedSeriesError, lambda: load_study(tmp_path), "series 1.2.826.0.7.1",
           "2 different PatientIDs", "'ANON'", "'OTHER'", "never stacked", code=65)


def test_single_slice_series_of_two_patients_are_not_merged(tmp_path, small):
    """UK Biobank style single-slice series, but slices 0-1 of one patient and 2-3 of
    another (same study UID, same matrix): no stack of mixed patients."""
    for s in range(small.n_slices):
        write_dicom_series(subset(small, slices=[s]), tmp_path / f"b{s}", study_uid="1.2.3.99",
                           patient_id="P1" if s < 2 else "P2",
                           description=f"CINE_segmented_SAX_b{s + 1}", series_number=20 + s)
    expect(MixedSeriesError, lambda: load_study(tmp_path), "2 different groups", code=65)


def test_mixed_series_listed_and_picked(tmp_path, small):
    other = synthetic_study(phases=3, slices=4, rows=32, cols=32, seed=9,
                            origin=(-20.0, -24.0, 31.0))
    write_dicom_series(small, tmp_path / "s1", description="sax_a", series_uid="1.2.826.0.1.1",
                       series_number=3)
    write_dicom_series(other, tmp_path / "s2", description="sax_b", series_uid="1.2.826.0.1.2",
                       series_number=4)
    err = expect(MixedSeriesError, lambda: load_study(tmp_path), "several short-axis series",
                 "1.2.826.0.1.1", "1.2.826.0.1.2", "sax_a", "sax_b", "4 slices x 3 phases",
                 "--series", code=65)
    assert "row L, col P" in str(err)
    got = load_study(tmp_path, series="1.2.826.0.1.2")
    assert np.array_equal(got.images, other.images)
    assert got.series_uid == "1.2.826.0.1.2"
    assert any("ignored 1 other series" in w for w in got.warnings)
    expect(UnknownSeriesError, lambda: load_study(tmp_path, series="9.9.9"), "no series 9.9.9",
           "available", "1.2.826.0.1.1", code=2)


def test_slices_with_different_orientations(tmp_path, small):
    tilt = rotation([1.0, 0.0, 0.0], 10.0)

    def edit(ds, p, s):
        if s == 2:
            g = small.geometry
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.r_[tilt @ g.row_dir, tilt @ g.col_dir]]
        return ds
    write_dicom_series(small, tmp_path / "o", edit=edit)
    expect(OrientationMismatchError, lambda: load_study(tmp_path / "o"),
           "different orientations", "tilted 10.0 deg", code=65)


def test_unequal_phase_counts(tmp_path, small):
    write_dicom_series(small, tmp_path / "u", edit=lambda ds, p, s: None if (p, s) == (2, 1) else ds)
    z = small.geometry.positions[1]
    expect(PhaseCountMismatchError, lambda: load_study(tmp_path / "u"),
           "unequal phase counts", f"z={z:+.2f} mm: 2", "3 of 4 slices have 3", code=65)


def test_duplicate_positions(tmp_path, small):
    paths = write_dicom_series(small, tmp_path / "d")
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    arr = ds.pixel_array.copy()
    arr[0, 0] += 1
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "d" / "repeat.dcm", enforce_file_format=True)
    expect(DuplicatePositionError, lambda: load_study(tmp_path / "d"),
           "duplicate images", "repeat.dcm", "same position", "trigger time 0 ms", code=65)


def test_missing_slice(tmp_path):
    st = synthetic_study(phases=2, slices=5, rows=16, cols=16, slice_spacing=10.0,
                         origin=(0.0, 0.0, 0.0))
    write_dicom_series(st, tmp_path / "m", edit=lambda ds, p, s: None if s == 2 else ds)
    expect(MissingSliceError, lambda: load_study(tmp_path / "m"), "missing slice",
           "20.00 mm between z=+10.00 mm and z=+30.00 mm", "around z=+20.00 mm",
           "10.00 mm apart", code=65)


def test_non_mr_images(tmp_path, small):
    write_dicom_series(small, tmp_path / "ct", modality="CT")
    expect(NonMRError, lambda: load_study(tmp_path / "ct"), "no MR images", "CT", code=65)


def test_unreadable_files_skipped_with_count(tmp_path, small):
    paths = write_dicom_series(small, tmp_path / "t")
    raw = paths[0].read_bytes()
    (tmp_path / "t" / "broken1.dcm").write_bytes(raw[:300])        # header cut short
    (tmp_path / "t" / "broken2").write_bytes(raw[:-100])           # pixel data cut short
    (tmp_path / "t" / "broken3.dcm").write_bytes(raw[:100])        # not even a preamble
    got = load_study(tmp_path / "t")
    assert np.array_equal(got.images, small.images)
    w = [x for x in got.warnings if "unreadable or truncated" in x]
    # broken2 passes the header scan and fails at decoding: two warnings, 3 files in all
    assert sum(int(x.split("skipped ")[1].split()[0]) for x in w) == 3, got.warnings
    assert "broken1.dcm" in " ".join(w) and "broken2" in " ".join(w)


def test_truncated_member_of_the_stack(tmp_path, small):
    paths = write_dicom_series(small, tmp_path / "t")
    paths[5].write_bytes(paths[5].read_bytes()[:-200])
    expect(PhaseCountMismatchError, lambda: load_study(tmp_path / "t"), "unequal phase counts",
           "1 unreadable file was skipped", paths[5].name, code=65)


def test_all_files_unreadable(tmp_path, small):
    paths = write_dicom_series(small, tmp_path / "t")
    for p in paths:
        p.write_bytes(p.read_bytes()[:250])
    expect(UnreadableFilesError, lambda: load_study(tmp_path / "t"), "none could be read",
           "12 file(s)", code=65)


def test_different_matrix_and_pixel_spacing(tmp_path, small):
    def edit(ds, p, s):
        if s == 3:
            ds.Rows, ds.Columns = 16, 16
            ds.PixelData = np.zeros((16, 16), np.int16).tobytes()
        return ds
    write_dicom_series(small, tmp_path / "mx", edit=edit)
    expect(GeometryMismatchError, lambda: load_study(tmp_path / "mx"), "different matrix sizes",
           "16x16", "32x32", code=65)

    def edit2(ds, p, s):
        if s == 0:
            ds.PixelSpacing = ["1.8", "1.8"]
        return ds
    write_dicom_series(small, tmp_path / "ps", edit=edit2)
    expect(GeometryMismatchError, lambda: load_study(tmp_path / "ps"),
           "different pixel spacings", "1.8 x 1.8 mm", code=65)


def test_only_single_slice_series(tmp_path):
    lax = rotated(synthetic_study(phases=3, slices=1, rows=16, cols=16), rotation([1, 0, 0], 70))
    write_dicom_series(lax, tmp_path / "lax", description="cine_4ch", series_uid="1.2.5.6")
    expect(NoStackError, lambda: load_study(tmp_path), "no short-axis stack", "cine_4ch",
           code=65)
    got = load_study(tmp_path, series="1.2.5.6")          # explicitly asked for: allowed
    assert got.n_slices == 1 and any("single slice" in w for w in got.warnings)


def test_compressed_without_decoder(tmp_path, small):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here; the error path cannot be shown")
    from pydicom.encaps import encapsulate

    def edit(ds, p, s):
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + b"\x00" * 60])
        ds["PixelData"].VR = "OB"
        return ds
    write_dicom_series(small, tmp_path / "jls", edit=edit)
    expect(UnsupportedTransferSyntaxError, lambda: load_study(tmp_path / "jls"),
           "JPEG-LS", "no installed decoder", "pip install", code=65)


# --------------------------------------------------------------------------- CLI
def _cli():
    """The installed console script: its absence is a broken install, a failure (not a
    skip, which would let these tests pass without running)."""
    import deeprecon.runtime.cli  # noqa: F401  (an import error fails the test)

    exe = shutil.which("deeprecon-rt") or str(Path(sys.executable).parent / "deeprecon-rt")
    assert Path(exe).exists(), "the deeprecon-rt console script is not installed"
    return exe


def test_cli_study_info_on_dicom_and_mixed_series(tmp_path, small):
    exe = _cli()
    write_dicom_series(small, tmp_path / "a" / "s1", series_uid="1.2.826.0.9.1", extension="")
    p = subprocess.run([exe, "study", "info", str(tmp_path / "a"), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert (d["phases"], d["slices"], d["format"]) == (3, 4, "dicom")
    assert d["trigger_times_ms"] == [0.0, 35.0, 70.0]
    write_dicom_series(small, tmp_path / "a" / "s2", series_uid="1.2.826.0.9.2")
    p = subprocess.run([exe, "study", "info", str(tmp_path / "a")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == int(ExitCode.DATA), p.stderr
    assert "Traceback" not in p.stderr and "1.2.826.0.9.2" in p.stderr
    p = subprocess.run([exe, "study", "info", str(tmp_path / "a"), "--series", "1.2.826.0.9.2",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["series_uid"] == "1.2.826.0.9.2"


# --------------------------------------------------------------------------- helpers
def _write_non_image(path: Path) -> None:
    """A Basic Text SR: a DICOM object without pixels, as PACS exports include."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------- hostile headers
def _break_one(folder: Path, mutate, *, count: int = 1) -> Path:
    """Write a 4-slice x 2-phase series and apply ``mutate(ds)`` to one file (phase 1,
    slice 2; ``count`` > 1: also the files after it), saved as it is (no format
    enforcement). Returns the (first) broken file."""
    import warnings
    study = synthetic_study(phases=2, slices=4, rows=16, cols=16)
    paths = write_dicom_series(study, folder)
    for path in paths[2 * 2 + 1: 2 * 2 + 1 + count]:
        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # pydicom warns about invalid DS values
            mutate(ds)
            ds.save_as(path, enforce_file_format=False)
    return paths[2 * 2 + 1]


@pytest.mark.parametrize("name, mutate, phrase", [
    ("ps_tiny", lambda ds: setattr(ds, "PixelSpacing", ["1e-30", "1e-30"]), "PixelSpacing"),
    ("iop_huge", lambda ds: setattr(ds, "ImageOrientationPatient", ["1e308"] * 6),
     "ImageOrientationPatient"),
    ("iop_skew", lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0.3, 0.95, 0]),
     "orthonormal"),
    ("ipp_nan", lambda ds: setattr(ds, "ImagePositionPatient", ["nan", "0", "0"]),
     "ImagePositionPatient"),
    ("thick_nan", lambda ds: setattr(ds, "SliceThickness", "nan"), "SliceThickness"),
    ("thick_neg", lambda ds: setattr(ds, "SliceThickness", "-3"), "SliceThickness"),
    ("tt_inf", lambda ds: setattr(ds, "TriggerTime", "inf"), "TriggerTime"),
    ("tt_nan", lambda ds: setattr(ds, "TriggerTime", "nan"), "TriggerTime"),
    ("rows_huge", lambda ds: setattr(ds, "Rows", 60000), "Rows"),
    ("thick_text", lambda ds: ds.__setitem__("SliceThickness", pydicom.DataElement(
        0x00180050, "LO", "abc")), "SliceThickness"),
    ("cols_minus_one", lambda ds: setattr(ds, "Columns", 15), "PixelData"),
    ("pixels_doubled", lambda ds: setattr(ds, "PixelData", ds.PixelData * 2), "PixelData"),
    ("slope_zero", lambda ds: setattr(ds, "RescaleSlope", "0"), "RescaleSlope"),
    ("slope_nan", lambda ds: setattr(ds, "RescaleSlope", "nan"), "RescaleSlope"),
    ("intercept_huge", lambda ds: setattr(ds, "RescaleIntercept", "1e308"), "RescaleIntercept"),
    ("samples_3", lambda ds: setattr(ds, "SamplesPerPixel", 3), "SamplesPerPixel 3"),
    ("frames_2g", lambda ds: setattr(ds, "NumberOfFrames", "2147483647"), "NumberOfFrames"),
])
def test_hostile_header_values_are_refused(tmp_path, name, mutate, phrase):
    """Each broken value: InvalidStudyError (65) naming the file and the tag (a file
    that cannot be used at all is skipped, and the error it causes names it and why)."""
    path = _break_one(tmp_path / name, mutate)
    err = expect(Exception, lambda: load_dicom(tmp_path / name), phrase, code=65)
    assert path.name in str(err)


@pytest.mark.parametrize("bad", [["nan", "nan"], ["0", "0"], ["inf", "1.25"], ["-1.5", "1.25"]])
def test_one_broken_pixel_spacing_is_repaired_with_a_warning(tmp_path, bad):
    """One file of 20 (5 slices x 4 phases) with a NaN, 0, inf or negative PixelSpacing
    while the 19 others agree: repaired from them, and the Study says so."""
    study = synthetic_study(phases=4, slices=5, rows=16, cols=16)
    paths = write_dicom_series(study, tmp_path / "s")
    import warnings
    ds = pydicom.dcmread(paths[7])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PixelSpacing = bad
        ds.save_as(paths[7], enforce_file_format=False)
    st = load_dicom(tmp_path / "s")
    assert st.geometry.pixel_spacing == (1.5, 1.25) and st.images.shape == (4, 5, 16, 16)
    w = [x for x in st.warnings if "repaired" in x]
    assert len(w) == 1 and paths[7].name in w[0] and "PixelSpacing" in w[0], st.warnings
    assert "1.5, 1.25" in w[0] and "19 other files" in w[0], w


@pytest.mark.parametrize("case", ["two_files", "also_trigger", "tiny", "others_disagree"])
def test_pixel_spacing_not_safely_repairable_is_refused(tmp_path, case):
    """No repair unless it is safe: two broken files, a broken file with another broken
    value, a positive but absurd spacing (1e-30), or other files that disagree among
    themselves: refused (65) naming the file and PixelSpacing."""
    def nan_ps(ds):
        ds.PixelSpacing = ["nan", "nan"]
        if case == "also_trigger":
            ds.TriggerTime = "nan"
        if case == "tiny":
            ds.PixelSpacing = ["1e-30", "1e-30"]
    path = _break_one(tmp_path / "s", nan_ps, count=2 if case == "two_files" else 1)
    if case == "others_disagree":
        other = sorted((tmp_path / "s").iterdir())[0]
        ds = pydicom.dcmread(other)
        ds.PixelSpacing = ["1.6", "1.25"]
        ds.save_as(other)
    err = expect(InvalidStudyError, lambda: load_dicom(tmp_path / "s"), "PixelSpacing",
                 path.name, code=65)
    assert "repaired" not in str(err)


@pytest.mark.parametrize("value, shown", [("5", "5"), ("nan", "nan"), ("-8", "-8"), ("0", "0")])
def test_spacing_between_slices_that_disagrees_is_a_warning(tmp_path, value, shown):
    """SpacingBetweenSlices is never used (the positions are); one that the positions
    contradict, or that is not a finite number, is recorded as a Study warning."""
    import warnings
    study = synthetic_study(phases=2, slices=4, rows=16, cols=16, slice_spacing=8.0)
    for path in write_dicom_series(study, tmp_path / "s"):
        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # pydicom warns about 'nan' as DS
            ds.SpacingBetweenSlices = value
        ds.save_as(path, enforce_file_format=False)
    st = load_dicom(tmp_path / "s")
    np.testing.assert_allclose(st.geometry.slice_gaps, 8.0)
    w = [x for x in st.warnings if "SpacingBetweenSlices" in x]
    assert len(w) == 1 and f"SpacingBetweenSlices {shown} mm" in w[0], st.warnings
    assert "8.00 mm apart" in w[0] and "positions are used" in w[0] and "8 of 8 images" in w[0]
    # agreeing values: no warning
    st = load_dicom(write_dicom_series(study, tmp_path / "ok")[0].parent)
    assert not [x for x in st.warnings if "SpacingBetweenSlices" in x]


def test_unknown_transfer_syntax_and_frame_count(tmp_path):
    def ts(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    path = _break_one(tmp_path / "ts", ts)
    expect(UnsupportedTransferSyntaxError, lambda: load_dicom(tmp_path / "ts"),
           "TransferSyntaxUID", path.name, code=65)
    # NumberOfFrames far beyond the file: skipped as unreadable before any allocation,
    # then the missing image is a phase-count error (65) naming the file and the tag
    for n in (999_999_999, 2_147_483_647):
        path = _break_one(tmp_path / f"nf{n}", lambda ds: setattr(ds, "NumberOfFrames", n))
        expect(PhaseCountMismatchError, lambda: load_dicom(tmp_path / f"nf{n}"), "unreadable",
               path.name, f"NumberOfFrames {n}", code=65)


def _in_thread(fn, timeout=30.0):
    """fn() in a daemon thread: (finished, result or exception). A FIFO opened for
    reading would block forever; the thread lets the test fail instead of hanging."""
    import threading
    out = {}

    def target():
        try:
            out["value"] = fn()
        except Exception as exc:  # noqa: BLE001
            out["value"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), out.get("value")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs os.mkfifo")
def test_special_files_are_skipped_unopened(tmp_path):
    """FIFOs and symlinks leaving the folder are skipped (with a counted warning) without
    being opened; a symlink inside the folder is read like any file."""
    import os
    study = synthetic_study(phases=2, slices=4, rows=16, cols=16)
    paths = write_dicom_series(study, tmp_path / "dcm")
    outside = write_dicom_series(synthetic_study(phases=2, slices=4, rows=16, cols=16, seed=1),
                                 tmp_path / "other")
    os.mkfifo(tmp_path / "dcm" / "pipe.dcm")
    os.mkfifo(tmp_path / "dcm" / "pipe_noext")
    os.symlink(outside[0], tmp_path / "dcm" / "link_out.dcm")
    moved = paths[0].with_name("real.bin")
    paths[0].rename(moved)
    os.symlink(moved, paths[0])          # inside the folder: read
    done, got = _in_thread(lambda: load_study(tmp_path / "dcm"))
    assert done, "loading blocked on a FIFO"
    assert not isinstance(got, Exception), got
    assert got.images.shape == (2, 4, 16, 16)
    w = [x for x in got.warnings if "not regular files" in x]
    assert len(w) == 1 and "skipped 3 files" in w[0] and "FIFO" in w[0] and "outside" in w[0]
    # a FIFO given as the input itself: 65, not opened
    done, err = _in_thread(lambda: load_study(tmp_path / "dcm" / "pipe.dcm"))
    assert done and isinstance(err, InvalidStudyError) and "FIFO" in str(err), err
    # a folder of nothing but a FIFO: no images (66), not opened
    (tmp_path / "only").mkdir()
    os.mkfifo(tmp_path / "only" / "p")
    done, err = _in_thread(lambda: load_study(tmp_path / "only"))
    assert done and isinstance(err, NoImagesError) and "not opened" in str(err), err


def test_declared_pixel_size_is_capped_before_decoding(tmp_path, monkeypatch):
    """A header declaring more decoded pixels than MAX_PIXEL_BYTES is refused (65, naming
    the file and the tags) before any pixel data is read, compressed or not."""
    from deeprecon.runtime.io import dicom as dicom_mod
    monkeypatch.setattr(dicom_mod, "MAX_PIXEL_BYTES", 16 * 16 * 2 - 1)
    path = _break_one(tmp_path / "cap", lambda ds: None)
    err = expect(InvalidStudyError, lambda: load_dicom(tmp_path / "cap"), "NumberOfFrames",
                 "more than", code=65)
    assert path.parent.name in str(err)


def test_unknown_vr_in_sop_class_uid_is_an_unreadable_file(tmp_path):
    """An element whose VR bytes are damaged (pydicom fails when the value is first read)
    makes that file unreadable (skipped, counted), never an internal error."""
    path = _break_one(tmp_path / "vr", lambda ds: None)
    raw = path.read_bytes()
    assert raw.count(b"\x08\x00\x16\x00UI") == 1
    path.write_bytes(raw.replace(b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00UQ"))
    err = expect(PhaseCountMismatchError, lambda: load_dicom(tmp_path / "vr"), "unreadable",
                 code=65)
    assert path.name in str(err)
