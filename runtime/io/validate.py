"""Checks shared by every study loader, and the specific errors they raise.

Every error here is an :class:`~deeprecon.runtime.errors.InvalidStudyError` (exit 65),
a :class:`~deeprecon.runtime.errors.NoInputError` (exit 66) or, for a wrong option
value, a :class:`~deeprecon.runtime.errors.UsageError` (exit 2). The subclasses exist
so that callers and tests can tell the cases apart; the CLI only needs ``exit_code``.

Messages say what is wrong, where (file, series, slice position) and, in ``hint``,
what to do about it.

Positions along the slice normal are printed in mm as ``z=+12.50 mm`` (the projection
of the slice origin on ``row_dir x col_dir``, patient LPS coordinates).
"""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deeprecon.runtime.errors import InvalidStudyError, NoInputError, UsageError
from deeprecon.runtime.study import LABELS, Study

log = logging.getLogger(__name__)

# Defaults of the checks (every function takes them as keyword-only overrides).
MAX_ORIENTATION_ANGLE_DEG = 1.0   # slices tilted more than this are "different orientations"
MAX_GAP_RATIO = 1.5               # a gap > 1.5 x the typical spacing means a missing slice
IRREGULAR_GAP_RATIO = 0.10        # gaps off the typical spacing by > 10 % give a warning
POSITION_TOL_MM = 0.05            # two slices closer than this along the normal coincide
PIXEL_SPACING_RTOL = 1e-3         # relative tolerance on pixel spacings
# Plausible ranges of the geometry and timing values (checked at the loaders' boundary).
PIXEL_SPACING_RANGE_MM = (1e-3, 100.0)   # pixel spacing and slice thickness, mm
MAX_SLICE_GAP_MM = 200.0                 # a larger gap between neighbouring slices is absurd
MAX_COORDINATE_MM = 1e6                  # |origin| beyond 1 km is not a patient position
TRIGGER_TIME_RANGE_MS = (-1e3, 1e5)      # trigger times, ms after the R wave
DIRECTION_TOL = 1e-3                     # unit length and orthogonality of direction cosines


# --------------------------------------------------------------------------- errors
class NoImagesError(NoInputError):
    """The path exists but holds nothing that looks like an image (exit 66)."""


class UnreadableFilesError(InvalidStudyError):
    """Files were found, but none of them could be read as an image."""


class NonMRError(InvalidStudyError):
    """The images are not MR (CT, ultrasound, secondary captures, ...)."""


class MixedSeriesError(InvalidStudyError):
    """Several short-axis candidates: the user has to pick one (``--series``)."""


class UnknownSeriesError(UsageError):
    """``--series`` names a series that is not in the input (exit 2)."""


class NoStackError(InvalidStudyError):
    """MR images exist, but no stack of parallel slices (only localisers, long-axis views)."""


class AmbiguousInputError(InvalidStudyError):
    """A folder holds several candidate image files and nothing says which one is meant."""


class OrientationMismatchError(InvalidStudyError):
    """Slices of one stack are not parallel / not equally oriented in plane."""


class GeometryMismatchError(InvalidStudyError):
    """Slices differ in matrix size, pixel spacing or in-plane origin."""


class PhaseCountMismatchError(InvalidStudyError):
    """Slices of one stack have different numbers of phases."""


class DuplicatePositionError(InvalidStudyError):
    """Two different images share a slice position and a trigger time."""


class MissingSliceError(InvalidStudyError):
    """A gap in the slice spacing: at least one slice is missing from the stack."""


class NonFiniteError(InvalidStudyError):
    """Pixels are NaN or infinite."""


class UnsupportedTransferSyntaxError(InvalidStudyError):
    """Compressed DICOM pixel data that no installed decoder can read."""


class InvalidGeometryError(InvalidStudyError):
    """Pixel spacing, thickness, orientation, position or timing values that are not
    finite, not positive, not orthonormal or outside any plausible range."""


class LabelError(InvalidStudyError):
    """A label image does not fit its image (grid) or holds unknown values."""


# --------------------------------------------------------------------------- helpers
def fmt_pos(z: float) -> str:
    """A slice position along the normal, for messages: ``z=+12.50 mm``."""
    return f"z={z:+.2f} mm"


