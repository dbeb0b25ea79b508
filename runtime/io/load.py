"""``load_study``: one entry point that picks the loader from what the path is.

- a folder with ``Info.cfg`` and ``patient*_frame*.nii[.gz]``  -> ACDC patient folder;
- a ``.nii`` / ``.nii.gz`` file                              -> NIfTI (label file found beside it);
- a folder holding exactly one image NIfTI (plus its label sibling) and no DICOM
  (what ``deeprecon-rt phantom`` writes: ``sax.nii.gz`` + ``sax_gt.nii.gz``) -> that NIfTI;
- any other folder, or any other file                       -> DICOM (recursive).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from deeprecon.runtime.errors import NoInputError, UsageError
from deeprecon.runtime.io.acdc import FRAME_RE, INFO_FILE, is_acdc_folder, load_acdc
from deeprecon.runtime.io.dicom import _sniff, load_dicom
from deeprecon.runtime.io.nifti import (LABEL_SUFFIXES, NIFTI_SUFFIXES, is_label_name, is_nifti,
                                        load_nifti, nifti_stem)
from deeprecon.runtime.io.validate import (AmbiguousInputError, add_warning, check_regular_file,
                                           special_file)
from deeprecon.runtime.study import Study

log = logging.getLogger(__name__)


def _has_dicom(folder: Path, *, max_files: int = 100_000) -> bool:
    """True when some file under ``folder`` looks like DICOM (preamble, extension, raw start)."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or is_nifti(Path(name)):
                continue
            n += 1
            if special_file(Path(dirpath) / name, folder):
                continue  # never open a FIFO, a device or a link out of the folder
            if _sniff(Path(dirpath) / name) in ("dicom", "maybe") or n > max_files:
                return True
    return False


def _image_for_label(path: Path) -> Path | None:
    stem = nifti_stem(path)
    for suf in LABEL_SUFFIXES:
        if stem.lower().endswith(suf):
            for ext in NIFTI_SUFFIXES:
                cand = path.with_name(stem[: -len(suf)] + ext)
                if cand.is_file():
                    return cand
    return None


def _load_nifti_file(path: Path, root: Path | None = None) -> Study:
    image = _image_for_label(path) if is_label_name(path) else None
    if image is not None:
        raise UsageError(f"{path} is a label file (its name ends with one of {', '.join(LABEL_SUFFIXES)})",
                         hint=f"pass the image instead: {image}")
    m = FRAME_RE.match(path.name)
    if m and (path.parent / INFO_FILE).is_file():
        study = load_nifti(path, label_convention="acdc", root=root)
        add_warning(study, f"{path.name}: one ACDC frame, labels read in ACDC's convention and "
                           "remapped; pass the patient folder to get ED and ES")
        return study
    return load_nifti(path, root=root)


def load_study(path: str | Path, *, series: str | None = None) -> Study:
    """Load a cine short-axis study from a DICOM folder, a NIfTI file or an ACDC folder.

    path:   see the module docstring for how the loader is chosen.
    series: SeriesInstanceUID (DICOM only) when the folder holds several short-axis
            series; comma-separated UIDs merge single-slice series into one stack.
    Returns a validated Study: images [P, S, H, W] float32, geometry, trigger times (ms),
    labels uint8 [P, S, H, W] in the project convention or None.
    Raises NoInputError (66) when the path does not exist or holds no images,
    InvalidStudyError and its subclasses (65) for unusable data, UsageError (2) for a
    wrong call (``series`` on a non-DICOM input, an unknown series UID, a label file).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise NoInputError(f"{p}: no such file or folder",
                           hint="give a DICOM folder, a NIfTI file or an ACDC patient folder")
    if not p.is_dir():
        check_regular_file(p, p)   # a FIFO or a device is refused unopened
    if p.is_file() and is_nifti(p):
        if series is not None:
            raise UsageError(f"--series applies to DICOM input; {p} is a NIfTI file")
        return _load_nifti_file(p)
    if p.is_file():
        return load_dicom(p, series=series)
    if is_acdc_folder(p):
        if series is not None:
            raise UsageError(f"--series applies to DICOM input; {p} is an ACDC patient folder")
        return load_acdc(p)
    # every NIfTI-named entry but folders: a FIFO or a link out is refused when read
    niftis = sorted(q for q in p.iterdir() if is_nifti(q) and not q.is_dir())
    images = [q for q in niftis if not is_label_name(q)]
    if images and not _has_dicom(p):
        if series is not None:
            raise UsageError(f"--series applies to DICOM input; {p} holds NIfTI files")
        if len(images) == 1:
            log.debug("%s: one image NIfTI, no DICOM: loading %s", p, images[0].name)
            return _load_nifti_file(images[0], root=p)
        raise AmbiguousInputError(
            f"{p}: {len(images)} image NIfTI files and no DICOM "
            f"({', '.join(q.name for q in images[:6])}{', ...' if len(images) > 6 else ''}): "
            "which one is the study?",
            hint=f"pass one file, e.g. {images[0]}")
    return load_dicom(p, series=series)
