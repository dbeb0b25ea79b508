"""ACDC patient folder loader (``patientNNN_frameXX.nii.gz`` + ``_gt``, ``Info.cfg``).

The ED and ES frames named in ``Info.cfg`` become two phases, ordered by frame number.
Labels are remapped from ACDC's 1 RV / 2 MYO / 3 LV to the project's 1 LVC / 2 LVM / 3 RVC.
When a frame file is absent but the full cine ``patientNNN_4d.nii.gz`` is there (the
organisers' complete distribution), the frame is taken from it (frame numbers are 1-based).

Every file read (Info.cfg, frames, labels, the cine) must be a regular file inside the
folder: a FIFO, a device, or a symlink leaving the folder is refused (exit 65) unopened.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from deeprecon.runtime.errors import InvalidStudyError, NoInputError
from deeprecon.runtime.io.nifti import (NIFTI_SUFFIXES, image_to_arrays, nifti_stem, read_labels,
                                        read_nifti)
from deeprecon.runtime.io.validate import (GeometryMismatchError, add_warning, check_regular_file,
                                           validate_study)
from deeprecon.runtime.study import Study

log = logging.getLogger(__name__)

FRAME_RE = re.compile(r"^(patient\d+)_frame(\d+)\.nii(\.gz)?$", re.IGNORECASE)
CINE_RE = re.compile(r"^(patient\d+)_4d\.nii(\.gz)?$", re.IGNORECASE)
INFO_FILE = "Info.cfg"
#: ACDC's label files: patientNNN_frameNN_gt.nii[.gz], in ACDC's 1 RV, 2 MYO, 3 LV
LABEL_FILE_RE = re.compile(r"^(patient\d+)_frame(\d+)_gt\.nii(\.gz)?$", re.IGNORECASE)
MAX_INFO_BYTES = 64 << 10


def is_acdc_folder(folder: str | Path) -> bool:
    """True for a folder holding ``Info.cfg`` and ``patient*_frame*.nii[.gz]`` (or ``_4d``)."""
    folder = Path(folder)
    info = folder / INFO_FILE
    if not os.path.lexists(info) or info.is_dir():   # a FIFO Info.cfg is refused on load
        return False
    return any(FRAME_RE.match(p.name) or CINE_RE.match(p.name) for p in folder.iterdir())


def label_convention_of(path: str | Path) -> tuple[str, str]:
    """The label convention of a label file, judged from its name as the loader does:
    ``("acdc", why)`` for ACDC's ``patientNNN_frameNN_gt.nii[.gz]`` (1 RV, 2 MYO, 3 LV),
    else ``("project", why)`` (1 LVC, 2 LVM, 3 RVC: what deeprecon-rt writes)."""
    name = Path(path).name
    if LABEL_FILE_RE.match(name):
        return "acdc", f"ACDC file name {name} (patientNNN_frameNN_gt)"
    return "project", f"{name} is not an ACDC patientNNN_frameNN_gt file"


def parse_info_cfg(path: str | Path, *, root: str | Path | None = None) -> dict[str, str]:
    """``key: value`` lines of an ACDC Info.cfg as a dict of strings (keys as written).

    root: the folder it must lie in (no FIFO, device, or link leaving it); None: itself.
    A file over MAX_INFO_BYTES is refused (the real one has a few short lines)."""
    path = Path(path)
    check_regular_file(path, path if root is None else Path(root))
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_INFO_BYTES + 1)
        text = raw.decode("utf-8", errors="replace")
    except OSError as exc:
        raise InvalidStudyError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_INFO_BYTES:
        raise InvalidStudyError(f"{path}: more than {MAX_INFO_BYTES >> 10} KiB: not an ACDC "
                                "Info.cfg (a few 'key: value' lines)")
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def _num(cfg: dict[str, str], key: str, kind=float):
    """A finite number from Info.cfg (an integral one for ``kind=int``), else None."""
    try:
        v = float(cfg[key]) if key in cfg else None
    except ValueError:
        return None
    if v is None or not np.isfinite(v) or (kind is int and v != round(v)):
        return None
    return kind(v)


def _gt_file(folder: Path, frame_path: Path | None, patient: str | None, frame: int) -> Path | None:
    """The ``_gt`` label file of one frame, or None."""
    stems = []
    if frame_path is not None:
        stems.append(nifti_stem(frame_path))
    if patient:
        stems.append(f"{patient}_frame{frame:02d}")
    for stem in stems:
        for ext in NIFTI_SUFFIXES:
            cand = folder / f"{stem}_gt{ext}"
            if os.path.lexists(cand) and not cand.is_dir():
                return cand   # a FIFO or a link out is refused when read, not ignored
    return None


def load_acdc(folder: str | Path, *, validate: bool = True) -> Study:
    """Load an ACDC patient folder as a 2-phase Study (ED and ES).

    Returns images [2, S, H, W] float32 (raw intensities), labels uint8 [2, S, H, W] in the
    project convention (None, with a warning, when a ``_gt`` file is missing),
    ``phase_ids`` = ACDC frame numbers (increasing), ``ed_phase``/``es_phase`` indices,
    trigger_times NaN (ACDC does not give them), ``info`` = {patient, group, height_cm,
    weight_kg, nb_frames, ed_frame, es_frame}.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NoInputError(f"{folder}: no such folder", hint="check the path")
    info_path = folder / INFO_FILE
    if not os.path.lexists(info_path):
        raise NoInputError(f"{folder}: no {INFO_FILE} (not an ACDC patient folder)")
    cfg = parse_info_cfg(info_path, root=folder)
    ed, es = _num(cfg, "ED", int), _num(cfg, "ES", int)
    if ed is None or es is None:
        raise InvalidStudyError(f"{info_path}: ED and ES frame numbers missing or not finite whole numbers "
                                f"(found keys {sorted(cfg)})",
                                hint="Info.cfg needs lines like 'ED: 1' and 'ES: 12'")
    n_frames = _num(cfg, "NbFrame", int)
    for key, v in (("ED", ed), ("ES", es)):
        if v < 1 or (n_frames is not None and n_frames >= 1 and v > n_frames) or v > 10_000:
            raise InvalidStudyError(
                f"{info_path}: {key}: {cfg[key][:20]} is outside the frames 1..{n_frames or 10_000}",
                hint="Info.cfg names frames by their 1-based number (e.g. 'ED: 1')")
    frames: dict[int, Path] = {}
    cine: Path | None = None
    patient = None
    for p in sorted(folder.iterdir()):
        m = FRAME_RE.match(p.name)
        if m:
            frames[int(m.group(2))] = p
            patient = patient or m.group(1)
        elif CINE_RE.match(p.name):
            cine = p
            patient = patient or CINE_RE.match(p.name).group(1)
    wanted = sorted({ed, es})
    missing = [f for f in wanted if f not in frames]
    if missing and cine is None:
        raise InvalidStudyError(
            f"{folder}: Info.cfg names frames ED {ed}, ES {es}, but frame file(s) "
            f"{', '.join(f'frame{f:02d}' for f in missing)} are missing "
            f"(found {', '.join(f'frame{f:02d}' for f in sorted(frames)) or 'none'})",
            hint="restore the missing patientNNN_frameXX.nii.gz or fix Info.cfg")
    warnings: list[str] = []
    arrays, labels, geometry = [], [], None
    labels_ok = True
    cine_img = cine_arr = None
    for f in wanted:
        if f in frames:
            img = read_nifti(frames[f], root=folder)
            if img.GetDimension() != 3:
                raise InvalidStudyError(f"{frames[f]}: {img.GetDimension()}D image; an ACDC frame "
                                        "file is one 3D volume")
            arr, geo, _ = image_to_arrays(img, what=f"{frames[f]}: ")
            src = frames[f]
        else:
            if cine_img is None:
                cine_img = read_nifti(cine, root=folder)
                if cine_img.GetDimension() != 4:
                    raise InvalidStudyError(f"{cine}: expected a 4D cine, got "
                                            f"{cine_img.GetDimension()}D")
                cine_arr, cine_geo, _ = image_to_arrays(cine_img, what=f"{cine}: ")
            if not 1 <= f <= cine_arr.shape[0]:
                raise InvalidStudyError(f"{cine}: frame {f} (from Info.cfg) is outside its "
                                        f"{cine_arr.shape[0]} frames")
            arr, geo, src = cine_arr[f - 1:f], cine_geo, cine
            img = None
        if geometry is None:
            geometry, shape0, src0 = geo, arr.shape, src
        elif arr.shape != shape0 or not (
                np.allclose(geo.origins, geometry.origins, atol=1e-3)
                and np.allclose(geo.direction, geometry.direction, atol=1e-4)
                and np.allclose(geo.pixel_spacing, geometry.pixel_spacing, rtol=1e-4)):
            raise GeometryMismatchError(
                f"{src}: frame {f} does not share the grid of {src0.name} "
                f"(array {arr.shape[1:]} vs {shape0[1:]}, or different spacing/origin/direction)",
                hint="both frames of an ACDC patient must be on one grid")
        arrays.append(arr[0])
        gt = None
        gt_path = _gt_file(folder, frames.get(f), patient, f)
        if gt_path is not None:
            like = img if img is not None else cine_img[:, :, :, f - 1]
            gt = read_labels(gt_path, like=like, image_shape=arr.shape,
                             label_convention="acdc", what=f"{gt_path}: ", root=folder)[0]
        if gt is None:
            labels_ok = False
            warnings.append(f"{folder}: no label file (_gt) for frame {f}: the study has no labels")
        labels.append(gt)
    images = np.stack(arrays).astype(np.float32)
    lab = np.stack(labels) if labels_ok else None
    info = {
        "patient": patient or folder.name,
        "group": cfg.get("Group"),
        "height_cm": _num(cfg, "Height"),
        "weight_kg": _num(cfg, "Weight"),
        "nb_frames": _num(cfg, "NbFrame", int),
        "ed_frame": ed,
        "es_frame": es,
    }
    study = Study(images=images, geometry=geometry, trigger_times=np.full(len(wanted), np.nan),
                  labels=lab, phase_ids=list(wanted), ed_phase=wanted.index(ed),
                  es_phase=wanted.index(es), description=f"ACDC {info['patient']}",
                  source=str(folder), source_format="acdc", info=info)
    for w in warnings:
        add_warning(study, w)
    return validate_study(study) if validate else study
