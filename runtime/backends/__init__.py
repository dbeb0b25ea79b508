"""Runners: one small contract (:class:`~.base.Runner`) for running a bundle's graphs.

``open_backend(bundle, "torch", device)`` returns a runner or raises an error naming
what is missing (the package, the device, the compiled kernel); nothing falls back to
another backend or device on its own. This version has the ``torch`` runner; the
onnxruntime and TensorRT runners come behind the same contract.
"""
from __future__ import annotations

from ..bundle import Bundle
from ..errors import UsageError
from ..inversion import Inversion, InversionSettings, Progress
from .base import Backend, Runner

BACKENDS = ("torch",)
PLANNED = ("onnxruntime", "tensorrt")


def open_backend(bundle: Bundle, name: str = "torch", device: str = "cpu") -> Runner:
    """Open runner ``name`` on ``bundle`` and ``device`` ("cpu", "cuda", "cuda:N")."""
    if name == "torch":
        from .torch_backend import TorchRunner
        return TorchRunner(bundle, device)
    if name in PLANNED:
        raise UsageError(f"the {name} backend is not part of this version yet",
                         hint=f"available: {', '.join(BACKENDS)}")
    raise UsageError(f"unknown backend {name!r}", hint=f"available: {', '.join(BACKENDS)}")


__all__ = ["Runner", "Backend", "Inversion", "InversionSettings", "Progress", "open_backend",
           "BACKENDS"]
