"""NIfTI loader: a 3D volume (one phase) or a 4D cine (time last), with optional labels.

Geometry comes from SimpleITK (patient LPS, mm): the direction's first column is the
row direction (increasing column index), the second the column direction, slice ``s``
of the array lies at ``origin + s * spacing_z * direction[:, 2]``. Slices are returned
sorted by increasing position along ``row_dir x col_dir``: a left-handed volume (third
axis against that normal) has its slice order reversed, labels alike.

Before ITK reads a file, the file is checked as written (:func:`read_nifti`): a regular
file (no FIFO, device, or link leaving the input folder), a sane raw header, complete
voxel data, an intact gzip stream (CRC-32 and length), finite float voxels. ITK repairs
or ignores what these checks refuse (pixdim 0 read as 1 mm, dim[3] = -5 as one slice,
NaN voxels as 0, a damaged gzip stream as intact).

sform and qform: when both are set (codes > 0) and place some voxel of the grid more
than SFORM_QFORM_TOL_VOXELS (half) of the smallest voxel size apart, the file is refused
(exit 65, both transforms named), not read with one of them: which one is right cannot be
known from the file, and readers disagree on which to pick (ITK by the codes, nibabel
the sform), so either choice would give some users a silently different geometry.

Trigger times of a 4D file come from the raw pixdim[4] and its time unit
(:func:`trigger_times_from_header`): ITK converts 'msec' to seconds.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from deeprecon.runtime.errors import InvalidStudyError, NoInputError, UsageError
from deeprecon.runtime.io.validate import (DIRECTION_TOL, InvalidGeometryError, LabelError,
                                           NonFiniteError, check_regular_file, geometry_problems,
                                           validate_study)
from deeprecon.runtime.study import ACDC_TO_PROJECT, Geometry, Study

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# a label image sits beside its image, named like it plus one of these before the extension
LABEL_SUFFIXES = ("_gt", "_seg", "_label", "_labels")
LABEL_CONVENTIONS = ("project", "acdc")
_GEOMETRY_ATOL = 1e-3  # mm / direction cosine: label grid vs image grid
MAX_VOXEL_BYTES = 4 << 30   # a NIfTI declaring more voxel data is refused before reading
SFORM_QFORM_TOL_VOXELS = 0.5  # sform and qform may place a voxel this far apart (voxel sizes)


def is_nifti(path: Path) -> bool:
    """True when the file name ends with .nii or .nii.gz (case-insensitive)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without .nii / .nii.gz."""
    name = path.name
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def is_label_name(path: Path) -> bool:
    """True when a NIfTI file name marks a label image (``X_gt.nii.gz``, ``X_seg.nii``, ...)."""
    stem = nifti_stem(path).lower()
    return is_nifti(path) and stem.endswith(LABEL_SUFFIXES)


def find_label_file(image_path: str | Path) -> Path | None:
    """The label NIfTI beside an image: ``<stem>{_gt,_seg,_label,_labels}.nii[.gz]``, or None."""
    image_path = Path(image_path)
    stem = nifti_stem(image_path)
    for suf in LABEL_SUFFIXES:
        for ext in NIFTI_SUFFIXES:
            cand = image_path.with_name(stem + suf + ext)
            if os.path.lexists(cand) and not cand.is_dir():
                return cand   # a FIFO or a link out is refused when read, not ignored
    return None


def read_nifti(path: str | Path, *, root: str | Path | None = None):
    """Read a NIfTI file with SimpleITK after checking the file as written.

    root: the input the file was found in (links must not leave it); None for a file
    named by the caller, which may be a link to anywhere (but not to a device or FIFO).
    Before ITK sees the file: it must be a regular file (:func:`check_regular_file`), its
    raw header sane (:func:`_check_raw_header`), its voxel data complete, its gzip stream
    intact (CRC and length) and its float voxels finite (:func:`_check_voxel_data`).
    After: ITK's spacing, origin and direction finite and orthonormal.
    Returns a ``SimpleITK.Image``. Raises NoInputError for a missing file,
    InvalidStudyError (its subclasses InvalidGeometryError, NonFiniteError) otherwise.
    """
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    path = Path(path)
    check_regular_file(path, path if root is None else Path(root))
    hdr = _raw_header(path)
    _check_raw_header(path, hdr)
    _check_voxel_data(path, hdr)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()
                      if ln.strip() and "itk::ERROR" in ln), str(exc).strip().splitlines()[-1])
        raise InvalidStudyError(
            f"{path}: cannot read this NIfTI file ({first})",
            hint="the file may be truncated or not a NIfTI image: re-export or re-download it") from None
    _check_itk_geometry(path, img)
    return img


_NIFTI_LAYOUTS = {
    # sizeof_hdr: (int type, float type, dim offset, pixdim offset, vox_offset (offset,
    # type), datatype offset, qform_code (offset, type), quatern_b.. offset, srow_x offset,
    # xyzt_units (offset, type))
    348: ("h", "f", 40, 76, (108, "f"), 70, (252, "h"), 256, 280, (123, "B")),
    540: ("q", "d", 16, 104, (168, "q"), 12, (344, "i"), 352, 400, (500, "i")),
}
_DAMAGED_GZIP = "the file is truncated or damaged: re-export or re-download it"


def _open_raw(path: Path):
    """The file's bytes as stored in the NIfTI (gzip decompressed for .gz)."""
    import gzip
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _raw_header(path: Path) -> dict:
    """The fields of a NIfTI-1/2 header as written (ITK reports repaired values).

    Raises InvalidStudyError when the file does not start with a NIfTI-1 or NIfTI-2
    header (either byte order) or its gzip stream fails before the header ends."""
    import struct
    import zlib

    try:
        with _open_raw(path) as fh:
            head = fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise InvalidStudyError(f"{path}: cannot read this NIfTI file: the gzip stream is damaged "
                                f"({exc})", hint=_DAMAGED_GZIP) from None
    for order in ("<", ">"):
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] in _NIFTI_LAYOUTS:
            break
    else:
        raise InvalidStudyError(f"{path}: cannot read this NIfTI file: it does not start with a "
                                "NIfTI-1 or NIfTI-2 header (sizeof_hdr 348 or 540)",
                                hint="the file is truncated or not a NIfTI image: re-export it")
    size = struct.unpack(order + "i", head[:4])[0]
    it, ft, o_dim, o_pix, (o_vox, t_vox), o_dt, (o_qc, t_qc), o_q, o_s, (o_u, t_u) = \
        _NIFTI_LAYOUTS[size]
    if len(head) < size:
        raise InvalidStudyError(f"{path}: cannot read this NIfTI file: the header is cut short "
                                f"({len(head)} of {size} bytes)", hint=_DAMAGED_GZIP)
    return {
        "order": order,
        "dim": list(struct.unpack_from(f"{order}8{it}", head, o_dim)),
        "pixdim": list(struct.unpack_from(f"{order}8{ft}", head, o_pix)),
        "vox_offset": struct.unpack_from(order + t_vox, head, o_vox)[0],
        "datatype": struct.unpack_from(order + "h", head, o_dt)[0],
        "bitpix": struct.unpack_from(order + "h", head, o_dt + 2)[0],
        "qform_code": struct.unpack_from(order + t_qc, head, o_qc)[0],
        "sform_code": struct.unpack_from(order + t_qc, head, o_qc + struct.calcsize(t_qc))[0],
        "quatern": list(struct.unpack_from(f"{order}6{ft}", head, o_q)),
        "srow": list(struct.unpack_from(f"{order}12{ft}", head, o_s)),
        "xyzt_units": struct.unpack_from(order + t_u, head, o_u)[0],
    }


