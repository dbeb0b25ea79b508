"""What SIGTERM, SIGHUP and SIGINT do to a run: one policy, used by the CLI (for the whole
command) and by every staged folder (:mod:`deeprecon.runtime.publish`: the output folder,
an exported bundle, a training checkpoint).

- SIGINT (Ctrl-C) raises Python's own KeyboardInterrupt; the CLI exits 130.
- SIGTERM and SIGHUP raise :class:`Terminated` while :func:`terminating_signals_raise` is
  active: a ``SystemExit`` whose status is 128 + the signal's number (143, 129), as the
  shell reports a process ended by that signal. The stack unwinds, so every staging folder
  is removed on the way out. This happens only in the main thread and only for a signal
  that still has its default action: a handler (or SIG_IGN, as under ``nohup``) that the
  embedding program installed is kept.
- While a few renames or a cleanup run, all three are deferred
  (:func:`signals_deferred`) and delivered when the block ends, so that no signal leaves
  them half done.

Only SIGKILL (or a power cut) can leave a staging folder behind; the next publish into
the same parent folder removes it (:func:`deeprecon.runtime.publish.remove_stale_siblings`).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

#: the signals that end a run through :class:`Terminated`
TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
#: the signals deferred while renames run
DEFERRED = frozenset(TERMINATING + (signal.SIGINT,))


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived; exits with status 128 + ``signum`` unless caught."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminating_signals_raise() -> Iterator[None]:
    """While active: SIGTERM and SIGHUP raise :class:`Terminated` (main thread, default
    action only; see the module docstring). The previous handlers come back when the block
    ends. Nests: an inner block finds the handler installed and leaves it alone."""
    installed: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in TERMINATING:
            if signal.getsignal(sig) == signal.SIG_DFL:
                installed[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Defer SIGTERM, SIGINT and SIGHUP (in this thread) while the block runs; one that
    arrives meanwhile is delivered when it ends. A no-op where the platform has no signal
    masks."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


__all__ = ["Terminated", "terminating_signals_raise", "signals_deferred", "TERMINATING",
           "DEFERRED"]
