"""NIfTI loader: a 3D volume (one phase) or a 4D cine (time last), with optional labels.

Geometry comes from SimpleITK (patient LPS, mm): the direction's first column is the
row direction (increasing column index), the second the column direction, slice ``s``
of the array lies at ``origin + s * spacing_z * direction[:, 2]``. Slices are returned
sorted by increasing position along ``row_dir x col_dir``: a left-handed volume (third
axis against that normal) has its slice order reversed, labels alike.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from deeprecon.runtime.errors import InvalidStudyError, NoInputError, UsageError
from deeprecon.runtime.io.validate import (DIRECTION_TOL, InvalidGeometryError, LabelError,
                                           NonFiniteError, geometry_problems, validate_study)
from deeprecon.runtime.study import ACDC_TO_PROJECT, Geometry, Study

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# a label image sits beside its image, named like it plus one of these before the extension
LABEL_SUFFIXES = ("_gt", "_seg", "_label", "_labels")
LABEL_CONVENTIONS = ("project", "acdc")
_GEOMETRY_ATOL = 1e-3  # mm / direction cosine: label grid vs image grid
MAX_VOXEL_BYTES = 4 << 30   # a NIfTI declaring more voxel data is refused before reading


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
            if cand.is_file():
                return cand
    return None


def read_nifti(path: str | Path):
    """Read a NIfTI file with SimpleITK (console warnings silenced).

    Returns a ``SimpleITK.Image``. Raises NoInputError for a missing file and
    InvalidStudyError for a file that cannot be read (truncated, not NIfTI).
    """
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    path = Path(path)
    if not path.is_file():
        raise NoInputError(f"{path}: no such NIfTI file", hint="check the path")
    _check_declared_size(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()
                      if ln.strip() and "itk::ERROR" in ln), str(exc).strip().splitlines()[-1])
        raise InvalidStudyError(
            f"{path}: cannot read this NIfTI file ({first})",
            hint="the file may be truncated or not a NIfTI image: re-export or re-download it") from None
    _check_complete(path, img)
    _check_header(path, img)
    return img


def _check_complete(path: Path, img) -> None:
    """ITK zero-fills a truncated NIfTI without a word: check the voxel bytes are all there.

    Expected size = vox_offset + prod(dim[1..]) * bitpix / 8 (uncompressed bytes).
    Raises InvalidStudyError naming how many bytes are missing.
    """
    import gzip
    import zlib

    try:
        ndim = int(img.GetMetaData("dim[0]"))
        n_vox = int(np.prod([int(img.GetMetaData(f"dim[{k}]")) for k in range(1, ndim + 1)]))
        expected = int(float(img.GetMetaData("vox_offset"))) + n_vox * int(img.GetMetaData("bitpix")) // 8
    except (RuntimeError, ValueError):
        return  # not the metadata of a NIfTI reader: nothing to compare against
    if path.name.lower().endswith(".gz"):
        # Fast path: a complete single-member gzip ends with ISIZE, the uncompressed size
        # mod 2^32; a truncated stream has lost that trailer. Anything else (a mismatch,
        # multi-member gzip, trailing bytes) is decided by decompressing the whole stream.
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            if fh.tell() >= 18:
                fh.seek(-4, 2)
                if int.from_bytes(fh.read(4), "little") == expected % (1 << 32):
                    return
        size = 0
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 16):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise InvalidStudyError(
                f"{path}: cannot read this NIfTI file: the gzip stream is cut short or damaged "
                f"({exc}; {size} of {expected} bytes present)",
                hint="the file is truncated: re-export or re-download it") from None
    else:
        size = path.stat().st_size
    if size < expected:
        raise InvalidStudyError(
            f"{path}: cannot read this NIfTI file: {expected - size} bytes of voxel data missing "
            f"({size} of {expected} bytes)",
            hint="the file is truncated: re-export or re-download it")


_NIFTI_LAYOUTS = {
    # sizeof_hdr: (int type, float type, dim offset, pixdim offset, vox_offset (offset,
    # type), datatype offset, qform_code (offset, type), quatern_b.. offset, srow_x offset)
    348: ("h", "f", 40, 76, (108, "f"), 70, (252, "h"), 256, 280),
    540: ("q", "d", 16, 104, (168, "q"), 12, (344, "i"), 352, 400),
}


def _raw_header(path: Path) -> dict | None:
    """The fields of a NIfTI-1/2 header as written (ITK reports repaired values)."""
    import gzip
    import struct

    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(540)
    except (OSError, EOFError):
        return None
    for order in ("<", ">"):
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] in _NIFTI_LAYOUTS:
            break
    else:
        return None
    size = struct.unpack(order + "i", head[:4])[0]
    it, ft, o_dim, o_pix, (o_vox, t_vox), o_dt, (o_qc, t_qc), o_q, o_s = _NIFTI_LAYOUTS[size]
    if len(head) < size:
        return None
    isz, fsz = struct.calcsize(it), struct.calcsize(ft)
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
        "_isz": isz, "_fsz": fsz,
    }


# NIfTI datatype code -> bits per voxel (nifti1.h)
_BITPIX = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32,
           1024: 64, 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32}


def _check_declared_size(path: Path) -> None:
    """Before ITK allocates anything: the voxel data the raw header declares must be at
    most MAX_VOXEL_BYTES and, for an uncompressed file, fit in the file (ITK would
    zero-fill the rest). Raises InvalidStudyError naming dim/bitpix."""
    hdr = _raw_header(path)
    if hdr is None or not 1 <= hdr["dim"][0] <= 7:
        return  # _check_header (after ITK's own checks) names these
    dims = [int(d) for d in hdr["dim"][1:hdr["dim"][0] + 1]]
    if any(d < 1 for d in dims):
        return
    bitpix = int(hdr["bitpix"])
    n_bytes = int(np.prod(dims, dtype=object)) * max(bitpix, 8) // 8
    if n_bytes > MAX_VOXEL_BYTES:
        raise InvalidStudyError(
            f"{path}: dim {dims} x bitpix {bitpix} declare {n_bytes} bytes of voxel data, more "
            f"than the {MAX_VOXEL_BYTES >> 30} GiB this loader reads; nothing was allocated",
            hint="the header is damaged, or the image is far larger than a cine stack")
    if not path.name.lower().endswith(".gz") and np.isfinite(hdr["vox_offset"]):
        size = path.stat().st_size
        expected = int(hdr["vox_offset"]) + n_bytes
        if expected > size:
            raise InvalidStudyError(
                f"{path}: cannot read this NIfTI file: {expected - size} bytes of voxel data "
                f"missing ({size} of {expected} bytes; dim {dims} x bitpix {bitpix} from "
                f"offset {int(hdr['vox_offset'])})",
                hint="the file is truncated or its header damaged: re-export or re-download it")


def _check_header(path: Path, img) -> None:
    """The NIfTI header fields ITK repairs or ignores without a word, checked as written.

    dim[1..dim[0]] >= 1 (ITK reads dim[3] = -5 as one slice); pixdim[1..3] of the axes
    in use finite and > 0 (ITK reports 0 as 1 mm); srow_x/y/z (when sform_code > 0) and
    the quaternion and offsets (when qform_code > 0) finite; ITK's spacing, origin and
    direction finite and orthonormal; float voxels finite (ITK reads NaN as 0).
    Raises InvalidGeometryError / NonFiniteError naming the field.
    """
    problems: list[str] = []
    hdr = _raw_header(path)
    if hdr is not None:
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
        if hdr["sform_code"] > 0 and not np.all(np.isfinite(hdr["srow"])):
            problems.append(f"srow_x/y/z {np.round(hdr['srow'], 6).tolist()}: needs finite values "
                            f"(sform_code {hdr['sform_code']})")
        elif hdr["sform_code"] > 0:
            m = np.asarray(hdr["srow"], dtype=np.float64).reshape(3, 4)[:, :3]
            with np.errstate(all="ignore"):
                axes = m / np.linalg.norm(m, axis=0, keepdims=True)
                err = np.max(np.abs(axes.T @ axes - np.eye(3)))
            if not np.isfinite(err) or err > DIRECTION_TOL:
                problems.append(f"srow_x/y/z {np.round(hdr['srow'], 6).tolist()}: the axes are not "
                                f"orthogonal (tolerance {DIRECTION_TOL:g}; ITK would ignore them)")
        if hdr["qform_code"] > 0 and not np.all(np.isfinite(hdr["quatern"])):
            problems.append(f"quatern_b/c/d, qoffset_x/y/z {np.round(hdr['quatern'], 6).tolist()}: "
                            f"needs finite values (qform_code {hdr['qform_code']})")
        elif hdr["qform_code"] > 0:
            b, c, d = hdr["quatern"][:3]
            with np.errstate(all="ignore"):
                norm2 = float(b * b + c * c + d * d)
            if not norm2 <= 1 + DIRECTION_TOL:
                problems.append(f"quatern_b/c/d {[b, c, d]}: b^2 + c^2 + d^2 = {norm2:g} > 1, "
                                "not a rotation (ITK would rescale it)")
            qfac = float(hdr["pixdim"][0])
            if not np.isfinite(qfac):
                problems.append(f"pixdim[0] (qfac) {qfac:g}: needs -1 or 1")
        want = _BITPIX.get(int(hdr["datatype"]))
        if want is not None and int(hdr["bitpix"]) != want:
            problems.append(f"bitpix {hdr['bitpix']}: datatype {hdr['datatype']} has {want} bits "
                            "per voxel")
    if not problems:
        dim = img.GetDimension()
        k = min(dim, 3)
        spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:k]
        origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:k]
        direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:k, :k]
        names = {"pixel_spacing": "spacing", "position": "origin"}
        problems += geometry_problems(pixel_spacing=spacing[:2],
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
            f"{path}: invalid NIfTI header: {'; '.join(problems[:3])}"
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""),
            hint="the file was written by a broken conversion: fix its header or re-export it")
    if hdr is not None:
        _check_raw_finite(path, hdr)


def _check_raw_finite(path: Path, hdr: dict) -> None:
    """Float voxels as stored (ITK reads NaN as 0): NonFiniteError when any is NaN or inf."""
    import gzip

    dtypes = {16: "f4", 64: "f8"}
    if hdr["datatype"] not in dtypes or not np.isfinite(hdr["vox_offset"]):
        return
    dt = np.dtype(hdr["order"] + dtypes[hdr["datatype"]])
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            fh.seek(int(hdr["vox_offset"]))
            data = fh.read()
    except (OSError, EOFError, ValueError):
        return  # already read by ITK and checked complete: nothing more to learn here
    raw = np.frombuffer(data[: len(data) // dt.itemsize * dt.itemsize], dtype=dt)
    bad = int(np.count_nonzero(~np.isfinite(raw)))
    if bad:
        raise NonFiniteError(
            f"{path}: {bad} NaN or infinite voxel values (datatype {hdr['datatype']}); "
            "they are refused, not replaced",
            hint="the image file is damaged or was written by a broken conversion; re-export it")


def _trigger_times_from_spacing(img, n_phases: int) -> tuple[np.ndarray, str | None]:
    """[P] ms from a 4D image's time spacing; NaN (and a warning) when it is not usable.

    ITK reports pixdim[4] as written; NIfTI writers (ITK among them) often label it as
    seconds whatever it holds, so the unit is inferred: an interval below 3 s over the
    whole cine labelled 'sec' is read as seconds, anything else as milliseconds. A
    spacing of exactly 1 is the writers' default ("unknown").
    """
    dt = float(img.GetSpacing()[3])
    units = 0
    try:
        units = int(img.GetMetaData("xyzt_units")) if img.HasMetaDataKey("xyzt_units") else 0
    except ValueError:
        units = 0
    time_unit = units & 0x38  # 8 sec, 16 msec, 24 usec
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
        return nan, (f"time spacing {dt:g} of the 4D NIfTI is not a plausible phase interval; "
                     "trigger times are unknown")
    return np.arange(n_phases, dtype=np.float64) * dt_ms, None


def image_to_arrays(img, *, what: str = "") -> tuple[np.ndarray, Geometry, np.ndarray, bool, list[str]]:
    """Convert a SimpleITK 2D/3D/4D image into the Study layout.

    Returns (array [P, S, H, W] in the image's pixel type, Geometry, trigger_times [P] ms
    (NaN unknown), reversed (slice order flipped to follow the normal), warnings).
    """
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidStudyError(
            f"{what}{img.GetNumberOfComponentsPerPixel()}-component pixels (colour or vector "
            "image); a cine MR study needs one grey value per pixel")
    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)
    warnings: list[str] = []
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
    if dim == 4:
        trig, w = _trigger_times_from_spacing(img, arr.shape[0])
        if w:
            warnings.append(f"{what}{w}")
    else:
        trig = np.full(arr.shape[0], np.nan)
    return np.ascontiguousarray(arr), geometry, trig, reversed_, warnings


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
                label_convention: str = "project", what: str = "") -> np.ndarray:
    """Read a label NIfTI that must share the grid of the SimpleITK image ``like``.

    Returns uint8 [P, S, H, W] in the project convention, slice order as the image's
    Study (reversed alike for a left-handed grid).
    Raises LabelError when the grid (size, spacing, origin, direction) differs.
    """
    path = Path(path)
    limg = read_nifti(path)
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
    lab, _, _, _, _ = image_to_arrays(limg, what=what)
    if lab.shape != image_shape:
        raise LabelError(f"{path}: label array {lab.shape} != image array {image_shape}")
    return labels_to_project(lab, label_convention, path)


def load_nifti(path: str | Path, *, labels: str | Path | bool | None = None,
               label_convention: str = "project", validate: bool = True) -> Study:
    """Load a 3D (one phase) or 4D (cine, time last) NIfTI image as a Study.

    path:    the image, ``.nii`` or ``.nii.gz``.
    labels:  a label NIfTI on the same grid; None looks beside the image for
             ``<stem>_gt/_seg/_label/_labels.nii[.gz]``; False loads no labels.
    label_convention: "project" (1 LVC, 2 LVM, 3 RVC) or "acdc" (1 RV, 2 MYO, 3 LV,
             remapped with ACDC_TO_PROJECT).
    Returns a Study with images [P, S, H, W] float32 (exact values of the file),
    labels uint8 or None, trigger times from the 4th axis' spacing (ms) when given.
    """
    path = Path(path)
    if label_convention not in LABEL_CONVENTIONS:
        raise UsageError(f"label_convention must be one of {LABEL_CONVENTIONS}, "
                         f"got {label_convention!r}")
    if not path.exists():
        raise NoInputError(f"{path}: no such file", hint="check the path")
    if not is_nifti(path):
        raise UsageError(f"{path}: not a NIfTI file name (.nii or .nii.gz)")
    what = f"{path}: "
    img = read_nifti(path)
    arr, geometry, trig, reversed_, warnings = image_to_arrays(img, what=what)
    label_path: Path | None
    if labels is None:
        label_path = None if is_label_name(path) else find_label_file(path)
    elif labels is False:
        label_path = None
    else:
        label_path = Path(labels)
        if not label_path.is_file():
            raise NoInputError(f"{label_path}: no such label file", hint="check the path")
    lab = None
    if label_path is not None:
        lab = read_labels(label_path, like=img, image_shape=arr.shape,
                          label_convention=label_convention, what=f"{label_path}: ")
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

