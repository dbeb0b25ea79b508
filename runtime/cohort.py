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
- Engines: ``local`` runs the studies one after the other in this process;
  ``ray`` runs the same :class:`CohortWorker` on Ray Data (``map_batches`` over an
  actor pool, one study per batch, so each actor opens the bundle once; the worker
  catches every study's error itself, because Ray Data fails the whole job on one
  errored block). ``address`` is a Ray cluster's (``ray://host:10001`` or ``auto``);
  none starts a local Ray instance. Every worker reads INPUT_DIR and writes OUT_DIR by
  path, so on a cluster both must be on storage every node mounts.
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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import (FOREIGN_ERRORS, DeepreconError, ExitCode, NoInputError, UnavailableError,
                     UsageError, exit_code_of)
from .io.nifti import is_label_name, is_nifti, nifti_stem
from .io.validate import special_file
from .measures import MEASURE_COLUMNS
from .publish import write_file_atomic

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
    status: str                      # one of STATUSES ("pending" before it ran)
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
    from .outputs.tables import csv_value  # the one CSV number format of the outputs

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for o in outcomes:
        r = o.row()
        w.writerow([csv_value(r[c]) for c in SUMMARY_COLUMNS])
    text = buf.getvalue()
    write_file_atomic(path, lambda tmp: tmp.write_text(text))


class CohortWorker:
    """Opens the bundle once and processes studies: load, acquisition check,
    reconstruct, write the output folder. ``run_one`` never raises for a study's
    failure: it returns (status, exit code, message, seconds).

    bundle, backend, device: as :class:`~deeprecon.runtime.pipeline.Reconstructor`;
    options: ``Reconstructor.reconstruct`` keywords (steps, interp, phases, batch, ...).
    Also the callable class of the Ray engine: ``worker(batch)`` with columns "input" and
    "output" returns the batch with "status", "exit_code", "message", "seconds".
    """

    def __init__(self, bundle: str | Path | None, backend: str = "auto", device: str = "auto",
                 threads: int | None = None, **options: Any):
        from .pipeline import Reconstructor

        self.rec = Reconstructor(bundle, backend=backend, device=device, threads=threads)
        self.options = options

    def close(self) -> None:
        self.rec.close()

    def process(self, path: Path, out: Path) -> None:
        from .io import check_acquisition, load_study
        from .outputs import write_outputs

        study = check_acquisition(load_study(path))
        write_outputs(self.rec.reconstruct(study, **self.options), out)

    def run_one(self, path: Path, out: Path) -> tuple[str, int, str, float]:
        t0 = time.perf_counter()
        try:
            self.process(path, out)
            status, code, message = "done", 0, ""
        except (DeepreconError, *FOREIGN_ERRORS) as e:  # FOREIGN_ERRORS: e.g. cpp_ext's, exit 69
            text = getattr(e, "message", None) or str(e)
            status, code, message = "failed", int(exit_code_of(e)), " ".join(text.split())
        except (KeyboardInterrupt, SystemExit):
            raise
        except MemoryError:
            status, code, message = ("failed", int(ExitCode.OUT_OF_MEMORY),
                                     "out of memory: the study is too large for this machine's memory")
        except Exception as e:  # noqa: BLE001 - one broken study must not end the run
            if type(e).__name__ == "OutOfMemoryError":  # torch's device out-of-memory error
                status, code, message = ("failed", int(ExitCode.OUT_OF_MEMORY),
                                         f"out of memory on the device: {str(e).splitlines()[0]}")
            else:
                log.debug("%s: internal error", path, exc_info=True)
                status, code, message = ("failed", int(ExitCode.INTERNAL),
                                         f"internal error: {type(e).__name__}: {' '.join(str(e).split())}")
        return status, code, message, time.perf_counter() - t0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows = [self.run_one(Path(i), Path(o)) for i, o in zip(batch["input"], batch["output"])]
        return {**batch, "status": np.array([r[0] for r in rows]),
                "exit_code": np.array([r[1] for r in rows], dtype=np.int64),
                "message": np.array([r[2] for r in rows]),
                "seconds": np.array([r[3] for r in rows], dtype=np.float64)}


@dataclass(frozen=True)
class WorkerSpec:
    """What a :class:`CohortWorker` is built from: picklable, so that each Ray actor
    builds its own (``options``: ``Reconstructor.reconstruct`` keywords; ``threads``: each
    worker's CPU threads, None: the backend's default)."""

    bundle: str | Path | None
    backend: str = "auto"
    device: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None

    def build(self) -> CohortWorker:
        return CohortWorker(self.bundle, self.backend, self.device, self.threads, **self.options)

    def check(self) -> None:
        """Verify the bundle here (every file's SHA-256), before any worker starts: a
        missing or damaged bundle is its own error (66/69/78), not a dead Ray actor."""
        from .bundle import default_bundle_path, load_bundle

        load_bundle(self.bundle if self.bundle is not None else default_bundle_path())


