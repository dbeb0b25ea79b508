"""The one converter of Python and numpy data to what JSON can hold without loss of
meaning: used by ``study info``, the metrics and every JSON file of an output folder."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np


def json_safe(obj: Any) -> Any:
    """A JSON-safe copy of ``obj``: numpy scalars and arrays become Python numbers and
    lists, tuples and sets lists, NaN and infinite floats None, paths str, dataclasses
    dicts, and anything else unknown its ``str()``; dict keys become str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    return str(obj)


__all__ = ["json_safe"]