# NIfTI datatype code -> bits per voxel (nifti1.h)
_BITPIX = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32,
           1024: 64, 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32}
_FLOAT_TYPES = {16: "f4", 64: "f8"}   # float32, float64: checked for NaN / inf voxels


def _voxel_bytes(hdr: dict) -> int:
    """Bytes of voxel data the header declares: prod(dim[1..dim[0]]) x bitpix / 8."""
    dims = [int(d) for d in hdr["dim"][1:hdr["dim"][0] + 1]]
    return int(np.prod(dims, dtype=object)) * max(int(hdr["bitpix"]), 8) // 8


def _qform_affine(hdr: dict) -> np.ndarray:
    """[4, 4] voxel -> RAS mm from quatern_b/c/d, qoffset_x/y/z, pixdim[0..3] (nifti1.h)."""
    b, c, d, x, y, z = (float(v) for v in hdr["quatern"])
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rot = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                    [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                    [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if hdr["pixdim"][0] < 0 else 1.0
    out = np.eye(4)
    out[:3, :3] = rot * np.array([hdr["pixdim"][1], hdr["pixdim"][2], qfac * hdr["pixdim"][3]])
    out[:3, 3] = (x, y, z)
    return out


def _sform_qform_distance(hdr: dict) -> float:
    """Largest distance (mm) at which the sform and the qform place a corner voxel of the
    grid (the grid's extremes: any voxel is placed at most this far apart)."""
    sform = np.eye(4)
    sform[:3] = np.asarray(hdr["srow"], dtype=np.float64).reshape(3, 4)
    n = [max(int(v), 1) - 1 for v in hdr["dim"][1:4]]
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])]).T
    return float(np.max(np.linalg.norm(((sform - _qform_affine(hdr)) @ corners)[:3], axis=0)))


