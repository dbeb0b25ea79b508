"""The hybrid inversion, written once: its settings, its loss and its optimiser loop.

The loss of one image x [1, R, R] with heart-ROI weights roi, at the code w [L, C], with
y = G(w) (the paper's hybrid loss)::

    loss(w) = lambda1 * (LPIPS(x, y) + ROI-L2(x, y))
              - lambda2 * NCC_local(x, y)
              + lambda3 * mean((w - E(G(w)))^2)

    ROI-L2    = sum(roi (x - y)^2) / (sum(roi) + 1e-5)
    NCC_local = mean over pixels of the local NCC^2 in a box window of ncc_window px
    the last term keeps the code where the encoder maps its image

ROI-L2 and NCC (and their gradient) are the fused op of :mod:`deeprecon.cpp_ext`
(``ncc_roi_loss(x, y, roi, window=ncc_window, lambda_roi=lambda1, lambda_ncc=lambda2)``,
callable with or without torch; its definition is ``deeprecon.cpp_ext.reference``).
:func:`hybrid_loss` is the torch implementation; the torch runner and the trainer's
latent-bank stage both call it, and the exporter checks the bundle's gradient graph
against it (the graph writes the two terms' gradient in closed form,
:func:`deeprecon.export.vjp.ncc_roi_terms`, which is why ``ncc_window`` has an upper
bound, MAX_NCC_WINDOW).

The optimiser (:func:`optimise`): Adam on w+, every image on its own (own step count,
own moments, own early stop), so an image's result never depends on the images that
share its batch. An image stops when its loss has not improved by more than
``early_stop_rel_tol * |best loss|`` for ``early_stop_patience`` steps, and keeps the best
code it reached (the loss scored at step k is that of the code before the k-th update;
the code after the last update is scored once more at the end). It runs over a
loss-and-gradient function ``(x, roi, w) -> (loss [N], dloss/dw [N, L, C])``: the
runner's ``loss_and_grad`` graph (:func:`invert`, numpy arrays on the host), or a
runner's own on-device version of the same graph, through an :class:`ArrayOps` for its
arrays (the torch runner's fast path). Both are the same loop.

The onnxruntime runner computes the LPIPS features of x once per inversion (the
bundle's ``lpips_features`` graph) and runs ``hybrid_grad`` (the whole loss and its
gradient, one graph) on them; the torch runner
still differentiates through the bundle's (x, y) -> distance program, so it recomputes
x's features at every step.

This module imports no torch at import time (the runtime core runs without it).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import numpy as np

from .errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: progress callback: (stage, done, total)
Progress = Optional[Callable[[str, int, int], None]]

#: the largest NCC window the bundle's gradient graph takes (its box taps are this long);
#: 31 px is 78 mm on the cpu64 grid, far beyond the paper's 9
MAX_NCC_WINDOW = 31

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

#: the graph the optimiser runs over, and the loss weights it takes as attributes
LOSS_AND_GRAD = "loss_and_grad"
LOSS_ATTRS = ("lambda1", "lambda2", "lambda3", "ncc_window")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class InversionSettings:
    """The inversion's loss weights and optimiser: the one definition (the exporter writes
    it into manifests, the bundle reader checks it, the runtime takes overrides of it).

    steps:               Adam steps per image, >= 0 (0: no inversion, the encoder's codes).
    lr:                  Adam learning rate on w+, > 0.
    lambda1:             weight of LPIPS and of the ROI L2 term, >= 0.
    lambda2:             weight of the local NCC term (subtracted), >= 0.
    lambda3:             weight of the latent term mean((w - E(G(w)))^2), >= 0.
    ncc_window:          NCC box window side in px, odd, 3 .. MAX_NCC_WINDOW.
    early_stop_patience: steps without relative improvement before an image stops,
                         >= 0 (0: never stop early).
    early_stop_rel_tol:  the relative improvement that counts, >= 0.
    roi_dilation_mm:     dilation of the heart ROI before the ROI L2 term, >= 0.
    batch:               images optimised together, >= 1 (speed only: each image's loss
                         and Adam state are its own).

    Values are checked on construction (UsageError naming every bad one); integers
    given as integral floats (7.0) are accepted.
    """

    steps: int = 100
    lr: float = 0.01
    lambda1: float = 1.0
    lambda2: float = 0.5
    lambda3: float = 0.1
    ncc_window: int = 9
    early_stop_patience: int = 10
    early_stop_rel_tol: float = 1e-3
    roi_dilation_mm: float = 10.0
    batch: int = 64

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), _kind(f)))
        problems = [f"{key} {rule} (got {getattr(self, key)})"
                    for key, (rule, ok) in _RANGES.items() if not ok(getattr(self, key))]
        if problems:
            raise UsageError("bad inversion settings: " + "; ".join(problems))

    @classmethod
    def field_types(cls) -> dict[str, type]:
        """Setting name -> int or float, in declaration order."""
        return {f.name: _kind(f) for f in fields(cls)}

    @classmethod
    def parse(cls, overrides: Mapping[str, Any] | None = None, *,
              base: "InversionSettings | None" = None) -> "InversionSettings":
        """``base`` (default: the defaults) with ``overrides``: numbers, or strings as
        ``--set key=value`` gives them. UsageError for an unknown key or a bad value."""
        overrides = dict(overrides or {})
        _check_known(overrides)
        values = {k: _from_text(k, v, cls.field_types()[k]) for k, v in overrides.items()}
        return replace(base or cls(), **values)

    @classmethod
    def from_manifest(cls, inversion: Mapping[str, Any], **overrides: Any) -> "InversionSettings":
        """A manifest's inversion defaults (keys this version does not know are ignored:
        they only tune an optimiser), with ``overrides`` (None values ignored) on top.
        UsageError for an unknown override or a bad value."""
        _check_known(overrides)
        known = cls.field_types()
        values = {k: v for k, v in inversion.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def loss_weights(self) -> dict[str, Any]:
        """The attributes of the ``loss_and_grad`` graph: lambda1, lambda2, lambda3,
        ncc_window."""
        return {k: getattr(self, k) for k in LOSS_ATTRS}


#: the range of every setting, in field order: (what the error says, the check)
_RANGES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "steps": ("must be >= 0", lambda v: v >= 0),
    "lr": ("must be > 0", lambda v: v > 0),
    "lambda1": ("must be >= 0", lambda v: v >= 0),
    "lambda2": ("must be >= 0", lambda v: v >= 0),
    "lambda3": ("must be >= 0", lambda v: v >= 0),
    "ncc_window": (f"must be odd and in 3..{MAX_NCC_WINDOW}",
                   lambda v: 3 <= v <= MAX_NCC_WINDOW and v % 2 == 1),
    "early_stop_patience": ("must be >= 0", lambda v: v >= 0),
    "early_stop_rel_tol": ("must be >= 0", lambda v: v >= 0),
    "roi_dilation_mm": ("must be >= 0", lambda v: v >= 0),
    "batch": ("must be >= 1", lambda v: v >= 1),
}


def _kind(f) -> type:
    return int if f.type in ("int", int) else float


def _check_known(values: Mapping[str, Any]) -> None:
    known = InversionSettings.field_types()
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UsageError(f"unknown inversion setting{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}", hint=f"known: {', '.join(known)}")


def _coerce(name: str, v: Any, kind: type) -> int | float:
    """A number as ``kind``: an int (an integral float is accepted) or a finite float."""
    what = "an integer" if kind is int else "a finite number"
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise UsageError(f"inversion setting {name}={v!r}: expected {what}")
    if not math.isfinite(float(v)) or (kind is int and int(v) != v):
        raise UsageError(f"inversion setting {name}={v!r}: expected {what}")
    return int(v) if kind is int else float(v)


def _from_text(name: str, v: Any, kind: type) -> Any:
    """``--set`` values are strings: "50" -> 50, "0.02" -> 0.02 (checked by _coerce)."""
    if not isinstance(v, str):
        return v
    try:
        return int(v) if kind is int else float(v)
    except ValueError:
        try:
            return float(v)  # "7.0" for an int: _coerce accepts an integral float
        except ValueError:
            raise UsageError(f"inversion setting {name}={v!r}: expected "
                             f"{'an integer' if kind is int else 'a number'}") from None


# ----------------------------------------------------------------------------- result


@dataclass
class Inversion:
    """What an inversion returns, per image (N images).

    w:             [N, L, C] float32 codes after inversion (each image's best).
    recon:         [N, 1, R, R] float32 G(w).
    steps:         [N] int64, optimisation steps each image took.
    loss_init:     [N] float64, loss at the starting code (NaN when steps == 0).
    loss:          [N] float64, best loss reached (NaN when steps == 0).
    stopped_early: [N] bool.
    """

    w: np.ndarray
    recon: np.ndarray
    steps: np.ndarray
    loss_init: np.ndarray
    loss: np.ndarray
    stopped_early: np.ndarray


# ----------------------------------------------------------------------------- the loss


def hybrid_loss(w: "torch.Tensor", x: "torch.Tensor", roi: "torch.Tensor", *,
                generator: Callable, encoder: Callable, lpips_to_x: Callable,
                lambda1: float, lambda2: float, lambda3: float, ncc_window: int
                ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The inversion loss of each image (module docstring), in torch, differentiable
    with respect to ``w``.

    w:          float32 [N, L, C] codes.
    x:          float32 [N, 1, R, R] target images in [-1, 1], contiguous.
    roi:        float32 [N, 1, R, R] ROI weights in [0, 1], contiguous.
    generator:  w [N, L, C] -> image [N, 1, R, R].
    encoder:    image [N, 1, R, R] -> w [N, L, C].
    lpips_to_x: y [N, 1, R, R] -> LPIPS(x, y) [N] (the trainer passes its cached
                reference features of x; the runtime the bundle's (x, y) program).
    Returns (loss float32 [N], y = G(w) [N, 1, R, R]).
    """
    from deeprecon.cpp_ext import ncc_roi_loss

    y = generator(w)                                                    # [N, 1, R, R]
    roi_ncc, _ = ncc_roi_loss(x, y.contiguous(), roi, window=ncc_window, lambda_roi=lambda1,
                              lambda_ncc=lambda2)                       # [N]
    latent = (w - encoder(y)).square().mean(dim=(1, 2))                 # [N]
    return lambda1 * lpips_to_x(y) + roi_ncc + lambda3 * latent, y


def hybrid_loss_and_grad(w: "torch.Tensor", x: "torch.Tensor", roi: "torch.Tensor",
                         **kwargs: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(loss [N], dloss/dw [N, L, C]) of :func:`hybrid_loss` (same keyword arguments) by
    autograd, at a detached copy of ``w``; gradients are enabled even under no_grad."""
    import torch

    with torch.enable_grad():
        wr = w.detach().clone().requires_grad_(True)
        loss, _ = hybrid_loss(wr, x, roi, **kwargs)
        (grad,) = torch.autograd.grad(loss.sum(), [wr])
    return loss.detach(), grad


# ----------------------------------------------------------------------------- the loop


class ArrayOps:
    """The few array functions :func:`optimise` needs beyond operators and indexing, on
    numpy arrays. A runner with arrays of its own (torch tensors on a device) subclasses
    it so that the same loop runs there."""

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def zeros(self, n: int, dtype: str) -> Any:
        return np.zeros(n, dtype)

    def full(self, n: int, value: float, dtype: str) -> Any:
        return np.full(n, value, dtype)

    def zeros_like(self, a: Any) -> Any:
        return np.zeros_like(a)

    def copy(self, a: Any) -> Any:
        return a.copy()

    def nonzero(self, mask: Any) -> Any:
        """Indices [k] of the True entries of a 1-D mask."""
        return np.flatnonzero(mask)

    def astype(self, a: Any, dtype: str) -> Any:
        return a.astype(dtype)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    def sqrt(self, a: Any) -> Any:
        return np.sqrt(a)

    def clamp_min(self, a: Any, value: float) -> Any:
        return np.maximum(a, value)

    def isfinite(self, a: Any) -> Any:
        return np.isfinite(a)


NUMPY_OPS = ArrayOps()

#: (x [k, 1, R, R], roi [k, 1, R, R], w [k, L, C]) -> (loss [k], dloss/dw [k, L, C])
LossAndGrad = Callable[[Any, Any, Any], tuple[Any, Any]]


def optimise(loss_and_grad: LossAndGrad, x: Any, roi: Any, w0: Any, s: InversionSettings, *,
             loss: Callable[[Any, Any, Any], Any] | None = None, ops: ArrayOps = NUMPY_OPS,
             progress: Progress = None, chunk: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Per-image Adam with early stop and best code (module docstring), on one batch.

    loss_and_grad: (x, roi, w) of the images still moving -> (loss [k], dloss/dw
                   [k, L, C]), arrays of ``ops``.
    x, roi, w0:    [N, 1, R, R], [N, 1, R, R], [N, L, C] float32 arrays of ``ops``.
    loss:          (x, roi, w) -> loss [k] without the gradient, to score the final codes
                   (default: loss_and_grad's loss).
    progress:      called ("invert", done, total) over ``chunk`` = (this batch's index,
                   number of batches) of one inversion call.
    Returns {"w": best codes [N, L, C] float32, "steps": [N] int64, "loss_init": [N]
    float64, "loss": best loss [N] float64, "stopped_early": [N] bool}, arrays of ``ops``.
    """
    b1, b2 = ADAM_BETAS
    n = len(x)
    w = ops.copy(w0)
    m, v = ops.zeros_like(w), ops.zeros_like(w)
    t_img = ops.zeros(n, "int64")        # Adam's step count, per image
    since = ops.zeros(n, "int64")        # steps since the last improvement
    active = ops.full(n, True, "bool")
    stopped = ops.zeros(n, "bool")
    best = ops.full(n, math.inf, "float64")
    loss_init = ops.full(n, math.nan, "float64")
    best_w = ops.copy(w)
    for step in range(s.steps):
        idx = ops.nonzero(active)                                       # [k]
        if len(idx) == 0:
            break
        lv, grad = loss_and_grad(x[idx], roi[idx], w[idx])              # [k], [k, L, C]
        lv = ops.astype(lv, "float64")
        if step == 0:
            loss_init[idx] = lv
        # the loss is that of the code *before* this step's update
        b = best[idx]
        improved = (b - lv) > s.early_stop_rel_tol * ops.clamp_min(abs(b), 1e-8)
        improved = improved | ~ops.isfinite(b)
        bi = idx[improved]
        best[bi] = lv[improved]
        best_w[bi] = w[bi]
        since[idx] = ops.where(improved, 0, since[idx] + 1)
        # Adam, per image
        t_img[idx] += 1
        ma = m[idx] * b1 + grad * (1 - b1)
        va = v[idx] * b2 + grad * grad * (1 - b2)
        m[idx], v[idx] = ma, va
        tt = ops.astype(t_img[idx], "float64")
        c1 = ops.astype(1 - b1 ** tt, "float32").reshape(-1, 1, 1)
        c2 = ops.astype(1 - b2 ** tt, "float32").reshape(-1, 1, 1)
        w[idx] = w[idx] - s.lr * (ma / c1) / (ops.sqrt(va / c2) + ADAM_EPS)
        if s.early_stop_patience > 0:
            done = since[idx] >= s.early_stop_patience
            active[idx[done]] = False
            stopped[idx[done]] = True
        if progress is not None:  # over all chunks of this call
            progress("invert", chunk[0] * s.steps + step + 1, chunk[1] * s.steps)
    if progress is not None:  # every image of the chunk may have stopped early
        progress("invert", (chunk[0] + 1) * s.steps, chunk[1] * s.steps)
    # images that ran every step: their last code has not been scored yet
    last = ops.nonzero(active)
    if len(last):
        score = loss if loss is not None else (lambda *a: loss_and_grad(*a)[0])
        lv = ops.astype(score(x[last], roi[last], w[last]), "float64")
        better = lv < best[last]
        bi = last[better]
        best[bi] = lv[better]
        best_w[bi] = w[bi]
    if log.isEnabledFor(logging.DEBUG):  # the sums would wait for the device
        log.debug("inversion chunk %d/%d: %d images, %d stopped early, mean steps %.1f",
                  chunk[0] + 1, chunk[1], n, int(ops.to_numpy(stopped).sum()),
                  float(ops.to_numpy(t_img).mean()))
    return {"w": best_w, "steps": t_img, "loss_init": loss_init, "loss": best,
            "stopped_early": stopped}


#: (x, roi, w0, settings, *, progress, chunk) -> optimise()'s dict as numpy arrays
OptimiseChunk = Callable[..., dict[str, np.ndarray]]


def invert(runner: Any, x: np.ndarray, roi: np.ndarray, w0: np.ndarray, settings: InversionSettings,
           *, progress: Progress = None, optimise_chunk: OptimiseChunk | None = None) -> Inversion:
    """Hybrid inversion of images x [N, 1, R, R] (float32, in [-1, 1]) with ROI weights
    roi [N, 1, R, R] in [0, 1], from the codes w0 [N, L, C] (normally E(x)), in batches of
    ``settings.batch``.

    runner:         an open runner (:class:`deeprecon.runtime.backends.Runner`): its
                    ``loss_and_grad`` graph and its ``render``.
    optimise_chunk: the runner's own way to run :func:`optimise` on one batch (the torch
                    runner's on-device fast path); default: :func:`optimise` in numpy over
                    ``runner.run("loss_and_grad", ...)``.
    Feeds are checked against the ``loss_and_grad`` graph's spec (UsageError).
    """
    x, roi, w0 = (np.ascontiguousarray(a, dtype=np.float32) for a in (x, roi, w0))
    runner.graph_spec(LOSS_AND_GRAD).check_feeds({"x": x, "roi": roi, "w": w0})
    n = len(x)
    if settings.steps == 0:
        nan = np.full(n, np.nan)
        return Inversion(w=w0, recon=runner.render(w0), steps=np.zeros(n, np.int64),
                         loss_init=nan, loss=nan.copy(), stopped_early=np.zeros(n, bool))
    if optimise_chunk is None:
        optimise_chunk = _host_chunk(runner)
    parts = []
    n_chunks = -(-n // settings.batch)
    for k, i in enumerate(range(0, n, settings.batch)):
        sl = slice(i, i + settings.batch)
        parts.append(optimise_chunk(x[sl], roi[sl], w0[sl], settings, progress=progress,
                                    chunk=(k, n_chunks)))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["w"] = out["w"].astype(np.float32, copy=False)
    return Inversion(recon=runner.render(out["w"]), **out)


def _host_chunk(runner: Any) -> OptimiseChunk:
    """:func:`optimise` in numpy over the runner's ``loss_and_grad`` graph."""
    def chunk_fn(x, roi, w0, s: InversionSettings, *, progress, chunk):
        attrs = s.loss_weights()

        def loss_and_grad(xa, ra, wa):
            out = runner.run(LOSS_AND_GRAD, {"x": xa, "roi": ra, "w": wa}, **attrs)
            return out["loss"], out["grad"]

        return optimise(loss_and_grad, x, roi, w0, s, progress=progress, chunk=chunk)
    return chunk_fn


__all__ = ["InversionSettings", "Inversion", "hybrid_loss", "hybrid_loss_and_grad", "optimise", "invert", "ArrayOps",
           "NUMPY_OPS", "LOSS_AND_GRAD", "LOSS_ATTRS", "MAX_NCC_WINDOW", "ADAM_BETAS", "ADAM_EPS",
           "Progress"]
