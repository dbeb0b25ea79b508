"""Cohort runs: every study of a folder through one opened model, one output folder each.

``deeprecon-rt cohort INPUT_DIR -o OUT_DIR``:

- The studies are the entries of INPUT_DIR, sorted by name: each sub-folder (a DICOM
  study or an ACDC patient folder) and each image NIfTI file (label files such as
  ``*_gt.nii.gz`` are not studies; hidden entries and anything that is not a regular
  file or folder inside INPUT_DIR, e.g. a FIFO or a link leaving it, are skipped with a
  warning). A study's output folder is OUT_DIR/NAME (NAME: the folder name, or the
  file name without .nii/.nii.gz), written atomically as by ``reconstruct``.
- ``num_parts`` / ``part_id`` (as nnU-Net's ``-num_parts`` / ``-part_id``): this run
  takes the studies ``part_id, part_id + num_parts, ...`` of the sorted list, so that N
  processes (or machines) sharing OUT_DIR split a cohort without talking to each other.
- Resumable: a study whose output folder verifies against its ``outputs.json`` (every
  file's SHA-256) is skipped; a missing, partial or tampered one is redone.
- A failing study is recorded with its exit code and one-line message, and the run
  goes on; KeyboardInterrupt / SIGTERM stop the run (the study in progress leaves no
  partial output, as with ``reconstruct``).
- The summary, ``cohort_summary.csv`` (``cohort_summary.part{I}-of-{N}.csv`` for a
  part), one row per study of this run: status (done / skipped / failed), exit code,
  message, seconds, number of plausibility flags, and the native and high-resolution
  measures read back from each study's ``measures.json``; written atomically at the
  end and after every study, so it is current when the run is stopped.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import DeepreconError, ExitCode, NoInputError, UsageError
from .io.nifti import is_label_name, is_nifti, nifti_stem
from .io.validate import special_file
from .measures import MEASURE_COLUMNS

log = logging.getLogger(__name__)

STATUSES = ("done", "skipped", "failed")
SOURCES = ("native", "hr")
SUMMARY_COLUMNS = ("study", "status", "exit_code", "message", "seconds", "flags", "output",
                   *(f"{src} {col}" for src in SOURCES for col in MEASURE_COLUMNS))


@dataclass
class StudyOutcome:
    """What happened to one study of a cohort run."""

    name: str
    input: Path
    output: Path
    status: str                      # one of STATUSES
    exit_code: int = 0
    message: str = ""
    seconds: float = 0.0
    flags: int | None = None         # plausibility flags of its measures
    measures: dict[str, dict[str, Any]] = field(default_factory=dict)  # {source: {column: value}}

    def row(self) -> dict[str, Any]:
        r: dict[str, Any] = {"study": self.name, "status": self.status, "exit_code": self.exit_code,
                             "message": self.message, "seconds": round(self.seconds, 3),
                             "flags": self.flags, "output": str(self.output)}
        for src in SOURCES:
            for col in MEASURE_COLUMNS:
                r[f"{src} {col}"] = self.measures.get(src, {}).get(col)
        return r


def study_name(path: Path) -> str:
    """The output folder name of a study entry: a folder's name, a NIfTI file's stem."""
    return nifti_stem(path) if is_nifti(path) else path.name


def list_studies(input_dir: str | Path) -> tuple[list[Path], list[str]]:
    """(studies, warnings): the study entries of ``input_dir`` sorted by name (see the
    module docstring) and one warning per skipped entry. NoInputError (66) when the
    folder does not exist or holds no study; UsageError (2) when two entries would write
    the same output folder (``a.nii`` and ``a.nii.gz``)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise NoInputError(f"{root}: no such folder", hint="give the folder that holds one study per entry")
    studies, warnings = [], []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        why = special_file(entry, root)
        if why is not None:
            warnings.append(f"{entry.name}: skipped ({why})")
        elif entry.is_dir():
            studies.append(entry)
        elif is_nifti(entry) and not is_label_name(entry):
            studies.append(entry)
        elif not is_nifti(entry):
            warnings.append(f"{entry.name}: skipped (not a folder or a NIfTI image)")
    names: dict[str, Path] = {}
    for s in studies:
        other = names.setdefault(study_name(s), s)
        if other is not s:
            raise UsageError(f"{other.name} and {s.name} in {root} would both write {study_name(s)}/",
                             hint="rename one of them")
    if not studies:
        raise NoInputError(f"{root}: no studies (sub-folders or NIfTI images) found")
    return studies, warnings