def _check_raw_header(path: Path, hdr: dict) -> None:
    """The header fields ITK repairs, ignores or chokes on, checked as written, before ITK
    reads the file (so that nifticlib and VNL print nothing).

    dim[0] in 1..7 and dim[1..dim[0]] >= 1 (ITK reads dim[3] = -5 as one slice);
    pixdim[1..3] of the axes in use finite and > 0 (ITK reports 0 as 1 mm); a known
    datatype with its bitpix; the declared voxel data at most MAX_VOXEL_BYTES and, for an
    uncompressed file, inside the file (ITK would zero-fill the rest); srow_x/y/z (when
    sform_code > 0) finite with orthogonal axes; the quaternion and offsets (when
    qform_code > 0) finite and a rotation; when both are set, the sform and the qform
    must agree: they may place no voxel more than SFORM_QFORM_TOL_VOXELS of the smallest
    voxel size apart. Which of two disagreeing transforms is right cannot be known (ITK
    picks one by the codes, other readers the other), so the file is refused naming both.
    Raises InvalidGeometryError naming the fields; InvalidStudyError for the size.
    """
    problems: list[str] = []
    n = int(hdr["dim"][0])
    if not 1 <= n <= 7:
        problems.append(f"dim[0] {n}: needs 1..7")
    else:
        for k in range(1, n + 1):
            if hdr["dim"][k] < 1:
                problems.append(f"dim[{k}] {hdr['dim'][k]}: needs >= 1")
        for k in range(1, min(n, 3) + 1):
            v = float(hdr["pixdim"][k])
            if not np.isfinite(v) or v <= 0:
                problems.append(f"pixdim[{k}] {v:g}: needs a finite value > 0")
    want = _BITPIX.get(int(hdr["datatype"]))
    if want is None:
        problems.append(f"datatype {hdr['datatype']}: not a NIfTI data type")
    elif int(hdr["bitpix"]) != want:
        problems.append(f"bitpix {hdr['bitpix']}: datatype {hdr['datatype']} has {want} bits "
                        "per voxel")
    srow, quatern = np.asarray(hdr["srow"], dtype=np.float64), np.asarray(hdr["quatern"])
    sform_ok = qform_ok = False
    if hdr["sform_code"] > 0 and not np.all(np.isfinite(srow)):
        problems.append(f"srow_x/y/z {np.round(srow, 6).tolist()}: needs finite values "
                        f"(sform_code {hdr['sform_code']})")
    elif hdr["sform_code"] > 0:
        m = srow.reshape(3, 4)[:, :3]
        with np.errstate(all="ignore"):
            axes = m / np.linalg.norm(m, axis=0, keepdims=True)
            err = np.max(np.abs(axes.T @ axes - np.eye(3)))
        if not np.isfinite(err) or err > DIRECTION_TOL:
            problems.append(f"srow_x/y/z {np.round(srow, 6).tolist()}: the axes are not "
                            f"orthogonal (tolerance {DIRECTION_TOL:g}; ITK would ignore them)")
        sform_ok = True
    if hdr["qform_code"] > 0 and not np.all(np.isfinite(quatern)):
        problems.append(f"quatern_b/c/d, qoffset_x/y/z {np.round(quatern, 6).tolist()}: "
                        f"needs finite values (qform_code {hdr['qform_code']})")
    elif hdr["qform_code"] > 0:
        b, c, d = (float(v) for v in quatern[:3])
        norm2 = b * b + c * c + d * d
        qfac = float(hdr["pixdim"][0])
        if not norm2 <= 1 + DIRECTION_TOL:
            problems.append(f"quatern_b/c/d {[b, c, d]}: b^2 + c^2 + d^2 = {norm2:g} > 1, "
                            "not a rotation (ITK would rescale it)")
        elif not np.isfinite(qfac):
            problems.append(f"pixdim[0] (qfac) {qfac:g}: needs -1 or 1")
        else:
            qform_ok = True
    if sform_ok and qform_ok and not problems:
        dist = _sform_qform_distance(hdr)
        tol = SFORM_QFORM_TOL_VOXELS * min(float(v) for v in hdr["pixdim"][1:min(n, 3) + 1])
        if not dist <= tol:
            problems.append(
                f"sform (sform_code {hdr['sform_code']}, srow_x/y/z "
                f"{np.round(srow, 4).tolist()}) and qform (qform_code {hdr['qform_code']}, "
                f"quatern_b/c/d, qoffset_x/y/z {np.round(quatern, 4).tolist()}) disagree: "
                f"they place voxels up to {dist:.3g} mm apart (tolerance {tol:.3g} mm, "
                f"{SFORM_QFORM_TOL_VOXELS:g} voxel)")
    if problems:
        raise InvalidGeometryError(
            f"{path}: invalid NIfTI header: {'; '.join(problems[:3])}"
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""),
            hint="the file was written by a broken conversion: fix its header or re-export it")
    dims = [int(d) for d in hdr["dim"][1:n + 1]]
    n_bytes = _voxel_bytes(hdr)
    if n_bytes > MAX_VOXEL_BYTES:
        raise InvalidStudyError(
            f"{path}: dim {dims} x bitpix {hdr['bitpix']} declare {n_bytes} bytes of voxel data, "
            f"more than the {MAX_VOXEL_BYTES >> 30} GiB this loader reads; nothing was allocated",
            hint="the header is damaged, or the image is far larger than a cine stack")
    if not np.isfinite(hdr["vox_offset"]) or not 0 <= hdr["vox_offset"] <= 1 << 30:
        raise InvalidGeometryError(f"{path}: invalid NIfTI header: vox_offset "
                                   f"{hdr['vox_offset']:g}: needs a finite byte offset",
                                   hint="the file was written by a broken conversion: re-export it")
    if not path.name.lower().endswith(".gz"):
        size = path.stat().st_size
        expected = int(hdr["vox_offset"]) + n_bytes
        if expected > size:
            raise InvalidStudyError(
                f"{path}: cannot read this NIfTI file: {expected - size} bytes of voxel data "
                f"missing ({size} of {expected} bytes; dim {dims} x bitpix {hdr['bitpix']} from "
                f"offset {int(hdr['vox_offset'])})",
                hint="the file is truncated or its header damaged: re-export or re-download it")


