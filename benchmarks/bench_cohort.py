"""Studies per hour of ``deeprecon-rt cohort``: the local engine against the Ray engine,
in the same run, on the same folder of studies.

    python benchmarks/bench_cohort.py                         # 6 phantoms, cpu64 random bundle, K = 20
    python benchmarks/bench_cohort.py --studies 12 --steps 0 --ray-actors 1 2

The studies are synthetic phantoms (10 slices x 2 phases, ED/ES, NIfTI), one of them a
corrupt file (the run must record it and go on, as a real cohort would). Without
``--bundle`` a bundle of untrained ``--preset`` networks is made first: its speed is that
of a trained bundle of the same preset. Each engine runs as its own ``deeprecon-rt
cohort`` process into a fresh output folder (so nothing is skipped), one after the
other; the wall time includes opening the bundle (and starting Ray) once per run, as a
user's run does. Studies per hour count the studies that were written.

Writes ``benchmarks/results/cohort_<preset>_cpu.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import cpu_model, git_info

REPO = Path(__file__).resolve().parents[1]


def _make_studies(root: Path, n: int) -> None:
    import SimpleITK as sitk

    from deeprecon.runtime.phantom import make_phantom

    root.mkdir(parents=True)
    for k in range(n - 1):
        st = make_phantom(slices=10, phases=2, seed=k).study
        sitk.WriteImage(st.to_sitk(st.images), str(root / f"sub{k:03d}.nii.gz"))
    (root / f"sub{n - 1:03d}.nii.gz").write_bytes(b"\x1f\x8b corrupt")


def _run(args, studies: Path, out: Path, engine: str, actors: int) -> dict:
    exe = str(Path(sys.executable).parent / "deeprecon-rt")
    cmd = [exe, "-q", "cohort", str(studies), "-o", str(out), "--bundle", str(args.bundle),
           "--steps", str(args.steps), "--backend", args.backend, "--engine", engine,
           "--ray-actors", str(actors)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t0
    with open(out / "cohort_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    done = sum(r["status"] == "done" for r in rows)
    return {"engine": engine, "actors": actors, "exit_code": p.returncode, "wall_s": round(wall, 2),
            "done": done, "failed": sum(r["status"] == "failed" for r in rows),
            "studies_per_hour": round(3600 * done / wall, 1),
            "status": {r["study"]: f"{r['status']} {r['exit_code']}".strip() for r in rows}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--preset", default="cpu64")
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--ray-actors", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    if args.bundle is None:
        from deeprecon.export.bundle import random_bundle
        args.bundle = random_bundle(root / "bundle", preset=args.preset,
                                    command="benchmarks/bench_cohort.py")
    _make_studies(root / "studies", args.studies)
    runs = [_run(args, root / "studies", root / "out-local", "local", 1)]
    for n in args.ray_actors:
        runs.append(_run(args, root / "studies", root / f"out-ray{n}", "ray", n))
    result = {"benchmark": "cohort", "preset": args.preset, "studies": args.studies,
              "steps": args.steps, "backend": args.backend, "cpu": cpu_model(),
              "cores": os.cpu_count(), **git_info(), "runs": runs}
    out = REPO / "benchmarks" / "results" / f"cohort_{args.preset}_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(f"{r['engine']:5} actors {r['actors']}: {r['done']} done, {r['failed']} failed, "
              f"{r['wall_s']} s, {r['studies_per_hour']} studies/h (exit {r['exit_code']})")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
