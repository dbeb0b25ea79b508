"""Issue 13, section 1: every example of its "Why" list as a test, through the CLI.

Each hostile input goes through ``deeprecon-rt study info --json`` in-process (in a
thread, so that a hang fails instead of stopping the suite), with fd-level capture of
stderr (nifticlib and VNL print there from C++) and every Python warning recorded. A
refusal must be exit 65 or 66 with one error line naming the file (and the tag or
field) plus its hint, nothing else on stderr, no warning, no traceback; an input that is
repaired or partly ignored must exit 0 with a warning in the Study's warnings.

Also here: special files in NIfTI inputs and ACDC folders (FIFOs, devices, links leaving
the folder) and NIfTI files whose sform and qform disagree. The DICOM repairs
(PixelSpacing, SpacingBetweenSlices) have their unit tests in test_io_dicom.py.

Where each example of the issue is tested (this file unless named):

    internal errors (exit 70)
      unknown TransferSyntaxUID in one file      test_example[transfer_syntax_unknown]
      a changed VR of SOPClassUID                 test_example[sop_class_vr_changed]
      SamplesPerPixel 3                           test_example[samples_per_pixel_3]
      ED: inf in Info.cfg                         test_example[acdc_ed_inf]
      ImageOrientationPatient of 1e308            test_example[orientation_1e308]
      a NIfTI sform of NaNs                       test_example[nifti_sform_nan]
      PixelSpacing 1e-30                          test_example[pixel_spacing_1e-30]
    hangs, memory blow-ups
      NumberOfFrames 2147483647 in one file       test_example[number_of_frames_2g]
      a FIFO, links to /dev/zero, /dev/urandom
      beside a clean series                       test_special_files_beside_a_dicom_series
      (NIfTI files, ACDC folders)                 test_nifti_special_files_*, test_acdc_special_files_*
    garbage accepted with exit 0
      PixelSpacing NaN / 0 / inf in one of 20     test_one_pixel_spacing_of_20_repaired
                                                  (and test_io_dicom.py: *_repaired_*, *_not_safely_*)
      a non-orthogonal orientation                test_example[orientation_not_orthogonal]
      SliceThickness NaN, negative                test_example[slice_thickness_nan|negative]
      TriggerTime inf, NaN                        test_example[trigger_time_inf|nan]
      NIfTI pixdim 0, dim[3] = -5                 test_example[nifti_pixdim_0|nifti_dim3_minus5]
      a .nii.gz whose gzip CRC fails              test_example[nifti_gz_crc|nifti_gz_isize]
      Columns one less than the pixel data        test_example[columns_minus_one]
      NaN in the JSON output                      test_json_output_never_holds_nan
    data silently changed
      NaN/Inf voxels of a float NIfTI             test_example[nifti_nan_voxels|nifti_gz_inf_voxels]
      4D NIfTI in ms, 320 ms phase spacing        test_nifti_time_units_keep_trigger_times
      PixelData twice the declared size           test_example[pixel_data_doubled]
    stderr noise                                  every test here (fd-level capture) and
                                                  test_stderr_of_the_real_console_script
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_series import synthetic_study, write_dicom_series  # noqa: E402

from deeprecon.runtime.cli import run  # noqa: E402
from deeprecon.runtime.study import Geometry, Study  # noqa: E402

TIMEOUT_S = 20.0
# stderr may hold the error line, its indented hint / continuation lines and the
# runtime's own log lines (asctime levelname deeprecon.module: message); nothing else
_OWN_LINE = re.compile(r"^(deeprecon-rt: error: |  |\S+ \S+ (WARNING|INFO|ERROR) deeprecon\.)")

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
needs_dev = pytest.mark.skipif(not Path("/dev/zero").exists() or not Path("/dev/urandom").exists(),
                               reason="needs /dev/zero and /dev/urandom")


# --------------------------------------------------------------------------- running
def _cli(capfd, path: Path) -> tuple[int, str, str]:
    """``study info --json path`` in a thread: (exit code, stdout, stderr). Fails on a
    hang, a Python warning, a traceback or stderr lines that are not the runtime's."""
    box: dict = {}
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = threading.Thread(target=lambda: box.update(rc=run(["study", "info", "--json", str(path)])),
                             daemon=True)
        t0 = time.perf_counter()
        t.start()
        t.join(TIMEOUT_S)
    out, err = capfd.readouterr()
    assert not t.is_alive(), f"{path}: still running after {TIMEOUT_S:g} s"
    assert time.perf_counter() - t0 < TIMEOUT_S
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    assert "Traceback" not in err + out, err
    noise = [ln for ln in err.splitlines() if not _OWN_LINE.match(ln)]
    assert not noise, f"stderr noise: {noise[:5]}"
    return int(box["rc"]), out, err


