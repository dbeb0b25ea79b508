"""E2: through-plane reconstruction, three protocols and their baselines (issue 14).

Every method produces a volume of the same layout, (S - 1) N + 1 slices between the first
and the last input slice (N = the interpolation factor), and every comparison goes through
one sampler (deeprecon.runtime.evaluation.sample_labels: one-hot, trilinear, argmax) onto
the planes of the reference, so that all methods are measured on the same pixels:

- ``DeepRecon``: the pipeline's high-resolution labels (codes of neighbouring slices
  interpolated, rendered by G, segmented by Seg), on the model grid;
- ``linear+Seg``: the input images (model grid) interpolated linearly, segmented by the
  bundle's Seg;
- ``nearest``, ``SDF`` (shape-based, signed distance maps), ``MCI`` (ITK morphological
  contour interpolation) of the input slices' labels on the native grid, with two label
  inputs: ``(Seg)`` the pipeline's own segmentation of the input slices (what a user has:
  the same inputs as DeepRecon) and ``(manual)`` the input slices' reference labels (the
  interpolation alone, with perfect in-plane labels; not available at inference).

Protocols:

- ``slice-drop``: ACDC validation patients (trainer/splits/acdc.json): the odd slices are
  removed, the even ones reconstructed with N = 2; the removed slices' real labels are
  compared with every method's labels at their positions (Dice per structure over the
  removed slices of one phase = one volume), and their real images with the renders
  (DeepRecon) and the input images (nearest, linear) on the model grid inside the heart
  ROI (the reference heart dilated by the bundle's ROI dilation; slices without heart
  left out): PSNR and SSIM.
- ``phantom``: the project's phantom (deeprecon.runtime.phantom), thick SAX slices with
  a high-resolution truth; N = slice spacing / truth spacing; every method's volume is
  compared with the truth between the first and last SAX slice centres: 3D Dice, HD95,
  ASSD (mm) and volume error (mL, %).
- ``lax``: every method's volume intersected with long-axis planes, 2D Dice (LVC first,
  as the paper) against the plane's labels, on the plane's pixels that lie inside every
  method's volume (between the first and last SAX centres, inside the model crop): the
  phantom's exact 2-, 3- and 4-chamber planes (with a ``truth`` row: the phantom's own
  truth through the same sampler, the sampler's ceiling), and, with ``--pairs DIR``, real
  SAX + LAX pairs in the M&Ms-2 layout (NNN_SA_ED.nii.gz, NNN_LA_ED.nii.gz, with _gt),
  placed by their NIfTI headers.

    python benchmarks/eval_recon.py --bundle out/bundle --protocol slice-drop --steps 100
    python benchmarks/eval_recon.py --bundle out/bundle --protocol phantom lax --phantoms 5
    python benchmarks/eval_recon.py --bundle out/bundle --protocol lax --pairs ../mnms2 --phantoms 0

Writes JSON (benchmarks/results/eval_recon_<protocols>.json by default) with the bundle's
identity, the data, per-case values, the summary (mean (sd)), CPU and wall time; prints
and optionally writes (--md) the markdown tables; with --figures DIR, one PNG per protocol
of its first case (eval_recon_<protocol>.png: the removed slices; through-plane cuts of
the phantom's volumes; the volumes on each long-axis plane), every method's labels drawn
over the same image with their Dice.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deeprecon.runtime.evaluation import (drop_every_other, find_sax_lax_pairs, linear_slices,
                                          load_lax_plane, mci_available, mci_slices, mean_sd,
                                          nearest_slices, plane_points, plane_transform,
                                          resample_labels, roi_psnr, roi_ssim, sample_labels,
                                          sdf_slices, structure_dice)
from deeprecon.runtime.jsonsafe import json_safe
from deeprecon.runtime.metrics import evaluate_segmentation
from deeprecon.runtime.phantom import Phantom, make_phantom
from deeprecon.runtime.pipeline import Reconstructor, heart_roi, hr_geometry
from deeprecon.runtime.study import Geometry, Study

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_common import (elapsed as _elapsed, mean_sd_text as _ms, phantom_options,  # noqa: E402
                         provenance_line, timer as _timer)
from provenance import cpu_model, git_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STRUCTURES = ("LVC", "LVM", "RVC")
PROTOCOLS = ("slice-drop", "phantom", "lax")
BASELINES = ("nearest", "linear", "sdf", "mci")
LABEL_INPUTS = ("seg", "manual")

Volumes = dict[str, list[tuple[np.ndarray, Geometry]]]


# --------------------------------------------------------------------------- methods
def method_volumes(rec: Reconstructor, res, manual: np.ndarray | None, *,
                   baselines: Sequence[str] = BASELINES,
                   label_inputs: Sequence[str] = LABEL_INPUTS) -> tuple[Volumes, dict[str, str]]:
    """Every method's label volume per reconstructed phase, with its geometry.

    res:    the Result of reconstructing the input stack (interp N);
    manual: [P_study, S, H, W] reference labels of the input slices (None: no (manual) rows).
    Returns ({method: [(volume [(S - 1) N + 1, h, w] uint8, geometry)] per phase},
    {baseline: why it was left out}).
    """
    N, P = res.interp, res.n_phases
    native_hr = hr_geometry(res.study.geometry, N)
    out: Volumes = {"DeepRecon": [(res.hr_labels[p], res.hr_geometry) for p in range(P)]}
    left_out: dict[str, str] = {}
    if "linear" in baselines:
        vols = []
        for p in range(P):
            x = linear_slices(res.model_images[p], N)                          # [S_hr, R, R]
            probs = rec.backend.segment(x[:, None])                            # [S_hr, K, R, R]
            vols.append((probs.argmax(1).astype(np.uint8), res.hr_geometry))
        out["linear+Seg"] = vols
    mci_ok, why = mci_available() if "mci" in baselines else (False, "")
    if "mci" in baselines and not mci_ok:
        left_out["mci"] = why
    sources = {}
    if "seg" in label_inputs:
        sources["Seg"] = res.labels
    if "manual" in label_inputs and manual is not None:
        sources["manual"] = np.asarray(manual)[list(res.phases)]
    spacing = res.study.geometry.pixel_spacing
    for src, labs in sources.items():
        if "nearest" in baselines:
            out[f"nearest ({src})"] = [(nearest_slices(labs[p], N), native_hr) for p in range(P)]
        if "sdf" in baselines:
            out[f"SDF ({src})"] = [(sdf_slices(labs[p], N, spacing=spacing), native_hr)
                                   for p in range(P)]
        if mci_ok:
            out[f"MCI ({src})"] = [(mci_slices(labs[p], N), native_hr)
                                   for p in range(P)]
    return out, left_out


def _bundle_trained(rec: Reconstructor) -> bool:
    prov = rec.bundle.manifest.get("provenance") or {}
    return bool(prov.get("runs"))






# --------------------------------------------------------------------------- slice drop
def slice_drop_case(rec: Reconstructor, study: Study, *, name: str, steps: int | None,
                    baselines: Sequence[str] = BASELINES,
                    label_inputs: Sequence[str] = LABEL_INPUTS,
                    picture: dict | None = None) -> dict[str, Any]:
    """The slice-drop protocol on one labelled study (every labelled phase); ``picture``
    (a dict) receives the first phase's removed slices, real and reconstructed, for
    :func:`figure_slice_drop`."""
    if study.labels is None:
        raise ValueError(f"{name}: slice drop needs a labelled study")
    t = _timer()
    sub, kept, removed = drop_every_other(study)
    res = rec.reconstruct(sub, steps=steps, interp=2, phases="all")
    vols, left_out = method_volumes(rec, res, sub.labels, baselines=baselines,
                                    label_inputs=label_inputs)
    H, W = study.matrix
    removed_geo = study.geometry.subset(removed)
    hr_native = hr_geometry(sub.geometry, 2)
    # HR index of removed slice r (between kept r - 1 and r + 1) is r itself
    offset = np.abs(hr_native.positions[removed] - study.geometry.positions[removed])
    phases = list(res.phases)
    ref = study.labels[phases][:, removed]                                     # [P, R, H, W]
    per_phase = []
    for p in range(len(phases)):
        dice = {}
        for m, per in vols.items():
            vol, geo = per[p]
            lab, _ = resample_labels(vol, geo, removed_geo, (H, W))
            dice[m] = structure_dice(lab, ref[p])
            if picture is not None and p == 0:
                picture.setdefault("labels", {})[m] = lab
        per_phase.append({"phase_id": int(study.phase_ids[phases[p]]), "dice": dice})
    if picture is not None:
        picture.update(name=name, phase_id=per_phase[0]["phase_id"], removed=removed.tolist(),
                       image=study.images[phases[0]][removed], ref=ref[0],
                       pixel_spacing=tuple(study.geometry.pixel_spacing),
                       render=res.hr_images[0, removed], render_labels=res.hr_labels[0, removed])
        if "linear+Seg" in vols:
            lo = (removed - 1) // 2
            picture.update(linear=0.5 * (res.model_images[0, lo] + res.model_images[0, lo + 1]),
                           linear_labels=vols["linear+Seg"][0][0][removed])

    # images on the model grid: the removed slices placed on the HR planes at their positions
    images: dict[str, Any] = {}
    try:
        pt = plane_transform(res.transform, removed_geo, res.hr_geometry.subset(removed))
    except Exception as exc:  # non-uniform gaps: no HR plane at a removed position
        images["skipped"] = str(exc)
    else:
        x_ref = pt.to_model(study.images[phases][:, removed])                  # [P, R, m, m]
        lab_ref = pt.labels_to_model(ref)
        misalign = float(np.abs(np.asarray(pt.centres)[:, None]
                                - np.asarray(res.transform.centres)[None]).max())
        data_range = float(np.subtract(*rec.bundle.preprocess.out_range[::-1]))
        lo = (removed - 1) // 2                                                # kept index below
        for p in range(len(phases)):
            roi, fallback = heart_roi(lab_ref[p], pt.model_valid_mask(),
                                      spacing_mm=pt.spacing_mm,
                                      dilation_mm=rec.settings().roi_dilation_mm)
            use = ~fallback
            cand = {"DeepRecon": res.hr_images[p, removed],
                    "nearest": res.model_images[p, lo],
                    "linear": 0.5 * (res.model_images[p, lo] + res.model_images[p, lo + 1])}
            row = {}
            for m, y in cand.items():
                if not use.any():
                    row[m] = {"psnr": None, "ssim": None}
                    continue
                row[m] = {"psnr": float(np.mean(roi_psnr(y[use], x_ref[p][use], roi[use] > 0,
                                                         data_range=data_range))),
                          "ssim": float(np.mean(roi_ssim(y[use], x_ref[p][use], roi[use] > 0,
                                                         data_range=data_range)))}
            per_phase[p]["image_roi"] = row
            per_phase[p]["image_slices"] = int(use.sum())
        images["crop_misalignment_px"] = misalign
    return {"case": name, "slices": study.n_slices, "kept": kept.tolist(),
            "removed": removed.tolist(), "position_offset_mm": float(offset.max()),
            "phases": per_phase, "images": images, "left_out": left_out,
            "pipeline_timings": res.timings, **_elapsed(t)}


# --------------------------------------------------------------------------- phantom
def phantom_interp(ph: Phantom) -> int:
    """N that puts the HR planes on the truth's planes (slice spacing / truth spacing)."""
    ratio = ph.config.slice_spacing_mm / ph.config.hr_spacing_mm
    if abs(ratio - round(ratio)) > 1e-6:
        raise ValueError(f"slice spacing / truth spacing = {ratio:g} is not an integer")
    return int(round(ratio))


