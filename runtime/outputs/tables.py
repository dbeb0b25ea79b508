"""The measures of an output folder as tables::

    measures.csv    one row per source ("native", "hr"; for a motion adaptation also
                    "source/native", "source/hr", "target/native", "target/hr"): source,
                    the nine ukbb_cardiac columns, ED frame, ES frame (frame numbers)
    measures.json   the full measures per source (ED/ES indices, voxel volume, volume
                    curves), the frame numbers, the plausibility flags and "flagged":
                    {source: {measure: [flag codes]}}

and :func:`write_json`, how every JSON file of the folder is written.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..jsonsafe import json_safe
from ..measures import MEASURE_COLUMNS
from ..result import MOTION_KIND, Result, frame_ids

#: the columns of measures.csv after the measures
CSV_EXTRA = ("ED frame", "ES frame")


def write_json(path: Path, data: Any) -> None:
    """``data`` made JSON-safe (:func:`~deeprecon.runtime.jsonsafe.json_safe`), strict
    JSON (no NaN), indented, with a final newline."""
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def csv_value(v: Any) -> str:
    """The CSV text of a value: full-precision numbers (repr round-trips a float); empty
    for None and NaN."""
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v)) if math.isfinite(v) else ""
    return str(v)


def _measure_rows(result: Result, prefix: str = "") -> list[dict[str, Any]]:
    ids = frame_ids(result)
    rows = []
    order = [k for k in ("native", "hr") if k in result.measures]
    order += [k for k in result.measures if k not in order]
    for source in order:
        m = result.measures[source]
        row: dict[str, Any] = {"source": prefix + source}
        for col in MEASURE_COLUMNS:
            row[col] = m.get(col)
        for col, key in zip(CSV_EXTRA, ("ed_phase", "es_phase")):
            idx = m.get(key)
            row[col] = ids[idx] if idx is not None and 0 <= idx < len(ids) else None
        rows.append(row)
    return rows


def flagged_measures(result: Result) -> dict[str, dict[str, list[str]]]:
    """{source: {measure: [flag codes]}} of the Result's plausibility flags (the
    "flagged" entry of measures.json): which measures not to trust without a look."""
    out: dict[str, dict[str, list[str]]] = {}
    for f in result.plausibility:
        codes = out.setdefault(str(f.get("source")), {}).setdefault(str(f.get("measure")), [])
        if f.get("code") not in codes:
            codes.append(f.get("code"))
    return out


def write_measures(result: Result, stage: Path) -> None:
    """measures.csv (ukbb_cardiac columns) and measures.json."""
    rows = _measure_rows(result)
    extra = result.extra if result.kind == MOTION_KIND else {}
    for name in ("source", "target"):
        if isinstance(extra.get(name), Result):
            rows += _measure_rows(extra[name], prefix=f"{name}/")
    header = ["source", *MEASURE_COLUMNS, *CSV_EXTRA]
    with open(stage / "measures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([csv_value(row[c]) for c in header])
    data: dict[str, Any] = {
        "columns": list(MEASURE_COLUMNS),
        "frame_ids": frame_ids(result),
        "ed_es_index_of": "the reconstructed phases (see frame_ids)",
        "measures": result.measures,
        "flagged": flagged_measures(result),
        "plausibility": list(result.plausibility),
    }
    for name in ("source", "target"):
        if isinstance(extra.get(name), Result):
            data[name] = {"frame_ids": frame_ids(extra[name]), "measures": extra[name].measures,
                          "flagged": flagged_measures(extra[name]),
                          "plausibility": list(extra[name].plausibility)}
    write_json(stage / "measures.json", data)


__all__ = ["write_measures", "write_json", "csv_value", "flagged_measures", "CSV_EXTRA"]
