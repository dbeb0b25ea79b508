"""``run_report.json``: what ran and how, for the record: versions, platform, bundle (name,
SHA-256, preset, provenance), backend, device, options, per-stage timings, inversion
summary, warnings, plausibility flags of the measures, the study, the phases, the
high-resolution grid and the native <-> model transform."""
from __future__ import annotations

import contextlib
import platform
import sys
from typing import Any, Mapping

import numpy as np

from ..result import MOTION_KIND, Result, all_warnings, frame_ids
from .folder import utc_now

RUN_REPORT_SCHEMA = 1
RUN_REPORT_NAME = "run_report.json"


def _versions() -> dict[str, str | None]:
    """Versions of the software involved; frameworks only when this process imported
    them (the report says what ran, and never imports torch just to ask)."""
    from .. import __version__

    out: dict[str, str | None] = {"deeprecon": __version__, "python": platform.python_version(),
                                  "numpy": np.__version__}
    for name in ("scipy", "SimpleITK", "matplotlib", "torch", "onnxruntime", "tensorrt",
                 "onnx"):
        mod = sys.modules.get(name)
        if mod is not None:
            v = getattr(mod, "__version__", None)
            if v is None and name == "SimpleITK":
                with contextlib.suppress(Exception):
                    v = mod.Version_VersionString()
            out[name] = None if v is None else str(v)
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            out["cuda (torch)"] = torch.version.cuda
    return out


def _platform() -> dict[str, str]:
    return {"system": platform.system(), "release": platform.release(),
            "machine": platform.machine(), "platform": platform.platform(),
            "python_implementation": platform.python_implementation()}


def inversion_summary(result: Result) -> dict[str, Any]:
    """Means (and ranges) of the per-image inversion report: images, steps, PSNR of
    G(E(x)) and G(w*) against x in dB, loss, how many stopped early and how many used the
    fallback ROI; the inversion settings when the report has them."""
    inv = result.inversion or {}

    def arr(key: str) -> np.ndarray | None:
        v = inv.get(key)
        if v is None or len(v) == 0:
            return None
        return np.asarray(v, dtype=np.float64)

    out: dict[str, Any] = {}
    steps = arr("steps")
    n = next((len(inv[k]) for k in ("steps", "psnr", "loss") if inv.get(k) is not None), 0)
    out["images"] = int(n)
    if steps is not None:
        out.update(steps_mean=float(steps.mean()), steps_min=int(steps.min()),
                   steps_max=int(steps.max()))
    for key in ("psnr_init", "psnr", "loss_init", "loss"):
        a = arr(key)
        if a is not None and np.isfinite(a).any():
            out[f"{key}_mean"] = float(np.nanmean(a))
            out[f"{key}_min"] = float(np.nanmin(a))
    for key in ("stopped_early", "roi_fallback"):
        flags = inv.get(key)
        if flags is not None:
            out[key] = int(np.sum(np.asarray(flags, dtype=bool)))
    if isinstance(inv.get("settings"), Mapping):
        out["settings"] = dict(inv["settings"])
    return out


def study_summary(result: Result) -> dict[str, Any]:
    """The study's identity and grid (Study.describe without the source-specific info)."""
    d = result.study.describe()
    d.pop("info", None)
    d.pop("warnings", None)
    d["frame_ids"] = frame_ids(result)
    d["reconstructed_phases"] = list(result.phases)
    return d


def run_report(result: Result, *, created: str | None = None,
               outputs_s: float | None = None) -> dict[str, Any]:
    """The dict written as run_report.json (JSON-serialisable after
    :func:`~deeprecon.runtime.jsonsafe.json_safe`)."""
    g = result.hr_geometry
    report: dict[str, Any] = {
        "schema": RUN_REPORT_SCHEMA,
        "kind": result.kind,
        "created": created or utc_now(),
        "versions": _versions(),
        "platform": _platform(),
        "bundle": dict(result.bundle),
        "backend": result.options.get("backend"),
        "device": result.options.get("device"),
        "options": dict(result.options),
        "timings_s": dict(result.timings),
        "total_s": float(sum(float(v) for v in result.timings.values())),
        "outputs_s": outputs_s,
        "inversion": inversion_summary(result),
        "warnings": all_warnings(result),
        "plausibility": list(result.plausibility),
        "study": study_summary(result),
        "phases": {"indices": list(result.phases), "frame_ids": frame_ids(result),
                   "ed_index": result.ed_index, "es_index": result.es_index},
        "interp": int(result.interp),
        "hr_volume": {"slices": g.n_slices, "matrix": list(np.asarray(result.hr_images).shape[-2:]),
                      "pixel_spacing_mm": list(g.pixel_spacing),
                      "slice_spacing_mm": g.slice_spacing if g.n_slices > 1 else None},
        "transform": result.transform.to_dict(),
    }
    if result.kind == MOTION_KIND:
        report["motion"] = {
            name: {"study": study_summary(other), "bundle": dict(other.bundle),
                   "phases": list(other.phases), "frame_ids": frame_ids(other),
                   "plausibility": list(other.plausibility)}
            for name in ("source", "target")
            if isinstance(other := result.extra.get(name), Result)}
    return report


__all__ = ["run_report", "inversion_summary", "study_summary", "RUN_REPORT_SCHEMA",
           "RUN_REPORT_NAME"]
