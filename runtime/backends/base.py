"""The runner contract: one named graph of a bundle at a time, numpy arrays in and out.

A runner is opened on a bundle and a device (:func:`deeprecon.runtime.backends.
open_backend`) and runs the bundle's graphs with ``run(graph, feeds, **attrs) -> {output
name: array}`` (as Polygraphy's runners: the base class checks the feeds against the
graph's specs and the outputs against its output names; a subclass writes only
:meth:`Runner._run_impl`). Graphs: the manifest's forward graphs (``encoder``,
``generator``, ``segmenter``, ``lpips``) and ``loss_and_grad`` (x, roi, w -> loss,
dloss/dw; attributes lambda1, lambda2, lambda3, ncc_window), which each runner composes
from the bundle's graphs (:func:`deeprecon.runtime.bundle.gradient_graph_specs`).

On top of ``run``, the base class gives the pipeline what it asks for, batch by batch:
encode, render, segment, render_and_segment, and the hybrid inversion
(:func:`deeprecon.runtime.inversion.invert`, over ``loss_and_grad``). A runner may keep
a faster path of its own for the inversion (the torch runner keeps its arrays on the
device), which must give the same result (tested). Arrays are numpy float32 on the
host, so the pipeline itself needs no framework.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..bundle import Bundle, GraphSpec, TensorSpec, gradient_graph_specs
from ..errors import UsageError
from ..inversion import LOSS_AND_GRAD, LOSS_ATTRS, Inversion, InversionSettings, Progress, invert

EVAL_BATCH = 32  # images per call of a forward graph

#: attributes each graph takes (graphs not named here take none)
GRAPH_ATTRS: dict[str, tuple[str, ...]] = {LOSS_AND_GRAD: LOSS_ATTRS}


class Runner:
    """Base class of the runners; see the module docstring.

    Subclasses set ``name`` and ``device``, open their graphs in ``__init__`` (raising
    an error that names what is missing: no fallback), and implement :meth:`_run_impl`.
    """

    name: str = "?"
    device: str = "cpu"

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self._composed = {
            g: GraphSpec(name=g, inputs=tuple(TensorSpec.from_dict(t, g) for t in d["inputs"]),
                         outputs=tuple(TensorSpec.from_dict(t, g) for t in d["outputs"]))
            for g, d in gradient_graph_specs(resolution=bundle.resolution,
                                             num_ws=bundle.num_ws, w_dim=bundle.w_dim).items()}

    # -- the contract ---------------------------------------------------------------
    def graph_spec(self, graph: str) -> GraphSpec:
        """The spec of ``graph``: the manifest's, or that of a graph the runner composes
        (``loss_and_grad``). UsageError naming the graphs for an unknown one."""
        if graph in self._composed:
            return self._composed[graph]
        if graph not in self.bundle.graphs:
            raise UsageError(f"bundle {self.bundle.name!r} has no graph {graph!r}",
                             hint=f"graphs: {', '.join([*self.bundle.graphs, *self._composed])}")
        return self.bundle.graphs[graph]

    def run(self, graph: str, feeds: Mapping[str, np.ndarray], **attrs: Any
            ) -> dict[str, np.ndarray]:
        """Run ``graph`` once on ``feeds`` (input name -> numpy array, every input of the
        graph's spec, one batch size) with the attributes the graph takes.

        Raises UsageError for feeds that do not match the spec (names, dtypes, ranks,
        fixed dimensions, batch) and for missing, unknown or out-of-range attributes. Returns
        {output name: numpy array}, every output of the spec."""
        spec = self.graph_spec(graph)
        spec.check_feeds(feeds)
        want = GRAPH_ATTRS.get(graph, ())
        if set(attrs) != set(want):
            raise UsageError(f"graph {graph!r} takes the attributes {list(want)}, got "
                             f"{sorted(attrs)}")
        if graph == LOSS_AND_GRAD:
            InversionSettings(**attrs)  # the one range check (UsageError naming a bad value)
        out = self._run_impl(graph, feeds, attrs)
        names = [t.name for t in spec.outputs]
        if sorted(out) != sorted(names):  # pragma: no cover - a runner bug
            raise AssertionError(f"{self.name} runner: graph {graph!r} gave the outputs "
                                 f"{sorted(out)}, its spec has {names}")
        return out

    def _run_impl(self, graph: str, feeds: Mapping[str, np.ndarray],
                  attrs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run ``graph`` on checked feeds: the hook each runner implements."""
        raise NotImplementedError

    # -- what the pipeline uses -------------------------------------------------------
    def _batched(self, graph: str, array: np.ndarray, *, progress: Progress, stage: str
                 ) -> np.ndarray:
        """The single-input graph on ``array`` in batches of EVAL_BATCH: its first output."""
        spec = self.graph_spec(graph)
        name, out_name = spec.inputs[0].name, spec.outputs[0].name
        array = np.ascontiguousarray(array, dtype=np.float32)
        spec.check_feeds({name: array})
        outs = []
        n = len(array)
        for i in range(0, n, EVAL_BATCH):
            outs.append(self.run(graph, {name: array[i:i + EVAL_BATCH]})[out_name])
            if progress is not None:
                progress(stage, min(i + EVAL_BATCH, n), n)
        return np.concatenate(outs)

    def encode(self, images: np.ndarray, *, progress: Progress = None) -> np.ndarray:
        """[N, 1, R, R] normalised images -> [N, L, C] codes E(x)."""
        return self._batched("encoder", images, progress=progress, stage="encode")

    def render(self, w: np.ndarray, *, progress: Progress = None) -> np.ndarray:
        """[N, L, C] codes -> [N, 1, R, R] images G(w)."""
        return self._batched("generator", w, progress=progress, stage="render")

    def segment(self, images: np.ndarray, *, progress: Progress = None) -> np.ndarray:
        """[N, 1, R, R] images -> [N, K, R, R] float32 class probabilities (softmax)."""
        return softmax(self._batched("segmenter", images, progress=progress, stage="segment"))

    def render_and_segment(self, w: np.ndarray, *, progress: Progress = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """G(w) and the class probabilities of G(w), batch by batch."""
        imgs, probs = [], []
        w = np.ascontiguousarray(w, dtype=np.float32)
        self.graph_spec("generator").check_feeds({"w": w})
        n = len(w)
        for i in range(0, n, EVAL_BATCH):
            y = self.run("generator", {"w": w[i:i + EVAL_BATCH]})["image"]
            imgs.append(y)
            probs.append(softmax(self.run("segmenter", {"image": y})["logits"]))
            if progress is not None:
                progress("render", min(i + EVAL_BATCH, n), n)
        return np.concatenate(imgs), np.concatenate(probs)

    def invert(self, x: np.ndarray, roi: np.ndarray, w0: np.ndarray, settings: InversionSettings,
               *, progress: Progress = None) -> Inversion:
        """Hybrid inversion of images x [N, 1, R, R] with ROI weights roi [N, 1, R, R],
        starting from w0 [N, L, C] (normally E(x)): :func:`deeprecon.runtime.inversion.
        invert` over this runner's ``loss_and_grad``."""
        return invert(self, x, roi, w0, settings, progress=progress)

    def info(self) -> dict[str, Any]:
        """Runner, device and library versions, for the run report."""
        return {"backend": self.name, "device": self.device}

    def close(self) -> None:
        """Release the graphs and device memory."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of float32 logits [N, K, ...], in float32."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


#: the name earlier versions gave the runner contract
Backend = Runner

__all__ = ["Runner", "Backend", "Inversion", "InversionSettings", "Progress", "EVAL_BATCH",
           "GRAPH_ATTRS", "softmax"]