ENGINES = ("local", "ray")


def run_cohort(input_dir: str | Path, out_dir: str | Path, *, worker: WorkerSpec,
               num_parts: int = 1, part_id: int = 0, engine: str = "local",
               ray_address: str | None = None, ray_actors: int = 1,
               on_study: Callable[[int, int, StudyOutcome], None] | None = None
               ) -> tuple[list[StudyOutcome], Path, list[str]]:
    """Process every study of this part that has no finished output yet (see the module
    docstring); one study's failure is recorded (exit code and message; 70 for an
    internal error) and the run goes on.

    worker:   what the :class:`CohortWorker` is built from (once for the local engine,
              in each actor for Ray, after the bundle was verified here).
    engine:   "local" or "ray"; ray_address, ray_actors: the Ray cluster and the actor
              pool size.
    on_study: called as ``on_study(done, total, outcome)`` after each study (local) or
              for each study once all are back (ray).
    Returns (outcomes, summary CSV path, warnings of the listing).
    """
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}", hint=f"known: {', '.join(ENGINES)}")
    studies, warnings = list_studies(input_dir)
    mine = part_of(studies, num_parts, part_id)
    out_root = Path(out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    summary = summary_path(out_root, num_parts, part_id)
    outcomes = [StudyOutcome(study_name(p), p, out_root / study_name(p), "pending") for p in mine]
    todo = []
    for o in outcomes:
        if _finished(o.output):
            o.status = "skipped"
        else:
            todo.append(o)
    done = [o for o in outcomes if o.status == "skipped"]

    def finish(o: StudyOutcome, status: str, code: int, message: str, seconds: float) -> None:
        o.status, o.exit_code, o.message, o.seconds = status, code, message, seconds
        done.append(o)
        log.info("%s: %s%s (%.1f s)", o.name, status,
                 f", exit {code}: {message}" if status == "failed" else "", seconds)

    if engine == "local":
        w = worker.build() if todo else None
        try:
            for o in todo:
                finish(o, *w.run_one(o.input, o.output))
                _write_summary(summary, _read_back(done))
                if on_study is not None:
                    on_study(len(done), len(outcomes), o)
        finally:
            if w is not None:
                w.close()
    elif todo:
        worker.check()
        if worker.threads is None:  # each actor holds one CPU (num_cpus=1): one thread each
            worker = replace(worker, threads=1)
        for o, row in zip(todo, _run_on_ray(todo, worker, ray_address, ray_actors)):
            finish(o, str(row["status"]), int(row["exit_code"]), str(row["message"]),
                   float(row["seconds"]))
            if on_study is not None:
                on_study(len(done), len(outcomes), o)
    _write_summary(summary, _read_back(outcomes))
    return outcomes, summary, warnings


def _read_back(outcomes: Sequence[StudyOutcome]) -> list[StudyOutcome]:
    """The outcomes with the measures of each finished study read from its output."""
    for o in outcomes:
        if o.status in ("done", "skipped") and not o.measures:
            o.measures, o.flags = _read_measures(o.output)
    return list(outcomes)


def _run_on_ray(todo: Sequence[StudyOutcome], worker: WorkerSpec,
                address: str | None, actors: int) -> list[dict[str, Any]]:
    """The studies through Ray Data: one study per batch, an actor pool of ``actors``
    workers; rows come back in the order of ``todo``."""
    try:
        import ray
    except ImportError:
        raise UnavailableError("the ray engine needs Ray, which is not installed",
                               hint="pip install 'deeprecon-rt[cohort]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    # Ray Data's progress lines and start banners are not this command's output
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        items = [{"key": k, "input": str(o.input), "output": str(o.output)} for k, o in enumerate(todo)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        rows = ds.map_batches(_RayWorker, fn_constructor_args=(worker,), batch_size=1,
                              compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1).take_all()
    finally:
        if started:
            ray.shutdown()
    return sorted(rows, key=lambda r: int(r["key"]))



class _RayWorker:
    """A Ray Data actor: builds its CohortWorker once, then processes batches."""

    def __init__(self, worker: WorkerSpec):
        self.worker = worker.build()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.worker(batch)


__all__ = ["CohortWorker", "WorkerSpec", "ENGINES", "StudyOutcome", "SUMMARY_COLUMNS", "list_studies",
           "part_of", "run_cohort", "study_name", "summary_path"]
