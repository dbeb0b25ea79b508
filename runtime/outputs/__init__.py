"""Write a :class:`~deeprecon.runtime.result.Result` into an output folder, atomically.

Everything is written into a hidden staging folder beside the target
(``PARENT/.{name}.partial-{pid}-{random}``); ``outputs.json``, the manifest of every other
file with its SHA-256 and size, is written last; then the staging folder is renamed onto
the target. A reader therefore sees either no folder, the previous complete one, or the
new complete one: never a half-written folder. See :func:`~.folder.staging_dir` for the
rules about existing folders, interrupted runs and signals.

One module per thing written (``FF`` = the source's frame number of a phase, two digits
or more; labels are 0 background, 1 LV cavity, 2 LV myocardium, 3 RV cavity)::

    outputs.json        the manifest, written last: format, schema, kind, created, files
                        {relative path: {sha256, bytes}}                      (folder)
    run_report.json     what ran and how                                  (run_report)
    report.html         offline HTML report of the pictures below         (html_report)
    measures.csv/.json  the clinical measures and their plausibility flags    (tables)
    segmentation/, hr/, adapted/   NIfTI volumes, one 3D file per phase      (volumes)
    segmentation/seg_frameFF.dcm   DICOM SEG per phase, for DICOM input    (dicom_seg)
    qc/*.png            QC pictures (need matplotlib, the ``report`` extra)  (pictures)

For ``kind == "motion_adaptation"`` (``result.extra`` holds the ``source`` and ``target``
Results) the arrays are the adapted sequence and ``result.study`` is the adapted study
(:func:`~deeprecon.runtime.motion.adapt_motion` fills its images with G(w) mapped back to
the source's native grid, its frame numbers with the target's); ``adapted/`` and
``qc/volume_curves_motion.png`` are added, and measures.csv has the rows
"source/native", "source/hr", "target/native", "target/hr" too.

Without matplotlib every output but the pictures is written; the run report and the HTML
report carry a warning naming the extra (``pip install 'deeprecon-rt[report]'``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import UnavailableError
from ..result import MOTION_KIND, Result
from . import dicom_seg, pictures, tables, volumes
from .folder import (MANIFEST_NAME, OUTPUTS_FORMAT, OUTPUTS_SCHEMA, check_output_dir,
                     is_outputs_folder, staging_dir, utc_now, verify_outputs, write_manifest)
from .html_report import write_report
from .run_report import RUN_REPORT_NAME, run_report

log = logging.getLogger(__name__)

#: progress callback: (stage, done, total), as the backends' ``Progress``
Progress = Optional[Callable[[str, int, int], None]]


def _pictures_unavailable() -> str | None:
    """The warning to record when the QC pictures cannot be drawn here, else None."""
    from ..qc import check_drawing

    try:
        check_drawing()
    except UnavailableError as e:
        return (f"no QC pictures: {e.message}; every other output was written (install the "
                f"report extra: pip install 'deeprecon-rt[report]')")
    return None


def write_outputs(result: Result, out_dir: str | Path, *, overwrite: bool = True,
                  progress: Progress = None) -> Path:
    """Write every output of ``result`` into ``out_dir`` atomically (layout: see the
    module docstring; staging and replacement rules: :func:`~.folder.staging_dir`).

    overwrite: replace ``out_dir`` when it is a previous deeprecon output folder (a
               non-empty folder of anything else is always refused with UsageError);
    progress:  called as ``progress("outputs", done, total)`` after each step.
    Returns the output folder's path. Raises UsageError for a folder that must not be
    replaced or a Result whose arrays do not fit its study; any error leaves ``out_dir``
    as it was and no staging folder behind. Without matplotlib the QC pictures are left
    out with a warning (logged, and in run_report.json and report.html).
    """
    t0 = time.perf_counter()
    created = utc_now()
    steps: list[tuple[str, Callable[[Result, Path], Any]]] = [
        ("segmentation", volumes.write_segmentation), ("hr", volumes.write_hr)]
    if result.kind == MOTION_KIND:
        steps.append(("adapted", volumes.write_adapted))
    if dicom_seg.wants_dicom_seg(result):
        no_seg = dicom_seg.dicom_seg_unavailable(result)
        if no_seg is None:
            steps.append(("dicom_seg", dicom_seg.write_dicom_seg))
        else:
            log.warning("%s", no_seg)
            result = dataclasses.replace(result, warnings=[*result.warnings, no_seg])
    steps.append(("measures", tables.write_measures))
    no_pictures = _pictures_unavailable()
    if no_pictures is None:
        steps.append(("pictures", pictures.write_pictures))
    else:
        log.warning("%s", no_pictures)
        result = dataclasses.replace(result, warnings=[*result.warnings, no_pictures])
    total = len(steps) + 3
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress("outputs", done, total)

    target = Path(out_dir)
    with staging_dir(target, overwrite=overwrite, kind=result.kind,
                     manifest_extra={"run_report": RUN_REPORT_NAME}) as stage:
        drawn: dict[str, Any] = {}
        for name, writer in steps:
            out = writer(result, stage)
            if name == "pictures":
                drawn = out
            elif name == "dicom_seg" and out:  # a SEG highdicom refused: said, not fatal
                result = dataclasses.replace(result, warnings=[*result.warnings, *out])
            tick()
        report = run_report(result, created=created)
        write_report(result, stage, drawn, run_report=report,
                     extra_files=(RUN_REPORT_NAME, MANIFEST_NAME))
        tick()
        report["outputs_s"] = time.perf_counter() - t0
        tables.write_json(stage / RUN_REPORT_NAME, report)
        tick()
    tick()
    final = target.expanduser().parent.resolve() / target.name
    log.info("outputs written to %s in %.2f s", final, time.perf_counter() - t0)
    return final


__all__ = ["write_outputs", "check_output_dir", "staging_dir", "is_outputs_folder",
           "verify_outputs", "write_manifest", "run_report", "OUTPUTS_FORMAT",
           "OUTPUTS_SCHEMA", "MANIFEST_NAME"]
