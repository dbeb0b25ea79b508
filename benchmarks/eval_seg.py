"""E1: 2D segmentation on the ACDC validation split (the paper's Table 1 rows).

For every validation patient (ED and ES, manual labels), on the native grid:

- ``DirectSeg``: the U-Net of a ``seg-direct`` run on the real model-grid images x;
- ``DeepRecon_no`` / ``DeepRecon_K``: the bundle's pipeline (``Reconstructor``) with K
  inversion steps (K = 0: Seg on G(E(x))); its native segmentation as written by
  ``reconstruct``;
- ``W+SegNet`` (with ``--wseg RUN``): the mask network on the w* of the largest K;
- ``DirectSeg_on_G_K`` (with ``--direct``, largest K > 0): a diagnostic, DirectSeg on
  G(w*) instead of x. Against ``DeepRecon_K`` it separates the two limits of the chain:
  how much anatomy G(w*) keeps (this row) and how well the Seg trained on synthetic
  images reads it.

DirectSeg and W+SegNet probabilities go back to the native grid the way the pipeline's
go (class probabilities resampled, then argmax), and every row keeps each structure's
largest 3D part as ``reconstruct`` does (``--keep-islands``: the labels as they are).
Metrics per structure (LVC, LVM, RVC) per patient-phase volume: 3D Dice and HD95 (mm,
the real voxel spacing); mean (sd) over the volumes. Image quality on the model grid inside the heart ROI (the labelled heart
dilated by 10 mm, as in training): PSNR and SSIM of G(E(x)) (K = 0) and of G(w*).
Seconds per study: the pipeline's own stage timings, end to end with the
high-resolution volume at the default interpolation.

    python benchmarks/eval_seg.py --bundle out/bundle --direct runs/direct --wseg runs/wseg \
        --steps 0 20 100 --out benchmarks/results/eval_seg_acdc_val.json --md docs/eval_seg.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from deeprecon.runtime.io import load_study
from deeprecon.runtime.jsonsafe import json_safe
from deeprecon.runtime.metrics import evaluate_segmentation
from deeprecon.runtime.pipeline import Reconstructor
from deeprecon.runtime.postprocess import keep_largest_component
from deeprecon.runtime.preprocess import prepare
from deeprecon.trainer.config import ModelConfig
from deeprecon.trainer.data import heart_roi
from deeprecon.trainer.losses import ssim as ssim_t
from deeprecon.trainer.networks import UNet, WSegNet
from deeprecon.trainer.run import load_networks, read_run
from deeprecon.trainer.split import load_split
from provenance import cpu_model, git_info

STRUCTURES = ("LVC", "LVM", "RVC")
ROOT = Path(__file__).resolve().parent.parent




def _spacing(study) -> tuple[float, float, float]:
    """(slice spacing, row spacing, column spacing) in mm."""
    gaps = study.geometry.slice_gaps
    dz = float(np.median(gaps)) if len(gaps) else float(study.geometry.slice_thickness or 1.0)
    return (dz, *map(float, study.geometry.pixel_spacing))


def _metrics(pred: np.ndarray, ref: np.ndarray, spacing) -> list[dict]:
    """Per phase: {structure: {dice, hd95_mm}} for [P, S, H, W] label arrays."""
    out = []
    for p in range(ref.shape[0]):
        m = evaluate_segmentation(pred[p], ref[p], spacing)
        out.append({k: {"dice": m[k]["dice"], "hd95_mm": m[k]["hd95_mm"]} for k in STRUCTURES})
    return out


def _probs(net, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """softmax(net(x)) for a stack of inputs [N, ...] (float32 numpy)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(torch.softmax(net(torch.from_numpy(x[i:i + batch])), 1).numpy())
    return np.concatenate(out)


def _image_quality(x: np.ndarray, y: np.ndarray, roi: np.ndarray) -> dict:
    """PSNR (dB, range [-1, 1]) and SSIM inside the ROI per image, averaged per study:
    outside the ROI both images are set to the background (-1) before comparing."""
    xt = torch.from_numpy(np.where(roi, x, -1.0).astype(np.float32))[:, None]
    yt = torch.from_numpy(np.where(roi, y, -1.0).astype(np.float32))[:, None]
    frac = roi.reshape(len(roi), -1).mean(1)  # PSNR over the ROI's pixels, not the grid's
    mse = (xt - yt).square().flatten(1).mean(1).numpy() / np.maximum(frac, 1e-6)
    p = 10 * np.log10(4.0 / np.maximum(mse, 1e-12))
    return {"psnr": float(p.mean()), "ssim": float(ssim_t(xt, yt).mean())}


