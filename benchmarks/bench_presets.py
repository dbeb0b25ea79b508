"""What one inversion step of a preset costs: FLOPs per network and measured time.

The step is the one the runtime and the latents stage take for a batch of images: G
forward + backward to w+, the fused NCC/ROI-L2 op, LPIPS of y = G(w) against cached
features of x (forward + backward), E(y) forward + backward for the w-regulariser.
FLOPs come from ``torch.utils.flop_counter`` (matmul and convolution FLOPs: 2 per
multiply-add; elementwise work is not counted); times are the median over ``--repeats``
steps after warm-up, per thread count, with untrained networks of the preset (the
same cost as trained ones). The matmul rate of the machine is measured in the same run
(a 1024 x 1024 float32 matmul) so that step times can be read as measured / floor.

    python benchmarks/bench_presets.py --presets cpu64 small128 --threads 1 2

Writes ``benchmarks/results/presets_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from deeprecon.cpp_ext import ncc_roi_loss
from deeprecon.trainer.config import get_preset
from deeprecon.trainer.lpips import load_lpips
from deeprecon.trainer.networks import Encoder, Generator
from provenance import cpu_model, git_info

ROOT = Path(__file__).resolve().parent.parent




def matmul_gflops(repeats: int = 20) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 1024 ** 3 * repeats / (time.perf_counter() - t) / 1e9


def step_parts(preset: str, batch: int):
    """The preset's networks and one inversion step as closures."""
    m = get_preset(preset)
    G = Generator(m.generator).requires_grad_(False).eval()
    E = Encoder(m.encoder).requires_grad_(False).eval()
    lp = load_lpips(layers=m.lpips_layers)
    R = m.resolution
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, R, R, generator=g) * 2 - 1
    roi = torch.ones_like(x)
    with torch.no_grad():
        fx = lp.reference_features(x)
    w0 = torch.randn(batch, m.generator.num_ws, m.generator.w_dim, generator=g)

    def step():
        w = w0.clone().requires_grad_(True)
        y = G(w)
        roi_ncc, _ = ncc_roi_loss(x, y.contiguous(), roi, window=9, lambda_roi=1.0, lambda_ncc=0.5)
        loss = lp.distance_to(fx, y) + roi_ncc + 0.1 * (w - E(y)).square().mean(dim=(1, 2))
        loss.sum().backward()  # only w requires grad: the gradient the inversion needs
        return w.grad

    def part(name):
        w = w0.clone().requires_grad_(True)
        if name == "G":
            G(w).sum().backward()
        elif name == "E":
            E(x.clone().requires_grad_(True)).sum().backward()
        elif name == "LPIPS":
            lp.distance_to(fx, x.clone().requires_grad_(True)).sum().backward()

    return m, step, part


def flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def median_time(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["cpu64", "small128"])
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "presets_cpu.json")
    args = ap.parse_args()
    results = {}
    for preset in args.presets:
        m, step, part = step_parts(preset, args.batch)
        r = {"resolution": m.resolution, "spacing_mm": m.preprocess.spacing_mm,
             "lpips_layers": m.lpips_layers, "batch": args.batch,
             "gflop": {name: round(flops(lambda: part(name)), 3) for name in ("G", "E", "LPIPS")},
             "gflop_step": round(flops(step), 3), "seconds_step": {}, "matmul_gflops": {}}
        for n in args.threads:
            torch.set_num_threads(n)
            r["matmul_gflops"][n] = round(matmul_gflops(), 1)
            r["seconds_step"][n] = round(median_time(step, args.repeats), 4)
        results[preset] = r
        print(preset, json.dumps(r))
    out = {"benchmark": "presets", "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "git": git_info(), "device": {"cpu": cpu_model(), "cores": os.cpu_count()},
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
