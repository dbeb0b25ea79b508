"""How well a gan run's G_ema and E reproduce validation slices: PSNR inside the heart
ROI of G(E(x)) and of G(w*) after K steps of the latents stage's inversion (the hybrid
loss of runtime/inversion.py), on evenly spaced slices of the ACDC validation split
(``--split train``: of the training split, to tell overfitting from a capacity limit).
A quick check of a generator in training (between the training log's ``rec_psnr``, on
training batches, and a full evaluation, which needs the whole chain).

    python benchmarks/gan_inversion_psnr.py training/cpu64/gan/compact.safetensors --slices 64

Takes a compact gan state (``compact.safetensors``) or a gan run's ``model.safetensors``;
``--encoder RUN``: the E of a finished encoder run instead of the state's joint E.
PSNR: images in [-1, 1] (peak-to-peak 2), mean squared error over the ROI pixels, mean
over slices. With ``--direct RUN`` (a finished seg-direct run, trained on real slices)
also the Dice of its U-Net, per structure pooled over the slices, on x, on G(E(x)) and
on each G(w*) against the slices' labels: how much anatomy the renderings keep, which
PSNR does not say (docs/models.md, 2026-12-03). Writes
``benchmarks/results/gan_inversion_psnr.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deeprecon.trainer.checkpoint import MODEL_FILE, load_compact, load_model
from deeprecon.trainer.config import get_preset
from deeprecon.trainer.data import build_slices
from deeprecon.trainer.lpips import load_lpips
from deeprecon.trainer.networks import Encoder, Generator, UNet
from deeprecon.trainer.run import load_networks
from deeprecon.trainer.stages import latents
from provenance import cpu_model, git_info

ROOT = Path(__file__).resolve().parent.parent


def _file_format(path: Path) -> str | None:
    """The ``format`` field of a safetensors file's metadata (compact or model file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("format")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("state", type=Path, help="compact.safetensors or a gan run's model.safetensors")
    ap.add_argument("--preset", default="cpu64")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "acdc")
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--split", default="val", choices=["val", "train"],
                    help="ACDC split to take the slices from (train: slices G and E saw)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=latents.Config().lr,
                    help="Adam learning rate on w+ (default: the latents stage's)")
    ap.add_argument("--encoder", type=Path,
                    help="a finished encoder run: its E instead of the state's (joint) E")
    ap.add_argument("--direct", type=Path,
                    help="a finished seg-direct run: also its U-Net's Dice on x, G(E(x)) and G(w*)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gan_inversion_psnr.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = get_preset(args.preset)
    G, E = Generator(m.generator), Encoder(m.encoder)
    if _file_format(args.state) == "deeprecon-compact":
        step, _, _ = load_compact(args.state, stage="gan", modules={"G_ema": G, "E": E})
    else:
        load_model(args.state, {"G": G, "E": E})
        step = None
    if args.encoder is not None:
        load_model(args.encoder / MODEL_FILE, {"E": E})
    G.eval().requires_grad_(False)
    E.eval().requires_grad_(False)
    direct = None
    if args.direct is not None:
        direct = load_networks(args.direct, {"Seg": lambda: UNet(m.unet)},
                               device=torch.device("cpu"))["Seg"].eval().requires_grad_(False)
    s = build_slices(args.data, m.preprocess, split=args.split, require_labels=True)
    idx = torch.linspace(0, len(s.images) - 1, args.slices).round().long()
    x, roi = s.images[idx].contiguous(), s.roi[idx].contiguous()
    lp = load_lpips(layers=m.lpips_layers)

    def psnr(y: torch.Tensor) -> float:
        mse = ((y - x) ** 2 * roi).sum(dim=(1, 2, 3)) / roi.sum(dim=(1, 2, 3))
        return float((10 * torch.log10(4.0 / mse)).mean())

    labels = s.labels[idx].long()

    def dice(img: torch.Tensor) -> dict[str, float]:
        """DirectSeg's pooled 2D Dice per structure on images ``img`` [N, 1, R, R]."""
        with torch.no_grad():
            pred = direct(img).argmax(1)
        out = {}
        for c, name in ((1, "LVC"), (2, "LVM"), (3, "RVC")):
            a, b = pred == c, labels == c
            out[name] = round(float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp_min(1)), 4)
        return out

    with torch.no_grad():
        y0 = G(E(x))
        out = {"step": step, "slices": len(idx), "split": args.split, "lr": args.lr, "psnr_G_E_x": psnr(y0)}
    if direct is not None:
        out["direct_dice_x"], out["direct_dice_G_E_x"] = dice(x), dice(y0)
    for k in args.steps:
        t0 = time.perf_counter()
        _, _, y = latents.invert(G, E, lp, x, roi, latents.Config(steps=k, batch=32, lr=args.lr))
        out[f"psnr_K{k}"] = psnr(y)
        out[f"seconds_K{k}"] = round(time.perf_counter() - t0, 1)
        if direct is not None:
            out[f"direct_dice_K{k}"] = dice(y)
    print(json.dumps(out))
    result = {"benchmark": "gan_inversion_psnr", "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "git": git_info(), "device": {"cpu": cpu_model(), "threads": args.threads},
              "state": str(args.state), "encoder": str(args.encoder) if args.encoder else None,
              "preset": args.preset,
              "direct": str(args.direct) if args.direct else None, "result": out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
