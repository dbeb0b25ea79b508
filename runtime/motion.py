"""Motion adaptation: the source subject's heart moving with the target subject's motion.

The paper's equation, with phases counted from ED::

    w_S(i + 1) = w_S(0) + sum_{n <= i} R_S(w_T(n + 1) - w_T(n))
               = w_S(0) + R_S(w_T(i + 1) - w_T(0))

w_S(0): the source's codes at its ED phase, [S_s, L, C]; w_T(n): the target's codes at
its phases, [S_t, L, C]; R_S resamples the target's slice axis onto the source's S_s
slices (linear interpolation along the normalised base-to-apex position, so slice 0 maps
to slice 0 and the last to the last). The adapted sequence has the target's phases, in
the target's order; at the target's ED it equals the source's ED.

Both studies are reconstructed first with the same :class:`~.pipeline.Reconstructor`
(two phases ED/ES, or full cines). The adapted codes are rendered, segmented, mapped onto
the source's native grid and interpolated into a high-resolution volume like a
reconstruction; the returned :class:`~.result.Result` describes the adapted sequence as a
study of its own (the source's geometry, the target's phases) and carries the source's
and target's results in ``extra``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import Progress
from .errors import UsageError
from .pipeline import Reconstructor, hr_geometry, model_warnings
from .result import Result
from .study import Study

log = logging.getLogger(__name__)


def resample_slices(w: np.ndarray, n: int) -> np.ndarray:
    """R_S: [S_t, ...] -> [n, ...] by linear interpolation along the slice axis, the first
    and last slices kept in place (a single slice is repeated; n == 1 takes the middle)."""
    w = np.asarray(w, dtype=np.float64)
    S = w.shape[0]
    if n < 1:
        raise UsageError(f"cannot resample onto {n} slices")
    if S == 1:
        return np.repeat(w, n, axis=0)
    pos = np.array([(S - 1) / 2.0]) if n == 1 else np.linspace(0.0, S - 1, n)
    lo = np.clip(np.floor(pos).astype(int), 0, S - 2)
    t = (pos - lo).reshape((-1,) + (1,) * (w.ndim - 1))
    return (1.0 - t) * w[lo] + t * w[lo + 1]


def adapted_codes(source_ed: np.ndarray, target: np.ndarray, target_ed: int) -> np.ndarray:
    """w_S(i) = w_S(0) + R_S(w_T(i) - w_T(ED)) for every target phase i.

    source_ed: [S_s, L, C]; target: [T, S_t, L, C]; returns [T, S_s, L, C] float32.
    """
    S_s = source_ed.shape[0]
    delta = np.asarray(target, np.float64) - np.asarray(target[target_ed], np.float64)[None]
    out = np.stack([source_ed.astype(np.float64) + resample_slices(d, S_s) for d in delta])
    return out.astype(np.float32)


def adapt_motion(reconstructor: Reconstructor, source: Study | str | Path,
                 target: Study | str | Path, *, steps: int | None = None,
                 interp: int | None = None, source_phases: str | Sequence[int] | None = None,
                 target_phases: str | Sequence[int] | None = None,
                 progress: Progress = None) -> Result:
    """Reconstruct ``source`` and ``target`` and move the source's heart with the target's
    motion. ``steps``, ``interp``: as in :meth:`Reconstructor.reconstruct` (interp
    defaults to the source's); ``source_phases``/``target_phases``: which phases each is
    reconstructed at (default: ED and ES when known, else all). The source's ED is the
    starting point; the target's ED is its motion's reference."""
    src = reconstructor.reconstruct(source, steps=steps, interp=interp, phases=source_phases,
                                    progress=progress)
    tgt = reconstructor.reconstruct(target, steps=steps, interp=src.interp,
                                    phases=target_phases, progress=progress)
    return adapt_reconstructions(reconstructor, src, tgt, progress=progress)


def adapt_reconstructions(reconstructor: Reconstructor, src: Result, tgt: Result, *,
                          progress: Progress = None) -> Result:
    """:func:`adapt_motion` from two reconstructions already made with ``reconstructor``
    (``tgt`` at any phases; the adapted volume uses ``src.interp``). An evaluation over
    many pairs reconstructs each subject once and adapts every pair from the results."""
    t0 = time.perf_counter()
    t_recon = sum(src.timings.values()) + sum(tgt.timings.values())
    if src.ed_index is None or tgt.ed_index is None:  # pragma: no cover - measures set both
        raise UsageError("ED is unknown for the source or the target")
    rec = reconstructor
    timings = {f"source_{k}": v for k, v in src.timings.items()}
    timings.update({f"target_{k}": v for k, v in tgt.timings.items()})

    t1 = time.perf_counter()
    codes = adapted_codes(src.latents[src.ed_index], tgt.latents, tgt.ed_index)
    T, S = codes.shape[:2]
    R = src.model_images.shape[-1]
    recon, probs = rec.backend.render_and_segment(codes.reshape((T * S,) + codes.shape[2:]))
    K = probs.shape[1]
    recon = recon.reshape(T, S, R, R)
    model_labels = probs.argmax(1).astype(np.uint8).reshape(T, S, R, R)
    transform = src.transform
    if np.asarray(transform.intensity_low).size != 1:  # per-phase/slice scope: one pair
        transform = dataclasses.replace(
            transform, intensity_low=((float(np.mean(transform.intensity_low)),),),
            intensity_high=((float(np.mean(transform.intensity_high)),),))
    labels = transform.labels_to_native(probs.reshape(T, S, K, R, R))
    images = transform.images_to_native(recon)
    timings["adapt"] = time.perf_counter() - t1

    t_phase = [tgt.phases[i] for i in range(T)]
    study = Study(images=images, geometry=src.study.geometry,
                  trigger_times=tgt.study.trigger_times[list(t_phase)],
                  labels=None, phase_ids=[int(tgt.study.phase_ids[p]) for p in t_phase],
                  ed_phase=tgt.ed_index, es_phase=tgt.es_index,
                  description=f"{src.study.description or src.study.source} moving like "
                              f"{tgt.study.description or tgt.study.source}",
                  source=f"motion-adapted:{src.study.source}",
                  source_format="motion-adapted")
    t2 = time.perf_counter()
    hr_images, hr_labels = rec._render_volume(codes, src.interp, progress, images=recon,
                                              labels=model_labels)
    timings["interpolate"] = time.perf_counter() - t2
    hr_geo = hr_geometry(transform.model_geometry(study.geometry), src.interp)
    t3 = time.perf_counter()
    measures = rec._measures(study, labels, hr_labels, hr_geo, src.interp)
    flags = rec._plausibility(measures, labels, hr_labels, study.phase_ids, model_labels,
                              rec.bundle.preprocess.field_of_view_mm)
    for f in flags:
        f["message"] = "adapted " + f["message"]
        log.warning("%s", f["message"])
    timings["measures"] = time.perf_counter() - t3
    log.info("motion adaptation: %d phases x %d slices in %.1f s (after reconstructions of %.1f s)",
             T, S, time.perf_counter() - t0, t_recon)
    shared = model_warnings(src.bundle or {})   # the model's own: once, not per input
    options = dict(src.options)
    options.update({"target_phases": list(tgt.phases), "source_phases": list(src.phases),
                    "source_ed": src.ed_index, "target_ed": tgt.ed_index})
    return Result(study=study, phases=tuple(range(T)), transform=transform, labels=labels,
                  model_images=recon, model_recon=recon, model_labels=model_labels,
                  latents=codes, hr_images=hr_images, hr_labels=hr_labels, hr_geometry=hr_geo,
                  interp=src.interp, measures=measures, inversion=src.inversion,
                  timings=timings, options=options, bundle=src.bundle,
                  warnings=(shared
                            + [f"source: {w}" for w in src.warnings if w not in shared]
                            + [f"target: {w}" for w in tgt.warnings if w not in shared]
                            + [f["message"] for f in flags]),
                  plausibility=flags, kind="motion_adaptation",
                  extra={"source": src, "target": tgt})


__all__ = ["adapt_motion", "adapt_reconstructions", "adapted_codes", "resample_slices"]