def phantom_case(rec: Reconstructor, ph: Phantom, *, name: str, steps: int | None,
                 protocols: Sequence[str] = ("phantom", "lax"),
                 baselines: Sequence[str] = BASELINES,
                 label_inputs: Sequence[str] = LABEL_INPUTS,
                 pictures: dict[str, dict] | None = None) -> dict[str, Any]:
    """The phantom and/or LAX protocols on one phantom (every phase); ``pictures`` ({protocol:
    dict}) receives the first phase's volumes on the truth's grid ("phantom") and every
    method's labels on each LAX plane ("lax") for :func:`figure_phantom` and
    :func:`figure_lax`."""
    pictures = pictures or {}
    t = _timer()
    N = phantom_interp(ph)
    res = rec.reconstruct(ph.study, steps=steps, interp=N, phases="all")
    vols, left_out = method_volumes(rec, res, ph.study.labels, baselines=baselines,
                                    label_inputs=label_inputs)
    idx = np.rint(ph.truth_slice_index).astype(int)
    truth_geo = ph.truth.geometry.subset(np.arange(idx[0], idx[-1] + 1))
    truth = ph.truth.labels[:, idx[0]:idx[-1] + 1]                              # [P, n, H, W]
    H, W = ph.study.matrix
    dr, dc = ph.study.geometry.pixel_spacing
    out: dict[str, Any] = {"case": name, "config": ph.config.to_dict(), "interp": N,
                           "left_out": left_out}
    if "phantom" in protocols:
        spacing = (ph.config.hr_spacing_mm, dr, dc)
        rows = []
        for p in range(res.n_phases):
            row = {}
            for m, per in vols.items():
                lab, _ = resample_labels(*per[p], truth_geo, (H, W))
                if "phantom" in pictures and p == 0:
                    pictures["phantom"].setdefault("labels", {})[m] = lab
                metr = evaluate_segmentation(lab, truth[p], spacing)
                row[m] = {s: {"dice": metr[s]["dice"], "hd95_mm": metr[s]["hd95_mm"],
                              "assd_mm": metr[s]["assd_mm"],
                              "volume_ml": metr[s]["pred_volume_ml"],
                              "truth_volume_ml": metr[s]["ref_volume_ml"],
                              "volume_error_ml": metr[s]["pred_volume_ml"] - metr[s]["ref_volume_ml"],
                              "volume_error_pct": _pct(metr[s]["pred_volume_ml"],
                                                       metr[s]["ref_volume_ml"])}
                          for s in STRUCTURES}
            rows.append({"phase": p, "methods": row})
        out["phantom"] = rows
        if "phantom" in pictures:
            pictures["phantom"].update(
                name=name, truth=truth[0], image=ph.truth.images[0, idx[0]:idx[-1] + 1],
                spacing_mm=spacing, dice={m: {s: d["dice"] for s, d in r.items()}
                                          for m, r in rows[0]["methods"].items()})
    if "lax" in protocols:
        views = []
        for view, plane in ph.lax.items():
            for p in range(res.n_phases):
                planes = {m: per[p] for m, per in vols.items()}
                planes["truth"] = (truth[p], truth_geo)
                keep = None
                if "lax" in pictures and p == 0:
                    keep = pictures["lax"].setdefault("views", {}).setdefault(view, {})
                    keep.update(image=plane.images[0], ref=plane.labels[0],
                                pixel_spacing=tuple(plane.geometry.pixel_spacing))
                views.append({"view": view, "phase": p,
                              **lax_dice(planes, plane.labels[p], plane.geometry, keep=keep)})
        out["lax"] = views
        if "lax" in pictures:
            pictures["lax"]["name"] = name
    out["pipeline_timings"] = res.timings
    out.update(_elapsed(t))
    return out


