"""Issue 12, section 2: DICOM SEG for DICOM input, one per reconstructed phase, read back
with highdicom and pydicom: it references the source images of its phase, its frames lie
at their positions and orientation, and its labels are the NIfTI segmentation's."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_series import write_dicom_series  # noqa: E402

from deeprecon.runtime.cli import run  # noqa: E402
from deeprecon.runtime.io import load_acdc  # noqa: E402
from deeprecon.runtime.phantom import make_phantom  # noqa: E402


def _source_uid(frame) -> str:
    return frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID


def _check_seg_against_sources(out: Path, src: Path, origins: np.ndarray) -> int:
    """Every SEG of ``out`` against the source DICOM files and the NIfTI segmentation
    beside it (slices at ``origins``, the study's order); returns how many were read."""
    import highdicom as hd

    by_uid = {}
    for f in src.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_uid[ds.SOPInstanceUID] = ds
    segs = sorted((out / "segmentation").glob("seg_frame*.dcm"))
    for path in segs:
        seg = hd.seg.segread(path)
        assert seg.Modality == "SEG" and seg.SeriesDescription.startswith("deeprecon-rt segmentation")
        assert [d.SegmentLabel for d in seg.SegmentSequence] == ["LV cavity", "LV myocardium", "RV cavity"]
        refs = [r.ReferencedSOPInstanceUID
                for item in seg.ReferencedSeriesSequence for r in item.ReferencedInstanceSequence]
        assert len({float(by_uid[u].TriggerTime) for u in refs}) == 1  # one phase per SEG
        nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(path).replace(".dcm", ".nii.gz")))
        frames = list(seg.PerFrameFunctionalGroupsSequence)   # BINARY: slices x 3 segments
        assert len(frames) == 3 * nifti.shape[0] and len(refs) == nifti.shape[0]
        iop = [float(v) for v in seg.SharedFunctionalGroupsSequence[0]
               .PlaneOrientationSequence[0].ImageOrientationPatient]
        for frame in frames:
            ds = by_uid[_source_uid(frame)]
            ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            np.testing.assert_allclose(ipp, [float(v) for v in ds.ImagePositionPatient], atol=1e-3)
            np.testing.assert_allclose(iop, [float(v) for v in ds.ImageOrientationPatient], atol=1e-6)
        labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=refs,
                                                   combine_segments=True)
        for k, uid in enumerate(refs):
            ipp = np.array([float(v) for v in by_uid[uid].ImagePositionPatient])
            s = int(np.argmin(np.linalg.norm(origins - ipp, axis=1)))
            assert np.array_equal(labels[k], nifti[s]), (path.name, k)
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
    return len(segs)


def test_dicom_seg_of_a_phantom_series(tiny_bundle, tmp_path):
    st = make_phantom(slices=6, phases=2, seed=3, matrix=(64, 64), pixel_spacing_mm=3.0).study
    src = tmp_path / "dicom"
    write_dicom_series(st, src, description="cine_sax", series_number=7)
    out = tmp_path / "out"
    assert run(["reconstruct", str(src), "-o", str(out), "--bundle", str(tiny_bundle), "--fast",
                "--backend", "torch", "--device", "cpu"]) == 0
    assert _check_seg_against_sources(out, src, st.geometry.origins) == 2


def test_dicom_seg_of_an_acdc_patient_as_dicom(acdc_patient001, tiny_bundle, tmp_path):
    """The must-show case: an ACDC patient written as a DICOM series (both labelled
    phases), reconstructed: one SEG per phase, matching the source frames."""
    st = load_acdc(acdc_patient001)
    src = tmp_path / "dicom"
    write_dicom_series(st, src, description="cine_sax ACDC patient001", series_number=3)
    out = tmp_path / "out"
    assert run(["reconstruct", str(src), "-o", str(out), "--bundle", str(tiny_bundle), "--fast",
                "--backend", "torch", "--device", "cpu", "--phases", "all"]) == 0
    assert _check_seg_against_sources(out, src, st.geometry.origins) == st.n_phases


def test_no_seg_is_said_not_silent(monkeypatch):
    """A DICOM study whose SEG cannot be written gets a warning naming why; a NIfTI
    study none at all."""
    import dataclasses
    import types

    from deeprecon.runtime.outputs import dicom_seg

    st = make_phantom(slices=3, phases=1, seed=0, matrix=(32, 32), pixel_spacing_mm=3.0).study
    nifti = types.SimpleNamespace(study=st)
    assert not dicom_seg.wants_dicom_seg(nifti)
    refs = [[(f"/x/{s}.dcm", None) for s in range(3)]]
    dcm = types.SimpleNamespace(study=dataclasses.replace(st, source_format="dicom", image_refs=refs,
                                                          series_uid="1.2.3"))
    assert dicom_seg.wants_dicom_seg(dcm) and dicom_seg.dicom_seg_unavailable(dcm) is None
    multi = types.SimpleNamespace(study=dataclasses.replace(dcm.study, image_refs=[[("/x/e.dcm", k) for k in range(3)]]))
    assert "multi-frame" in dicom_seg.dicom_seg_unavailable(multi)
    merged = types.SimpleNamespace(study=dataclasses.replace(dcm.study, series_uid="1.2.3,1.2.4"))
    assert "several series" in dicom_seg.dicom_seg_unavailable(merged)
    monkeypatch.setitem(sys.modules, "highdicom", None)   # import highdicom -> ImportError
    msg = dicom_seg.dicom_seg_unavailable(dcm)
    assert "highdicom is not installed" in msg and "deeprecon-rt[dicom-seg]" in msg and "NIfTI only" in msg
