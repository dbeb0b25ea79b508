"""``load_study``: one entry point that picks the loader from what the path is.

- a folder with ``Info.cfg`` and ``patient*_frame*.nii[.gz]``  -> ACDC patient folder;
- a ``.nii`` / ``.nii.gz`` file                              -> NIfTI (label file found beside it);
- a folder holding exactly one image NIfTI (plus its label sibling) and no DICOM
  (what ``deeprecon-rt phantom`` writes: ``sax.nii.gz`` + ``sax_gt.nii.gz``) -> that NIfTI;
- a folder whose image NIfTIs are one short-axis ED/ES pair by name (the M&Ms,
  Kaggle and nnU-Net layouts: ``*_ED.nii.gz`` and ``*_ES.nii.gz``, long-axis files
  such as ``*_LA_*``/``*4ch*`` beside them left out) -> those two as one study;
- any other folder, or any other file                       -> DICOM (recursive).

``load_studies`` makes one study of several inputs, one phase each (``reconstruct
ED.nii.gz ES.nii.gz``): same stack geometry, phases named ED/ES from the file names
(:func:`phase_name_of`) or given, ED first. A single-phase NIfTI named ED or ES (or an
ACDC frame that its Info.cfg names) is that phase.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from deeprecon.runtime.errors import NoInputError, UsageError
from deeprecon.runtime.io.acdc import FRAME_RE, INFO_FILE, is_acdc_folder, load_acdc, parse_info_cfg
from deeprecon.runtime.io.dicom import _sniff, load_dicom
from deeprecon.runtime.io.nifti import (LABEL_SUFFIXES, NIFTI_SUFFIXES, is_label_name, is_nifti,
                                        load_nifti, nifti_stem)
from deeprecon.runtime.io.validate import (AmbiguousInputError, GeometryMismatchError, add_warning,
                                           check_regular_file, fmt_list, special_file)
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


PHASE_NAMES = ("ED", "ES")
_PHASE_TOKENS = {"ED": {"ed", "diastole", "diastolic", "enddiastole", "enddiastolic"},
                 "ES": {"es", "systole", "systolic", "endsystole", "endsystolic"}}
# name tokens of long-axis views (M&Ms-2 *_LA_*, UK Biobank la_2ch/la_4ch, LVOT)
_LAX_TOKENS = {"la", "lax", "2ch", "3ch", "4ch", "lvot", "longaxis"}


def _tokens(path: Path) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", nifti_stem(path).lower() if is_nifti(path) else path.name.lower()))


def phase_name_of(path: str | Path) -> str | None:
    """"ED" or "ES" when the file or folder name says so (a word ED/ES, diastole/systole,
    separated by _ - . or spaces, any case), else None."""
    t = _tokens(Path(path))
    found = [name for name, words in _PHASE_TOKENS.items() if t & words]
    return found[0] if len(found) == 1 else None


def _is_long_axis_name(path: Path) -> bool:
    return bool(_tokens(path) & _LAX_TOKENS)


def _name_single_phase(study: Study, name: str | None, why: str) -> Study:
    if study.n_phases == 1 and name is not None and study.ed_phase is None and study.es_phase is None:
        if name == "ED":
            study.ed_phase = 0
        else:
            study.es_phase = 0
        study.info["phase_name"] = f"{name} ({why})"
    return study


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
        study.phase_ids = [int(m.group(2))]
        try:
            cfg = parse_info_cfg(path.parent / INFO_FILE, root=root)
            named = {"ED": int(cfg["ED"]), "ES": int(cfg["ES"])}
        except (KeyError, ValueError, UsageError, OSError):
            named = {}
        name = next((k for k, v in named.items() if v == int(m.group(2))), None)
        return _name_single_phase(study, name, f"frame {int(m.group(2))} in {INFO_FILE}")
    return _name_single_phase(load_nifti(path, root=root), phase_name_of(path),
                              f"from the file name {path.name}")


def _same_stack(a: Study, b: Study, *, tol_mm: float = 0.5) -> str | None:
    """Why two studies' stacks differ (matrix, slices, spacing, orientation, position),
    or None."""
    ga, gb = a.geometry, b.geometry
    if a.images.shape[1:] != b.images.shape[1:]:
        return f"slices x rows x columns {list(a.images.shape[1:])} vs {list(b.images.shape[1:])}"
    if not np.allclose(ga.pixel_spacing, gb.pixel_spacing, rtol=1e-3):
        return f"pixel spacing {ga.pixel_spacing} vs {gb.pixel_spacing} mm"
    if not (np.allclose(ga.row_dir, gb.row_dir, atol=1e-3) and np.allclose(ga.col_dir, gb.col_dir, atol=1e-3)):
        return "orientation differs"
    d = float(np.max(np.linalg.norm(ga.origins - gb.origins, axis=1)))
    if d > tol_mm:
        return f"slice positions differ by up to {d:.2f} mm"
    return None


def load_studies(paths: Sequence[str | Path], *, series: str | None = None,
                 phase_names: Sequence[str] | None = None) -> Study:
    """One study from one or several inputs.

    paths:       one input (any that :func:`load_study` reads), or several that are one
                 phase each of the same stack (e.g. ED.nii.gz and ES.nii.gz).
    phase_names: "ED"/"ES" (or "-" for unnamed), one per input, instead of the names
                 :func:`phase_name_of` reads from the file names.
    With several inputs the phases are ordered ED, ES (else as given), ``ed_phase`` /
    ``es_phase`` say which is which, labels are kept when every input has them.
    Raises UsageError (2) for a wrong call (a multi-phase input among several, two
    inputs with the same name, a wrong number of names), GeometryMismatchError (65)
    when the inputs are not the same stack.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("no input given", hint="pass a study folder or file (or several phase files)")
    if phase_names is not None:
        phase_names = [str(n).strip().upper() for n in phase_names]
        if len(phase_names) != len(paths):
            raise UsageError(f"{len(phase_names)} phase names for {len(paths)} inputs",
                             hint="give one name per input, e.g. --phase-names ED,ES")
        bad = [n for n in phase_names if n not in (*PHASE_NAMES, "-")]
        if bad:
            raise UsageError(f"unknown phase name {bad[0]!r}", hint="use ED, ES or - (unnamed)")
    if len(paths) == 1:
        study = load_study(paths[0], series=series)
        if phase_names is not None and phase_names[0] != "-":
            if study.n_phases != 1:
                raise UsageError(f"{paths[0]} has {study.n_phases} phases: a phase name applies "
                                 "to a one-phase input", hint="use --phases to pick phases of a cine")
            study.ed_phase = 0 if phase_names[0] == "ED" else None
            study.es_phase = 0 if phase_names[0] == "ES" else None
        return study
    studies = [load_study(p, series=series) for p in paths]
    multi = [(p, s.n_phases) for p, s in zip(paths, studies) if s.n_phases != 1]
    if multi:
        raise UsageError(f"{multi[0][0]} has {multi[0][1]} phases: several inputs must be one "
                         "phase (a 3D volume) each", hint="pass a cine (4D) input on its own")
    if phase_names is None:
        names = []
        for p, s in zip(paths, studies):
            names.append("ED" if s.ed_phase == 0 else "ES" if s.es_phase == 0 else phase_name_of(p))
        why = "from the file names"
    else:
        names = [None if n == "-" else n for n in phase_names]
        why = "as given"
    for n in PHASE_NAMES:
        if names.count(n) > 1:
            clash = [str(p) for p, m in zip(paths, names) if m == n]
            raise UsageError(f"{len(clash)} inputs are named {n}: {fmt_list(clash)}",
                             hint="give each input its own phase name, e.g. --phase-names ED,ES")
    for p, s in zip(paths[1:], studies[1:]):
        why_not = _same_stack(studies[0], s)
        if why_not is not None:
            raise GeometryMismatchError(f"{paths[0]} and {p} are not the same short-axis stack: {why_not}",
                                        hint="pass the phases of one cine stack (same slices and matrix)")
    order = sorted(range(len(paths)), key=lambda k: (PHASE_NAMES.index(names[k]) if names[k] in PHASE_NAMES
                                                     else len(PHASE_NAMES), k))
    studies = [studies[k] for k in order]
    names = [names[k] for k in order]
    paths = [paths[k] for k in order]
    first = studies[0]
    with_labels = [s.labels is not None for s in studies]
    warnings = [w for s in studies for w in s.warnings]
    if any(with_labels) and not all(with_labels):
        warnings.append("labels beside " + fmt_list([str(p) for p, h in zip(paths, with_labels) if h])
                        + " only: the study is used without labels")
    ids = [s.phase_ids[0] for s in studies]
    combined = Study(
        images=np.concatenate([s.images for s in studies]), geometry=first.geometry,
        trigger_times=np.concatenate([s.trigger_times for s in studies]),
        labels=np.concatenate([s.labels for s in studies]) if all(with_labels) else None,
        phase_ids=ids if len(set(ids)) == len(ids) else list(range(len(studies))),
        ed_phase=names.index("ED") if "ED" in names else None,
        es_phase=names.index("ES") if "ES" in names else None,
        series_uid=first.series_uid, description=first.description,
        source="; ".join(str(p) for p in paths),
        source_format=first.source_format if len({s.source_format for s in studies}) == 1 else "mixed",
        info={**{k: v for k, v in first.info.items() if k != "phase_name"}, "inputs": [str(p) for p in paths], "phase_names": [n or "-" for n in names],
              "phase_names_from": why},
        warnings=warnings)
    log.info("one study from %d inputs: %s", len(paths),
             ", ".join(f"{p.name} ({n or 'unnamed'})" for p, n in zip(paths, names)))
    return combined


