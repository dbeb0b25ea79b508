"""Segmentation metrics per structure on the physical grid: Dice, HD95 and ASSD in mm.

Definitions (the MedPy conventions used by the ACDC evaluation and most papers):

- Dice = 2 |A n B| / (|A| + |B|), counted over the whole volume (3D Dice).
- Surface of a mask: its voxels with at least one face-neighbour (6-connectivity in 3D,
  4 in 2D) outside the mask; voxels on the array border count as surface (the outside of
  the array is background).
- Directed surface distances d(A -> B): for every surface voxel of A, the Euclidean
  distance in mm from its centre to the nearest surface-voxel centre of B, computed with
  an exact Euclidean distance transform on the anisotropic grid
  (``scipy.ndimage.distance_transform_edt(sampling=spacing)``).
- HD95 = the 95th percentile (numpy's linear interpolation) of the *pooled* distances,
  d(A -> B) and d(B -> A) concatenated (MedPy's ``hd95``; MONAI instead takes the larger
  of the two directed 95th percentiles, which is >= this value).
- HD (``hausdorff``) = the maximum of the pooled distances.
- ASSD = the mean of the two directed mean distances, (mean d(A -> B) + mean d(B -> A)) / 2
  (MedPy's ``assd``).

Absent structures: absent in both -> Dice, HD95 and ASSD are NaN (nothing to compare;
reported as null in JSON and skipped by means); absent in exactly one -> Dice 0 and
HD95 = ASSD = +inf (null in JSON, flagged by ``"absent_in"``).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from deeprecon.runtime.errors import InvalidStudyError, NoInputError, UsageError
from deeprecon.runtime.io.nifti import labels_to_project
from deeprecon.runtime.jsonsafe import json_safe
from deeprecon.runtime.study import LABELS

log = logging.getLogger(__name__)

GRID_ATOL = 1e-3  # mm (origin, spacing) and direction cosines: two grids match within this
LABEL_CONVENTIONS = ("project", "acdc")


def _mask(a: np.ndarray, label: int | None) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(bool) if label is None else a == label


def dice(pred: np.ndarray, ref: np.ndarray, label: int | None = None) -> float:
    """Dice overlap of ``pred == label`` and ``ref == label`` (boolean masks if label is None).

    pred, ref: integer label arrays of equal shape (any dimension).
    Returns a float in [0, 1]; NaN when the structure is absent in both.
    """
    a, b = _mask(pred, label), _mask(ref, label)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    na, nb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    if na + nb == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(a & b)) / (na + nb)


def surface_mask(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a mask: voxels with a face-neighbour outside (array border included)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in np.atleast_1d(spacing))
    if len(sp) != ndim:
        raise ValueError(f"spacing has {len(sp)} values for a {ndim}D array")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive, got {sp}")
    return sp


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two boolean masks (both non-empty).

    a, b: boolean arrays of equal shape (2D or 3D, any size);
    spacing: voxel size per array axis in mm (e.g. (z, y, x)).
    Returns (d(a -> b) [n_surface(a)], d(b -> a) [n_surface(b)]) float64 mm.
    The distance transforms run on the bounding box of a | b only (exact: every surface
    voxel lies inside it).
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    sp = _check_spacing(spacing, a.ndim)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    both = a | b
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(both))
    a, b = a[box], b[box]
    sa, sb = surface_mask(a), surface_mask(b)
    dt_b = ndimage.distance_transform_edt(~sb, sampling=sp)
    dt_a = ndimage.distance_transform_edt(~sa, sampling=sp)
    return dt_b[sa], dt_a[sb]


def _pair(pred, ref, label):
    a, b = _mask(pred, label), _mask(ref, label)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return a, b, a.any(), b.any()


def _absent(has_pred: bool, has_ref: bool) -> float:
    """Distance for a structure missing from one or both volumes: NaN if absent in both,
    +inf if absent in one."""
    return float("nan") if not has_pred and not has_ref else float("inf")


def _hd_from(dab: np.ndarray, dba: np.ndarray, percentile: float = 95.0) -> float:
    return float(np.percentile(np.concatenate([dab, dba]), percentile))


def _assd_from(dab: np.ndarray, dba: np.ndarray) -> float:
    return float((dab.mean() + dba.mean()) / 2.0)


def hausdorff95(pred: np.ndarray, ref: np.ndarray, label: int | None, spacing: Sequence[float],
                *, percentile: float = 95.0) -> float:
    """HD95 in mm: the ``percentile`` of the pooled symmetric surface distances.

    pred, ref: label arrays (2D or 3D); label: the structure (None: boolean masks);
    spacing: voxel size per axis, mm. NaN if absent in both, +inf if absent in one.
    """
    a, b, ha, hb = _pair(pred, ref, label)
    if not (ha and hb):
        return _absent(ha, hb)
    return _hd_from(*surface_distances(a, b, spacing), percentile)


def hausdorff(pred: np.ndarray, ref: np.ndarray, label: int | None, spacing: Sequence[float]) -> float:
    """The (100 %) Hausdorff distance in mm between the surfaces; NaN/inf as :func:`hausdorff95`."""
    return hausdorff95(pred, ref, label, spacing, percentile=100.0)


def assd(pred: np.ndarray, ref: np.ndarray, label: int | None, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm, (mean d(p->r) + mean d(r->p)) / 2.

    NaN if absent in both, +inf if absent in one.
    """
    a, b, ha, hb = _pair(pred, ref, label)
    if not (ha and hb):
        return _absent(ha, hb)
    return _assd_from(*surface_distances(a, b, spacing))


