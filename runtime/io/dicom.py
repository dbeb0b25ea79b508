"""DICOM loader for cine short-axis studies (pydicom; not SimpleITK's series reader,
which stacks cine phases as slices).

What it does, in order:

1. Scan the folder recursively. Any file name is accepted (with or without ``.dcm``);
   a file counts as DICOM when it has the ``DICM`` preamble, a DICOM extension, or
   starts like a raw DICOM data set. DICOMDIR and non-image objects (reports,
   presentation states, raw data) are skipped quietly; unreadable or truncated files
   are skipped with one warning giving their count and a few names; FIFOs, devices and
   links leaving the folder are skipped unopened, with a warning. Every header value
   used is checked per file before any pixel is decoded (:func:`_header_problems`);
   pydicom's own warnings about invalid values are silenced, the checks name them.
2. Expand every image into frames (an Enhanced MR multi-frame file gives one frame per
   image, geometry from its functional groups).
3. Group frames by series: SeriesInstanceUID, or where a file has none (Kaggle DSB
   exports) the key ``PatientID:StudyInstanceUID:SeriesNumber`` (``-`` for an empty
   part), which the listings show and ``series=`` accepts. A series never spans
   patients or studies: one whose files name several PatientIDs or StudyInstanceUIDs is
   refused (MixedSeriesError), and single-slice series are merged only within one
   patient and study. One safe repair: when exactly one file of a
   series has a NaN, infinite, zero or negative PixelSpacing and all other files agree,
   their value replaces it, with a warning (:func:`_repair_pixel_spacing`); any other
   broken value refuses the series (InvalidGeometryError naming file and tag). A short-axis cine candidate is an MR series with
   at least two parallel slice positions (localisers excluded). One candidate: used,
   the other series are listed in the warnings. Several: MixedSeriesError listing them
   (pick with ``series=``). None, but several parallel single-slice cine series that
   share matrix, pixel spacing and phase count (UK Biobank stores one series per
   slice): merged into one stack, with a warning.
4. Within the chosen frames: group by position along the slice normal, sort phases by
   TriggerTime (InstanceNumber breaks ties), check orientations, matrix and spacing,
   phase counts, duplicates and gaps (see :mod:`.validate`), apply
   RescaleSlope/Intercept, and build the Study. Slices are placed by their positions;
   a SpacingBetweenSlices that the positions contradict (or that is not a finite
   number) is reported in the Study's warnings, never used.
"""
from __future__ import annotations

import logging
import os
import re
import warnings as _warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deeprecon.runtime.errors import InvalidStudyError, NoInputError
from deeprecon.runtime.io.acquisition import (DYNAMIC_MIN_FRAMES, DynamicSeriesError,
                                              dynamic_by_trigger_times, dynamic_name,
                                              dynamic_trigger_message)
from deeprecon.runtime.io.validate import (
    MAX_ORIENTATION_ANGLE_DEG, PIXEL_SPACING_RTOL, POSITION_TOL_MM, DuplicatePositionError,
    GeometryMismatchError,
    MixedSeriesError, NoImagesError, NonMRError, NoStackError, UnknownSeriesError,
    InvalidGeometryError, UnreadableFilesError, UnsupportedTransferSyntaxError, add_warning,
    check_in_plane, check_orientations, check_phase_counts, fmt_list, fmt_pos,
    geometry_problems, special_file, validate_study)
from deeprecon.runtime.study import Geometry, Study

log = logging.getLogger(__name__)

DICOMDIR_SOP = "1.2.840.10008.1.3.10"
MR_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4",      # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",    # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.3",    # Enhanced MR Color Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",    # Legacy Converted Enhanced MR Image Storage
}
DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic", ".ima"}
NOT_DICOM_EXTENSIONS = {".txt", ".json", ".xml", ".csv", ".md", ".cfg", ".ini", ".png", ".jpg",
                        ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".pdf", ".html", ".htm", ".nii",
                        ".gz", ".zip", ".py", ".log", ".yaml", ".yml", ".npz", ".npy", ".h5"}
LOCALIZER_RE = re.compile(r"locali[sz]er|scout|survey|tri[-_ ]?pilot|3[-_ ]?plane|haste_loc",
                          re.IGNORECASE)
_IPP_TOL_MM = 0.5        # in-plane origin difference tolerated between phases of a slice
_TRIGGER_TOL_MS = 1e-3   # two trigger times closer than this are the same
MAX_MATRIX = 4096        # Rows, Columns
MAX_FRAMES = 10_000      # NumberOfFrames of one multi-frame object
MAX_PIXEL_BYTES = 2 << 30  # decoded pixel data one file may declare (compressed or not)
_BITS_ALLOCATED = (1, 8, 16, 32, 64)
MAX_RESCALE_SLOPE = 1e6       # |RescaleSlope|: beyond this the rescaled pixels are garbage
MAX_RESCALE_INTERCEPT = 1e9   # |RescaleIntercept|


