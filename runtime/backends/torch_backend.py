"""The torch runner: the bundle's ``torch.export`` programs on the CPU or a CUDA device.

Differentiable, so it composes the ``loss_and_grad`` graph by autograd through G, E and
LPIPS (:func:`deeprecon.runtime.inversion.hybrid_loss`), with the ROI-L2 and local-NCC
terms (and their gradient) from the fused op :func:`deeprecon.cpp_ext.ncc_roi_loss` (its
compiled CPU or CUDA kernel; a missing kernel is an error, never a silent fallback to
the reference).

Its inversion is the shared loop (:func:`deeprecon.runtime.inversion.optimise`) run on
torch tensors that stay on the device (images, ROI, codes and Adam state), through
:class:`TorchOps`: the same steps, losses and codes as the loop on the host over
``run("loss_and_grad")``, without copying the batch to and from the device at every
step.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np

from ..bundle import Bundle
from ..errors import UnavailableError, UsageError
from ..inversion import (LOSS_AND_GRAD, ArrayOps, Inversion, InversionSettings, Progress,
                         hybrid_loss, hybrid_loss_and_grad, invert, optimise)
from .base import Runner

log = logging.getLogger(__name__)


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise UnavailableError(f"the torch backend needs PyTorch, which is not installed ({e})",
                               hint="pip install 'deeprecon-rt[torch]', or choose another "
                                    "backend") from None
    return torch


def resolve_torch_device(device: str):
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch.device that really exists here;
    UnavailableError naming what is missing otherwise (no fallback to the CPU)."""
    torch = _import_torch()
    if not isinstance(device, str) or not (device == "cpu" or device == "cuda"
                                           or (device.startswith("cuda:")
                                               and device[5:].isdigit())):
        raise UsageError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise UnavailableError(f"device {device} was asked for, but {why}",
                               hint="run with --device cpu")
    dev = torch.device(device)
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise UnavailableError(f"device {device} does not exist: "
                               f"{torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)


class TorchOps(ArrayOps):
    """:class:`~deeprecon.runtime.inversion.ArrayOps` on torch tensors on one device."""

    _DTYPES = ("float32", "float64", "int64", "bool")

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.dtypes = {n: getattr(torch, n) for n in self._DTYPES}

    def from_numpy(self, a: np.ndarray):
        """A float32 tensor on the device (it may share memory with ``a`` on the CPU)."""
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

    def to_numpy(self, a) -> np.ndarray:
        return a.cpu().numpy()

    def zeros(self, n, dtype):
        return self.torch.zeros(n, dtype=self.dtypes[dtype], device=self.device)

    def full(self, n, value, dtype):
        return self.torch.full((n,), value, dtype=self.dtypes[dtype], device=self.device)

    def zeros_like(self, a):
        return self.torch.zeros_like(a)

    def copy(self, a):
        return a.clone()

    def nonzero(self, mask):
        return mask.nonzero().squeeze(1)

    def astype(self, a, dtype):
        return a.to(self.dtypes[dtype])

    def where(self, cond, a, b):
        return self.torch.where(cond, a, b)

    def sqrt(self, a):
        # float32 sqrt on the CPU (AVX-512) is off by one ulp for about a fifth of the
        # values; through float64 it is correctly rounded, as numpy's (tiny arrays here)
        return a.double().sqrt().to(a.dtype)

    def clamp_min(self, a, value):
        return a.clamp_min(value)

    def isfinite(self, a):
        return self.torch.isfinite(a)


class TorchRunner(Runner):
    """Runs the bundle's torch.export programs (encoder, generator, segmenter, lpips) and
    composes ``loss_and_grad`` from them."""

    name = "torch"

    def __init__(self, bundle: Bundle, device: str = "cpu", *, threads: int | None = None):
        super().__init__(bundle)
        torch = _import_torch()
        self.torch = torch
        if threads is not None:  # torch has one intra-op pool per process
            torch.set_num_threads(int(threads))
        self._device = resolve_torch_device(device)
        self.device = str(self._device)
        from deeprecon.cpp_ext import kernels_available, load_library
        from deeprecon.cpp_ext.errors import KernelUnavailableError
        try:
            load_library()
        except KernelUnavailableError as e:  # the runtime's own error type for its callers
            raise UnavailableError(e.message, hint=e.hint) from None
        kernels = kernels_available()
        need = "cuda" if self._device.type == "cuda" else "cpu"
        if not kernels.get(need, False):
            raise UnavailableError(f"the fused NCC/ROI loss has no compiled {need} kernel in "
                                   "this installation",
                                   hint="reinstall deeprecon-rt with --no-build-isolation "
                                        "(with nvcc on the PATH for CUDA)")
        t0 = time.perf_counter()
        self.programs = {}
        for graph in ("encoder", "generator", "segmenter"):
            self.programs[graph] = bundle.load_program(graph, device=self.device)
        # lpips is loaded on the first call that needs it (an inversion with steps > 0)
        self.ops = TorchOps(torch, self._device)
        log.debug("torch runner: programs loaded on %s in %.2f s", self.device,
                  time.perf_counter() - t0)

    def _program(self, graph: str):
        if graph not in self.programs:
            self.programs[graph] = self.bundle.load_program(graph, device=self.device)
        return self.programs[graph]

    # -- the hook -------------------------------------------------------------------
    def _run_impl(self, graph: str, feeds: Mapping[str, np.ndarray],
                  attrs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        spec = self.graph_spec(graph)
        args = [self.ops.from_numpy(feeds[t.name]) for t in spec.inputs]
        if graph == LOSS_AND_GRAD:
            outs = self._loss_and_grad(*args, **attrs)
        else:
            with self.torch.no_grad():
                y = self._program(graph)(*args)
            outs = (y,) if isinstance(y, self.torch.Tensor) else tuple(y)
        return {t.name: o.detach().float().cpu().numpy() for t, o in zip(spec.outputs, outs)}

    def _networks(self, x) -> dict[str, Any]:
        """hybrid_loss's networks over the bundle's programs, for targets x."""
        lpips = self._program("lpips")
        return {"generator": self._program("generator"), "encoder": self._program("encoder"),
                "lpips_to_x": lambda y: lpips(x, y)}

    def _loss(self, x, roi, w, **weights):
        """hybrid_loss over the bundle's programs: (loss [k], G(w)), tensors on the device."""
        return hybrid_loss(w, x, roi, **self._networks(x), **weights)

    def _loss_and_grad(self, x, roi, w, **weights):
        """(loss [k], dloss/dw [k, L, C]): the loss_and_grad graph on device tensors."""
        return hybrid_loss_and_grad(w, x, roi, **self._networks(x), **weights)

    # -- the on-device inversion ------------------------------------------------------
    def invert(self, x: np.ndarray, roi: np.ndarray, w0: np.ndarray, settings: InversionSettings,
               *, progress: Progress = None) -> Inversion:
        return invert(self, x, roi, w0, settings, progress=progress,
                      optimise_chunk=self._optimise_on_device)

    def _optimise_on_device(self, x, roi, w0, s: InversionSettings, *, progress, chunk
                            ) -> dict[str, np.ndarray]:
        """:func:`optimise` with the batch, the codes and Adam's state on the device."""
        ops, torch = self.ops, self.torch
        weights = s.loss_weights()

        def loss_only(xa, ra, wa):
            with torch.no_grad():
                return self._loss(xa, ra, wa, **weights)[0]

        def loss_and_grad(xa, ra, wa):
            return self._loss_and_grad(xa, ra, wa, **weights)

        out = optimise(loss_and_grad, ops.from_numpy(x), ops.from_numpy(roi),
                       ops.from_numpy(w0), s, loss=loss_only, ops=ops, progress=progress,
                       chunk=chunk)
        return {k: ops.to_numpy(v) for k, v in out.items()}

    def info(self) -> dict[str, Any]:
        torch = self.torch
        d = {"backend": self.name, "device": self.device, "torch": torch.__version__}
        if self._device.type == "cuda":
            d["gpu"] = torch.cuda.get_device_name(self._device)
            d["cuda"] = torch.version.cuda
        else:
            d["threads"] = torch.get_num_threads()
        return d

    def close(self) -> None:
        self.programs.clear()
        if self._device.type == "cuda":
            self.torch.cuda.empty_cache()


#: the name earlier versions gave the torch runner
TorchBackend = TorchRunner

__all__ = ["TorchRunner", "TorchBackend", "TorchOps", "resolve_torch_device"]
