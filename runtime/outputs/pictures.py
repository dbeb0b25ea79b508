"""The QC pictures of an output folder (drawn by :mod:`deeprecon.runtime.qc`; they need
matplotlib, the ``report`` extra)::

    qc/volume_curves.png             LV and RV cavity volume over the phases (native, hr)
    qc/overlay_native_N.png          native slices with the segmentation's contours (rows ED,
                                     ES; up to 8 slices a picture, N = 1, 2, ...)
    qc/recon_model_N.png             model grid: input x and G(w*), Seg(G(w*)) contours
    qc/long_axis.png                 vertical and horizontal cuts through the LV centre of
                                     the input stack and the high-resolution volume
    qc/volume_curves_motion.png      (motion adaptation) LV/RV curves of source, target and
                                     adapted sequence over the cycle (phase index / number
                                     of phases); the model-grid pictures then show G(w) only
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..result import MOTION_KIND, Result, frame_ids

#: slices per overlay picture (more go into further pictures)
SLICES_PER_PICTURE = 8


def _phase_ed_es(result: Result) -> list[tuple[int, str]]:
    """(index into the P phases, row name) of ED and ES (ED alone when they coincide or
    ES is unknown; phase 0 when neither is known)."""
    ids = frame_ids(result)
    ed, es = result.ed_index, result.es_index
    rows = []
    if ed is not None and 0 <= ed < result.n_phases:
        rows.append((int(ed), f"ED (frame {ids[ed]})"))
    if es is not None and 0 <= es < result.n_phases and es != ed:
        rows.append((int(es), f"ES (frame {ids[es]})"))
    return rows or [(0, f"frame {ids[0]}")]


def _curve_series(result: Result, *, cycle: bool, name_prefix: str = "",
                  keys: tuple[str, ...] = ("native", "hr")) -> list:
    from ..qc import VolumeCurve

    names = {"native": "native", "hr": "high resolution"}
    P = result.n_phases
    x = (np.arange(P) / P) if cycle else np.asarray(frame_ids(result), dtype=np.float64)
    out = []
    for k in keys:
        m = result.measures.get(k)
        if not m or "volume_curves_ml" not in m:
            continue
        out.append(VolumeCurve(f"{name_prefix}{names.get(k, k)}", m["volume_curves_ml"], x,
                               m.get("ed_phase"), m.get("es_phase")))
    return out


def _slice_groups(labels: np.ndarray, phases: list[int]) -> list[list[int]]:
    """The labelled slices (all slices without labels), in groups of at most
    SLICES_PER_PICTURE, balanced (10 slices -> 5 + 5)."""
    from ..qc import pick_slices

    S = labels.shape[1]
    slices = pick_slices(labels, S, phases=phases, n_total=S)
    n = max(1, math.ceil(len(slices) / SLICES_PER_PICTURE))
    return [list(g) for g in np.array_split(np.asarray(slices), n) if len(g)]


def write_pictures(result: Result, stage: Path) -> dict[str, Any]:
    """qc/*.png; returns {picture key: relative path or list of them} for the report.
    Raises UnavailableError naming the ``report`` extra when matplotlib is missing."""
    from ..qc import (CutStack, check_drawing, save_long_axis_cuts, save_montage,
                      save_volume_curves)

    check_drawing()
    qc = stage / "qc"
    qc.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, Any] = {}
    motion = result.kind == MOTION_KIND
    rows = _phase_ed_es(result)
    phases = [p for p, _ in rows]
    names = [n for _, n in rows]

    curves = _curve_series(result, cycle=False)
    if curves:
        save_volume_curves(qc / "volume_curves.png", curves, xlabel="frame",
                           title="adapted sequence" if motion else None)
        pictures["volume_curves"] = "qc/volume_curves.png"
    if motion:
        series = []
        for key in ("source", "target"):
            other = result.extra.get(key)
            if isinstance(other, Result):
                series += _curve_series(other, cycle=True, name_prefix=f"{key} ", keys=("native",))
        series += _curve_series(result, cycle=True, name_prefix="adapted ", keys=("native",))
        if series:
            save_volume_curves(qc / "volume_curves_motion.png", series,
                               xlabel="phase index / number of phases",
                               title="motion adaptation: source, target and adapted")
            pictures["volume_curves_motion"] = "qc/volume_curves_motion.png"

    model_labels = np.asarray(result.model_labels)
    mg = result.model_geometry()
    groups = _slice_groups(model_labels, phases)
    if max(result.phases, default=-1) < result.study.n_phases:
        native_images = result.study.images[list(result.phases)]
        native_groups = _slice_groups(np.asarray(result.labels), phases)
        paths = []
        for i, sl in enumerate(native_groups, start=1):
            rel = f"qc/overlay_native_{i}.png"
            save_montage(stage / rel, native_images, result.labels, phases=phases,
                         phase_names=names, slices=sl,
                         pixel_spacing=result.study.geometry.pixel_spacing,
                         title=f"native grid, slices {sl[0]}-{sl[-1]}: segmentation contours")
            paths.append(rel)
        pictures["overlay_native"] = paths
    # model grid: (input x and) G(w*) per ED/ES row, with Seg(G(w*)) contours
    stack_imgs, stack_labs, row_names = [], [], []
    for p, n in rows:
        if not motion:
            stack_imgs.append(result.model_images[p])
            stack_labs.append(model_labels[p])
            row_names.append(f"{n}: input x")
        stack_imgs.append(result.model_recon[p])
        stack_labs.append(model_labels[p])
        row_names.append(f"{n}: G(w)" if motion else f"{n}: G(w*)")
    stack_imgs, stack_labs = np.stack(stack_imgs), np.stack(stack_labs)
    paths = []
    for i, sl in enumerate(groups, start=1):
        rel = f"qc/recon_model_{i}.png"
        save_montage(stage / rel, stack_imgs, stack_labs, phases=list(range(len(row_names))),
                     phase_names=row_names, slices=sl, pixel_spacing=mg.pixel_spacing,
                     title=(f"model grid, slices {sl[0]}-{sl[-1]}: "
                            + ("adapted G(w)" if motion else "input x and G(w*)")
                            + ", Seg contours"))
        paths.append(rel)
    pictures["recon_model"] = paths

    first = CutStack(result.model_recon if motion else result.model_images, model_labels,
                     mg.positions, ("adapted, native slices" if motion else
                                    f"input ({mg.slice_spacing:.3g} mm)" if mg.n_slices > 1
                                    else "input"))
    hr = CutStack(result.hr_images, result.hr_labels, result.hr_geometry.positions,
                  f"high resolution (x{result.interp})")
    stacks = [first, hr] if result.hr_geometry.n_slices > 1 or mg.n_slices > 1 else [hr]
    save_long_axis_cuts(qc / "long_axis.png", stacks, pixel_spacing=result.hr_geometry.pixel_spacing,
                        phases=phases, phase_names=names,
                        title="long-axis-like cuts through the LV centre")
    pictures["long_axis"] = "qc/long_axis.png"
    return pictures


__all__ = ["write_pictures", "SLICES_PER_PICTURE"]