def _pct(a: float, b: float) -> float:
    return (a - b) / b * 100.0 if b > 0 else float("nan")


def lax_dice(volumes: dict[str, tuple[np.ndarray, Geometry]], ref: np.ndarray,
             plane: Geometry, *, keep: dict | None = None) -> dict[str, Any]:
    """Every volume sampled onto one LAX plane, 2D Dice per structure on the pixels inside
    every volume. ref: [h, w] labels of the plane; plane: its one-slice geometry; ``keep``
    (a dict) receives the sampled labels ("labels": {method: [h, w]}) and the mask."""
    pts = plane_points(plane, ref.shape)[0]
    sampled = {m: sample_labels(v, g, pts) for m, (v, g) in volumes.items()}
    mask = np.logical_and.reduce([ins for _, ins in sampled.values()])
    if keep is not None:
        keep.update(labels={m: lab for m, (lab, _) in sampled.items()}, mask=mask)
    lvc = ref == 1
    return {"mask_fraction": float(mask.mean()),
            "lvc_outside_mask": float((lvc & ~mask).sum() / lvc.sum()) if lvc.any() else None,
            "dice": {m: structure_dice(lab, ref, mask=mask) for m, (lab, _) in sampled.items()}}


def pair_case(rec: Reconstructor, pair: dict[str, str], *, steps: int | None,
              interp: int | None, baselines: Sequence[str] = BASELINES,
              label_inputs: Sequence[str] = LABEL_INPUTS,
              picture: dict | None = None) -> dict[str, Any]:
    """The LAX protocol on one real SAX + LAX pair (M&Ms-2 layout, one phase); ``picture``
    (a dict) receives the plane and every method's labels on it for :func:`figure_lax`."""
    from deeprecon.runtime.io.nifti import load_nifti

    t = _timer()
    study = load_nifti(pair["sa"], label_convention="project")
    lax_images, lax_labels, lax_geo = load_lax_plane(pair["la"])
    res = rec.reconstruct(study, steps=steps, interp=interp, phases="all")
    vols, left_out = method_volumes(rec, res, study.labels, baselines=baselines,
                                    label_inputs=label_inputs)
    keep = None
    if picture is not None:
        keep = {"image": lax_images[0], "ref": lax_labels[0],
                "pixel_spacing": tuple(lax_geo.pixel_spacing)}
        picture.update(name=f"{pair['id']}_{pair['phase']}", views={"LA": keep})
    views = [{"view": "LA", "phase": p,
              **lax_dice({m: per[p] for m, per in vols.items()}, lax_labels[p], lax_geo,
                         keep=keep if p == 0 else None)}
             for p in range(res.n_phases)]
    return {"case": f"{pair['id']}_{pair['phase']}", "files": pair, "interp": res.interp,
            "lax": views, "left_out": left_out, "pipeline_timings": res.timings,
            **_elapsed(t)}


