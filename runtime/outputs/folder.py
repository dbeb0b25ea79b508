"""The output folder as a whole: the rules for the folder it may replace, its staging
(:func:`staging_dir`, published atomically by :mod:`deeprecon.runtime.publish`) and its
manifest ``outputs.json``, written last (every other file with its SHA-256 and size;
:func:`write_manifest`, checked by :func:`verify_outputs`)."""
from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import UsageError
from ..jsonsafe import json_safe
from ..publish import fsync_dir, sha256_file, staged_folder

OUTPUTS_FORMAT = "deeprecon-outputs"
OUTPUTS_SCHEMA = 1
MANIFEST_NAME = "outputs.json"


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second (the ``created`` of the files)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_outputs_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :func:`~deeprecon.runtime.outputs.
    write_outputs` (or :func:`staging_dir`): it holds an ``outputs.json`` of this format."""
    manifest = Path(path) / MANIFEST_NAME
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == OUTPUTS_FORMAT


def _check_target(out: Path, *, overwrite: bool) -> None:
    """Refuse a target that must not be replaced (UsageError, nothing touched)."""
    if out.is_symlink():
        raise UsageError(f"output folder {out} is a symbolic link",
                         hint="give the folder the link points to")
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder",
                         hint="choose another output folder")
    if not any(out.iterdir()):
        return
    if not is_outputs_folder(out):
        raise UsageError(
            f"output folder {out} is not empty and does not hold deeprecon outputs "
            f"(no {MANIFEST_NAME} of format {OUTPUTS_FORMAT!r}); nothing was written",
            hint="choose a new or empty folder; deeprecon only replaces its own output folders")
    if not overwrite:
        raise UsageError(f"output folder {out} already holds deeprecon outputs",
                         hint="allow overwriting (--overwrite) or choose another folder")


def _resolve_out(out_dir: str | Path) -> Path:
    out = Path(out_dir).expanduser()
    if not out.name or out.name in (".", ".."):
        raise UsageError(f"{str(out_dir)!r} is not a usable output folder name",
                         hint="name the output folder itself, e.g. out/case001")
    return out.parent.resolve() / out.name


def check_output_dir(out_dir: str | Path, *, overwrite: bool = True) -> Path:
    """Check, before any work, that ``write_outputs`` may write ``out_dir``: it does not
    exist, is an empty folder, or is a previous deeprecon output folder (and
    ``overwrite``). Raises UsageError otherwise (nothing is touched); returns the
    absolute path (parent folder resolved)."""
    out = _resolve_out(out_dir)
    _check_target(out, overwrite=overwrite)
    return out


def write_manifest(folder: str | Path, *, kind: str | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``outputs.json``: every other file under ``folder`` (relative POSIX paths,
    sorted) with its SHA-256 and size; the files are flushed to disk first. Symbolic
    links and special files are refused (an output folder holds plain files only)."""
    folder = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise UsageError(f"{rel} in the output folder is not a plain file or folder")
        if path.is_file():
            files[rel] = {"sha256": sha256_file(path, fsync=True), "bytes": path.stat().st_size}
    manifest = {"format": OUTPUTS_FORMAT, "schema": OUTPUTS_SCHEMA, "kind": kind,
                "created": utc_now(), **dict(extra or {}), "files": files}
    path = folder / MANIFEST_NAME
    with open(path, "w") as f:
        f.write(json.dumps(json_safe(manifest), indent=2, allow_nan=False))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)
    return path


def verify_outputs(out_dir: str | Path) -> dict[str, Any]:
    """Check an output folder against its manifest: every listed file exists with its
    SHA-256 and size, and no other file is present. Returns the manifest; raises
    UsageError naming the first difference."""
    out = Path(out_dir)
    if not is_outputs_folder(out):
        raise UsageError(f"{out} is not a deeprecon output folder (no valid {MANIFEST_NAME})")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    listed = manifest.get("files", {})
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    present.discard(MANIFEST_NAME)
    if present - set(listed):
        raise UsageError(f"{out}: files not in the manifest: {sorted(present - set(listed))}")
    for rel, entry in listed.items():
        if rel not in present:
            raise UsageError(f"{out}: {rel} is listed in the manifest but missing")
        path = out / rel
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise UsageError(f"{out}: {rel} differs from the manifest (SHA-256 or size)")
    return manifest


@contextlib.contextmanager
def staging_dir(out_dir: str | Path, *, overwrite: bool = True, kind: str | None = None,
                manifest_extra: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """A hidden staging folder for ``out_dir``, moved onto it when the block ends.

    Usage::

        with staging_dir(out) as stage:
            ...write files under stage...
        # here out holds them, plus outputs.json (the manifest, written last)

    Rules:

    - ``out_dir`` not existing, or an empty folder: the staging folder is renamed onto it.
    - ``out_dir`` a previous deeprecon output folder (an ``outputs.json`` of this format):
      replaced when ``overwrite`` (the old folder is renamed aside to a hidden
      ``.{name}.old-*`` sibling, the new one renamed in, the old one deleted), else
      UsageError. Anything else non-empty (user files): UsageError, nothing is touched.
      The check runs before anything is written and again just before the rename.
    - Staging and trash siblings left by killed runs (pid gone) are removed first.
    - On any exception, KeyboardInterrupt included, the staging folder is removed and the
      exception re-raised; ``out_dir`` is left as it was. SIGTERM and SIGHUP unwind the
      same way (:mod:`deeprecon.runtime.signals`). Only SIGKILL (or a power cut) can
      leave a staging folder behind, which the next run into the same parent removes.

    The mechanics are :func:`deeprecon.runtime.publish.staged_folder`'s.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    with staged_folder(out, check=lambda o: _check_target(o, overwrite=overwrite)) as stage:
        yield stage
        write_manifest(stage, kind=kind, extra=manifest_extra)


__all__ = ["OUTPUTS_FORMAT", "OUTPUTS_SCHEMA", "MANIFEST_NAME", "utc_now", "is_outputs_folder",
           "check_output_dir", "write_manifest", "verify_outputs", "staging_dir"]
