"""Write a :class:`~deeprecon.runtime.result.Result` into an output folder, atomically.

Everything is written into a hidden staging folder beside the target
(``PARENT/.{name}.partial-{pid}-{random}``); ``outputs.json``, the manifest of every other
file with its SHA-256 and size, is written last; then the staging folder is renamed onto
the target. A reader therefore sees either no folder, the previous complete one, or the
new complete one: never a half-written folder. See :func:`staging_dir` for the rules
about existing folders, interrupted runs and signals.

Layout (``FF`` = the source's frame number of a phase, ``Study.phase_ids``, two digits or
more; NIfTIs are 3D, one per phase, in patient space with the study's orientation; labels
are 0 background, 1 LV cavity, 2 LV myocardium, 3 RV cavity)::

    outputs.json                     manifest (written last): format, schema, kind, created,
                                     files {relative path: {sha256, bytes}}
    run_report.json                  versions, platform, bundle (name, SHA-256, preset,
                                     provenance), backend, device, options, per-stage
                                     timings, inversion summary, warnings, plausibility
                                     flags of the measures, study
    report.html                      offline HTML report of the pictures below (no network,
                                     no script): see :mod:`deeprecon.runtime.report`
    measures.csv                     one row per source ("native", "hr"): source, the nine
                                     ukbb_cardiac columns, ED frame, ES frame (frame numbers)
    measures.json                    the full measures per source (ED/ES indices, voxel
                                     volume, volume curves), the frame numbers, the
                                     plausibility flags and "flagged": {source: {measure:
                                     [flag codes]}}
    segmentation/seg_frameFF.nii.gz  labels on the native grid (uint8, study geometry)
    hr/image_frameFF.nii.gz          high-resolution image (float32, the study's intensity
                                     units: the bundle's normalisation undone)
    hr/labels_frameFF.nii.gz         high-resolution labels (uint8); in-plane the model grid,
                                     slice spacing = native spacing / interp
    qc/volume_curves.png             LV and RV cavity volume over the phases (native, hr)
    qc/overlay_native_N.png          native slices with the segmentation's contours (rows ED,
                                     ES; up to 8 slices a picture, N = 1, 2, ...)
    qc/recon_model_N.png             model grid: input x and G(w*), Seg(G(w*)) contours
    qc/long_axis.png                 vertical and horizontal cuts through the LV centre of
                                     the input stack and the high-resolution volume

For ``kind == "motion_adaptation"`` (``result.extra`` holds the ``source`` and ``target``
Results) the arrays are the adapted sequence and ``result.study`` is the adapted study
(:func:`~deeprecon.runtime.motion.adapt_motion` fills its images with G(w) mapped back to
the source's native grid, its frame numbers with the target's); these are added::

    adapted/image_frameFF.nii.gz     the adapted images on the native grid (float32, the
                                     source's intensity units, study geometry)
    qc/volume_curves_motion.png      LV/RV curves of source, target and adapted sequence
                                     over the cycle (phase index / number of phases)

measures.csv then has the rows "source/native", "source/hr", "target/native",
"target/hr" too, and the model-grid pictures show G(w) only (there is no input x).

Staging folders are recognised as stale by their pid, which is only meaningful on this
machine: two machines must not write into the same parent folder at the same time.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import secrets
import shutil
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from .errors import UsageError
from .measures import MEASURE_COLUMNS
from .result import Result
from .study import Geometry, volume_to_sitk

log = logging.getLogger(__name__)

OUTPUTS_FORMAT = "deeprecon-outputs"
OUTPUTS_SCHEMA = 1
RUN_REPORT_SCHEMA = 1
MANIFEST_NAME = "outputs.json"
MOTION_KIND = "motion_adaptation"
#: slices per overlay picture (more go into further pictures)
SLICES_PER_PICTURE = 8

#: progress callback: (stage, done, total), as the backends' ``Progress``
Progress = Optional[Callable[[str, int, int], None]]

_PARTIAL = ".partial-"
_TRASH = ".old-"
_CSV_EXTRA = ("ED frame", "ES frame")


# ============================================================================ staging
def _signals_to_block() -> set:
    return {getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n)}


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Defer SIGTERM, SIGINT and SIGHUP while a few renames or a cleanup run (so that a
    signal cannot leave them half done); a signal that arrives meanwhile is delivered
    when the block ends. A no-op where the platform has no signal masks."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _signals_to_block())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exit_on_signal(signum, frame) -> None:
    # SystemExit unwinds the stack, so every staging folder's cleanup runs; 128 + n is
    # the shell's status of a process ended by signal n
    raise SystemExit(128 + signum)


def install_signal_cleanup() -> bool:
    """Make SIGTERM (and SIGHUP) raise ``SystemExit(128 + signum)`` in the main thread for
    the rest of the process, so that a terminated run unwinds and every staging folder is
    removed (SIGINT already raises KeyboardInterrupt). For the CLI, once at start-up.

    Only replaces the default handlers (a handler someone else installed is kept).
    Returns True when it installed at least one handler; False off the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    installed = False
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _exit_on_signal)
            installed = True
    return installed


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While active (main thread, default handler only): SIGTERM raises SystemExit(143)."""
    sig = getattr(signal, "SIGTERM", None)
    if (sig is None or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(sig) != signal.SIG_DFL):
        yield
        return
    signal.signal(sig, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(sig, signal.SIG_DFL)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # EPERM: it exists, owned by someone else
        return True
    return True


def _sibling_pid(entry: str, prefix: str) -> int | None:
    """The pid in ``{prefix}{pid}-{random}``, or None when ``entry`` is not one."""
    if not entry.startswith(prefix):
        return None
    pid, _, rest = entry[len(prefix):].partition("-")
    return int(pid) if pid.isdigit() and rest else None


def remove_stale_staging(out_dir: str | Path) -> list[Path]:
    """Remove the staging (``.{name}.partial-{pid}-*``) and trash (``.{name}.old-{pid}-*``)
    siblings of ``out_dir`` left by runs that were killed (their pid no longer exists).

    Folders of live processes (including this one) are kept: a concurrent run may still
    be writing them. Returns the folders removed.
    """
    out = Path(out_dir)
    parent = out.parent
    if not parent.is_dir():
        return []
    removed = []
    prefixes = (f".{out.name}{_PARTIAL}", f".{out.name}{_TRASH}")
    for entry in parent.iterdir():
        for prefix in prefixes:
            pid = _sibling_pid(entry.name, prefix)
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            log.info("removed %s, left by an interrupted run (pid %d)", entry, pid)
            removed.append(entry)
    return removed


def is_outputs_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :func:`write_outputs` (or
    :func:`staging_dir`): it holds an ``outputs.json`` of this format."""
    manifest = Path(path) / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == OUTPUTS_FORMAT


