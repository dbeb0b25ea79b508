"""End-to-end latency of the DICOM node (`deeprecon-rt serve`): seconds from the last
C-STORE of a study to its DICOM SEG arriving at the destination.

    python benchmarks/bench_dicom_node.py                              # cpu64 bundle, ACDC patient001
    python benchmarks/bench_dicom_node.py --bundle B --steps 0 100 --repeats 3

The study (default ACDC patient001: 10 slices x 2 phases, ED and ES) is written as a
DICOM series; dcmtk's storescu sends it to a node started here, which sends one SEG per
phase to a dcmtk storescp started here, all on 127.0.0.1. Per K (``--steps``) one node
runs (its own process, the bundle opened once); it receives one cold study (graph
warm-up included, recorded apart) and ``--repeats`` warm ones, each a new
StudyInstanceUID. For each study:

- ``last_store_to_seg_s``: from storescu's return (its last C-STORE answered, the
  association released) to the moment the last SEG file of the study reads back from
  storescp's folder (polled every 10 ms); it includes the node's quiet period
  (``--quiet-period``, the time a study must be silent to count as complete);
- ``after_quiet_s``: the same minus the quiet period;
- the node's own split (reconstruction, SEG writing, sending) from its log line.

Early stopping is off (``--patience 0``), so every image takes exactly K steps and the
figures do not depend on the weights: without ``--bundle`` the cpu64 bundle of untrained
networks at /work/runs/cpu64-random is used (made by
``deeprecon.export.bundle.random_bundle(dir, preset="cpu64")`` when absent), whose speed
is that of a trained cpu64 bundle. Writes ``benchmarks/results/dicom_node_<preset>_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import cpu_model, git_info

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = REPO.parent / "shared" / "data" / "acdc" / "training" / "patient001"
DEFAULT_BUNDLE = Path("/work/runs/cpu64-random")
EXE = shutil.which("deeprecon-rt") or str(Path(sys.executable).parent / "deeprecon-rt")
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def _segs_of(folder: Path, study_uid: str) -> int:
    import pydicom

    n = 0
    for f in folder.iterdir():
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - still being written
            continue
        n += ds.Modality == "SEG" and ds.StudyInstanceUID == study_uid
    return n


def run_k(bundle: Path, study, steps: int, repeats: int, quiet: float, backend: str,
          work: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from dicom_series import write_dicom_series
    from pydicom.uid import generate_uid

    recv = work / f"recv-{steps}"
    recv.mkdir()
    rport = _free_port()
    storescp = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(recv), str(rport)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = work / f"node-{steps}.log"
    log = open(log_path, "w")
    node = subprocess.Popen([EXE, "serve", "--ae-title", "NODE", "--port", "0", "--host", HOST,
                             "--storage", str(work / f"storage-{steps}"), "--allow", "SCANNER",
                             "--send-to", f"DEST@{HOST}:{rport}", "--quiet-period", str(quiet),
                             "--bundle", str(bundle), "--backend", backend, "--steps", str(steps),
                             "--patience", "0"], stdout=log, stderr=subprocess.STDOUT)
    runs = []
    try:
        m = _wait(lambda: re.search(rf"listening on {HOST}:(\d+)", log_path.read_text()),
                  300, "the node to listen")
        port = int(m.group(1))
        for k in range(repeats + 1):
            uid = generate_uid()
            src = work / f"study-{steps}-{k}"
            write_dicom_series(study, src, study_uid=uid, description="cine_sax bench")
            n_seg = study.n_phases
            p = subprocess.run(["storescu", "-aet", "SCANNER", "-aec", "NODE", "+sd", "+r", HOST,
                                str(port), str(src)], capture_output=True, text=True, timeout=600)
            t_last = time.monotonic()
            if p.returncode != 0:
                raise SystemExit(f"storescu failed: {p.stderr}")
            _wait(lambda: _segs_of(recv, uid) >= n_seg, 1800, "the SEG")
            dt = time.monotonic() - t_last
            line = _wait(lambda: re.search(rf"study {re.escape(uid)} .*SEG sent.*\(reconstruction "
                                           r"([\d.]+) s, SEG ([\d.]+) s, send ([\d.]+) s\)",
                                           log_path.read_text()), 30, "the node's log line")
            runs.append({"cold": k == 0, "last_store_to_seg_s": round(dt, 3),
                         "after_quiet_s": round(dt - quiet, 3),
                         "node_reconstruction_s": float(line.group(1)),
                         "node_seg_s": float(line.group(2)), "node_send_s": float(line.group(3)),
                         "segs": n_seg})
            print(f"K={steps} {'cold' if k == 0 else 'warm'}: {dt:.2f} s from the last C-STORE "
                  f"to the SEG ({dt - quiet:.2f} s after the {quiet:g} s quiet period)", flush=True)
    finally:
        node.terminate()
        node.wait(60)
        log.close()
        storescp.terminate()
        storescp.wait(10)
    warm = [r["last_store_to_seg_s"] for r in runs if not r["cold"]]
    return {"steps": steps, "runs": runs, "warm_median_s": statistics.median(warm),
            "warm_median_after_quiet_s": round(statistics.median(warm) - quiet, 3),
            "node_exit_code": node.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 100])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quiet-period", type=float, default=2.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from deeprecon.runtime.bundle import load_bundle
    from deeprecon.runtime.io import load_study

    bundle = args.bundle
    if bundle is None:
        bundle = DEFAULT_BUNDLE
        if not (bundle / "manifest.json").is_file():
            from deeprecon.export.bundle import random_bundle
            random_bundle(bundle, preset="cpu64")
    b = load_bundle(bundle)
    study = load_study(args.study)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        results = [run_k(bundle, study, k, args.repeats, args.quiet_period, args.backend, Path(tmp))
                   for k in args.steps]
    import numpy
    import onnxruntime
    import pydicom
    import pynetdicom

    out = {
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_info(),
        "what": "seconds from storescu's return (last C-STORE answered) to the last SEG of the "
                "study read back from storescp's folder; includes the quiet period",
        "device": {"type": "cpu", "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                   "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": {"python": platform.python_version(), "numpy": numpy.__version__,
                     "onnxruntime": onnxruntime.__version__, "pydicom": pydicom.__version__,
                     "pynetdicom": pynetdicom.__version__,
                     "dcmtk": subprocess.run(["storescu", "--version"], capture_output=True,
                                             text=True).stdout.splitlines()[0]},
        "bundle": {"path": str(bundle), "name": b.name, "preset": b.preset, "sha256": b.sha256,
                   "weights": "untrained (random_bundle): speed of a trained bundle of this preset"
                   if "random" in b.name else "trained"},
        "study": {"path": str(args.study), "phases": study.n_phases, "slices": study.n_slices,
                  "matrix": list(study.images.shape[2:])},
        "backend": args.backend, "quiet_period_s": args.quiet_period, "early_stop_patience": 0,
        "results": results,
    }
    path = args.out or REPO / "benchmarks" / "results" / f"dicom_node_{b.preset}_cpu.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
