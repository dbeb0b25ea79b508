"""What every benchmark result records about where it ran: the git commit (and whether
the tree had uncommitted changes) and the CPU model. Imported by the scripts beside it
(run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``)."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_info() -> dict:
    """{"commit": HEAD's hash, "dirty": uncommitted changes in the tree}."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=REPO).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
