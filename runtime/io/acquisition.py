"""Acquisition checks: is this study a cine short-axis stack at all?

A loaded study can be well-formed (every check of :mod:`.validate` passes) and still be
the wrong acquisition for this tool: a long-axis view, a single slice, or a first-pass
perfusion (dynamic) series. The networks would run on it and give numbers that mean
nothing (a perfusion series gave an LVEF of 0.5 %). :func:`check_acquisition` refuses
them before any network runs; ``deeprecon-rt study info`` and ``reconstruct`` (and
:meth:`~deeprecon.runtime.pipeline.Reconstructor.reconstruct`) call it right after
loading, so a bad study fails in about a second. Each refusal is an
:class:`~deeprecon.runtime.errors.InvalidStudyError` subclass (exit 65) whose one-line
message names the problem and the values that show it. The loaders themselves stay
permissive (``load_study(..., series=UID)`` still returns a single-slice series that
was asked for by name); only a perfusion series whose frames share one trigger time is
refused by the DICOM loader itself, since it cannot be built into a cine at all.

The rules, checked in this order:

1. **Perfusion / dynamic series** (:class:`DynamicSeriesError`):

   - the series description (DICOM SeriesDescription, a NIfTI's file name) or, for
     DICOM, an ImageType value matches :data:`DYNAMIC_NAME_RE` ("perf", "perfusion",
     "first pass", "FPP"); or
   - at least :data:`DYNAMIC_MIN_FRAMES` frames with known trigger times whose mean
     step, (max - min) / (frames - 1), is below :data:`MIN_CINE_PHASE_INTERVAL_MS`: a
     cine's frames are spread over the cardiac cycle (10 ms or more apart), a
     perfusion's dynamics are triggered at the same delay after the R wave, one per
     heartbeat (a spread of zero across 79 frames).

2. **Long-axis view** (:class:`LongAxisError`): the slice normal's angle to a nominal
   LV long axis is at least :data:`LONG_AXIS_MIN_ANGLE_DEG`, and the stack has at most
   :data:`LONG_AXIS_MAX_SLICES` slices. The nominal axis is :data:`NOMINAL_LV_AXIS_LPS`,
   (1, -1, -1)/sqrt(3) in patient LPS (apex left, anterior, inferior); the sign of the
   normal does not matter. Why this rule:

   - a short-axis normal *is* the LV long axis: in real studies within about 35 deg of
     the nominal axis (the heart's axis varies between patients);
   - a long-axis view (2-, 3-, 4-chamber) *contains* the long axis: its normal is near
     90 deg from it (65 deg and more allowing for that variation);
   - the three cardinal planes (axial, coronal, sagittal) all lie at 54.7 deg. So do
     files whose direction cosines say nothing (ACDC's NIfTI files carry the identity
     direction): they are never judged long-axis, because the threshold is above 54.7;
   - a stack of more than three parallel slices is a short-axis stack even when its
     normal is far from the nominal axis (a heart with an unusual axis, e.g.
     dextrocardia at about 70 deg): only a warning then. Long-axis cines are one slice
     per view, or a few.

3. **Single slice** (:class:`SingleSliceError`): one slice position. Volumes and the
   high-resolution reconstruction need a stack of at least two parallel slices.

No option overrides these refusals, on purpose: for each of these inputs the outputs
(3D volume, LV/RV volumes, LVEF) cannot be computed from what was acquired, so a flag
to proceed would only let wrong numbers out. The one borderline case, a stack of more
than three slices at an unusual angle, is accepted with a warning (rule 2).
"""
from __future__ import annotations

import re

import numpy as np

from deeprecon.runtime.errors import InvalidStudyError
from deeprecon.runtime.io.validate import add_warning, fmt_pos
from deeprecon.runtime.study import Study

#: nominal LV long axis in patient LPS (apex pointing left, anterior, inferior), unit length
NOMINAL_LV_AXIS_LPS = np.array([1.0, -1.0, -1.0]) / np.sqrt(3.0)
#: a slice normal at least this far (deg) from the nominal axis is long-axis-like
LONG_AXIS_MIN_ANGLE_DEG = 65.0
#: more slices than this are a short-axis stack whatever their angle (warning only)
LONG_AXIS_MAX_SLICES = 3
#: a dynamic series by its trigger times needs at least this many frames
DYNAMIC_MIN_FRAMES = 3
#: a cine's frames are further apart than this on average (ms); dynamics are not
MIN_CINE_PHASE_INTERVAL_MS = 2.0
#: series descriptions / ImageType values of perfusion series
DYNAMIC_NAME_RE = re.compile(r"(?<![a-z])perf(usion)?(?![a-z])|first[-_ ]?pass|(?<![a-z])fpp(?![a-z])",
                             re.IGNORECASE)


class DynamicSeriesError(InvalidStudyError):
    """A perfusion / dynamic series (frames over many heartbeats), not a cine (exit 65)."""