def _mean_sd(values) -> dict:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    finite = v[np.isfinite(v)]
    return {"mean": float(finite.mean()) if finite.size else None,
            "sd": float(finite.std(ddof=1)) if finite.size > 1 else None,
            "n": int(v.size), "n_infinite": int(v.size - finite.size)}


def evaluate(data: Path, patients: list[str], *, bundle: Path, steps: list[int],
             direct: Path | None, wseg: Path | None, batch: int | None = None,
             largest_component: bool = True, backend: str = "auto",
             threads: int | None = None) -> dict:
    rows: dict[str, dict] = {}

    def post(labels, study):  # the pipeline's step, on the rows that bypass it
        if not largest_component:
            return labels
        return keep_largest_component(labels, study.geometry.pixel_spacing)[0]

    rec = Reconstructor(bundle, backend=backend, device="cpu", threads=threads)
    model = ModelConfig.from_dict(rec.bundle.manifest["model"]["config"])
    dnet = wnet = None
    if direct is not None:
        dnet = load_networks(direct, {"Seg": lambda: UNet(model.unet)}, device=torch.device("cpu"))["Seg"]
    if wseg is not None:
        wnet = load_networks(wseg, {"WSeg": lambda: WSegNet(model.wseg)}, device=torch.device("cpu"))["WSeg"]
    per_patient = []
    for pid in patients:
        study = load_study(data / pid)
        ref = study.labels
        spacing = _spacing(study)
        entry = {"patient": pid, "phase_ids": [int(i) for i in study.phase_ids],
                 "spacing_mm": spacing, "rows": {}}
        images, transform = prepare(study, rec.bundle.preprocess)
        P, S, R, _ = images.shape
        ref_model = transform.labels_to_model(ref)
        roi = heart_roi(ref_model, transform.model_valid_mask(), n_phases=P,
                        spacing_mm=transform.spacing_mm).reshape(P * S, R, R)
        if dnet is not None:
            t0 = time.perf_counter()
            probs = _probs(dnet, images.reshape(P * S, 1, R, R))
            labels = post(transform.labels_to_native(probs.reshape(P, S, -1, R, R)), study)
            entry["rows"]["DirectSeg"] = {"metrics": _metrics(labels, ref, spacing),
                                          "seconds": time.perf_counter() - t0}
        for k in steps:
            opts = {} if batch is None else {"batch": batch}
            res = rec.reconstruct(study, steps=k, phases="all",
                                  largest_component=largest_component, **opts)
            name = "DeepRecon_no" if k == 0 else f"DeepRecon_{k}"
            q = _image_quality(res.model_images.reshape(P * S, R, R),
                               res.model_recon.reshape(P * S, R, R), roi)
            entry["rows"][name] = {"metrics": _metrics(res.labels, ref, spacing),
                                   "seconds": float(sum(res.timings.values())),
                                   "timings": res.timings, "image": q,
                                   "steps_taken_mean": float(np.mean(res.inversion["steps"]))}
            entry.setdefault("_pictures", {})[name] = res.model_recon[:, S // 2]  # [P, R, R]
            entry["_pictures"]["x"] = res.model_images[:, S // 2]
            if dnet is not None and k == max(steps) and k > 0:
                # diagnostic: does G(w*) keep the anatomy? DirectSeg on the rendering
                probs = _probs(dnet, res.model_recon.reshape(P * S, 1, R, R))
                labels = post(transform.labels_to_native(probs.reshape(P, S, -1, R, R)), study)
                entry["rows"][f"DirectSeg_on_G_{k}"] = {"metrics": _metrics(labels, ref, spacing)}
            if wnet is not None and k == max(steps):
                probs = _probs(wnet, res.latents.reshape((P * S,) + res.latents.shape[2:]))
                labels = post(transform.labels_to_native(probs.reshape(P, S, -1, R, R)), study)
                entry["rows"]["W+SegNet"] = {"metrics": _metrics(labels, ref, spacing),
                                             "code_from": name}
        per_patient.append(entry)
        print(pid, "first volume (ED):",
              {r: [round(v["metrics"][0][s]["dice"] or 0, 3) for s in STRUCTURES]
               for r, v in entry["rows"].items()}, flush=True)
    rec.close()
    pictures = {e["patient"]: e.pop("_pictures", {}) for e in per_patient}
    for entry in per_patient:
        for name, row in entry["rows"].items():
            rows.setdefault(name, {"volumes": [], "seconds": [], "image": []})
            rows[name]["volumes"] += row["metrics"]
            if "seconds" in row:
                rows[name]["seconds"].append(row["seconds"])
            if "image" in row:
                rows[name]["image"].append(row["image"])
    summary = {}
    for name, r in rows.items():
        s = {st: {m: _mean_sd([v[st][m] for v in r["volumes"]]) for m in ("dice", "hd95_mm")}
             for st in STRUCTURES}
        if r["seconds"]:
            s["seconds_per_study"] = _mean_sd(r["seconds"])
        if r["image"]:
            s["image_roi"] = {m: _mean_sd([i[m] for i in r["image"]]) for m in ("psnr", "ssim")}
        summary[name] = s
    return {"summary": summary, "patients": per_patient, "bundle": rec.bundle_info(),
            "backend": rec.backend.info(), "_pictures": pictures}


def figure(pictures: dict, path: Path, n: int = 6) -> None:
    """Mid-ventricular slices (ED, ES) of the first ``n`` patients: the real slice x,
    then each method's rendering (G(E(x)) for K = 0, G(w*) for K > 0), one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pats = list(pictures)[:n]
    rows = ["x"] + [k for k in pictures[pats[0]] if k != "x"]
    cols = [(p, ph) for p in pats for ph in range(pictures[p]["x"].shape[0])]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols), 1.4 * len(rows)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, (p, ph) in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(pictures[p][row][ph], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{p[-3:]} {'ED' if ph == 0 else 'ES'}", fontsize=7)
            if j == 0:
                label = {"x": "real x", "DeepRecon_no": "G(E(x))"}.get(row, row.replace("DeepRecon_", "G(w*) K="))
                ax.set_ylabel(label, fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["| method | LVC Dice | LVM Dice | RVC Dice | LVC HD95 (mm) | LVM HD95 | RVC HD95 | "
             "PSNR ROI (dB) | SSIM ROI | s / study |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def ms(d, digits):
        if d is None or d["mean"] is None:
            return "-"
        return f"{d['mean']:.{digits}f} ({d['sd']:.{digits}f})" if d["sd"] is not None else f"{d['mean']:.{digits}f}"

    for name, r in s.items():
        cells = [ms(r[st]["dice"], 3) for st in STRUCTURES] + [ms(r[st]["hd95_mm"], 1) for st in STRUCTURES]
        img = r.get("image_roi", {})
        cells += [ms(img.get("psnr"), 2), ms(img.get("ssim"), 3), ms(r.get("seconds_per_study"), 2)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "acdc")
    ap.add_argument("--bundle", type=Path, required=True,
                    help="the bundle of the DeepRecon rows (its preprocessing is used by every row)")
    ap.add_argument("--direct", type=Path, help="a finished seg-direct run (DirectSeg row)")
    ap.add_argument("--wseg", type=Path, help="a finished wseg run (W+SegNet row)")
    ap.add_argument("--steps", type=int, nargs="*", default=[0, 20, 100],
                    help="K of the DeepRecon rows (none: only DirectSeg / W+SegNet rows)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-patients", type=int)
    ap.add_argument("--batch", type=int, help="inversion batch (default: the bundle's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "torch"],
                    help="the DeepRecon rows' backend (auto: what reconstruct runs by default)")
    ap.add_argument("--keep-islands", action="store_true",
                    help="score the networks' labels as they are (default: every row keeps "
                         "each structure's largest 3D part, as reconstruct does)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_seg_acdc_val.json")
    ap.add_argument("--md", type=Path, help="also write the table as markdown here")
    ap.add_argument("--figure", type=Path, help="a PNG of real vs G(E(x)) vs G(w*) mid slices")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data / "training" if (args.data / "training").is_dir() else args.data
    patients = load_split()[args.split][:args.max_patients]
    t0 = time.time()
    result = evaluate(data, patients, bundle=args.bundle, steps=args.steps, direct=args.direct,
                      wseg=args.wseg, batch=args.batch,
                      largest_component=not args.keep_islands, backend=args.backend,
                      threads=args.threads)
    result.update({
        "protocol": {"data": str(args.data), "split": args.split, "patients": patients,
                     "volumes": "every labelled phase (ED, ES) of each patient is one 3D volume; "
                                "mean (sd) over the volumes",
                     "metrics": "3D Dice and HD95 (mm, MedPy pooled) on the native grid",
                     "image_roi": "labelled heart dilated by 10 mm on the model grid",
                     "largest_component": not args.keep_islands,
                     "runs": {"direct": str(args.direct) if args.direct else None,
                              "wseg": str(args.wseg) if args.wseg else None,
                              "direct_run": read_run(args.direct) if args.direct else None}},
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git": git_info(), "wall_s": round(time.time() - t0, 1),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    pictures = result.pop("_pictures")
    if args.figure and pictures and all(pictures.values()):
        figure(pictures, args.figure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    table = markdown(result)
    print(table)
    if args.md:
        args.md.write_text(table)


if __name__ == "__main__":
    main()