def refused(capfd, path: Path, *phrases: str, codes=(65,)) -> str:
    """Exit code in ``codes``, one error line holding every phrase (its hint may follow)."""
    rc, out, err = _cli(capfd, path)
    assert rc in codes, (rc, err)
    errors = [ln for ln in err.splitlines() if ln.startswith("deeprecon-rt: error: ")]
    assert len(errors) == 1 and err.startswith("deeprecon-rt: error: "), err
    assert all(ln.startswith("  ") for ln in err.splitlines()[1:]), err
    for ph in phrases:
        assert ph.lower() in errors[0].lower(), f"{ph!r} not in: {errors[0]}"
    assert out == ""
    return errors[0]


def accepted(capfd, path: Path) -> dict:
    """Exit 0 and valid JSON (no NaN / Infinity) on stdout: the summary."""
    rc, out, err = _cli(capfd, path)
    assert rc == 0, err

    def no_constant(c):
        raise AssertionError(f"{c} in the JSON output")
    return json.loads(out, parse_constant=no_constant)


# --------------------------------------------------------------------------- inputs
def _dicom(folder: Path, mutate=None, *, index: int = 5, n_phases: int = 2,
           n_slices: int = 4) -> tuple[Path, Path]:
    """A clean series (n_slices x n_phases, 16 x 16) with ``mutate(ds)`` applied to file
    ``index`` (saved as it is). Returns (folder, that file)."""
    paths = write_dicom_series(synthetic_study(phases=n_phases, slices=n_slices, rows=16, cols=16),
                               folder)
    if mutate is not None:
        ds = pydicom.dcmread(paths[index])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # pydicom warns about the invalid values
            mutate(ds)
            ds.save_as(paths[index], enforce_file_format=False)
    return folder, paths[index]