class LongAxisError(InvalidStudyError):
    """A long-axis view (2-, 3-, 4-chamber), not a short-axis stack (exit 65)."""


class SingleSliceError(InvalidStudyError):
    """One slice position: no stack, so no volume and no 3D reconstruction (exit 65)."""


_DYNAMIC_HINT = ("deeprecon-rt analyses cine short-axis stacks (frames over one cardiac cycle); "
                 "pick the cine series (--series) or export it instead")


def long_axis_angle_deg(normal: np.ndarray) -> float:
    """Angle in degrees (0..90) between a slice normal [3] (LPS) and the nominal LV axis,
    whichever sign the normal has."""
    n = np.asarray(normal, dtype=np.float64).reshape(3)
    c = abs(float(n @ NOMINAL_LV_AXIS_LPS)) / float(np.linalg.norm(n))
    return float(np.degrees(np.arccos(np.clip(c, 0.0, 1.0))))


def dynamic_name(text: str) -> str | None:
    """The part of ``text`` (a description, an ImageType value) that says perfusion, or None."""
    m = DYNAMIC_NAME_RE.search(text or "")
    return None if m is None else m.group(0)


def dynamic_by_trigger_times(trigger_times) -> tuple[int, float] | None:
    """(frames, span in ms) when ``trigger_times`` [P] (ms, NaN unknown) look like a
    dynamic series: at least DYNAMIC_MIN_FRAMES known times whose mean step is below
    MIN_CINE_PHASE_INTERVAL_MS; else None."""
    t = np.asarray(trigger_times, dtype=np.float64).ravel()
    t = t[np.isfinite(t)]
    if t.size < DYNAMIC_MIN_FRAMES:
        return None
    span = float(t.max() - t.min())
    if span / (t.size - 1) < MIN_CINE_PHASE_INTERVAL_MS:
        return t.size, span
    return None


def dynamic_trigger_message(n_frames: int, span_ms: float, where: str = "") -> str:
    """The message of a dynamic series found by its trigger times."""
    return (f"a perfusion/dynamic series, not a cine: {n_frames} frames{where} whose trigger "
            f"times span {span_ms:.1f} ms (a cine's frames are spread over the cardiac cycle, "
            f"on average at least {MIN_CINE_PHASE_INTERVAL_MS:g} ms apart)")


def check_acquisition(study: Study) -> Study:
    """Refuse a study that is not a cine short-axis stack (see the module docstring).

    Raises DynamicSeriesError, LongAxisError or SingleSliceError (all exit 65), each
    naming the values that show the problem. A stack of more than LONG_AXIS_MAX_SLICES
    slices at a long-axis-like angle gets a warning in ``study.warnings``.
    Returns the same study.
    """
    ctx = f"{study.source}: " if study.source else ""
    P, S = study.n_phases, study.n_slices
    said = dynamic_name(study.description)
    if said is not None:
        raise DynamicSeriesError(
            f"{ctx}a perfusion/dynamic series, not a cine: its description "
            f"{study.description!r} says {said!r} ({P} frames x {S} slice{'s' if S > 1 else ''})",
            hint=_DYNAMIC_HINT)
    dyn = dynamic_by_trigger_times(study.trigger_times)
    if dyn is not None:
        raise DynamicSeriesError(f"{ctx}{dynamic_trigger_message(*dyn)}", hint=_DYNAMIC_HINT)
    g = study.geometry
    angle = long_axis_angle_deg(g.normal)
    if angle >= LONG_AXIS_MIN_ANGLE_DEG:
        if S <= LONG_AXIS_MAX_SLICES:
            raise LongAxisError(
                f"{ctx}a long-axis view, not a short-axis stack: {S} slice{'s' if S > 1 else ''} "
                f"whose normal is {angle:.0f} deg from a short-axis normal (long-axis views: "
                f">= {LONG_AXIS_MIN_ANGLE_DEG:g} deg; orientation {g.orientation_label()})",
                hint="pass the short-axis cine stack (parallel slices from base to apex); "
                     "2-, 3- and 4-chamber views are not analysed")
        add_warning(study, f"{ctx}the slice normal is {angle:.0f} deg from a typical short-axis "
                           f"normal (long-axis views lie at >= {LONG_AXIS_MIN_ANGLE_DEG:g} deg); "
                           f"accepted as a short-axis stack because it has {S} parallel slices")
    if S == 1:
        thick = g.slice_thickness
        raise SingleSliceError(
            f"{ctx}a single slice ({fmt_pos(float(g.positions[0]))}"
            + (f", {thick:g} mm thick" if thick is not None else "")
            + f", {P} phase{'s' if P > 1 else ''}), not a stack: volumes and the 3D "
            "reconstruction need at least 2 parallel short-axis slices",
            hint="export the complete short-axis cine stack (every slice position); a folder "
                 "holding one series per slice is merged when all of them are there")
    return study