def _check_voxel_data(path: Path, hdr: dict) -> None:
    """Streams the voxel data once, before ITK reads it: a .gz file is decompressed to its
    end, so that gzip's CRC-32 and length check run (ITK stops reading after the voxels
    and accepts a damaged stream as intact) and the uncompressed size is known; float
    voxels are counted for NaN / inf (ITK reads NaN as 0). An uncompressed non-float file
    needs no pass (its size is checked from the header).
    Raises InvalidStudyError for a damaged or short stream, NonFiniteError for NaN / inf.
    """
    import zlib

    gz = path.name.lower().endswith(".gz")
    ftype = _FLOAT_TYPES.get(int(hdr["datatype"]))
    if not gz and ftype is None:
        return
    start = int(hdr["vox_offset"])
    expected = start + _voxel_bytes(hdr)
    dt = np.dtype(hdr["order"] + (ftype or "u1"))
    size = bad = 0
    carry = b""
    try:
        with _open_raw(path) as fh:
            while chunk := fh.read(1 << 22):
                lo, hi = max(start - size, 0), min(expected - size, len(chunk))
                size += len(chunk)
                if ftype is None or hi <= lo:
                    continue
                data = carry + chunk[lo:hi]
                cut = len(data) - len(data) % dt.itemsize
                carry = data[cut:]
                bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:cut], dtype=dt))))
    except (EOFError, OSError, zlib.error) as exc:
        raise InvalidStudyError(
            f"{path}: cannot read this NIfTI file: the gzip stream is cut short or damaged "
            f"({exc}; {size} of {expected} bytes read)", hint=_DAMAGED_GZIP) from None
    if size < expected:
        raise InvalidStudyError(
            f"{path}: cannot read this NIfTI file: {expected - size} bytes of voxel data missing "
            f"({size} of {expected} bytes)",
            hint="the file is truncated: re-export or re-download it")
    if bad:
        raise NonFiniteError(
            f"{path}: {bad} NaN or infinite voxel values (datatype {hdr['datatype']}); "
            "they are refused, not replaced",
            hint="the image file is damaged or was written by a broken conversion; re-export it")


