"""Errors the runtime raises on purpose, each with the exit code the CLI returns.

Exit codes (sysexits.h names), used across the whole CLI:

    0  OK           success
    1  PARTIAL      a cohort run in which some studies failed (each one's code and
                    message are in its summary CSV; the others were written)
    2  USAGE        bad command line (wrong option, missing argument)
    65 DATAERR      bad input data (malformed DICOM, mixed series, missing slice, ...)
    66 NOINPUT      no input (path does not exist, folder holds no images)
    69 UNAVAILABLE  backend, device, extension or model bundle unavailable (also
                    deeprecon.cpp_ext's KernelUnavailableError: see FOREIGN_EXIT_CODES)
    70 SOFTWARE     internal error (a bug: please report it)
    75 TEMPFAIL     out of memory (retry with a smaller batch or on another device)
    78 CONFIG       bad model bundle (a file changed or missing, unknown schema, a graph
                    that does not match its manifest)

Library code raises these; only the CLI turns them into exit codes.
"""
from __future__ import annotations

from enum import IntEnum

from deeprecon.cpp_ext.errors import KernelUnavailableError


class ExitCode(IntEnum):
    OK = 0
    PARTIAL = 1
    USAGE = 2
    DATA = 65
    NO_INPUT = 66
    UNAVAILABLE = 69
    INTERNAL = 70
    OUT_OF_MEMORY = 75
    BAD_BUNDLE = 78


class DeepreconError(Exception):
    """Base class: an error with a message meant for the user and an exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"


class UsageError(DeepreconError):
    """The call itself is wrong (an option out of range, a missing argument)."""

    exit_code = ExitCode.USAGE


class InvalidStudyError(DeepreconError):
    """The input exists but is not a usable study (exit 65)."""

    exit_code = ExitCode.DATA


class NoInputError(DeepreconError):
    """The input path does not exist or holds no images (exit 66)."""

    exit_code = ExitCode.NO_INPUT


class UnavailableError(DeepreconError):
    """A backend, device, compiled extension or bundle cannot be used here (exit 69)."""

    exit_code = ExitCode.UNAVAILABLE


class OutOfMemoryError(DeepreconError):
    """Ran out of host or device memory (exit 75)."""

    exit_code = ExitCode.OUT_OF_MEMORY


class BundleError(DeepreconError):
    """A model bundle is damaged or inconsistent: a file whose SHA-256 differs from the
    manifest, a missing or unlisted file, an unknown schema, pickled code (exit 78)."""

    exit_code = ExitCode.BAD_BUNDLE


#: Errors of parts of the package that do not depend on the runtime (so they are not
#: DeepreconErrors), with the exit code the CLI returns for each.
FOREIGN_EXIT_CODES: dict[type[Exception], ExitCode] = {
    KernelUnavailableError: ExitCode.UNAVAILABLE,  # a cpp_ext kernel not built / not loading
}
FOREIGN_ERRORS = tuple(FOREIGN_EXIT_CODES)


def exit_code_of(error: Exception) -> ExitCode:
    """The exit code of a DeepreconError or of one of FOREIGN_ERRORS (INTERNAL otherwise)."""
    if isinstance(error, DeepreconError):
        return error.exit_code
    return next((code for cls, code in FOREIGN_EXIT_CODES.items() if isinstance(error, cls)),
                ExitCode.INTERNAL)