# --------------------------------------------------------------------------- records
@dataclass
class _Frame:
    """One 2D image: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None                 # index in a multi-frame object, None otherwise
    series_uid: str
    description: str
    series_number: int | None
    study_uid: str
    sop_uid: str
    patient_id: str
    modality: str
    image_type: tuple[str, ...]
    instance: int | None
    trigger: float | None             # ms after the R wave
    ipp: np.ndarray | None            # [3] mm, ImagePositionPatient
    iop: np.ndarray | None            # [6] direction cosines, ImageOrientationPatient
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    spacing_between: float | None
    rows: int
    cols: int
    samples: int
    slope: float = 1.0
    intercept: float = 0.0
    transfer_syntax: str = ""
    series_uid_given: bool = True     # False: series_uid is the uidless_series_key
    extra: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)   # "Tag [values]: what is wrong"

    @property
    def name(self) -> str:
        return self.path.name + ("" if self.frame is None else f"[frame {self.frame + 1}]")

    @property
    def row_dir(self) -> np.ndarray:
        return self.iop[:3] / np.linalg.norm(self.iop[:3])

    @property
    def col_dir(self) -> np.ndarray:
        return self.iop[3:] / np.linalg.norm(self.iop[3:])

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row_dir, self.col_dir)
        return n / np.linalg.norm(n)

    @property
    def has_geometry(self) -> bool:
        return (not self.problems and self.ipp is not None and self.iop is not None
                and self.pixel_spacing is not None and np.all(np.isfinite(self.ipp)) and np.linalg.norm(np.cross(
                    self.iop[:3], self.iop[3:])) > 0.5)


@dataclass
class _Scan:
    frames: list[_Frame] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    non_image: int = 0
    other_files: int = 0
    dicomdir: int = 0
    n_files: int = 0
    special: list[tuple[Path, str]] = field(default_factory=list)   # skipped unopened


@dataclass
class _SeriesSummary:
    uid: str
    frames: list[_Frame]
    description: str
    number: int | None
    modality: str
    n_orientations: int
    n_positions: int           # most parallel positions within one orientation
    n_phases: int              # most images at one position
    localizer: bool
    orientation: str

    @property
    def is_mr(self) -> bool:
        return self.modality == "MR"

    def line(self) -> str:
        num = f"#{self.number} " if self.number is not None else ""
        desc = f"'{self.description}'" if self.description else "(no description)"
        name = f"UID {self.uid}" if self.frames[0].series_uid_given else \
            f"series {self.uid} (PatientID:StudyInstanceUID:SeriesNumber; no SeriesInstanceUID)"
        return (f"{num}{desc} {name}: {self.modality}, {_n(self.n_positions, 'slice')} x "
                f"{_n(self.n_phases, 'phase')}, {_n(len(self.frames), 'image')}, {self.orientation}"
                + (", localiser" if self.localizer else ""))


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


# --------------------------------------------------------------------------- reading
def _num(v, kind=float):
    try:
        if v is None or v == "":
            return None
        return kind(v)
    except (TypeError, ValueError):
        return None


def _num_or(v, default: float) -> float:
    """A number from a tag, ``default`` when absent or empty (0 stays 0: it is checked)."""
    x = _num(v)
    return default if x is None else x


def _sniff(path: Path) -> str:
    """'dicom' (DICM preamble), 'maybe' (extension or raw data set start), 'dicomdir', 'no'."""
    if path.name.upper() == "DICOMDIR":
        return "dicomdir"
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return "maybe"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    suffix = path.suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return "maybe"
    if suffix in NOT_DICOM_EXTENSIONS:
        return "no"
    if len(head) >= 8:
        # a data set without preamble starts with a (0002,xxxx) or (0008,xxxx) element
        group = int.from_bytes(head[0:2], "little")
        element = int.from_bytes(head[2:4], "little")
        if group in (0x0002, 0x0008) and element < 0x0100:
            return "maybe"
    if len(head) >= 128 and head[:128] == bytes(128):
        return "maybe"  # a zero preamble cut before its DICM marker: a truncated file
    return "no"


def _first(seq_owner, name: str):
    seq = getattr(seq_owner, name, None)
    if seq is None or len(seq) == 0:
        return None
    return seq[0]


def _fg_attr(per, shared, seq_name: str, attr: str):
    """An attribute from a per-frame functional group, else from the shared one."""
    for owner in (per, shared):
        if owner is None:
            continue
        item = _first(owner, seq_name)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def uidless_series_key(patient_id: str, study_uid: str, series_number: int | None) -> str:
    """The name of a series whose files carry no SeriesInstanceUID:
    ``PatientID:StudyInstanceUID:SeriesNumber``, ``-`` for an empty part (what the
    listings show and ``--series`` accepts)."""
    parts = (patient_id, study_uid, "" if series_number is None else str(series_number))
    return ":".join(p.replace(":", "_") or "-" for p in parts)


def _frames_of(ds, path: Path) -> list[_Frame]:
    """All image frames of one data set (header only)."""
    sop = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None),
                                                   "MediaStorageSOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not modality:
        modality = "MR" if sop in MR_SOP_CLASSES else "unknown modality"
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    series_number = _num(ds.get("SeriesNumber"), int)
    description = str(ds.get("SeriesDescription", "") or "").strip()
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    patient_id = str(ds.get("PatientID", "") or "").strip()
    series_uid_given = bool(series_uid)
    if not series_uid_given:
        series_uid = uidless_series_key(patient_id, study_uid, series_number)
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
    common = dict(series_uid=series_uid, description=description, series_number=series_number,
                  study_uid=study_uid, patient_id=patient_id, series_uid_given=series_uid_given,
                  modality=modality, image_type=image_type,
                  rows=int(ds.Rows), cols=int(ds.Columns),
                  samples=int(ds.get("SamplesPerPixel", 1) or 1), transfer_syntax=ts)
    sop_uid = str(ds.get("SOPInstanceUID", "") or path)
    n_frames = _num(ds.get("NumberOfFrames"), int) or 1
    if not 1 <= n_frames <= MAX_FRAMES:
        raise ValueError(f"NumberOfFrames {n_frames} outside 1..{MAX_FRAMES}")
    per_seq = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames > 1 or per_seq is not None:
        shared = _first(ds, "SharedFunctionalGroupsSequence")
        out = []
        for i in range(n_frames):
            per = per_seq[i] if per_seq is not None and i < len(per_seq) else None
            ipp = _fg_attr(per, shared, "PlanePositionSequence", "ImagePositionPatient")
            iop = _fg_attr(per, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
            ps = _fg_attr(per, shared, "PixelMeasuresSequence", "PixelSpacing")
            trig = _fg_attr(per, shared, "CardiacSynchronizationSequence",
                            "NominalCardiacTriggerDelayTime")
            tpi = _fg_attr(per, shared, "FrameContentSequence", "TemporalPositionIndex")
            slope = _fg_attr(per, shared, "PixelValueTransformationSequence", "RescaleSlope")
            icpt = _fg_attr(per, shared, "PixelValueTransformationSequence", "RescaleIntercept")
            out.append(_Frame(
                path=path, frame=i, sop_uid=f"{sop_uid}#{i}",
                instance=_num(tpi, int) if tpi is not None else i,
                trigger=_num(trig),
                ipp=None if ipp is None else np.asarray([float(v) for v in ipp]),
                iop=None if iop is None else np.asarray([float(v) for v in iop]),
                pixel_spacing=None if ps is None else (float(ps[0]), float(ps[1])),
                thickness=_num(_fg_attr(per, shared, "PixelMeasuresSequence", "SliceThickness")),
                spacing_between=_num(_fg_attr(per, shared, "PixelMeasuresSequence",
                                              "SpacingBetweenSlices")),
                slope=_num_or(slope, 1.0), intercept=_num_or(icpt, 0.0), **common))
        return out
    ipp, iop, ps = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
    try:
        ipp = None if ipp is None or len(ipp) != 3 else np.asarray([float(v) for v in ipp])
        iop = None if iop is None or len(iop) != 6 else np.asarray([float(v) for v in iop])
        ps = None if ps is None or len(ps) != 2 else (float(ps[0]), float(ps[1]))
    except (TypeError, ValueError):
        ipp = iop = ps = None
    trig = _num(ds.get("TriggerTime"))
    return [_Frame(path=path, frame=None, sop_uid=sop_uid, instance=_num(ds.get("InstanceNumber"), int),
                   trigger=trig, ipp=ipp, iop=iop, pixel_spacing=ps,
                   thickness=_num(ds.get("SliceThickness")),
                   spacing_between=_num(ds.get("SpacingBetweenSlices")),
                   slope=_num_or(ds.get("RescaleSlope"), 1.0),
                   intercept=_num_or(ds.get("RescaleIntercept"), 0.0), **common)]


def _list_files(root: Path, special: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Files under ``root`` (sorted, hidden ones left out) that are safe to open; the
    others (see :func:`special_file`) are appended to ``special`` unopened."""
    special = [] if special is None else special
    if not root.is_dir():
        why = special_file(root, root)
        if why:
            special.append((root, why))
            return []
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            path = Path(dirpath) / f
            why = special_file(path, root)
            if why:
                special.append((path, why))
            else:
                out.append(path)
    return out