def _check_itk_geometry(path: Path, img) -> None:
    """ITK's spacing, origin and direction (after its own conversions) finite, in range
    and orthonormal. Raises InvalidGeometryError naming the value."""
    dim = img.GetDimension()
    k = min(dim, 3)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:k]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:k]
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:k, :k]
    names = {"pixel_spacing": "spacing", "position": "origin"}
    problems = geometry_problems(pixel_spacing=spacing[:2],
                                 position=np.r_[origin, [0.0] * (3 - k)], names=names)
    if k == 3:
        problems += geometry_problems(thickness=spacing[2], names={"thickness": "spacing z"})
    with np.errstate(all="ignore"):
        gram = direction.T @ direction
    if not np.all(np.isfinite(direction)) or np.max(np.abs(gram - np.eye(k))) > DIRECTION_TOL:
        problems.append(f"direction {np.round(direction, 6).ravel().tolist()}: needs finite, "
                        f"orthonormal axes (tolerance {DIRECTION_TOL:g})")
    if problems:
        raise InvalidGeometryError(
            f"{path}: invalid NIfTI geometry: {'; '.join(problems[:3])}",
            hint="the file was written by a broken conversion: fix its header or re-export it")


def trigger_times_from_header(hdr: dict, n_phases: int) -> tuple[np.ndarray, str | None]:
    """[P] ms from a 4D NIfTI's pixdim[4] and xyzt_units as written; NaN (and a warning)
    when they are not usable.

    ITK converts pixdim[4] to seconds by the time unit (320 in 'msec' becomes 0.32), so the
    raw header is read instead. Units: 'msec' as written, 'usec' / 1000, 'sec' x 1000 when
    the whole cine then lasts under 3 s; 'sec' with a longer cine (NIfTI writers, ITK among
    them, label the time axis 'sec' whatever it holds) and no unit are read as ms. A
    spacing of exactly 1 is the writers' default ("unknown"). A plausible phase interval is
    2..2000 ms.
    """
    dt = float(hdr["pixdim"][4])
    time_unit = int(hdr["xyzt_units"]) & 0x38  # 8 sec, 16 msec, 24 usec
    nan = np.full(n_phases, np.nan)
    if not np.isfinite(dt) or dt <= 0 or dt == 1.0:
        return nan, None
    if time_unit == 8 and dt * n_phases < 3.0:
        dt_ms = dt * 1000.0
    elif time_unit == 24:
        dt_ms = dt / 1000.0
    else:
        dt_ms = dt
    if not 2.0 <= dt_ms <= 2000.0:
        unit = {8: "sec", 16: "msec", 24: "usec"}.get(time_unit, "no unit")
        return nan, (f"time spacing pixdim[4] {dt:g} ({unit}) of the 4D NIfTI is not a plausible "
                     "phase interval (2..2000 ms); trigger times are unknown")
    return np.arange(n_phases, dtype=np.float64) * dt_ms, None