def structure_metrics(pred: np.ndarray, ref: np.ndarray, label: int | None,
                      spacing: Sequence[float]) -> dict[str, Any]:
    """Dice, HD95, ASSD (mm), voxel counts and volumes (mL) of one structure in one volume.

    pred, ref: [S, H, W] (or 2D) label arrays; spacing (z, y, x) mm (one value per axis).
    The surface distances are computed once for both HD95 and ASSD.
    """
    a, b, ha, hb = _pair(pred, ref, label)
    sp = _check_spacing(spacing, a.ndim)
    voxel_ml = float(np.prod(sp)) / 1000.0
    na, nb = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    if ha and hb:
        dab, dba = surface_distances(a, b, sp)
        hd95, mean_sd = _hd_from(dab, dba), _assd_from(dab, dba)
    else:
        hd95 = mean_sd = _absent(ha, hb)
    out: dict[str, Any] = {"dice": dice(a, b), "hd95_mm": hd95, "assd_mm": mean_sd,
                           "pred_voxels": na, "ref_voxels": nb,
                           "pred_volume_ml": na * voxel_ml, "ref_volume_ml": nb * voxel_ml}
    if ha != hb:
        out["absent_in"] = "ref" if ha else "pred"
    return out


_MEAN_KEYS = ("dice", "hd95_mm", "assd_mm", "pred_volume_ml", "ref_volume_ml")


