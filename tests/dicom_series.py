"""Test utility: write a Study as a DICOM MR cine series, the way scanners export them.

One file per (phase, slice) image, MR Image Storage, explicit VR little endian, with the
tags a cine short-axis loader needs (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, SliceThickness, SpacingBetweenSlices, TriggerTime, InstanceNumber,
CardiacNumberOfImages, RescaleSlope/Intercept, ...). Options reproduce what real
exports look like: shuffled file order, no file extension, nested folders, and an
``edit`` hook to break single files (for the loader's validation tests).

Also: ``enhanced=True`` writes one Enhanced MR multi-frame file with per-frame
functional groups, and helpers for synthetic and oblique studies.
"""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage,
                         generate_uid)

from deeprecon.runtime.study import Geometry, Study

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _ds_str(v: float) -> str:
    """A DS value (at most 16 characters) that keeps as much precision as fits."""
    for prec in range(12, 0, -1):
        s = f"{v:.{prec}g}"
        if len(s) <= 16:
            return s
    return f"{v:.0f}"


def _encode(images: np.ndarray) -> tuple[np.ndarray, float, float, int]:
    """Float images -> (stored integer array, slope, intercept, pixel representation).

    Integer-valued data that fits int16 / uint16 is stored exactly with slope 1;
    anything else is scaled into uint16 (lossy, like a scanner's float maps).
    """
    finite = images[np.isfinite(images)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    integral = finite.size and np.all(finite == np.round(finite))
    if integral and lo >= -32768 and hi <= 32767:
        return np.round(np.nan_to_num(images)).astype(np.int16), 1.0, 0.0, 1
    if integral and lo >= 0 and hi <= 65535:
        return np.round(np.nan_to_num(images)).astype(np.uint16), 1.0, 0.0, 0
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.round((np.nan_to_num(images) - lo) / slope).clip(0, 65535).astype(np.uint16)
    return stored, slope, lo, 0


def _base_dataset(sop_class: str, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def _common_tags(ds: Dataset, *, study_uid, series_uid, frame_uid, description, series_number,
                 modality, patient_id, rows, cols, pixel_repr):
    today = datetime.date(2024, 1, 15).strftime("%Y%m%d")
    ds.PatientName = "Test^Phantom"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.StudyDate = today
    ds.SeriesDate = today
    ds.StudyID = "1"
    ds.Modality = modality
    ds.Manufacturer = "deeprecon-tests"
    ds.SeriesDescription = description
    ds.SeriesNumber = series_number
    ds.MagneticFieldStrength = "1.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_repr


def default_trigger_times(study: Study) -> np.ndarray:
    """The study's trigger times, or 40 ms per phase id step where they are unknown (ACDC)."""
    t = np.asarray(study.trigger_times, dtype=np.float64)
    if np.all(np.isfinite(t)):
        return t
    ids = np.asarray(study.phase_ids, dtype=np.float64)
    return (ids - ids.min()) * 40.0


def write_dicom_series(study: Study, out_dir: str | Path, *,
                       series_uid: str | None = None, study_uid: str | None = None,
                       description: str = "CINE SAX", series_number: int = 5,
                       modality: str = "MR", trigger_times=None,
                       extension: str = ".dcm", shuffle: bool = False, seed: int = 0,
                       nested: bool = False, enhanced: bool = False,
                       patient_id: str = "TEST001",
                       slice_thickness: float | None = None,
                       edit: Callable[[Dataset, int, int], Dataset | None] | None = None,
                       ) -> list[Path]:
    """Write ``study`` as one DICOM file per image (or one Enhanced MR file).

    study:      images [P, S, H, W] (float32, raw values), geometry, trigger times.
    out_dir:    created if needed.
    extension:  ".dcm" or "" (scanners often write none).
    shuffle:    file names in random order (``seed``), so that name order says nothing.
    nested:     spread files over sub-folders (``a/b/``-style, like PACS exports).
    edit:       called as ``edit(ds, phase, slice)`` before writing; return None to skip
                the file, or the (modified) dataset.
    Returns the written paths, in (phase, slice) order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    P, S, H, W = study.images.shape
    g = study.geometry
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    tt = default_trigger_times(study) if trigger_times is None else np.asarray(trigger_times, float)
    stored, slope, intercept, pixel_repr = _encode(study.images)
    thickness = slice_thickness if slice_thickness is not None else (
        g.slice_thickness if g.slice_thickness is not None else
        (g.slice_spacing if np.isfinite(g.slice_spacing) else 8.0))
    spacing_between = g.slice_spacing if np.isfinite(g.slice_spacing) else thickness
    iop = [_ds_str(v) for v in np.r_[g.row_dir, g.col_dir]]
    common = dict(study_uid=study_uid, series_uid=series_uid, frame_uid=frame_uid,
                  description=description, series_number=series_number, modality=modality,
                  patient_id=patient_id, rows=H, cols=W, pixel_repr=pixel_repr)
    if enhanced:
        return [_write_enhanced(study, out_dir, stored, slope, intercept, tt, thickness,
                                spacing_between, iop, common, extension)]

    rng = np.random.default_rng(seed)
    order = np.arange(P * S)
    if shuffle:
        rng.shuffle(order)
    paths = []
    sop_class = MRImageStorage if modality == "MR" else CT_IMAGE_STORAGE
    for s in range(S):
        for p in range(P):
            k = s * P + p
            ds = _base_dataset(sop_class, generate_uid())
            _common_tags(ds, **common)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.InstanceNumber = k + 1                      # per slice, all phases (Siemens style)
            ds.ImagePositionPatient = [_ds_str(v) for v in g.origins[s]]
            ds.ImageOrientationPatient = iop
            ds.PixelSpacing = [_ds_str(v) for v in g.pixel_spacing]
            ds.SliceThickness = _ds_str(thickness)
            ds.SpacingBetweenSlices = _ds_str(spacing_between)
            ds.SliceLocation = _ds_str(float(g.positions[s]))
            ds.TriggerTime = _ds_str(float(tt[p]))
            ds.CardiacNumberOfImages = P
            ds.AcquisitionNumber = 1
            ds.RescaleIntercept = _ds_str(intercept)
            ds.RescaleSlope = _ds_str(slope)
            ds.RescaleType = "US"
            ds.PixelData = stored[p, s].tobytes()
            if edit is not None:
                ds = edit(ds, p, s)
                if ds is None:
                    continue
            name = f"IM{order[k]:05d}{extension}"
            folder = out_dir
            if nested:
                folder = out_dir / f"S{order[k] % 3:02d}" / f"D{order[k] % 2:02d}"
                folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def _write_enhanced(study, out_dir, stored, slope, intercept, tt, thickness, spacing_between,
                    iop, common, extension) -> Path:
    """One Enhanced MR Image Storage file: frames in (phase, slice) order."""
    P, S, H, W = study.images.shape
    g = study.geometry
    ds = _base_dataset(EnhancedMRImageStorage, generate_uid())
    _common_tags(ds, **common)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = P * S
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [_ds_str(v) for v in g.pixel_spacing]
    pm.SliceThickness = _ds_str(thickness)
    pm.SpacingBetweenSlices = _ds_str(spacing_between)
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = iop
    shared.PlaneOrientationSequence = Sequence([po])
    pvt = Dataset()
    pvt.RescaleIntercept = _ds_str(intercept)
    pvt.RescaleSlope = _ds_str(slope)
    pvt.RescaleType = "US"
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    pixels = []
    for p in range(P):
        for s in range(S):
            fg = Dataset()
            pp = Dataset()
            pp.ImagePositionPatient = [_ds_str(v) for v in g.origins[s]]
            fg.PlanePositionSequence = Sequence([pp])
            cs = Dataset()
            cs.NominalCardiacTriggerDelayTime = float(tt[p])
            fg.CardiacSynchronizationSequence = Sequence([cs])
            fc = Dataset()
            fc.TemporalPositionIndex = p + 1
            fc.InStackPositionNumber = s + 1
            fg.FrameContentSequence = Sequence([fc])
            frames.append(fg)
            pixels.append(stored[p, s])
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(pixels).tobytes()
    path = out_dir / f"ENH0001{extension}"
    ds.save_as(path, enforce_file_format=True)
    return path


def synthetic_study(*, phases: int = 3, slices: int = 4, rows: int = 32, cols: int = 32,
                    pixel_spacing=(1.5, 1.25), slice_spacing: float = 8.0,
                    row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 1.0, 0.0),
                    origin=(-20.0, -24.0, 30.0), seed: int = 0) -> Study:
    """A small Study with integer-valued images (exact through DICOM int16).

    images [phases, slices, rows, cols]: a bright disc whose radius changes with phase,
    plus noise; trigger times 0, 35, 70, ... ms.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    imgs = np.empty((phases, slices, rows, cols), np.float32)
    for p in range(phases):
        for s in range(slices):
            r = rows / 4 + 2 * np.sin(2 * np.pi * p / max(phases, 1)) + 0.3 * s
            disc = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < r * r
            imgs[p, s] = 100 + 400 * disc + rng.integers(0, 50, size=(rows, cols))
    row_dir = np.asarray(row_dir, float) / np.linalg.norm(row_dir)
    col_dir = np.asarray(col_dir, float) / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    origins = np.asarray(origin, float)[None] + np.arange(slices)[:, None] * slice_spacing * normal
    geo = Geometry(origins=origins, row_dir=row_dir, col_dir=col_dir,
                   pixel_spacing=pixel_spacing, slice_thickness=slice_spacing)
    return Study(images=imgs, geometry=geo, trigger_times=np.arange(phases) * 35.0,
                 source="synthetic", source_format="synthetic")


def rotation(axis, angle_deg: float) -> np.ndarray:
    """[3, 3] rotation matrix about ``axis`` by ``angle_deg`` degrees (Rodrigues)."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = np.radians(angle_deg)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def rotated(study: Study, R: np.ndarray, *, offset=(0.0, 0.0, 0.0)) -> Study:
    """The same study with its geometry rotated by R about the LPS origin, then shifted."""
    g = study.geometry
    geo = Geometry(origins=g.origins @ R.T + np.asarray(offset, float), row_dir=R @ g.row_dir,
                   col_dir=R @ g.col_dir, pixel_spacing=g.pixel_spacing,
                   slice_thickness=g.slice_thickness)
    return dataclasses.replace(study, geometry=geo, warnings=[])


def subset(study: Study, *, phases=None, slices=None) -> Study:
    """A study restricted to some phases / slices (index lists)."""
    ph = list(range(study.n_phases)) if phases is None else list(phases)
    sl = list(range(study.n_slices)) if slices is None else list(slices)
    lab = None if study.labels is None else study.labels[np.ix_(ph, sl)]
    return dataclasses.replace(
        study, images=study.images[np.ix_(ph, sl)], labels=lab,
        geometry=study.geometry.subset(sl), trigger_times=study.trigger_times[ph],
        phase_ids=[study.phase_ids[p] for p in ph], ed_phase=None, es_phase=None, warnings=[])


def read_back(path: str | Path) -> Dataset:
    """pydicom dataset of a written file (for tests that inspect tags)."""
    return pydicom.dcmread(path)
