"""The input fuzzer of the test suite (``tests/test_fuzz_inputs.py``), larger: ``--scale``
times its cases (default 10: 4,800) with another seed, through ``deeprecon-rt study
info``. The same assertions as in the suite (no exit 70, no traceback, no hang, no
leaked warning or library output, exit 0 only with finite positive geometry), without
its one-minute limit. Prints the outcome line (case count, exit codes, failures) and
writes it to ``benchmarks/results/fuzz_inputs.json``.

    python benchmarks/fuzz_inputs.py --scale 10 --seed 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from provenance import git_info

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz_inputs.json")
    args = ap.parse_args()
    env = {**os.environ, "DEEPRECON_FUZZ_SCALE": str(args.scale),
           "DEEPRECON_FUZZ_SEED": str(args.seed)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:logging",
                        str(ROOT / "tests" / "test_fuzz_inputs.py")],
                       env=env, capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("fuzz: ")), None)
    result = {"benchmark": "fuzz_inputs", "git": git_info(), "scale": args.scale,
              "seed": args.seed, "passed": p.returncode == 0, "summary": line,
              "seconds": round(time.perf_counter() - t0, 1)}
    if p.returncode != 0:
        fail = re.search(r"(\d+ of \d+ cases failed:.*)", p.stdout, re.S)
        result["failures"] = (fail.group(1) if fail else p.stdout[-4000:])[:8000]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(line or p.stdout[-2000:])
    print(f"{'passed' if p.returncode == 0 else 'FAILED'}; wrote {args.out}")
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
