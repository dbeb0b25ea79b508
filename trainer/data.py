"""2D training slices on the model grid, and the sampler that draws batches from them.

:func:`build_slices` turns a data folder into a :class:`SliceSet`: every phase of every
slice of every selected study, brought onto the model grid by the foundation's
preprocessing (``load_study`` -> ``prepare`` with the automatic heart centre; labels by
``transform.labels_to_model``), so that training sees exactly the images the runtime
will feed the networks.

Data folders
------------
- an ACDC root: ``training/patientNNN/`` (the organisers' layout) or ``patientNNN/``
  folders directly (``Info.cfg`` + ``patientNNN_frameXX[_gt].nii.gz``). ``split``
  ("train", "val", "all") selects patients through the split shipped with the package
  (:func:`deeprecon.trainer.split.load_split`; "all" is every patient folder present);
  ``patients`` overrides it; ``max_patients`` keeps the first n (sorted). Patients of the
  split that are not in the folder are left out with a warning.
- one ACDC patient folder: that patient.
- a phantom folder (``phantom.json`` + ``sax.nii.gz`` + ``sax_gt.nii.gz``, written by
  ``deeprecon-rt phantom OUT``), or a folder whose subfolders are phantom folders.

``split`` only chooses among the patients of an ACDC root. For a single patient folder
and for phantoms, "train" and "all" take everything, and "val" is refused (UsageError):
there is no held-out part, and validating on the training studies would be misleading.

Every available phase is used (ACDC: ED and ES; a phantom: all its phases).

Caching
-------
With ``cache_dir`` the result is stored as ``cache_dir/slices-{key}.safetensors``, the
key a sha256 of the input files (relative path, size, mtime_ns), the preprocessing
parameters, the selection arguments and :data:`CACHE_VERSION` (bump it whenever the
slices this module produces change). The file is written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage

from deeprecon.runtime.errors import DeepreconError, InvalidStudyError, NoInputError, UsageError
from deeprecon.runtime.io import is_acdc_folder, load_study
from deeprecon.runtime.phantom import PHANTOM_FORMAT
from deeprecon.runtime.preprocess import PreprocessConfig, prepare
from deeprecon.runtime.study import LABELS

from .split import load_split

log = logging.getLogger(__name__)

#: bump when the slices built from the same inputs change (invalidates every cache)
CACHE_VERSION = 1
SLICES_FORMAT = "deeprecon-slices"
SLICES_VERSION = 1
SPLITS = ("train", "val", "all")
#: margin around the labelled heart that the inversion loss still counts, in mm
ROI_MARGIN_MM = 10.0
#: radius of the fallback ROI disc around the crop centre, as a fraction of the grid side
ROI_DISC_FRACTION = 0.3
PHANTOM_GROUP = "phantom"
PHANTOM_FILE = "phantom.json"
_PATIENT_RE = re.compile(r"^patient\d+$", re.IGNORECASE)
_TENSOR_NAMES = ("images", "labels", "roi", "phase", "slice_index")

Progress = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------- SliceSet

@dataclass
class SliceSet:
    """N 2D slices on the model grid with their labels, ROI and provenance.

    images:      [N, 1, R, R] float32 in the preprocessing's ``out_range`` ([-1, 1]).
    labels:      [N, R, R] uint8, 0 background 1 LVC 2 LVM 3 RVC; None when unlabelled.
    roi:         [N, 1, R, R] float32 in [0, 1] (binary): the heart region the inversion
                 loss weighs: the slice's labelled foreground dilated by ``ROI_MARGIN_MM``
                 where the slice has labels, otherwise a disc of radius
                 ``ROI_DISC_FRACTION * R`` around the (heart-centred) crop centre; always
                 inside the native field of view.
    patient:     [N] study name (ACDC patient id, phantom folder name).
    phase:       [N] int16, phase index within the study (ACDC: 0 and 1, in frame order).
    slice_index: [N] int16, slice index within the study (0 = first slice of the stack).
    group:       [N] ACDC group (DCM, HCM, MINF, NOR, RV) or "phantom".
    source:      the data folder.
    preprocess:  ``PreprocessConfig.to_dict()`` of the model grid.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    roi: torch.Tensor
    patient: list[str]
    phase: torch.Tensor
    slice_index: torch.Tensor
    group: list[str]
    source: str = ""
    preprocess: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        n = int(self.images.shape[0])
        if self.images.ndim != 4 or self.images.shape[1] != 1 or self.images.dtype != torch.float32:
            raise UsageError(f"images must be float32 [N, 1, R, R], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        r = tuple(self.images.shape[2:])
        if self.roi.shape != self.images.shape or self.roi.dtype != torch.float32:
            raise UsageError(f"roi must be float32 {tuple(self.images.shape)}, got "
                             f"{self.roi.dtype} {tuple(self.roi.shape)}")
        if self.labels is not None and (tuple(self.labels.shape) != (n, *r)
                                        or self.labels.dtype != torch.uint8):
            raise UsageError(f"labels must be uint8 {(n, *r)}, got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        for name in ("phase", "slice_index"):
            t = getattr(self, name)
            if tuple(t.shape) != (n,) or t.dtype != torch.int16:
                raise UsageError(f"{name} must be int16 [{n}], got {t.dtype} {tuple(t.shape)}")
        for name in ("patient", "group"):
            if len(getattr(self, name)) != n:
                raise UsageError(f"{name} must list {n} entries, got {len(getattr(self, name))}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        """R, the side of the model grid."""
        return int(self.images.shape[-1])

    @property
    def patients(self) -> list[str]:
        """The distinct study names, in order of first appearance."""
        return list(dict.fromkeys(self.patient))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (``labels`` only when present)."""
        out = {"images": self.images, "roi": self.roi, "phase": self.phase,
               "slice_index": self.slice_index}
        if self.labels is not None:
            out["labels"] = self.labels
        return out

    def subset(self, indices) -> "SliceSet":
        """The slices at ``indices`` (ints, or a bool mask of length N), in that order."""
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if tuple(idx.shape) != (len(self),):
                raise UsageError(f"a boolean mask must have {len(self)} entries, got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        idx = idx.long().flatten()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise UsageError(f"slice indices out of range for {len(self)} slices")
        pos = idx.tolist()
        return SliceSet(images=self.images[idx], labels=None if self.labels is None else self.labels[idx],
                        roi=self.roi[idx], patient=[self.patient[i] for i in pos],
                        phase=self.phase[idx], slice_index=self.slice_index[idx],
                        group=[self.group[i] for i in pos], source=self.source,
                        preprocess=dict(self.preprocess))

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) over the tensors: names, dtypes, shapes and bytes."""
        h = hashlib.sha256()
        for name, t in sorted(self.tensors().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{str(t.dtype)}:{list(t.shape)};".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def _metadata(self) -> dict[str, str]:
        meta = {"patient": self.patient, "group": self.group, "source": self.source,
                "preprocess": self.preprocess, "has_labels": self.labels is not None}
        return {"format": SLICES_FORMAT, "version": str(SLICES_VERSION),
                "slices": json.dumps(meta)}

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (tensors + JSON metadata, no pickle), atomically."""
        from .checkpoint import save_safetensors_atomic

        return save_safetensors_atomic(self.tensors(), path, metadata=self._metadata())

    @classmethod
    def load(cls, path: str | Path) -> "SliceSet":
        """Read a file written by :meth:`save`. NoInputError when it is missing,
        InvalidStudyError when it is not a slices file of this version."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise NoInputError(f"{path}: no such slices file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own (unexported) error types
            raise InvalidStudyError(f"{path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != SLICES_FORMAT or meta.get("version") != str(SLICES_VERSION):
            raise InvalidStudyError(
                f"{path}: not a {SLICES_FORMAT} v{SLICES_VERSION} file (format "
                f"{meta.get('format')!r}, version {meta.get('version')!r})")
        info = json.loads(meta["slices"])
        missing = [k for k in _TENSOR_NAMES if k not in tensors
                   and not (k == "labels" and not info["has_labels"])]
        if missing:
            raise InvalidStudyError(f"{path}: tensors {missing} are missing")
        return cls(images=tensors["images"], labels=tensors.get("labels"), roi=tensors["roi"],
                   patient=list(info["patient"]), phase=tensors["phase"],
                   slice_index=tensors["slice_index"], group=list(info["group"]),
                   source=info["source"], preprocess=info["preprocess"])


# ----------------------------------------------------------------------------- finding studies

@dataclass(frozen=True)
class _StudyRef:
    name: str
    path: Path
    kind: str  # "acdc" | "phantom"


def _is_phantom_folder(folder: Path) -> bool:
    return (folder / PHANTOM_FILE).is_file()


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise InvalidStudyError(f"{folder}: cannot list ({e.strerror})") from None


def _acdc_patients(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in _subfolders(folder) if _PATIENT_RE.match(p.name) and is_acdc_folder(p)}


def _layout_hint() -> str:
    return ("expected an ACDC root (training/patientNNN/ or patientNNN/ folders holding Info.cfg "
            "and patientNNN_frameXX.nii.gz), one ACDC patient folder, a phantom folder "
            "(phantom.json + sax.nii.gz, written by `deeprecon-rt phantom OUT`) or a folder of "
            "phantom folders")


def _pick(available: dict[str, Path], patients: Sequence[str] | None, where: Path) -> list[str]:
    """Names of ``patients`` (UsageError for unknown ones), or all available ones."""
    if patients is None:
        return sorted(available)
    unknown = [p for p in patients if p not in available]
    if unknown:
        names = sorted(available)
        found = f"{names[0]} .. {names[-1]}" if len(names) > 2 else ", ".join(names)
        raise UsageError(f"unknown patient(s) {', '.join(unknown)} in {where}",
                         hint=f"the folder holds {len(names)}: {found}")
    return sorted(set(patients))


def _no_split(split: str, what: str) -> None:
    if split == "val":
        raise UsageError(f"{what} has no validation split",
                         hint="split 'val' selects ACDC patients of an ACDC root; use 'train' or 'all'")


def find_studies(data_dir: Path, *, split: str = "train", patients: Sequence[str] | None = None,
                 max_patients: int | None = None) -> tuple[str, list[_StudyRef]]:
    """(layout, selected studies) of a data folder; see the module docstring."""
    if is_acdc_folder(data_dir):
        _no_split(split, f"{data_dir} (one ACDC patient folder)")
        names = _pick({data_dir.name: data_dir}, patients, data_dir)
        refs = [_StudyRef(data_dir.name, data_dir, "acdc")]
        layout = "acdc-patient"
    else:
        root = data_dir
        present = _acdc_patients(data_dir)
        if not present and (data_dir / "training").is_dir():
            root = data_dir / "training"
            present = _acdc_patients(root)
        if present:
            layout = "acdc"
            if patients is not None:
                names = _pick(present, patients, root)
            elif split == "all":
                names = sorted(present)
            else:
                wanted = load_split("acdc")[split]
                names = [p for p in wanted if p in present]
                absent = [p for p in wanted if p not in present]
                if not names:
                    raise InvalidStudyError(
                        f"{root}: none of the {len(wanted)} '{split}' patients of the ACDC split "
                        f"is there (found {len(present)} other patient folders)",
                        hint="use split='all' or name the patients")
                if absent:
                    log.warning("%s: %d of the %d '%s' patients of the ACDC split are absent (%s%s)",
                                root, len(absent), len(wanted), split, ", ".join(absent[:5]),
                                ", ..." if len(absent) > 5 else "")
            refs_by = {n: _StudyRef(n, present[n], "acdc") for n in names}
        elif _is_phantom_folder(data_dir):
            layout = "phantom"
            _no_split(split, f"{data_dir} (a phantom folder)")
            names = _pick({data_dir.name: data_dir}, patients, data_dir)
            refs_by = {data_dir.name: _StudyRef(data_dir.name, data_dir, "phantom")}
        else:
            phantoms = {p.name: p for p in _subfolders(data_dir) if _is_phantom_folder(p)}
            if not phantoms:
                raise InvalidStudyError(f"{data_dir}: no ACDC patient folders and no phantom "
                                        "folders found", hint=_layout_hint())
            layout = "phantoms"
            _no_split(split, f"{data_dir} (phantom folders)")
            names = _pick(phantoms, patients, data_dir)
            refs_by = {n: _StudyRef(n, phantoms[n], "phantom") for n in phantoms}
        names = sorted(names)
        refs = [refs_by[n] for n in names]
    if max_patients is not None:
        refs = refs[:max_patients]
    return layout, refs


def _check_phantom_manifest(folder: Path) -> None:
    path = folder / PHANTOM_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidStudyError(f"{path}: unreadable phantom manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PHANTOM_FORMAT:
        raise InvalidStudyError(f"{path}: not a {PHANTOM_FORMAT} manifest",
                                hint="write phantoms with `deeprecon-rt phantom OUT`")


# ----------------------------------------------------------------------------- per study

def heart_roi(labels: np.ndarray | None, valid: np.ndarray, *, n_phases: int, spacing_mm: float,
              margin_mm: float = ROI_MARGIN_MM, disc_fraction: float = ROI_DISC_FRACTION
              ) -> np.ndarray:
    """The ROI of the inversion loss on the model grid.

    labels:   [P, S, R, R] integer model-grid labels, or None.
    valid:    [S, R, R] bool, model pixels inside the native field of view.
    n_phases: P.
    Returns [P, S, R, R] bool: per slice, the labelled foreground dilated by ``margin_mm``
    (Euclidean) where the slice has any, else the disc of radius ``disc_fraction * R``
    around the grid's centre pixel ``(R // 2, R // 2)``; intersected with ``valid`` (the
    disc alone if that leaves nothing).
    """
    S, R = valid.shape[0], valid.shape[-1]
    P = int(n_phases)
    if labels is not None and labels.shape != (P, S, R, R):
        raise UsageError(f"labels must be [{P}, {S}, {R}, {R}], got {labels.shape}")
    c = R // 2
    u = np.arange(R) - c
    disc = (u[:, None] ** 2 + u[None, :] ** 2) <= (disc_fraction * R) ** 2  # [R, R]
    roi = np.broadcast_to(disc, (P, S, R, R)).copy()
    if labels is not None:
        radius_px = margin_mm / spacing_mm
        for p in range(P):
            for s in range(S):
                fg = labels[p, s] > 0
                if fg.any():
                    roi[p, s] = ndimage.distance_transform_edt(~fg) <= radius_px
    roi &= valid[None]
    empty = ~roi.any(axis=(2, 3))
    roi[empty] = disc
    return roi


def _name_source(err: BaseException, path: Path) -> None:
    """Make sure the error's message names the study folder."""
    where = str(path)
    if isinstance(err, DeepreconError):
        if where not in err.message:
            err.message = f"{where}: {err.message}"
            err.args = (err.message,)
    elif hasattr(err, "add_note"):
        err.add_note(f"while building training slices from {where}")


def _study_slices(ref: _StudyRef, preprocess: PreprocessConfig, *, require_labels: bool,
                  group_of: dict[str, str]) -> dict[str, Any]:
    if ref.kind == "phantom":
        _check_phantom_manifest(ref.path)
    study = load_study(ref.path)
    if require_labels and study.labels is None:
        raise InvalidStudyError(f"{ref.path}: study {ref.name} has no labels",
                                hint="labels are required here (ACDC _gt files, sax_gt.nii.gz)")
    images, transform = prepare(study, preprocess)  # [P, S, R, R] float32
    P, S, R, _ = images.shape
    labels = None
    if study.labels is not None:
        labels = transform.labels_to_model(study.labels)  # [P, S, R, R] uint8
        if labels.size and int(labels.max()) >= len(LABELS):
            raise InvalidStudyError(f"{ref.path}: labels go up to {int(labels.max())}; "
                                    f"expected 0..{len(LABELS) - 1}")
    roi = heart_roi(labels, transform.model_valid_mask(), n_phases=P,
                    spacing_mm=preprocess.spacing_mm)  # [P, S, R, R] bool
    if ref.kind == "phantom":
        group = PHANTOM_GROUP
    else:
        group = (study.info or {}).get("group") or group_of.get(ref.name) or "unknown"
    return {
        "images": images.reshape(P * S, 1, R, R),
        "labels": None if labels is None else labels.reshape(P * S, R, R),
        "roi": roi.reshape(P * S, 1, R, R),
        "phase": np.repeat(np.arange(P), S),
        "slice_index": np.tile(np.arange(S), P),
        "name": ref.name,
        "group": group,
    }


# ----------------------------------------------------------------------------- cache

def _input_files(data_dir: Path, refs: list[_StudyRef]) -> list[tuple[str, int, int]]:
    """(path relative to data_dir, size, mtime_ns) of the files each study is read from
    (the files directly in its folder), sorted."""
    out = []
    for ref in refs:
        for p in ref.path.iterdir():
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                rel = p.relative_to(data_dir).as_posix() if p.is_relative_to(data_dir) else p.name
                out.append((rel, int(st.st_size), int(st.st_mtime_ns)))
    return sorted(out)


def cache_key(data_dir: Path, refs: list[_StudyRef], preprocess: PreprocessConfig,
              selection: dict[str, Any]) -> str:
    """sha256 (hex) identifying the slices that :func:`build_slices` would build."""
    payload = {"cache_version": CACHE_VERSION, "slices_version": SLICES_VERSION,
               "files": _input_files(data_dir, refs), "preprocess": preprocess.to_dict(),
               "selection": selection, "studies": [r.name for r in refs],
               "roi": {"margin_mm": ROI_MARGIN_MM, "disc_fraction": ROI_DISC_FRACTION}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- build

def build_slices(data_dir: str | Path, preprocess: PreprocessConfig, *, split: str = "train",
                 patients: Sequence[str] | None = None, max_patients: int | None = None,
                 require_labels: bool = False, cache_dir: str | Path | None = None,
                 read_caches: Sequence[str | Path] = (),
                 progress: Progress | None = None) -> SliceSet:
    """Every phase of every slice of the selected studies, on the model grid.

    data_dir:       an ACDC root, an ACDC patient folder, a phantom folder or a folder of
                    phantom folders (see the module docstring).
    preprocess:     the model grid (``ModelConfig.preprocess``).
    split:          "train", "val" or "all" (ACDC roots; see the module docstring).
    patients:       ACDC patient ids (or phantom folder names) to use instead of the split.
    max_patients:   keep only the first n selected studies (sorted by name).
    require_labels: refuse (InvalidStudyError) a study without labels.
    cache_dir:      folder for the cached result (see the module docstring), or None.
    read_caches:    more folders to look in for the same cached result (read only; e.g.
                    the caches of the upstream runs, which prepared the same data).
    progress:       ``progress(done, total, name)``, called after each study.
    Returns a SliceSet of N = sum over studies of P * S slices, ordered by study (sorted),
    then phase, then slice. ``labels`` is None when any study lacks them (a warning).
    Raises NoInputError (missing data_dir), InvalidStudyError (nothing recognisable, a
    study without labels under ``require_labels``, a study that fails to load: the
    foundation's error, naming the study folder), UsageError (bad split, unknown patient,
    bad max_patients).
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise NoInputError(f"{data_dir}: no such folder", hint=_layout_hint())
    if not data_dir.is_dir():
        raise InvalidStudyError(f"{data_dir} is a file, not a data folder", hint=_layout_hint())
    data_dir = data_dir.resolve()
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}", hint=f"known: {', '.join(SPLITS)}")
    if isinstance(patients, str):
        raise UsageError(f"patients must be a list of ids, got the string {patients!r}")
    if patients is not None:
        patients = list(patients)
        if not patients:
            raise UsageError("patients is an empty list", hint="give ids or leave it out (None)")
    if max_patients is not None and (isinstance(max_patients, bool) or int(max_patients) != max_patients
                                     or max_patients < 1):
        raise UsageError(f"max_patients must be an integer >= 1, got {max_patients!r}")
    if not isinstance(preprocess, PreprocessConfig):
        raise UsageError(f"preprocess must be a PreprocessConfig, got {type(preprocess).__name__}")

    layout, refs = find_studies(data_dir, split=split, patients=patients, max_patients=max_patients)
    selection = {"layout": layout, "split": split,
                 "patients": None if patients is None else sorted(set(patients)),
                 "max_patients": max_patients, "require_labels": bool(require_labels)}
    cache_path = None
    folders = ([Path(cache_dir)] if cache_dir is not None else []) + [Path(d) for d in read_caches]
    if folders:
        name = f"slices-{cache_key(data_dir, refs, preprocess, selection)}.safetensors"
        cache_path = folders[0] / name if cache_dir is not None else None
        for candidate in (f / name for f in folders):
            if not candidate.is_file():
                continue
            try:
                cached = SliceSet.load(candidate)
            except DeepreconError as e:
                log.warning("ignoring the unreadable slice cache %s (%s)", candidate, e)
                continue
            log.info("%d slices of %d studies loaded from the cache %s", len(cached),
                     len(refs), candidate)
            cached.source = str(data_dir)
            if cache_path is not None and candidate != cache_path:
                cached.save(cache_path)
            return cached

    group_of = {}
    if layout.startswith("acdc"):
        group_of = load_split("acdc").get("group", {})
    parts = []
    for i, ref in enumerate(refs):
        try:
            parts.append(_study_slices(ref, preprocess, require_labels=require_labels,
                                       group_of=group_of))
        except Exception as e:
            _name_source(e, ref.path)
            raise
        if progress is not None:
            progress(i + 1, len(refs), ref.name)

    unlabelled = [p["name"] for p in parts if p["labels"] is None]
    if unlabelled:
        log.warning("%d of %d studies have no labels (%s%s): the slice set has no labels",
                    len(unlabelled), len(parts), ", ".join(unlabelled[:5]),
                    ", ..." if len(unlabelled) > 5 else "")
    cat = np.concatenate
    slices = SliceSet(
        images=torch.from_numpy(cat([p["images"] for p in parts]).astype(np.float32, copy=False)),
        labels=None if unlabelled else torch.from_numpy(cat([p["labels"] for p in parts])),
        roi=torch.from_numpy(cat([p["roi"] for p in parts]).astype(np.float32)),
        patient=[p["name"] for p in parts for _ in range(len(p["phase"]))],
        phase=torch.from_numpy(cat([p["phase"] for p in parts]).astype(np.int16)),
        slice_index=torch.from_numpy(cat([p["slice_index"] for p in parts]).astype(np.int16)),
        group=[p["group"] for p in parts for _ in range(len(p["phase"]))],
        source=str(data_dir), preprocess=preprocess.to_dict())
    log.info("%d slices from %d studies (%s, %d x %d at %g mm) in %.1f s", len(slices),
             len(parts), layout, preprocess.size, preprocess.size, preprocess.spacing_mm,
             time.perf_counter() - t0)
    if cache_path is not None:
        slices.save(cache_path)
        log.info("slices cached in %s", cache_path)
    return slices


# ----------------------------------------------------------------------------- sampling

class BatchSampler:
    """Deterministic, resumable, distributed batches of slice indices.

    Epoch e draws one permutation of ``range(n)`` from a ``torch.Generator`` seeded with
    ``(seed, e)``: the same on every rank. The permutation is cut (``drop_last=True``) or
    extended by wrapping around (``drop_last=False``) to a multiple ``T`` of
    ``world_size * batch_size``; rank r takes positions ``r, r + world_size, ...`` of it,
    so the ranks' batches within an epoch are disjoint (up to the wrapped repeats) and
    every rank draws the same number ``T / (world_size * batch_size)`` of batches per
    epoch (which keeps distributed ranks in step).

    Tiny data sets: when ``n < world_size * batch_size`` the permutation is repeated (wrap
    around within the epoch) to one full step, whatever ``drop_last`` says, so an epoch is
    one batch per rank and every index appears in it at least once.

    ``next_batch()`` advances through the epochs forever; ``state_dict()`` /
    ``load_state_dict()`` resume exactly: the next batch after a resume is the batch an
    uninterrupted sampler would have drawn.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        for name, v, lo in (("n", n, 1), ("batch_size", batch_size, 1), ("world_size", world_size, 1),
                            ("rank", rank, 0)):
            if isinstance(v, bool) or int(v) != v or v < lo:
                raise UsageError(f"{name} must be an integer >= {lo}, got {v!r}")
        if rank >= world_size:
            raise UsageError(f"rank {rank} is outside the world of {world_size} ranks")
        self.n, self.batch_size = int(n), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.drop_last = bool(drop_last)
        step = self.world_size * self.batch_size
        if self.n < step:
            total = step
        elif self.drop_last:
            total = (self.n // step) * step
        else:
            total = math.ceil(self.n / step) * step
        self._total = total
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, torch.Tensor] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self._total // (self.world_size * self.batch_size)

    def epoch_seed(self, epoch: int) -> int:
        """The torch seed of an epoch's permutation (a hash of (seed, epoch))."""
        state = np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, int(epoch)]).generate_state(2)
        return int(state[0]) | (int(state[1] & 0x7FFFFFFF) << 32)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """[batches_per_epoch, batch_size] int64: this rank's batches of one epoch."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.epoch_seed(epoch))
        perm = torch.randperm(self.n, generator=g)  # [n]
        if self._total > self.n:
            perm = perm.repeat(math.ceil(self._total / self.n))
        perm = perm[:self._total]  # [T]
        mine = perm[self.rank::self.world_size].reshape(-1, self.batch_size)  # [T / (W B), B]
        self._cache = (epoch, mine)
        return mine

    def next_batch(self) -> torch.Tensor:
        """[batch_size] int64 indices of this rank's next batch."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        batch = self.epoch_indices(self.epoch)[self.position].clone()
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"a sampler state needs integer 'epoch' and 'position', got {state!r}") from None
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise UsageError(f"sampler state {state} does not fit {self.batches_per_epoch} "
                             f"batches per epoch")
        self.epoch, self.position = epoch, position


__all__ = ["SliceSet", "build_slices", "find_studies", "cache_key", "heart_roi", "BatchSampler",
           "CACHE_VERSION", "ROI_MARGIN_MM", "ROI_DISC_FRACTION", "SPLITS"]
