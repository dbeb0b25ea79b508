"""Preprocessing with an exact inverse: heart-centred crop, resampling to the model grid,
intensity normalisation, and the way back to the native slice grid.

The model grid
--------------
Every slice is resampled *in its own plane* onto a square grid of ``size x size`` pixels
of ``spacing_mm`` (the model's config), axis-aligned with the slice's row and column
directions. The map between the two grids is therefore, per slice and per axis, a scale
and a translation (no rotation): separable, and exactly invertible.

Pixel centres lie at integer indices, as in :mod:`deeprecon.runtime.study`. The model
grid's *centre pixel* is index ``c = size // 2`` on both axes (for an even size, the
pixel just below/right of the geometric centre; this makes an integral crop centre an
integral pixel shift). With the crop centre ``(ci, cj)`` of slice ``s`` in native pixel
coordinates, native spacing ``(dr, dc)`` and model spacing ``m``::

    native row    i = ci + (u - c) * m / dr        (model row u)
    native column j = cj + (v - c) * m / dc        (model column v)

and the inverse ``u = c + (i - ci) * dr / m`` (the same for columns). The forward
transform evaluates the native image at the model pixel centres, the inverse evaluates
the model image at the native pixel centres: the two are exact geometric inverses. A
pixel of either grid whose centre falls outside the other grid's footprint (its pixel
centres +- half a pixel) has no value: images get a fill value there, labels background.

Interpolation
-------------
Linear. Because the map is separable, resampling is two small matrix products per slice
(``R @ X @ C.T``, R and C the 1D interpolation weights), vectorised over phases, slices
and classes with BLAS. Where a grid is coarsened (e.g. 0.7 mm native to 1.5 mm model),
the linear interpolant is averaged over each output pixel's extent (``antialias=True``:
the hat kernel convolved with the output pixel's box), an area-weighted average instead
of point sampling that aliases, and one that reproduces linear functions exactly, so it
moves nothing by a fraction of a pixel. When the factor is <= 1
(refinement) the weights are plain bilinear interpolation; when both spacings are equal
and the crop centre is integral the weights are 0/1 and the transform is an exact copy.

Labels are resampled as their one-hot encoding (or the model's class probabilities),
linearly, followed by argmax (ties go to the lower label), in both directions; never by
nearest neighbour.

Intensity normalisation
-----------------------
After resampling, intensities are clipped to the ``clip_percentiles`` of the resampled
values inside the native field of view and scaled linearly to ``out_range``. The
percentiles are taken over the whole study by default (``intensity_scope="study"``: all
phases and slices share one ``(low, high)``, so the contrast between slices and phases is
preserved, which the 3D interpolation of latents and the motion transfer rely on);
``"phase"`` and ``"slice"`` compute them per phase or per slice instead. Model-grid
pixels outside the native field of view are set to ``out_range[0]``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

import numpy as np

from .errors import InvalidStudyError, UsageError
from .study import LABELS, Geometry, Study

log = logging.getLogger(__name__)

#: smallest native matrix (rows or columns) that preprocessing accepts
MIN_NATIVE_MATRIX = 8
#: smallest model grid accepted
MIN_MODEL_SIZE = 8
_SCOPES = ("study", "phase", "slice")
TRANSFORM_SCHEMA = 1


def _pair(value, name: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a pair of numbers, got {value!r}") from None
    return a, b


@dataclass(frozen=True)
class PreprocessConfig:
    """How studies are brought onto the model grid (stored in the bundle's manifest).

    size:             model grid side in pixels (square, ``size x size``).
    spacing_mm:       model grid pixel spacing in mm (both axes).
    clip_percentiles: (low, high) percentiles, in percent, of the resampled intensities
                      mapped to the ends of ``out_range`` (values beyond are clipped).
    out_range:        (min, max) of the normalised model-grid intensities.
    intensity_scope:  where the percentiles are computed: ``"study"`` (one pair for all
                      phases and slices), ``"phase"`` or ``"slice"``.
    antialias:        widen the linear kernel by the coarsening factor when a grid is
                      coarsened (area averaging); plain bilinear when False.
    """

    size: int = 128
    spacing_mm: float = 1.5
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    out_range: tuple[float, float] = (-1.0, 1.0)
    intensity_scope: str = "study"
    antialias: bool = True

    def __post_init__(self):
        if isinstance(self.size, bool) or int(self.size) != self.size or self.size < MIN_MODEL_SIZE:
            raise UsageError(f"size must be an integer >= {MIN_MODEL_SIZE}, got {self.size!r}")
        object.__setattr__(self, "size", int(self.size))
        sp = float(self.spacing_mm)
        if not math.isfinite(sp) or sp <= 0:
            raise UsageError(f"spacing_mm must be a positive number, got {self.spacing_mm!r}")
        object.__setattr__(self, "spacing_mm", sp)
        lo, hi = _pair(self.clip_percentiles, "clip_percentiles")
        if not (0.0 <= lo < hi <= 100.0):
            raise UsageError(f"clip_percentiles must satisfy 0 <= low < high <= 100, "
                             f"got {(lo, hi)}")
        object.__setattr__(self, "clip_percentiles", (lo, hi))
        a, b = _pair(self.out_range, "out_range")
        if not (math.isfinite(a) and math.isfinite(b) and a < b):
            raise UsageError(f"out_range must be finite with min < max, got {(a, b)}")
        object.__setattr__(self, "out_range", (a, b))
        if self.intensity_scope not in _SCOPES:
            raise UsageError(f"intensity_scope must be one of {_SCOPES}, "
                             f"got {self.intensity_scope!r}")
        if not isinstance(self.antialias, bool):
            raise UsageError(f"antialias must be a bool, got {self.antialias!r}")

    @property
    def field_of_view_mm(self) -> float:
        """Side of the model grid's footprint in mm (``size * spacing_mm``)."""
        return self.size * self.spacing_mm

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (lists for the pairs)."""
        return {"size": self.size, "spacing_mm": self.spacing_mm,
                "clip_percentiles": list(self.clip_percentiles),
                "out_range": list(self.out_range),
                "intensity_scope": self.intensity_scope, "antialias": self.antialias}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessConfig":
        """Inverse of :meth:`to_dict`; unknown keys are refused (a bundle written by a
        newer version may ask for preprocessing this one cannot do)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"unknown preprocessing parameters {sorted(unknown)}",
                             hint=f"known: {sorted(known)}")
        kw = dict(d)
        for k in ("clip_percentiles", "out_range"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


# ----------------------------------------------------------------------------- resampling

def _hat_cdf(x: np.ndarray) -> np.ndarray:
    """Integral from -inf to x of the linear-interpolation hat max(0, 1 - |x|)."""
    x = np.clip(x, -1.0, 1.0)
    return np.where(x < 0, 0.5 * (x + 1.0) ** 2, 1.0 - 0.5 * (1.0 - x) ** 2)


def _interp_matrix(n_out: int, n_in: int, offset: float, step: float, *,
                   antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """1D linear resampling weights.

    Output sample u (0..n_out-1) sits at input index position ``t = offset + step * u``.
    Returns (weights [n_out, n_in] float32, valid [n_out] bool): rows of outputs whose
    position lies outside the input footprint ``[-0.5, n_in - 0.5)`` are zero and invalid;
    positions within half a pixel of the edge take the edge value.

    Without antialiasing (or when ``step <= 1``) the weights are the linear-interpolation
    hat ``max(0, 1 - |k - t|)``. With ``antialias`` and ``step > 1`` they are the average
    of the linear interpolant over the output pixel's extent ``[t - step/2, t + step/2]``
    (box of the output pixel convolved with the hat): area weighting that still
    reproduces linear functions exactly, so it shifts nothing by a fraction of a pixel
    (a triangle kernel merely widened to a non-integral width would).
    """
    u = np.arange(n_out, dtype=np.float64)
    t = offset + step * u
    valid = (t >= -0.5) & (t < n_in - 0.5)
    tc = np.clip(t, 0.0, n_in - 1.0)
    k = np.arange(n_in, dtype=np.float64)
    d = k[None, :] - tc[:, None]
    if antialias and step > 1.0:
        h = 0.5 * step
        w = (_hat_cdf(h - d) - _hat_cdf(-h - d)) / step
    else:
        w = np.maximum(0.0, 1.0 - np.abs(d))
    w[~valid] = 0.0
    s = w.sum(axis=1, keepdims=True)
    np.divide(w, s, out=w, where=s > 0)
    return w.astype(np.float32), valid


def _apply(r: np.ndarray, c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """out[..., s, u, v] = sum_ij r[s, u, i] x[..., s, i, j] c[s, v, j].

    r: [S, U, H], c: [S, V, W], x: [..., S, H, W] (float32) -> [..., S, U, V] float32.
    """
    # NumPy's batched matmul only reaches BLAS when both operands have the same batch
    # shape: broadcasting r and c over the leading axes first is ~100x faster on CPUs.
    lead = x.shape[:-2]
    r = np.broadcast_to(r, lead + r.shape[-2:])
    ct = np.broadcast_to(np.swapaxes(c, -1, -2), lead + (c.shape[-1], c.shape[-2]))
    tmp = np.matmul(r, x)                       # [..., S, U, W]
    return np.matmul(tmp, ct)                   # [..., S, U, V]


# ----------------------------------------------------------------------------- transform

@dataclass(frozen=True)
class ModelGridTransform:
    """Everything needed to go from a study's native grid to the model grid and back.

    size, spacing_mm: model grid (``size x size`` pixels of ``spacing_mm`` mm).
    native_shape:     (rows H, columns W) of the native slices.
    native_spacing:   (spacing between rows, between columns) of the native slices, mm.
    centres:          per slice s, (row, column) in native pixel coordinates (float) of the
                      model grid's centre pixel ``(size // 2, size // 2)``.
    intensity_low, intensity_high: raw intensities mapped to ``out_range``; nested tuples
                      of shape [1, 1] (scope "study"), [P, 1] ("phase") or [P, S]
                      ("slice"), broadcast against [P, S].
    out_range, clip_percentiles, intensity_scope, antialias: from the config.
    centre_source:    how the centre was chosen ("pixel", "lps", "located:<method>").
    centre_lps:       the physical LPS point (mm) of the crop centre, when known.
    label_coverage:   fraction of the study's labelled (non-zero) native pixels inside the
                      crop, when the study had labels; < 1 means the crop cuts the heart.
    """

    size: int
    spacing_mm: float
    native_shape: tuple[int, int]
    native_spacing: tuple[float, float]
    centres: tuple[tuple[float, float], ...]
    intensity_low: tuple[tuple[float, ...], ...] = ((0.0,),)
    intensity_high: tuple[tuple[float, ...], ...] = ((1.0,),)
    out_range: tuple[float, float] = (-1.0, 1.0)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_scope: str = "study"
    antialias: bool = True
    centre_source: str = "pixel"
    centre_lps: tuple[float, float, float] | None = None
    label_coverage: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "spacing_mm", float(self.spacing_mm))
        object.__setattr__(self, "native_shape", tuple(int(v) for v in self.native_shape))
        object.__setattr__(self, "native_spacing", _pair(self.native_spacing, "native_spacing"))
        cen = np.asarray(self.centres, dtype=np.float64)
        if cen.ndim != 2 or cen.shape[1] != 2 or cen.shape[0] < 1 or not np.isfinite(cen).all():
            raise UsageError(f"centres must be [S, 2] finite (row, col) pairs, got {cen.shape}")
        object.__setattr__(self, "centres", tuple((float(a), float(b)) for a, b in cen))
        for name in ("intensity_low", "intensity_high"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.ndim != 2:
                raise UsageError(f"{name} must be 2D ([1|P, 1|S]), got shape {arr.shape}")
            object.__setattr__(self, name, tuple(tuple(float(v) for v in row) for row in arr))
        object.__setattr__(self, "out_range", _pair(self.out_range, "out_range"))
        object.__setattr__(self, "clip_percentiles",
                           _pair(self.clip_percentiles, "clip_percentiles"))
        if self.centre_lps is not None:
            object.__setattr__(self, "centre_lps",
                               tuple(float(v) for v in np.asarray(self.centre_lps).reshape(3)))
        if self.label_coverage is not None:
            object.__setattr__(self, "label_coverage", float(self.label_coverage))
        if self.size < 1 or not (math.isfinite(self.spacing_mm) and self.spacing_mm > 0):
            raise UsageError(f"bad model grid: size {self.size}, spacing {self.spacing_mm} mm")
        if min(self.native_shape) < 1 or len(self.native_shape) != 2:
            raise UsageError(f"bad native_shape {self.native_shape}")
        if not all(math.isfinite(v) and v > 0 for v in self.native_spacing):
            raise UsageError(f"bad native_spacing {self.native_spacing} mm")
        lo = np.asarray(self.intensity_low)
        hi = np.asarray(self.intensity_high)
        if lo.shape != hi.shape or not np.all(hi > lo):
            raise UsageError("intensity_high must exceed intensity_low, with the same shape")
        if self.intensity_scope not in _SCOPES:
            raise UsageError(f"intensity_scope must be one of {_SCOPES}, "
                             f"got {self.intensity_scope!r}")
        if self.out_range[0] >= self.out_range[1]:
            raise UsageError(f"out_range must have min < max, got {self.out_range}")

    # -- geometry ---------------------------------------------------------------
    @property
    def n_slices(self) -> int:
        return len(self.centres)

    @property
    def centre_index(self) -> int:
        """Index of the model grid's centre pixel on both axes (``size // 2``)."""
        return self.size // 2

    @property
    def steps(self) -> tuple[float, float]:
        """(rows, columns): native pixels per model pixel (``spacing_mm / native_spacing``)."""
        return (self.spacing_mm / self.native_spacing[0], self.spacing_mm / self.native_spacing[1])

    @property
    def offsets(self) -> np.ndarray:
        """[S, 2] native (row, col) position of model pixel (0, 0) of each slice."""
        cen = np.asarray(self.centres, dtype=np.float64)
        return cen - self.centre_index * np.asarray(self.steps)

    def model_to_native_index(self, rows, cols, *, slice_index: int = 0):
        """Native (row, col) pixel coordinates of model-grid coordinates of one slice.

        rows, cols: arrays (or scalars) of model-grid coordinates, float.
        Returns (native rows, native cols) as float64 arrays.
        """
        off = self.offsets[slice_index]
        sr, sc = self.steps
        return (off[0] + sr * np.asarray(rows, dtype=np.float64),
                off[1] + sc * np.asarray(cols, dtype=np.float64))

    def native_to_model_index(self, rows, cols, *, slice_index: int = 0):
        """Inverse of :meth:`model_to_native_index`: model-grid (row, col) of native ones."""
        off = self.offsets[slice_index]
        sr, sc = self.steps
        return ((np.asarray(rows, dtype=np.float64) - off[0]) / sr,
                (np.asarray(cols, dtype=np.float64) - off[1]) / sc)

    def model_geometry(self, geometry: Geometry) -> Geometry:
        """The physical geometry of the model-grid slices (same directions and slice
        positions as ``geometry``, pixel (0, 0) at the crop's corner, spacing
        ``spacing_mm``): for writing model-grid outputs (e.g. NIfTI) in scanner space."""
        self._check_slices(geometry.n_slices)
        off = self.offsets
        dr, dc = self.native_spacing
        origins = (geometry.origins + (off[:, 1:2] * dc) * geometry.row_dir[None, :]
                   + (off[:, 0:1] * dr) * geometry.col_dir[None, :])
        return dataclasses.replace(geometry, origins=origins,
                                   pixel_spacing=(self.spacing_mm, self.spacing_mm))

    @cached_property
    def _forward(self):
        """Per slice: row weights [S, N, H], column weights [S, N, W], valid [S, N, N]."""
        return self._matrices(inverse=False)

    @cached_property
    def _inverse(self):
        """Per slice: row weights [S, H, N], column weights [S, W, N], valid [S, H, W]."""
        return self._matrices(inverse=True)

    def _matrices(self, *, inverse: bool):
        N = self.size
        H, W = self.native_shape
        sr, sc = self.steps
        rs, cs, vs = [], [], []
        for off_r, off_c in self.offsets:
            if inverse:   # native index k sits at model position (k - off) / step
                r, vr = _interp_matrix(H, N, -off_r / sr, 1.0 / sr, antialias=self.antialias)
                c, vc = _interp_matrix(W, N, -off_c / sc, 1.0 / sc, antialias=self.antialias)
            else:         # model index u sits at native position off + step * u
                r, vr = _interp_matrix(N, H, off_r, sr, antialias=self.antialias)
                c, vc = _interp_matrix(N, W, off_c, sc, antialias=self.antialias)
            rs.append(r)
            cs.append(c)
            vs.append(vr[:, None] & vc[None, :])
        return np.stack(rs), np.stack(cs), np.stack(vs)

    def model_valid_mask(self) -> np.ndarray:
        """[S, size, size] bool: model pixels that lie inside the native field of view."""
        return self._forward[2].copy()

    def native_footprint(self) -> np.ndarray:
        """[S, H, W] bool: native pixels inside the crop (the model grid's footprint)."""
        return self._inverse[2].copy()

    def coverage(self, labels: np.ndarray) -> float:
        """Fraction of the non-zero pixels of native ``labels`` ([P, S, H, W] or [S, H, W]
        integer) that lie inside the crop; 1.0 when there are none."""
        labels = np.asarray(labels)
        self._check_native(labels, "labels", allow_3d=True)
        fg = labels > 0
        total = int(fg.sum())
        if total == 0:
            return 1.0
        return float(np.logical_and(fg, self._inverse[2]).sum()) / total

    # -- checks -------------------------------------------------------------------
    def _check_slices(self, s: int):
        if s != self.n_slices:
            raise UsageError(f"the transform was made for {self.n_slices} slices, got {s}")

    def _check_native(self, x: np.ndarray, name: str, *, allow_3d: bool = False):
        ok_dims = (3, 4) if allow_3d else (4,)
        if x.ndim not in ok_dims or tuple(x.shape[-2:]) != self.native_shape:
            raise UsageError(f"{name} must be [P, S, {self.native_shape[0]}, "
                             f"{self.native_shape[1]}], got {x.shape}")
        self._check_slices(x.shape[-3])

    def _check_model(self, x: np.ndarray, name: str, ndim: int = 4):
        N = self.size
        if x.ndim != ndim or x.shape[-2:] != (N, N):
            lead = "[P, S, C, " if ndim == 5 else "[P, S, "
            raise UsageError(f"{name} must be {lead}{N}, {N}], got {x.shape}")
        self._check_slices(x.shape[1])

    def _intensity(self, n_phases: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.asarray(self.intensity_low, dtype=np.float64)
        hi = np.asarray(self.intensity_high, dtype=np.float64)
        if lo.shape[0] not in (1, n_phases) or lo.shape[1] not in (1, self.n_slices):
            raise UsageError(f"intensity parameters of shape {lo.shape} do not fit "
                             f"{n_phases} phases x {self.n_slices} slices")
        return lo[:, :, None, None], hi[:, :, None, None]

    # -- images -------------------------------------------------------------------
    def resample_to_model(self, images: np.ndarray, *, fill: float = 0.0) -> np.ndarray:
        """Resample native images onto the model grid, no intensity change.

        images: [P, S, H, W] real. Returns [P, S, size, size] float32; model pixels outside
        the native field of view get ``fill``.
        """
        x = np.asarray(images)
        self._check_native(x, "images")
        r, c, valid = self._forward
        out = _apply(r, c, x.astype(np.float32, copy=False))
        out[:, ~valid] = fill
        return out

    def normalise(self, model_images: np.ndarray) -> np.ndarray:
        """Raw-intensity model-grid images -> clipped and scaled to ``out_range``.

        model_images: [P, S, size, size]. Returns float32 of the same shape.
        """
        x = np.asarray(model_images, dtype=np.float64)
        self._check_model(x, "model_images")
        lo, hi = self._intensity(x.shape[0])
        a, b = self.out_range
        y = a + (np.clip(x, lo, hi) - lo) / (hi - lo) * (b - a)
        return y.astype(np.float32)

    def denormalise(self, model_images: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`normalise` (exact for raw values inside [low, high]).

        model_images: [P, S, size, size] in ``out_range``. Returns float32 raw intensities.
        """
        y = np.asarray(model_images, dtype=np.float64)
        self._check_model(y, "model_images")
        lo, hi = self._intensity(y.shape[0])
        a, b = self.out_range
        return (lo + (y - a) / (b - a) * (hi - lo)).astype(np.float32)

    def to_model(self, images: np.ndarray, *, normalise: bool = True) -> np.ndarray:
        """Native images [P, S, H, W] -> model grid [P, S, size, size] float32.

        With ``normalise`` (default) the intensities are clipped and scaled with this
        transform's parameters and pixels outside the native field of view are
        ``out_range[0]``; otherwise raw resampled intensities with 0 outside.
        """
        x = np.asarray(images)
        self._check_native(x, "images")
        if not normalise:
            return self.resample_to_model(x, fill=0.0)
        lo, _ = self._intensity(x.shape[0])
        raw = self.resample_to_model(x)
        valid = self._forward[2]
        raw = np.where(valid[None], raw, np.broadcast_to(lo, raw.shape[:2] + (1, 1)))
        return self.normalise(raw)

    def images_to_native(self, model_images: np.ndarray, *, denormalise: bool = True,
                         fill: float = 0.0) -> np.ndarray:
        """Model-grid images [P, S, size, size] -> native grid [P, S, H, W] float32.

        With ``denormalise`` (default) the values are first mapped back to raw
        intensities (exact inside the clip range). Native pixels outside the crop get
        ``fill``.
        """
        y = np.asarray(model_images)
        self._check_model(y, "model_images")
        raw = self.denormalise(y) if denormalise else y.astype(np.float32)
        r, c, valid = self._inverse
        out = _apply(r, c, raw)
        out[:, ~valid] = fill
        return out

    # -- labels -------------------------------------------------------------------
    def _labels_resample(self, labels: np.ndarray, mats, n_classes: int | None) -> np.ndarray:
        lab = np.asarray(labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise UsageError(f"labels must be an integer array, got dtype {lab.dtype}")
        if lab.size and lab.min() < 0:
            raise UsageError("labels must be non-negative")
        top = int(lab.max()) + 1 if lab.size else 1
        n = max(len(LABELS), top) if n_classes is None else int(n_classes)
        if top > n:
            raise UsageError(f"labels go up to {top - 1} but n_classes is {n}")
        r, c, valid = mats
        best = None
        arg = None
        for k in range(n):  # one class at a time: memory [P, S, h, w], not x n_classes
            mask = (lab == k).astype(np.float32)
            score = _apply(r, c, mask)
            if best is None:
                best, arg = score, np.zeros(score.shape, dtype=np.uint8)
            else:
                upd = score > best
                best = np.where(upd, score, best)
                arg[upd] = k
        arg[:, ~valid] = 0
        return arg

    def labels_to_model(self, labels: np.ndarray, *, n_classes: int | None = None) -> np.ndarray:
        """Native label map [P, S, H, W] (integer) -> model grid [P, S, size, size] uint8.

        One-hot encoding, linear resampling, argmax. ``n_classes`` defaults to
        ``max(len(LABELS), labels.max() + 1)``. Model pixels outside the native field of
        view are background (0).
        """
        lab = np.asarray(labels)
        self._check_native(lab, "labels")
        return self._labels_resample(lab, self._forward, n_classes)

    def labels_to_native(self, labels: np.ndarray, *, n_classes: int | None = None) -> np.ndarray:
        """Model-grid labels back onto the native grid: [P, S, H, W] uint8.

        labels: either a label map [P, S, size, size] (integer) or class scores /
        probabilities [P, S, C, size, size] (float; resampled linearly, then argmax).
        Native pixels outside the crop are background (0).
        """
        x = np.asarray(labels)
        if x.ndim == 5:
            self._check_model(x, "class probabilities", ndim=5)
            r, c, valid = self._inverse
            probs = x.astype(np.float32, copy=False)
            best = _apply(r, c, probs[:, :, 0])
            arg = np.zeros(best.shape, dtype=np.uint8)
            for k in range(1, x.shape[2]):
                score = _apply(r, c, probs[:, :, k])
                upd = score > best
                best = np.where(upd, score, best)
                arg[upd] = k
            arg[:, ~valid] = 0
            return arg
        self._check_model(x, "labels")
        return self._labels_resample(x, self._inverse, n_classes)

    # -- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (for the run report); :meth:`from_dict` inverts it."""
        d = dataclasses.asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, tuple):
                d[k] = _listify(v)
        d["schema"] = TRANSFORM_SCHEMA
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelGridTransform":
        kw = dict(d)
        schema = kw.pop("schema", TRANSFORM_SCHEMA)
        if schema != TRANSFORM_SCHEMA:
            raise UsageError(f"transform schema {schema} is not supported "
                             f"(this version reads {TRANSFORM_SCHEMA})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kw) - known
        if unknown:
            raise UsageError(f"unknown transform fields {sorted(unknown)}")
        return cls(**kw)


def _listify(v):
    if isinstance(v, (tuple, list)):
        return [_listify(x) for x in v]
    return v


# ----------------------------------------------------------------------------- prepare

def validate_for_preprocessing(study: Study) -> None:
    """Raise :class:`InvalidStudyError` when the study's grid cannot be preprocessed:
    a matrix under ``MIN_NATIVE_MATRIX`` pixels, a non-positive or non-finite pixel
    spacing, or non-finite intensities."""
    H, W = study.matrix
    if H < MIN_NATIVE_MATRIX or W < MIN_NATIVE_MATRIX:
        raise InvalidStudyError(
            f"slice matrix {H} x {W} is too small to preprocess "
            f"(needs at least {MIN_NATIVE_MATRIX} x {MIN_NATIVE_MATRIX} pixels)")
    dr, dc = study.geometry.pixel_spacing
    if not (math.isfinite(dr) and math.isfinite(dc) and dr > 0 and dc > 0):
        raise InvalidStudyError(f"unusable pixel spacing {(dr, dc)} mm",
                                hint="pixel spacing must be positive and finite")
    if study.n_phases < 1 or study.n_slices < 1:
        raise InvalidStudyError(f"study has {study.n_phases} phases and "
                                f"{study.n_slices} slices")
    if not np.isfinite(study.images).all():
        raise InvalidStudyError("study images contain NaN or infinite values")


def _centres_from_lps(geometry: Geometry, point: np.ndarray) -> np.ndarray:
    """[S, 2] (row, col) of the projection of an LPS point onto each slice's plane."""
    d = np.asarray(point, dtype=np.float64).reshape(1, 3) - geometry.origins
    dr, dc = geometry.pixel_spacing
    return np.stack([d @ geometry.col_dir / dr, d @ geometry.row_dir / dc], axis=1)


def _lps_from_centre(geometry: Geometry, centre_rc) -> np.ndarray:
    """LPS point of a native (row, col) on the stack's middle plane (mean slice origin)."""
    dr, dc = geometry.pixel_spacing
    return (geometry.origins.mean(axis=0) + centre_rc[1] * dc * geometry.row_dir
            + centre_rc[0] * dr * geometry.col_dir)


def _intensity_params(raw: np.ndarray, valid: np.ndarray, config: PreprocessConfig
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) arrays shaped for the scope, from model-grid raw images inside the FOV."""
    P, S = raw.shape[:2]
    q = list(config.clip_percentiles)
    mask = np.broadcast_to(valid[None], raw.shape)

    def pct(values):
        if values.size == 0:
            return 0.0, 1.0
        lo, hi = np.percentile(values, q)
        if not hi > lo:  # constant region: keep a unit range so the map stays invertible
            log.warning("intensity percentiles collapse (low = high = %g); using a unit range",
                        lo)
            hi = lo + 1.0
        return float(lo), float(hi)

    if config.intensity_scope == "study":
        lo, hi = pct(raw[mask])
        return np.array([[lo]]), np.array([[hi]])
    if config.intensity_scope == "phase":
        pairs = [pct(raw[p][mask[p]]) for p in range(P)]
        arr = np.array(pairs)
        return arr[:, 0:1], arr[:, 1:2]
    pairs = [[pct(raw[p, s][mask[p, s]]) for s in range(S)] for p in range(P)]
    arr = np.array(pairs)  # [P, S, 2]
    return arr[..., 0], arr[..., 1]


def prepare(study: Study, config: PreprocessConfig | None = None, *,
            centre=None, centre_lps=None) -> tuple[np.ndarray, ModelGridTransform]:
    """Crop around the heart, resample to the model grid and normalise.

    study:      the study ([P, S, H, W] raw images and geometry).
    config:     the model's preprocessing parameters (default ``PreprocessConfig()``).
    centre:     optional crop centre: a (row, col) pair in native pixel coordinates (float,
                used for every slice as given) or a :class:`~.localize.HeartLocation`.
    centre_lps: optional crop centre as a patient LPS point in mm, projected along the
                slice normal onto each slice (so a stack whose slices are shifted in-plane
                stays aligned in 3D).
    Without either, the heart is located with :func:`~.localize.locate_heart` and its
    centre rounded to the nearest native pixel (its precision is millimetres; an
    integral centre keeps the resampling free of half-pixel blur).

    Returns (model images [P, S, size, size] float32 in ``config.out_range``, transform).
    If the study has labels, ``transform.label_coverage`` says which fraction of them lies
    inside the crop, and a WARNING is logged when some fall outside.
    Raises InvalidStudyError for an unusable grid, UsageError for a bad centre.
    """
    from .localize import HeartLocation, locate_heart

    config = PreprocessConfig() if config is None else config
    validate_for_preprocessing(study)
    g = study.geometry
    H, W = study.matrix
    S = study.n_slices
    if centre is not None and centre_lps is not None:
        raise UsageError("give the crop centre as centre or centre_lps, not both")
    if isinstance(centre, HeartLocation):
        centres = _centres_from_lps(g, np.asarray(centre.point_lps))
        point = np.asarray(centre.point_lps, dtype=np.float64)
        source = f"located:{centre.method}"
    elif centre is not None:
        rc = np.asarray(centre, dtype=np.float64)
        if rc.shape != (2,) or not np.isfinite(rc).all():
            raise UsageError(f"centre must be a (row, col) pair, got {centre!r}")
        centres = np.repeat(rc[None], S, axis=0)
        point = _lps_from_centre(g, rc)
        source = "pixel"
    elif centre_lps is not None:
        point = np.asarray(centre_lps, dtype=np.float64)
        if point.shape != (3,) or not np.isfinite(point).all():
            raise UsageError(f"centre_lps must be an (x, y, z) LPS point, got {centre_lps!r}")
        centres = _centres_from_lps(g, point)
        source = "lps"
    else:
        loc = locate_heart(study)
        point = np.asarray(loc.point_lps, dtype=np.float64)
        centres = np.round(_centres_from_lps(g, point))
        source = f"located:{loc.method}"
    inside = ((centres[:, 0] >= -0.5) & (centres[:, 0] < H - 0.5)
              & (centres[:, 1] >= -0.5) & (centres[:, 1] < W - 0.5))
    if not inside.all():
        raise UsageError(f"crop centre {centres[~inside][0].round(2).tolist()} (row, col) lies "
                         f"outside the {H} x {W} slice", hint="give a centre inside the image")

    geo = ModelGridTransform(size=config.size, spacing_mm=config.spacing_mm,
                             native_shape=(H, W), native_spacing=g.pixel_spacing,
                             centres=centres, out_range=config.out_range,
                             clip_percentiles=config.clip_percentiles,
                             intensity_scope=config.intensity_scope,
                             antialias=config.antialias, centre_source=source,
                             centre_lps=point)
    raw = geo.resample_to_model(study.images)
    valid = geo.model_valid_mask()
    lo, hi = _intensity_params(raw, valid, config)
    coverage = None
    if study.labels is not None:
        coverage = geo.coverage(study.labels)
        if coverage < 1.0:
            log.warning("the %.0f mm crop leaves %.2f%% of the labelled pixels outside",
                        config.field_of_view_mm, 100.0 * (1.0 - coverage))
    transform = dataclasses.replace(geo, intensity_low=lo, intensity_high=hi,
                                    label_coverage=coverage)
    # the fresh instance recomputes its matrices lazily; hand it the ones already built
    transform.__dict__["_forward"] = geo._forward
    lo_b, _ = transform._intensity(study.n_phases)
    raw = np.where(valid[None], raw, np.broadcast_to(lo_b, raw.shape[:2] + (1, 1)))
    model = transform.normalise(raw)
    log.debug("prepared %d x %d slices: crop centre %s (%s), intensity low/high %s/%s",
              study.n_phases, S, centres[len(centres) // 2].round(2).tolist(), source,
              np.round(lo.ravel()[:4], 2).tolist(), np.round(hi.ravel()[:4], 2).tolist())
    return model, transform
