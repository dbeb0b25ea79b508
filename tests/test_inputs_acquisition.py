"""Issue 12, section 1: acquisition checks (long-axis view, single slice, perfusion) in
`study info` and before any network runs in `reconstruct`; `eval seg` reading ACDC's
label convention on its own; the default high-resolution factor.

Every refusal is checked by its exit code (65) and by its message naming the problem.
`reconstruct` is given a bundle path that does not exist: a refusal with exit 65 (not
66/69/78) shows that the study was refused before the bundle was even opened.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_series import rotated, rotation, subset, synthetic_study, write_dicom_series  # noqa: E402

from deeprecon.runtime.cli import run  # noqa: E402
from deeprecon.runtime.io import (DynamicSeriesError, LongAxisError, SingleSliceError,  # noqa: E402
                                  check_acquisition, load_study)
from deeprecon.runtime.io.acquisition import long_axis_angle_deg  # noqa: E402
from deeprecon.runtime.phantom import make_phantom  # noqa: E402
from deeprecon.runtime.pipeline import Reconstructor, default_interp, default_interp_reason  # noqa: E402
from deeprecon.runtime.study import ACDC_TO_PROJECT, volume_to_sitk  # noqa: E402


@pytest.fixture(scope="module")
def phantom():
    """A small phantom: oblique SAX stack (real heart-like normal) and its LAX planes."""
    return make_phantom(slices=4, phases=3, matrix=(40, 40), lax_matrix=(40, 40),
                        pixel_spacing_mm=3.0, lax_pixel_spacing_mm=3.0, thickness_samples=1)


def _refused(capsys, argv, *phrases, code=65):
    """run(argv) exits with ``code`` and one error line holding every phrase."""
    capsys.readouterr()
    rc = run([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, err
    line = next(ln for ln in err.splitlines() if ln.startswith("deeprecon-rt: error: "))
    for p in phrases:
        assert p in line, (p, line)
    return line


def _both_refuse(capsys, tmp_path, path, *phrases):
    """`study info` and `reconstruct` (before the bundle) refuse ``path`` with 65."""
    _refused(capsys, ["study", "info", path], *phrases)
    _refused(capsys, ["reconstruct", path, "-o", tmp_path / "out",
                      "--bundle", tmp_path / "no-such-bundle"], *phrases)
    assert not (tmp_path / "out").exists()


def _write_nifti(study_images, geometry, path, dt_ms=40.0):
    sp = geometry.slice_thickness or 8.0
    sitk.WriteImage(volume_to_sitk(study_images, geometry, slice_spacing=sp, dt_ms=dt_ms), str(path))
    return path


# --------------------------------------------------------------------------- long axis
def test_rule_angles(phantom):
    assert long_axis_angle_deg(phantom.study.geometry.normal) < 20          # the SAX normal
    for name, plane in phantom.lax.items():                                  # 2ch, 3ch, 4ch
        assert long_axis_angle_deg(plane.geometry.normal) > 70, name
    for axis in np.eye(3):                                                    # cardinal planes
        assert long_axis_angle_deg(axis) == pytest.approx(54.7356, abs=1e-3)


def test_phantom_lax_nifti_refused(phantom, tmp_path, capsys):
    plane = phantom.lax["4ch"]
    path = _write_nifti(plane.images[:, None], plane.geometry, tmp_path / "4ch.nii.gz")
    assert load_study(path).n_slices == 1              # the loader itself still reads it
    _both_refuse(capsys, tmp_path, path, "long-axis view", "1 slice", "deg from a short-axis")


def test_dicom_lax_refused_even_asked_for_by_uid(tmp_path, capsys):
    lax = rotated(synthetic_study(phases=3, slices=1, rows=16, cols=16), rotation([1, 0, 0], 70))
    write_dicom_series(lax, tmp_path / "lax", description="cine_4ch", series_uid="1.2.5.6")
    _refused(capsys, ["study", "info", tmp_path / "lax", "--series", "1.2.5.6"],
             "long-axis view", "70 deg")


def test_few_lax_slices_refused_many_oblique_slices_warned(tmp_path, capsys):
    st = synthetic_study(phases=3, slices=2, rows=16, cols=16)
    write_dicom_series(rotated(st, rotation([1, 0, 0], 70)), tmp_path / "two")
    _refused(capsys, ["study", "info", tmp_path / "two"], "long-axis view", "2 slices")
    many = rotated(synthetic_study(phases=3, slices=6, rows=16, cols=16), rotation([1, 0, 0], 70))
    write_dicom_series(many, tmp_path / "six")
    capsys.readouterr()
    assert run(["study", "info", "--json", str(tmp_path / "six")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert any("accepted as a short-axis stack because it has 6" in w for w in d["warnings"])


def test_sax_stacks_accepted(phantom, tmp_path, capsys):
    write_dicom_series(phantom.study, tmp_path / "sax")           # oblique, real-heart-like
    write_dicom_series(synthetic_study(phases=3, slices=4, rows=16, cols=16),
                       tmp_path / "axial")                        # identity direction (as ACDC)
    for name in ("sax", "axial"):
        capsys.readouterr()
        assert run(["study", "info", "--json", str(tmp_path / name)]) == 0, capsys.readouterr().err
        d = json.loads(capsys.readouterr().out)
        assert not any("deg from a typical short-axis" in w for w in d["warnings"])


# --------------------------------------------------------------------------- single slice
def test_single_sax_slice_refused(phantom, tmp_path, capsys):
    one = subset(phantom.study, slices=[2])
    write_dicom_series(one, tmp_path / "one", series_uid="1.2.9")
    assert load_study(tmp_path / "one", series="1.2.9").n_slices == 1   # loader: allowed
    line = _refused(capsys, ["study", "info", tmp_path / "one", "--series", "1.2.9"],
                    "a single slice", "at least 2 parallel short-axis slices")
    assert "long-axis" not in line
    path = _write_nifti(one.images, one.geometry, tmp_path / "one.nii.gz")
    _both_refuse(capsys, tmp_path, path, "a single slice")


def test_reconstructor_refuses_before_any_network(phantom):
    """The Python API checks too: a Reconstructor without a bundle or backend raises the
    acquisition error, so nothing of the model was touched."""
    rec = object.__new__(Reconstructor)
    with pytest.raises(SingleSliceError, match="a single slice"):
        rec.reconstruct(subset(phantom.study, slices=[1]))
    lax = phantom.lax["2ch"]
    st = dataclasses.replace(subset(phantom.study, slices=[0]), images=lax.images[:, None],
                             geometry=lax.geometry, labels=None)
    with pytest.raises(LongAxisError, match="long-axis view"):
        rec.reconstruct(st)


# --------------------------------------------------------------------------- perfusion
@pytest.mark.parametrize("slices", [1, 3])
def test_perfusion_dicom_same_trigger_time_refused(tmp_path, capsys, slices):
    """1 or 3 slices x 12 dynamics at one trigger time (was: 'no short-axis stack' or
    'duplicate images')."""
    perf = synthetic_study(phases=12, slices=slices, rows=16, cols=16)
    write_dicom_series(perf, tmp_path / "perf", description="cine-like name",
                       trigger_times=np.full(12, 120.0))
    _both_refuse(capsys, tmp_path, tmp_path / "perf", "perfusion/dynamic series",
                 "12 frames", "span 0.0 ms")


def test_perfusion_by_description_and_image_type(tmp_path, capsys):
    st = synthetic_study(phases=3, slices=4, rows=16, cols=16)
    write_dicom_series(st, tmp_path / "desc", description="tfl_perf_rest")
    _refused(capsys, ["study", "info", tmp_path / "desc"], "perfusion/dynamic series",
             "SeriesDescription 'tfl_perf_rest'")

    def edit(ds, p, s):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "PERFUSION"]
        return ds
    write_dicom_series(st, tmp_path / "itype", edit=edit)
    _refused(capsys, ["study", "info", tmp_path / "itype"], "perfusion/dynamic series",
             "ImageType 'PERFUSION'")
    path = _write_nifti(st.images, st.geometry, tmp_path / "stress_perfusion.nii.gz")
    _both_refuse(capsys, tmp_path, path, "perfusion/dynamic series", "'perfusion'")


def test_cine_beside_perfusion_is_picked(tmp_path, capsys):
    st = synthetic_study(phases=3, slices=4, rows=16, cols=16)
    write_dicom_series(st, tmp_path / "exam" / "cine", description="cine_sax", series_number=5)
    write_dicom_series(synthetic_study(phases=3, slices=3, rows=16, cols=16, seed=1),
                       tmp_path / "exam" / "perf", description="perfusion_stress", series_number=9)
    capsys.readouterr()
    assert run(["study", "info", "--json", str(tmp_path / "exam")]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["description"] == "cine_sax"


def test_dynamic_by_trigger_times_on_a_study(phantom):
    st = dataclasses.replace(phantom.study, trigger_times=np.full(3, 250.0), warnings=[])
    with pytest.raises(DynamicSeriesError, match="span 0.0 ms"):
        check_acquisition(st)
    assert check_acquisition(dataclasses.replace(phantom.study, warnings=[])) is not None


# --------------------------------------------------------------------------- eval seg
def _label_file(path, labels):
    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.SetSpacing((1.5, 1.5, 10.0))
    sitk.WriteImage(img, str(path))
    return path


def test_eval_seg_reads_acdc_convention(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lab = np.zeros((4, 24, 24), np.uint8)
    lab[:, 4:12, 4:12] = 1
    lab[:, 12:16, 4:12] = 2
    lab[:, 4:12, 14:20] = 3
    lab[rng.random(lab.shape) < 0.01] = 0
    pred = _label_file(tmp_path / "pred.nii.gz", lab)                      # project labels
    to_acdc = np.argsort(ACDC_TO_PROJECT).astype(np.uint8)
    ref = _label_file(tmp_path / "patient007_frame01_gt.nii.gz", to_acdc[lab])
    capsys.readouterr()
    assert run(["eval", "seg", str(pred), str(ref), "--json"]) == 0
    cap = capsys.readouterr()
    d = json.loads(cap.out)
    assert d["ref_convention"] == "acdc" and d["pred_convention"] == "project"
    assert all(m["dice"] == 1.0 for m in d["structures"].values())
    assert "acdc label convention (1 RV, 2 MYO, 3 LV; ACDC file name" in cap.err
    # the explicit option still wins
    assert run(["eval", "seg", str(pred), str(ref), "--json", "--ref-convention", "project"]) == 0
    cap = capsys.readouterr()
    d = json.loads(cap.out)
    assert d["ref_convention"] == "project" and d["ref_convention_from"] == "given"
    assert d["structures"]["LVC"]["dice"] < 0.5
    assert "project label convention (1 LVC, 2 LVM, 3 RVC; given)" in cap.err
    _refused(capsys, ["eval", "seg", pred, ref, "--ref-convention", "nnunet"],
             "--ref-convention must be", code=2)


# --------------------------------------------------------------------------- interp factor
def test_default_interp_at_least_two_when_a_slice_fits():
    def st(gap):
        return synthetic_study(phases=1, slices=3, rows=8, cols=8, slice_spacing=gap)
    assert default_interp(st(5.0), 4.0) == 2                 # was 1: no high-resolution slice
    n, why = default_interp_reason(st(5.0), 4.0)
    assert "raised to 2" in why and "2.50 mm high-resolution slices" in why
    assert default_interp(st(5.0), 2.5) == 2
    assert default_interp(st(10.0), 1.5) == 7
    assert default_interp(st(2.0), 2.5) == 1                 # the gap is finer than the pixels
    assert "no high-resolution slices needed" in default_interp_reason(st(2.0), 2.5)[1]
    assert default_interp(st(200.0), 1.0) == 32