# --------------------------------------------------------------------------- summary
def summarise(cases: dict[str, list[dict]]) -> dict[str, Any]:
    """mean (sd) per protocol, method and structure over the cases' volumes/planes."""
    out: dict[str, Any] = {}
    if cases.get("slice-drop"):
        rows: dict[str, dict] = {}
        images: dict[str, dict] = {}
        for c in cases["slice-drop"]:
            for ph in c["phases"]:
                for m, d in ph["dice"].items():
                    r = rows.setdefault(m, {s: [] for s in STRUCTURES})
                    for s in STRUCTURES:
                        r[s].append(d[s])
                for m, q in ph.get("image_roi", {}).items():
                    r = images.setdefault(m, {"psnr": [], "ssim": []})
                    r["psnr"].append(q["psnr"])
                    r["ssim"].append(q["ssim"])
        out["slice-drop"] = {m: {k: mean_sd(v) for k, v in r.items()} for m, r in rows.items()}
        out["slice-drop images"] = {m: {k: mean_sd(v) for k, v in r.items()}
                                    for m, r in images.items()}
    if cases.get("phantom"):
        rows = {}
        for c in cases["phantom"]:
            for ph in c["phantom"]:
                for m, d in ph["methods"].items():
                    r = rows.setdefault(m, {s: {"dice": [], "hd95_mm": [], "volume_error_ml": [],
                                                "abs_volume_error_pct": []} for s in STRUCTURES})
                    for s in STRUCTURES:
                        r[s]["dice"].append(d[s]["dice"])
                        r[s]["hd95_mm"].append(d[s]["hd95_mm"])
                        r[s]["volume_error_ml"].append(d[s]["volume_error_ml"])
                        v = d[s]["volume_error_pct"]
                        r[s]["abs_volume_error_pct"].append(None if v is None else abs(v))
        out["phantom"] = {m: {s: {k: mean_sd(v) for k, v in d.items()} for s, d in r.items()}
                          for m, r in rows.items()}
    if cases.get("lax"):
        rows = {}
        for c in cases["lax"]:
            for v in c["lax"]:
                for m, d in v["dice"].items():
                    r = rows.setdefault(m, {s: [] for s in STRUCTURES})
                    for s in STRUCTURES:
                        r[s].append(d[s])
                    r.setdefault(f"LVC {v['view']}", []).append(d["LVC"])
        out["lax"] = {m: {k: mean_sd(v) for k, v in r.items()} for m, r in rows.items()}
    return out




