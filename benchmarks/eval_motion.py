"""E3: motion transfer over many pairs (issue 14 s.2).

A target's ED -> ES motion is moved onto a source's ED shape
(deeprecon.runtime.motion: w_S(i) = w_S(ED) + R_S(w_T(i) - w_T(ED))). The adapted
sequence should keep the source's ED volume and follow the target's ejection fraction.
Per pair (LV, on the source's native grid, the adapted labels' clinical measures):

- |EF_adapted - EF_target| against the target's manual labels and against the target's
  own reconstruction (the model's view of the target: the transfer alone);
- |EDV_adapted - EDV_source| against the source's manual labels and its reconstruction
  (the latter is 0 by construction: at the target's ED the adapted codes are the
  source's ED codes; a non-zero value is a bug);
- the no-transfer reference |EF_source - EF_target| (the source's own reconstructed
  motion): what the adaptation has to beat;
- failures, with the reason: adapted ESV not below EDV, an empty LV, a non-finite EF,
  the adapted measures' plausibility flags.

Pairs: ACDC validation patients (trainer/splits/acdc.json), taken round-robin over the
five groups so that a few patients span several groups, every ordered pair of different
groups (NOR targets onto DCM sources and so on; all pairs when one group only), up to
``--max-pairs``; each patient is reconstructed once (ED, ES). ``--phantom-pairs N``
adds phantom pairs (different anatomy seeds) whose targets are full cines, with exact
volumes: the volume-curve picture then shows whole cycles.

    python benchmarks/eval_motion.py --bundle out/bundle --steps 100 --max-patients 10
    python benchmarks/eval_motion.py --bundle out/bundle --max-patients 0 --phantom-pairs 3

Writes JSON (benchmarks/results/eval_motion.json by default), prints the markdown tables
(--md writes them), --figure a PNG of the LV volume curves.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deeprecon.runtime.evaluation import mean_sd
from deeprecon.runtime.jsonsafe import json_safe
from deeprecon.runtime.measures import PLAUSIBLE_RANGES, study_measures
from deeprecon.runtime.motion import adapt_reconstructions
from deeprecon.runtime.phantom import make_phantom
from deeprecon.runtime.pipeline import Reconstructor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_common import (elapsed as _elapsed, mean_sd_text as _ms, phantom_options,  # noqa: E402
                         provenance_line, timer as _timer)
from provenance import cpu_model, git_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")
ERRORS = ("ef_vs_target_manual", "ef_vs_target_recon", "edv_vs_source_manual",
          "edv_vs_source_recon", "no_transfer_ef_vs_target_manual")






def _lv(m: dict[str, Any]) -> dict[str, Any]:
    return {"EDV": m["LVEDV (mL)"], "ESV": m["LVESV (mL)"], "EF": m["LVEF (%)"],
            "RVEF": m["RVEF (%)"], "curve": list(m["volume_curves_ml"]["LVC"])}


class Subject:
    """One study reconstructed once: its Result, manual measures, name and group."""

    def __init__(self, rec: Reconstructor, study, *, name: str, group: str | None,
                 steps: int | None, interp: int | None, exact: dict | None = None):
        t = _timer()
        self.name, self.group, self.study = name, group, study
        self.result = rec.reconstruct(study, steps=steps, interp=interp, phases="all")
        self.manual = _lv(study_measures(study))
        self.recon = _lv(self.result.measures["native"])
        self.exact = exact
        self.timing = _elapsed(t)


def pair_metrics(rec: Reconstructor, src: Subject, tgt: Subject) -> dict[str, Any]:
    """Adapt ``tgt``'s motion onto ``src`` and measure it (module docstring)."""
    t = _timer()
    ad = adapt_reconstructions(rec, src.result, tgt.result)
    a = _lv(ad.measures["native"])
    hr = _lv(ad.measures["hr"])
    err = {"ef_vs_target_manual": abs(a["EF"] - tgt.manual["EF"]),
           "ef_vs_target_recon": abs(a["EF"] - tgt.recon["EF"]),
           "edv_vs_source_manual": abs(a["EDV"] - src.manual["EDV"]),
           "edv_vs_source_recon": abs(a["EDV"] - src.recon["EDV"]),
           "no_transfer_ef_vs_target_manual": abs(src.recon["EF"] - tgt.manual["EF"])}
    fails: dict[str, str] = {}   # code -> message
    if not a["EDV"] > 0:
        fails["empty_lv"] = "the adapted LV is empty at ED"
    elif not a["ESV"] < a["EDV"]:
        fails["esv_not_below_edv"] = (f"adapted ESV {a['ESV']:.1f} mL not below EDV "
                                      f"{a['EDV']:.1f} mL")
    if not math.isfinite(a["EF"]):
        fails["ef_not_finite"] = "the adapted EF is not finite"
    low = PLAUSIBLE_RANGES["LVEF (%)"][0]
    if not tgt.recon["EF"] >= low:
        fails["target_no_contraction"] = (f"the target's own reconstruction has an LVEF of "
                                          f"{tgt.recon['EF']:.1f} % (< {low:g} %): no LV motion "
                                          "to transfer")
    codes = sorted({f["code"] for f in ad.plausibility})
    out = {"source": src.name, "target": tgt.name, "source_group": src.group,
           "target_group": tgt.group, "adapted": a, "adapted_hr": hr,
           "source_manual": src.manual, "source_recon": src.recon,
           "target_manual": tgt.manual, "target_recon": tgt.recon,
           "errors": err, "failures": list(fails.values()), "failure_codes": list(fails),
           "plausibility_codes": codes,
           "target_phase_fractions": _fractions(tgt.study),
           **_elapsed(t)}
    if src.exact is not None and tgt.exact is not None:
        out["exact"] = {"source_EDV": src.exact["LVEDV (mL)"], "target_EF": tgt.exact["LVEF (%)"],
                        "ef_vs_target_exact": abs(a["EF"] - tgt.exact["LVEF (%)"]),
                        "edv_vs_source_exact": abs(a["EDV"] - src.exact["LVEDV (mL)"])}
    return out


