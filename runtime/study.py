"""The in-memory model of a cine short-axis (SAX) study, shared by every loader and stage.

Coordinates are patient LPS in millimetres (the DICOM and ITK convention).

Index conventions for one slice of shape [H, W] (rows, columns):

- column index j runs along ``row_dir`` (DICOM ImageOrientationPatient[0:3]);
- row index i runs along ``col_dir`` (ImageOrientationPatient[3:6]);
- the centre of pixel (i, j) of slice s lies at
  ``origins[s] + j * spacing_col * row_dir + i * spacing_row * col_dir``
  with ``pixel_spacing = (spacing_row, spacing_col)`` in DICOM PixelSpacing order
  (spacing between rows first);
- slices are sorted by increasing position along ``normal = row_dir x col_dir``.

A 3D volume of one phase is the array ``images[p]`` of shape [S, H, W], which is exactly
SimpleITK's array order (z, y, x) for an image whose direction columns are
(row_dir, col_dir, normal): see :meth:`Study.to_sitk`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The project's label convention. ACDC files use 1 RV, 2 MYO, 3 LV and are remapped on load.
LABELS: dict[int, str] = {0: "background", 1: "LVC", 2: "LVM", 3: "RVC"}
LABEL_NAMES_LONG: dict[int, str] = {
    0: "background", 1: "LV cavity", 2: "LV myocardium", 3: "RV cavity"}
# index with an ACDC label array: ACDC_TO_PROJECT[acdc] -> project label
ACDC_TO_PROJECT = np.array([0, 3, 2, 1], dtype=np.uint8)


@dataclass(frozen=True)
class Geometry:
    """Physical geometry of a stack of parallel slices (all phases share it).

    origins:       [S, 3] float64, LPS mm, centre of pixel (0, 0) of each slice,
                   sorted by increasing position along ``normal``.
    row_dir:       [3] float64 unit vector, direction of increasing column index.
    col_dir:       [3] float64 unit vector, direction of increasing row index.
    pixel_spacing: (spacing between rows, spacing between columns) in mm.
    slice_thickness: nominal thickness in mm, or None when unknown.
    """

    origins: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None = None

    def __post_init__(self):
        origins = np.asarray(self.origins, dtype=np.float64).reshape(-1, 3)
        object.__setattr__(self, "origins", origins)
        object.__setattr__(self, "row_dir", _unit(self.row_dir))
        object.__setattr__(self, "col_dir", _unit(self.col_dir))
        object.__setattr__(self, "pixel_spacing",
                           (float(self.pixel_spacing[0]), float(self.pixel_spacing[1])))

    @property
    def n_slices(self) -> int:
        return int(self.origins.shape[0])

    @property
    def normal(self) -> np.ndarray:
        """[3] unit slice normal, row_dir x col_dir."""
        return _unit(np.cross(self.row_dir, self.col_dir))

    @property
    def positions(self) -> np.ndarray:
        """[S] position of each slice along the normal, in mm."""
        return self.origins @ self.normal

    @property
    def slice_gaps(self) -> np.ndarray:
        """[S-1] distance between neighbouring slices along the normal, in mm."""
        return np.diff(self.positions)

    @property
    def slice_spacing(self) -> float:
        """Median centre-to-centre slice distance in mm (NaN for a single slice)."""
        gaps = self.slice_gaps
        return float(np.median(gaps)) if gaps.size else float("nan")

    @property
    def direction(self) -> np.ndarray:
        """[3, 3] matrix whose columns are (row_dir, col_dir, normal): ITK's direction."""
        return np.stack([self.row_dir, self.col_dir, self.normal], axis=1)

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        """(column spacing, row spacing, slice spacing): ITK's (x, y, z) spacing."""
        s = self.slice_spacing
        return (self.pixel_spacing[1], self.pixel_spacing[0], 1.0 if np.isnan(s) else s)

    def orientation_label(self) -> str:
        """Closest anatomical axes of the row and column directions, e.g. 'row L, col P'."""
        return f"row {_axis_letter(self.row_dir)}, col {_axis_letter(self.col_dir)}"

    def index_to_physical(self, s: float, i: float, j: float) -> np.ndarray:
        """LPS position of (slice s, row i, column j); s may be fractional (interpolated)."""
        s0 = int(np.clip(np.floor(s), 0, self.n_slices - 1))
        base = self.origins[s0] + (s - s0) * self.slice_spacing * self.normal
        return (base + j * self.pixel_spacing[1] * self.row_dir
                + i * self.pixel_spacing[0] * self.col_dir)

    def subset(self, slices) -> "Geometry":
        return dataclasses.replace(self, origins=self.origins[np.asarray(slices)])


