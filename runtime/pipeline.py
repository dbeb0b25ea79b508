"""The reconstruction pipeline and its embedding API, :class:`Reconstructor`.

    from deeprecon.runtime import Reconstructor
    with Reconstructor("path/to/bundle", backend="auto", device="cpu") as rec:
        result = rec.reconstruct("study/", steps=100, interp=8, phases="ed,es")

Stages (each timed into ``Result.timings``)::

    load -> preprocess -> encode -> roi -> invert -> segment -> map_back
         -> interpolate (render + segment the high-resolution volume) -> measures

- preprocess: the bundle's :class:`~.preprocess.PreprocessConfig` (heart-centred crop,
  resampling to the model grid, intensity normalisation) on the chosen phases.
- encode: w0 = E(x) for every slice x phase, as one batch.
- roi: the ROI of the inversion's L2 term: the heart in Seg(G(w0)) (every foreground
  label), dilated by ``roi_dilation_mm``; where a slice shows no heart (apex, base), a
  disc of ``FALLBACK_ROI_RADIUS_MM`` around the crop centre (the heart localisation).
  Pixels outside the native field of view never count.
- invert: K steps of Adam on w+ per image with the paper's loss (see
  :class:`~.inversion.InversionSettings`), early stop on a plateau; K = 0 keeps E(x).
- segment: Seg(G(w*)) as class probabilities; map_back: onto the native grid (linear
  resampling of the probabilities, argmax).
- interpolate: between neighbouring slices i, i+1, the codes
  w(t) = (1 - t) w_i + t w_{i+1}, t = k / N, k = 1..N-1, rendered and segmented: a
  volume of (S - 1) N + 1 slices at spacing (native spacing / N), in the model grid's
  plane (origins interpolated between the model-grid slices', directions the study's).
- measures: clinical measures of the native labels and of the high-resolution labels,
  and their plausibility flags (``Result.plausibility``, their messages in
  ``Result.warnings``; see :func:`~.measures.plausibility_flags`).
  The high-resolution volume's (S - 1) N + 1 slices of thickness gap / N span the first
  to the last native slice centre plus half a thin slice at each end; the native stack
  spans half a native gap beyond each end centre. So the two end slices of the
  high-resolution volume are weighted by (N + 1) / 2 in the volumes: both then cover the
  same S x gap extent, and the measures are comparable.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .backends import InversionSettings, Progress, open_backend
from .bundle import Bundle, default_bundle_path, load_bundle, validation_summary
from .errors import UsageError
from .measures import clinical_measures, plausibility_flags, study_measures, voxel_volume_ml
from .postprocess import BRIDGE_MM, island_warnings, keep_largest_component
from .preprocess import prepare
from .result import Result
from .study import Geometry, Study

log = logging.getLogger(__name__)

FALLBACK_ROI_RADIUS_MM = 50.0
MAX_INTERP = 32


def parse_phases(phases: str | Sequence[int] | None, study: Study) -> tuple[int, ...]:
    """Which phases to reconstruct, as sorted indices into ``study``'s phase axis.

    phases: None (ED and ES when the study names them, else every phase), "all",
            a comma list of "ed", "es" and phase indices (e.g. "ed,es", "0,8,15"), or a
            sequence of indices.
    """
    P = study.n_phases
    if phases is None:
        if study.ed_phase is not None and study.es_phase is not None:
            phases = "ed,es"
        else:
            phases = "all"
    if isinstance(phases, str):
        items = [p.strip().lower() for p in phases.split(",") if p.strip()]
        if items == ["all"]:
            return tuple(range(P))
        out = []
        for item in items:
            if item in ("ed", "es"):
                idx = study.ed_phase if item == "ed" else study.es_phase
                if idx is None:
                    raise UsageError(f"the study does not say which phase is {item.upper()}",
                                     hint="use --phases all (ED and ES are then found from "
                                          "the LV volume curve) or give phase indices")
                out.append(int(idx))
            elif item.lstrip("-").isdigit():
                out.append(int(item))
            else:
                raise UsageError(f"bad phase {item!r}",
                                 hint="use all, ed, es or phase indices, e.g. ed,es or 0,8")
    else:
        out = [int(p) for p in phases]
    if not out:
        raise UsageError("no phases selected")
    bad = [p for p in out if not 0 <= p < P]
    if bad:
        raise UsageError(f"phase index {bad[0]} is outside the study's {P} phases (0..{P - 1})")
    return tuple(sorted(set(out)))


def default_interp(study: Study, spacing_mm: float) -> int:
    """Interpolation factor that brings the slice spacing closest to the in-plane model
    spacing (e.g. 10 mm slices, 1.5 mm pixels -> 7), and at least 2 whenever the gap is
    larger than the pixel spacing (e.g. 5 mm slices, 4 mm pixels -> 2, not 1: a factor
    of 1 would give no high-resolution slice at all). 1 only when the gap is no larger
    than the pixel spacing (or unknown). See :func:`default_interp_reason`."""
    return default_interp_reason(study, spacing_mm)[0]


def default_interp_reason(study: Study, spacing_mm: float) -> tuple[int, str]:
    """:func:`default_interp` and the reason for it, for the log."""
    gap = study.geometry.slice_spacing
    if not math.isfinite(gap) or gap <= 0:
        return 1, "no slice gap: no high-resolution slices"
    ratio = gap / spacing_mm
    if ratio <= 1.0 + 1e-6:
        return 1, (f"slice gap {gap:.2f} mm <= model pixel spacing {spacing_mm:g} mm: "
                   "no high-resolution slices needed")
    n = int(min(MAX_INTERP, max(2, round(ratio))))
    why = f"slice gap {gap:.2f} mm / model pixel spacing {spacing_mm:g} mm = {ratio:.2f}"
    if round(ratio) < 2:
        why += ", raised to 2: the gap allows a high-resolution slice"
    elif round(ratio) > MAX_INTERP:
        why += f", capped at {MAX_INTERP}"
    return n, why + f" -> {gap / n:.2f} mm high-resolution slices"


def interpolate_codes(w: np.ndarray, interp: int) -> np.ndarray:
    """[S, ...] codes -> [(S - 1) * interp + 1, ...]: w_i, then (1 - t) w_i + t w_{i+1}
    for t = k / interp, k = 1..interp-1, ..., ending with w_{S-1}."""
    w = np.asarray(w)
    S = w.shape[0]
    if S == 1 or interp == 1:
        return w.copy()
    t = (np.arange(interp, dtype=np.float64) / interp).reshape((1, interp) + (1,) * (w.ndim - 1))
    a, b = w[:-1, None].astype(np.float64), w[1:, None].astype(np.float64)
    mid = ((1.0 - t) * a + t * b).reshape((-1,) + w.shape[1:])
    return np.concatenate([mid, w[-1:].astype(np.float64)]).astype(w.dtype)


def hr_geometry(model_geometry: Geometry, interp: int) -> Geometry:
    """The high-resolution volume's geometry: model-grid slices with origins interpolated
    linearly between neighbouring slices (slice spacing / interp)."""
    origins = interpolate_codes(model_geometry.origins, interp)
    thickness = model_geometry.slice_thickness
    return Geometry(origins=origins, row_dir=model_geometry.row_dir,
                    col_dir=model_geometry.col_dir, pixel_spacing=model_geometry.pixel_spacing,
                    slice_thickness=None if thickness is None else thickness / interp)


def hr_slice_weights(n_native: int, interp: int) -> np.ndarray:
    """Weights of the high-resolution slices in the volumes (see the module docstring)."""
    n = (n_native - 1) * interp + 1
    w = np.ones(n)
    if n_native > 1:
        w[0] += (interp - 1) / 2.0
        w[-1] += (interp - 1) / 2.0
    return w


def heart_roi(model_labels: np.ndarray, valid: np.ndarray, *, spacing_mm: float,
              dilation_mm: float, fallback_radius_mm: float = FALLBACK_ROI_RADIUS_MM
              ) -> tuple[np.ndarray, np.ndarray]:
    """ROI weights [N, R, R] float32 from model-grid labels [N, R, R] (the heart, dilated
    by ``dilation_mm``), a disc around the grid centre where a label map is empty; and
    [N] bool, which images used the disc. ``valid`` [N, R, R] masks the field of view."""
    from scipy import ndimage

    N, R, _ = model_labels.shape
    rad = dilation_mm / spacing_mm
    k = int(math.ceil(rad))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    ball = (yy ** 2 + xx ** 2) <= rad ** 2 + 1e-9
    c = R // 2
    gy, gx = np.mgrid[0:R, 0:R]
    disc = ((gy - c) ** 2 + (gx - c) ** 2) * spacing_mm ** 2 <= fallback_radius_mm ** 2
    roi = np.zeros((N, R, R), np.float32)
    fallback = np.zeros(N, bool)
    for i in range(N):
        fg = model_labels[i] > 0
        if fg.any():
            roi[i] = ndimage.binary_dilation(fg, structure=ball) if k > 0 else fg
        else:
            roi[i] = disc
            fallback[i] = True
    roi *= valid
    return roi, fallback


def psnr(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Per-image PSNR in dB of [N, ...] arrays."""
    mse = np.square(x.astype(np.float64) - y.astype(np.float64)).reshape(len(x), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-20))