def _ed_es_pair(images: list[Path]) -> list[Path] | None:
    """The short-axis ED and ES files among a folder's image NIfTIs (long-axis names
    left out), ED first, when they are exactly such a pair."""
    sax = [q for q in images if not _is_long_axis_name(q)]
    names = [phase_name_of(q) for q in sax]
    if len(sax) == 2 and sorted(names, key=str) == ["ED", "ES"]:
        return sorted(sax, key=lambda q: PHASE_NAMES.index(phase_name_of(q)))
    return None


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
        pair = _ed_es_pair(images)
        if pair is not None:
            study = load_studies(pair)
            left = [q.name for q in images if q not in pair]
            if left:
                add_warning(study, f"{p}: used the short-axis ED/ES pair {pair[0].name}, {pair[1].name}; "
                                   f"left out {fmt_list(left)} (long-axis by name)")
            return study
        raise AmbiguousInputError(
            f"{p}: {len(images)} image NIfTI files and no DICOM "
            f"({', '.join(q.name for q in images[:6])}{', ...' if len(images) > 6 else ''}): "
            "which one is the study?",
            hint=f"pass one file, e.g. {next((q for q in images if not _is_long_axis_name(q)), images[0])}, "
                 "or the ED and ES files of one stack together")
    return load_dicom(p, series=series)
