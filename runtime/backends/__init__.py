"""Runners: one small contract (:class:`~.base.Runner`) for running a bundle's graphs.

``open_backend(bundle, name, device)`` returns a runner or raises an error naming what
is missing (the package, the device, the compiled kernel, the bundle's artifact);
nothing falls back to another backend or device on its own. Runners: ``onnxruntime``
(the lean one: no torch), ``torch``; ``auto`` is onnxruntime when it is installed and
the bundle has its graphs, else torch (the choice is logged and in the run report).
TensorRT cannot be installed where this project is built and tested: its runner is not
part of this version.
"""
from __future__ import annotations

import importlib.util
import logging

from ..bundle import Bundle
from ..errors import UsageError
from ..inversion import Inversion, InversionSettings, Progress
from .base import Backend, Runner

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch")
CHOICES = ("auto",) + BACKENDS
PLANNED = ("tensorrt",)


def auto_backend(bundle: Bundle) -> str:
    """``auto``: onnxruntime when it is installed and the bundle has its ONNX graphs
    (faster on the CPU: benchmarks/results), otherwise torch."""
    has_onnx = all("onnx" in bundle.graphs[g].artifacts for g in ("encoder", "generator", "segmenter")) \
        and "hybrid_grad" in bundle.graphs
    if importlib.util.find_spec("onnxruntime") is not None and has_onnx:
        return "onnxruntime"
    return "torch"


def auto_device(backend: str) -> str:
    """``--device auto``: "cuda" when the backend sees a CUDA device (torch: CUDA
    available; onnxruntime: the CUDA execution provider installed), else "cpu"."""
    if backend == "torch":
        try:
            import torch
        except ImportError:
            return "cpu"  # the runner then names the missing package
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import onnxruntime as ort
    except ImportError:
        return "cpu"
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def open_backend(bundle: Bundle, name: str = "auto", device: str = "auto", *,
                 threads: int | None = None) -> Runner:
    """Open runner ``name`` (``auto``, ``onnxruntime``, ``torch``) on ``bundle`` and
    ``device`` ("auto", "cpu", "cuda", "cuda:N"); the auto choices are logged (and the
    run report records the runner and device that ran). ``threads``: the CPU threads the
    runner may use (None: the library's default, one per core); onnxruntime sets it per
    session, torch for the whole process (``torch.set_num_threads``)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise UsageError(f"threads must be a whole number >= 1 (got {threads!r})")
    if name == "auto":
        name = auto_backend(bundle)
        log.info("backend auto: %s", name)
    if device == "auto":
        device = auto_device(name)
        log.info("device auto: %s", device)
    if name == "torch":
        from .torch_backend import TorchRunner
        return TorchRunner(bundle, device, threads=threads)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeRunner
        return OnnxRuntimeRunner(bundle, device, threads=threads)
    if name in PLANNED:
        raise UsageError(f"the {name} backend is not part of this version (TensorRT cannot be "
                         f"installed where it is built and tested)",
                         hint=f"available: {', '.join(CHOICES)}")
    raise UsageError(f"unknown backend {name!r}", hint=f"available: {', '.join(CHOICES)}")


__all__ = ["Runner", "Backend", "Inversion", "InversionSettings", "Progress", "open_backend",
           "auto_backend", "auto_device", "BACKENDS", "CHOICES"]