def _check_target(out: Path, *, overwrite: bool) -> None:
    """Refuse a target that must not be replaced (UsageError, nothing touched)."""
    if out.is_symlink():
        raise UsageError(f"output folder {out} is a symbolic link",
                         hint="give the folder the link points to")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder",
                         hint="choose another output folder")
    if not any(out.iterdir()):
        return
    if not is_outputs_folder(out):
        raise UsageError(
            f"output folder {out} is not empty and does not hold deeprecon outputs "
            f"(no {MANIFEST_NAME} of format {OUTPUTS_FORMAT!r}); nothing was written",
            hint="choose a new or empty folder; deeprecon only replaces its own output folders")
    if not overwrite:
        raise UsageError(f"output folder {out} already holds deeprecon outputs",
                         hint="allow overwriting (--overwrite) or choose another folder")


def _resolve_out(out_dir: str | Path) -> Path:
    out = Path(out_dir).expanduser()
    if not out.name or out.name in (".", ".."):
        raise UsageError(f"{str(out_dir)!r} is not a usable output folder name",
                         hint="name the output folder itself, e.g. out/case001")
    return out.parent.resolve() / out.name


def check_output_dir(out_dir: str | Path, *, overwrite: bool = True) -> Path:
    """Check, before any work, that :func:`write_outputs` may write ``out_dir``: it does
    not exist, is an empty folder, or is a previous deeprecon output folder (and
    ``overwrite``). Raises UsageError otherwise (nothing is touched); returns the
    absolute path (parent folder resolved)."""
    out = _resolve_out(out_dir)
    _check_target(out, overwrite=overwrite)
    return out


def _new_sibling(parent: Path, prefix: str) -> Path:
    """Create ``parent/{prefix}{pid}-{random}`` (mode 0o777 minus the umask: the final
    folder gets the usual permissions, unlike mkdtemp's 0o700)."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | Path, *, fsync: bool = False) -> tuple[str, int]:
    """(hex SHA-256, size in bytes) of a file, read in 1 MiB blocks; with ``fsync`` the
    file's data is also flushed to disk."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
        if fsync:
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())
    return h.hexdigest(), n


