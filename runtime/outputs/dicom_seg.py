"""segmentation/seg_frameFF.dcm: the native-grid segmentation as DICOM SEG (highdicom),
for a study read from DICOM.

One SEG instance per reconstructed phase (a SEG across phases would hold several frames
at one position, which highdicom refuses), all in one new series. Each references the
source MR images of its phase (one frame per source slice, same positions and
orientation, copied by highdicom from the sources) and has three segments, LV cavity,
LV myocardium and RV cavity (SNOMED CT codes, the QC pictures' colours), made by an
automatic algorithm named with the bundle that produced them.

Written when the study came from single-frame DICOM images and highdicom is installed
(the ``dicom-seg`` extra); otherwise a warning in the run report says why there is no
SEG (never silently): highdicom missing, a multi-frame (Enhanced MR) source, or source
images of several series (merged single-slice series), which one SEG cannot reference.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..qc import LABEL_COLOURS
from ..result import Result, frame_ids
from ..study import LABEL_NAMES_LONG
from .volumes import frame_tag

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'deeprecon-rt[dicom-seg]'"
SERIES_DESCRIPTION = "deeprecon-rt segmentation"
# SNOMED CT property types of the project labels (1 LVC, 2 LVM, 3 RVC)
_PROPERTY_TYPES = {1: ("87878005", "Left ventricle"),
                   2: ("49848007", "Left ventricle myocardium"),
                   3: ("53085002", "Right ventricle")}


def _segment_descriptions(hd, algorithm_name: str, version: str) -> list:
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=version, family=codes.cid7162.ArtificialIntelligence)
    out = []
    for k, (value, meaning) in _PROPERTY_TYPES.items():
        out.append(hd.seg.SegmentDescription(
            segment_number=k, segment_label=LABEL_NAMES_LONG[k],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=Code(value, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(
                *(int(LABEL_COLOURS[k][i:i + 2], 16) for i in (1, 3, 5)))))
    return out


def wants_dicom_seg(result: Result) -> bool:
    """True for a study read from DICOM (its segmentation is also written as SEG)."""
    return result.study.source_format == "dicom"


def dicom_seg_unavailable(result: Result) -> str | None:
    """For a DICOM study, the warning that says why no SEG can be written (see the
    module docstring), or None when it can."""
    why = _unavailable_reason(result)
    return None if why is None else f"no DICOM SEG written: {why}; the segmentation is in NIfTI only"


def _unavailable_reason(result: Result) -> str | None:
    refs = result.study.image_refs
    if refs is None:
        return "the study has no DICOM source images"
    if any(frame is not None for row in refs for _, frame in row):
        return "its source is a multi-frame (Enhanced MR) object, which this writer does not reference yet"
    if "," in (result.study.series_uid or ""):
        return "its source images belong to several series (merged single-slice series)"
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return f"highdicom is not installed ({EXTRA_HINT})"
    return None


# Type 2 attributes of the patient and study modules that a SEG copies from its source:
# anonymised exports often drop them; they are added empty (valid DICOM) to the copy
# read into memory, never to the source files.
_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                        "AccessionNumber")


def _read_source(path: str):
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def write_dicom_seg(result: Result, stage: Path) -> list[str]:
    """Write one SEG per reconstructed phase into ``stage/segmentation/`` (call only when
    :func:`dicom_seg_unavailable` is None). Returns the warnings for the run report: when
    highdicom refuses the sources (an attribute the SEG must copy is invalid), no SEG is
    written and the warning says why; the other outputs are not affected."""
    try:
        _write(result, stage)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        for f in (stage / "segmentation").glob("seg_*.dcm"):
            f.unlink()
        msg = " ".join(str(e).split())[:300]
        log.warning("no DICOM SEG written: highdicom refused the source images: %s", msg)
        return [f"no DICOM SEG written: highdicom refused the source images ({type(e).__name__}: "
                f"{msg}); the segmentation is in NIfTI only"]
    return []


def _write(result: Result, stage: Path) -> None:
    import highdicom as hd

    from .. import __version__ as version
    bundle = result.bundle or {}
    model = str(bundle.get("name") or "unknown model")
    descriptions = _segment_descriptions(hd, f"deeprecon-rt {model}", version)
    labels = np.asarray(result.labels, dtype=np.uint8)
    series_uid = hd.UID()
    first = None
    for p, (phase, frame) in enumerate(zip(result.phases, frame_ids(result))):
        sources = [_read_source(path) for path, _ in result.study.image_refs[phase]]
        first = first or sources[0]
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=labels[p],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=series_uid,
            series_number=_series_number(first), sop_instance_uid=hd.UID(), instance_number=p + 1,
            manufacturer="deeprecon-rt", manufacturer_model_name=model[:64],
            software_versions=version, device_serial_number="none",
            series_description=f"{SERIES_DESCRIPTION} ({model})"[:64],
            content_description=f"LV cavity, LV myocardium, RV cavity at {result.study.phase_name(phase)}"[:64],
            omit_empty_frames=False)
        path = stage / "segmentation" / f"seg_{frame_tag(frame)}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        seg.save_as(path)
    log.info("DICOM SEG: %d phase(s) written, series %s", len(result.phases), series_uid)


def _series_number(source: Any) -> int:
    """The SEG series number: the source's plus 1000 (kept within the IS range)."""
    try:
        return int(source.SeriesNumber) % 100000 + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000


__all__ = ["write_dicom_seg", "dicom_seg_unavailable", "wants_dicom_seg"]