def _scan(root: Path) -> _Scan:
    import pydicom

    scan = _Scan()
    with _warnings.catch_warnings():
        # pydicom warns about each invalid value it converts (values are converted when
        # first read, so this covers the whole header); the checks below name them once
        _warnings.simplefilter("ignore")
        for path in _list_files(root, scan.special):
            scan.n_files += 1
            kind = _sniff(path)
            if kind == "dicomdir":
                scan.dicomdir += 1
                continue
            if kind == "no":
                scan.other_files += 1
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception as exc:  # noqa: BLE001 - any parse failure means "unreadable"
                if kind == "dicom" or path.suffix.lower() in DICOM_EXTENSIONS:
                    scan.unreadable.append((path, f"{type(exc).__name__}: {exc}"))
                else:
                    scan.other_files += 1
                continue
            try:   # values are converted when first read: a damaged VR fails here
                meta_sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
                               or "")
                sop = str(ds.get("SOPClassUID", "") or meta_sop)
            except Exception as exc:  # noqa: BLE001 - e.g. an unknown VR in the element
                scan.unreadable.append((path, f"malformed header: {type(exc).__name__}: {exc}"))
                continue
            if sop == DICOMDIR_SOP or meta_sop == DICOMDIR_SOP:
                scan.dicomdir += 1
                continue
            if "Rows" not in ds or "Columns" not in ds:
                sop_name = ""
                try:
                    from pydicom.uid import UID
                    sop_name = UID(sop).name if sop else ""
                except Exception:  # noqa: BLE001
                    sop_name = ""
                if "Image Storage" in sop_name or (not sop and kind == "dicom"):
                    scan.unreadable.append(
                        (path, "header ends before the image attributes (truncated?)"))
                elif sop:
                    scan.non_image += 1
                    log.debug("%s: non-image DICOM object (%s) skipped", path, sop_name or sop)
                elif path.suffix.lower() in DICOM_EXTENSIONS:
                    scan.unreadable.append((path, "not a readable DICOM data set"))
                else:
                    scan.other_files += 1
                continue
            try:
                frames = _frames_of(ds, path)
                short = _header_problems(ds, path, frames)
            except Exception as exc:  # noqa: BLE001 - malformed values in a header
                scan.unreadable.append((path, f"malformed header: {type(exc).__name__}: {exc}"))
                continue
            if short:
                scan.unreadable.append((path, short))
                continue
            scan.frames.extend(frames)
    return scan


_TAGS = {"pixel_spacing": "PixelSpacing", "orientation": "ImageOrientationPatient",
         "position": "ImagePositionPatient", "thickness": "SliceThickness",
         "trigger_time": "TriggerTime"}
_TAGS_ENHANCED = dict(_TAGS, trigger_time="NominalCardiacTriggerDelayTime")


def _header_problems(ds, path: Path, frames: list[_Frame]) -> str | None:
    """Per-file tag checks, before any pixel data is read or allocated.

    Records on each frame what is wrong with its values (``_Frame.problems``: PixelSpacing,
    ImageOrientationPatient, ImagePositionPatient, SliceThickness, TriggerTime, Rows,
    Columns, SamplesPerPixel, BitsAllocated, RescaleSlope, RescaleIntercept). Returns a reason when the file is too short
    for the pixel data its header declares (a truncated file, or a NumberOfFrames that
    does not fit the file), None otherwise.
    """
    from pydicom.uid import UID

    file_problems = []
    if not frames:
        return None
    f0 = frames[0]
    for name, v in (("Rows", f0.rows), ("Columns", f0.cols)):
        if not 1 <= v <= MAX_MATRIX:
            file_problems.append(f"{name} {v}: outside 1..{MAX_MATRIX}")
    if f0.samples not in (1, 3):
        file_problems.append(f"SamplesPerPixel {f0.samples}: needs 1 (or 3 for colour)")
    bits = _num(ds.get("BitsAllocated"), int)
    if bits is not None and bits not in _BITS_ALLOCATED:
        file_problems.append(f"BitsAllocated {bits}: needs one of {', '.join(map(str, _BITS_ALLOCATED))}")
    declared = f0.rows * f0.cols * f0.samples * len(frames) * max(bits or 8, 8) // 8
    if not file_problems and declared > MAX_PIXEL_BYTES:
        file_problems.append(
            f"Rows x Columns x SamplesPerPixel x NumberOfFrames ({f0.rows} x {f0.cols} x "
            f"{f0.samples} x {len(frames)}) declare {declared} bytes of pixels, more than the "
            f"{MAX_PIXEL_BYTES >> 30} GiB one file may hold")
    for name in ("SliceThickness", "TriggerTime", "RescaleSlope", "RescaleIntercept",
                 "SpacingBetweenSlices", "InstanceNumber"):
        v = ds.get(name)
        if v is not None and str(v).strip() not in ("", "None") and _num(v) is None:
            file_problems.append(f"{name} {str(v)[:20]!r}: not a number")
    names = _TAGS_ENHANCED if f0.frame is not None else _TAGS
    for f in frames:
        f.problems = file_problems + geometry_problems(
            pixel_spacing=f.pixel_spacing, orientation=f.iop, position=f.ipp,
            thickness=f.thickness, trigger_time=f.trigger, names=names)
        for name, v, limit in (("RescaleSlope", f.slope, MAX_RESCALE_SLOPE),
                               ("RescaleIntercept", f.intercept, MAX_RESCALE_INTERCEPT)):
            if not (np.isfinite(v) and abs(v) <= limit and (v != 0 or name == "RescaleIntercept")):
                f.problems.append(f"{name} {v:g}: needs a finite value within +-{limit:g}"
                                  + (", not 0" if name == "RescaleSlope" else ""))
    if file_problems or bits is None or bits == 1:
        return None
    ts = f0.transfer_syntax
    try:
        compressed = bool(ts) and UID(ts).is_transfer_syntax and UID(ts).is_compressed
    except ValueError:
        compressed = False
    if compressed:
        return None
    expected = f0.rows * f0.cols * f0.samples * len(frames) * bits // 8
    size = path.stat().st_size
    if expected > size:
        return (f"Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated "
                f"({f0.rows} x {f0.cols} x {f0.samples} x {len(frames)} x {bits} bits) need "
                f"{expected} bytes of pixel data; the file has {size} bytes (truncated?)")
    return None


