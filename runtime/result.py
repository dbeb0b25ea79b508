"""What a reconstruction returns: the :class:`Result` of ``Reconstructor.reconstruct`` and
of ``adapt_motion``, numpy arrays only (no torch), so that outputs, QC pictures and the
report can be written from it on any machine.

Array conventions (P = reconstructed phases, S = native slices, H x W = native matrix,
R = model grid side, S_hr = (S - 1) * interp + 1 high-resolution slices):

- native grid: ``labels`` [P, S, H, W] uint8 in the study's geometry;
- model grid: ``model_images``, ``model_recon`` [P, S, R, R] float32 in the bundle's
  normalised intensity range, ``model_labels`` [P, S, R, R] uint8,
  ``latents`` [P, S, L, C] float32 (w+ after inversion);
- high-resolution volume: ``hr_images`` [P, S_hr, R, R] float32 (normalised intensity),
  ``hr_labels`` [P, S_hr, R, R] uint8, in ``hr_geometry`` (model in-plane grid, slice
  spacing = native spacing / interp, same directions, first slice at the first native
  slice's position).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .preprocess import ModelGridTransform
from .study import Geometry, Study

#: ``Result.kind`` of a motion adaptation (``adapt_motion``)
MOTION_KIND = "motion_adaptation"


@dataclass
class Result:
    """The outputs of one reconstruction (or motion adaptation).

    study:         the input study (native images, geometry, phase ids, ED/ES).
    phases:        indices into ``study``'s phase axis of the P reconstructed phases,
                   in order; ``ed_index``/``es_index`` index into *these* P phases.
    transform:     the native <-> model grid transform of this study.
    labels:        [P, S, H, W] uint8 segmentation on the native grid (each structure
                   its largest 3D part unless ``options["largest_component"]`` is None,
                   see :mod:`deeprecon.runtime.postprocess`).
    model_images:  [P, S, R, R] float32 preprocessed inputs x.
    model_recon:   [P, S, R, R] float32 G(w*).
    model_labels:  [P, S, R, R] uint8 Seg(G(w*)) (post-processed as ``hr_labels``, whose
                   native slices they are).
    latents:       [P, S, L, C] float32 w*.
    hr_images, hr_labels, hr_geometry: the high-resolution volume (see module doc);
                   ``interp`` = 1 means no slices between the native ones.
    measures:      {"native": clinical measures dict, "hr": ...}, each as returned by
                   :func:`~deeprecon.runtime.measures.clinical_measures` (the nine
                   ukbb_cardiac columns, ed/es phases, volume curves).
    inversion:     per-image inversion report: {"steps": [P*S] int steps taken,
                   "loss_init", "loss": [P*S] float, "psnr_init", "psnr": [P*S] float (dB,
                   of G(E(x)) and G(w*) against x on the model grid), "stopped_early":
                   [P*S] bool}, lists in phase-major order.
    timings:       stage name -> seconds, in pipeline order (e.g. "load", "preprocess",
                   "encode", "invert", "segment", "map_back", "interpolate", "measures").
    options:       what was asked: steps, interp, phases, backend, device, ...
    bundle:        the bundle's identity: {"path", "name", "sha256" (of its manifest),
                   "preset", "created", "provenance" (the manifest's, as written)}.
    warnings:      things the user should know (also logged at WARNING); includes the
                   message of every plausibility flag.
    plausibility:  the flags of implausible measures, of every source (see
                   :func:`~deeprecon.runtime.measures.plausibility_flags`); empty when
                   every measure is plausible.
    kind:          "reconstruction" or "motion_adaptation".
    extra:         kind-specific data; for motion adaptation: {"source": Result,
                   "target": Result} with the adapted sequence in this Result's arrays.
    """

    study: Study
    phases: tuple[int, ...]
    transform: ModelGridTransform
    labels: np.ndarray
    model_images: np.ndarray
    model_recon: np.ndarray
    model_labels: np.ndarray
    latents: np.ndarray
    hr_images: np.ndarray
    hr_labels: np.ndarray
    hr_geometry: Geometry
    interp: int
    measures: dict[str, dict[str, Any]]
    inversion: dict[str, list]
    timings: dict[str, float]
    options: dict[str, Any]
    bundle: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    plausibility: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "reconstruction"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_phases(self) -> int:
        return len(self.phases)

    @property
    def ed_index(self) -> int | None:
        """ED among the reconstructed phases (from the native measures)."""
        return self.measures.get("native", {}).get("ed_phase")

    @property
    def es_index(self) -> int | None:
        return self.measures.get("native", {}).get("es_phase")

    @property
    def phase_ids(self) -> list[int]:
        """The source's frame numbers of the reconstructed phases."""
        return [int(self.study.phase_ids[p]) for p in self.phases]

    def model_geometry(self) -> Geometry:
        """Geometry of the model-grid slices (for writing model-grid arrays)."""
        return self.transform.model_geometry(self.study.geometry)


def frame_ids(result: Result) -> list[int]:
    """The source's frame number of each reconstructed phase (``Result.phase_ids``);
    0..P-1 when the study cannot say (e.g. an adapted sequence longer than the study, or
    repeated ids, which would give two phases the same file name)."""
    try:
        ids = [int(v) for v in result.phase_ids]
    except (IndexError, TypeError, ValueError):
        ids = []
    if len(ids) != result.n_phases or len(set(ids)) != len(ids):
        ids = list(range(result.n_phases))
    return ids


def all_warnings(result: Result) -> list[str]:
    """The Result's warnings then the study's, each once, in order."""
    seen: dict[str, None] = {}
    for w in list(result.warnings) + list(result.study.warnings):
        seen.setdefault(str(w), None)
    return list(seen)


__all__ = ["Result", "MOTION_KIND", "frame_ids", "all_warnings"]