def markdown(result: dict[str, Any]) -> str:
    """The tables of a result, with the model's identity, the data and the CPU time."""
    lines = [provenance_line(result), ""]
    s = result["summary"]
    data = result["data"]
    if "slice-drop" in s:
        lines += [f"**Slice drop** ({data.get('slice-drop', '')}): Dice of the removed slices "
                  "(one volume per patient and phase), mean (sd).", "",
                  "| method | LVC Dice | LVM Dice | RVC Dice | volumes |",
                  "|---|---|---|---|---|"]
        for m, r in s["slice-drop"].items():
            cells = [_ms(r[st], 3) for st in STRUCTURES] + [str(r["LVC"]["n"])]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "Images of the removed slices on the model grid, inside the heart ROI "
                  "(the reference heart dilated by the inversion's ROI dilation), mean (sd) "
                  "over patients x phases: DeepRecon = G of the interpolated codes; nearest "
                  "= the real slice below; linear = the mean of the two real neighbours.", "",
                  "| image | PSNR ROI (dB) | SSIM ROI |", "|---|---|---|"]
        for m, r in s.get("slice-drop images", {}).items():
            lines.append(f"| {m} | {_ms(r['psnr'], 2)} | {_ms(r['ssim'], 3)} |")
        lines.append("")
    if "phantom" in s:
        lines += [f"**Phantom** ({data.get('phantom', '')}): 3D against the exact truth "
                  "between the first and last SAX centres, mean (sd) over phantoms x phases.", "",
                  "| method | LVC Dice | LVM Dice | RVC Dice | LVC HD95 (mm) | LVM HD95 | RVC HD95 | "
                  "LVC abs. volume error (%) | LVM | RVC |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m, r in s["phantom"].items():
            cells = ([_ms(r[st]["dice"], 3) for st in STRUCTURES]
                     + [_ms(r[st]["hd95_mm"], 1) for st in STRUCTURES]
                     + [_ms(r[st]["abs_volume_error_pct"], 1) for st in STRUCTURES])
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if "lax" in s:
        views = sorted({k[4:] for r in s["lax"].values() for k in r if k.startswith("LVC ")})
        lines += [f"**Long-axis intersection** ({data.get('lax', '')}): 2D Dice on the plane's "
                  "pixels inside every volume, mean (sd) over planes x phases.", "",
                  "| method | LVC Dice | LVM Dice | RVC Dice | " + " | ".join(f"LVC {v}" for v in views) + " |",
                  "|---|---|---|---|" + "---|" * len(views)]
        for m, r in s["lax"].items():
            cells = [_ms(r[st], 3) for st in STRUCTURES] + [_ms(r.get(f"LVC {v}"), 3) for v in views]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    left = {k: v for c in result["cases"].values() for case in c for k, v in case["left_out"].items()}
    for k, v in left.items():
        lines.append(f"Left out: {k}: {v}.")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- figures
# the label methods a figure shows, in this order, where the run has them
FIGURE_METHODS = ("DeepRecon", "linear+Seg", "nearest (Seg)", "SDF (Seg)", "MCI (Seg)")


def _dice_text(d: dict[str, float]) -> str:
    return " ".join(f"{s} {'-' if math.isnan(d[s]) else f'{d[s]:.2f}'}" for s in STRUCTURES)


def _figure(rows: int, cols: int, *, width: float = 1.55, height: float = 1.6):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols + 0.3, height * rows + 0.5), dpi=110)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _dice_label(ax, d: dict[str, float]) -> None:
    """A panel's Dice, written inside it at the bottom (labels outside an aspect-fixed
    panel can fall under the next row)."""
    ax.text(0.5, 0.01, _dice_text(d), transform=ax.transAxes, ha="center", va="bottom",
            fontsize=5, color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1,
                                             "linewidth": 0})


