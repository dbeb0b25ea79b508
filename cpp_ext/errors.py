"""The error of deeprecon.cpp_ext: a compiled kernel that is not built or does not load.

cpp_ext depends on nothing in deeprecon.runtime (it is also used by the trainer, and its
numpy binding by callers without torch): the runtime maps this error to its own exit
code 69 (UNAVAILABLE; see deeprecon.runtime.errors). Importing this module imports
nothing but the standard library.
"""
from __future__ import annotations


class KernelUnavailableError(RuntimeError):
    """A compiled kernel of deeprecon.cpp_ext cannot be used here: not built at install
    time, not loadable (built against another torch), or no kernel for the device.

    Attributes:
        message: one line saying what is missing.
        hint: how to get it (or None); printed on a second line by str().
    """

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"

    def __reduce__(self):  # picklable with its hint (e.g. across DataLoader workers)
        return (_rebuild, (type(self), self.message, self.hint))


def _rebuild(cls, message, hint):
    return cls(message, hint=hint)


__all__ = ["KernelUnavailableError"]
