"""benchmarks/gan_rec_curve.py: a resumed segment replaces its predecessor's tail, and
the bins average the right lines."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gan_rec_curve import curve, read_run  # noqa: E402


def _log(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_segments_replace_the_tail_and_bins_average(tmp_path):
    a = _log(tmp_path / "a.jsonl", [{"step": s, "nimg": 32 * s, "rec_psnr": 10.0 + s / 100}
                                    for s in (100, 200, 300, 400)]
             + [{"step": 400, "fd": 1.0}])            # a line without rec_psnr is skipped
    b = _log(tmp_path / "b.jsonl", [{"step": s, "nimg": 32 * s, "rec_psnr": 20.0}
                                    for s in (300, 500)])
    lines = read_run([a, b])
    assert [d["step"] for d in lines] == [100, 200, 300, 500]
    assert [d["rec_psnr"] for d in lines] == [11.0, 12.0, 20.0, 20.0]
    c = curve(lines, bin_kimg=8.0)                     # 3.2k, 6.4k | 9.6k, 16k
    assert c == {0: pytest.approx(11.5), 1: pytest.approx(20.0), 2: pytest.approx(20.0)}
