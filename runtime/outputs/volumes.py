"""The NIfTI volumes of an output folder, one 3D file per phase (``FF`` = the source's
frame number, :func:`~deeprecon.runtime.result.frame_ids`), in patient space with the
study's orientation::

    segmentation/seg_frameFF.nii.gz  labels on the native grid (uint8, study geometry)
    hr/image_frameFF.nii.gz          high-resolution image (float32, the study's intensity
                                     units: the bundle's normalisation undone)
    hr/labels_frameFF.nii.gz         high-resolution labels (uint8); in-plane the model grid,
                                     slice spacing = native spacing / interp
    adapted/image_frameFF.nii.gz     (motion adaptation) the adapted images on the native
                                     grid (float32, the source's intensity units)

Each writer takes (result, staging folder) and writes its files under the folder.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..result import Result, frame_ids
from ..study import Geometry, volume_to_sitk

log = logging.getLogger(__name__)


def frame_tag(frame: int) -> str:
    """The file-name part of a frame number: ``frame04``."""
    return f"frame{frame:02d}"


def _slice_spacing(geometry: Geometry, fallback: float | None) -> float | None:
    """The ``slice_spacing`` to give :func:`volume_to_sitk`: None (the geometry's own
    centre-to-centre spacing) for a stack, ``fallback`` (e.g. the thickness; else 1 mm)
    for a single slice, whose geometry has no spacing."""
    s = geometry.slice_spacing
    if math.isfinite(s) and s > 0:
        return None           # volume_to_sitk takes it from the geometry
    return fallback if fallback is not None and fallback > 0 else 1.0


def to_study_intensity(result: Result, images: np.ndarray, slice_index: np.ndarray
                       ) -> tuple[np.ndarray, bool]:
    """Undo the bundle's intensity normalisation of model-grid images.

    images:      [P, Z, R, R] float32 in the transform's ``out_range`` (P = the Result's
                 phases);
    slice_index: [Z] the (fractional) native slice index of each of the Z slices, for a
                 per-slice normalisation (``intensity_scope="slice"``: interpolated).
    Returns (float32 images, True) in the study's intensity units, or (the images
    unchanged, False) when the transform's parameters do not fit the Result's phases.
    """
    t = result.transform
    lo = np.asarray(t.intensity_low, dtype=np.float64)
    hi = np.asarray(t.intensity_high, dtype=np.float64)
    P = images.shape[0]

    def per_phase(a: np.ndarray) -> np.ndarray | None:
        if a.shape[0] == 1:
            return np.repeat(a, P, axis=0)
        if a.shape[0] == result.study.n_phases and max(result.phases, default=-1) < a.shape[0]:
            return a[list(result.phases)]
        return a if a.shape[0] == P else None

    lo_p, hi_p = per_phase(lo), per_phase(hi)
    if lo_p is None or hi_p is None:
        return images, False
    if lo_p.shape[1] > 1:
        S = lo_p.shape[1]
        xs = np.arange(S, dtype=np.float64)
        lo_p = np.stack([np.interp(slice_index, xs, lo_p[p]) for p in range(P)])
        hi_p = np.stack([np.interp(slice_index, xs, hi_p[p]) for p in range(P)])
    a, b = t.out_range
    lo_b, hi_b = lo_p[:, :, None, None], hi_p[:, :, None, None]   # [P, 1|Z, 1, 1]
    raw = lo_b + (np.asarray(images, dtype=np.float64) - a) / (b - a) * (hi_b - lo_b)
    return raw.astype(np.float32), True


def _write_nifti(img, path: Path) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def write_segmentation(result: Result, stage: Path) -> None:
    """segmentation/seg_frameFF.nii.gz: native-grid labels, one 3D file per phase."""
    study = result.study
    labels = np.asarray(result.labels)
    if labels.shape != (result.n_phases,) + study.images.shape[1:]:
        raise UsageError(f"result.labels {labels.shape} must be [P={result.n_phases}, "
                         f"S, H, W] = {(result.n_phases,) + study.images.shape[1:]}")
    sz = _slice_spacing(study.geometry, study.geometry.slice_thickness)
    for p, frame in enumerate(frame_ids(result)):
        img = study.to_sitk(labels[p].astype(np.uint8, copy=False), slice_spacing=sz)
        _write_nifti(img, stage / "segmentation" / f"seg_{frame_tag(frame)}.nii.gz")


def write_hr(result: Result, stage: Path) -> None:
    """hr/image_frameFF.nii.gz and hr/labels_frameFF.nii.gz in ``result.hr_geometry``."""
    g = result.hr_geometry
    images = np.asarray(result.hr_images)
    labels = np.asarray(result.hr_labels)
    if images.ndim != 4 or images.shape[0] != result.n_phases or labels.shape != images.shape \
            or images.shape[1] != g.n_slices:
        raise UsageError(f"hr_images {images.shape} and hr_labels {labels.shape} must be "
                         f"[P={result.n_phases}, S_hr={g.n_slices}, R, R]")
    interp = max(1, int(result.interp))
    raw, ok = to_study_intensity(result, images, np.arange(g.n_slices) / interp)
    if not ok:
        log.warning("the transform's intensity parameters do not fit the phases: the "
                    "high-resolution images are written in the normalised range")
    thickness = result.study.geometry.slice_thickness
    sz = _slice_spacing(g, thickness / interp if thickness else None)
    for p, frame in enumerate(frame_ids(result)):
        tag = frame_tag(frame)
        _write_nifti(volume_to_sitk(raw[p], g, slice_spacing=sz), stage / "hr" / f"image_{tag}.nii.gz")
        _write_nifti(volume_to_sitk(labels[p].astype(np.uint8, copy=False), g, slice_spacing=sz),
                     stage / "hr" / f"labels_{tag}.nii.gz")


def write_adapted(result: Result, stage: Path) -> None:
    """adapted/image_frameFF.nii.gz: the adapted images (the adapted study's, on the
    native grid), one 3D file per phase."""
    study = result.study
    if max(result.phases, default=-1) >= study.n_phases:
        raise UsageError(f"phases {list(result.phases)} outside the adapted study's "
                         f"{study.n_phases} phases")
    sz = _slice_spacing(study.geometry, study.geometry.slice_thickness)
    for p, frame in zip(result.phases, frame_ids(result)):
        img = study.to_sitk(study.images[p].astype(np.float32, copy=False), slice_spacing=sz)
        _write_nifti(img, stage / "adapted" / f"image_{frame_tag(frame)}.nii.gz")


__all__ = ["write_segmentation", "write_hr", "write_adapted", "to_study_intensity", "frame_tag"]