def evaluate_segmentation(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], *,
                          labels: Sequence[int] = (1, 2, 3)) -> dict[str, dict[str, Any]]:
    """Per-structure metrics between two label volumes on the same grid.

    pred, ref: [S, H, W] or [P, S, H, W] integer arrays in the project convention
               (1 LVC, 2 LVM, 3 RVC);
    spacing:   (z, y, x) voxel size in mm (slice spacing, row spacing, column spacing);
    labels:    the structures to evaluate.
    Returns {name: {"dice", "hd95_mm", "assd_mm", "pred_voxels", "ref_voxels",
    "pred_volume_ml", "ref_volume_ml"}} with name from LABELS ("LVC", "LVM", "RVC").
    For [P, S, H, W] every phase is its own 3D volume: the values are the means over the
    phases (NaN phases skipped; an inf phase makes the mean inf), voxel counts are sums,
    and ``"per_phase"`` lists each phase's metrics.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} != ref shape {ref.shape}")
    if pred.ndim not in (3, 4):
        raise ValueError(f"expected [S, H, W] or [P, S, H, W] label arrays, got {pred.shape}")
    sp = _check_spacing(spacing, 3)
    out: dict[str, dict[str, Any]] = {}
    for lab in labels:
        name = LABELS.get(int(lab), f"label{int(lab)}")
        if pred.ndim == 3:
            out[name] = structure_metrics(pred, ref, lab, sp)
            continue
        per = [structure_metrics(pred[p], ref[p], lab, sp) for p in range(pred.shape[0])]
        agg: dict[str, Any] = {}
        for k in _MEAN_KEYS:
            vals = np.array([m[k] for m in per], dtype=np.float64)
            finite_or_inf = vals[~np.isnan(vals)]
            agg[k] = float(finite_or_inf.mean()) if finite_or_inf.size else float("nan")
        agg["pred_voxels"] = int(sum(m["pred_voxels"] for m in per))
        agg["ref_voxels"] = int(sum(m["ref_voxels"] for m in per))
        agg["per_phase"] = per
        out[name] = agg
    return out


# --------------------------------------------------------------------------- files
def _read_label_image(path: Path, what: str):
    import SimpleITK as sitk

    if not path.is_file():
        raise NoInputError(f"{what} {path}: no such file", hint="check the path")
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InvalidStudyError(f"{what} {path}: cannot read this image ({last})",
                                hint="expected a NIfTI (or other ITK-readable) label volume") from None


def _label_array(img, path: Path, convention: str, what: str) -> np.ndarray:
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidStudyError(f"{what} {path}: multi-component pixels; expected a label map")
    return labels_to_project(sitk.GetArrayFromImage(img), convention, f"{what} {path}")


def check_same_grid(a, b, *, names: tuple[str, str] = ("pred", "ref"), atol: float = GRID_ATOL) -> None:
    """Raise InvalidStudyError unless two SimpleITK images share size, spacing, origin and
    direction (within ``atol`` mm / direction cosine)."""
    if a.GetDimension() != b.GetDimension() or tuple(a.GetSize()) != tuple(b.GetSize()):
        raise InvalidStudyError(
            f"{names[0]} size {tuple(a.GetSize())} differs from {names[1]} size {tuple(b.GetSize())} (x, y, z[, t])",
            hint="both label volumes must be on the same voxel grid; resample one onto the other first")
    for what, get in (("spacing", "GetSpacing"), ("origin", "GetOrigin"), ("direction", "GetDirection")):
        va = np.asarray(getattr(a, get)(), dtype=np.float64)
        vb = np.asarray(getattr(b, get)(), dtype=np.float64)
        if not np.allclose(va, vb, rtol=0.0, atol=atol):
            raise InvalidStudyError(
                f"{names[0]} {what} {np.round(va, 6).tolist()} differs from {names[1]} "
                f"{what} {np.round(vb, 6).tolist()}",
                hint="both label volumes must be on the same physical grid")


def resolve_label_convention(path: str | Path, convention: str, what: str) -> tuple[str, str]:
    """(convention, why): ``convention`` itself when given ("project" or "acdc"), or for
    "auto" the one read from the file name as the loader does (ACDC's
    ``patientNNN_frameNN_gt`` files: "acdc"; any other name: "project")."""
    from deeprecon.runtime.io.acdc import label_convention_of

    if convention != "auto":
        return convention, "given"
    conv, why = label_convention_of(path)
    log.debug("%s labels: %s convention (%s)", what, conv, why)
    return conv, why


def compare_label_files(pred_path: str | Path, ref_path: str | Path, *,
                        ref_convention: str = "auto", pred_convention: str = "auto"
                        ) -> dict[str, Any]:
    """Compare two label images (NIfTI 3D [x, y, z] or 4D [x, y, z, t]) on the same grid.

    ref_convention / pred_convention: "project" (1 LVC, 2 LVM, 3 RVC), "acdc"
    (1 RV, 2 MYO, 3 LV, remapped) or "auto" (the default: "acdc" for ACDC's
    ``patientNNN_frameNN_gt`` files, else "project"; see :func:`resolve_label_convention`).
    Returns a JSON-safe dict: {"pred", "ref", "ref_convention", "pred_convention",
    "ref_convention_from", "pred_convention_from" (why: "given" or what the name says),
    "shape" (array order
    [T,] Z, Y, X), "spacing_mm" (z, y, x), "phases" (None for 3D), "definitions",
    "structures": {name: metrics with NaN/inf as None}}.
    Raises NoInputError (missing file), InvalidStudyError (unreadable, not a label map,
    different grids), UsageError (unknown convention).
    """
    for conv in (ref_convention, pred_convention):
        if conv not in LABEL_CONVENTIONS + ("auto",):
            raise UsageError(f"label convention must be one of {LABEL_CONVENTIONS + ('auto',)}, "
                             f"got {conv!r}")
    pred_path, ref_path = Path(pred_path), Path(ref_path)
    ref_convention, ref_from = resolve_label_convention(ref_path, ref_convention, "reference")
    pred_convention, pred_from = resolve_label_convention(pred_path, pred_convention, "prediction")
    pimg = _read_label_image(pred_path, "prediction")
    rimg = _read_label_image(ref_path, "reference")
    dim = pimg.GetDimension()
    if dim not in (2, 3, 4):
        raise InvalidStudyError(f"prediction {pred_path}: {dim}D image; expected 3D or 4D labels")
    check_same_grid(pimg, rimg)
    pred = _label_array(pimg, pred_path, pred_convention, "prediction")
    ref = _label_array(rimg, ref_path, ref_convention, "reference")
    sp_xyz = list(pimg.GetSpacing())
    if dim == 2:
        pred, ref = pred[None], ref[None]
        spacing = (1.0, sp_xyz[1], sp_xyz[0])
    else:
        spacing = (sp_xyz[2], sp_xyz[1], sp_xyz[0])
    structures = evaluate_segmentation(pred, ref, spacing)
    log.info("compared %s with %s (%s)", pred_path, ref_path, "x".join(map(str, pred.shape)))
    return json_safe({
        "pred": str(pred_path), "ref": str(ref_path),
        "ref_convention": ref_convention, "pred_convention": pred_convention,
        "ref_convention_from": ref_from, "pred_convention_from": pred_from,
        "shape": list(pred.shape), "spacing_mm": [float(s) for s in spacing],
        "phases": int(pred.shape[0]) if pred.ndim == 4 else None,
        "definitions": {
            "dice": "2|A n B| / (|A| + |B|) over the volume (mean over phases for 4D)",
            "hd95_mm": "95th percentile of the pooled symmetric surface distances (MedPy)",
            "assd_mm": "(mean d(pred->ref) + mean d(ref->pred)) / 2 (MedPy)",
            "absent": "absent in both: null; absent in one: dice 0, distances null (infinite)",
        },
        "structures": structures,
    })