def image_to_arrays(img, *, what: str = "") -> tuple[np.ndarray, Geometry, bool]:
    """Convert a SimpleITK 2D/3D/4D image into the Study layout.

    Returns (array [P, S, H, W] in the image's pixel type, Geometry, reversed (slice order
    flipped to follow the normal)). Trigger times: :func:`trigger_times_from_header`.
    """
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidStudyError(
            f"{what}{img.GetNumberOfComponentsPerPixel()}-component pixels (colour or vector "
            "image); a cine MR study needs one grey value per pixel")
    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)
    if dim == 2:
        arr = arr[None, None]
    elif dim == 3:
        arr = arr[None]
    elif dim != 4:
        raise InvalidStudyError(f"{what}{dim}D image; expected 3D (one phase) or 4D (cine, time last)")
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if dim == 2:
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction, origin, spacing = d3, np.r_[origin, 0.0], np.r_[spacing, 1.0]
    direction = direction[:3, :3]
    origin = origin[:3]
    row_dir, col_dir, slice_dir = direction[:, 0], direction[:, 1], direction[:, 2]
    n_slices = arr.shape[1]
    origins = origin[None, :] + np.arange(n_slices)[:, None] * spacing[2] * slice_dir[None, :]
    normal = np.cross(row_dir, col_dir)
    reversed_ = bool(n_slices > 1 and float(np.dot(slice_dir, normal)) < 0)
    if reversed_:
        origins = origins[::-1]
        arr = arr[:, ::-1]
        log.debug("%sslice axis points against row x col: slice order reversed", what)
    geometry = Geometry(origins=origins, row_dir=row_dir, col_dir=col_dir,
                        pixel_spacing=(float(spacing[1]), float(spacing[0])),
                        slice_thickness=None)  # NIfTI stores the spacing, not the thickness
    return np.ascontiguousarray(arr), geometry, reversed_


def labels_to_project(lab: np.ndarray, convention: str, path: Path | str) -> np.ndarray:
    """Integer label array in ``convention`` -> uint8 project labels (1 LVC, 2 LVM, 3 RVC).

    Raises LabelError (exit 65) for non-integer values or values outside 0..3."""
    if np.issubdtype(lab.dtype, np.floating):
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise LabelError(f"{path}: label image holds non-integer values",
                             hint="pass a label map (integers 0..3), not a probability map")
    values = np.unique(lab)
    if values.size and (values.min() < 0 or values.max() > 3):
        bad = [int(v) for v in values if v < 0 or v > 3]
        conv = ("project: 1 LVC, 2 LVM, 3 RVC" if convention == "project"
                else "ACDC: 1 RV, 2 MYO, 3 LV")
        raise LabelError(f"{path}: label values {bad[:10]} outside 0..3 ({conv})",
                         hint="use a label map with background 0 and the three heart classes")
    lab = lab.astype(np.uint8)
    if convention == "acdc":
        lab = ACDC_TO_PROJECT[lab]
    return lab


