"""The preprocessing's acceptance checks on every shared ACDC patient (about 5 minutes
on 2 cores): model-free heart localisation and the label round trip through the model
grid. The test suite runs the same functions on 3 patients (tests/test_localize.py,
tests/test_preprocess.py); this script runs them on all 80 and asserts the same bars.

    python benchmarks/acdc_preprocessing.py          # -> benchmarks/results/acdc_preprocessing.json
    python benchmarks/acdc_preprocessing.py --preset cpu64w   # a preset's own model grid

``--preset NAME``: that preset's preprocessing (grid, spacing, crop) instead of the default
128 x 1.5 mm; -> ``acdc_preprocessing_NAME.json``. The Dice bars below are the default
grid's; a coarser grid (cpu64's 64 x 2.5 mm) is reported against them without failing
on them, and keeps the bar that no crop cuts a labelled pixel.

- localisation: distance from the located heart centre to the centroid of the labelled
  heart (LVC + LVM + RVC, all slices, both phases); the default 192 mm crop around it
  must contain every labelled pixel. Bars: median < 15 mm, max < 40 mm, no crop cuts.
- label round trip: labels cropped around the located heart, resampled to the
  128 x 1.5 mm model grid and mapped back, against the originals, per patient and phase;
  the minimum and the mean Dice per measure. Bars: mean of LVC/LVM/RVC Dice and foreground Dice >= 0.98, each structure >= 0.96
  (the thin myocardium of patients with 1.2-1.4 mm native pixels loses the most).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ACDC = REPO.parent / "shared" / "data" / "acdc" / "training"

LOCALISATION_BARS = {"median_mm": 15.0, "max_mm": 40.0}
ROUND_TRIP_BARS = {"mean": 0.98, "foreground": 0.98, "LVC": 0.96, "LVM": 0.96, "RVC": 0.96}


def acdc_patients(root: Path = ACDC) -> list[Path]:
    """The shared ACDC patient folders, sorted by name ([] when the data is absent)."""
    return sorted(p for p in root.glob("patient*") if p.is_dir()) if root.is_dir() else []


def localisation(folders: Sequence[Path], config=None) -> dict:
    """The localisation summary over ``folders`` (see the module docstring), with the
    list of bars it fails under "failed". ``config``: the PreprocessConfig whose crop
    must hold the labels (default: PreprocessConfig())."""
    from deeprecon.runtime.io import load_acdc
    from deeprecon.runtime.localize import locate_heart
    from deeprecon.runtime.preprocess import PreprocessConfig, prepare

    t0 = time.perf_counter()
    dist, cut, methods = [], [], set()
    for folder in folders:
        study = load_acdc(folder)
        loc = locate_heart(study)
        methods.add(loc.method)
        dr, dc = study.geometry.pixel_spacing
        gt = np.argwhere(study.labels > 0)[:, 2:].mean(axis=0)
        dist.append(float(np.hypot((loc.centre_rc[0] - gt[0]) * dr, (loc.centre_rc[1] - gt[1]) * dc)))
        _, t = prepare(study, config or PreprocessConfig())
        if t.label_coverage < 1.0:
            cut.append((folder.name, t.label_coverage))
    d = np.asarray(dist)
    s = {"patients": len(folders), "methods": sorted(methods),
         "median_mm": round(float(np.median(d)), 1), "p90_mm": round(float(np.percentile(d, 90)), 1),
         "max_mm": round(float(d.max()), 1), "max_patient": folders[int(d.argmax())].name,
         "crops_cutting_labels": cut, "seconds": round(time.perf_counter() - t0, 1)}
    s["failed"] = [k for k, bar in LOCALISATION_BARS.items() if not s[k] < bar] \
        + (["crops_cutting_labels"] if cut else []) \
        + (["method"] if methods != {"temporal-variance"} else [])
    return s


def label_round_trip(folders: Sequence[Path], config=None, *, dice_bars: bool = True) -> dict:
    """The round-trip summary over ``folders`` (see the module docstring): per measure
    the minimum Dice and where and the mean Dice, with the failed bars under "failed"
    (``dice_bars`` False: only the crop and phase checks fail it). ``config``: the
    model grid (default: PreprocessConfig())."""
    from deeprecon.runtime.io import load_acdc
    from deeprecon.runtime.metrics import dice
    from deeprecon.runtime.preprocess import PreprocessConfig, prepare

    t0 = time.perf_counter()
    rows, uncovered = [], []
    for folder in folders:
        study = load_acdc(folder)
        _, t = prepare(study, config or PreprocessConfig())
        back = t.labels_to_native(t.labels_to_model(study.labels))
        if t.label_coverage != 1.0:
            uncovered.append(folder.name)
        for p in range(study.n_phases):
            ref, got = study.labels[p], back[p]
            per = [dice(ref == k, got == k) for k in (1, 2, 3)]
            rows.append((folder.name, study.phase_name(p), float(np.mean(per)),
                         dice(ref > 0, got > 0), *per))
    names = ["mean", "foreground", "LVC", "LVM", "RVC"]
    mins, means = {}, {}
    for k, name in enumerate(names):
        i = int(np.argmin([r[2 + k] for r in rows]))
        mins[name] = (round(rows[i][2 + k], 4), f"{rows[i][0]} {rows[i][1]}")
        means[name] = round(float(np.mean([r[2 + k] for r in rows])), 4)
    s = {"patients": len(folders), "patient_phases": len(rows), "min_dice": mins,
         "mean_dice": means, "crops_cutting_labels": uncovered,
         "seconds": round(time.perf_counter() - t0, 1)}
    bars = ROUND_TRIP_BARS if dice_bars else {}
    s["failed"] = [k for k, bar in bars.items() if not mins[k][0] >= bar] \
        + (["crops_cutting_labels"] if uncovered else []) \
        + (["phases"] if len(rows) != 2 * len(folders) else [])
    return s


def main(argv: Sequence[str] | None = None) -> int:
    from provenance import cpu_model, git_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", help="check this preset's model grid (default: 128 x 1.5 mm)")
    args = ap.parse_args(argv)
    config, grid = None, "PreprocessConfig() (128 x 1.5 mm)"
    if args.preset:
        from deeprecon.runtime.errors import UsageError
        from deeprecon.trainer.config import get_preset
        try:
            config = get_preset(args.preset).preprocess
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 64
        grid = f"{args.preset}: {config.size} x {config.spacing_mm} mm"
    folders = acdc_patients()
    if not folders:
        print(f"no ACDC patients under {ACDC}", file=sys.stderr)
        return 66
    result = {"benchmark": "acdc_preprocessing", "cpu": cpu_model(), **git_info(),
              "grid": grid, "localisation": localisation(folders, config),
              "label_round_trip": label_round_trip(folders, config, dice_bars=config is None)}
    name = f"acdc_preprocessing_{args.preset}.json" if args.preset else "acdc_preprocessing.json"
    out = REPO / "benchmarks" / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    failed = result["localisation"]["failed"] + result["label_round_trip"]["failed"]
    print(f"-> {out}; {'FAILED: ' + ', '.join(failed) if failed else 'all bars met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
