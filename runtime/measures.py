"""Clinical measures of a cine label volume, with the ukbb_cardiac conventions.

- Volume of a structure = voxel count x voxel volume, where the voxel volume is
  row spacing x column spacing x *slice spacing* (centre-to-centre distance, not the
  nominal thickness): each slice stands for the slab up to its neighbours. The same
  function serves a native thick-slice stack and a high-resolution volume.
- LV mass (LVM, g) = myocardium volume at ED x 1.05 g/mL.
- ED and ES: given by the caller (e.g. ACDC's Info.cfg) or, when not given, ED = the
  phase of largest LV cavity volume and ES = the phase of smallest. ukbb_cardiac takes
  frame 0 as ED (its cines are triggered on the R wave) and ES = smallest LV; pass
  ``ed_phase=0`` to reproduce that exactly. The RV uses the same ED and ES phases as the
  LV, as in ukbb_cardiac.
- SV = EDV - ESV; EF = SV / EDV x 100. A single phase is measured as what the input
  names it: ES (``es_phase=0``) fills only the ES volumes, ED (or no name) only the ED
  measures; the others are NaN, and ``ed_es_from`` says which it was (an unnamed phase
  is reported in the ED columns, and says so).
- With ``rr_interval_ms`` the cardiac outputs LVCO and RVCO (L/min) = SV x heart rate.

Keys are ukbb_cardiac's CSV column names: 'LVEDV (mL)', 'LVESV (mL)', 'LVSV (mL)',
'LVEF (%)', 'LVM (g)', 'RVEDV (mL)', 'RVESV (mL)', 'RVSV (mL)', 'RVEF (%)'.

:func:`plausibility_flags` is the one place that says when a measures dict looks wrong
(a failed segmentation rather than a patient): values outside :data:`PLAUSIBLE_RANGES`,
an ES volume not below the ED volume, an RV of zero volume, a structure missing on a
mid-ventricular slice, a non-finite value. The ranges are deliberately wide (they flag
numbers no adult heart has, not abnormal hearts).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from deeprecon.runtime.errors import InvalidStudyError, UsageError
from deeprecon.runtime.study import Geometry, Study

log = logging.getLogger(__name__)

MYOCARDIAL_DENSITY_G_PER_ML = 1.05
MEASURE_COLUMNS = ("LVEDV (mL)", "LVESV (mL)", "LVSV (mL)", "LVEF (%)", "LVM (g)",
                   "RVEDV (mL)", "RVESV (mL)", "RVSV (mL)", "RVEF (%)")
_STRUCTURES = {"LVC": 1, "LVM": 2, "RVC": 3}
_STRUCTURE_NAMES = {"LVC": "LV cavity", "LVM": "LV myocardium", "RVC": "RV cavity"}

#: measure -> (low, high): values outside are flagged by :func:`plausibility_flags`
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "LVEF (%)": (5.0, 90.0), "RVEF (%)": (5.0, 90.0),
    "LVEDV (mL)": (20.0, 600.0), "RVEDV (mL)": (20.0, 600.0),
    "LVM (g)": (20.0, 400.0),
}
#: the codes of :func:`plausibility_flags`
FLAG_CODES = ("out_of_range", "esv_not_below_edv", "zero_rv_volume", "missing_on_mid_slice",
              "non_finite", "touches_crop_edge")


def voxel_volume_ml(geometry: Geometry, *, slice_spacing: float | None = None) -> float:
    """Voxel volume in mL: row spacing x column spacing x slice spacing / 1000.

    The slice spacing is ``slice_spacing`` if given (e.g. a super-resolved volume's),
    else the geometry's median centre-to-centre gap, else (a single slice) its nominal
    thickness. Raises InvalidStudyError when none is known or a spacing is not positive.
    """
    sz = slice_spacing
    if sz is None:
        sz = geometry.slice_spacing
        if not math.isfinite(sz):
            sz = geometry.slice_thickness
    if sz is None or not math.isfinite(sz) or sz <= 0:
        raise InvalidStudyError(
            "cannot compute volumes: the slice spacing is unknown (single slice, no thickness)",
            hint="pass slice_spacing explicitly")
    dr, dc = geometry.pixel_spacing
    if dr <= 0 or dc <= 0:
        raise InvalidStudyError(f"pixel spacing {geometry.pixel_spacing} must be positive")
    return float(dr) * float(dc) * float(sz) / 1000.0


def volume_curves_ml(labels: np.ndarray, voxel_volume_ml: float, *,
                     slice_weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Volume of each structure at each phase.

    labels: [P, S, H, W] (or [S, H, W] for one phase) uint8, project labels.
    slice_weights: optional [S] factors on each slice's voxel count (e.g. a thickness
                   relative to the voxel's: the end slices of an interpolated volume).
    Returns {"LVC", "LVM", "RVC"} -> [P] float64 mL.
    """
    lab = np.asarray(labels)
    if lab.ndim == 3:
        lab = lab[None]
    if lab.ndim != 4:
        raise ValueError(f"labels must be [P, S, H, W] or [S, H, W], got {lab.shape}")
    if slice_weights is None:
        weights = np.ones(lab.shape[1])
    else:
        weights = np.asarray(slice_weights, dtype=np.float64)
        if weights.shape != (lab.shape[1],) or not np.all(np.isfinite(weights) & (weights >= 0)):
            raise UsageError(f"slice_weights must be [{lab.shape[1]}] non-negative numbers, "
                             f"got shape {weights.shape}")
    return {name: (lab == k).sum(axis=(2, 3)).astype(np.float64) @ weights
            * float(voxel_volume_ml) for name, k in _STRUCTURES.items()}


def _ratio(num: float, den: float) -> float:
    return num / den * 100.0 if den > 0 else float("nan")


def clinical_measures(labels: np.ndarray, voxel_volume_ml: float, *, ed_phase: int | None = None,
                      es_phase: int | None = None, rr_interval_ms: float | None = None,
                      slice_weights: np.ndarray | None = None) -> dict[str, Any]:
    """LV and RV volumes, stroke volumes, ejection fractions and LV mass.

    labels:          [P, S, H, W] (or [S, H, W]) uint8, project labels (1 LVC, 2 LVM, 3 RVC),
                     on any grid (native stack or high-resolution volume);
    voxel_volume_ml: one voxel's volume in mL (see :func:`voxel_volume_ml`);
    ed_phase, es_phase: phase indices; None -> largest / smallest LV cavity volume
                     (ES is None for a single phase);
    rr_interval_ms:  the RR interval; adds 'LVCO (L/min)' and 'RVCO (L/min)'.
    slice_weights:   optional [S] weights of each slice's voxels (see volume_curves_ml).
    Returns the nine ukbb_cardiac columns (float; NaN where undefined), plus
    'ed_phase', 'es_phase', 'ed_es_from' ("given" / "lv_volume" / mixed),
    'volume_curves_ml' ({"LVC", "LVM", "RVC"} -> list of P floats) and
    'voxel_volume_ml'.
    """
    if not (math.isfinite(voxel_volume_ml) and voxel_volume_ml > 0):
        raise UsageError(f"voxel_volume_ml must be > 0, got {voxel_volume_ml}")
    curves = volume_curves_ml(labels, voxel_volume_ml, slice_weights=slice_weights)
    P = curves["LVC"].size
    for name, p in (("ed_phase", ed_phase), ("es_phase", es_phase)):
        if p is not None and not 0 <= int(p) < P:
            raise UsageError(f"{name} {p} is outside the {P} phases")
    lv = curves["LVC"]
    source = []
    if P == 1 and es_phase is not None and ed_phase is None:
        source.append("one phase, named ES by the input: ES volumes only")
    elif P == 1:
        source.append("one phase, named ED by the input: ED measures only" if ed_phase is not None
                      else "one phase, not named ED or ES by the input: reported in the ED columns")
        ed_phase = 0
    else:
        if ed_phase is None:
            ed_phase = int(np.argmax(lv))
            source.append("ED from LV volume")
        if es_phase is None:
            es_phase = int(np.argmin(lv))
            source.append("ES from LV volume")
    ed = None if ed_phase is None else int(ed_phase)
    es = None if es_phase is None else int(es_phase)
    nan = float("nan")
    lvedv = float(lv[ed]) if ed is not None else nan
    rvedv = float(curves["RVC"][ed]) if ed is not None else nan
    lvesv = float(lv[es]) if es is not None else nan
    rvesv = float(curves["RVC"][es]) if es is not None else nan
    out: dict[str, Any] = {
        "LVEDV (mL)": lvedv,
        "LVESV (mL)": lvesv,
        "LVSV (mL)": lvedv - lvesv,
        "LVEF (%)": _ratio(lvedv - lvesv, lvedv),
        "LVM (g)": float(curves["LVM"][ed]) * MYOCARDIAL_DENSITY_G_PER_ML if ed is not None else nan,
        "RVEDV (mL)": rvedv,
        "RVESV (mL)": rvesv,
        "RVSV (mL)": rvedv - rvesv,
        "RVEF (%)": _ratio(rvedv - rvesv, rvedv),
    }
    if rr_interval_ms is not None:
        if not (math.isfinite(rr_interval_ms) and rr_interval_ms > 0):
            raise UsageError(f"rr_interval_ms must be > 0, got {rr_interval_ms}")
        hr_per_min = 60000.0 / rr_interval_ms
        out["LVCO (L/min)"] = out["LVSV (mL)"] * hr_per_min / 1000.0
        out["RVCO (L/min)"] = out["RVSV (mL)"] * hr_per_min / 1000.0
        out["heart_rate_bpm"] = hr_per_min
    if es is not None and es == ed and P > 1:
        log.warning("ED and ES are the same phase (%d): stroke volumes are 0", ed)
    out.update({
        "ed_phase": ed, "es_phase": es,
        "ed_es_from": "; ".join(source) if source else "given",
        "voxel_volume_ml": float(voxel_volume_ml),
        "volume_curves_ml": {k: v.tolist() for k, v in curves.items()},
    })
    return out


def study_measures(study: Study, *, labels: np.ndarray | None = None,
                   slice_spacing: float | None = None, use_study_phases: bool = True
                   ) -> dict[str, Any]:
    """:func:`clinical_measures` of a :class:`Study` (its labels unless ``labels`` is given).

    Uses the study's geometry for the voxel volume (``slice_spacing`` overrides the slice
    spacing), its ED/ES phases when known and ``use_study_phases``, and the RR interval
    estimated from regular trigger times (P x phase interval) when they are known.
    """
    lab = study.labels if labels is None else labels
    if lab is None:
        raise InvalidStudyError("the study has no labels to measure")
    vv = voxel_volume_ml(study.geometry, slice_spacing=slice_spacing)
    ed = study.ed_phase if use_study_phases else None
    es = study.es_phase if use_study_phases else None
    rr = None
    t = study.trigger_times
    if t.size > 2 and np.all(np.isfinite(t)):
        steps = np.diff(t)
        if np.all(steps > 0) and np.allclose(steps, steps[0], rtol=0.05):
            rr = float(steps[0] * t.size)
    return clinical_measures(lab, vv, ed_phase=ed, es_phase=es, rr_interval_ms=rr)


def mid_ventricular_slices(n_slices: int) -> range:
    """The middle third of a stack of ``n_slices`` slices (at least one slice):
    indices ``n // 3 .. n - n // 3 - 1`` (9 slices -> 3, 4, 5; 10 -> 3..6; 2 -> 0, 1)."""
    k = n_slices // 3
    return range(k, n_slices - k)


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _unit(measure: str) -> str:
    return measure[measure.rfind("(") + 1:-1] if measure.endswith(")") else ""


def _short(measure: str) -> str:
    return measure.split(" (")[0]


def plausibility_flags(measures: Mapping[str, Any], *, labels: np.ndarray | None = None,
                       source: str = "native", frame_ids: Sequence[int] | None = None,
                       model_labels: np.ndarray | None = None,
                       field_of_view_mm: float | None = None) -> list[dict[str, Any]]:
    """Flags of implausible values in one measures dict (as :func:`clinical_measures`
    returns), e.g. the "native" or the "hr" entry of ``Result.measures``.

    measures:  the measures dict (its 'volume_curves_ml', 'ed_phase' and 'es_phase' are
               used when present);
    labels:    optional [P, S, H, W] (or [S, H, W]) labels the measures came from: each
               structure (LVC, LVM, RVC) must be present on every slice of the middle
               third of the stack (:func:`mid_ventricular_slices`) at every phase;
    source:    the name of the measures ("native", "hr"), copied into each flag and its
               message;
    frame_ids: the frame numbers of the P phases, for the messages;
    model_labels, field_of_view_mm: optional [P, S, R, R] (or [S, R, R]) labels on the
               model grid, the crop the model saw, and its width in mm: a structure on
               the grid's outermost pixels reaches the crop's edge, so the heart may
               extend beyond what the model saw and its volumes be underestimated (on
               the 64 x 2.5 mm grid 8 of the 80 ACDC patients have labels outside the
               160 mm crop, up to 0.85 %: benchmarks/results/acdc_preprocessing_cpu64w.json).

    Checks: :data:`PLAUSIBLE_RANGES` ("out_of_range"), ESV >= EDV for LV and RV
    ("esv_not_below_edv"), an RV cavity of zero volume at a phase ("zero_rv_volume"), a
    structure absent on a mid-ventricular slice at a phase ("missing_on_mid_slice"), a
    structure on the crop's edge at a phase ("touches_crop_edge"), a NaN or infinite
    measure ("non_finite"; the ES-derived ones are expected to be NaN when there is no ES
    phase and are then not flagged).

    Returns a list of dicts with the same keys: "code" (one of :data:`FLAG_CODES`),
    "source", "measure" (a column name such as 'LVEF (%)', or a structure 'LVC', 'LVM',
    'RVC'), "value" (float, or the number of slices for a missing structure or one on
    the edge; None when not finite), "range" ([low, high] or None), "phase" (index into
    the P phases, or None), "frame" (its frame number, or None), "slices" (the slice
    indices of a missing structure or one on the edge, else None) and "message" (one line
    for a person). Empty when all is plausible. JSON-safe: no NaN anywhere.
    """
    flags: list[dict[str, Any]] = []
    ed, es = measures.get("ed_phase"), measures.get("es_phase")
    ids = list(frame_ids) if frame_ids is not None else None

    def frame(p: int | None) -> int | None:
        return int(ids[p]) if p is not None and ids is not None and 0 <= p < len(ids) else None

    def at(p: int) -> str:
        name = "ED" if p == ed else "ES" if p == es else None
        f = frame(p)
        where = f"frame {f}" if f is not None else f"phase {p}"
        return f"{name} ({where})" if name else where

    def add(code: str, measure: str, value: Any, rng: tuple[float, float] | None,
            message: str, *, phase: int | None = None, slices: list[int] | None = None) -> None:
        v = float(value) if _finite(value) else None
        flags.append({"code": code, "source": source, "measure": measure, "value": v,
                      "range": None if rng is None else [float(rng[0]), float(rng[1])],
                      "phase": None if phase is None else int(phase), "frame": frame(phase),
                      "slices": slices, "message": f"{source}: {message}"})

    es_measures = {"LVESV (mL)", "LVSV (mL)", "LVEF (%)", "RVESV (mL)", "RVSV (mL)",
                   "RVEF (%)", "LVCO (L/min)", "RVCO (L/min)"}
    ed_measures = {"LVEDV (mL)", "LVSV (mL)", "LVEF (%)", "LVM (g)", "RVEDV (mL)", "RVSV (mL)",
                   "RVEF (%)", "LVCO (L/min)", "RVCO (L/min)"}
    for col in (*MEASURE_COLUMNS, "LVCO (L/min)", "RVCO (L/min)"):
        if col not in measures:
            continue
        v = measures[col]
        if not _finite(v):
            if (es is None and col in es_measures) or (ed is None and col in ed_measures):
                continue            # one phase: no ES (or ED) measures, as documented
            add("non_finite", col, None, PLAUSIBLE_RANGES.get(col),
                f"{_short(col)} is not a number (an empty structure?)")
            continue
        if col in PLAUSIBLE_RANGES:
            lo, hi = PLAUSIBLE_RANGES[col]
            if not lo <= float(v) <= hi:
                u = _unit(col)
                add("out_of_range", col, v, (lo, hi),
                    f"{_short(col)} {float(v):.1f} {u} is outside the plausible {lo:g}-{hi:g} "
                    f"{u}: check the segmentation")
    for side in ("LV", "RV"):
        edv, esv = measures.get(f"{side}EDV (mL)"), measures.get(f"{side}ESV (mL)")
        if _finite(edv) and _finite(esv) and float(esv) >= float(edv) and \
                (float(edv) > 0 or float(esv) > 0):
            add("esv_not_below_edv", f"{side}ESV (mL)", esv, None,
                f"{side}ESV {float(esv):.1f} mL is not below {side}EDV {float(edv):.1f} mL "
                "(ED and ES swapped, or a failed segmentation)", phase=es)
    rv = (measures.get("volume_curves_ml") or {}).get("RVC")
    if rv is not None:
        for p, v in enumerate(rv):
            if _finite(v) and float(v) <= 0.0:
                add("zero_rv_volume", "RVC", 0.0, None,
                    f"no RV cavity segmented at {at(p)} (RV volume 0 mL)", phase=p)
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim == 3:
            lab = lab[None]
        if lab.ndim != 4:
            raise ValueError(f"labels must be [P, S, H, W] or [S, H, W], got {lab.shape}")
        mid = mid_ventricular_slices(lab.shape[1])
        if len(mid):
            sub = lab[:, mid.start:mid.stop]
            for name, k in _STRUCTURES.items():
                present = (sub == k).any(axis=(2, 3))           # [P, len(mid)]
                for p in range(lab.shape[0]):
                    missing = [mid.start + i for i in np.flatnonzero(~present[p])]
                    if missing:
                        add("missing_on_mid_slice", name, len(missing), None,
                            f"{_STRUCTURE_NAMES[name]} absent on mid-ventricular slice"
                            f"{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))} (of {mid.start}-{mid.stop - 1}) "
                            f"at {at(p)}", phase=p, slices=[int(i) for i in missing])
    if model_labels is not None:
        ml = np.asarray(model_labels)
        if ml.ndim == 3:
            ml = ml[None]
        if ml.ndim != 4 or min(ml.shape[-2:]) < 3:
            raise ValueError(f"model_labels must be [P, S, R, R] or [S, R, R], got {ml.shape}")
        if field_of_view_mm is None:
            raise ValueError("model_labels need the crop's field_of_view_mm")
        ring = np.ones(ml.shape[-2:], dtype=bool)
        ring[1:-1, 1:-1] = False
        for name, k in _STRUCTURES.items():
            on_edge = ((ml == k) & ring).any(axis=(2, 3))           # [P, S]
            for p in range(ml.shape[0]):
                edge = [int(i) for i in np.flatnonzero(on_edge[p])]
                if edge:
                    add("touches_crop_edge", name, len(edge), None,
                        f"{_STRUCTURE_NAMES[name]} reaches the edge of the "
                        f"{float(field_of_view_mm):g} mm crop the model sees on slice"
                        f"{'s' if len(edge) > 1 else ''} {', '.join(map(str, edge))} at "
                        f"{at(p)}: the heart may extend beyond it and its volumes be "
                        "underestimated", phase=p, slices=edge)
    return flags