def read_labels(path: str | Path, *, like, image_shape: tuple[int, ...],
                label_convention: str = "project", what: str = "",
                root: str | Path | None = None) -> np.ndarray:
    """Read a label NIfTI that must share the grid of the SimpleITK image ``like``
    (``root``: the input folder it was found in, see :func:`read_nifti`).

    Returns uint8 [P, S, H, W] in the project convention, slice order as the image's
    Study (reversed alike for a left-handed grid).
    Raises LabelError when the grid (size, spacing, origin, direction) differs.
    """
    path = Path(path)
    limg = read_nifti(path, root=root)
    if tuple(limg.GetSize()) != tuple(like.GetSize()):
        raise LabelError(
            f"{path}: label size {tuple(limg.GetSize())} differs from the image's "
            f"{tuple(like.GetSize())} (x, y, z[, t])",
            hint="the label file must be on the image's grid (same voxels)")
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        a = np.asarray(getattr(limg, name)(), dtype=np.float64)
        b = np.asarray(getattr(like, name)(), dtype=np.float64)
        if a.shape != b.shape or not np.allclose(a, b, atol=_GEOMETRY_ATOL, rtol=1e-5):
            raise LabelError(
                f"{path}: label {name[3:].lower()} {np.round(a, 4).tolist()} differs from the "
                f"image's {np.round(b, 4).tolist()}",
                hint="the label file must be on the image's grid (same geometry header)")
    lab, _, _ = image_to_arrays(limg, what=what)
    if lab.shape != image_shape:
        raise LabelError(f"{path}: label array {lab.shape} != image array {image_shape}")
    return labels_to_project(lab, label_convention, path)


def load_nifti(path: str | Path, *, labels: str | Path | bool | None = None,
               label_convention: str = "project", validate: bool = True,
               root: str | Path | None = None) -> Study:
    """Load a 3D (one phase) or 4D (cine, time last) NIfTI image as a Study.

    path:    the image, ``.nii`` or ``.nii.gz``.
    labels:  a label NIfTI on the same grid; None looks beside the image for
             ``<stem>_gt/_seg/_label/_labels.nii[.gz]``; False loads no labels.
    root:    the input folder the image was found in (None: the image was named itself);
             files read must be regular files inside it (a label found beside the image:
             inside the image's folder), see :func:`read_nifti`.
    label_convention: "project" (1 LVC, 2 LVM, 3 RVC) or "acdc" (1 RV, 2 MYO, 3 LV,
             remapped with ACDC_TO_PROJECT).
    Returns a Study with images [P, S, H, W] float32 (exact values of the file),
    labels uint8 or None, trigger times from the 4th axis' spacing (ms) when given.
    """
    path = Path(path)
    if label_convention not in LABEL_CONVENTIONS:
        raise UsageError(f"label_convention must be one of {LABEL_CONVENTIONS}, "
                         f"got {label_convention!r}")
    if not os.path.lexists(path):
        raise NoInputError(f"{path}: no such file", hint="check the path")
    if not is_nifti(path):
        raise UsageError(f"{path}: not a NIfTI file name (.nii or .nii.gz)")
    what = f"{path}: "
    img = read_nifti(path, root=root)
    arr, geometry, reversed_ = image_to_arrays(img, what=what)
    warnings: list[str] = []
    trig = np.full(arr.shape[0], np.nan)
    if img.GetDimension() == 4:
        trig, w = trigger_times_from_header(_raw_header(path), arr.shape[0])
        if w:
            warnings.append(f"{what}{w}")
    label_path: Path | None
    if labels is None:
        label_path = None if is_label_name(path) else find_label_file(path)
    elif labels is False:
        label_path = None
    else:
        label_path = Path(labels)
        if not os.path.lexists(label_path):
            raise NoInputError(f"{label_path}: no such label file", hint="check the path")
    lab = None
    if label_path is not None:
        # a label found beside the image must be inside its folder; one named is as named
        label_root = (root or path.parent) if labels is None else label_path
        lab = read_labels(label_path, like=img, image_shape=arr.shape,
                          label_convention=label_convention, what=f"{label_path}: ",
                          root=label_root)
        log.debug("labels from %s (%s convention)", label_path, label_convention)
    info = {"file": path.name, "dtype": str(arr.dtype)}
    if label_path is not None:
        info["label_file"] = label_path.name
        info["label_convention"] = label_convention
    if reversed_:
        info["slice_order_reversed"] = True
    study = Study(images=arr.astype(np.float32), geometry=geometry, trigger_times=trig,
                  labels=lab, description=nifti_stem(path), source=str(path),
                  source_format="nifti", info=info, warnings=list(warnings))
    for w in warnings:
        log.warning("%s", w)
    return validate_study(study) if validate else study

