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
- SV = EDV - ESV; EF = SV / EDV x 100. With a single phase only the ED measures exist;
  the ES-derived ones are NaN.
- With ``rr_interval_ms`` the cardiac outputs LVCO and RVCO (L/min) = SV x heart rate.

Keys are ukbb_cardiac's CSV column names: 'LVEDV (mL)', 'LVESV (mL)', 'LVSV (mL)',
'LVEF (%)', 'LVM (g)', 'RVEDV (mL)', 'RVESV (mL)', 'RVSV (mL)', 'RVEF (%)'.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from deeprecon.runtime.errors import InvalidStudyError, UsageError
from deeprecon.runtime.study import Geometry, Study

log = logging.getLogger(__name__)

MYOCARDIAL_DENSITY_G_PER_ML = 1.05
MEASURE_COLUMNS = ("LVEDV (mL)", "LVESV (mL)", "LVSV (mL)", "LVEF (%)", "LVM (g)",
                   "RVEDV (mL)", "RVESV (mL)", "RVSV (mL)", "RVEF (%)")
_STRUCTURES = {"LVC": 1, "LVM": 2, "RVC": 3}


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
    if ed_phase is None:
        ed_phase = int(np.argmax(lv))
        source.append("ED from LV volume")
    if es_phase is None and P > 1:
        es_phase = int(np.argmin(lv))
        source.append("ES from LV volume")
    ed = int(ed_phase)
    es = None if es_phase is None else int(es_phase)
    nan = float("nan")
    lvedv, rvedv = float(lv[ed]), float(curves["RVC"][ed])
    lvesv = float(lv[es]) if es is not None else nan
    rvesv = float(curves["RVC"][es]) if es is not None else nan
    out: dict[str, Any] = {
        "LVEDV (mL)": lvedv,
        "LVESV (mL)": lvesv,
        "LVSV (mL)": lvedv - lvesv,
        "LVEF (%)": _ratio(lvedv - lvesv, lvedv),
        "LVM (g)": float(curves["LVM"][ed]) * MYOCARDIAL_DENSITY_G_PER_ML,
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
