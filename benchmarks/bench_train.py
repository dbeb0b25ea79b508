"""Training throughput of every stage (images per second), measured through the real
training command on phantom data.

Each stage is run twice into fresh run folders, for ``--steps-a`` and ``--steps-b``
steps; throughput = (steps_b - steps_a) * batch / (t_b - t_a), so data loading, LPIPS
loading, checkpoints at the end and other fixed costs cancel out. For ``latents`` a
"step" is one Adam step of the inversion of a whole batch of slices, so its figure is
slice-steps per second. The upstream runs that ``encoder``, ``latents``, ``seg`` and
``wseg`` need are made first with a single step each (their quality does not matter
for speed).

    python benchmarks/bench_train.py --preset small128 --device cpu
    python benchmarks/bench_train.py --preset base128 --device cuda --batch 32
    python benchmarks/bench_train.py --preset cpu64 --stages gan --batch 32 --threads 1 2 \
        --variants pure:joint_encoder=false joint: joint-bf16:mixed_precision_cpu=true

``--variants NAME:KEY=VALUE,...`` times each stage once per variant (stage settings, as
``train --set``), and ``--threads`` once per torch thread count, all in the same process
and run, so that the figures compare. The ``cpu64`` default figures came from the last
command above.

Writes ``benchmarks/results/train_<preset>_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from deeprecon.runtime.phantom import make_phantom, write_phantom
from deeprecon.trainer.cli import train

STAGES = ("gan", "encoder", "latents", "seg", "seg-direct", "wseg")
NEEDS = {"encoder": ("gan",), "latents": ("gan", "encoder"), "seg": ("latents",),
         "wseg": ("latents",)}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small128")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps-a", type=int, default=2)
    ap.add_argument("--steps-b", type=int, default=6)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--phantoms", type=int, default=4, help="phantoms of 10 slices x 2 phases")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--variants", nargs="+", default=[":"],
                    help="NAME:KEY=VALUE,... stage settings per variant (default: one, as configured)")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    args = ap.parse_args()
    variants = {}
    for v in args.variants:
        name, _, kvs = v.partition(":")
        variants[name or "default"] = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        data = work / "data"
        for seed in range(args.phantoms):
            write_phantom(make_phantom(slices=10, phases=2, seed=seed, anatomy_jitter=0.1),
                          data / f"phantom{seed}")
        # the latent bank inverts every slice: one phantom (20 slices) is enough to time it
        one = work / "data1"
        shutil.copytree(data / "phantom0", one / "phantom0")
        runs: dict[str, Path] = {}

        def run(stage: str, out: Path, steps: int, extra: dict | None = None) -> float:
            inputs = {k: runs[k] for k in NEEDS.get(stage, ())}
            sets = dict(extra or {})
            if stage == "latents":
                sets["checkpoint_every"] = "1000"
            t0 = time.perf_counter()
            src = one if stage == "latents" else data
            train(stage, data=None if stage in ("seg", "wseg") else src, preset=args.preset,
                  out=out, device=args.device, steps=steps, batch=args.batch, sets=sets,
                  inputs=inputs, max_patients=None)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        def upstream(stage: str) -> None:
            for need in NEEDS.get(stage, ()):
                if need not in runs:
                    upstream(need)
                    runs[need] = work / f"up-{need}"
                    run(need, runs[need], 1)

        results = {}
        for stage in args.stages.split(","):  # warm-up: first-call costs stay out of the figures
            upstream(stage)
            run(stage, work / f"warmup-{stage}", 1, next(iter(variants.values())))
        for threads in args.threads:
            torch.set_num_threads(threads)
            for vname, vsets in variants.items():
                for stage in args.stages.split(","):
                    upstream(stage)
                    key = stage if len(variants) == 1 and len(args.threads) == 1 \
                        else f"{stage}/{vname}/threads{threads}"
                    tag = key.replace("/", "-")
                    ta = run(stage, work / f"{tag}-a", args.steps_a, vsets)
                    tb = run(stage, work / f"{tag}-b", args.steps_b, vsets)
                    n_items = args.batch * (args.steps_b - args.steps_a)
                    if stage == "latents":
                        n_slices = json.loads((work / f"{tag}-b" / "summary.json").read_text())["n_slices"]
                        n_items = n_slices * (args.steps_b - args.steps_a)
                    ips = n_items / (tb - ta)
                    results[key] = {"images_per_s": round(ips, 3), "seconds_a": round(ta, 2),
                                    "seconds_b": round(tb, 2), "threads": threads,
                                    "settings": vsets,
                                    "unit": "slice-steps/s" if stage == "latents" else "images/s"}
                    print(f"{key:30s} {ips:9.2f} {results[key]['unit']}  "
                          f"({args.steps_a} steps {ta:.1f} s, {args.steps_b} steps {tb:.1f} s)",
                          flush=True)
        record = {"benchmark": "train_throughput", "preset": args.preset, "device": args.device,
                  "device_name": _device_name(args.device), "batch": args.batch,
                  "steps": [args.steps_a, args.steps_b], "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "commit": _commit(),
                  "date": time.strftime("%Y-%m-%d"), "results": results}
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"train_{args.preset}_{args.device.split(':')[0]}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