def _save(fig, path: Path, title: str) -> Path:
    from deeprecon.runtime.qc import LABEL_COLOURS

    from matplotlib.patches import Patch

    fig.suptitle(title, fontsize=8)
    fig.legend(handles=[Patch(color=c, label=n) for n, c in zip(STRUCTURES, LABEL_COLOURS.values())],
               loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95), pad=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def figure_slice_drop(pic: dict, path: Path, *, n: int = 3) -> Path:
    """Up to ``n`` removed slices with a heart (rows): the real slice with its reference
    labels, DeepRecon's rendering G(w) with its labels and the linear image with Seg's
    (both on the model grid), then each method's labels on the real slice (native grid)
    with the slice's Dice."""
    from deeprecon.runtime.qc import crop_box, draw_labels, image_window

    ref, img = pic["ref"], pic["image"]
    has = np.flatnonzero((ref == 1).reshape(len(ref), -1).any(1))
    if has.size == 0:
        raise ValueError(f"{pic['name']}: no removed slice shows the LV")
    pick = has[np.unique(np.round(np.linspace(0, has.size - 1, min(n, has.size))).astype(int))]
    methods = [m for m in FIGURE_METHODS if m in pic["labels"]]
    model_cols = [("DeepRecon: G(w)", "render", "render_labels")] + (
        [("linear image, Seg", "linear", "linear_labels")] if "linear" in pic else [])
    fig, axes = _figure(len(pick), 1 + len(model_cols) + len(methods))
    box = crop_box(ref, ref.shape[-2:], 12)
    dr, dc = pic["pixel_spacing"]
    vmin, vmax = image_window(img[pick])
    for i, k in enumerate(pick):
        row = axes[i]
        draw_labels(row[0], img[k], ref[k], vmin=vmin, vmax=vmax, aspect=dr / dc, box=box,
                    linewidth=0.8)
        row[0].set_ylabel(f"removed slice {pic['removed'][k]}", fontsize=7)
        for j, (title, im, lab) in enumerate(model_cols, start=1):
            m = pic[im][k]
            draw_labels(row[j], m, pic[lab][k], vmin=-1, vmax=1, aspect=1.0,
                        box=(0, m.shape[0], 0, m.shape[1]), linewidth=0.8)
            if i == 0:
                row[j].set_title(f"{title}\n(model grid)", fontsize=6)
        for j, m in enumerate(methods, start=1 + len(model_cols)):
            lab = pic["labels"][m][k]
            draw_labels(row[j], img[k], lab, vmin=vmin, vmax=vmax, aspect=dr / dc, box=box,
                        linewidth=0.8)
            _dice_label(row[j], structure_dice(lab, ref[k]))
            if i == 0:
                row[j].set_title(m, fontsize=6)
    axes[0][0].set_title("real, reference", fontsize=6)
    return _save(fig, path, f"Slice drop, {pic['name']} (phase id {pic['phase_id']}): the removed "
                            "slices, reconstructed from their neighbours")


