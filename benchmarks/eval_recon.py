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
and optionally writes (--md) the markdown tables.
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
                    label_inputs: Sequence[str] = LABEL_INPUTS) -> dict[str, Any]:
    """The slice-drop protocol on one labelled study (every labelled phase)."""
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
        per_phase.append({"phase_id": int(study.phase_ids[phases[p]]), "dice": dice})

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
                 label_inputs: Sequence[str] = LABEL_INPUTS) -> dict[str, Any]:
    """The phantom and/or LAX protocols on one phantom (every phase)."""
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
    if "lax" in protocols:
        views = []
        for view, plane in ph.lax.items():
            for p in range(res.n_phases):
                planes = {m: per[p] for m, per in vols.items()}
                planes["truth"] = (truth[p], truth_geo)
                views.append({"view": view, "phase": p,
                              **lax_dice(planes, plane.labels[p], plane.geometry)})
        out["lax"] = views
    out["pipeline_timings"] = res.timings
    out.update(_elapsed(t))
    return out


def _pct(a: float, b: float) -> float:
    return (a - b) / b * 100.0 if b > 0 else float("nan")


def lax_dice(volumes: dict[str, tuple[np.ndarray, Geometry]], ref: np.ndarray,
             plane: Geometry) -> dict[str, Any]:
    """Every volume sampled onto one LAX plane, 2D Dice per structure on the pixels inside
    every volume. ref: [h, w] labels of the plane; plane: its one-slice geometry."""
    pts = plane_points(plane, ref.shape)[0]
    sampled = {m: sample_labels(v, g, pts) for m, (v, g) in volumes.items()}
    mask = np.logical_and.reduce([ins for _, ins in sampled.values()])
    lvc = ref == 1
    return {"mask_fraction": float(mask.mean()),
            "lvc_outside_mask": float((lvc & ~mask).sum() / lvc.sum()) if lvc.any() else None,
            "dice": {m: structure_dice(lab, ref, mask=mask) for m, (lab, _) in sampled.items()}}


def pair_case(rec: Reconstructor, pair: dict[str, str], *, steps: int | None,
              interp: int | None, baselines: Sequence[str] = BASELINES,
              label_inputs: Sequence[str] = LABEL_INPUTS) -> dict[str, Any]:
    """The LAX protocol on one real SAX + LAX pair (M&Ms-2 layout, one phase)."""
    from deeprecon.runtime.io.nifti import load_nifti

    t = _timer()
    study = load_nifti(pair["sa"], label_convention="project")
    _, lax_labels, lax_geo = load_lax_plane(pair["la"])
    res = rec.reconstruct(study, steps=steps, interp=interp, phases="all")
    vols, left_out = method_volumes(rec, res, study.labels, baselines=baselines,
                                    label_inputs=label_inputs)
    views = [{"view": "LA", "phase": p,
              **lax_dice({m: per[p] for m, per in vols.items()}, lax_labels[p], lax_geo)}
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
    if "slice-drop" in protocols:
        from deeprecon.runtime.io import load_study

        root = args.data / "training" if (args.data / "training").is_dir() else args.data
        patients = _acdc_patients(args.split, args.max_patients)
        data["slice-drop"] = (f"ACDC {args.split} split, {len(patients)} patients "
                              f"({', '.join(p[-3:] for p in patients)}), ED and ES")
        for pid in patients:
            case = slice_drop_case(rec, load_study(root / pid), name=pid, steps=args.steps, **kw)
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
                                protocols=ph_protocols, **kw)
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
            case = pair_case(rec, pair, steps=args.steps, interp=args.interp, **kw)
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
    return result


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
    return ap


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    result = run(args)
    out = args.out or ROOT / "benchmarks" / "results" / f"eval_recon_{'_'.join(result['protocols'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    table = markdown(result)
    print(table)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
    return result


if __name__ == "__main__":
    main()
