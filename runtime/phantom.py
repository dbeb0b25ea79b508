"""A synthetic cine short-axis (SAX) phantom with exact labels and a high-resolution truth.

The heart is defined analytically in a *heart frame* and evaluated at any set of
patient (LPS, mm) points, so the thick SAX slices, the high-resolution (HR) truth and
the long-axis (LAX) planes all come from one function and agree in physical space.

Heart frame (right-handed, orthonormal, all in mm):

- ``eh``: the long axis, from the epicardial apex (h = 0) towards the base; it is the
  SAX slice normal, tilted in LPS like a real heart's long axis (apex pointing left,
  anterior and inferior);
- ``ex``: the SAX row direction (image right: patient left-posterior);
- ``ey``: the SAX column direction (image down: patient posterior-inferior), so that
  ``ex x ey = eh`` and the SAX direction matrix (row, col, normal) is right-handed.
  Slices are sorted along ``eh``: slice 0 is the most apical, the last the most basal.

Anatomy (ED values of :class:`HeartShape`; every size changes smoothly over the cycle):

- LV cavity (label 1): a prolate half-ellipsoid (in-plane semi-axes 25 x 27 mm,
  truncated at the base plane, 18 mm above its equator); LV myocardium (label 2): the
  shell between it and a concentric epicardial ellipsoid (8 mm wall, 8 mm at the apex).
  Over systole the endocardium contracts radially (x0.70), the base descends 12 mm towards
  the fixed apex, and the epicardium is recomputed so the myocardial volume is conserved
  (the wall thickens from 8 to about 11.5 mm). EDV ~135 mL, ESV ~55 mL, EF ~59 %,
  LVM ~121 g.
- RV cavity (label 3): a rotated ellipsoid beside the LV on the patient's right (image
  left), minus the LV epicardium, which leaves a crescent wrapping the septum; a 3 mm RV
  free wall around it is labelled background (as in ACDC). RVEDV ~143 mL, RVEF ~56 %.
- Above the base plane (all background label): a 2 mm dark valve plane, the left and
  right atria (bright blood, thin walls) and the aortic root (for the 3-chamber view);
  a thin epicardial fat layer around the ventricles.
- Around the heart, static: the body (skin fat, chest-wall muscle), lungs (dark), liver,
  spine with the bright spinal canal, descending aorta and mediastinal soft tissue.

MR-like rendering: bSSFP-like relative intensities (blood 1.0, myocardium 0.26, fat 0.85,
lung 0.05, ...), a smooth seeded tissue texture (+-6 %), a smooth coil-shading field
(brighter near the anterior and posterior chest, seeded tilt), an in-plane Gaussian
point-spread function, and Rician noise (``noise`` = its standard deviation relative to
the blood signal), times ``intensity_scale`` (scanner-like units).

Sampling:

- SAX slice images are the model averaged over a rectangular slice profile of
  ``slice_thickness_mm`` (``thickness_samples`` planes), so they have through-plane
  partial volume; SAX labels come from the slice's *centre plane* (``label_mode="centre"``,
  the default: exact, and identical to the HR truth at that plane) or from the majority
  over the thickness samples (``label_mode="majority"``).
- The HR truth shares the SAX in-plane grid and normal, with ``hr_spacing_mm`` between
  planes, covering the SAX slab from half a slice spacing below the first slice centre to
  half a spacing above the last (rounded to whole HR steps); its images are thin planes
  without noise (texture, shading and PSF included), its labels exact.
- LAX planes ("2ch", "3ch", "4ch") contain the long axis; apex at the top of the image,
  atria at the bottom; rendered with a ``lax_thickness_mm`` slice profile and noise.
- Breath-hold misalignment: each SAX slice's content is displaced in-plane by a seeded
  Gaussian shift (sd ``shift_mm`` per axis), images and labels alike (exactly: the model
  is evaluated at the shifted points); the truth and the LAX planes are not shifted.

Phases: for ``phases >= 3`` the cycle is sampled uniformly (phase p at p/P of the RR
interval); ``phases == 2`` gives ED (t = 0) and the model's end-systole
(t = ``HeartShape.es_fraction`` of RR), so the time step is uniform in both cases;
``phases == 1`` gives ED only (``es_phase`` None). ED is phase 0 (largest volume);
ES is the phase of smallest exact LV volume.

Randomness: one :class:`numpy.random.SeedSequence` per seed, spawned into independent
streams (texture, shading, shifts, SAX noise, LAX noise, anatomy jitter), so the same
seed gives identical arrays and changing the number of phases does not change the
shifts. The anatomy itself depends on the seed only when ``anatomy_jitter > 0``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from deeprecon.runtime.errors import UnavailableError, UsageError
from deeprecon.runtime.measures import MYOCARDIAL_DENSITY_G_PER_ML
from deeprecon.runtime.study import LABELS, Geometry, Study, volume_to_sitk

log = logging.getLogger(__name__)

PHANTOM_FORMAT = "deeprecon-phantom"
PHANTOM_VERSION = 1
LAX_VIEWS = ("2ch", "3ch", "4ch")


# --------------------------------------------------------------------------- tissue classes
# Internal tissue classes (a superset of the labels); order = rendering priority is set in code.
AIR, MUSCLE, FAT, SOFT, LIVER, LUNG, BONE, CSF, DESC_AORTA = range(9)
EPI_FAT, ATRIAL_WALL, LA, RA, VALVE, RV_WALL, RVC, AO_WALL, AO, LVM, LVC = range(20, 31)
_N_CLASSES = 32

_INTENSITY = np.zeros(_N_CLASSES, dtype=np.float32)
for _c, _v in {AIR: 0.0, MUSCLE: 0.30, FAT: 0.85, SOFT: 0.40, LIVER: 0.33, LUNG: 0.05,
               BONE: 0.45, CSF: 0.95, DESC_AORTA: 0.90, EPI_FAT: 0.72, ATRIAL_WALL: 0.28,
               LA: 0.95, RA: 0.90, VALVE: 0.30, RV_WALL: 0.28, RVC: 0.93, AO_WALL: 0.30,
               AO: 1.0, LVM: 0.26, LVC: 1.0}.items():
    _INTENSITY[_c] = _v
_CLASS_TO_LABEL = np.zeros(_N_CLASSES, dtype=np.uint8)
_CLASS_TO_LABEL[LVC], _CLASS_TO_LABEL[LVM], _CLASS_TO_LABEL[RVC] = 1, 2, 3


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class HeartShape:
    """The analytic heart's parameters, in mm in the heart frame (see the module doc).

    Pairs ``(ed, es)`` give end-diastolic and end-systolic values; in-plane pairs ``(x, y)``
    are along the SAX row (``ex``) and column (``ey``) directions.
    """

    lv_endo_semi_ed_mm: tuple[float, float] = (25.0, 27.0)
    lv_wall_ed_mm: float = 8.0
    lv_apex_wall_mm: tuple[float, float] = (8.0, 11.0)
    lv_radial_es_scale: float = 0.70
    base_height_ed_mm: float = 95.0
    base_descent_mm: float = 12.0
    base_above_equator_mm: float = 18.0
    rv_centre_mm: tuple[float, float] = (-22.0, -6.0)
    rv_centre_es_shift_mm: tuple[float, float] = (3.0, 0.0)
    rv_semi_ed_mm: tuple[float, float] = (30.0, 55.0)
    rv_es_scale: tuple[float, float] = (0.66, 0.90)
    rv_angle_deg: float = -15.0
    rv_apex_height_mm: tuple[float, float] = (25.0, 28.0)
    rv_base_above_equator_mm: float = 15.0
    rv_wall_mm: float = 3.0
    epicardial_fat_mm: float = 2.5
    es_fraction: float = 0.35

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(float(x) for x in v))
        if not 0.3 <= self.lv_radial_es_scale <= 1.0:
            raise UsageError(f"lv_radial_es_scale must be in [0.3, 1], got {self.lv_radial_es_scale}")
        if not 0.1 <= self.es_fraction <= 0.6:
            raise UsageError(f"es_fraction must be in [0.1, 0.6], got {self.es_fraction}")


@dataclass(frozen=True)
class PhantomConfig:
    """Every parameter of a phantom (serialised into phantom.json).

    Units: mm, ms; ``matrix`` is (rows H, columns W); ``noise`` is the Rician noise sd
    relative to the blood signal; ``shift_mm`` the sd (per in-plane axis) of the per-slice
    breath-hold shifts.
    """

    slices: int = 10
    phases: int = 2
    seed: int = 0
    slice_spacing_mm: float = 10.0
    slice_thickness_mm: float = 8.0
    pixel_spacing_mm: float = 1.5
    matrix: tuple[int, int] = (160, 192)
    hr_spacing_mm: float = 1.25
    shift_mm: float = 0.0
    noise: float = 0.03
    rr_interval_ms: float = 1000.0
    thickness_samples: int = 5
    psf_sigma_px: float = 0.5
    label_mode: str = "centre"
    intensity_scale: float = 1000.0
    lax_matrix: tuple[int, int] = (160, 160)
    lax_pixel_spacing_mm: float = 1.5
    lax_thickness_mm: float = 6.0
    apex_direction_lps: tuple[float, float, float] = (0.62, -0.50, -0.60)
    image_down_hint_lps: tuple[float, float, float] = (0.0, 0.5, -0.85)
    heart_centre_lps: tuple[float, float, float] = (30.0, -25.0, 0.0)
    fov_centre_offset_mm: tuple[float, float] = (-10.0, 0.0)
    anatomy_jitter: float = 0.0
    shape: HeartShape = field(default_factory=HeartShape)

    def __post_init__(self):
        for name in ("matrix", "lax_matrix"):
            v = tuple(int(x) for x in getattr(self, name))
            if len(v) != 2 or min(v) < 16:
                raise UsageError(f"{name} must be two sizes >= 16, got {v}")
            object.__setattr__(self, name, v)
        for name in ("apex_direction_lps", "image_down_hint_lps", "heart_centre_lps",
                     "fov_centre_offset_mm"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if isinstance(self.shape, dict):
            object.__setattr__(self, "shape", HeartShape(**self.shape))
        if self.slices < 1:
            raise UsageError(f"slices must be >= 1, got {self.slices}")
        if self.phases < 1:
            raise UsageError(f"phases must be >= 1, got {self.phases}")
        for name in ("slice_spacing_mm", "slice_thickness_mm", "pixel_spacing_mm",
                     "hr_spacing_mm", "rr_interval_ms", "lax_pixel_spacing_mm",
                     "lax_thickness_mm", "intensity_scale"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise UsageError(f"{name} must be > 0, got {v}")
        if self.hr_spacing_mm > self.slice_spacing_mm:
            raise UsageError(f"hr_spacing_mm ({self.hr_spacing_mm}) must not exceed "
                             f"slice_spacing_mm ({self.slice_spacing_mm})")
        for name in ("shift_mm", "noise", "psf_sigma_px", "anatomy_jitter"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise UsageError(f"{name} must be >= 0, got {v}")
        if self.thickness_samples < 1 or self.thickness_samples % 2 == 0:
            raise UsageError(f"thickness_samples must be odd and >= 1, got {self.thickness_samples}")
        if self.label_mode not in ("centre", "majority"):
            raise UsageError(f"label_mode must be 'centre' or 'majority', got {self.label_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- results
class LaxPlane(NamedTuple):
    """One long-axis plane over the cycle.

    images:   [P, h, w] float32 (scanner-like units);
    labels:   [P, h, w] uint8, exact labels of the plane's centre;
    geometry: a one-slice :class:`Geometry` (origin, row/col directions, pixel spacing,
              ``slice_thickness`` = the plane's slab thickness), LPS mm.
    """

    images: np.ndarray
    labels: np.ndarray
    geometry: Geometry


@dataclass(frozen=True)
class Phantom:
    """A generated phantom.

    study:        the thick-slice SAX cine (images [P, S, H, W] float32, labels uint8),
                  trigger times over one RR interval, ed_phase 0, es_phase = smallest LV.
    truth:        the HR truth: same in-plane grid and normal, ``hr_spacing_mm`` apart,
                  noiseless images and exact labels, [P, S_hr, H, W].
    lax:          "2ch", "3ch", "4ch" -> :class:`LaxPlane`.
    volumes_ml:   "LVC", "LVM", "RVC" -> [P] float64 exact volumes (mL) of the analytic
                  model's whole heart (not limited to the sampled slab).
    shifts_mm:    [S, 2] float64 in-plane shift of each SAX slice's content, (along the
                  column direction = image down, along the row direction = image right).
    truth_slice_index: [S] float64, each SAX slice centre's index in the truth stack.
    phase_fractions:   [P] float64, each phase's time as a fraction of the RR interval.
    """

    study: Study
    truth: Study
    lax: dict[str, LaxPlane]
    volumes_ml: dict[str, np.ndarray]
    config: PhantomConfig
    shifts_mm: np.ndarray
    truth_slice_index: np.ndarray
    phase_fractions: np.ndarray

    def exact_measures(self) -> dict[str, float]:
        """The clinical measures (ukbb_cardiac column names) of the exact volumes."""
        v = self.volumes_ml
        ed, es = self.study.ed_phase, self.study.es_phase
        out = {"LVEDV (mL)": float(v["LVC"][ed]), "LVM (g)": float(v["LVM"][ed]) * MYOCARDIAL_DENSITY_G_PER_ML,
               "RVEDV (mL)": float(v["RVC"][ed])}
        if es is None:
            return out
        for k in ("LV", "RV"):
            edv, esv = float(v[k + "C"][ed]), float(v[k + "C"][es])
            out[f"{k}ESV (mL)"] = esv
            out[f"{k}SV (mL)"] = edv - esv
            out[f"{k}EF (%)"] = (edv - esv) / edv * 100.0
        return out


# --------------------------------------------------------------------------- the cycle
_CYCLE_KNOTS = ((0.0, 0.0), (None, 1.0), (0.55, 0.30), (0.80, 0.20), (1.0, 0.0))


def contraction(t: np.ndarray | float, *, es_fraction: float = 0.35) -> np.ndarray:
    """Contraction state c(t) in [0, 1] (0 = ED, 1 = ES) at cycle fraction t in [0, 1).

    Cosine-eased interpolation through: ED (0, 0), ES (es_fraction, 1), end of rapid filling
    (0.55, 0.30), diastasis (0.80, 0.20), atrial kick back to ED (1, 0).
    """
    t = np.mod(np.asarray(t, dtype=np.float64), 1.0)
    knots = [(es_fraction if x is None else x, y) for x, y in _CYCLE_KNOTS]
    xs = np.array([k[0] for k in knots])
    ys = np.array([k[1] for k in knots])
    seg = np.clip(np.searchsorted(xs, t, side="right") - 1, 0, len(xs) - 2)
    u = (t - xs[seg]) / (xs[seg + 1] - xs[seg])
    w = 0.5 * (1.0 - np.cos(np.pi * u))
    return ys[seg] + (ys[seg + 1] - ys[seg]) * w


@dataclass(frozen=True)
class _HeartState:
    """Numeric heart parameters of one phase (heart frame, mm)."""

    c: float
    base: float
    lv_hc: float
    lv_endo: tuple[float, float, float]   # semi-axes x, y, h (h: centre to endocardial apex)
    lv_epi: tuple[float, float, float]
    rv_centre: tuple[float, float]
    rv_hc: float
    rv_endo: tuple[float, float, float]
    rv_angle: float
    rv_wall: float
    atria_scale: float


def _truncated_ellipsoid_factor(c: float, d: float) -> float:
    """Integral of (1 - u^2 / c^2) du over u in [-c, d] (d <= c): volume / (pi a b)."""
    d = min(d, c)
    return (c + d) - (c ** 3 + d ** 3) / (3.0 * c ** 2)


def _heart_state(shape: HeartShape, c: float) -> _HeartState:
    lerp = lambda a, b: a + (b - a) * c  # noqa: E731
    base = shape.base_height_ed_mm - shape.base_descent_mm * c
    hc = base - shape.base_above_equator_mm
    s = lerp(1.0, shape.lv_radial_es_scale)
    a, b = shape.lv_endo_semi_ed_mm[0] * s, shape.lv_endo_semi_ed_mm[1] * s
    apex_wall = lerp(*shape.lv_apex_wall_mm)
    c_endo = hc - apex_wall
    c_epi = hc  # the epicardial apex stays at h = 0
    d = shape.base_above_equator_mm
    v_endo = math.pi * a * b * _truncated_ellipsoid_factor(c_endo, d)
    # myocardial volume of ED, conserved over the cycle
    hc0 = shape.base_height_ed_mm - d
    a0, b0 = shape.lv_endo_semi_ed_mm
    w0 = shape.lv_wall_ed_mm
    v_myo = (math.pi * (a0 + w0) * (b0 + w0) * _truncated_ellipsoid_factor(hc0, d)
             - math.pi * a0 * b0 * _truncated_ellipsoid_factor(hc0 - shape.lv_apex_wall_mm[0], d))
    ab_epi = (v_endo + v_myo) / (math.pi * _truncated_ellipsoid_factor(c_epi, d))
    aspect = (a0 + w0) / (b0 + w0)
    ae = math.sqrt(ab_epi * aspect)
    be = ab_epi / ae
    rx, ry = shape.rv_centre_mm
    rv_centre = (rx + shape.rv_centre_es_shift_mm[0] * c, ry + shape.rv_centre_es_shift_mm[1] * c)
    rv_hc = base - shape.rv_base_above_equator_mm
    rv_apex = lerp(*shape.rv_apex_height_mm)
    rv_endo = (shape.rv_semi_ed_mm[0] * lerp(1.0, shape.rv_es_scale[0]),
               shape.rv_semi_ed_mm[1] * lerp(1.0, shape.rv_es_scale[1]),
               rv_hc - rv_apex)
    return _HeartState(c=float(c), base=base, lv_hc=hc, lv_endo=(a, b, c_endo),
                       lv_epi=(ae, be, c_epi), rv_centre=rv_centre, rv_hc=rv_hc, rv_endo=rv_endo,
                       rv_angle=math.radians(shape.rv_angle_deg), rv_wall=shape.rv_wall_mm,
                       atria_scale=1.0 + 0.15 * c)


def _exact_volumes(st: _HeartState, *, step_mm: float = 0.1) -> dict[str, float]:
    """Exact volumes (mL) of LVC, LVM, RVC of one state.

    LV cavity and myocardium: closed form (truncated ellipsoids). RV cavity: the RV
    ellipsoid's closed-form volume minus its intersection with the LV epicardium, the
    latter integrated by exact chord lengths on a ``step_mm`` grid in h and x.
    """
    a, b, c = st.lv_endo
    ae, be, ce = st.lv_epi
    d = st.base - st.lv_hc
    v_lvc = math.pi * a * b * _truncated_ellipsoid_factor(c, d)
    v_epi = math.pi * ae * be * _truncated_ellipsoid_factor(ce, d)
    ra, rb, rc = st.rv_endo
    v_rv_ell = math.pi * ra * rb * _truncated_ellipsoid_factor(rc, st.base - st.rv_hc)
    # intersection of the RV ellipsoid and the LV epicardial ellipsoid, below the base
    h_lo = st.rv_hc - rc
    hs = np.arange(h_lo + step_mm / 2, st.base, step_mm)                      # [Nh]
    s_rv2 = np.clip(1.0 - ((hs - st.rv_hc) / rc) ** 2, 0.0, None)
    s_lv2 = np.clip(1.0 - ((hs - st.lv_hc) / ce) ** 2, 0.0, None)
    xs = np.arange(-ae + step_mm / 2, ae, step_mm)                             # [Nx]
    X, S_rv2 = np.meshgrid(xs, s_rv2, indexing="xy")                          # [Nh, Nx]
    S_lv2 = np.broadcast_to(s_lv2[:, None], X.shape)
    # LV epi chord along y at x: |y| <= be * sqrt(s_lv2 - x^2/ae^2)
    e_half = be * np.sqrt(np.clip(S_lv2 - (X / ae) ** 2, 0.0, None))
    y0, y1 = _rotated_ellipse_chord(X, st.rv_centre, ra, rb, st.rv_angle, S_rv2)
    overlap = np.clip(np.minimum(y1, e_half) - np.maximum(y0, -e_half), 0.0, None)
    v_inter = float(overlap.sum()) * step_mm * step_mm
    return {"LVC": v_lvc / 1000.0, "LVM": (v_epi - v_lvc) / 1000.0,
            "RVC": (v_rv_ell - v_inter) / 1000.0}


def _rotated_ellipse_chord(x, centre, a, b, theta, s2):
    """y-interval [y0, y1] of the ellipse ((R(x - centre))/(a, b))^2 <= s2 at abscissa x.

    Empty intervals come back with y0 == y1. Arrays broadcast.
    """
    ct, sn = math.cos(theta), math.sin(theta)
    X = x - centre[0]
    qa = sn * sn / a ** 2 + ct * ct / b ** 2
    qb = 2.0 * X * ct * sn * (1.0 / a ** 2 - 1.0 / b ** 2)
    qc = X * X * (ct * ct / a ** 2 + sn * sn / b ** 2) - s2
    disc = qb * qb - 4.0 * qa * qc
    root = np.sqrt(np.clip(disc, 0.0, None))
    mid = -qb / (2.0 * qa)
    half = np.where(disc > 0, root / (2.0 * qa), 0.0)
    return centre[1] + mid - half, centre[1] + mid + half


# --------------------------------------------------------------------------- the anatomy
class _Anatomy:
    """The whole model: heart frame, static body, texture and shading; evaluates points."""

    def __init__(self, cfg: PhantomConfig, shape: HeartShape, rng_texture, rng_shading):
        self.cfg = cfg
        self.shape = shape
        apex_dir = np.asarray(cfg.apex_direction_lps, dtype=np.float64)
        self.eh = -apex_dir / np.linalg.norm(apex_dir)
        hint = np.asarray(cfg.image_down_hint_lps, dtype=np.float64)
        ey = hint - (hint @ self.eh) * self.eh
        if np.linalg.norm(ey) < 1e-6:
            raise UsageError("image_down_hint_lps is parallel to the long axis")
        self.ey = ey / np.linalg.norm(ey)
        self.ex = np.cross(self.ey, self.eh)
        self.frame = np.stack([self.ex, self.ey, self.eh])  # rows: heart axes in LPS
        # the LV axis point at h = 50 mm is heart_centre_lps
        self.apex = np.asarray(cfg.heart_centre_lps, dtype=np.float64) - 50.0 * self.eh
        self.body_centre = np.array([0.0, 10.0, 0.0])
        # texture: sum of plane waves, wavelengths 12..60 mm
        n_waves = 8
        k_dir = rng_texture.normal(size=(n_waves, 3))
        k_dir /= np.linalg.norm(k_dir, axis=1, keepdims=True)
        wavelength = rng_texture.uniform(12.0, 60.0, size=n_waves)
        self.tex_k = k_dir * (2 * np.pi / wavelength)[:, None]
        self.tex_phase = rng_texture.uniform(0, 2 * np.pi, size=n_waves)
        self.tex_amp = 0.06
        self.shade_tilt = rng_shading.normal(scale=0.10, size=3)

    # ---- coordinates
    def to_heart(self, X, Y, Z):
        """LPS coordinate arrays -> heart-frame (x, y, h) arrays."""
        q = (X - self.apex[0], Y - self.apex[1], Z - self.apex[2])
        return tuple(self.frame[k, 0] * q[0] + self.frame[k, 1] * q[1] + self.frame[k, 2] * q[2]
                     for k in range(3))

    def heart_to_lps(self, x, y, h) -> np.ndarray:
        return self.apex + x * self.ex + y * self.ey + h * self.eh

    # ---- static tissue (does not move over the cycle)
    def static(self, qx, qy, qz, hx, hy, hh, tex):
        """Static tissue classes (uint8) and gain (float32: texture x coil shading).

        qx, qy, qz: LPS coordinates relative to ``body_centre``; hx, hy, hh: heart frame;
        tex: the texture field (see :meth:`texture_terms`); all float32 arrays alike.
        """
        cls = np.zeros(qx.shape, dtype=np.uint8)
        qx2, qy2 = qx * qx, qy * qy
        cls[qx2 / 170.0 ** 2 + qy2 / 118.0 ** 2 <= 1.0] = FAT
        cls[qx2 / 160.0 ** 2 + qy2 / 108.0 ** 2 <= 1.0] = MUSCLE
        inner = qx2 / 148.0 ** 2 + qy2 / 97.0 ** 2 <= 1.0
        cls[inner] = SOFT
        lung = (((qx - 80.0) / 62.0) ** 2 + ((qy - 6.0) / 80.0) ** 2 + ((qz - 20.0) / 140.0) ** 2 <= 1.0) | \
               (((qx + 78.0) / 64.0) ** 2 + ((qy - 6.0) / 82.0) ** 2 + ((qz - 25.0) / 140.0) ** 2 <= 1.0)
        cls[lung & inner] = LUNG
        liver = ((qx + 45.0) / 115.0) ** 2 + ((qy - 5.0) / 95.0) ** 2 + ((qz + 125.0) / 75.0) ** 2 <= 1.0
        cls[liver & inner] = LIVER
        # mediastinum around the heart (heart frame, static)
        med = ((hx + 10.0) / 55.0) ** 2 + ((hy + 2.0) / 60.0) ** 2 + ((hh - 62.0) / 105.0) ** 2 <= 1.0
        cls[med & inner] = SOFT
        cls[(qx - 20.0) ** 2 + (qy - 58.0) ** 2 <= 11.0 ** 2] = DESC_AORTA
        cls[qx2 + (qy - 80.0) ** 2 <= 17.0 ** 2] = BONE
        cls[qx2 + (qy - 102.0) ** 2 <= 7.0 ** 2] = CSF
        # coil shading: anterior and posterior arrays, with a seeded linear tilt
        shade = (0.70 + 0.55 * np.exp(-((qy + 118.0) / 110.0) ** 2)
                 + 0.35 * np.exp(-((qy - 118.0) / 110.0) ** 2))
        tilt = self.shade_tilt / 150.0
        shade *= 1.0 + (tilt[0] * qx + tilt[1] * qy + tilt[2] * qz)
        gain = (1.0 + tex) * np.clip(shade, 0.2, None)
        return cls, gain.astype(np.float32, copy=False)

    def texture(self, base: np.ndarray, di: np.ndarray, dj: np.ndarray) -> np.ndarray:
        """The texture field (+-``tex_amp``) on a grid of points base[k, n] + di[i] + dj[j].

        base: [K, n, 3] LPS; di: [H, 3], dj: [W, 3] LPS offsets. Returns [K, n, H, W] float32.
        Uses cos(A + D) = cos A cos D - sin A sin D with D on the small [H, W] grid.
        """
        K, n = base.shape[:2]
        H, W = di.shape[0], dj.shape[0]
        tex = np.zeros((K, n, H, W), dtype=np.float32)
        for k, ph in zip(self.tex_k, self.tex_phase):
            A = base @ k + ph                                                   # [K, n]
            D = (di @ k)[:, None] + (dj @ k)[None, :]                           # [H, W]
            cA, sA = np.cos(A).astype(np.float32), np.sin(A).astype(np.float32)
            cD, sD = np.cos(D).astype(np.float32), np.sin(D).astype(np.float32)
            tex += cA[:, :, None, None] * cD - sA[:, :, None, None] * sD
        tex *= np.float32(self.tex_amp * math.sqrt(2.0 / len(self.tex_k)))
        return tex

    # ---- the heart at one phase
    def heart(self, x, y, h, st: _HeartState) -> np.ndarray:
        """Heart classes (uint8, 0 = none) at heart-frame points (x, y, h) for state ``st``."""
        out = np.zeros(x.shape, dtype=np.uint8)
        base = st.base
        below = h <= base
        ae, be, ce = st.lv_epi
        dh_lv = h - st.lv_hc
        f = self.shape.epicardial_fat_mm
        # RV (rotated in-plane)
        ct, sn = math.cos(st.rv_angle), math.sin(st.rv_angle)
        X, Y = x - st.rv_centre[0], y - st.rv_centre[1]
        u = ct * X + sn * Y
        v = -sn * X + ct * Y
        ra, rb, rc = st.rv_endo
        dh_rv = h - st.rv_hc
        w = st.rv_wall
        in_rv_epi = (u / (ra + w)) ** 2 + (v / (rb + w)) ** 2 + (dh_rv / (rc + w)) ** 2 <= 1.0
        # epicardial fat shell around both ventricles
        fat = ((x / (ae + f)) ** 2 + (y / (be + f)) ** 2 + (dh_lv / (ce + f)) ** 2 <= 1.0) | \
              ((u / (ra + w + f)) ** 2 + (v / (rb + w + f)) ** 2 + (dh_rv / (rc + w + f)) ** 2 <= 1.0)
        out[fat & (h <= base + 2.0)] = EPI_FAT
        # above the base: valve plane, atria, aortic root
        above = h > base + 2.0
        s = st.atria_scale
        for (cx, cy), (sx, sy, sz), blood in _ATRIA:
            ch = base + 2.0 + _ATRIUM_LIFT_MM * s
            wa = _ATRIUM_WALL_MM
            q_out = ((x - cx) / (sx * s + wa)) ** 2 + ((y - cy) / (sy * s + wa)) ** 2 + \
                ((h - ch) / (sz * s + wa)) ** 2 <= 1.0
            q_in = ((x - cx) / (sx * s)) ** 2 + ((y - cy) / (sy * s)) ** 2 + ((h - ch) / (sz * s)) ** 2 <= 1.0
            out[q_out & above] = ATRIAL_WALL
            out[q_in & above] = blood
        valve = (h > base) & (h <= base + 2.0) & (
            ((x / ae) ** 2 + (y / be) ** 2 <= 1.0) | ((u / (ra + w)) ** 2 + (v / (rb + w)) ** 2 <= 1.0))
        out[valve] = VALVE
        # RV free wall and cavity
        out[in_rv_epi & below] = RV_WALL
        in_rv = (u / ra) ** 2 + (v / rb) ** 2 + (dh_rv / rc) ** 2 <= 1.0
        out[in_rv & below] = RVC
        # aortic root: a tube from the LV outflow tract, tilted away from the LA
        a0 = _AORTA_START
        ax, ay, az = _aorta_direction()
        rx, ry, rz = x - a0[0], y - a0[1], h - (base - 6.0)
        t = rx * ax + ry * ay + rz * az
        r2 = rx * rx + ry * ry + rz * rz - t * t
        tube = (t >= 0.0) & (t <= _AORTA_LENGTH_MM)
        tube &= h > base  # below the base plane the outflow tract belongs to the LV
        out[tube & (r2 <= (_AORTA_RADIUS_MM + 2.0) ** 2)] = AO_WALL
        out[tube & (r2 <= _AORTA_RADIUS_MM ** 2)] = AO
        # LV last: it overrides everything below the base plane
        a, b, c = st.lv_endo
        out[((x / ae) ** 2 + (y / be) ** 2 + (dh_lv / ce) ** 2 <= 1.0) & below] = LVM
        out[((x / a) ** 2 + (y / b) ** 2 + (dh_lv / c) ** 2 <= 1.0) & below] = LVC
        return out


# the 3-chamber plane passes through the aortic root's start and the LA centre
_AORTA_START = (-6.0, -16.0)
_AORTA_LENGTH_MM = 60.0
_AORTA_RADIUS_MM = 12.0
_LA_CENTRE = (3.0, 10.0)
# atria: (centre x, y), (semi-axes x, y, h) at ED, blood class; centre at base + 2 + lift
# (drawn in this order: the LA wall then cuts the RA, leaving an interatrial septum)
_ATRIA = (((-30.0, -4.0), (22.0, 24.0, 24.0), RA), (_LA_CENTRE, (24.0, 20.0, 26.0), LA))
_ATRIUM_LIFT_MM = 16.0
_ATRIUM_WALL_MM = 2.5


def _heart_bbox(states, *, shape_fat_mm: float = 4.0, margin_mm: float = 2.0):
    """(xmin, xmax, ymin, ymax, hmin, hmax) in the heart frame enclosing every heart class
    of every state (used to evaluate the heart only where it can be)."""
    xs, ys, hs = [], [], []
    for st in states:
        ae, be, _ = st.lv_epi
        f = shape_fat_mm
        xs += [-ae - f, ae + f]
        ys += [-be - f, be + f]
        hs += [-f, st.base + 2.0]
        ra, rb, rc = st.rv_endo
        A, B = ra + st.rv_wall + f, rb + st.rv_wall + f
        ct, sn = abs(math.cos(st.rv_angle)), abs(math.sin(st.rv_angle))
        ex, ey = math.hypot(A * ct, B * sn), math.hypot(A * sn, B * ct)
        xs += [st.rv_centre[0] - ex, st.rv_centre[0] + ex]
        ys += [st.rv_centre[1] - ey, st.rv_centre[1] + ey]
        hs += [st.rv_hc - rc - st.rv_wall - f]
        s = st.atria_scale
        for (cx, cy), (sx, sy, sz), _ in _ATRIA:
            xs += [cx - sx * s - _ATRIUM_WALL_MM, cx + sx * s + _ATRIUM_WALL_MM]
            ys += [cy - sy * s - _ATRIUM_WALL_MM, cy + sy * s + _ATRIUM_WALL_MM]
            hs += [st.base + 2.0 + _ATRIUM_LIFT_MM * s + sz * s + _ATRIUM_WALL_MM]
        d = np.array(_aorta_direction())
        r = _AORTA_RADIUS_MM + 2.0
        p0 = np.array([_AORTA_START[0], _AORTA_START[1], st.base - 6.0])
        p1 = p0 + _AORTA_LENGTH_MM * d
        xs += [min(p0[0], p1[0]) - r, max(p0[0], p1[0]) + r]
        ys += [min(p0[1], p1[1]) - r, max(p0[1], p1[1]) + r]
        hs += [p1[2] + r]
    m = margin_mm
    return min(xs) - m, max(xs) + m, min(ys) - m, max(ys) + m, min(hs) - m, max(hs) + m


def _u3() -> tuple[float, float]:
    dx, dy = _LA_CENTRE[0] - _AORTA_START[0], _LA_CENTRE[1] - _AORTA_START[1]
    n = math.hypot(dx, dy)
    return dx / n, dy / n


def _aorta_direction() -> tuple[float, float, float]:
    ux, uy = _u3()
    v = np.array([-0.35 * ux, -0.35 * uy, 1.0])
    v /= np.linalg.norm(v)
    return float(v[0]), float(v[1]), float(v[2])


# LAX planes: in-plane direction (heart frame) and a point (x, y) the plane passes through
def _lax_planes() -> dict[str, tuple[tuple[float, float], tuple[float, float]]]:
    ang2 = math.radians(80.0)
    return {"2ch": ((math.cos(ang2), math.sin(ang2)), (12.0, 0.0)),
            "3ch": (_u3(), _AORTA_START),
            "4ch": ((1.0, 0.0), (0.0, 3.0))}


# --------------------------------------------------------------------------- sampling
def _sample_planes(anat: _Anatomy, origins: np.ndarray, row_dir, col_dir, spacing, shape,
                   offsets: np.ndarray, normal, states: list[_HeartState], *, label_mode: str):
    """Render K parallel planes at every state.

    origins: [K, 3] LPS of pixel (0, 0) of each plane (already displaced for shifts);
    spacing: (between rows, between columns) mm; shape: (H, W);
    offsets: [n] positions (mm) along ``normal`` averaged over (the slice profile), the
             centre (0) included when n is odd.
    Returns images [P, K, H, W] float32 (relative intensity, before PSF and noise) and
    labels [P, K, H, W] uint8.
    """
    K = origins.shape[0]
    H, W = shape
    n = offsets.size
    base = origins[:, None, :] + offsets[None, :, None] * np.asarray(normal)[None, None, :]  # [K, n, 3]
    di = np.arange(H, dtype=np.float64)[:, None] * spacing[0] * np.asarray(col_dir)[None, :]  # [H, 3]
    dj = np.arange(W, dtype=np.float64)[:, None] * spacing[1] * np.asarray(row_dir)[None, :]  # [W, 3]

    def grid(b0, vi, vj):  # affine coordinate b0[k, n] + vi[i] + vj[j] -> [K*n*H*W] float32
        return (b0.astype(np.float32)[:, :, None, None] + vi.astype(np.float32)[None, None, :, None]
                + vj.astype(np.float32)[None, None, None, :]).reshape(-1)

    qb = base - anat.body_centre
    qx, qy, qz = (grid(qb[..., d], di[:, d], dj[:, d]) for d in range(3))
    hb = (base - anat.apex) @ anat.frame.T                                          # [K, n, 3]
    hdi, hdj = di @ anat.frame.T, dj @ anat.frame.T
    hx, hy, hh = (grid(hb[..., d], hdi[:, d], hdj[:, d]) for d in range(3))
    tex = anat.texture(base, di, dj).reshape(-1)
    static_cls, gain = anat.static(qx, qy, qz, hx, hy, hh, tex)
    del qx, qy, qz, tex
    x0, x1, y0, y1, h0, h1 = _heart_bbox(states)
    sel = np.flatnonzero((hx >= x0) & (hx <= x1) & (hy >= y0) & (hy <= y1) & (hh >= h0) & (hh <= h1))
    sx, sy, sh = hx[sel], hy[sel], hh[sel]
    del hx, hy, hh
    static_sel = static_cls[sel]
    P = len(states)
    images = np.empty((P, K, H, W), dtype=np.float32)
    labels = np.empty((P, K, H, W), dtype=np.uint8)
    centre = n // 2
    for p, st in enumerate(states):
        cls = static_cls.copy()
        hcls = anat.heart(sx, sy, sh, st)
        cls[sel] = np.where(hcls > 0, hcls, static_sel)
        inten = (_INTENSITY[cls] * gain).reshape(K, n, H, W)
        images[p] = inten.mean(axis=1)
        lab = _CLASS_TO_LABEL[cls].reshape(K, n, H, W)
        if label_mode == "centre" or n == 1:
            labels[p] = lab[:, centre]
        else:  # majority over the thickness samples; the centre plane's label wins ties
            counts = np.stack([(lab == k).sum(axis=1) for k in range(4)])     # [4, K, H, W]
            ctr = lab[:, centre]                                               # [K, H, W]
            ctr_count = np.take_along_axis(counts, ctr[None].astype(np.intp), axis=0)[0]
            labels[p] = np.where(ctr_count == counts.max(axis=0), ctr,
                                 counts.argmax(axis=0).astype(np.uint8))
    return images, labels


def _finish(images: np.ndarray, *, psf_sigma_px: float, noise: float, scale: float, rng) -> np.ndarray:
    """In place, phase by phase: PSF blur in-plane, scale, Rician noise (rng None: none).

    images: [P, K, H, W] float32 relative intensities; returns the same array, in scanner units.
    """
    sd = np.float32(noise * scale)
    for p in range(images.shape[0]):
        frame = images[p]
        if psf_sigma_px > 0:
            frame = ndimage.gaussian_filter(frame, sigma=(0, psf_sigma_px, psf_sigma_px), mode="nearest")
        frame = frame * np.float32(scale)
        if rng is not None and noise > 0:
            n1 = rng.standard_normal(frame.shape, dtype=np.float32)
            n1 *= sd
            n1 += frame
            n2 = rng.standard_normal(frame.shape, dtype=np.float32)
            n2 *= sd
            frame = np.sqrt(n1 * n1 + n2 * n2)
        images[p] = frame
    return images


def _jitter_shape(shape: HeartShape, rng, jitter: float) -> HeartShape:
    if jitter <= 0:
        return shape
    g = lambda: float(np.clip(1.0 + jitter * rng.standard_normal(), 0.7, 1.3))  # noqa: E731
    s = g()
    return dataclasses.replace(
        shape,
        lv_endo_semi_ed_mm=(shape.lv_endo_semi_ed_mm[0] * s * g() ** 0.3,
                            shape.lv_endo_semi_ed_mm[1] * s * g() ** 0.3),
        lv_wall_ed_mm=shape.lv_wall_ed_mm * g(),
        lv_radial_es_scale=float(np.clip(shape.lv_radial_es_scale * g(), 0.45, 0.95)),
        base_height_ed_mm=shape.base_height_ed_mm * g() ** 0.5,
        rv_semi_ed_mm=(shape.rv_semi_ed_mm[0] * g(), shape.rv_semi_ed_mm[1] * g() ** 0.5),
        rv_es_scale=(float(np.clip(shape.rv_es_scale[0] * g(), 0.4, 0.95)), shape.rv_es_scale[1]),
    )


def _phase_fractions(phases: int, es_fraction: float) -> np.ndarray:
    if phases == 1:
        return np.zeros(1)
    if phases == 2:
        return np.array([0.0, es_fraction])
    return np.arange(phases, dtype=np.float64) / phases


# --------------------------------------------------------------------------- entry points
def make_phantom(config: PhantomConfig | None = None, /, **overrides) -> Phantom:
    """Generate a phantom.

    Call as ``make_phantom(slices=10, phases=2, seed=0, shift_mm=2.0, ...)`` (any
    :class:`PhantomConfig` field as a keyword) or ``make_phantom(config)``; keywords
    override the config's fields. Deterministic for a given configuration.

    Defaults: 10 slices x 2 phases (ED, ES), matrix 160 x 192 (rows x cols) at 1.5 mm,
    8 mm thick slices 10 mm apart, oblique right-handed SAX orientation, truth at 1.25 mm,
    LAX planes 160 x 160 at 1.5 mm, 6 mm thick; RR 1000 ms.
    Raises UsageError for an unknown keyword or an invalid value.
    """
    cfg = config if config is not None else PhantomConfig()
    if overrides:
        names = {f.name for f in dataclasses.fields(PhantomConfig)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise UsageError(f"unknown phantom parameter(s): {', '.join(bad)}")
        cfg = dataclasses.replace(cfg, **overrides)
    t0 = time.perf_counter()
    ss = np.random.SeedSequence(cfg.seed)
    rng_tex, rng_shade, rng_shift, rng_noise, rng_lax_noise, rng_anat = (
        np.random.default_rng(s) for s in ss.spawn(6))
    shape = _jitter_shape(cfg.shape, rng_anat, cfg.anatomy_jitter)
    anat = _Anatomy(cfg, shape, rng_tex, rng_shade)

    fractions = _phase_fractions(cfg.phases, shape.es_fraction)
    cs = contraction(fractions, es_fraction=shape.es_fraction)
    states = [_heart_state(shape, float(c)) for c in cs]
    vols = [_exact_volumes(st) for st in states]
    volumes_ml = {k: np.array([v[k] for v in vols]) for k in ("LVC", "LVM", "RVC")}
    ed_phase = 0
    es_phase = int(np.argmin(volumes_ml["LVC"])) if cfg.phases > 1 else None

    # ---- SAX grid: slice centres anchored so the last slice's top edge is the ED base
    S, (H, W) = cfg.slices, cfg.matrix
    ds, dp = cfg.slice_spacing_mm, cfg.pixel_spacing_mm
    h_last = shape.base_height_ed_mm - ds / 2.0
    h_centres = h_last - ds * np.arange(S - 1, -1, -1, dtype=np.float64)     # [S], increasing
    fx, fy = cfg.fov_centre_offset_mm
    half = np.array([(W - 1) / 2.0 * dp, (H - 1) / 2.0 * dp])
    origins = np.stack([anat.heart_to_lps(fx - half[0], fy - half[1], h) for h in h_centres])
    shifts = (rng_shift.normal(scale=cfg.shift_mm, size=(S, 2)) if cfg.shift_mm > 0
              else np.zeros((S, 2)))                                          # [S, (down, right)]
    shift_lps = shifts[:, :1] * anat.ey + shifts[:, 1:] * anat.ex             # [S, 3]
    n_sub = cfg.thickness_samples
    offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * cfg.slice_thickness_mm
    sax_img, sax_lab = _sample_planes(anat, origins - shift_lps, anat.ex, anat.ey, (dp, dp), (H, W),
                                      offsets, anat.eh, states, label_mode=cfg.label_mode)
    sax_img = _finish(sax_img, psf_sigma_px=cfg.psf_sigma_px, noise=cfg.noise,
                      scale=cfg.intensity_scale, rng=rng_noise)
    trigger = fractions * cfg.rr_interval_ms
    geom = Geometry(origins=origins, row_dir=anat.ex, col_dir=anat.ey, pixel_spacing=(dp, dp),
                    slice_thickness=cfg.slice_thickness_mm)
    info = {"phantom": cfg.to_dict(), "shifts_mm": shifts.round(4).tolist(),
            "exact_volumes_ml": {k: v.round(4).tolist() for k, v in volumes_ml.items()}}
    study = Study(images=sax_img, geometry=geom, trigger_times=trigger, labels=sax_lab,
                  ed_phase=ed_phase, es_phase=es_phase, description="synthetic cine SAX phantom",
                  source=f"phantom(seed={cfg.seed})", source_format="phantom", info=info)

    # ---- HR truth: same in-plane grid, hr spacing, covering the SAX slab
    hr = cfg.hr_spacing_mm
    m = int(math.floor(ds / 2.0 / hr + 1e-9))
    h0 = h_centres[0] - m * hr
    n_hr = int(math.floor(((S - 1) * ds + 2 * m * hr) / hr + 1e-6)) + 1
    h_hr = h0 + hr * np.arange(n_hr)
    hr_origins = np.stack([anat.heart_to_lps(fx - half[0], fy - half[1], h) for h in h_hr])
    hr_img, hr_lab = _sample_planes(anat, hr_origins, anat.ex, anat.ey, (dp, dp), (H, W),
                                    np.zeros(1), anat.eh, states, label_mode="centre")
    hr_img = _finish(hr_img, psf_sigma_px=cfg.psf_sigma_px, noise=0.0,
                     scale=cfg.intensity_scale, rng=None)
    truth = Study(images=hr_img, geometry=Geometry(origins=hr_origins, row_dir=anat.ex, col_dir=anat.ey,
                                                   pixel_spacing=(dp, dp), slice_thickness=hr),
                  trigger_times=trigger.copy(), labels=hr_lab, ed_phase=ed_phase, es_phase=es_phase,
                  description="phantom high-resolution truth", source=f"phantom(seed={cfg.seed})/truth",
                  source_format="phantom", info={"hr_spacing_mm": hr})
    truth_index = (h_centres - h0) / hr

    # ---- LAX planes
    lax: dict[str, LaxPlane] = {}
    lh, lw = cfg.lax_matrix
    lsp = cfg.lax_pixel_spacing_mm
    n_lax = max(1, int(round(cfg.lax_thickness_mm / cfg.slice_thickness_mm * n_sub)) | 1)
    lax_offsets = ((np.arange(n_lax) + 0.5) / n_lax - 0.5) * cfg.lax_thickness_mm
    for name, ((ux, uy), (px, py)) in _lax_planes().items():
        row = ux * anat.ex + uy * anat.ey
        col = anat.eh.copy()
        normal = np.cross(row, col)
        centre = anat.heart_to_lps(px, py, 60.0)
        origin = centre - (lw - 1) / 2.0 * lsp * row - (lh - 1) / 2.0 * lsp * col
        img, lab = _sample_planes(anat, origin[None], row, col, (lsp, lsp), (lh, lw), lax_offsets,
                                  normal, states, label_mode="centre")
        img = _finish(img, psf_sigma_px=cfg.psf_sigma_px, noise=cfg.noise,
                      scale=cfg.intensity_scale, rng=rng_lax_noise)
        lax[name] = LaxPlane(images=img[:, 0], labels=lab[:, 0],
                             geometry=Geometry(origins=origin[None], row_dir=row, col_dir=col,
                                               pixel_spacing=(lsp, lsp),
                                               slice_thickness=cfg.lax_thickness_mm))
    ph = Phantom(study=study, truth=truth, lax=lax, volumes_ml=volumes_ml, config=cfg,
                 shifts_mm=shifts, truth_slice_index=truth_index, phase_fractions=fractions)
    log.debug("phantom %d slices x %d phases generated in %.2f s", S, cfg.phases,
              time.perf_counter() - t0)
    return ph


def _phase_interval_ms(ph: Phantom) -> float:
    t = ph.study.trigger_times
    return float(t[1] - t[0]) if t.size > 1 else float(ph.config.rr_interval_ms)


def write_phantom(phantom: Phantom, out_dir: str | Path, *, preview: bool = False) -> dict[str, str]:
    """Write a phantom as NIfTI + JSON; returns {key: path} of every file written.

    Files (4D images are x, y, z, t; the time spacing is the phase interval in ms):

    - ``sax.nii.gz`` (float32) and ``sax_gt.nii.gz`` (uint8 labels): the SAX cine;
    - ``truth/hr_image.nii.gz`` (int16, the noiseless truth rounded to whole scanner
      units) and ``truth/hr_labels.nii.gz`` (uint8): the HR truth (4D);
    - ``lax/{2ch,3ch,4ch}.nii.gz`` and ``lax/{view}_gt.nii.gz``: the LAX planes (4D, z = 1,
      z spacing = the plane's thickness);
    - ``phantom.json``: configuration, seed, ED/ES phase, trigger times, exact volumes and
      measures, shifts, geometry, LAX plane geometry, file list;
    - with ``preview=True``, ``preview.png`` (see :func:`save_phantom_preview`), when
      matplotlib (the ``report`` extra) is installed; else a warning says so.
    """
    import SimpleITK as sitk

    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    (out / "lax").mkdir(parents=True, exist_ok=True)
    st, tr = phantom.study, phantom.truth
    dt = _phase_interval_ms(phantom)
    files: dict[str, str] = {}

    def write(key: str, rel: str, img) -> None:
        path = out / rel
        sitk.WriteImage(img, str(path), True)
        files[key] = str(path)

    sp = st.geometry.slice_spacing if st.n_slices > 1 else phantom.config.slice_spacing_mm
    write("sax", "sax.nii.gz", volume_to_sitk(st.images, st.geometry, slice_spacing=sp, dt_ms=dt))
    write("sax_gt", "sax_gt.nii.gz", volume_to_sitk(st.labels, st.geometry, slice_spacing=sp, dt_ms=dt))
    hsp = phantom.config.hr_spacing_mm
    # the noiseless truth is stored as int16 (rounded scanner units: 4x smaller, 3x faster)
    hr_int = np.rint(np.clip(tr.images, -32768, 32767)).astype(np.int16)
    write("hr_image", "truth/hr_image.nii.gz", volume_to_sitk(hr_int, tr.geometry, slice_spacing=hsp, dt_ms=dt))
    del hr_int
    write("hr_labels", "truth/hr_labels.nii.gz", volume_to_sitk(tr.labels, tr.geometry, slice_spacing=hsp, dt_ms=dt))
    for name, plane in phantom.lax.items():
        th = plane.geometry.slice_thickness
        write(f"lax_{name}", f"lax/{name}.nii.gz",
              volume_to_sitk(plane.images[:, None], plane.geometry, slice_spacing=th, dt_ms=dt))
        write(f"lax_{name}_gt", f"lax/{name}_gt.nii.gz",
              volume_to_sitk(plane.labels[:, None], plane.geometry, slice_spacing=th, dt_ms=dt))
    if preview:
        from deeprecon.runtime.qc import check_drawing

        try:
            check_drawing()
        except UnavailableError as e:
            log.warning("no preview.png: %s (pip install 'deeprecon-rt[report]'); the "
                        "phantom itself is complete", e.message)
        else:
            path = out / "preview.png"
            save_phantom_preview(phantom, path)
            files["preview"] = str(path)
    json_path = out / "phantom.json"
    files["json"] = str(json_path)
    json_path.write_text(json.dumps(phantom_manifest(phantom, files, root=out), indent=2))
    log.info("phantom written to %s (%d files)", out, len(files))
    return files


def _geom_dict(g: Geometry) -> dict[str, Any]:
    return {"origin_first_slice_lps_mm": g.origins[0].round(6).tolist(),
            "row_dir": g.row_dir.round(9).tolist(), "col_dir": g.col_dir.round(9).tolist(),
            "normal": g.normal.round(9).tolist(), "pixel_spacing_mm": list(g.pixel_spacing),
            "slice_spacing_mm": None if g.n_slices < 2 else round(g.slice_spacing, 9),
            "slice_thickness_mm": g.slice_thickness, "slices": g.n_slices,
            "orientation": g.orientation_label()}


def phantom_manifest(phantom: Phantom, files: dict[str, str] | None = None, *,
                     root: Path | None = None) -> dict[str, Any]:
    """The JSON-serialisable description written as phantom.json."""
    cfg = phantom.config
    st = phantom.study
    rel = {}
    for k, v in (files or {}).items():
        p = Path(v)
        rel[k] = str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else str(p)
    return {
        "format": PHANTOM_FORMAT,
        "version": PHANTOM_VERSION,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "label_convention": {str(k): v for k, v in LABELS.items()},
        "phases": st.n_phases,
        "slices": st.n_slices,
        "ed_phase": st.ed_phase,
        "es_phase": st.es_phase,
        "trigger_times_ms": st.trigger_times.round(6).tolist(),
        "phase_interval_ms": _phase_interval_ms(phantom),
        "phase_fractions_of_rr": phantom.phase_fractions.round(6).tolist(),
        "time_unit": "ms",
        "dtypes": {"sax": "float32", "sax_gt": "uint8", "hr_image": "int16 (rounded)",
                   "hr_labels": "uint8", "lax": "float32", "lax_gt": "uint8"},
        "exact_volumes_ml": {k: v.round(6).tolist() for k, v in phantom.volumes_ml.items()},
        "exact_measures": {k: round(v, 6) for k, v in phantom.exact_measures().items()},
        "sax_labels": f"{cfg.label_mode} plane of each slice",
        "slice_order": "slice 0 is the most apical; slices increase along row_dir x col_dir (towards the base)",
        "shifts_mm": {"order": "(along col_dir = image down, along row_dir = image right)",
                      "values": phantom.shifts_mm.round(6).tolist()},
        "sax_geometry": _geom_dict(st.geometry),
        "truth_geometry": _geom_dict(phantom.truth.geometry),
        "truth_slice_index_of_sax_slices": phantom.truth_slice_index.round(6).tolist(),
        "lax": {name: _geom_dict(p.geometry) for name, p in phantom.lax.items()},
        "files": rel,
    }


def save_phantom_preview(phantom: Phantom, path: str | Path, *, n_slices: int = 6,
                         lax_view: str = "4ch", dpi: int = 80) -> Path:
    """Write a PNG montage: ~``n_slices`` SAX slices at ED and ES with label contours, and
    the ``lax_view`` plane at ED and ES (see :func:`deeprecon.runtime.qc.save_montage`)."""
    from deeprecon.runtime.qc import PlaneView, save_montage

    st = phantom.study
    phases = [st.ed_phase] if st.es_phase is None else [st.ed_phase, st.es_phase]
    plane = phantom.lax[lax_view]
    cfg = phantom.config
    title = (f"deeprecon-rt phantom: seed {cfg.seed}, {st.n_slices} slices x {st.n_phases} phases, "
             f"{cfg.slice_thickness_mm:g} mm slices every {cfg.slice_spacing_mm:g} mm, "
             f"shift sd {cfg.shift_mm:g} mm")
    return save_montage(path, st.images, st.labels, phases=phases,
                        phase_names=[st.phase_name(p) for p in phases], n_slices=n_slices,
                        pixel_spacing=st.geometry.pixel_spacing,
                        lax=PlaneView(plane.images, plane.labels, f"{lax_view} (long axis)",
                                      plane.geometry.pixel_spacing),
                        title=title, dpi=dpi)
