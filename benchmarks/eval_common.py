"""What the evaluation scripts beside it share (eval_recon.py, eval_motion.py): their
timer, the KEY=VALUE phantom options of their command lines, and the "mean (sd)" cells
of their markdown tables. Imported as ``python benchmarks/NAME.py`` puts this folder on
``sys.path``."""
from __future__ import annotations

import json
import time
from typing import Any, Sequence


def timer() -> tuple[float, float]:
    """(wall, CPU) clocks now, for :func:`elapsed`."""
    return time.perf_counter(), time.process_time()


def elapsed(t: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds since ``t`` (a :func:`timer`)."""
    return {"wall_s": round(time.perf_counter() - t[0], 3),
            "cpu_s": round(time.process_time() - t[1], 3)}


def phantom_options(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> make_phantom keywords (values parsed as JSON when they are)."""
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def mean_sd_text(d: dict | None, digits: int = 1) -> str:
    """A {"mean", "sd", "n_infinite"?} summary as "m (sd)" ("-" when there is none), with
    the count of infinite values (e.g. HD95 of an empty structure) when there are any."""
    if not d or d["mean"] is None:
        return "-"
    s = f"{d['mean']:.{digits}f}"
    return s + (f" ({d['sd']:.{digits}f})" if d["sd"] is not None else "") + \
        (f" [{d['n_infinite']} inf]" if d.get("n_infinite") else "")


def provenance_line(result: dict[str, Any], *, data: str | None = None) -> str:
    """The sentence above a result's tables: the model (name, preset, manifest hash, K,
    backend; marked when the bundle is untrained), the data, the CPU and wall time, the
    machine and the commit."""
    b, c, dev, git = result["bundle"], result["config"], result["device"], result["git"]
    return (f"Model: `{b['name']}` (preset {b['preset']}, manifest sha256 {b['sha256'][:12]}), "
            f"K = {c['steps']} inversion steps, backend {c['backend']}. "
            + ("" if result["bundle_trained"] else
               "**Untrained bundle (its provenance lists no training run): a harness check; "
               "the numbers say nothing about the method.** ")
            + (f"Data: {data}. " if data else "")
            + f"CPU time {result['cpu_s']:.0f} s, wall {result['wall_s']:.0f} s on {dev['cores']} "
              f"cores ({dev['cpu']}); commit {git['commit'][:10]}{' (dirty)' if git['dirty'] else ''}.")