def write_manifest(folder: str | Path, *, kind: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``outputs.json``: every other file under ``folder`` (relative POSIX paths,
    sorted) with its SHA-256 and size; the files are flushed to disk first. Symbolic
    links and special files are refused (an output folder holds plain files only)."""
    folder = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise UsageError(f"{rel} in the output folder is not a plain file or folder")
        if path.is_file():
            digest, size = sha256_file(path, fsync=True)
            files[rel] = {"sha256": digest, "bytes": size}
    manifest = {"format": OUTPUTS_FORMAT, "schema": OUTPUTS_SCHEMA, "kind": kind,
                "created": _now(), **dict(extra or {}), "files": files}
    path = folder / MANIFEST_NAME
    with open(path, "w") as f:
        f.write(json.dumps(_jsonable(manifest), indent=2, allow_nan=False))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)
    return path


def verify_outputs(out_dir: str | Path) -> dict[str, Any]:
    """Check an output folder against its manifest: every listed file exists with its
    SHA-256 and size, and no other file is present. Returns the manifest; raises
    UsageError naming the first difference."""
    out = Path(out_dir)
    if not is_outputs_folder(out):
        raise UsageError(f"{out} is not a deeprecon output folder (no valid {MANIFEST_NAME})")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    listed = manifest.get("files", {})
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    present.discard(MANIFEST_NAME)
    if present - set(listed):
        raise UsageError(f"{out}: files not in the manifest: {sorted(present - set(listed))}")
    for rel, entry in listed.items():
        if rel not in present:
            raise UsageError(f"{out}: {rel} is listed in the manifest but missing")
        digest, size = sha256_file(out / rel)
        if digest != entry.get("sha256") or size != entry.get("bytes"):
            raise UsageError(f"{out}: {rel} differs from the manifest (SHA-256 or size)")
    return manifest


def _commit(stage: Path, out: Path, *, overwrite: bool) -> None:
    """Move the complete staging folder onto ``out`` (see :func:`staging_dir`)."""
    _check_target(out, overwrite=overwrite)
    if out.is_dir() and any(out.iterdir()):
        trash = _new_sibling(out.parent, f".{out.name}{_TRASH}")
        os.replace(out, trash / "previous")
        try:
            os.replace(stage, out)
        except BaseException:
            os.replace(trash / "previous", out)   # put the previous outputs back
            trash.rmdir()
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(stage, out)   # rename(2) replaces an empty folder atomically
    _fsync_dir(out.parent)


@contextlib.contextmanager
def staging_dir(out_dir: str | Path, *, overwrite: bool = True, kind: str | None = None,
                manifest_extra: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """A hidden staging folder for ``out_dir``, moved onto it when the block ends.

    Usage::

        with staging_dir(out) as stage:
            ...write files under stage...
        # here out holds them, plus outputs.json (the manifest, written last)

    Rules:

    - ``out_dir`` not existing, or an empty folder: the staging folder is renamed onto it.
    - ``out_dir`` a previous deeprecon output folder (an ``outputs.json`` of this format):
      replaced when ``overwrite`` (the old folder is renamed aside to a hidden
      ``.{name}.old-*`` sibling, the new one renamed in, the old one deleted), else
      UsageError. Anything else non-empty (user files): UsageError, nothing is touched.
      The check runs before anything is written and again just before the rename.
    - Staging and trash siblings left by killed runs (pid gone) are removed first
      (:func:`remove_stale_staging`).
    - On any exception, KeyboardInterrupt included, the staging folder is removed and the
      exception re-raised; ``out_dir`` is left as it was. In the main thread, while the
      block runs, SIGTERM raises ``SystemExit(143)`` (when no other handler is installed)
      so a terminated run cleans up too. Only SIGKILL (or a power cut) can leave a
      staging folder behind, which the next run into the same parent removes.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    stage: Path | None = None
    with _sigterm_raises():
        try:
            with _signals_blocked():
                stage = _new_sibling(out.parent, f".{out.name}{_PARTIAL}")
            log.debug("staging outputs in %s", stage)
            yield stage
            write_manifest(stage, kind=kind, extra=manifest_extra)
            with _signals_blocked():
                _commit(stage, out, overwrite=overwrite)
        except BaseException:
            if stage is not None:
                with _signals_blocked():
                    shutil.rmtree(stage, ignore_errors=True)
            raise


# ============================================================================ helpers
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, tuples to lists, NaN/inf to None,
    paths and dataclasses to str/dict, anything else unknown to its str()."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    return str(obj)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


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


def _frame_tag(frame: int) -> str:
    return f"frame{frame:02d}"


def _phase_ed_es(result: Result) -> list[tuple[int, str]]:
    """(index into the P phases, row name) of ED and ES (ED alone when they coincide or
    ES is unknown; phase 0 when neither is known)."""
    ids = frame_ids(result)
    ed, es = result.ed_index, result.es_index
    rows = []
    if ed is not None and 0 <= ed < result.n_phases:
        rows.append((int(ed), f"ED (frame {ids[ed]})"))
    if es is not None and 0 <= es < result.n_phases and es != ed:
        rows.append((int(es), f"ES (frame {ids[es]})"))
    return rows or [(0, f"frame {ids[0]}")]


def _slice_spacing(geometry: Geometry, fallback: float | None) -> float | None:
    """The ``slice_spacing`` to give :func:`volume_to_sitk`: None (the geometry's own
    centre-to-centre spacing) for a stack, ``fallback`` (e.g. the thickness; else 1 mm)
    for a single slice, whose geometry has no spacing."""
    s = geometry.slice_spacing
    if math.isfinite(s) and s > 0:
        return None           # volume_to_sitk takes it from the geometry
    return fallback if fallback is not None and fallback > 0 else 1.0


def to_study_intensity(result: Result, images: np.ndarray, slice_index: np.ndarray
                       ) -> tuple[np.ndarray, bool]:
    """Undo the bundle's intensity normalisation of model-grid images.

    images:      [P, Z, R, R] float32 in the transform's ``out_range`` (P = the Result's
                 phases);
    slice_index: [Z] the (fractional) native slice index of each of the Z slices, for a
                 per-slice normalisation (``intensity_scope="slice"``: interpolated).
    Returns (float32 images, True) in the study's intensity units, or (the images
    unchanged, False) when the transform's parameters do not fit the Result's phases.
    """
    t = result.transform
    lo = np.asarray(t.intensity_low, dtype=np.float64)
    hi = np.asarray(t.intensity_high, dtype=np.float64)
    P = images.shape[0]

    def per_phase(a: np.ndarray) -> np.ndarray | None:
        if a.shape[0] == 1:
            return np.repeat(a, P, axis=0)
        if a.shape[0] == result.study.n_phases and max(result.phases, default=-1) < a.shape[0]:
            return a[list(result.phases)]
        return a if a.shape[0] == P else None

    lo_p, hi_p = per_phase(lo), per_phase(hi)
    if lo_p is None or hi_p is None:
        return images, False
    if lo_p.shape[1] > 1:
        S = lo_p.shape[1]
        xs = np.arange(S, dtype=np.float64)
        lo_p = np.stack([np.interp(slice_index, xs, lo_p[p]) for p in range(P)])
        hi_p = np.stack([np.interp(slice_index, xs, hi_p[p]) for p in range(P)])
    a, b = t.out_range
    lo_b, hi_b = lo_p[:, :, None, None], hi_p[:, :, None, None]   # [P, 1|Z, 1, 1]
    raw = lo_b + (np.asarray(images, dtype=np.float64) - a) / (b - a) * (hi_b - lo_b)
    return raw.astype(np.float32), True


def _write_nifti(img, path: Path) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


# ============================================================================ writers
# Each writer takes (result, stage folder) and writes its files under the folder.

def _write_segmentation(result: Result, stage: Path) -> None:
    """segmentation/seg_frameFF.nii.gz: native-grid labels, one 3D file per phase."""
    study = result.study
    labels = np.asarray(result.labels)
    if labels.shape != (result.n_phases,) + study.images.shape[1:]:
        raise UsageError(f"result.labels {labels.shape} must be [P={result.n_phases}, "
                         f"S, H, W] = {(result.n_phases,) + study.images.shape[1:]}")
    sz = _slice_spacing(study.geometry, study.geometry.slice_thickness)
    for p, frame in enumerate(frame_ids(result)):
        img = study.to_sitk(labels[p].astype(np.uint8, copy=False), slice_spacing=sz)
        _write_nifti(img, stage / "segmentation" / f"seg_{_frame_tag(frame)}.nii.gz")


def _write_hr(result: Result, stage: Path) -> None:
    """hr/image_frameFF.nii.gz and hr/labels_frameFF.nii.gz in ``result.hr_geometry``."""
    g = result.hr_geometry
    images = np.asarray(result.hr_images)
    labels = np.asarray(result.hr_labels)
    if images.ndim != 4 or images.shape[0] != result.n_phases or labels.shape != images.shape \
            or images.shape[1] != g.n_slices:
        raise UsageError(f"hr_images {images.shape} and hr_labels {labels.shape} must be "
                         f"[P={result.n_phases}, S_hr={g.n_slices}, R, R]")
    interp = max(1, int(result.interp))
    raw, ok = to_study_intensity(result, images, np.arange(g.n_slices) / interp)
    if not ok:
        log.warning("the transform's intensity parameters do not fit the phases: the "
                    "high-resolution images are written in the normalised range")
    thickness = result.study.geometry.slice_thickness
    sz = _slice_spacing(g, thickness / interp if thickness else None)
    for p, frame in enumerate(frame_ids(result)):
        tag = _frame_tag(frame)
        _write_nifti(volume_to_sitk(raw[p], g, slice_spacing=sz), stage / "hr" / f"image_{tag}.nii.gz")
        _write_nifti(volume_to_sitk(labels[p].astype(np.uint8, copy=False), g, slice_spacing=sz),
                     stage / "hr" / f"labels_{tag}.nii.gz")


def _write_adapted(result: Result, stage: Path) -> None:
    """adapted/image_frameFF.nii.gz: the adapted images (the adapted study's, on the
    native grid), one 3D file per phase."""
    study = result.study
    if max(result.phases, default=-1) >= study.n_phases:
        raise UsageError(f"phases {list(result.phases)} outside the adapted study's "
                         f"{study.n_phases} phases")
    sz = _slice_spacing(study.geometry, study.geometry.slice_thickness)
    for p, frame in zip(result.phases, frame_ids(result)):
        img = study.to_sitk(study.images[p].astype(np.float32, copy=False), slice_spacing=sz)
        _write_nifti(img, stage / "adapted" / f"image_{_frame_tag(frame)}.nii.gz")


def _measure_rows(result: Result, prefix: str = "") -> list[dict[str, Any]]:
    ids = frame_ids(result)
    rows = []
    order = [k for k in ("native", "hr") if k in result.measures]
    order += [k for k in result.measures if k not in order]
    for source in order:
        m = result.measures[source]
        row: dict[str, Any] = {"source": prefix + source}
        for col in MEASURE_COLUMNS:
            row[col] = m.get(col)
        for col, key in zip(_CSV_EXTRA, ("ed_phase", "es_phase")):
            idx = m.get(key)
            row[col] = ids[idx] if idx is not None and 0 <= idx < len(ids) else None
        rows.append(row)
    return rows


def _csv_value(v: Any) -> str:
    """Full-precision numbers (repr round-trips a float); empty for None and NaN."""
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v)) if math.isfinite(v) else ""
    return str(v)