def _decode(frames: list[_Frame]) -> tuple[list[_Frame], list[np.ndarray], list[tuple[Path, str]], int]:
    """Read and rescale the pixels of ``frames``. Returns (kept frames, [H, W] float64
    arrays, unreadable (path, reason), number of MONOCHROME1 files inverted). Raises
    UnsupportedTransferSyntaxError when compressed data has no decoder installed."""
    import pydicom
    from pydicom.uid import UID

    by_path: dict[Path, list[_Frame]] = defaultdict(list)
    for f in frames:
        by_path[f.path].append(f)
    kept, pixels, bad = [], [], []
    n_inverted = 0
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")   # pydicom warns about each invalid UID or value it reads
        for path, fs in by_path.items():
            ts = UID(fs[0].transfer_syntax) if fs[0].transfer_syntax else None
            if ts is not None and not ts.is_transfer_syntax:
                raise UnsupportedTransferSyntaxError(
                    f"{path}: TransferSyntaxUID {str(ts)!r} is not a transfer syntax this loader "
                    "knows: its pixel data cannot be decoded",
                    hint="export the study uncompressed (Explicit VR Little Endian)")
            if ts is not None and ts.is_compressed:
                try:
                    from pydicom.pixels import get_decoder
                    dec = get_decoder(ts)
                    available = dec.is_available
                    missing = list(dec.missing_dependencies)
                except NotImplementedError:
                    available, missing = False, []
                if not available:
                    raise UnsupportedTransferSyntaxError(
                        f"{path}: pixel data compressed as '{ts.name}' ({ts}), and no installed "
                        "decoder can read it",
                        hint="install a decoder: pip install 'pydicom[pixeldata]'"
                             + (f" (any of: {'; '.join(missing)})" if missing else "")
                             + ", or export the study uncompressed")
            try:
                ds = pydicom.dcmread(path, force=True)
                if "PixelData" not in ds and "FloatPixelData" not in ds:
                    raise ValueError("no pixel data")
                _ensure_transfer_syntax(ds)
                _check_pixel_data_length(ds, path, fs)
                arr = np.asarray(ds.pixel_array)
                if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
                    arr = _invert_monochrome1(arr, ds)
                    n_inverted += 1
            except (UnsupportedTransferSyntaxError, InvalidStudyError):
                raise
            except Exception as exc:  # noqa: BLE001 - truncated / corrupt pixel data
                bad.append((path, f"{type(exc).__name__}: {exc}"))
                continue
            for f in fs:
                a = arr if f.frame is None else (arr[f.frame] if arr.ndim == 3 else arr)
                if a.shape != (f.rows, f.cols):
                    bad.append((path, f"pixel array {a.shape} != Rows x Columns {(f.rows, f.cols)}"))
                    continue
                kept.append(f)
                pixels.append(a.astype(np.float64) * f.slope + f.intercept)
    return kept, pixels, bad, n_inverted


def _check_pixel_data_length(ds, path: Path, fs: list[_Frame]) -> None:
    """Uncompressed PixelData must be as long as Rows x Columns x SamplesPerPixel x
    NumberOfFrames x BitsAllocated / 8 (plus one pad byte). Longer: InvalidStudyError
    (the header does not describe the data); shorter: ValueError (a truncated file)."""
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
        return
    bits = _num(ds.get("BitsAllocated"), int)
    if not bits or bits == 1:
        return
    f = fs[0]
    n_frames = _num(ds.get("NumberOfFrames"), int) or 1
    expected = f.rows * f.cols * f.samples * n_frames * bits // 8
    actual = len(ds.PixelData)
    if actual > expected + 1:
        raise InvalidStudyError(
            f"{path}: PixelData holds {actual} bytes, but Rows x Columns x SamplesPerPixel x "
            f"NumberOfFrames x BitsAllocated ({f.rows} x {f.cols} x {f.samples} x {n_frames} x "
            f"{bits} bits) say {expected}: the header does not describe the pixel data",
            hint="the file is damaged or was written by a broken conversion; re-export it")
    if actual < expected:
        raise ValueError(f"PixelData holds {actual} of the {expected} bytes its header declares "
                         "(truncated?)")


def _invert_monochrome1(arr: np.ndarray, ds) -> np.ndarray:
    """MONOCHROME1 stores 0 as white: map stored values onto MONOCHROME2 (0 = black) so
    that blood stays bright, keeping the stored range ([0, 2^bits - 1] unsigned,
    [-2^(bits-1), 2^(bits-1) - 1] signed)."""
    bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
    a = arr.astype(np.int64)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -1 - a
    return (2 ** bits - 1) - a


