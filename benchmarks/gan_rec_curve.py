"""The gan stage's reconstruction curve of several runs at equal images.

The joint-encoder gan stage logs ``rec_psnr``, the PSNR of G(E(x)) on each step's real
batch, with the images seen so far (``nimg``). This prints, for each run, the mean of
``rec_psnr`` over the log lines in bins of ``--bin`` thousand images, so that runs of
different presets or recipes can be compared where they have seen the same number of
images. A run is NAME=LOG[,LOG...] (the segments of one run, in order; a later segment's
lines replace an earlier one's from its first step on).

    python benchmarks/gan_rec_curve.py --bin 16 \\
        cpu64=training/cpu64/gan/log-0-fp32.jsonl,training/cpu64/gan/log-1-bf16.jsonl \\
        cpu64w=training/cpu64w/gan/log-0-bf16.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def read_run(paths: list[Path]) -> list[dict]:
    """The log lines of a run's segments: each segment replaces what came before from
    its first step on (a resumed segment repeats the tail of the one it resumed)."""
    lines: list[dict] = []
    for path in paths:
        seg = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
        seg = [d for d in seg if "rec_psnr" in d and "nimg" in d]
        if seg:
            lines = [d for d in lines if d["step"] < seg[0]["step"]] + seg
    return lines


def curve(lines: list[dict], bin_kimg: float) -> dict[int, float]:
    """bin index -> mean rec_psnr of the lines whose nimg falls in it."""
    bins: dict[int, list[float]] = {}
    for d in lines:
        if math.isfinite(d["rec_psnr"]):
            bins.setdefault(int(d["nimg"] // (bin_kimg * 1000)), []).append(d["rec_psnr"])
    return {b: sum(v) / len(v) for b, v in sorted(bins.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=LOG[,LOG...]")
    ap.add_argument("--bin", type=float, default=16.0, help="bin width in thousands of images")
    args = ap.parse_args()
    curves = {}
    for spec in args.runs:
        name, _, logs = spec.partition("=")
        if not logs:
            raise SystemExit(f"expected NAME=LOG[,LOG...], got {spec!r}")
        curves[name] = curve(read_run([Path(p) for p in logs.split(",")]), args.bin)
    bins = sorted(set().union(*curves.values()))
    print("| kimg | " + " | ".join(curves) + " |")
    print("|---|" + "---|" * len(curves))
    for b in bins:
        lo, hi = b * args.bin, (b + 1) * args.bin
        cells = [f"{c[b]:.2f}" if b in c else "" for c in curves.values()]
        print(f"| {lo:g}-{hi:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