def _fractions(study) -> list[float]:
    """Each phase's time as a fraction of the cycle: from the trigger times, else (ACDC)
    from the frame numbers and the number of frames of the cine, else phase / P."""
    t = np.asarray(study.trigger_times, dtype=np.float64)
    if t.size > 1 and np.all(np.isfinite(t)) and np.all(np.diff(t) > 0):
        return ((t - t[0]) / (t[-1] + (t[1] - t[0]) - t[0])).round(4).tolist()
    n = study.info.get("nb_frames")
    ids = np.asarray(study.phase_ids, dtype=np.float64)
    if n and ids.size and np.all(np.diff(ids) > 0):
        return ((ids - ids[0]) / float(n)).round(4).tolist()
    return (np.arange(t.size) / max(t.size, 1)).tolist()




def acdc_subjects(rec: Reconstructor, data: Path, patients: Sequence[str], *,
                  steps: int | None, interp: int | None) -> list[Subject]:
    from deeprecon.runtime.io import load_study
    from deeprecon.runtime.io.acdc import parse_info_cfg

    out = []
    for pid in patients:
        group = parse_info_cfg(data / pid / "Info.cfg").get("Group")
        out.append(Subject(rec, load_study(data / pid), name=pid, group=group, steps=steps,
                           interp=interp))
        print("reconstructed", pid, group, out[-1].timing, flush=True)
    return out


def round_robin(patients: Sequence[str], groups: dict[str, str]) -> list[str]:
    """Patients ordered group by group in turn (DCM, HCM, MINF, NOR, RV, DCM, ...)."""
    by = {g: [p for p in patients if groups.get(p) == g] for g in sorted(set(groups.values()))}
    out = []
    for i in range(max((len(v) for v in by.values()), default=0)):
        out += [v[i] for v in by.values() if i < len(v)]
    return out + [p for p in patients if p not in out]


def pairs_of(subjects: Sequence[Subject], max_pairs: int | None) -> list[tuple[Subject, Subject]]:
    """Ordered (source, target) pairs of different groups (all pairs when one group)."""
    pairs = [(s, t) for s, t in itertools.permutations(subjects, 2)]
    mixed = [(s, t) for s, t in pairs if s.group != t.group]
    return (mixed or pairs)[:max_pairs]


