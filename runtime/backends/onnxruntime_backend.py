"""The onnxruntime runner: the bundle's ONNX graphs, no torch anywhere.

Forward graphs (encoder, generator, segmenter) run as they are. The inversion's
``loss_and_grad`` (:func:`deeprecon.runtime.bundle.gradient_graph_specs`) is one run
of the bundle's ``hybrid_grad`` graph per step::

    loss, grad = hybrid_grad(w, x, roi, fx, (lambda1, lambda2, lambda3), ncc_window)

where fx are the LPIPS features of x (``lpips_features``), computed once per image for
the whole inversion (:meth:`OnnxRuntimeRunner.invert`). The graph holds the whole loss:
its NCC/ROI-L2 terms are the fused kernel's, written in closed form
(:func:`deeprecon.export.vjp.ncc_roi_terms`) and checked at export against the kernel.
Up to schema 2 the kernel ran on the host between a generator run and the gradient
graph, which then ran G's forward pass a second time (docs/runtime.md: the one graph
is measured faster and equal). So this runner needs no compiled extension.

Devices: ``cpu`` (CPUExecutionProvider) and ``cuda[:N]`` (CUDAExecutionProvider of
onnxruntime-gpu). A
provider that is not installed, or that a session did not load (checked with
``session.get_providers()`` after creation), is an UnavailableError naming it: never a
silent run on another device.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np

from ..bundle import Bundle
from ..errors import UnavailableError, UsageError
from ..inversion import LOSS_AND_GRAD, Inversion, InversionSettings, Progress, invert, optimise
from .base import Runner

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'deeprecon-rt[onnx]'"


def resolve_ort_device(device: str) -> tuple[str, list]:
    """("cpu" | "cuda:N", the providers list for a session) for a device string."""
    if device == "cpu":
        return "cpu", ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise UsageError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N")
        return f"cuda:{int(index)}", [("CUDAExecutionProvider", {"device_id": int(index)})]
    raise UsageError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N")


def _provider_name(p) -> str:
    return p[0] if isinstance(p, tuple) else p


class _Rows:
    """Images and their cached LPIPS features, indexed together (what
    :func:`deeprecon.runtime.inversion.optimise` indexes as its ``x``)."""

    def __init__(self, x: np.ndarray, fx: dict[str, np.ndarray]):
        self.x, self.fx = x, fx

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx) -> "_Rows":
        return _Rows(self.x[idx], {k: v[idx] for k, v in self.fx.items()})


class OnnxRuntimeRunner(Runner):
    """Runs the bundle's ONNX graphs in onnxruntime; ``loss_and_grad`` is the
    hybrid_grad graph on the cached LPIPS features of x (module docstring)."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "cpu", *, threads: int | None = None):
        super().__init__(bundle)
        try:
            import onnxruntime as ort
        except ImportError:
            raise UnavailableError("the onnxruntime backend needs onnxruntime, which is not "
                                   "installed", hint=_INSTALL_HINT) from None
        self.ort = ort
        self.device, self.providers = resolve_ort_device(device)
        want = _provider_name(self.providers[0])
        if want not in ort.get_available_providers():
            raise UnavailableError(
                f"device {device!r} needs onnxruntime's {want}, which this onnxruntime "
                f"{ort.__version__} does not have (it has {', '.join(ort.get_available_providers())})",
                hint="pip install onnxruntime-gpu (CUDA), or use --device cpu")
        self.threads = threads
        self._sessions: dict[str, Any] = {}
        for graph in ("encoder", "generator", "segmenter"):  # a missing graph fails now
            self._session(graph)

    # -- sessions -------------------------------------------------------------------
    def _session(self, graph: str):
        s = self._sessions.get(graph)
        if s is not None:
            return s
        path, _ = self.bundle.artifact(graph, "onnx")
        options = self.ort.SessionOptions()
        # Spin-waiting after a run keeps the pool's threads on the cores: that slows
        # whatever runs next, except in the inversion's loop, where the next thing is the
        # same graph after a little numpy (Adam). Measured (docs/runtime.md): hybrid_grad
        # 1.15x faster per step in the loop with spinning; the other graphs run once per stage.
        spin = "1" if graph == "hybrid_grad" else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        t0 = time.perf_counter()
        try:
            s = self.ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base
            from ..errors import BundleError
            raise BundleError(f"bundle {self.bundle.name!r}: onnxruntime cannot open "
                              f"{path.name}: {str(e).splitlines()[0]}",
                              hint="export the bundle again") from None
        want = _provider_name(self.providers[0])
        if want not in s.get_providers():
            raise UnavailableError(f"onnxruntime did not load {want} for {path.name} (the "
                                   f"session runs on {', '.join(s.get_providers())})",
                                   hint="check the CUDA and cuDNN libraries onnxruntime-gpu "
                                        "needs, or use --device cpu")
        log.debug("onnxruntime: %s opened in %.2f s on %s", graph, time.perf_counter() - t0,
                  s.get_providers())
        self._sessions[graph] = s
        return s

    # -- the hook -------------------------------------------------------------------
    def _run_impl(self, graph: str, feeds: Mapping[str, np.ndarray],
                  attrs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if graph == LOSS_AND_GRAD:
            loss, grad = self._loss_and_grad(feeds["x"], feeds["roi"], feeds["w"], None, **attrs)
            return {"loss": loss, "grad": grad}
        spec = self.graph_spec(graph)
        outs = self._session(graph).run(None, {t.name: feeds[t.name] for t in spec.inputs})
        return {t.name: o for t, o in zip(spec.outputs, outs)}

    def features(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The normalised LPIPS features of images x [N, 1, R, R] (fx0, fx1, ...)."""
        spec = self.graph_spec("lpips_features")
        outs = self._session("lpips_features").run(None, {"x": x})
        return {t.name: o for t, o in zip(spec.outputs, outs)}

    def _loss_and_grad(self, x, roi, w, fx, *, lambda1, lambda2, lambda3, ncc_window):
        """(loss [k], dloss/dw [k, L, C]) of the inversion loss (module docstring)."""
        if fx is None:
            fx = self.features(x)
        feeds = {"w": w, "x": np.ascontiguousarray(x), "roi": np.ascontiguousarray(roi), **fx,
                 "lambdas": np.array([lambda1, lambda2, lambda3], dtype=np.float32),
                 "ncc_window": np.array([ncc_window], dtype=np.int64)}
        loss, grad = self._session("hybrid_grad").run(None, feeds)
        return loss, grad

    # -- the inversion: LPIPS features of x once per image ----------------------------
    def invert(self, x: np.ndarray, roi: np.ndarray, w0: np.ndarray, settings: InversionSettings,
               *, progress: Progress = None) -> Inversion:
        return invert(self, x, roi, w0, settings, progress=progress,
                      optimise_chunk=self._optimise_chunk)

    def _optimise_chunk(self, x, roi, w0, s: InversionSettings, *, progress, chunk
                        ) -> dict[str, np.ndarray]:
        weights = s.loss_weights()

        def loss_and_grad(rows: _Rows, ra, wa):
            return self._loss_and_grad(rows.x, ra, np.ascontiguousarray(wa), rows.fx, **weights)

        return optimise(loss_and_grad, _Rows(x, self.features(x)), roi, w0, s,
                        progress=progress, chunk=chunk)

    def info(self) -> dict[str, Any]:
        d = {"backend": self.name, "device": self.device, "onnxruntime": self.ort.__version__,
             "providers": [_provider_name(p) for p in self.providers]}
        if self.threads is not None:
            d["threads"] = self.threads
        return d

    def close(self) -> None:
        self._sessions.clear()


__all__ = ["OnnxRuntimeRunner", "resolve_ort_device"]
