"""Benchmark of the fused NCC + ROI-L2 loss and its gradient (deeprecon.cpp_ext).

Times forward + gradient (d loss / d y) of one call for a batch of B images of S x S,
for three implementations:

    reference     the pure-PyTorch specification (five convolutions) + autograd
    grouped_conv  one grouped convolution for all five local sums + autograd
    fused         the compiled kernel for the device (CPU or CUDA)

On a GPU it also measures the device's copy bandwidth (a large device-to-device copy,
read + write counted) and reports the fused kernel's bytes moved over its time, as a
fraction of that bandwidth, for two byte models (per pixel, float32):

    kernel  what the three launches read and write: stats reads x, y, roi and writes
            C, B, E; grad reads C, B, E, x, y, roi and writes grad: 13 x 4 = 52 bytes
            (halo re-reads, served by L2, and the per-tile partials are not counted)
    ideal   inputs read once and the gradient written: x, y, roi, grad = 16 bytes

Usage (from the repository root, after `pip install --no-build-isolation -e .`):

    python benchmarks/bench_ncc_roi.py                      # cpu, B in 1 20 500
    python benchmarks/bench_ncc_roi.py --device cuda        # writes ncc_roi_cuda.json

Results go to benchmarks/results/ncc_roi_<device>.json (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deeprecon.cpp_ext import ncc_roi_loss, ncc_roi_loss_grouped_conv, ncc_roi_loss_reference
from deeprecon.cpp_ext.ops import kernels_available
from deeprecon.cpp_ext.reference import loss_and_grad
from provenance import cpu_model

REPO = Path(__file__).resolve().parents[1]
KERNEL_BYTES_PER_PIXEL = 13 * 4
IDEAL_BYTES_PER_PIXEL = 4 * 4



def git_commit() -> dict:
    def git(*args):
        p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        return p.stdout.strip() if p.returncode == 0 else None
    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": None if status is None else bool(status)}


def device_info(device: str) -> dict:
    info = {"type": device, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda_runtime=torch.version.cuda)
    return info


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, *, min_runs: int, max_runs: int, budget_s: float) -> list[float]:
    """Wall times in ms of fn() after one warm-up call: at least min_runs, then more
    until max_runs or budget_s seconds. CUDA: events on the current stream."""
    fn()
    sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs
                                     or time.perf_counter() - start_all < budget_s):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth_gbs(nbytes: int = 1 << 30, runs: int = 20) -> float:
    """Device-to-device copy bandwidth, GB/s, counting the bytes read and written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    times = time_call(lambda: dst.copy_(src), "cuda", min_runs=runs, max_runs=runs, budget_s=0)
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 20, 500])
    ap.add_argument("--size", type=int, default=128, help="images are size x size")
    ap.add_argument("--window", type=int, default=9)
    ap.add_argument("--mode", choices=["box", "gaussian"], default="box")
    ap.add_argument("--max-runs", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=3.0,
                    help="time budget per (implementation, B) beyond the first 3 runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = args.device
    if not kernels_available()[device]:
        sys.stderr.write(f"the fused {device} kernel of deeprecon.cpp_ext is not available "
                         f"(see deeprecon.cpp_ext.kernels_available())\n")
        return 69
    out = args.out or REPO / "benchmarks" / "results" / f"ncc_roi_{device}.json"
    kw = dict(window=args.window, mode=args.mode)
    impls = {
        "reference": lambda x, y, roi: loss_and_grad(ncc_roi_loss_reference, x, y, roi, **kw),
        "grouped_conv": lambda x, y, roi: loss_and_grad(ncc_roi_loss_grouped_conv, x, y, roi, **kw),
        "fused": lambda x, y, roi: ncc_roi_loss(x, y, roi, impl=device, **kw),
    }
    result = {
        "benchmark": "ncc_roi_loss forward + gradient wrt y",
        "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
        "device": device_info(device),
        "config": {"size": [args.size, args.size], "window": args.window, "mode": args.mode,
                   "dtype": "float32", "roi": "per image [B, 1, H, W]",
                   "timing": "median of runs after one warm-up; ms per call"},
        "results": {},
    }
    if device == "cuda":
        result["device"]["copy_bandwidth_gbs"] = round(copy_bandwidth_gbs(), 1)

    for B in args.batches:
        g = torch.Generator().manual_seed(B)
        x, y, roi = (torch.rand(B, 1, args.size, args.size, generator=g).to(device)
                     for _ in range(3))
        row: dict = {}
        outputs = {}
        for name, fn in impls.items():
            times = time_call(lambda: fn(x, y, roi), device, min_runs=3,
                              max_runs=args.max_runs, budget_s=args.budget_s)
            row[name] = {"median_ms": round(statistics.median(times), 4),
                         "min_ms": round(min(times), 4), "runs": len(times)}
            outputs[name] = fn(x, y, roi)
            print(f"B={B:4d} {name:13s} {row[name]['median_ms']:10.3f} ms "
                  f"({len(times)} runs)", flush=True)
        # what was timed computes the same thing: fused vs the reference (max error / max)
        ref_loss, ref_grad = outputs["reference"]
        for name in ("grouped_conv", "fused"):
            loss, grad = outputs[name]
            row[name]["max_rel_err_vs_reference"] = {
                "loss": float((loss - ref_loss).abs().max() / ref_loss.abs().max()),
                "grad": float((grad - ref_grad).abs().max() / ref_grad.abs().max())}
        fused_ms = row["fused"]["median_ms"]
        row["ratios"] = {
            "reference_over_fused": round(row["reference"]["median_ms"] / fused_ms, 2),
            "grouped_conv_over_fused": round(row["grouped_conv"]["median_ms"] / fused_ms, 2)}
        if device == "cuda":
            pixels = B * args.size * args.size
            bw = result["device"]["copy_bandwidth_gbs"]
            for model, per_px in (("kernel", KERNEL_BYTES_PER_PIXEL),
                                  ("ideal", IDEAL_BYTES_PER_PIXEL)):
                gbs = pixels * per_px / (fused_ms * 1e-3) / 1e9
                row["fused"][f"bytes_{model}"] = pixels * per_px
                row["fused"][f"achieved_gbs_{model}"] = round(gbs, 1)
                row["fused"][f"fraction_of_copy_bandwidth_{model}"] = round(gbs / bw, 3)
        result["results"][str(B)] = row

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