@dataclass
class Study:
    """A cine SAX study: images at P phases and S slices, with geometry.

    images:        [P, S, H, W] float32, raw scanner intensities (not normalised).
    geometry:      the slice stack's geometry (shared by all phases).
    trigger_times: [P] float64, ms after the R wave; NaN where unknown.
    labels:        [P, S, H, W] uint8 in the project's convention (LABELS) or None.
    phase_ids:     per phase, the source's frame number (ACDC frame, DICOM phase index).
    ed_phase, es_phase: indices into the phase axis, when the source says so.
    image_refs:    DICOM sources only: per phase and slice, (file path, frame index in a
                   multi-frame file or None) of the image it came from, [P][S] (what a
                   DICOM SEG output references).
    """

    images: np.ndarray
    geometry: Geometry
    trigger_times: np.ndarray | None = None
    labels: np.ndarray | None = None
    phase_ids: list[int] | None = None
    ed_phase: int | None = None
    es_phase: int | None = None
    series_uid: str | None = None
    description: str = ""
    source: str = ""
    source_format: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    image_refs: list[list[tuple[str, int | None]]] | None = None

    def __post_init__(self):
        self.images = np.asarray(self.images, dtype=np.float32)
        if self.images.ndim != 4:
            raise ValueError(f"images must be [P, S, H, W], got shape {self.images.shape}")
        P, S = self.images.shape[:2]
        if self.geometry.n_slices != S:
            raise ValueError(
                f"geometry has {self.geometry.n_slices} slices, images have {S}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.uint8)
            if self.labels.shape != self.images.shape:
                raise ValueError(
                    f"labels shape {self.labels.shape} != images shape {self.images.shape}")
        if self.trigger_times is None:
            self.trigger_times = np.full(P, np.nan)
        self.trigger_times = np.asarray(self.trigger_times, dtype=np.float64)
        if self.trigger_times.shape != (P,):
            raise ValueError(f"trigger_times must be [{P}], got {self.trigger_times.shape}")
        if self.phase_ids is None:
            self.phase_ids = list(range(P))
        if self.image_refs is not None and (len(self.image_refs) != P
                                            or any(len(r) != S for r in self.image_refs)):
            raise ValueError(f"image_refs must be [{P}][{S}]")

    @property
    def n_phases(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_slices(self) -> int:
        return int(self.images.shape[1])

    @property
    def matrix(self) -> tuple[int, int]:
        """(rows, columns) of every slice."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def to_sitk(self, volume: np.ndarray, *, slice_spacing: float | None = None,
                dt_ms: float | None = None):
        """A SimpleITK image of a [S, H, W] (3D) or [P, S, H, W] (4D) array with this
        study's geometry; see :func:`volume_to_sitk`."""
        volume = np.asarray(volume)
        if volume.ndim not in (3, 4) or volume.shape[-2:] != self.images.shape[2:]:
            raise ValueError(f"volume must be [S, {self.matrix[0]}, {self.matrix[1]}] or "
                             f"[P, S, {self.matrix[0]}, {self.matrix[1]}], got {volume.shape}")
        return volume_to_sitk(volume, self.geometry, slice_spacing=slice_spacing, dt_ms=dt_ms)

    def phase_name(self, p: int) -> str:
        if p == self.ed_phase:
            return "ED"
        if p == self.es_phase:
            return "ES"
        return f"phase{p:02d}"

    def describe(self) -> dict[str, Any]:
        """What `deeprecon-rt study info` prints: a JSON-serialisable summary, valid JSON
        under any input: NaN and infinite values (in geometry, trigger times or ``info``)
        become None, numpy scalars Python numbers."""
        from deeprecon.runtime.jsonsafe import json_safe

        g = self.geometry
        with np.errstate(all="ignore"):
            gaps = g.slice_gaps
        return json_safe({
            "source": self.source,
            "format": self.source_format,
            "series_uid": self.series_uid,
            "description": self.description,
            "phases": self.n_phases,
            "slices": self.n_slices,
            "matrix": list(self.matrix),
            "pixel_spacing_mm": [round(v, 6) for v in g.pixel_spacing],
            "slice_gap_mm": None if not gaps.size else round(float(np.median(gaps)), 6),
            "slice_gap_range_mm": None if not gaps.size else
            [round(float(gaps.min()), 6), round(float(gaps.max()), 6)],
            "slice_thickness_mm": g.slice_thickness,
            "orientation": g.orientation_label(),
            "row_direction": [round(float(v), 6) for v in g.row_dir],
            "column_direction": [round(float(v), 6) for v in g.col_dir],
            "trigger_times_ms": [round(float(t), 3) for t in self.trigger_times],
            "phase_ids": list(self.phase_ids),
            "ed_phase": self.ed_phase,
            "es_phase": self.es_phase,
            "has_labels": self.labels is not None,
            "info": self.info,
            "warnings": list(self.warnings),
        })


def volume_to_sitk(volume: np.ndarray, geometry: Geometry, *, slice_spacing: float | None = None,
                   dt_ms: float | None = None, t0_ms: float = 0.0):
    """A SimpleITK image of ``volume`` placed by ``geometry``.

    volume: [S, H, W] -> 3D image (x, y, z); [P, S, H, W] -> 4D image (x, y, z, t) with
            time spacing ``dt_ms`` (1.0 when None) and origin ``t0_ms``.
    The spatial part: spacing (column, row, slice) mm, origin = pixel (0, 0) of the first
    slice, direction columns (row_dir, col_dir, normal). ``slice_spacing`` overrides the
    stack's spacing (a super-resolved volume starting at the first slice). The array is
    copied once, never per phase.
    """
    import SimpleITK as sitk

    volume = np.ascontiguousarray(volume)
    if volume.ndim not in (3, 4):
        raise ValueError(f"volume must be [S, H, W] or [P, S, H, W], got shape {volume.shape}")
    sx, sy, sz = geometry.spacing_xyz
    spacing = (sx, sy, float(slice_spacing) if slice_spacing is not None else sz)
    origin = tuple(float(v) for v in geometry.origins[0])
    direction = geometry.direction
    if volume.ndim == 4:
        spacing += (1.0 if dt_ms is None else float(dt_ms),)
        origin += (float(t0_ms),)
        d4 = np.eye(4)
        d4[:3, :3] = direction
        direction = d4
    img = sitk.GetImageFromArray(volume, isVector=False)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    return img


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(3)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise ValueError(f"direction vector {v.tolist()} has no length")
    return v / n


def _axis_letter(v: np.ndarray) -> str:
    """Dominant LPS axis of a direction: L/R, P/A, S/I (the sign picks the letter)."""
    k = int(np.argmax(np.abs(v)))
    return ("L", "P", "S")[k] if v[k] > 0 else ("R", "A", "I")[k]