def _nifti(path: Path, patches=(), *, dtype=np.int16, dt: float = 40.0, shape=(3, 4, 8, 8)) -> Path:
    """A 4D NIfTI-1 ([P, S, H, W] = shape, spacing 1.5 x 1.5 x 8 mm, time step dt) written
    by SimpleITK (sform and qform both set), with raw header bytes overwritten:
    patches = [(offset, struct format, value)]. ``path`` may end with .nii.gz."""
    a = (np.arange(int(np.prod(shape))).reshape(shape) % 50).astype(dtype)
    img = sitk.GetImageFromArray(a, isVector=False)
    img.SetSpacing((1.5, 1.5, 8.0, dt))
    img.SetOrigin((10.0, -20.0, 30.0, 0.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    if patches:
        gz = path.name.endswith(".gz")
        b = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
        for off, fmt, v in patches:
            struct.pack_into(fmt, b, off, v)
        path.write_bytes(gzip.compress(bytes(b)) if gz else bytes(b))
    return path


def tiny_acdc(folder: Path, info: str = "ED: 1\nES: 3\nGroup: NOR\nNbFrame: 3\n") -> Path:
    """A tiny ACDC patient folder: frames 1 and 3 (4 x 8 x 8) with labels, and Info.cfg
    (also the fuzzer's base case)."""
    folder.mkdir(parents=True)
    for frame in (1, 3):
        a = (np.arange(4 * 8 * 8).reshape(4, 8, 8) % 50).astype(np.int16)    # [S, H, W]
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((1.5, 1.5, 8.0))
        sitk.WriteImage(img, str(folder / f"patient001_frame{frame:02d}.nii.gz"))
        lab = sitk.GetImageFromArray((a % 4).astype(np.uint8))
        lab.CopyInformation(img)
        sitk.WriteImage(lab, str(folder / f"patient001_frame{frame:02d}_gt.nii.gz"))
    (folder / "Info.cfg").write_text(info)
    return folder


def _flip_gzip(path: Path, offset_from_end: int) -> Path:
    b = bytearray(path.read_bytes())
    b[len(b) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(b))
    return path


def _sop_class_vr_changed(tmp: Path) -> tuple[Path, Path]:
    """SOPClassUID's VR bytes changed from UI to UQ in one file (pydicom fails reading it)."""
    folder, path = _dicom(tmp / "d")
    raw = path.read_bytes()
    assert raw.count(b"\x08\x00\x16\x00UI") == 1
    path.write_bytes(raw.replace(b"\x08\x00\x16\x00UI", b"\x08\x00\x16\x00UQ"))
    return folder, path


def _ts(ds):
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"


def _same(path: Path) -> tuple[Path, Path]:
    """(input, the file its error names) for a file given itself."""
    return path, path


def _fifo(path: Path) -> tuple[Path, Path]:
    os.mkfifo(path)
    return path, path


def _link(target: str, path: Path) -> tuple[Path, Path]:
    os.symlink(target, path)
    return path, path


# name -> (build(tmp) -> (input, file named in the error), phrases)
_F32 = dict(dtype=np.float32)
EXAMPLES = {
    # internal errors (exit 70) before
    "transfer_syntax_unknown": (lambda t: _dicom(t / "d", _ts), ["TransferSyntaxUID"]),
    "sop_class_vr_changed": (_sop_class_vr_changed, ["unreadable", "malformed header"]),
    "samples_per_pixel_3": (lambda t: _dicom(t / "d", lambda ds: setattr(ds, "SamplesPerPixel", 3)),
                            ["SamplesPerPixel 3"]),
    "acdc_ed_inf": (lambda t: (tiny_acdc(t / "p", "ED: inf\nES: 3\nNbFrame: 3\n"), t / "p" / "Info.cfg"),
                    ["ED and ES"]),
    "orientation_1e308": (lambda t: _dicom(t / "d", lambda ds: setattr(
        ds, "ImageOrientationPatient", ["1e308"] * 6)), ["ImageOrientationPatient"]),
    "nifti_sform_nan": (lambda t: _same(_nifti(
        t / "s.nii", [(280 + 4 * k, "<f", float("nan")) for k in range(12)])), ["srow"]),
    "pixel_spacing_1e-30": (lambda t: _dicom(t / "d", lambda ds: setattr(
        ds, "PixelSpacing", ["1e-30", "1e-30"])), ["PixelSpacing"]),
    # hangs and memory blow-ups before
    "number_of_frames_2g": (lambda t: _dicom(t / "d", lambda ds: setattr(
        ds, "NumberOfFrames", "2147483647")), ["NumberOfFrames 2147483647"]),
    # garbage accepted with exit 0 before
    "orientation_not_orthogonal": (lambda t: _dicom(t / "d", lambda ds: setattr(
        ds, "ImageOrientationPatient", [1, 0, 0, 0.3, 0.95, 0])), ["ImageOrientationPatient",
                                                                    "orthonormal"]),
    "slice_thickness_nan": (lambda t: _dicom(t / "d", lambda ds: setattr(ds, "SliceThickness", "nan")),
                            ["SliceThickness"]),
    "slice_thickness_negative": (lambda t: _dicom(t / "d", lambda ds: setattr(
        ds, "SliceThickness", "-3")), ["SliceThickness"]),
    "trigger_time_inf": (lambda t: _dicom(t / "d", lambda ds: setattr(ds, "TriggerTime", "inf")),
                         ["TriggerTime"]),
    "trigger_time_nan": (lambda t: _dicom(t / "d", lambda ds: setattr(ds, "TriggerTime", "nan")),
                         ["TriggerTime"]),
    "nifti_pixdim_0": (lambda t: _same(_nifti(t / "s.nii", [(80, "<f", 0.0)])),
                       ["pixdim[1]"]),
    "nifti_dim3_minus5": (lambda t: _same(_nifti(t / "s.nii", [(46, "<h", -5)])),
                          ["dim[3] -5"]),
    "nifti_dim1_minus1": (lambda t: _same(_nifti(t / "s.nii", [(42, "<h", -1)])),
                          ["dim[1] -1"]),
    "nifti_gz_crc": (lambda t: _same(_flip_gzip(_nifti(
        t / "s.nii.gz", shape=(3, 10, 128, 128)), 6)), ["gzip", "CRC"]),
    "nifti_gz_isize": (lambda t: _same(_flip_gzip(_nifti(
        t / "s.nii.gz", shape=(3, 10, 128, 128)), 2)), ["gzip", "length"]),
    "columns_minus_one": (lambda t: _dicom(t / "d", lambda ds: setattr(ds, "Columns", 15)),
                          ["PixelData"]),
    # data silently changed before
    "nifti_nan_voxels": (lambda t: _same(_nifti(t / "s.nii", [(352, "<f", float("nan"))], **_F32)),
                         ["1 NaN or infinite voxel"]),
    "nifti_gz_inf_voxels": (lambda t: _same(_nifti(
        t / "s.nii.gz", [(352, "<f", float("inf")), (400, "<f", -float("inf"))], **_F32)),
        ["2 NaN or infinite voxel"]),
    "pixel_data_doubled": (lambda t: _dicom(t / "d", lambda ds: setattr(
        ds, "PixelData", ds.PixelData * 2)), ["PixelData"]),
    # special files as the input itself
    "nifti_is_a_fifo": (lambda t: _fifo(t / "s.nii"), ["FIFO"]),
    "nifti_links_to_dev_zero": (lambda t: _link("/dev/zero", t / "s.nii.gz"), ["device"]),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example(tmp_path, capfd, name):
    """One example of the issue: refused with 65, one line naming the file and the tag."""
    build, phrases = EXAMPLES[name]
    if "fifo" in name and not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    target, named = build(tmp_path)
    refused(capfd, target, named.name, *phrases)


def test_one_pixel_spacing_of_20_repaired(tmp_path, capfd):
    """PixelSpacing NaN, 0 or inf in one file of 20 (all others agree): exit 0 with the
    others' spacing and a warning naming the file; in two files: refused."""
    for bad in (["nan", "nan"], ["0", "0"], ["inf", "inf"]):
        folder, path = _dicom(tmp_path / bad[0], lambda ds: setattr(ds, "PixelSpacing", bad),
                              index=11, n_phases=4, n_slices=5)
        d = accepted(capfd, folder)
        assert d["pixel_spacing_mm"] == [1.5, 1.25] and (d["phases"], d["slices"]) == (4, 5)
        assert any("repaired" in w and path.name in w for w in d["warnings"]), d["warnings"]
        second = sorted(folder.iterdir())[0]
        ds = pydicom.dcmread(second)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.PixelSpacing = bad
            ds.save_as(second, enforce_file_format=False)
        refused(capfd, folder, "PixelSpacing", path.name)


@needs_fifo
@needs_dev
def test_special_files_beside_a_dicom_series(tmp_path, capfd):
    """A FIFO and links to /dev/zero and /dev/urandom beside a clean series: never
    opened (no hang, no 2 GB read), the series loads with a warning naming them."""
    folder, _ = _dicom(tmp_path / "d")
    os.mkfifo(folder / "pipe")
    os.symlink("/dev/zero", folder / "zero.dcm")
    os.symlink("/dev/urandom", folder / "random")
    d = accepted(capfd, folder)
    w = [x for x in d["warnings"] if "not regular files" in x]
    assert len(w) == 1 and all(n in w[0] for n in ("pipe", "zero.dcm", "random", "FIFO")), w


def test_json_output_never_holds_nan(tmp_path, capfd):
    """study info's JSON is valid JSON: unknown trigger times are null, and so is any
    NaN / inf that reaches ``info`` (describe() is the one place that converts)."""
    d = accepted(capfd, _nifti(tmp_path / "s.nii", dt=1.0))   # time step 1.0: unknown
    assert d["trigger_times_ms"] == [None, None, None]
    geo = Geometry(origins=np.arange(3)[:, None] * np.array([0.0, 0.0, 8.0]), row_dir=(1, 0, 0),
                   col_dir=(0, 1, 0), pixel_spacing=(1.5, 1.5), slice_thickness=float("nan"))
    st = Study(images=np.zeros((2, 3, 4, 4)), geometry=geo,
               trigger_times=np.array([0.0, np.inf]),
               info={"spread": float("nan"), "nested": [np.float32("inf"), 1.5]})
    text = json.dumps(st.describe(), allow_nan=False)   # raises on NaN / inf
    back = json.loads(text)
    assert back["trigger_times_ms"] == [0.0, None] and back["slice_thickness_mm"] is None
    assert back["info"] == {"spread": None, "nested": [None, 1.5]}


@pytest.mark.parametrize("units, dt, want", [
    (2 | 16, 320.0, 320.0),     # msec: ITK reports 0.32 (seconds); the raw header says 320 ms
    (2 | 8, 0.32, 320.0),       # sec, a short cine: seconds
    (2 | 24, 320000.0, 320.0),  # usec
    (2 | 8, 40.0, 40.0),        # 'sec' on a 40-unit step (how ITK writes ms): ms
    (2, 40.0, 40.0),            # no unit: ms
])
def test_nifti_time_units_keep_trigger_times(tmp_path, capfd, units, dt, want):
    path = _nifti(tmp_path / "s.nii.gz", [(123, "<B", units)], dt=dt)
    d = accepted(capfd, path)
    np.testing.assert_allclose(d["trigger_times_ms"], [0.0, want, 2 * want], rtol=1e-6)
    assert not d["warnings"]


# --------------------------------------------------------------------------- special files
def _special(path: Path, kind: str, outside: Path) -> None:
    if os.path.lexists(path):
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink({"dev_zero": "/dev/zero", "dev_urandom": "/dev/urandom",
                    "link_out": str(outside)}[kind], path)


@needs_fifo
@needs_dev
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dev_urandom", "link_out"])
@pytest.mark.parametrize("name", ["sax.nii.gz", "sax_gt.nii.gz"])
def test_nifti_special_files_are_refused_unopened(tmp_path, capfd, kind, name):
    """In a NIfTI input's folder (the image itself, or the label found beside it): a FIFO,
    a device, a link leaving the folder: refused (65) naming it, never opened."""
    outside = _nifti(tmp_path / "elsewhere" / "x.nii.gz")
    folder = tmp_path / "in"
    _nifti(folder / "sax.nii.gz")
    _special(folder / name, kind, outside)
    what = {"fifo": "FIFO", "dev_zero": "outside", "dev_urandom": "outside",
            "link_out": "outside the input folder"}[kind]
    refused(capfd, folder, name, "not a regular file", what)
    if name == "sax_gt.nii.gz":        # the image named itself: its label is still checked
        refused(capfd, folder / "sax.nii.gz", name, "not a regular file")


@needs_fifo
@needs_dev
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dev_urandom", "link_out"])
@pytest.mark.parametrize("name", ["Info.cfg", "patient001_frame01.nii.gz",
                                  "patient001_frame03_gt.nii.gz"])
def test_acdc_special_files_are_refused_unopened(tmp_path, capfd, kind, name):
    """In an ACDC folder (Info.cfg, a frame, a label): a FIFO, a device, a link leaving
    the folder: refused (65) naming it, never opened."""
    outside = _nifti(tmp_path / "elsewhere" / "x.nii.gz")
    folder = tiny_acdc(tmp_path / "p")
    _special(folder / name, kind, outside)
    refused(capfd, folder, name, "not a regular file")


def test_links_inside_the_folder_are_read(tmp_path, capfd):
    """A symlink that stays inside the input folder is an ordinary file."""
    folder = tiny_acdc(tmp_path / "p")
    (folder / "data").mkdir()
    for name in ("patient001_frame01.nii.gz", "Info.cfg"):
        (folder / name).rename(folder / "data" / name)
        os.symlink(Path("data") / name, folder / name)
    d = accepted(capfd, folder)
    assert (d["phases"], d["slices"], d["has_labels"]) == (2, 4, True)
    n = _nifti(tmp_path / "n" / "data" / "sax.nii.gz")
    os.symlink(n, tmp_path / "n" / "sax.nii.gz")
    assert accepted(capfd, tmp_path / "n")["phases"] == 3


# --------------------------------------------------------------------------- sform / qform
@pytest.mark.parametrize("shift_mm, ok", [(0.0, True), (0.3, True), (5.0, False)])
def test_sform_and_qform_must_agree(tmp_path, capfd, shift_mm, ok):
    """Both set (SimpleITK writes both, codes 1): a shift of the sform's x offset by more
    than half a voxel (0.75 mm here) is refused naming both transforms; less is fine."""
    path = _nifti(tmp_path / "s.nii", [(292, "<f", -10.0 + shift_mm)])   # srow_x[3] is -10
    if ok:
        assert accepted(capfd, path)["phases"] == 3
    else:
        refused(capfd, path, path.name, "sform", "qform", "disagree", "5 mm")


def test_qform_is_ignored_when_its_code_is_0(tmp_path, capfd):
    path = _nifti(tmp_path / "s.nii", [(252, "<h", 0), (268, "<f", 99.0)])  # qoffset_x = 99
    assert accepted(capfd, path)["phases"] == 3


# --------------------------------------------------------------------------- real process
def test_stderr_of_the_real_console_script(tmp_path):
    """The console script in a fresh process (Python's default warning filters: a leaked
    warning would print): a DICOM series whose headers make pydicom warn, a NIfTI whose
    NaN sform makes VNL print, one whose dim[1] makes nifticlib print. stderr: the error
    line and its hint, or (exit 0) only the runtime's own log lines."""
    exe = shutil.which("deeprecon-rt") or str(Path(sys.executable).parent / "deeprecon-rt")
    if not Path(exe).exists():
        pytest.skip("the deeprecon-rt console script is not installed")
    loud, _ = _dicom(tmp_path / "loud", lambda ds: (setattr(ds, "SeriesDescription", "x" * 70),
                                                   setattr(ds, "TriggerTime", "nan")))
    uid, _ = _dicom(tmp_path / "uid", lambda ds: ds.__setitem__(
        "SOPInstanceUID", pydicom.DataElement(0x00080018, "UN", b"\x01\x02\x03")))
    cases = [(loud, 65), (uid, 0),
             (_nifti(tmp_path / "a.nii", [(280 + 4 * k, "<f", float("nan")) for k in range(12)]), 65),
             (_nifti(tmp_path / "b.nii", [(42, "<h", -1)]), 65)]
    for path, code in cases:
        p = subprocess.run([exe, "study", "info", "--json", str(path)], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="default"))
        assert p.returncode == code, (path, p.stderr)
        noise = [ln for ln in p.stderr.splitlines() if not _OWN_LINE.match(ln)]
        assert not noise, (path, noise[:5])
        if code:
            assert p.stderr.startswith("deeprecon-rt: error: ") and p.stdout == ""
            assert len(p.stderr.splitlines()) == 2, p.stderr   # the error and its hint
