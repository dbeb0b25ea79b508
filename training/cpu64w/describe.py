"""Write the reference bundle's description (`deeprecon-rt export --describe FILE`) from the
measured validation results: the licence of the training data, the data, and the 3D Dice /
HD95 on the ACDC validation split of the rows the bundle runs.

    python training/cpu64w/describe.py benchmarks/results/eval_seg_acdc_val.json -o describe.json

Nothing here is typed in by hand except the licence text and the data's identity (the
split file, and the raw-file hash of training/cpu64/README.md: same split, same files).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

STRUCTURES = ("LVC", "LVM", "RVC")
RAW_SHA256 = "228702626aaee5bf8997db5f6f6ce0546966585cfbc5be4f5efd4b8d3009900a"
BARS = {"DirectSeg": {"LVC": 0.92, "LVM": 0.84, "RVC": 0.85}, "DeepRecon_within": 0.03}


def describe(result: dict, default_row: str) -> dict:
    s = result["summary"]
    rows = {}
    for name, r in s.items():
        rows[name] = {"dice": {st: round(r[st]["dice"]["mean"], 3) for st in STRUCTURES},
                      "hd95_mm": {st: round(r[st]["hd95_mm"]["mean"], 1) for st in STRUCTURES}}
        if "seconds_per_study" in r:
            rows[name]["seconds_per_study"] = round(r["seconds_per_study"]["mean"], 2)
    direct = rows.get("DirectSeg", {}).get("dice")
    ours = rows[default_row]["dice"]
    gap = {st: round(direct[st] - ours[st], 3) for st in STRUCTURES} if direct else None
    met = bool(gap) and all(g <= BARS["DeepRecon_within"] for g in gap.values())
    n = len(result["protocol"]["patients"])
    k = default_row.removeprefix("DeepRecon_")
    steps = 0 if k == "no" else int(k)  # the export checks it against the bundle's K
    return {
        "licence": "Trained on ACDC (CC BY-NC-SA 4.0): the weights are for non-commercial "
                   "research only. Not a medical device; not for diagnosis.",
        "training_data": {"dataset": "ACDC", "split": "trainer/splits/acdc.json train",
                          "patients": 60, "phases": "ED, ES", "slices": 1172,
                          "grid": "64 x 64 at 2.5 mm", "raw_files_sha256": RAW_SHA256},
        "validation": {
            "dataset": "ACDC", "split": "trainer/splits/acdc.json val (never trained on)",
            "patients": n, "volumes": 2 * n,
            "what": f"3D Dice / HD95 on the native grid, mean over ED and ES volumes; "
                    f"'dice' is {default_row}, what reconstruct runs by default",
            "steps": steps, "dice": ours, "hd95_mm": rows[default_row]["hd95_mm"], "rows": rows,
            "gap_to_DirectSeg": gap,
            "meets_bar": met,
            "bar": "DeepRecon within 0.03 Dice of DirectSeg on each structure "
                   "(../shared/docs/EVALUATION.md)",
            "results_file": "benchmarks/results/eval_seg_acdc_val.json",
            "git": result.get("git"),
        },
        "status": ("meets the project's bars" if met else
                   "research preview: below the project's DeepRecon bar; see docs/models.md"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result", type=Path, help="benchmarks/eval_seg.py's JSON")
    ap.add_argument("--row", default="DeepRecon_20",
                    help="the row of the bundle's default K (DeepRecon_no, DeepRecon_K)")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    d = describe(json.loads(args.result.read_text()), args.row)
    args.out.write_text(json.dumps(d, indent=1) + "\n")
    print(json.dumps(d["validation"]["dice"]), d["status"])


if __name__ == "__main__":
    main()