def _ensure_transfer_syntax(ds) -> None:
    """A data set without file meta (no preamble, ACR-NEMA style): state the transfer
    syntax it was parsed with, which pydicom needs to decode the pixels."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    implicit, little = ds.original_encoding
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _unreadable_warning(bad: list[tuple[Path, str]], root: Path) -> str:
    names = [_rel(p, root) for p, _ in bad]
    return (f"skipped {len(bad)} unreadable or truncated DICOM file{'s' if len(bad) > 1 else ''}: "
            f"{fmt_list(names, limit=3)} ({bad[0][1]})")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) if root.is_dir() else path.name
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- grouping
def _orientation_clusters(frames: list[_Frame], max_angle_deg: float) -> list[list[_Frame]]:
    """Frames grouped by orientation (row and column directions within max_angle_deg)."""
    cos_tol = np.cos(np.radians(max_angle_deg))
    clusters: list[list[_Frame]] = []
    for f in frames:
        for c in clusters:
            ref = c[0]
            if (np.dot(f.normal, ref.normal) >= cos_tol and np.dot(f.row_dir, ref.row_dir) >= cos_tol):
                c.append(f)
                break
        else:
            clusters.append([f])
    clusters.sort(key=len, reverse=True)
    return clusters


def _position_groups(frames: list[_Frame], normal: np.ndarray,
                     tol: float = POSITION_TOL_MM) -> list[tuple[float, list[_Frame]]]:
    """Frames grouped by position along ``normal`` (sorted increasing)."""
    z = np.array([float(f.ipp @ normal) for f in frames])
    order = np.argsort(z, kind="stable")
    groups: list[tuple[float, list[_Frame]]] = []
    last = None
    for k in order:
        if last is None or z[k] - last > tol:
            groups.append((float(z[k]), [frames[k]]))
        else:
            groups[-1][1].append(frames[k])
        last = z[k]
    return [(float(np.mean([f.ipp @ normal for f in fs])), fs) for _, fs in groups]


def _summarise(uid: str, frames: list[_Frame], max_angle_deg: float) -> _SeriesSummary:
    geo = [f for f in frames if f.has_geometry]
    first = frames[0]
    n_pos = n_ph = n_or = 0
    orientation = "no geometry"
    if geo:
        clusters = _orientation_clusters(geo, max_angle_deg)
        n_or = len(clusters)
        for c in clusters:
            groups = _position_groups(c, c[0].normal)
            n_pos = max(n_pos, len(groups))
            n_ph = max(n_ph, max(len(fs) for _, fs in groups))
        ref = clusters[0][0]
        orientation = Geometry(origins=ref.ipp, row_dir=ref.row_dir, col_dir=ref.col_dir,
                               pixel_spacing=ref.pixel_spacing).orientation_label()
        if n_or > 1:
            orientation += f" (+{n_or - 1} other orientation{'s' if n_or > 2 else ''})"
    localizer = ("LOCALIZER" in first.image_type or bool(LOCALIZER_RE.search(first.description))
                 or (n_or >= 2 and n_ph <= 1))
    return _SeriesSummary(uid=uid, frames=frames, description=first.description,
                          number=first.series_number, modality=first.modality or "?",
                          n_orientations=n_or, n_positions=n_pos, n_phases=n_ph,
                          localizer=localizer, orientation=orientation)


def _prefix(description: str) -> str:
    """A series description without its trailing slice number ('CINE_SAX_b12' -> 'CINE_SAX_b')."""
    return re.sub(r"[\d\s_\-.]+$", "", description).strip().lower()


def _merge_groups(singles: list[_SeriesSummary], max_angle_deg: float,
                  use_prefix: bool) -> list[list[_SeriesSummary]]:
    """Parallel single-slice cine series sharing matrix, pixel spacing and phase count."""
    cos_tol = np.cos(np.radians(max_angle_deg))
    groups: list[list[_SeriesSummary]] = []
    for s in singles:
        f = s.frames[0]
        for g in groups:
            r = g[0].frames[0]
            if ((f.patient_id, f.study_uid) == (r.patient_id, r.study_uid)
                    and (f.rows, f.cols) == (r.rows, r.cols) and s.n_phases == g[0].n_phases
                    and np.allclose(f.pixel_spacing, r.pixel_spacing, rtol=1e-3)
                    and np.dot(f.normal, r.normal) >= cos_tol and np.dot(f.row_dir, r.row_dir) >= cos_tol
                    and (not use_prefix or _prefix(s.description) == _prefix(g[0].description))):
                g.append(s)
                break
        else:
            groups.append([s])
    out = []
    for g in groups:
        z = [float(s.frames[0].ipp @ g[0].frames[0].normal) for s in g]
        if len(g) >= 2 and len(np.unique(np.round(np.asarray(z) / POSITION_TOL_MM))) >= 2:
            out.append(g)
    return out


# --------------------------------------------------------------------------- building
_DYNAMIC_HINT = ("deeprecon-rt analyses cine short-axis stacks (frames over one cardiac cycle); "
                 "pick the cine series with --series or export it instead")


def _dynamic_reason(frames: list[_Frame], *, by_trigger: bool = True) -> str | None:
    """Why ``frames`` (one series) are a perfusion/dynamic series, or None (see
    :mod:`.acquisition`): a SeriesDescription or ImageType value saying perfusion, or
    (``by_trigger``) many frames at one slice position sharing one trigger time."""
    for f in frames:
        for what, text in (("SeriesDescription", f.description),
                           *(("ImageType", v) for v in f.image_type)):
            said = dynamic_name(text)
            if said is not None:
                return (f"a perfusion/dynamic series, not a cine: its {what} {text!r} says "
                        f"{said!r} ({len(frames)} images)")
    geo = [f for f in frames if f.has_geometry]
    if by_trigger and geo:
        for z, fs in _position_groups(geo, geo[0].normal):
            tt = [f.trigger for f in fs if f.trigger is not None]
            if len(fs) >= DYNAMIC_MIN_FRAMES and len(tt) == len(fs):
                dyn = dynamic_by_trigger_times(tt)
                if dyn is not None:
                    return dynamic_trigger_message(*dyn, where=f" at {fmt_pos(z)}")
    return None


def _refuse_dynamic_by_name(frames: list[_Frame], ctx: str) -> None:
    """DynamicSeriesError when the SeriesDescription or an ImageType value of the frames
    says perfusion."""
    why = _dynamic_reason(frames, by_trigger=False)
    if why is not None:
        raise DynamicSeriesError(f"{ctx}{why}", hint=_DYNAMIC_HINT)


def _build(frames: list[_Frame], *, root: Path, uids: list[str], skipped: list[tuple[Path, str]],
           max_angle_deg: float, warnings: list[str], info: dict) -> Study:
    """Frames of one stack -> Study (checks orientation, in-plane grid, positions, phases)."""
    ctx = f"{root}: series {', '.join(uids)}: " if len(uids) <= 3 else f"{root}: {len(uids)} merged series: "
    _refuse_dynamic_by_name(frames, ctx)   # before any pixel is decoded
    kept, pixels, bad, n_inverted = _decode(frames)
    if n_inverted:
        warnings.append(f"{ctx}{n_inverted} MONOCHROME1 image file{'s' if n_inverted > 1 else ''} "
                        "(0 = white) inverted to MONOCHROME2 (0 = black)")
    if bad:
        skipped = skipped + bad
        warnings.append(_unreadable_warning(bad, root))
    if not kept:
        raise UnreadableFilesError(
            f"{ctx}none of its {len(frames)} images could be read ({bad[0][0].name}: {bad[0][1]})",
            hint="the files are truncated or corrupt: copy the series again from the scanner/PACS")
    pix = {id(f): a for f, a in zip(kept, pixels)}
    frames = kept
    note = ""
    if skipped:
        names = [_rel(p, root) for p, _ in skipped]
        names[0] += f" ({skipped[0][1]})"   # the first one says why
        note = (f" ({len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''} "
                f"{'were' if len(skipped) > 1 else 'was'} skipped: {fmt_list(names, limit=3)}; "
                "a missing image may be among them)")
    # orientation, in-plane grid (per image)
    clusters = _orientation_clusters(frames, max_angle_deg)
    ref = clusters[0][0]
    normal = ref.normal
    z_all = [float(f.ipp @ normal) for f in frames]
    where = [f"{fmt_pos(z)} ({_rel(f.path, root)})" for f, z in zip(frames, z_all)]
    # orientation problems are per slice: name the position and the first file there
    first_at: dict[str, str] = {}
    for f, z in zip(frames, z_all):
        first_at.setdefault(fmt_pos(round(z, 2)), _rel(f.path, root))
    where_slice = [f"slice at {fmt_pos(round(z, 2))} (e.g. {first_at[fmt_pos(round(z, 2))]})"
                   for z in z_all]
    check_orientations(np.array([f.row_dir for f in frames]), np.array([f.col_dir for f in frames]),
                       where_slice, max_angle_deg=max_angle_deg, context=ctx)
    check_in_plane([(f.rows, f.cols) for f in frames], [f.pixel_spacing for f in frames], where,
                   context=ctx)
    # slices and phases
    groups = _position_groups(frames, normal)
    slices = []
    copies: list[str] = []
    for z, fs in groups:
        ipps = np.array([f.ipp for f in fs])
        if np.max(np.linalg.norm(ipps - ipps[0], axis=1)) > _IPP_TOL_MM:
            raise GeometryMismatchError(
                f"{ctx}images at {fmt_pos(z)} have different in-plane origins "
                f"(ImagePositionPatient up to {np.max(np.linalg.norm(ipps - ipps[0], axis=1)):.2f} mm "
                f"apart: {fmt_list(sorted({_rel(f.path, root) for f in fs}), limit=3)})",
                hint="the field of view moved between acquisitions of this slice: "
                     "keep one acquisition per slice")
        # identical SOP instances (the same file copied twice): keep one
        seen: dict[str, _Frame] = {}
        for f in fs:
            if f.sop_uid in seen and np.array_equal(pix[id(f)], pix[id(seen[f.sop_uid])]):
                copies.append(f"{_rel(f.path, root)} is a copy of {_rel(seen[f.sop_uid].path, root)}")
                continue
            seen.setdefault(f.sop_uid, f)
        fs = list(seen.values())
        fs.sort(key=lambda f: (f.trigger is None, f.trigger if f.trigger is not None else 0.0,
                               f.instance if f.instance is not None else 0, str(f.path),
                               f.frame or 0))
        # a perfusion series: many frames at one position, one trigger time (not duplicates)
        tt = [f.trigger for f in fs if f.trigger is not None]
        if len(fs) >= DYNAMIC_MIN_FRAMES and len(tt) == len(fs):
            dyn = dynamic_by_trigger_times(tt)
            if dyn is not None:
                raise DynamicSeriesError(
                    f"{ctx}{dynamic_trigger_message(*dyn, where=f' at {fmt_pos(z)}')}",
                    hint=_DYNAMIC_HINT)
        for a, b in zip(fs, fs[1:]):
            same_t = (a.trigger is not None and b.trigger is not None
                      and abs(a.trigger - b.trigger) <= _TRIGGER_TOL_MS)
            same_i = (a.trigger is None and b.trigger is None and a.instance == b.instance)
            if same_t or same_i:
                when = f"trigger time {a.trigger:g} ms" if same_t else f"instance number {a.instance}"
                raise DuplicatePositionError(
                    f"{ctx}duplicate images: {_rel(a.path, root)} and {_rel(b.path, root)} are "
                    f"two different images at the same position ({fmt_pos(z)}) and {when}",
                    hint="the series holds a repeated acquisition of this slice: remove one "
                         "copy (keep the one you want to analyse)")
        slices.append((z, fs))
    if copies:
        warnings.append(f"{ctx}ignored {len(copies)} duplicate file{'s' if len(copies) > 1 else ''} "
                        f"(same SOPInstanceUID and pixels): {fmt_list(copies, limit=3)}")
    check_phase_counts([len(fs) for _, fs in slices], [z for z, _ in slices], context=ctx, note=note)
    P, S = len(slices[0][1]), len(slices)
    H, W = ref.rows, ref.cols
    images = np.empty((P, S, H, W), dtype=np.float32)
    trig = np.full((P, S), np.nan)
    for s, (_, fs) in enumerate(slices):
        for p, f in enumerate(fs):
            images[p, s] = pix[id(f)]
            if f.trigger is not None:
                trig[p, s] = f.trigger
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN phases stay NaN
        trigger_times = np.nanmedian(trig, axis=1)
        spread = np.nanmax(trig, axis=1) - np.nanmin(trig, axis=1)
    if np.any(np.isfinite(spread)):
        worst = float(np.nanmax(spread))
        info["trigger_time_spread_ms"] = round(worst, 3)
        steps = np.diff(trigger_times)
        steps = steps[np.isfinite(steps) & (steps > 0)]
        if steps.size and worst > 0.5 * float(np.median(steps)):
            warnings.append(f"{ctx}trigger times of one phase differ across slices by up to "
                            f"{worst:.1f} ms (more than half the {float(np.median(steps)):.1f} ms "
                            "phase interval): phases are matched by order, not by time")
    origins = np.array([np.mean([f.ipp for f in fs], axis=0) for _, fs in slices])
    thick = [f.thickness for f in frames if f.thickness is not None]
    geometry = Geometry(origins=origins, row_dir=ref.row_dir, col_dir=ref.col_dir,
                        pixel_spacing=tuple(np.median([f.pixel_spacing for f in frames], axis=0)),
                        slice_thickness=float(np.median(thick)) if thick else None)
    # SpacingBetweenSlices is never used (the positions are): one that disagrees is reported
    nominal = np.array([f.spacing_between for f in frames if f.spacing_between is not None])
    if nominal.size and S >= 2:
        gap = geometry.slice_spacing
        with np.errstate(invalid="ignore"):
            off = ~np.isfinite(nominal) | (np.abs(nominal - gap) > 0.1 * gap)
        if off.any():
            warnings.append(
                f"{ctx}SpacingBetweenSlices {fmt_list([f'{v:g}' for v in np.unique(nominal[off])])} "
                f"mm ({int(off.sum())} of {nominal.size} images) disagrees with the slice "
                f"positions, {gap:.2f} mm apart: the positions are used")
    if S == 1:
        warnings.append(f"{ctx}a single slice: no through-plane information")
    first = frames[0]
    info.update({"study_uid": first.study_uid or None,
                 "series_number": first.series_number,
                 "n_images": P * S})
    description = first.description if len(uids) == 1 else (
        os.path.commonprefix([f.description for f in frames]).strip() or first.description)
    refs = [[(str(fs[p].path), fs[p].frame) for _, fs in slices] for p in range(P)]
    study = Study(images=images, geometry=geometry, trigger_times=trigger_times,
                  phase_ids=list(range(P)), series_uid=",".join(uids), description=description,
                  source=str(root), source_format="dicom", info=info, image_refs=refs)
    for w in warnings:
        add_warning(study, w)
    return study


def _repair_pixel_spacing(frames: list[_Frame], root: Path, uid: str) -> str | None:
    """The one safe repair: exactly one file of a series has a PixelSpacing that is NaN,
    infinite, 0 or negative (and nothing else wrong), while every other file (at least
    two) has one and the same valid PixelSpacing. That one is copied into the broken
    file's frames; returns the warning saying so. Anything else: None, nothing changed
    (the broken values stay problems and are refused)."""
    bad = [f for f in frames if f.problems]
    if not bad or len({f.path for f in bad}) != 1:
        return None
    for f in bad:
        ps = np.asarray(f.pixel_spacing if f.pixel_spacing is not None else [1.0], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            broken = ps.size == 2 and (not np.all(np.isfinite(ps)) or bool(np.any(ps <= 0)))
        if not broken or f.problems != geometry_problems(pixel_spacing=f.pixel_spacing, names=_TAGS):
            return None
    others = [f for f in frames if not f.problems]
    if len({f.path for f in others}) < 2 or any(f.pixel_spacing is None for f in others):
        return None
    ps = np.array([f.pixel_spacing for f in others], dtype=np.float64)   # [N, 2] mm
    if np.any(np.abs(ps - ps[0]) > PIXEL_SPACING_RTOL * ps[0]):
        return None
    ref = (float(ps[0, 0]), float(ps[0, 1]))
    old = bad[0].pixel_spacing
    for f in bad:
        f.pixel_spacing, f.problems = ref, []
    return (f"series {uid}: {_rel(bad[0].path, root)}: PixelSpacing "
            f"[{old[0]:g}, {old[1]:g}] repaired to [{ref[0]:g}, {ref[1]:g}] mm, the value "
            f"all {len({f.path for f in others})} other files of the series agree on")


def _raise_problems(bad: list[_Frame], root: Path, where: str) -> None:
    """InvalidGeometryError naming the files (and first tag) of frames with ``problems``."""
    if not bad:
        return
    files = list(dict.fromkeys(f.path for f in bad))
    first = {}
    for f in bad:
        first.setdefault(f.path, f.problems[0])
    raise InvalidGeometryError(
        f"{root}: {where}invalid header values in {len(files)} file(s): "
        + "; ".join(f"{_rel(p, root)}: {first[p]}" for p in files[:3])
        + (" ..." if len(files) > 3 else ""),
        hint="the files are damaged or were written by a broken conversion; re-export the series")


# --------------------------------------------------------------------------- public
def _refuse_mixed_subjects(uid: str, frames: list[_Frame], root: Path) -> None:
    """MixedSeriesError when one series' files name several patients or studies (files
    of different subjects that share a SeriesInstanceUID or, without one, a series
    number): never stacked together."""
    for what, attr in (("PatientID", "patient_id"), ("StudyInstanceUID", "study_uid")):
        values = Counter(getattr(f, attr) for f in frames)
        if len(values) > 1:
            raise MixedSeriesError(
                f"{root}: series {uid} holds images of {len(values)} different {what}s "
                f"({fmt_list([f'{v!r} ({n} images)' for v, n in values.items()], limit=4)}); "
                "images of different patients or studies are never stacked",
                hint="put each patient's study in a folder of its own")


def load_dicom(folder: str | Path, *, series: str | None = None,
               max_angle_deg: float = MAX_ORIENTATION_ANGLE_DEG, validate: bool = True) -> Study:
    """Load a cine short-axis stack from a DICOM folder (recursive) or a single file.

    folder: a folder (searched recursively; any file names) or one (multi-frame) file.
    series: a SeriesInstanceUID to use when several short-axis series are present, or
            several UIDs separated by commas to merge single-slice series into one stack;
            for files without a SeriesInstanceUID, the listed
            ``PatientID:StudyInstanceUID:SeriesNumber`` key.
    max_angle_deg: largest angle (degrees) between slices still counted as parallel.
    Returns a Study: images [P, S, H, W] float32 (RescaleSlope/Intercept applied),
    slices sorted along row_dir x col_dir, phases sorted by TriggerTime (InstanceNumber
    tie-break), trigger_times [P] ms (median over slices), ``series_uid`` the UID(s) used.
    Raises NoInputError (66) when no image is found, InvalidStudyError subclasses (65) for
    data that is not a usable stack, UnknownSeriesError (2) for a wrong ``series``.
    """
    root = Path(folder)
    if not root.exists():
        raise NoInputError(f"{root}: no such file or folder", hint="check the path")
    scan = _scan(root)
    warnings: list[str] = []
    if scan.special:
        warnings.append(
            f"skipped {len(scan.special)} file{'s' if len(scan.special) > 1 else ''} that are not "
            "regular files inside the input folder (FIFOs, devices, sockets, symlinks leaving "
            "it), without opening them: "
            + fmt_list([f"{_rel(p, root)} ({why})" for p, why in scan.special], limit=3))
    if scan.unreadable:
        warnings.append(_unreadable_warning(scan.unreadable, root))
    if not scan.frames:
        if scan.unreadable:
            raise UnreadableFilesError(
                f"{root}: {len(scan.unreadable)} file(s) look like DICOM but none could be read "
                f"({fmt_list([_rel(p, root) for p, _ in scan.unreadable], limit=3)}: "
                f"{scan.unreadable[0][1]})",
                hint="the files are truncated or corrupt: copy the study again from the scanner/PACS")
        found = []
        if scan.non_image:
            found.append(f"{scan.non_image} non-image DICOM object(s) (reports, presentation states, ...)")
        if scan.dicomdir:
            found.append("a DICOMDIR index without the images it lists")
        if scan.other_files:
            found.append(f"{scan.other_files} other file(s)")
        if scan.special:
            found.append(f"{len(scan.special)} special file(s) or outside link(s), not opened")
        raise NoImagesError(
            f"{root}: no images found (looked for DICOM files of any name, recursively; "
            f"NIfTI .nii/.nii.gz; ACDC patient folders with Info.cfg); found "
            f"{', '.join(found) if found else 'no files at all'}",
            hint="point at the folder that holds the study's image files")
    by_series: dict[str, list[_Frame]] = defaultdict(list)
    for f in scan.frames:
        by_series[f.series_uid].append(f)
    for uid, fs in by_series.items():
        _refuse_mixed_subjects(uid, fs, root)
    repaired = {uid: w for uid, fs in by_series.items()
                if (w := _repair_pixel_spacing(fs, root, uid)) is not None}
    summaries = {uid: _summarise(uid, fs, max_angle_deg) for uid, fs in by_series.items()}
    info: dict = {"n_files": scan.n_files}

    # frames that cannot be placed in space (secondary captures, screenshots)
    ignored: list[tuple[Path, str]] = []   # files of the used series left out, and why

    def placeable(fs: list[_Frame], uid: str) -> list[_Frame]:
        _raise_problems([f for f in fs if f.problems], root, f"series {uid}: ")
        if uid in repaired:
            warnings.append(repaired[uid])
        out = [f for f in fs if f.has_geometry and f.samples == 1]
        left = {f.path: (f"SamplesPerPixel {f.samples}: colour pixels" if f.samples != 1 else
                         "no usable ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
                for f in fs if not (f.has_geometry and f.samples == 1)}
        if left:
            ignored.extend(left.items())
            warnings.append(f"series {uid}: ignored {len(left)} file(s) that cannot be placed in "
                            f"the stack: {fmt_list([f'{_rel(p, root)} ({why})' for p, why in left.items()], limit=3)}")
        return out

    if series is not None:
        wanted = [u.strip() for u in str(series).split(",") if u.strip()]
        unknown = [u for u in wanted if u not in summaries]
        if unknown or not wanted:
            raise UnknownSeriesError(
                f"{root}: no series {fmt_list(unknown) or repr(series)}; available: "
                + "; ".join(s.line() for s in summaries.values()),
                hint="pass one of the listed series with --series (its SeriesInstanceUID, or "
                     "PatientID:StudyInstanceUID:SeriesNumber where the files have none)")
        non_mr = [u for u in wanted if not summaries[u].is_mr]
        if non_mr:
            s = summaries[non_mr[0]]
            raise NonMRError(f"{root}: series {s.uid} is {s.modality}, not MR "
                             f"({len(s.frames)} images); deeprecon-rt needs an MR cine",
                             hint="pick an MR series with --series")
        frames = []
        for u in wanted:
            frames.extend(placeable(summaries[u].frames, u))
        if not frames:
            raise InvalidStudyError(f"{root}: series {', '.join(wanted)}: no image carries "
                                    "ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
        others = [s for u, s in summaries.items() if u not in wanted]
        if others:
            warnings.append(f"ignored {len(others)} other series: "
                            + "; ".join(s.line() for s in others[:5])
                            + (" ..." if len(others) > 5 else ""))
        if len(wanted) > 1:
            info["merged_series"] = wanted
        study = _build(frames, root=root, uids=wanted, skipped=scan.unreadable + scan.special + ignored,
                       max_angle_deg=max_angle_deg, warnings=warnings, info=info)
        return validate_study(study) if validate else study

    mr = {u: s for u, s in summaries.items() if s.is_mr}
    if not mr:
        mods = Counter(s.modality for s in summaries.values())
        raise NonMRError(
            f"{root}: no MR images: found {', '.join(f'{m} ({n} series)' for m, n in mods.items())}: "
            + "; ".join(s.line() for s in list(summaries.values())[:5]),
            hint="deeprecon-rt reads cine MR short-axis stacks; point it at the MR study")
    candidates = [s for s in mr.values() if not s.localizer and s.n_positions >= 2]
    cine = [s for s in candidates if s.n_phases >= 2]
    if cine:
        candidates = cine
    # a perfusion series beside the cine is not a candidate (alone, it is refused by name)
    not_dynamic = [s for s in candidates
                   if dynamic_name(s.description) is None
                   and not any(dynamic_name(v) for v in s.frames[0].image_type)]
    if not_dynamic:
        candidates = not_dynamic
    if len(candidates) > 1:
        candidates.sort(key=lambda s: (s.number is None, s.number or 0, s.uid))
        patients = {s.frames[0].patient_id for s in candidates}
        raise MixedSeriesError(
            f"{root}: several short-axis series mixed ({len(candidates)} candidates"
            + (f" of {len(patients)} patients: {fmt_list(sorted(map(repr, patients)), limit=4)}"
               if len(patients) > 1 else "") + "):\n  "
            + "\n  ".join(s.line() for s in candidates),
            hint=f"pick one with --series (e.g. --series {candidates[0].uid})"
                 + ("; better, one folder per patient" if len(patients) > 1 else ""))
    uids: list[str]
    if candidates:
        uids = [candidates[0].uid]
    else:
        singles = [s for s in mr.values()
                   if not s.localizer and s.n_positions == 1 and s.n_orientations == 1
                   and s.n_phases >= 2]
        groups = _merge_groups(singles, max_angle_deg, use_prefix=True) or \
            _merge_groups(singles, max_angle_deg, use_prefix=False)
        if len(groups) > 1:
            raise MixedSeriesError(
                f"{root}: no multi-slice series, and {len(groups)} different groups of parallel "
                "single-slice cine series:\n  "
                + "\n  ".join(f"{len(g)} series ({g[0].orientation}): "
                              + fmt_list([f"'{s.description}'" for s in g], limit=4) for g in groups),
                hint="pick one group with --series UID1,UID2,... (comma-separated UIDs)")
        if not groups:
            # no stack because its files' values are broken: say which, not "no stack"
            _raise_problems([f for s in mr.values() for f in s.frames if f.problems], root, "")
            # the only series are perfusion/dynamic ones: say so, not "no stack"
            real = [s for s in mr.values() if not s.localizer]
            dyn = [(s, why) for s in real if (why := _dynamic_reason(s.frames)) is not None]
            if real and len(dyn) == len(real):
                s, why = dyn[0]
                raise DynamicSeriesError(
                    f"{root}: series {s.uid}" + (f" ({s.description!r})" if s.description else "")
                    + f": {why}", hint=_DYNAMIC_HINT)
            raise NoStackError(
                f"{root}: no short-axis stack: the MR series are single slices or localisers:\n  "
                + "\n  ".join(s.line() for s in mr.values()),
                hint="export the short-axis cine stack; to load one single-slice series anyway, "
                     "pass its UID with --series")
        group = sorted(groups[0], key=lambda s: float(s.frames[0].ipp @ groups[0][0].frames[0].normal))
        uids = [s.uid for s in group]
        info["merged_series"] = uids
        warnings.append(f"merged {len(uids)} single-slice cine series into one stack "
                        f"(one series per slice, as UK Biobank stores them): "
                        f"{fmt_list([repr(s.description) for s in group], limit=4)}")
    others = [s for u, s in summaries.items() if u not in uids]
    if others:
        warnings.append(f"ignored {len(others)} other series: "
                        + "; ".join(s.line() for s in others[:5])
                        + (" ..." if len(others) > 5 else ""))
    frames = []
    for u in uids:
        frames.extend(placeable(summaries[u].frames, u))
    study = _build(frames, root=root, uids=uids, skipped=scan.unreadable + scan.special + ignored,
                   max_angle_deg=max_angle_deg, warnings=warnings, info=info)
    return validate_study(study) if validate else study