def summarise(pairs: Sequence[dict]) -> dict[str, Any]:
    out = {k: mean_sd([p["errors"][k] for p in pairs]) for k in ERRORS}
    exact = [p["exact"] for p in pairs if "exact" in p]
    if exact:
        out["ef_vs_target_exact"] = mean_sd([e["ef_vs_target_exact"] for e in exact])
        out["edv_vs_source_exact"] = mean_sd([e["edv_vs_source_exact"] for e in exact])
    out["pairs"] = len(pairs)
    out["failed_pairs"] = sum(bool(p["failures"]) for p in pairs)
    reasons: dict[str, int] = {}
    for p in pairs:
        for code in p["failure_codes"]:
            reasons[code] = reasons.get(code, 0) + 1
    out["failure_reasons"] = reasons
    return out




def markdown(result: dict[str, Any]) -> str:
    lines = [provenance_line(result, data=result["data"]), ""]
    for name, s in result["summary"].items():
        if not s["pairs"]:
            continue
        lines += [f"**{name}**: {s['pairs']} pair{'s' if s['pairs'] != 1 else ''}, mean (sd); "
                  f"{s['failed_pairs']} with a "
                  "failure" + (": " + ", ".join(f"{k} ({v})" for k, v in s["failure_reasons"].items())
                               if s["failure_reasons"] else "") + ".", "",
                  "EF error = |EF_adapted - EF_target| (%-points), EDV error = "
                  "|EDV_adapted - EDV_source| (mL); no transfer = |EF_source - "
                  "EF_target| (the source's own reconstructed motion).", "",
                  "| EF error vs target manual | vs target recon. | EDV error vs source manual "
                  "| vs source recon. | no transfer (vs target manual) |"
                  + (" EF error vs exact | EDV error vs exact |" if "ef_vs_target_exact" in s else ""),
                  "|---|---|---|---|---|" + ("---|---|" if "ef_vs_target_exact" in s else "")]
        cells = [_ms(s["ef_vs_target_manual"]), _ms(s["ef_vs_target_recon"]),
                 _ms(s["edv_vs_source_manual"]), _ms(s["edv_vs_source_recon"]),
                 _ms(s["no_transfer_ef_vs_target_manual"])]
        if "ef_vs_target_exact" in s:
            cells += [_ms(s["ef_vs_target_exact"]), _ms(s["edv_vs_source_exact"])]
        lines += ["| " + " | ".join(cells) + " |", ""]
    pairs = [p for ps in result["pairs"].values() for p in ps]
    if pairs:
        lines += ["| source -> target | EF target manual / recon. | EF adapted | EDV source "
                  "manual / recon. | EDV adapted | failure |", "|---|---|---|---|---|---|"]
        for p in pairs[:24]:
            lines.append(
                f"| {p['source']} ({p['source_group']}) -> {p['target']} ({p['target_group']}) "
                f"| {p['target_manual']['EF']:.1f} / {p['target_recon']['EF']:.1f} "
                f"| {p['adapted']['EF']:.1f} | {p['source_manual']['EDV']:.1f} / "
                f"{p['source_recon']['EDV']:.1f} | {p['adapted']['EDV']:.1f} | "
                + ("; ".join(p["failures"]) or "-") + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def figure(result: dict[str, Any], path: Path, *, n: int = 8) -> None:
    """LV volume over the target's phases: the target (manual, reconstruction), the
    adapted sequence, and the source's ED volume (manual, reconstruction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for ps in result["pairs"].values() for p in ps][:n]
    cols = min(4, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    for ax, p in zip(axes.ravel(), pairs):
        x = p["target_phase_fractions"]
        ax.plot(x, p["target_manual"]["curve"], "k--", marker=".", label="target manual")
        ax.plot(x, p["target_recon"]["curve"], color="0.55", marker=".", label="target recon.")
        ax.plot(x, p["adapted"]["curve"], "r-", marker="o", ms=3, label="adapted")
        ax.plot([x[0]], [p["source_manual"]["EDV"]], "bs", ms=5, label="source ED manual")
        ax.plot([x[0]], [p["source_recon"]["EDV"]], "b^", ms=5, mfc="none", label="source ED recon.")
        ax.set_title(f"{p['source'][-10:]} <- {p['target'][-10:]}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("fraction of the target's cycle", fontsize=6)
        ax.set_ylabel("LV volume (mL)", fontsize=6)
    for ax in axes.ravel()[len(pairs):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=5, loc="best")
    b = result["bundle"]
    fig.suptitle(f"motion transfer, {b['name']} (K = {result['config']['steps']})"
                 + ("" if result["bundle_trained"] else ": untrained bundle, harness check"),
                 fontsize=8)
    fig.tight_layout(pad=0.4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t = _timer()
    rec = Reconstructor(args.bundle, backend=args.backend, device="cpu")
    pairs: dict[str, list[dict]] = {}
    data = []
    if args.max_patients != 0:
        from deeprecon.runtime.io.acdc import parse_info_cfg
        from deeprecon.trainer.split import load_split

        root = args.data / "training" if (args.data / "training").is_dir() else args.data
        val = load_split()[args.split]
        groups = {p: parse_info_cfg(root / p / "Info.cfg").get("Group") for p in val}
        patients = round_robin(val, groups)[:args.max_patients]
        subjects = acdc_subjects(rec, root, patients, steps=args.steps, interp=args.interp)
        chosen = pairs_of(subjects, args.max_pairs)
        pairs["ACDC"] = [pair_metrics(rec, s, tt) for s, tt in chosen]
        data.append(f"ACDC {args.split} split, {len(patients)} patients ("
                    + ", ".join(f"{p[-3:]} {groups[p]}" for p in patients) + "), ED and ES")
    if args.phantom_pairs > 0:
        out = []
        opts = {"anatomy_jitter": args.phantom_jitter, **phantom_options(args.phantom_option)}
        for i in range(args.phantom_pairs):
            s_ph = make_phantom(seed=100 + 2 * i, phases=2, **opts)
            t_ph = make_phantom(seed=101 + 2 * i, phases=args.phantom_phases, **opts)
            src = Subject(rec, s_ph.study, name=f"phantom{100 + 2 * i}", group="phantom",
                          steps=args.steps, interp=args.interp, exact=s_ph.exact_measures())
            tgt = Subject(rec, t_ph.study, name=f"phantom{101 + 2 * i}", group="phantom",
                          steps=args.steps, interp=args.interp, exact=t_ph.exact_measures())
            out.append(pair_metrics(rec, src, tgt))
        pairs["phantom"] = out
        data.append(f"phantom pairs: {args.phantom_pairs} ({opts}, targets of "
                    f"{args.phantom_phases} phases)")
    for name, ps in pairs.items():
        for p in ps:
            print(name, p["source"], "->", p["target"], "EF adapted", round(p["adapted"]["EF"], 1),
                  "target", round(p["target_manual"]["EF"], 1), p["failures"] or "", flush=True)
    result = {
        "bundle": rec.bundle_info(),
        "bundle_trained": bool((rec.bundle.manifest.get("provenance") or {}).get("runs")),
        "config": {"steps": rec.settings(steps=args.steps).steps, "backend": rec.backend.name,
                   "interp": args.interp, "split": args.split, "max_patients": args.max_patients,
                   "max_pairs": args.max_pairs, "phantom_pairs": args.phantom_pairs},
        "data": "; ".join(data), "summary": {k: summarise(v) for k, v in pairs.items()},
        "pairs": pairs,
        "device": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "git": git_info(), "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rec.close()
    result.update(_elapsed(t))
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "acdc")
    ap.add_argument("--split", default="val", help="split of trainer/splits/acdc.json")
    ap.add_argument("--max-patients", type=int, help="ACDC patients (0: none)")
    ap.add_argument("--max-pairs", type=int, help="at most this many ACDC pairs")
    ap.add_argument("--steps", type=int, help="inversion steps K (default: the bundle's)")
    ap.add_argument("--interp", type=int, help="HR factor (default: the pipeline's)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--phantom-pairs", type=int, default=0)
    ap.add_argument("--phantom-phases", type=int, default=12)
    ap.add_argument("--phantom-jitter", type=float, default=0.15, help="phantom anatomy_jitter")
    ap.add_argument("--phantom-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a make_phantom parameter (JSON value), e.g. slices=6")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_motion.json")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--figure", type=Path, help="PNG of the LV volume curves")
    return ap


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    table = markdown(result)
    print(table)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
    if args.figure:
        figure(result, args.figure)
    return result


if __name__ == "__main__":
    main()
