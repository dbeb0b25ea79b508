"""Per-stage latency of ``Reconstructor.reconstruct`` on one study, at several K.

    python benchmarks/bench_reconstruct.py                       # tiny random bundle, ACDC patient001, CPU
    python benchmarks/bench_reconstruct.py --bundle B --study S --device cuda --steps 0 20 100

Without ``--bundle`` a bundle of untrained ``--preset`` networks is made first
(:func:`deeprecon.export.bundle.random_bundle`): its speed is that of a trained bundle
of the same preset. Early stopping is switched off (``early_stop_patience=0``) so that
every image takes exactly K steps and the figures do not depend on the weights.

For each K: one cold call (the first in the process: graph warm-up included) is
recorded apart, then ``--repeats`` warm calls; per stage the median of the warm calls
is reported. Writes ``benchmarks/results/reconstruct_<preset>_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deeprecon.runtime.io import load_study
from deeprecon.runtime.pipeline import Reconstructor
from provenance import git_info

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = REPO.parent / "shared" / "data" / "acdc" / "training" / "patient001"



def _device(device: str) -> dict:
    d = {"type": device, "cpu_count": os.cpu_count(), "torch_num_threads": torch.get_num_threads(),
         "cpu_model": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                d["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.startswith("cuda"):
        d["gpu_name"] = torch.cuda.get_device_name(torch.device(device))
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle folder (default: a random one)")
    ap.add_argument("--preset", default="tiny", help="preset of the random bundle")
    ap.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 20])
    ap.add_argument("--interp", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    bundle = args.bundle
    t0 = time.perf_counter()
    if bundle is None:
        from deeprecon.export.bundle import random_bundle
        bundle = random_bundle(Path(tmp.name) / "bundle", preset=args.preset,
                               command="benchmarks/bench_reconstruct.py")
    t_bundle = time.perf_counter() - t0
    study = load_study(args.study)
    rec = Reconstructor(bundle, device=args.device)
    runs = []
    for k in args.steps:
        calls = []
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            res = rec.reconstruct(study, steps=k, interp=args.interp, early_stop_patience=0)
            total = time.perf_counter() - t0
            calls.append({"timings_s": dict(res.timings), "total_s": total})
        warm = calls[1:]
        stages = list(warm[0]["timings_s"])
        median = {s: statistics.median(c["timings_s"][s] for c in warm) for s in stages}
        runs.append({
            "steps": k, "interp": res.interp, "phases": list(res.phases),
            "images": int(np.prod(res.model_images.shape[:2])),
            "hr_slices": int(res.hr_images.shape[1]),
            "cold": calls[0], "warm_median_s": median,
            "warm_total_median_s": statistics.median(c["total_s"] for c in warm),
            "psnr_mean_db": float(np.mean(res.inversion["psnr"])),
        })
        print(f"K={k:4d}: " + ", ".join(f"{s} {v:.3f}" for s, v in median.items())
              + f" | total {runs[-1]['warm_total_median_s']:.3f} s (cold "
              f"{calls[0]['total_s']:.2f} s)", file=sys.stderr)
    result = {
        "benchmark": "reconstruct", "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_info(), "device": _device(args.device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
        "bundle": {"name": rec.bundle.name, "preset": rec.bundle.preset,
                   "sha256": rec.bundle.sha256, "random": args.bundle is None,
                   "build_s": t_bundle if args.bundle is None else None},
        "open_s": rec.open_seconds,
        "study": {"path": str(args.study), "phases": study.n_phases, "slices": study.n_slices,
                  "matrix": list(study.matrix)},
        "repeats": args.repeats, "early_stop": "off", "runs": runs,
    }
    out = args.out or REPO / "benchmarks" / "results" / \
        f"reconstruct_{rec.bundle.preset}_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    rec.close()


if __name__ == "__main__":
    main()