def figure_phantom(pic: dict, path: Path) -> Path:
    """Two through-plane cuts (rows: along the rows and the columns through the LV's
    centre) of the truth and of each method's volume on the truth's grid (first phase),
    over the truth's image, with each method's 3D Dice of that phase."""
    from deeprecon.runtime.qc import crop_box, draw_labels, image_window

    truth, img = pic["truth"], pic["image"]
    dz, dr, dc = pic["spacing_mm"]
    r_c, c_c = (int(round(v)) for v in np.argwhere(truth == 1)[:, 1:].mean(0))
    methods = ["truth"] + [m for m in FIGURE_METHODS if m in pic["labels"]]
    fig, axes = _figure(2, len(methods))
    vmin, vmax = image_window(img)
    cuts = (("row", lambda v: v[:, r_c, :], dz / dc), ("column", lambda v: v[:, :, c_c], dz / dr))
    for i, (what, cut, aspect) in enumerate(cuts):
        im = cut(img)
        _, _, c0, c1 = crop_box(cut(truth), im.shape, 8)
        for j, m in enumerate(methods):
            lab = cut(truth if m == "truth" else pic["labels"][m])
            draw_labels(axes[i][j], im, lab, vmin=vmin, vmax=vmax, aspect=aspect,
                        box=(0, im.shape[0], c0, c1), linewidth=0.7)
            if i == 0:
                axes[i][j].set_title(m if m == "truth" else f"{m}\n3D {_dice_text(pic['dice'][m])}",
                                     fontsize=5.5)
        axes[i][0].set_ylabel(f"cut along {what} {r_c if what == 'row' else c_c}\n(slices down)",
                              fontsize=6)
    return _save(fig, path, f"Phantom {pic['name']} (phase 0): through-plane cuts of the "
                            f"reconstructed volumes against the exact truth ({dz:g} mm planes)")


def figure_lax(pic: dict, path: Path) -> Path:
    """Each long-axis plane (rows): its image with its own labels, then each method's
    volume sampled onto it (first phase), with the plane's 2D Dice on the pixels inside
    every volume (outside them: dimmed)."""
    from deeprecon.runtime.qc import crop_box, draw_labels, image_window

    views = pic["views"]
    first = next(iter(views.values()))
    methods = [m for m in FIGURE_METHODS if m in first["labels"]]
    fig, axes = _figure(len(views), 1 + len(methods))
    for i, (view, v) in enumerate(views.items()):
        ref, mask = v["ref"], v["mask"]
        img = np.where(mask, v["image"], 0.4 * v["image"])
        box = crop_box(ref, ref.shape, 10)
        dr, dc = v["pixel_spacing"]
        vmin, vmax = image_window(v["image"])
        draw_labels(axes[i][0], img, ref, vmin=vmin, vmax=vmax, aspect=dr / dc, box=box,
                    linewidth=0.8)
        axes[i][0].set_ylabel(view, fontsize=7)
        for j, m in enumerate(methods, start=1):
            lab = v["labels"][m]
            draw_labels(axes[i][j], img, lab, vmin=vmin, vmax=vmax, aspect=dr / dc, box=box,
                        linewidth=0.8)
            _dice_label(axes[i][j], structure_dice(lab, ref, mask=mask))
            if i == 0:
                axes[i][j].set_title(m, fontsize=6)
    axes[0][0].set_title("plane, its labels", fontsize=6)
    return _save(fig, path, f"Long-axis intersection, {pic['name']} (phase 0): the volumes "
                            "on each plane (dimmed: outside the SAX slab)")


FIGURES = {"slice-drop": figure_slice_drop, "phantom": figure_phantom, "lax": figure_lax}


# --------------------------------------------------------------------------- main
def _acdc_patients(split: str, max_patients: int | None) -> list[str]:
    from deeprecon.trainer.split import load_split

    return load_split()[split][:max_patients]