def fmt_list(items: Sequence[str], *, limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, ... (12 in all)`` for long lists."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items)} in all)"


def angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    """Angle in degrees between two 3-vectors (0 for parallel, same sense)."""
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    c = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def lower_median(values: np.ndarray) -> float:
    """The lower median (an element of ``values``): robust to one or two large gaps."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    return float(v[(v.size - 1) // 2])


# --------------------------------------------------------------------------- checks
def special_file(path: Path, root: Path) -> str | None:
    """Why ``path`` must not be opened, or None for a regular file inside ``root``.

    Decided from ``os.lstat``/``os.stat`` alone (a FIFO is never opened): FIFOs, devices
    and sockets are refused, and so are symlinks that resolve outside ``root`` (or
    nowhere). ``root`` may be the file itself (a file named on the command line may be a
    link to anywhere; the files found beside it may not).
    """
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(path))
            base = Path(os.path.realpath(root))
            base = base if base.is_dir() else base.parent
            if target != base and base not in target.parents:
                return f"symlink to {target}, outside the input folder"
            st = os.stat(path)
    except OSError as exc:
        return f"cannot stat ({exc.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
            else "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file")
    return kind


def check_regular_file(path: Path, root: Path) -> None:
    """Raises NoInputError (66) when ``path`` does not exist and InvalidStudyError (65)
    when it is not a regular file inside ``root`` (:func:`special_file`); nothing is
    opened either way."""
    if not os.path.lexists(path):
        raise NoInputError(f"{path}: no such file", hint="check the path")
    why = special_file(path, root)
    if why:
        raise InvalidStudyError(
            f"{path}: not a regular file inside the input ({why}); nothing was read",
            hint="copy the real file into the folder instead of a link, pipe or device")


def geometry_problems(*, pixel_spacing=None, orientation=None, position=None, thickness=None,
                      trigger_time=None, names: dict[str, str] | None = None,
                      unit_tol: float = DIRECTION_TOL) -> list[str]:
    """What is wrong with one image's geometry and timing values (empty: nothing).

    pixel_spacing: (row, column) mm; orientation: [6] direction cosines (row direction,
    column direction) or None; position: [3] mm; thickness: mm; trigger_time: ms.
    None means "not given" and is not a problem. ``names`` maps each argument name to the
    tag named in the messages (e.g. ``{"pixel_spacing": "PixelSpacing"}``).
    Each problem reads ``Tag [values]: what is wrong``.
    """
    names = names or {}

    def tag(key: str, value) -> str:
        v = np.asarray(value, dtype=np.float64).ravel()
        return f"{names.get(key, key)} {[float(f'{x:.6g}') for x in v.tolist()]}"

    lo, hi = PIXEL_SPACING_RANGE_MM
    out: list[str] = []
    with np.errstate(all="ignore"):
        if pixel_spacing is not None:
            ps = np.asarray(pixel_spacing, dtype=np.float64).ravel()
            if ps.size != 2 or not np.all(np.isfinite(ps)) or np.any(ps <= 0):
                out.append(f"{tag('pixel_spacing', ps)}: needs two finite values > 0")
            elif np.any(ps < lo) or np.any(ps > hi):
                out.append(f"{tag('pixel_spacing', ps)}: outside {lo:g}..{hi:g} mm")
        if thickness is not None:
            t = float(thickness)
            if not np.isfinite(t) or t <= 0:
                out.append(f"{tag('thickness', t)}: needs a finite value > 0")
            elif not lo <= t <= hi:
                out.append(f"{tag('thickness', t)}: outside {lo:g}..{hi:g} mm")
        if orientation is not None:
            o = np.asarray(orientation, dtype=np.float64).ravel()
            if o.size != 6 or not np.all(np.isfinite(o)) or np.any(np.abs(o) > 1 + unit_tol):
                out.append(f"{tag('orientation', o)}: needs six finite direction cosines")
            else:
                r, c = o[:3], o[3:]
                if (abs(np.linalg.norm(r) - 1) > unit_tol or abs(np.linalg.norm(c) - 1) > unit_tol
                        or abs(float(r @ c)) > unit_tol):
                    out.append(f"{tag('orientation', o)}: row and column directions are not "
                               f"orthonormal (|r|={np.linalg.norm(r):.4f}, "
                               f"|c|={np.linalg.norm(c):.4f}, r.c={float(r @ c):.4f}; "
                               f"tolerance {unit_tol:g})")
        if position is not None:
            x = np.asarray(position, dtype=np.float64).ravel()
            if x.size != 3 or not np.all(np.isfinite(x)) or np.any(np.abs(x) > MAX_COORDINATE_MM):
                out.append(f"{tag('position', x)}: needs three finite coordinates within "
                           f"+-{MAX_COORDINATE_MM:g} mm")
        if trigger_time is not None:
            t = float(trigger_time)
            tlo, thi = TRIGGER_TIME_RANGE_MS
            if not np.isfinite(t) or not tlo <= t <= thi:
                out.append(f"{tag('trigger_time', t)}: needs a finite time within "
                           f"{tlo:g}..{thi:g} ms")
    return out


def check_geometry(study: Study, *, context: str = "") -> None:
    """A loaded study's geometry and timing, at the loaders' boundary.

    Pixel spacing and slice thickness (when given) finite and within
    PIXEL_SPACING_RANGE_MM; direction cosines finite and orthonormal within
    DIRECTION_TOL; origins finite; slice gaps > 0 and at most MAX_SLICE_GAP_MM; trigger
    times finite (NaN = unknown is allowed) within TRIGGER_TIME_RANGE_MS.
    Raises InvalidGeometryError naming the value (and ``context``: the file).
    """
    g = study.geometry
    names = {"pixel_spacing": "pixel spacing", "thickness": "slice thickness",
             "orientation": "direction cosines (row, column)", "position": "slice origin"}
    problems = geometry_problems(pixel_spacing=g.pixel_spacing, thickness=g.slice_thickness,
                                 orientation=np.r_[g.row_dir, g.col_dir], names=names)
    origins = np.asarray(g.origins, dtype=np.float64)
    for s in range(origins.shape[0]):
        p = geometry_problems(position=origins[s], names=names)
        if p:
            problems.append(f"slice {s}: {p[0]}")
            break
    if not problems:
        with np.errstate(all="ignore"):
            gaps = g.slice_gaps
        bad = np.flatnonzero(~np.isfinite(gaps) | (gaps > MAX_SLICE_GAP_MM))
        if bad.size:
            problems.append(f"slice gap {float(gaps[bad[0]]):g} mm between slices {bad[0]} and "
                            f"{bad[0] + 1}: needs a finite gap of at most {MAX_SLICE_GAP_MM:g} mm")
    t = np.asarray(study.trigger_times, dtype=np.float64)
    tlo, thi = TRIGGER_TIME_RANGE_MS
    with np.errstate(invalid="ignore"):
        bad_t = np.flatnonzero(np.isinf(t) | (np.isfinite(t) & ((t < tlo) | (t > thi))))
    if bad_t.size:
        problems.append(f"trigger time {t[bad_t[0]]:g} ms of phase {bad_t[0]}: needs a finite time "
                        f"within {tlo:g}..{thi:g} ms")
    if problems:
        raise InvalidGeometryError(
            f"{context}invalid geometry or timing: {fmt_list(problems, limit=3)}",
            hint="the header of the file is damaged or was written by a broken conversion; "
                 "re-export it")


def check_orientations(row_dirs: np.ndarray, col_dirs: np.ndarray, where: Sequence[str], *,
                       max_angle_deg: float = MAX_ORIENTATION_ANGLE_DEG,
                       context: str = "") -> None:
    """Every slice must have the same row and column directions as the first.

    row_dirs, col_dirs: [N, 3] float, unit vectors (DICOM ImageOrientationPatient).
    where:   [N] description of each slice for the message (position, file).
    Raises OrientationMismatchError naming the slices tilted by more than
    ``max_angle_deg`` degrees (normal or in-plane rotation).
    """
    row_dirs = np.asarray(row_dirs, dtype=np.float64).reshape(-1, 3)
    col_dirs = np.asarray(col_dirs, dtype=np.float64).reshape(-1, 3)
    if row_dirs.shape[0] < 2:
        return
    normals = np.cross(row_dirs, col_dirs)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    rows = row_dirs / np.linalg.norm(row_dirs, axis=1, keepdims=True)
    cos_tol = np.cos(np.radians(max_angle_deg))
    # reference: the most common orientation (the first slice may be the odd one)
    agree = (((normals @ normals.T) >= cos_tol) & ((rows @ rows.T) >= cos_tol)).sum(axis=1)
    ref = int(np.argmax(agree))
    a_n = np.degrees(np.arccos(np.clip(normals @ normals[ref], -1.0, 1.0)))
    a_r = np.degrees(np.arccos(np.clip(rows @ rows[ref], -1.0, 1.0)))
    bad: dict[str, list] = {}   # one entry per distinct place (several phases of one slice)
    for i in np.flatnonzero((a_n > max_angle_deg) | (a_r > max_angle_deg)):
        what = (f"tilted {a_n[i]:.1f} deg" if a_n[i] > max_angle_deg
                else f"rotated in plane by {a_r[i]:.1f} deg")
        key = f"{where[i]} ({what}"
        bad.setdefault(key, []).append(i)
    bad = [k + (f", {len(v)} images" if len(v) > 1 else "") + ")" for k, v in bad.items()]
    if bad:
        raise OrientationMismatchError(
            f"{context}slices with different orientations: {fmt_list(bad)} "
            f"differ from the others ({where[ref]}) by more than {max_angle_deg:g} deg; "
            "a short-axis stack needs parallel slices",
            hint="remove the slices that do not belong to the stack (e.g. a re-planned or "
                 "long-axis image saved into the same series), or pick another series with --series")


def check_in_plane(shapes: Sequence[tuple[int, int]], pixel_spacings: Sequence[tuple[float, float]],
                   where: Sequence[str], *, rtol: float = PIXEL_SPACING_RTOL,
                   context: str = "") -> None:
    """Every slice must have the same matrix (rows, columns) and pixel spacing (mm).

    shapes: [N] (rows, columns); pixel_spacings: [N] (between rows, between columns) mm.
    Raises GeometryMismatchError naming the slices that differ from the most common.
    """
    if len(shapes) < 2:
        return
    shapes = [tuple(int(v) for v in s) for s in shapes]
    values, counts = np.unique(np.array(shapes), axis=0, return_counts=True)
    ref_shape = tuple(int(v) for v in values[int(np.argmax(counts))])
    bad = [f"{where[i]} ({s[0]}x{s[1]})" for i, s in enumerate(shapes) if s != ref_shape]
    if bad:
        raise GeometryMismatchError(
            f"{context}slices with different matrix sizes: {fmt_list(bad)} vs "
            f"{ref_shape[0]}x{ref_shape[1]} for the others",
            hint="the stack must be acquired with one matrix; pick another series with --series "
                 "or remove the odd images")
    ps = np.asarray(pixel_spacings, dtype=np.float64).reshape(-1, 2)
    ref = np.median(ps, axis=0)
    off = np.any(np.abs(ps - ref) > rtol * ref, axis=1)
    if np.any(off):
        bad = [f"{where[i]} ({ps[i, 0]:g} x {ps[i, 1]:g} mm)" for i in np.flatnonzero(off)]
        raise GeometryMismatchError(
            f"{context}slices with different pixel spacings: {fmt_list(bad)} vs "
            f"{ref[0]:g} x {ref[1]:g} mm for the others",
            hint="the stack must share one pixel spacing; remove the odd images or pick "
                 "another series with --series")


def check_phase_counts(counts: Sequence[int], positions: Sequence[float], *,
                       context: str = "", note: str = "") -> None:
    """Every slice position must hold the same number of phases.

    counts: [S] phases per slice; positions: [S] mm along the normal.
    ``note`` is appended to the message (e.g. files skipped as unreadable).
    """
    counts = [int(c) for c in counts]
    if len(set(counts)) <= 1:
        return
    values, freq = np.unique(counts, return_counts=True)
    common = int(values[int(np.argmax(freq))])
    bad = [f"{fmt_pos(z)}: {c}" for z, c in zip(positions, counts) if c != common]
    raise PhaseCountMismatchError(
        f"{context}unequal phase counts per slice: {fmt_list(bad)} phases, "
        f"while {int(freq.max())} of {len(counts)} slices have {common}{note}",
        hint="every slice of a cine stack needs the same number of phases: look for "
             "missing, unreadable or repeated acquisitions at those positions")


def check_slice_spacing(positions: np.ndarray, *, max_gap_ratio: float = MAX_GAP_RATIO,
                        irregular_ratio: float = IRREGULAR_GAP_RATIO,
                        position_tol_mm: float = POSITION_TOL_MM,
                        context: str = "") -> list[str]:
    """Slice positions must increase, be distinct and evenly spaced (no missing slice).

    positions: [S] float mm along the normal, sorted increasing.
    Returns warnings (irregular but acceptable spacing). Raises DuplicatePositionError
    for two slices closer than ``position_tol_mm`` and MissingSliceError for a gap larger
    than ``max_gap_ratio`` times the typical (lower-median) spacing.
    """
    z = np.asarray(positions, dtype=np.float64).ravel()
    if z.size < 2:
        return []
    gaps = np.diff(z)
    if np.any(gaps < -position_tol_mm):
        raise InvalidStudyError(f"{context}slice positions are not sorted along the normal: "
                                f"{fmt_list([fmt_pos(v) for v in z])}")
    dup = np.flatnonzero(np.abs(gaps) <= position_tol_mm)
    if dup.size:
        raise DuplicatePositionError(
            f"{context}duplicate slice positions: two slices at {fmt_pos(z[dup[0]])}"
            + (f" (and {dup.size - 1} more pairs)" if dup.size > 1 else ""),
            hint="the stack holds the same slice twice (a repeated acquisition?): remove one")
    if z.size < 3:
        return []
    ref = lower_median(gaps)
    big = np.flatnonzero(gaps > max_gap_ratio * ref)
    if big.size:
        parts = []
        for k in big:
            n_missing = max(1, int(round(gaps[k] / ref)) - 1)
            parts.append(f"{gaps[k]:.2f} mm between {fmt_pos(z[k])} and {fmt_pos(z[k + 1])} "
                         f"(~{n_missing} slice{'s' if n_missing > 1 else ''} missing around "
                         f"{fmt_pos(0.5 * (z[k] + z[k + 1]))})")
        raise MissingSliceError(
            f"{context}missing slice: gap of {fmt_list(parts)}, while the other slices are "
            f"{ref:.2f} mm apart",
            hint="export the complete short-axis stack (every slice position at every phase)")
    warnings = []
    off = np.flatnonzero(np.abs(gaps - ref) > irregular_ratio * ref)
    if off.size:
        warnings.append(
            f"{context}irregular slice spacing: gaps of "
            f"{fmt_list([f'{gaps[k]:.2f} mm at {fmt_pos(z[k])}' for k in off])} "
            f"vs {ref:.2f} mm typical")
    return warnings


def check_finite(images: np.ndarray, *, context: str = "") -> None:
    """images: [P, S, H, W] float. Raises NonFiniteError naming the first bad phase/slice."""
    bad = ~np.isfinite(images)
    if not bad.any():
        return
    per = bad.reshape(bad.shape[0], bad.shape[1], -1).sum(axis=2)
    where = [f"phase {p}, slice {s}: {per[p, s]}" for p, s in zip(*np.nonzero(per))]
    raise NonFiniteError(
        f"{context}{int(bad.sum())} NaN or infinite pixel values ({fmt_list(where)})",
        hint="the image file is damaged or was written by a broken conversion; re-export it")


def check_label_values(labels: np.ndarray, *, context: str = "") -> None:
    """labels: [P, S, H, W] integer, project convention. Raises LabelError for unknown values."""
    values = np.unique(labels)
    unknown = [int(v) for v in values if int(v) not in LABELS]
    if unknown:
        raise LabelError(
            f"{context}label values {unknown} are not in the project's convention "
            f"({', '.join(f'{k} {v}' for k, v in LABELS.items())})",
            hint="ACDC label files (1 RV, 2 MYO, 3 LV) are remapped when loaded as an ACDC "
                 "patient folder or with label_convention='acdc'")


def validate_study(study: Study, *, max_gap_ratio: float = MAX_GAP_RATIO,
                   position_tol_mm: float = POSITION_TOL_MM) -> Study:
    """Checks every loader's result: geometry and timing (:func:`check_geometry`), finite
    pixels, distinct, sorted and evenly spaced slices (no missing slice), label values,
    phase bookkeeping. Adds non-fatal findings to ``study.warnings`` (and logs them).
    Returns the same study.
    """
    ctx = f"{study.source}: " if study.source else ""
    check_geometry(study, context=ctx)
    check_finite(study.images, context=ctx)
    for w in check_slice_spacing(study.geometry.positions, max_gap_ratio=max_gap_ratio,
                                 position_tol_mm=position_tol_mm, context=ctx):
        add_warning(study, w)
    if study.labels is not None:
        check_label_values(study.labels, context=ctx)
    P = study.n_phases
    if len(study.phase_ids) != P:
        raise InvalidStudyError(f"{ctx}{len(study.phase_ids)} phase ids for {P} phases")
    for name in ("ed_phase", "es_phase"):
        v = getattr(study, name)
        if v is not None and not 0 <= v < P:
            raise InvalidStudyError(f"{ctx}{name}={v} is outside the {P} phases")
    return study


def add_warning(study: Study, message: str) -> None:
    """Record a non-fatal finding in ``study.warnings`` and log it at WARNING."""
    if message not in study.warnings:
        study.warnings.append(message)
        log.warning("%s", message)
