"""The backend contract: what the pipeline asks of a backend, in numpy arrays.

A backend is opened on a bundle and a device (:func:`deeprecon.runtime.backends.
open_backend`), checks its feeds against the manifest's specs, and runs the bundle's
graphs: encode, render, segment, and the hybrid inversion (which needs gradients through
G and E). Arrays in and out are numpy float32 on the host, so the pipeline itself needs
neither torch nor any other framework. Every method processes any number of images,
in batches of its own choosing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional

import numpy as np

from ..errors import UsageError

#: progress callback: (stage, done, total)
Progress = Optional[Callable[[str, int, int], None]]


@dataclass(frozen=True)
class InversionSettings:
    """The inversion's loss weights and optimiser (defaults from the bundle's manifest).

    loss per image = lambda1 * (LPIPS(x, G(w)) + ROI-L2(x, G(w))) - lambda2 * NCC(x, G(w))
                     + lambda3 * mean((w - E(G(w)))^2)
    Adam on w+ with learning rate ``lr``. An image stops early when its loss has not
    improved by more than ``early_stop_rel_tol`` (relative to |best loss|) for
    ``early_stop_patience`` steps (0 disables early stopping); it keeps its best code.
    ``batch``: images optimised together (each image's loss is independent of the
    others', so the batch size changes the speed, not the result).
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
            v = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(v, bool) or int(v) != v:
                    raise UsageError(f"inversion setting {f.name} must be an integer, got {v!r}")
                object.__setattr__(self, f.name, int(v))
            else:
                if not math.isfinite(float(v)):
                    raise UsageError(f"inversion setting {f.name} must be finite, got {v!r}")
                object.__setattr__(self, f.name, float(v))
        if self.steps < 0:
            raise UsageError(f"steps must be >= 0, got {self.steps}")
        if self.batch < 1:
            raise UsageError(f"batch must be >= 1, got {self.batch}")
        if self.ncc_window < 1 or self.ncc_window % 2 == 0:
            raise UsageError(f"ncc_window must be odd and >= 1, got {self.ncc_window}")
        if self.lr <= 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.early_stop_patience < 0 or self.early_stop_rel_tol < 0:
            raise UsageError("early_stop_patience and early_stop_rel_tol must be >= 0")

    @classmethod
    def from_manifest(cls, inversion: Mapping[str, Any], **overrides: Any) -> "InversionSettings":
        """The bundle's inversion defaults (keys this version does not know are ignored:
        they only tune an optimiser), with ``overrides`` (None values ignored) on top."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in inversion.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(overrides) - known
        if unknown:
            raise UsageError(f"unknown inversion settings {sorted(unknown)}",
                             hint=f"known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Inversion:
    """What :meth:`Backend.invert` returns, per image (N images).

    w:             [N, L, C] float32 codes after inversion (each image's best).
    recon:         [N, 1, R, R] float32 G(w).
    steps:         [N] int, optimisation steps each image took.
    loss_init:     [N] float, loss at the encoder's code (NaN when steps == 0).
    loss:          [N] float, best loss reached (NaN when steps == 0).
    stopped_early: [N] bool.
    """

    w: np.ndarray
    recon: np.ndarray
    steps: np.ndarray
    loss_init: np.ndarray
    loss: np.ndarray
    stopped_early: np.ndarray


class Backend:
    """Base class of the backends; see the module docstring."""

    name: str = "?"
    device: str = "cpu"

    def encode(self, images: np.ndarray, *, progress: Progress = None) -> np.ndarray:
        """[N, 1, R, R] normalised images -> [N, L, C] codes E(x)."""
        raise NotImplementedError

    def render(self, w: np.ndarray, *, progress: Progress = None) -> np.ndarray:
        """[N, L, C] codes -> [N, 1, R, R] images G(w)."""
        raise NotImplementedError

    def segment(self, images: np.ndarray, *, progress: Progress = None) -> np.ndarray:
        """[N, 1, R, R] images -> [N, K, R, R] float32 class probabilities (softmax)."""
        raise NotImplementedError

    def render_and_segment(self, w: np.ndarray, *, progress: Progress = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """G(w) and the class probabilities of G(w), batch by batch."""
        raise NotImplementedError

    def invert(self, x: np.ndarray, roi: np.ndarray, w0: np.ndarray, settings: InversionSettings,
               *, progress: Progress = None) -> Inversion:
        """Hybrid inversion of images x [N, 1, R, R] with ROI weights roi [N, 1, R, R],
        starting from w0 [N, L, C] (normally E(x))."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Backend, device and library versions, for the run report."""
        return {"backend": self.name, "device": self.device}

    def close(self) -> None:
        """Release the graphs and device memory."""


__all__ = ["Backend", "Inversion", "InversionSettings", "Progress"]
