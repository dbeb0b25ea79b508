"""Publishing files and folders atomically, and the one file hash (SHA-256).

A reader sees the previous version or the new one, never half of either:

- a file (:func:`write_file_atomic`, :func:`write_json_atomic`): written under a hidden
  temporary name beside it, flushed to disk, then renamed over it;
- a folder (:func:`staged_folder`, :func:`publish_folder`): written into a hidden staging
  folder beside it, ``.{name}.partial-{pid}-{random}``, then renamed onto it. A folder
  already there is first renamed aside to ``.{name}.old-{pid}-{random}`` and deleted after
  the rename (put back if the rename fails); an empty folder is replaced directly.
  Staging and trash folders left by processes that no longer exist (SIGKILL, power cut)
  are removed by the next publish into the same parent (:func:`remove_stale_siblings`);
  their pid is only meaningful on this machine, so two machines must not publish into
  one parent folder at the same time.

Signals follow :mod:`deeprecon.runtime.signals`: while a staged folder is open, SIGTERM and
SIGHUP unwind the stack (the staging folder is removed), and the renames run with the
signals deferred.

Files that land in a manifest or in git must also be the same bytes when written again
from the same content: :func:`canonical_safetensors` puts a safetensors header's
metadata in sorted order (the library writes it in hash order, which changes from run to
run).

Used by the output folder (:mod:`deeprecon.runtime.outputs`), the exporter's bundles and
the trainer's checkpoints. Imports nothing but the standard library.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

from .signals import signals_deferred, terminating_signals_raise

log = logging.getLogger(__name__)

#: the infix of a staging folder's name, ``.{name}.partial-{pid}-{random}``
PARTIAL = ".partial-"
#: the infix of the folder a replaced one is moved to, ``.{name}.old-{pid}-{random}``
TRASH = ".old-"
_BLOCK = 1 << 20


# ----------------------------------------------------------------------------- hashing
def sha256_file(path: str | Path, *, fsync: bool = False) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks; with ``fsync`` the file's data
    is also flushed to disk (for a manifest written right after)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
        if fsync:
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- files
def write_file_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Publish one file: ``write(tmp)`` writes the content to a temporary path beside
    ``path`` (e.g. ``lambda p: save_file(tensors, str(p))``), which is then flushed and
    renamed onto ``path``. Any error removes the temporary file and leaves ``path`` as it
    was. The file gets the usual permissions (0o666 minus the umask). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | Path, data: Any, *, sort_keys: bool = True) -> Path:
    """Publish ``data`` as a JSON file (indent 2, keys sorted unless ``sort_keys`` is
    False, a final newline) with :func:`write_file_atomic`."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys) + "\n"
    return write_file_atomic(path, lambda tmp: tmp.write_text(text))


def canonical_safetensors(raw: bytes) -> bytes:
    """The bytes of a safetensors file with its header's ``__metadata__`` entries in sorted
    key order, the rest unchanged. The safetensors library writes that map in hash order,
    which differs between processes, so two saves of the same tensors and metadata gave
    files with different SHA-256 (a re-exported bundle changed every weight file). The
    header keeps its length (its padding is spaces, as the format allows), so the tensor
    offsets stay valid. Raises ValueError for bytes that are not a safetensors file."""
    if len(raw) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError(f"not a safetensors file: a {n}-byte header in {len(raw)} bytes")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not meta:
        return raw
    header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # only the order changed, so the JSON cannot have grown
        raise ValueError(f"safetensors header re-encoded to {len(text)} bytes, over its {n}")
    return raw[:8] + text.ljust(n, b" ") + raw[8 + n:]


# ----------------------------------------------------------------------------- folders
def new_sibling(out: str | Path, infix: str) -> Path:
    """Create the empty folder ``.{out.name}{infix}{pid}-{random}`` beside ``out`` (mode
    0o777 minus the umask: the published folder gets the usual permissions, unlike
    ``mkdtemp``'s 0o700)."""
    out = Path(out)
    while True:
        path = out.parent / f".{out.name}{infix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # EPERM: it exists, owned by someone else
        return True
    return True


def _sibling_pid(entry: str, prefix: str) -> int | None:
    """The pid in ``{prefix}{pid}-{random}``, or None when ``entry`` is not one."""
    if not entry.startswith(prefix):
        return None
    pid, _, rest = entry[len(prefix):].partition("-")
    return int(pid) if pid.isdigit() and rest else None


def remove_stale_siblings(out: str | Path) -> list[Path]:
    """Remove the staging (``.{name}.partial-{pid}-*``) and trash (``.{name}.old-{pid}-*``)
    siblings of ``out`` left by processes that no longer exist. Those of live processes
    (this one included) are kept: a concurrent run may still be writing them. Returns the
    paths removed."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    removed = []
    prefixes = (f".{out.name}{PARTIAL}", f".{out.name}{TRASH}")
    for entry in parent.iterdir():
        for prefix in prefixes:
            pid = _sibling_pid(entry.name, prefix)
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            log.info("removed %s, left by an interrupted run (pid %d)", entry, pid)
            removed.append(entry)
    return removed


def publish_folder(stage: str | Path, out: str | Path, *,
                   check: Callable[[Path], None] | None = None) -> None:
    """Rename the complete folder ``stage`` onto ``out`` (a sibling of it), with the
    signals deferred. ``check(out)`` runs first, inside the same block: it raises to
    refuse a target that must not be replaced (it may have appeared since the work
    began). Anything at ``out`` but an empty folder is renamed aside first and deleted
    after the rename; if the rename fails, it is put back and the error re-raised."""
    stage, out = Path(stage), Path(out)
    with signals_deferred():
        if check is not None:
            check(out)
        occupied = out.is_symlink() or (out.exists() and not (out.is_dir() and not any(out.iterdir())))
        if occupied:
            trash = new_sibling(out, TRASH)
            os.replace(out, trash / "previous")
            try:
                os.replace(stage, out)
            except BaseException:
                os.replace(trash / "previous", out)   # put the previous one back
                trash.rmdir()
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(stage, out)   # rename(2) replaces an empty folder atomically
        fsync_dir(out.parent)


@contextlib.contextmanager
def staged_folder(out: str | Path, *, check: Callable[[Path], None] | None = None
                  ) -> Iterator[Path]:
    """A new staging folder for ``out``, published onto it when the block ends::

        with staged_folder(out, check=refuse_foreign) as stage:
            ...write files under stage...
        # here out holds them

    Stale siblings of dead processes are removed first. On any exception (KeyboardInterrupt
    and :class:`~deeprecon.runtime.signals.Terminated` included) the staging folder is
    removed and the exception re-raised; ``out`` is left as it was. ``check``: as for
    :func:`publish_folder` (the caller checks before the work too, to fail early)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    stage: Path | None = None
    with terminating_signals_raise():
        try:
            with signals_deferred():
                stage = new_sibling(out, PARTIAL)
            log.debug("staging %s in %s", out, stage)
            yield stage
            publish_folder(stage, out, check=check)
        except BaseException:
            if stage is not None:
                with signals_deferred():
                    shutil.rmtree(stage, ignore_errors=True)
            raise


__all__ = ["canonical_safetensors", "sha256_file", "fsync_dir", "write_file_atomic",
           "write_json_atomic", "new_sibling", "remove_stale_siblings", "publish_folder", "staged_folder", "PARTIAL", "TRASH"]