class _Stages:
    """Per-stage wall-clock timings, in the order the stages ran."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
            log.debug("stage %s: %.3f s", name, self.times[name])


def _stage_progress(progress: Progress, stage: str) -> Progress:
    if progress is None:
        return None

    def cb(_inner: str, done: int, total: int) -> None:
        progress(stage, done, total)
    return cb


def model_warnings(bundle: dict[str, Any]) -> list[str]:
    """What a reader of the results must know about the model itself: a bundle whose
    recorded validation says it is below the project's bar (:func:`~.bundle.
    validation_summary`). The warning gives the measured Dice, so that the report does not
    present the measures as if the model met it."""
    summary = validation_summary(bundle.get("provenance"))
    if summary is None or summary[1] is not False:
        return []
    bar = (bundle.get("provenance") or {})["validation"].get("bar", "see its provenance")
    return [f"model {bundle.get('name', '?')} is below the project's validation bar: "
            f"{summary[0]} ({bar}); check the segmentation overlays before using the measures"]


class Reconstructor:
    """Reconstructs studies with one bundle on one backend and device.

    bundle:  a :class:`~.bundle.Bundle`, a bundle folder, or None for the reference
             bundle shipped with the package (an UnavailableError says when none ships).
    backend: "auto" (onnxruntime when installed and the bundle has its ONNX graphs, else
             torch), "onnxruntime" or "torch".
    device:  "auto" (CUDA when the backend sees one, else the CPU), "cpu", "cuda" or
             "cuda:N"; a device that cannot be used is an error.
    Opening loads the graphs once; :meth:`reconstruct` can then be called for any number
    of studies. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, bundle: Bundle | str | Path | None = None, *, backend: str = "auto",
                 device: str = "auto", threads: int | None = None):
        t0 = time.perf_counter()
        if bundle is None:
            bundle = default_bundle_path()
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.backend = open_backend(self.bundle, backend, device, threads=threads)
        self.open_seconds = time.perf_counter() - t0
        log.info("bundle %s (%s, %s) on %s/%s, opened in %.1f s", self.bundle.name,
                 self.bundle.preset, self.bundle.sha256[:12], self.backend.name,
                 self.backend.device, self.open_seconds)

    def __enter__(self) -> "Reconstructor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.backend.close()

    def settings(self, **overrides: Any) -> InversionSettings:
        """The bundle's inversion settings with ``overrides`` (e.g. steps=20)."""
        return InversionSettings.from_manifest(self.bundle.inversion, **overrides)

    def bundle_info(self) -> dict[str, Any]:
        b = self.bundle
        return {"path": str(b.path), "name": b.name, "sha256": b.sha256, "preset": b.preset,
                "created": b.manifest.get("created"),
                "provenance": b.manifest.get("provenance")}

    # -- the pipeline -------------------------------------------------------------
    def reconstruct(self, study: Study | str | Path, *, steps: int | None = None,
                    interp: int | None = None, phases: str | Sequence[int] | None = None,
                    series: str | None = None, progress: Progress = None,
                    largest_component: bool = True, **inversion: Any) -> Result:
        """Segment and reconstruct one study.

        study:    a :class:`Study`, or a path (DICOM folder, NIfTI file, ACDC folder).
        steps:    inversion steps K (default: the bundle's; 0 = encoder only).
        interp:   high-resolution factor N (slices per native gap; default from the slice
                  spacing and the model's pixel spacing, see :func:`default_interp`).
        phases:   see :func:`parse_phases` (default ED and ES when known, else all).
        series:   SeriesInstanceUID when ``study`` is a DICOM folder with several.
        progress: optional callback (stage, done, total).
        largest_component: keep each structure's largest 3D component (parts up to
                  :data:`~.postprocess.BRIDGE_MM` apart count as one) in the native and
                  the high-resolution labels; the rest becomes background (see
                  :mod:`.postprocess`). False keeps the networks' labels as they are.
        inversion: other :class:`InversionSettings` overrides (lr, lambda1, ...).
        """
        stages = _Stages()
        warnings: list[str] = []
        with stages("load"):
            if not isinstance(study, Study):
                from .io import load_study
                study = load_study(study, series=series)
            elif series is not None:
                raise UsageError("series applies to a path, not to a loaded Study")
            # a long-axis view, a single slice or a perfusion series: refused before any
            # network runs (see deeprecon.runtime.io.acquisition)
            from .io.acquisition import check_acquisition
            check_acquisition(study)
        warnings += model_warnings(self.bundle_info())
        sel = parse_phases(phases, study)
        settings = self.settings(steps=steps, **inversion)
        if interp is None:
            interp, why = default_interp_reason(study, self.bundle.preprocess.spacing_mm)
        else:
            why = "given"
        if isinstance(interp, bool) or int(interp) != interp or not 1 <= interp <= MAX_INTERP:
            raise UsageError(f"interp must be an integer in 1..{MAX_INTERP}, got {interp!r}")
        interp = int(interp)
        log.info("high-resolution factor %d (%s)", interp, why)
        sub = _subset_phases(study, sel)

        with stages("preprocess"):
            model_images, transform = prepare(sub, self.bundle.preprocess)
        if transform.label_coverage is not None and transform.label_coverage < 1.0:
            warnings.append(f"the crop leaves {100 * (1 - transform.label_coverage):.1f}% of "
                            "the study's own labels outside the model grid")
        P, S, R, _ = model_images.shape
        x = model_images.reshape(P * S, 1, R, R)
        log.info("%d phase(s) x %d slices = %d images; %d inversion steps; %d high-resolution "
                 "slices per gap", P, S, P * S, settings.steps, interp)

        with stages("encode"):
            w0 = self.backend.encode(x, progress=_stage_progress(progress, "encode"))

        roi_fallback = np.zeros(P * S, bool)
        recon0 = None
        if settings.steps > 0:
            with stages("roi"):
                recon0, probs0 = self.backend.render_and_segment(w0)
                lab0 = probs0.argmax(1).astype(np.uint8)
                valid = np.broadcast_to(transform.model_valid_mask()[None],
                                        (P, S, R, R)).reshape(P * S, R, R)
                roi, roi_fallback = heart_roi(lab0, valid, spacing_mm=transform.spacing_mm,
                                              dilation_mm=settings.roi_dilation_mm)
            if roi_fallback.any():
                log.info("%d of %d images show no heart in the encoder's reconstruction: "
                         "their ROI is a %.0f mm disc around the heart's centre",
                         int(roi_fallback.sum()), P * S, FALLBACK_ROI_RADIUS_MM)
        else:
            roi = np.zeros((P * S, R, R), np.float32)

        with stages("invert"):
            inv = self.backend.invert(x, roi[:, None], w0, settings,
                                      progress=_stage_progress(progress, "invert"))

        with stages("segment"):
            probs = self.backend.segment(inv.recon, progress=_stage_progress(progress, "segment"))
        K = probs.shape[1]
        model_labels = probs.argmax(1).astype(np.uint8).reshape(P, S, R, R)

        with stages("map_back"):
            labels = transform.labels_to_native(probs.reshape(P, S, K, R, R))

        latents = inv.w.reshape((P, S) + inv.w.shape[1:])
        recon = inv.recon.reshape(P, S, R, R)
        with stages("interpolate"):
            hr_images, hr_labels = self._render_volume(
                latents, interp, progress, images=recon, labels=model_labels)
        model_geo = transform.model_geometry(sub.geometry)
        hr_geo = hr_geometry(model_geo, interp)
        frames = [int(study.phase_ids[p]) for p in sel]
        islands = None
        if largest_component:
            with stages("postprocess"):
                labels, removed = keep_largest_component(labels, sub.geometry.pixel_spacing)
                hr_labels, removed_hr = keep_largest_component(hr_labels, model_geo.pixel_spacing)
            model_labels = np.ascontiguousarray(hr_labels[:, ::interp])
            islands = {"bridge_mm": BRIDGE_MM, "removed_native": removed.round(6).tolist(),
                       "removed_hr": removed_hr.round(6).tolist()}
            warnings += island_warnings(removed, frames)

        with stages("measures"):
            measures = self._measures(sub, labels, hr_labels, hr_geo, interp)
            flags = self._plausibility(measures, labels, hr_labels, frames, model_labels,
                                       self.bundle.preprocess.field_of_view_mm)
        warnings += [f["message"] for f in flags]

        data_range = float(np.subtract(*self.bundle.preprocess.out_range[::-1]))
        psnr_init = psnr(x, recon0 if settings.steps > 0 else inv.recon, data_range)
        inversion_report = {
            "steps": inv.steps.tolist(), "loss_init": inv.loss_init.tolist(),
            "loss": inv.loss.tolist(), "psnr_init": psnr_init.tolist(),
            "psnr": psnr(x, inv.recon, data_range).tolist(),
            "stopped_early": inv.stopped_early.tolist(),
            "roi_fallback": roi_fallback.tolist(), "settings": settings.to_dict()}
        options = {"steps": settings.steps, "interp": interp, "phases": list(sel),
                   "phase_ids": frames,
                   "backend": self.backend.name, "device": self.backend.device,
                   "series": series, "backend_info": self.backend.info(),
                   "largest_component": islands}
        for w in warnings:
            log.warning("%s", w)
        return Result(study=study, phases=sel, transform=transform, labels=labels,
                      model_images=model_images, model_recon=recon, model_labels=model_labels,
                      latents=latents, hr_images=hr_images, hr_labels=hr_labels,
                      hr_geometry=hr_geo, interp=interp, measures=measures,
                      inversion=inversion_report, timings=stages.times, options=options,
                      bundle=self.bundle_info(), warnings=warnings, plausibility=flags)

    def _render_volume(self, latents: np.ndarray, interp: int, progress: Progress, *,
                       images: np.ndarray, labels: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """[P, S, L, C] codes -> high-resolution images and labels [P, S_hr, R, R].

        ``images``/``labels`` [P, S, R, R] are G and Seg of the native slices' codes,
        already computed: every interp-th high-resolution slice is one of them, so only
        the codes between them are rendered and segmented here."""
        P, R = images.shape[0], images.shape[-1]
        codes = np.stack([interpolate_codes(latents[p], interp) for p in range(P)])
        S_hr = codes.shape[1]
        native = np.zeros(S_hr, bool)
        native[::interp] = True
        hr_images = np.empty((P, S_hr, R, R), np.float32)
        hr_labels = np.empty((P, S_hr, R, R), np.uint8)
        hr_images[:, native], hr_labels[:, native] = images, labels
        if not native.all():
            between = codes[:, ~native]
            imgs, probs = self.backend.render_and_segment(
                between.reshape((-1,) + codes.shape[2:]),
                progress=_stage_progress(progress, "interpolate"))
            hr_images[:, ~native] = imgs.reshape(P, -1, R, R)
            hr_labels[:, ~native] = probs.argmax(1).astype(np.uint8).reshape(P, -1, R, R)
        return hr_images, hr_labels

    @staticmethod
    def _measures(sub: Study, labels: np.ndarray, hr_labels: np.ndarray, hr_geo: Geometry,
                  interp: int) -> dict[str, dict[str, Any]]:
        native = study_measures(sub, labels=labels)
        gap = sub.geometry.slice_spacing
        if not math.isfinite(gap):  # a single slice: its thickness
            gap = sub.geometry.slice_thickness
        hr = clinical_measures(hr_labels,
                               voxel_volume_ml(hr_geo, slice_spacing=gap / interp),
                               ed_phase=native["ed_phase"], es_phase=native["es_phase"],
                               slice_weights=hr_slice_weights(sub.n_slices, interp))
        hr["ed_es_from"] = native["ed_es_from"]  # the same phases, chosen on the native labels
        return {"native": native, "hr": hr}


    @staticmethod
    def _plausibility(measures: dict[str, dict[str, Any]], labels: np.ndarray,
                      hr_labels: np.ndarray, frame_ids: Sequence[int], model_labels: np.ndarray,
                      field_of_view_mm: float) -> list[dict[str, Any]]:
        """The plausibility flags of the native and the high-resolution measures; the
        crop's edge is checked once, on the native slices' labels on the model grid."""
        return (plausibility_flags(measures["native"], labels=labels, source="native",
                                   frame_ids=frame_ids, model_labels=model_labels,
                                   field_of_view_mm=field_of_view_mm)
                + plausibility_flags(measures["hr"], labels=hr_labels, source="hr",
                                     frame_ids=frame_ids))


def _subset_phases(study: Study, phases: tuple[int, ...]) -> Study:
    """The study restricted to ``phases`` (ED/ES re-indexed; unknown when not kept)."""
    if phases == tuple(range(study.n_phases)):
        return study
    idx = list(phases)

    def remap(p):
        return idx.index(p) if p is not None and p in idx else None

    return Study(images=study.images[idx], geometry=study.geometry,
                 trigger_times=study.trigger_times[idx],
                 labels=None if study.labels is None else study.labels[idx],
                 phase_ids=[study.phase_ids[p] for p in idx],
                 ed_phase=remap(study.ed_phase), es_phase=remap(study.es_phase),
                 series_uid=study.series_uid, description=study.description,
                 source=study.source, source_format=study.source_format,
                 info=dict(study.info), warnings=list(study.warnings),
                 image_refs=None if study.image_refs is None else [study.image_refs[p] for p in idx])


__all__ = ["Reconstructor", "parse_phases", "default_interp", "default_interp_reason",
           "interpolate_codes",
           "hr_geometry", "hr_slice_weights", "heart_roi"]