def flagged_measures(result: Result) -> dict[str, dict[str, list[str]]]:
    """{source: {measure: [flag codes]}} of the Result's plausibility flags (the
    "flagged" entry of measures.json): which measures not to trust without a look."""
    out: dict[str, dict[str, list[str]]] = {}
    for f in result.plausibility:
        codes = out.setdefault(str(f.get("source")), {}).setdefault(str(f.get("measure")), [])
        if f.get("code") not in codes:
            codes.append(f.get("code"))
    return out


def _write_measures(result: Result, stage: Path) -> None:
    """measures.csv (ukbb_cardiac columns) and measures.json."""
    rows = _measure_rows(result)
    extra = result.extra if result.kind == MOTION_KIND else {}
    for name in ("source", "target"):
        if isinstance(extra.get(name), Result):
            rows += _measure_rows(extra[name], prefix=f"{name}/")
    header = ["source", *MEASURE_COLUMNS, *_CSV_EXTRA]
    with open(stage / "measures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([_csv_value(row[c]) for c in header])
    data: dict[str, Any] = {
        "columns": list(MEASURE_COLUMNS),
        "frame_ids": frame_ids(result),
        "ed_es_index_of": "the reconstructed phases (see frame_ids)",
        "measures": result.measures,
        "flagged": flagged_measures(result),
        "plausibility": list(result.plausibility),
    }
    for name in ("source", "target"):
        if isinstance(extra.get(name), Result):
            data[name] = {"frame_ids": frame_ids(extra[name]), "measures": extra[name].measures,
                          "flagged": flagged_measures(extra[name]),
                          "plausibility": list(extra[name].plausibility)}
    _write_json(stage / "measures.json", data)


def _curve_series(result: Result, *, cycle: bool, name_prefix: str = "",
                  keys: tuple[str, ...] = ("native", "hr")) -> list:
    from .qc import VolumeCurve

    names = {"native": "native", "hr": "high resolution"}
    P = result.n_phases
    x = (np.arange(P) / P) if cycle else np.asarray(frame_ids(result), dtype=np.float64)
    out = []
    for k in keys:
        m = result.measures.get(k)
        if not m or "volume_curves_ml" not in m:
            continue
        out.append(VolumeCurve(f"{name_prefix}{names.get(k, k)}", m["volume_curves_ml"], x,
                               m.get("ed_phase"), m.get("es_phase")))
    return out


def _slice_groups(labels: np.ndarray, phases: list[int]) -> list[list[int]]:
    """The labelled slices (all slices without labels), in groups of at most
    SLICES_PER_PICTURE, balanced (10 slices -> 5 + 5)."""
    from .qc import pick_slices

    S = labels.shape[1]
    slices = pick_slices(labels, S, phases=phases, n_total=S)
    n = max(1, math.ceil(len(slices) / SLICES_PER_PICTURE))
    return [list(g) for g in np.array_split(np.asarray(slices), n) if len(g)]


def _write_pictures(result: Result, stage: Path) -> dict[str, Any]:
    """qc/*.png; returns {picture key: relative path or list of them} for the report."""
    from .qc import CutStack, save_long_axis_cuts, save_montage, save_volume_curves

    qc = stage / "qc"
    qc.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, Any] = {}
    motion = result.kind == MOTION_KIND
    rows = _phase_ed_es(result)
    phases = [p for p, _ in rows]
    names = [n for _, n in rows]

    curves = _curve_series(result, cycle=False)
    if curves:
        save_volume_curves(qc / "volume_curves.png", curves, xlabel="frame",
                           title="adapted sequence" if motion else None)
        pictures["volume_curves"] = "qc/volume_curves.png"
    if motion:
        series = []
        for key in ("source", "target"):
            other = result.extra.get(key)
            if isinstance(other, Result):
                series += _curve_series(other, cycle=True, name_prefix=f"{key} ", keys=("native",))
        series += _curve_series(result, cycle=True, name_prefix="adapted ", keys=("native",))
        if series:
            save_volume_curves(qc / "volume_curves_motion.png", series,
                               xlabel="phase index / number of phases",
                               title="motion adaptation: source, target and adapted")
            pictures["volume_curves_motion"] = "qc/volume_curves_motion.png"

    model_labels = np.asarray(result.model_labels)
    mg = result.model_geometry()
    groups = _slice_groups(model_labels, phases)
    if max(result.phases, default=-1) < result.study.n_phases:
        native_images = result.study.images[list(result.phases)]
        native_groups = _slice_groups(np.asarray(result.labels), phases)
        paths = []
        for i, sl in enumerate(native_groups, start=1):
            rel = f"qc/overlay_native_{i}.png"
            save_montage(stage / rel, native_images, result.labels, phases=phases,
                         phase_names=names, slices=sl,
                         pixel_spacing=result.study.geometry.pixel_spacing,
                         title=f"native grid, slices {sl[0]}-{sl[-1]}: segmentation contours")
            paths.append(rel)
        pictures["overlay_native"] = paths
    # model grid: (input x and) G(w*) per ED/ES row, with Seg(G(w*)) contours
    stack_imgs, stack_labs, row_names = [], [], []
    for p, n in rows:
        if not motion:
            stack_imgs.append(result.model_images[p])
            stack_labs.append(model_labels[p])
            row_names.append(f"{n}: input x")
        stack_imgs.append(result.model_recon[p])
        stack_labs.append(model_labels[p])
        row_names.append(f"{n}: G(w)" if motion else f"{n}: G(w*)")
    stack_imgs, stack_labs = np.stack(stack_imgs), np.stack(stack_labs)
    paths = []
    for i, sl in enumerate(groups, start=1):
        rel = f"qc/recon_model_{i}.png"
        save_montage(stage / rel, stack_imgs, stack_labs, phases=list(range(len(row_names))),
                     phase_names=row_names, slices=sl, pixel_spacing=mg.pixel_spacing,
                     title=(f"model grid, slices {sl[0]}-{sl[-1]}: "
                            + ("adapted G(w)" if motion else "input x and G(w*)")
                            + ", Seg contours"))
        paths.append(rel)
    pictures["recon_model"] = paths

    first = CutStack(result.model_recon if motion else result.model_images, model_labels,
                     mg.positions, ("adapted, native slices" if motion else
                                    f"input ({mg.slice_spacing:.3g} mm)" if mg.n_slices > 1
                                    else "input"))
    hr = CutStack(result.hr_images, result.hr_labels, result.hr_geometry.positions,
                  f"high resolution (x{result.interp})")
    stacks = [first, hr] if result.hr_geometry.n_slices > 1 or mg.n_slices > 1 else [hr]
    save_long_axis_cuts(qc / "long_axis.png", stacks, pixel_spacing=result.hr_geometry.pixel_spacing,
                        phases=phases, phase_names=names,
                        title="long-axis-like cuts through the LV centre")
    pictures["long_axis"] = "qc/long_axis.png"
    return pictures


