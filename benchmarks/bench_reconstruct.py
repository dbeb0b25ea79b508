"""Per-stage and per-study latency of ``Reconstructor.reconstruct`` on one study, for
each backend, with the inversion step's cost, its FLOP floor and the naive anchor, all
in the same run.

    python benchmarks/bench_reconstruct.py                       # cpu64 random bundle, ACDC patient001
    python benchmarks/bench_reconstruct.py --preset tiny --steps 0 20 --backends onnxruntime
    python benchmarks/bench_reconstruct.py --bundle B --study S --device cuda

Without ``--bundle`` a bundle of untrained ``--preset`` networks is made first
(:func:`deeprecon.export.bundle.random_bundle`): its speed is that of a trained bundle
of the same preset. Early stopping is off (``early_stop_patience=0``) so that every
image takes exactly K steps and the figures do not depend on the weights.

Each backend runs in a process of its own (onnxruntime's threads and torch's would
otherwise share the cores of one timing), one after the other; with ``--rounds N`` the
backends run N times, interleaved (A B, B A, A B, ...), so that a slow spell of a
shared machine falls on both, and every figure of the summary is the median over the
rounds:

- per K (``--steps``): one cold call (graph warm-up included) recorded apart, then
  ``--repeats`` warm calls; per stage the median of the warm calls;
- the inversion step alone, per inversion batch (``--batches``): the difference of two
  ``invert`` calls on the study's images, 2 and 2 + ``--step-repeats`` steps, so that
  the once-per-call work cancels out: seconds per step and per image on the runner's
  real path (cached LPIPS features and the hybrid_grad graph on onnxruntime, the fused
  kernel on torch; Adam);
- the naive anchor (its own process): the paper's loop, one image at a time, Adam from
  ``torch.optim``, the unfused plain-PyTorch loss (the kernel's reference
  implementation, LPIPS of (x, y) recomputed every step), eager, at the first K > 0.

The floor of the onnxruntime step: the FLOPs of its graph (hybrid_grad,
``torch.utils.flop_counter`` on the module it was exported from) over the float32
matmul rate measured in the same run.

Writes ``benchmarks/results/reconstruct_<preset>_<device>.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from provenance import cpu_model, git_info

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = REPO.parent / "shared" / "data" / "acdc" / "training" / "patient001"


# ----------------------------------------------------------------------------- workers


def _median_stages(calls: list[dict]) -> dict:
    stages = list(calls[0]["timings_s"])
    return {s: statistics.median(c["timings_s"][s] for c in calls) for s in stages}


def backend_worker(args) -> dict:
    """One backend: per-K stage times, and the inversion step per batch size."""
    from deeprecon.runtime.io import load_study
    from deeprecon.runtime.pipeline import Reconstructor

    study = load_study(args.study)
    rec = Reconstructor(args.bundle, backend=args.worker, device=args.device)
    runs = []
    res = None
    for k in args.steps:
        calls = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            res = rec.reconstruct(study, steps=k, interp=args.interp, early_stop_patience=0)
            calls.append({"timings_s": dict(res.timings), "total_s": time.perf_counter() - t0})
        warm = calls[1:]
        runs.append({"steps": k, "images": int(np.prod(res.model_images.shape[:2])),
                     "cold": calls[0], "warm_median_s": _median_stages(warm),
                     "warm_total_median_s": statistics.median(c["total_s"] for c in warm)})
        print(f"{args.worker} K={k:4d}: " + ", ".join(f"{s} {v:.3f}" for s, v in
              runs[-1]["warm_median_s"].items())
              + f" | total {runs[-1]['warm_total_median_s']:.3f} s", file=sys.stderr)
    # the inversion step alone, per batch: the images of the last reconstruction
    x = np.ascontiguousarray(res.model_images.reshape(-1, 1, *res.model_images.shape[-2:]),
                             dtype=np.float32)
    roi = np.ones_like(x)
    w0 = rec.backend.encode(x)
    per_batch = {}
    for b in args.batches:
        def run(steps: int) -> float:
            t0 = time.perf_counter()
            rec.backend.invert(x, roi, w0, rec.settings(steps=steps, batch=b, early_stop_patience=0))
            return time.perf_counter() - t0
        run(1)  # warm-up at this batch size
        # the difference of two inversions: the per-call work (LPIPS features of x,
        # the last code's scoring, the render) cancels out
        t = (run(2 + args.step_repeats) - run(2)) / args.step_repeats
        per_batch[b] = {"seconds_per_step": t, "seconds_per_image_step": t / len(x)}
        print(f"{args.worker} step, batch {b}: {t:.3f} s for {len(x)} images", file=sys.stderr)
    info = rec.backend.info()
    rec.close()
    return {"backend": args.worker, "info": info, "open_s": rec.open_seconds, "runs": runs,
            "step": {"images": int(len(x)), "repeats": args.step_repeats, "per_batch": per_batch}}


def naive_worker(args) -> dict:
    """The paper's loop: one image at a time, torch.optim.Adam, unfused plain-PyTorch
    loss, eager; weights read from the bundle's torch programs."""
    import torch

    from deeprecon.cpp_ext.reference import ncc_roi_loss_reference
    from deeprecon.runtime.bundle import load_bundle
    from deeprecon.runtime.io import load_study
    from deeprecon.runtime.pipeline import Reconstructor

    k = next(s for s in args.steps if s > 0)
    study = load_study(args.study)
    rec = Reconstructor(args.bundle, backend="torch", device="cpu")
    res = rec.reconstruct(study, steps=0, interp=args.interp)
    x_all = torch.from_numpy(np.ascontiguousarray(
        res.model_images.reshape(-1, 1, *res.model_images.shape[-2:]), dtype=np.float32))
    b = load_bundle(args.bundle)
    G, E, lp = (b.load_program(g) for g in ("generator", "encoder", "lpips"))
    s = rec.settings()
    t0 = time.perf_counter()
    for i in range(len(x_all)):
        x = x_all[i:i + 1]
        roi = torch.ones_like(x)
        with torch.no_grad():
            w = E(x).clone()
        w.requires_grad_(True)
        opt = torch.optim.Adam([w], lr=s.lr)
        for _ in range(k):
            opt.zero_grad()
            y = G(w)
            loss = (s.lambda1 * lp(x, y)
                    + ncc_roi_loss_reference(x, y, roi, window=s.ncc_window,
                                             lambda_roi=s.lambda1, lambda_ncc=s.lambda2)
                    + s.lambda3 * (w - E(y)).square().mean(dim=(1, 2)))
            loss.sum().backward()
            opt.step()
    t = time.perf_counter() - t0
    print(f"naive K={k}: {t:.2f} s for {len(x_all)} images", file=sys.stderr)
    rec.close()
    return {"steps": k, "images": int(len(x_all)), "invert_s": t,
            "seconds_per_step_all_images": t / k, "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- the parent


def floor(bundle: Path, images: int) -> dict:
    """FLOPs of the onnxruntime inversion step for ``images`` images (the hybrid_grad
    graph) and the float32 matmul rate of this machine, now."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deeprecon.export.vjp import HybridGrad, LpipsFeatures
    from deeprecon.runtime.bundle import load_bundle
    from deeprecon.trainer.config import ModelConfig
    from deeprecon.trainer.lpips import load_lpips
    from deeprecon.trainer.networks import Encoder, Generator

    b = load_bundle(bundle)
    m = ModelConfig.from_dict(b.manifest["model"]["config"])
    G = Generator(m.generator).eval().requires_grad_(False)
    E = Encoder(m.encoder).eval().requires_grad_(False)
    lp = load_lpips(layers=m.lpips_layers)
    R, L, C = m.resolution, G.num_ws, G.w_dim
    w = torch.randn(images, L, C)
    x = torch.rand(images, 1, R, R)
    fx = LpipsFeatures(lp)(x)
    hg = HybridGrad(G, E, lp)
    with FlopCounterMode(display=False) as fc:
        hg(w, x, torch.ones(images, 1, R, R), *fx, torch.tensor([1.0, 0.5, 0.1]),
           torch.tensor([9]))
    gflop = fc.get_total_flops() / 1e9
    a, c = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ c
    t0 = time.perf_counter()
    for _ in range(20):
        a @ c
    rate = 2 * 1024 ** 3 * 20 / (time.perf_counter() - t0) / 1e9
    return {"gflop_step": gflop, "matmul_gflops": rate, "floor_s": gflop / rate,
            "torch_threads": torch.get_num_threads()}


def _median_rounds(rounds: list[dict]) -> dict:
    """Per backend, the first round's record with every timing the summary reads
    (warm totals and stages per K, seconds per step per batch) replaced by its median
    over the rounds."""
    out = {}
    for name, first in rounds[0].items():
        recs = [r[name] for r in rounds]
        merged = copy.deepcopy(first)
        for i, run in enumerate(merged["runs"]):
            run["warm_total_median_s"] = statistics.median(r["runs"][i]["warm_total_median_s"]
                                                           for r in recs)
            run["warm_median_s"] = {s: statistics.median(r["runs"][i]["warm_median_s"][s]
                                                         for r in recs)
                                    for s in run["warm_median_s"]}
        for b, d in merged["step"]["per_batch"].items():
            d["seconds_per_step"] = statistics.median(r["step"]["per_batch"][b]["seconds_per_step"]
                                                      for r in recs)
            d["seconds_per_image_step"] = d["seconds_per_step"] / merged["step"]["images"]
        out[name] = merged
    return out


def _child(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--bundle", str(args.bundle),
           "--study", str(args.study), "--device", args.device, "--repeats", str(args.repeats),
           "--step-repeats", str(args.step_repeats), "--steps", *map(str, args.steps),
           "--batches", *map(str, args.batches)]
    if args.interp is not None:
        cmd += ["--interp", str(args.interp)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"{mode} worker failed ({p.returncode})")
    return json.loads(p.stdout)


def _versions() -> dict:
    import importlib.metadata as md
    v = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("torch", "onnxruntime", "onnx", "deeprecon-rt"):
        try:
            v[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle folder (default: a random one)")
    ap.add_argument("--preset", default="cpu64", help="preset of the random bundle")
    ap.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 20, 100])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--step-repeats", type=int, default=10)
    ap.add_argument("--interp", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the backends this many times, in alternating order")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive anchor")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.worker:
        out = naive_worker(args) if args.worker == "naive" else backend_worker(args)
        print(json.dumps(out))
        return

    tmp = tempfile.TemporaryDirectory()
    t0 = time.perf_counter()
    if args.bundle is None:
        from deeprecon.export.bundle import random_bundle
        args.bundle = random_bundle(Path(tmp.name) / "bundle", preset=args.preset,
                                    command="benchmarks/bench_reconstruct.py")
        built = time.perf_counter() - t0
    else:
        built = None
    from deeprecon.runtime.bundle import load_bundle
    b = load_bundle(args.bundle)
    rounds = []
    for i in range(args.rounds):
        order = args.backends if i % 2 == 0 else args.backends[::-1]
        rounds.append({name: _child(args, name) for name in order})
    backends = _median_rounds(rounds)
    naive = None if args.no_naive else _child(args, "naive")
    images = next(iter(backends.values()))["step"]["images"]
    fl = floor(args.bundle, images)
    summary = {}
    if "onnxruntime" in backends:
        o = backends["onnxruntime"]
        best = min(o["step"]["per_batch"], key=lambda k: o["step"]["per_batch"][k]["seconds_per_step"])
        step_o = o["step"]["per_batch"][best]["seconds_per_step"]
        summary["onnxruntime_best_batch"] = int(best)
        summary["onnxruntime_step_s"] = step_o
        summary["step_over_floor"] = step_o / fl["floor_s"]
        if "torch" in backends:
            t = backends["torch"]
            best_t = min(t["step"]["per_batch"], key=lambda k: t["step"]["per_batch"][k]["seconds_per_step"])
            step_t = t["step"]["per_batch"][best_t]["seconds_per_step"]
            summary.update(torch_best_batch=int(best_t), torch_step_s=step_t,
                           step_speedup_onnxruntime_vs_torch=step_t / step_o)
            summary["study_speedup_onnxruntime_vs_torch"] = {
                str(ro["steps"]): rt["warm_total_median_s"] / ro["warm_total_median_s"]
                for ro, rt in zip(o["runs"], t["runs"])}
            # the inversion alone, as the pipeline runs it (its invert stage per step)
            summary["pipeline_step_s"] = {
                name: {str(r["steps"]): r["warm_median_s"]["invert"] / r["steps"]
                       for r in backends[name]["runs"] if r["steps"] > 0}
                for name in ("onnxruntime", "torch")}
            if args.rounds > 1:
                summary["study_speedup_per_round"] = [
                    {str(ro["steps"]): rt["warm_total_median_s"] / ro["warm_total_median_s"]
                     for ro, rt in zip(r["onnxruntime"]["runs"], r["torch"]["runs"])}
                    for r in rounds]
        if naive is not None:
            ro = next(r for r in o["runs"] if r["steps"] == naive["steps"])
            summary["naive_invert_s"] = naive["invert_s"]
            summary["invert_speedup_vs_naive"] = naive["invert_s"] / ro["warm_median_s"]["invert"]
            summary["study_speedup_vs_naive"] = (
                (ro["warm_total_median_s"] - ro["warm_median_s"]["invert"] + naive["invert_s"])
                / ro["warm_total_median_s"])
    result = {
        "benchmark": "reconstruct", "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_info(), "device": {"type": args.device, "cpu": cpu_model(), "cores": os.cpu_count()},
        "versions": _versions(),
        "bundle": {"name": b.name, "preset": b.preset, "sha256": b.sha256,
                   "random": built is not None, "build_s": built},
        "study": str(args.study), "repeats": args.repeats, "early_stop": "off",
        "rounds": len(rounds), "backends": backends,
        "backends_per_round": rounds if len(rounds) > 1 else None,
        "naive": naive, "floor": fl, "summary": summary,
    }
    out = args.out or REPO / "benchmarks" / "results" / \
        f"reconstruct_{b.preset}_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2), file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