def part_of(items: Sequence[Path], num_parts: int, part_id: int) -> list[Path]:
    """The items of part ``part_id`` of ``num_parts``: every num_parts-th from part_id."""
    if num_parts < 1:
        raise UsageError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise UsageError(f"--part-id must be 0..{num_parts - 1}, got {part_id}")
    return list(items[part_id::num_parts])


def summary_path(out_dir: Path, num_parts: int, part_id: int) -> Path:
    name = "cohort_summary.csv" if num_parts == 1 else f"cohort_summary.part{part_id}-of-{num_parts}.csv"
    return out_dir / name


def _finished(out: Path) -> bool:
    """True when ``out`` is an output folder that verifies against its manifest."""
    from .outputs import verify_outputs

    if not out.is_dir():
        return False
    try:
        verify_outputs(out)
    except (UsageError, OSError, ValueError) as e:
        log.info("%s: redone (%s)", out.name, e)
        return False
    return True


def _read_measures(out: Path) -> tuple[dict[str, dict[str, Any]], int | None]:
    """The measures and flag count of a finished study's measures.json."""
    try:
        data = json.loads((out / "measures.json").read_text())
    except (OSError, ValueError):
        return {}, None
    measures = {src: {c: m.get(c) for c in MEASURE_COLUMNS}
                for src, m in (data.get("measures") or {}).items() if src in SOURCES}
    return measures, len(data.get("plausibility") or [])


def _write_summary(path: Path, outcomes: Sequence[StudyOutcome]) -> None:
    """The summary CSV, replaced atomically (empty cells for None and NaN)."""
    from .outputs import _csv_value  # the one CSV number format of the outputs

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for o in outcomes:
        r = o.row()
        w.writerow([_csv_value(r[c]) for c in SUMMARY_COLUMNS])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def run_cohort(input_dir: str | Path, out_dir: str | Path, *,
               process: Callable[[Path, Path], None], num_parts: int = 1, part_id: int = 0,
               on_study: Callable[[int, int, StudyOutcome], None] | None = None
               ) -> tuple[list[StudyOutcome], Path, list[str]]:
    """Run ``process(study_path, output_folder)`` on every study of this part that has no
    finished output yet; a DeepreconError or any other exception of one study is
    recorded (exit code and message; 70 for an internal error) and the run goes on.

    process:  loads, reconstructs and writes one study (the CLI passes one that uses a
              Reconstructor opened once).
    on_study: called as ``on_study(done, total, outcome)`` after each study.
    Returns (outcomes, summary CSV path, warnings of the listing).
    """
    studies, warnings = list_studies(input_dir)
    mine = part_of(studies, num_parts, part_id)
    out_root = Path(out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    summary = summary_path(out_root, num_parts, part_id)
    outcomes: list[StudyOutcome] = []
    for k, path in enumerate(mine):
        name = study_name(path)
        out = out_root / name
        t0 = time.perf_counter()
        if _finished(out):
            outcome = StudyOutcome(name, path, out, "skipped")
        else:
            try:
                process(path, out)
                outcome = StudyOutcome(name, path, out, "done")
            except DeepreconError as e:
                outcome = StudyOutcome(name, path, out, "failed", int(e.exit_code),
                                       " ".join(e.message.split()))
            except (KeyboardInterrupt, SystemExit):
                raise
            except MemoryError:
                outcome = StudyOutcome(name, path, out, "failed", int(ExitCode.OUT_OF_MEMORY),
                                       "out of memory: the study is too large for this machine's memory")
            except Exception as e:  # noqa: BLE001 - one broken study must not end the run
                log.debug("%s: internal error", name, exc_info=True)
                outcome = StudyOutcome(name, path, out, "failed", int(ExitCode.INTERNAL),
                                       f"internal error: {type(e).__name__}: {' '.join(str(e).split())}")
        outcome.seconds = time.perf_counter() - t0
        if outcome.status != "failed":
            outcome.measures, outcome.flags = _read_measures(out)
        outcomes.append(outcome)
        _write_summary(summary, outcomes)
        log.info("%s: %s%s (%.1f s)", name, outcome.status,
                 f", exit {outcome.exit_code}: {outcome.message}" if outcome.status == "failed" else "",
                 outcome.seconds)
        if on_study is not None:
            on_study(k + 1, len(mine), outcome)
    _write_summary(summary, outcomes)
    return outcomes, summary, warnings


__all__ = ["StudyOutcome", "SUMMARY_COLUMNS", "list_studies", "part_of", "run_cohort",
           "study_name", "summary_path"]