# ============================================================================ run report
def _versions() -> dict[str, str | None]:
    """Versions of the software involved; frameworks only when this process imported
    them (the report says what ran, and never imports torch just to ask)."""
    from . import __version__

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


def all_warnings(result: Result) -> list[str]:
    """The Result's warnings then the study's, each once, in order."""
    seen: dict[str, None] = {}
    for w in list(result.warnings) + list(result.study.warnings):
        seen.setdefault(str(w), None)
    return list(seen)


def run_report(result: Result, *, created: str | None = None,
               outputs_s: float | None = None) -> dict[str, Any]:
    """The dict written as run_report.json (JSON-serialisable after :func:`_jsonable`)."""
    g = result.hr_geometry
    report: dict[str, Any] = {
        "schema": RUN_REPORT_SCHEMA,
        "kind": result.kind,
        "created": created or _now(),
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


# ============================================================================ entry point
def write_outputs(result: Result, out_dir: str | Path, *, overwrite: bool = True,
                  progress: Progress = None) -> Path:
    """Write every output of ``result`` into ``out_dir`` atomically (layout: see the
    module docstring; staging and replacement rules: :func:`staging_dir`).

    overwrite: replace ``out_dir`` when it is a previous deeprecon output folder (a
               non-empty folder of anything else is always refused with UsageError);
    progress:  called as ``progress("outputs", done, total)`` after each step.
    Returns the output folder's path. Raises UsageError for a folder that must not be
    replaced or a Result whose arrays do not fit its study; any error leaves ``out_dir``
    as it was and no staging folder behind.
    """
    from .report import write_report

    t0 = time.perf_counter()
    created = _now()
    steps: list[tuple[str, Callable[[Result, Path], Any]]] = [
        ("segmentation", _write_segmentation), ("hr", _write_hr)]
    if result.kind == MOTION_KIND:
        steps.append(("adapted", _write_adapted))
    steps += [("measures", _write_measures), ("pictures", _write_pictures)]
    total = len(steps) + 3
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("outputs", done, total)

    target = Path(out_dir)
    with staging_dir(target, overwrite=overwrite, kind=result.kind,
                     manifest_extra={"run_report": "run_report.json"}) as stage:
        pictures: dict[str, Any] = {}
        for name, writer in steps:
            out = writer(result, stage)
            if name == "pictures":
                pictures = out
            tick()
        report = run_report(result, created=created)
        write_report(result, stage, pictures, run_report=report,
                     extra_files=("run_report.json", MANIFEST_NAME))
        tick()
        report["outputs_s"] = time.perf_counter() - t0
        _write_json(stage / "run_report.json", report)
        tick()
    tick()
    final = target.expanduser().parent.resolve() / target.name
    log.info("outputs written to %s in %.2f s", final, time.perf_counter() - t0)
    return final


__all__ = ["write_outputs", "check_output_dir", "staging_dir", "install_signal_cleanup", "remove_stale_staging",
           "is_outputs_folder", "verify_outputs", "write_manifest", "sha256_file", "run_report",
           "inversion_summary", "study_summary", "frame_ids", "all_warnings", "flagged_measures",
           "to_study_intensity", "OUTPUTS_FORMAT", "OUTPUTS_SCHEMA", "MANIFEST_NAME"]