def run(args: argparse.Namespace) -> dict[str, Any]:
    t = _timer()
    rec = Reconstructor(args.bundle, backend=args.backend, device="cpu")
    protocols = list(dict.fromkeys(args.protocol))
    cases: dict[str, list[dict]] = {p: [] for p in protocols}
    data: dict[str, str] = {}
    kw = {"baselines": args.baselines, "label_inputs": args.label_inputs}
    # the first case of each protocol is drawn when --figures is given
    pictures: dict[str, dict] = {p: {} for p in protocols} if args.figures else {}
    if "slice-drop" in protocols:
        from deeprecon.runtime.io import load_study

        root = args.data / "training" if (args.data / "training").is_dir() else args.data
        patients = _acdc_patients(args.split, args.max_patients)
        data["slice-drop"] = (f"ACDC {args.split} split, {len(patients)} patients "
                              f"({', '.join(p[-3:] for p in patients)}), ED and ES")
        for pid in patients:
            pic = pictures.get("slice-drop")
            case = slice_drop_case(rec, load_study(root / pid), name=pid, steps=args.steps,
                                   picture=pic if pic == {} else None, **kw)
            cases["slice-drop"].append(case)
            print("slice-drop", pid, {m: round(case["phases"][0]["dice"][m]["LVC"], 3)
                                      if not math.isnan(case["phases"][0]["dice"][m]["LVC"]) else None
                                      for m in case["phases"][0]["dice"]}, flush=True)
    ph_protocols = [p for p in protocols if p in ("phantom", "lax")]
    if ph_protocols and args.phantoms > 0:
        opts = phantom_options(args.phantom_option)
        seeds = list(range(args.phantoms))
        desc = (f"{len(seeds)} phantoms (seeds {seeds[0]}..{seeds[-1]}, anatomy jitter "
                f"{opts.get('anatomy_jitter', args.phantom_jitter)}"
                + (f", {opts}" if opts else "") + ")")
        for p in ph_protocols:
            data[p] = desc
        for seed in seeds:
            ph = make_phantom(**{"seed": seed, "anatomy_jitter": args.phantom_jitter, **opts})
            case = phantom_case(rec, ph, name=f"phantom{seed}", steps=args.steps,
                                protocols=ph_protocols, **kw,
                                pictures={p: pictures[p] for p in ph_protocols
                                          if p in pictures and not pictures[p]})
            for p in ph_protocols:
                cases[p].append({k: v for k, v in case.items()
                                 if k not in set(ph_protocols) - {p}})
            print(f"phantom seed {seed}", {m: round(d["LVC"]["dice"], 3)
                                           for m, d in case.get("phantom", [{}])[0].get("methods", {}).items()},
                  flush=True)
    if "lax" in protocols and args.pairs is not None:
        pairs = find_sax_lax_pairs(args.pairs)[:args.max_patients]
        data["lax"] = (data.get("lax", "") + ("; " if data.get("lax") else "")
                       + f"{len(pairs)} SAX+LAX pairs from {args.pairs}")
        for pair in pairs:
            pic = pictures.get("lax")
            case = pair_case(rec, pair, steps=args.steps, interp=args.interp,
                             picture=pic if pic == {} else None, **kw)
            cases["lax"].append(case)
            print("lax pair", case["case"], {m: d["LVC"] for m, d in case["lax"][0]["dice"].items()},
                  flush=True)
    import onnxruntime
    import scipy

    ok, mci = mci_available()
    result = {
        "protocols": protocols, "bundle": rec.bundle_info(), "bundle_trained": _bundle_trained(rec),
        "config": {"steps": rec.settings(steps=args.steps).steps, "backend": rec.backend.name,
                   "baselines": list(args.baselines), "label_inputs": list(args.label_inputs),
                   "split": args.split, "max_patients": args.max_patients,
                   "phantoms": args.phantoms, "pairs": None if args.pairs is None else str(args.pairs)},
        "data": data, "summary": summarise(cases), "cases": cases,
        "device": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "scipy": scipy.__version__, "onnxruntime": onnxruntime.__version__,
                     "mci": mci if ok else None},
        "git": git_info(),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rec.close()
    result.update(_elapsed(t))
    return result, pictures


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--protocol", nargs="+", choices=PROTOCOLS, required=True)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "acdc",
                    help="ACDC (slice-drop)")
    ap.add_argument("--split", default="val", help="split of trainer/splits/acdc.json")
    ap.add_argument("--max-patients", type=int, help="first N patients (or pairs) only")
    ap.add_argument("--steps", type=int, help="inversion steps K (default: the bundle's)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--phantoms", type=int, default=3, help="phantom seeds 0..N-1 (phantom, lax)")
    ap.add_argument("--phantom-jitter", type=float, default=0.1, help="phantom anatomy_jitter")
    ap.add_argument("--phantom-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a make_phantom parameter (JSON value), e.g. slices=8 or 'matrix=[96,96]'")
    ap.add_argument("--pairs", type=Path, help="a folder of M&Ms-2 SAX+LAX pairs (lax)")
    ap.add_argument("--interp", type=int, help="N for the real pairs (default: the pipeline's)")
    ap.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    ap.add_argument("--label-inputs", nargs="*", choices=LABEL_INPUTS, default=list(LABEL_INPUTS))
    ap.add_argument("--out", type=Path, help="JSON (default benchmarks/results/eval_recon_<protocols>.json)")
    ap.add_argument("--md", type=Path, help="also write the markdown tables here")
    ap.add_argument("--figures", type=Path, metavar="DIR",
                    help="also draw the first case of each protocol: DIR/eval_recon_<protocol>.png")
    return ap


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    result, pictures = run(args)
    out = args.out or ROOT / "benchmarks" / "results" / f"eval_recon_{'_'.join(result['protocols'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    table = markdown(result)
    print(table)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
    for protocol, pic in pictures.items():
        if pic:
            print("figure:", FIGURES[protocol](pic, args.figures / f"eval_recon_{protocol}.png"))
    return result


if __name__ == "__main__":
    main()
