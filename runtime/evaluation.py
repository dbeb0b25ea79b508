"""Evaluation of the 3D reconstruction (EVALUATION.md E2): baseline through-plane
interpolators, resampling of a label volume onto any plane (a removed slice, a truth
plane, a long-axis view), and image metrics inside a region of interest.

Development tooling, like :mod:`.metrics` and :mod:`.phantom` beside it: the pipeline
never imports it. numpy and scipy only; the morphological contour interpolation needs ITK
(``pip install 'deeprecon-rt[eval]'``), imported when that baseline runs.

Stacks and the high-resolution layout
-------------------------------------
A *stack* is [S, H, W]: S parallel slices on one in-plane grid (a native SAX stack,
whose slices differ only in their position along the normal). Interpolating it by a
factor N gives [(S - 1) N + 1, H, W] slices at fractional slice index k / N, k = 0 ..
(S - 1) N: the layout of the pipeline's high-resolution volume
(:func:`~.pipeline.interpolate_codes`), placed by :func:`~.pipeline.hr_geometry` of the
stack's geometry. The baselines, with f = k / N - i the fraction between slices i, i + 1:

- :func:`nearest_slices`: the nearest slice; a tie (f = 1/2) goes to the lower, more
  apical slice i.
- :func:`linear_slices`: (1 - f) x_i + f x_{i+1} of images (segmented by the caller).
- :func:`sdf_slices`: shape-based interpolation (Raya & Udupa 1990): per structure the
  in-plane signed distance map of each slice (mm; negative inside, positive outside,
  +-1 pixel at the first pixel centres across the border, so that thresholding at 0
  returns the slice's own mask), interpolated linearly; a pixel takes the structure with
  the most negative interpolated distance, if negative, else background. A structure
  present in one neighbour only shrinks linearly onto its deepest point (the empty side's
  map is the present side's shifted up by its depth, reaching 0 at that point), as the
  morphological contour interpolation does with a labelled empty neighbour.
- :func:`mci_slices`: ITK's morphological contour interpolation (Albu et al. 2008;
  Zukic et al., Insight Journal 2016) along the slice axis, between the known slices only
  (custom slice positions: a known slice that lacks a structure counts as known-empty).

Plane sampling
--------------
:func:`sample_labels` evaluates a label volume [S, H, W] placed by a :class:`Geometry`
at any LPS points: their continuous (slice, row, column) index (the slice index by linear
interpolation of the slices' positions along the normal, so any gaps; the in-plane index
from the slice origin interpolated between the two slices around the point, so per-slice
in-plane offsets such as a heart-centred crop are honoured), the one-hot encoding
interpolated trilinearly and argmax (ties to the lower label; the project's rule for
labels, never nearest neighbour unless asked). A point is *inside* when it lies between
the first and the last slice centre (+- ``tol_mm``) and within half a pixel of the
in-plane grid; outside points are background and flagged. The volume does not extend
beyond its end slices: a high-resolution volume spans the first to the last native
centre.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from deeprecon.runtime.errors import UnavailableError, UsageError
from deeprecon.runtime.metrics import dice
from deeprecon.runtime.preprocess import ModelGridTransform
from deeprecon.runtime.study import LABELS, Geometry, Study

STRUCTURES = (1, 2, 3)
#: Gaussian SSIM window (Wang et al. 2004): sigma 1.5 px, truncated at 3.5 sigma (11 x 11)
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K = (0.01, 0.03)


# --------------------------------------------------------------------------- geometry
def plane_points(geometry: Geometry, shape: tuple[int, int]) -> np.ndarray:
    """LPS centres of every pixel of every slice: [S, H, W, 3] float64 for slices of
    ``shape`` = (H rows, W columns) placed by ``geometry``."""
    H, W = int(shape[0]), int(shape[1])
    dr, dc = geometry.pixel_spacing
    di = np.arange(H, dtype=np.float64)[:, None] * dr * geometry.col_dir[None, :]      # [H, 3]
    dj = np.arange(W, dtype=np.float64)[:, None] * dc * geometry.row_dir[None, :]      # [W, 3]
    return (geometry.origins[:, None, None, :] + di[None, :, None, :]
            + dj[None, None, :, :])                                                     # [S, H, W, 3]


def volume_coordinates(geometry: Geometry, shape: tuple[int, int], points: np.ndarray, *,
                       tol_mm: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (slice, row, column) indices of LPS ``points`` [..., 3] in a stack of
    ``geometry``'s slices of ``shape`` (see the module docstring).

    Returns (coords [3, ...] float64, inside [...] bool)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape[-1] != 3:
        raise ValueError(f"points must be [..., 3], got {pts.shape}")
    S = geometry.n_slices
    H, W = int(shape[0]), int(shape[1])
    normal = geometry.normal
    pos = geometry.positions                                                           # [S]
    if S > 1 and not np.all(np.diff(pos) > 0):
        raise UsageError("the volume's slices must be sorted along the normal, without repeats")
    d = pts @ normal
    inside = (d >= pos[0] - tol_mm) & (d <= pos[-1] + tol_mm)
    if S == 1:
        s = np.zeros(d.shape)
        origin = np.broadcast_to(geometry.origins[0], pts.shape)
    else:
        s = np.interp(d, pos, np.arange(S, dtype=np.float64))
        lo = np.clip(np.floor(s).astype(np.intp), 0, S - 2)
        f = (s - lo)[..., None]
        origin = (1.0 - f) * geometry.origins[lo] + f * geometry.origins[lo + 1]
    rel = pts - origin
    dr, dc = geometry.pixel_spacing
    i = rel @ geometry.col_dir / dr
    j = rel @ geometry.row_dir / dc
    inside &= (i >= -0.5) & (i <= H - 0.5) & (j >= -0.5) & (j <= W - 0.5)
    return np.stack([s, i, j]), inside


def sample_labels(volume: np.ndarray, geometry: Geometry, points: np.ndarray, *,
                  n_classes: int | None = None, order: int = 1, tol_mm: float = 1e-3
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A label volume evaluated at LPS points.

    volume:   [S, H, W] integer labels, placed by ``geometry`` (S slices);
    points:   [..., 3] LPS mm;
    order:    1 (one-hot, trilinear, argmax; default) or 0 (nearest voxel);
    n_classes: classes of the one-hot encoding (default max(4, volume.max() + 1)).
    Returns (labels [...] uint8, background outside the volume; inside [...] bool).
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or vol.shape[0] != geometry.n_slices:
        raise ValueError(f"volume must be [{geometry.n_slices}, H, W], got {vol.shape}")
    if not np.issubdtype(vol.dtype, np.integer):
        raise UsageError(f"labels must be an integer array, got {vol.dtype}")
    coords, inside = volume_coordinates(geometry, vol.shape[1:], points, tol_mm=tol_mm)
    flat = coords.reshape(3, -1)
    n = max(len(LABELS), int(vol.max()) + 1) if n_classes is None else int(n_classes)
    if order == 0:
        out = ndimage.map_coordinates(vol.astype(np.float32), flat, order=0, mode="nearest")
        out = out.astype(np.uint8)
    elif order == 1:
        best = arg = None
        for k in range(n):
            score = ndimage.map_coordinates((vol == k).astype(np.float32), flat, order=1,
                                            mode="nearest")
            if best is None:
                best, arg = score, np.zeros(score.shape, np.uint8)
            else:
                upd = score > best
                best = np.where(upd, score, best)
                arg[upd] = k
        out = arg
    else:
        raise UsageError(f"order must be 0 or 1, got {order}")
    out = out.reshape(inside.shape)
    out[~inside] = 0
    return out, inside


def resample_labels(volume: np.ndarray, geometry: Geometry, target: Geometry,
                    target_shape: tuple[int, int], **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_labels` at every pixel centre of ``target``'s planes of
    ``target_shape``: ([S', H', W'] uint8, inside [S', H', W'] bool), plane by plane."""
    labs, ins = [], []
    for k in range(target.n_slices):
        pts = plane_points(target.subset([k]), target_shape)[0]
        lab, inside = sample_labels(volume, geometry, pts, **kw)
        labs.append(lab)
        ins.append(inside)
    return np.stack(labs), np.stack(ins)


def plane_transform(transform: ModelGridTransform, native: Geometry, model: Geometry, *,
                    tol_mm: float = 0.05) -> ModelGridTransform:
    """The native <-> model transform of other planes, with ``transform``'s model grid,
    intensity mapping and options.

    native: the native geometry of K planes (the study's rows and columns, e.g. the
            slices removed from the input);
    model:  K model-grid planes, each in the plane of its native one (e.g. planes of the
            high-resolution volume's geometry), pixel spacing ``transform.spacing_mm``.
    Its ``to_model`` / ``labels_to_model`` put a native slice onto exactly the model-grid
    pixels of its plane; ``labels_to_native`` brings them back. Raises UsageError when a
    plane pair is more than ``tol_mm`` apart along the normal, or when the intensity
    parameters are per slice (they do not carry over to other planes).
    """
    if native.n_slices != model.n_slices:
        raise UsageError(f"{native.n_slices} native planes but {model.n_slices} model planes")
    if not np.allclose(model.pixel_spacing, transform.spacing_mm, rtol=1e-6):
        raise UsageError(f"model planes of {model.pixel_spacing} mm, the transform's grid is "
                         f"{transform.spacing_mm} mm")
    if np.asarray(transform.intensity_low).shape[1] != 1:
        raise UsageError("per-slice intensity parameters do not carry over to other planes")
    d = model.origins - native.origins                                                 # [K, 3]
    off = np.abs(d @ native.normal)
    if off.max() > tol_mm:
        raise UsageError(f"model plane {int(off.argmax())} lies {off.max():.3f} mm off its "
                         f"native plane (tolerance {tol_mm} mm)")
    dr, dc = native.pixel_spacing
    rows = d @ native.col_dir / dr
    cols = d @ native.row_dir / dc
    steps = np.asarray([transform.spacing_mm / dr, transform.spacing_mm / dc])
    centres = np.stack([rows, cols], axis=1) + transform.centre_index * steps
    return dataclasses.replace(transform, centres=centres, native_spacing=native.pixel_spacing,
                               centre_source="plane", label_coverage=None)


# --------------------------------------------------------------------------- baselines
def _fractions(S: int, interp: int) -> tuple[np.ndarray, np.ndarray]:
    """For the (S - 1) * interp + 1 output slices: lower slice index [n] and fraction [n]."""
    if S < 1 or interp < 1:
        raise UsageError(f"need S >= 1 slices and interp >= 1, got {S}, {interp}")
    k = np.arange((S - 1) * interp + 1)
    lo = np.minimum(k // interp, max(S - 2, 0))
    f = k / interp - lo
    return lo, f


def nearest_slices(stack: np.ndarray, interp: int) -> np.ndarray:
    """[S, ...] -> [(S - 1) * interp + 1, ...]: the nearest slice (ties to the lower)."""
    stack = np.asarray(stack)
    if stack.shape[0] == 1:
        return stack.copy()
    lo, f = _fractions(stack.shape[0], interp)
    return stack[np.where(f <= 0.5, lo, lo + 1)]


def linear_slices(stack: np.ndarray, interp: int) -> np.ndarray:
    """[S, ...] images -> [(S - 1) * interp + 1, ...] float32, linear along the slice axis."""
    stack = np.asarray(stack, dtype=np.float64)
    if stack.shape[0] == 1:
        return stack.astype(np.float32)
    lo, f = _fractions(stack.shape[0], interp)
    f = f.reshape((-1,) + (1,) * (stack.ndim - 1))
    return ((1.0 - f) * stack[lo] + f * stack[lo + 1]).astype(np.float32)


def signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """In-plane signed distance map (mm) of a non-empty 2D mask: outside, the distance to
    the nearest mask pixel centre (> 0); inside, minus the distance to the nearest outside
    pixel centre (< 0). A mask covering the whole image is -inf inside."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or not m.any():
        raise ValueError("signed_distance needs a non-empty 2D mask")
    sp = tuple(float(s) for s in spacing)
    if m.all():
        return np.full(m.shape, -np.inf)
    return (ndimage.distance_transform_edt(~m, sampling=sp)
            - ndimage.distance_transform_edt(m, sampling=sp))


def sdf_slices(labels: np.ndarray, interp: int, *, spacing: Sequence[float],
               structures: Sequence[int] = STRUCTURES) -> np.ndarray:
    """Shape-based (signed distance) interpolation of a label stack (module docstring).

    labels: [S, H, W] integer; spacing: (row, column) pixel spacing in mm.
    Returns [(S - 1) * interp + 1, H, W] uint8; the input slices are reproduced exactly.
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be [S, H, W], got {lab.shape}")
    S, H, W = lab.shape
    if S == 1:
        return lab.astype(np.uint8)
    lo, f = _fractions(S, interp)
    # per structure and slice: its signed distance map, or None where absent
    maps = [[signed_distance(lab[s] == c, spacing) if (lab[s] == c).any() else None
             for s in range(S)] for c in structures]
    out = np.zeros((lo.size, H, W), np.uint8)
    for k in range(lo.size):
        i, t = int(lo[k]), float(f[k])
        if t == 0.0 or t == 1.0:
            out[k] = lab[i if t == 0.0 else i + 1]
            continue
        d = np.full((len(structures), H, W), np.inf)
        for n, per in enumerate(maps):
            a, b = per[i], per[i + 1]
            if a is None and b is None:
                continue
            if a is None:      # shrink b onto its deepest point
                a = b - b[np.isfinite(b)].min() if np.isfinite(b).any() else b
            elif b is None:
                b = a - a[np.isfinite(a)].min() if np.isfinite(a).any() else a
            with np.errstate(invalid="ignore"):
                d[n] = (1.0 - t) * a + t * b
        d = np.where(np.isnan(d), np.inf, d)
        best = d.argmin(axis=0)
        inside = np.take_along_axis(d, best[None], axis=0)[0] < 0
        out[k] = np.where(inside, np.asarray(structures, np.uint8)[best], 0)
    return out


def mci_available() -> tuple[bool, str]:
    """(True, version) when ITK's morphological contour interpolation can be imported,
    else (False, why)."""
    try:
        import itk  # noqa: F401
        itk.MorphologicalContourInterpolator  # noqa: B018 (loads the module)
    except (ImportError, AttributeError) as exc:
        return False, (f"ITK morphological contour interpolation unavailable ({exc}); "
                       "pip install 'deeprecon-rt[eval]'")
    from importlib.metadata import PackageNotFoundError, version
    try:
        return True, "itk-morphologicalcontourinterpolation " + version(
            "itk-morphologicalcontourinterpolation")
    except PackageNotFoundError:  # pragma: no cover - built from source
        return True, "itk " + itk.Version.GetITKVersion()


def mci_slices(labels: np.ndarray, interp: int, *,
               structures: Sequence[int] = STRUCTURES) -> np.ndarray:
    """ITK morphological contour interpolation of a label stack along the slice axis.

    labels: [S, H, W] integer (values < 256). The output [(S - 1) * interp + 1, H, W]
    uint8 has the input slices at every interp-th position and ITK's interpolation
    between them (nothing beyond the end slices: it does not extrapolate).
    Runs on one thread: it sets ITK's process-wide default thread count to 1 (with
    several threads, itk-morphologicalcontourinterpolation 2.1.2 on ITK 5.4.7 corrupted
    the heap in 21 of 48 test runs: glibc aborted the process at exit; none of 24 on one).
    Raises UnavailableError without ITK (the ``eval`` extra).
    """
    ok, why = mci_available()
    if not ok:
        raise UnavailableError(why)
    import itk

    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be [S, H, W], got {lab.shape}")
    S, H, W = lab.shape
    if S == 1 or interp == 1:
        return lab.astype(np.uint8)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    vol = np.zeros(((S - 1) * interp + 1, H, W), np.uint8)
    known = [int(s * interp) for s in range(S)]
    vol[known] = lab
    img = itk.image_from_array(vol)               # array (z, y, x) -> ITK index (x, y, z)
    filt = itk.MorphologicalContourInterpolator.New(img)
    filt.SetAxis(2)
    filt.SetUseCustomSlicePositions(True)
    for c in structures:
        filt.SetLabeledSliceIndices(2, int(c), known)
    filt.SetNumberOfWorkUnits(1)
    filt.Update()
    return np.ascontiguousarray(itk.array_from_image(filt.GetOutput())).astype(np.uint8)


# --------------------------------------------------------------------------- metrics
def structure_dice(pred: np.ndarray, ref: np.ndarray, *, mask: np.ndarray | None = None,
                   structures: Sequence[int] = STRUCTURES) -> dict[str, float]:
    """Dice per structure ({"LVC": ..., ...}) of two label arrays of one shape, counted
    over the pixels of ``mask`` only when given (NaN where absent from both)."""
    p, r = np.asarray(pred), np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"shapes differ: {p.shape} vs {r.shape}")
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        p, r = p[m], r[m]
    return {LABELS.get(int(c), f"label{int(c)}"): dice(p, r, int(c)) for c in structures}


def roi_psnr(x: np.ndarray, y: np.ndarray, roi: np.ndarray, *, data_range: float) -> np.ndarray:
    """PSNR (dB) per image of [N, H, W] arrays over the ROI's pixels only:
    10 log10(range^2 / mean over the ROI of (x - y)^2); NaN for an empty ROI."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = np.asarray(roi, dtype=bool)
    if x.shape != y.shape or x.shape != m.shape or x.ndim != 3:
        raise ValueError(f"x, y, roi must be [N, H, W] alike: {x.shape}, {y.shape}, {m.shape}")
    n = m.reshape(len(m), -1).sum(1)
    se = (np.square(x - y) * m).reshape(len(m), -1).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = se / n
        out = 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-20))
    return np.where(n > 0, out, np.nan)


def ssim_map(x: np.ndarray, y: np.ndarray, *, data_range: float, sigma: float = SSIM_SIGMA,
             truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """SSIM map (Wang et al. 2004) of each pair of 2D images [N, H, W]: Gaussian-weighted
    local means, variances and covariance (no sample correction, borders reflected),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = ``data_range``. Returns [N, H, W] float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(f"x, y must be [N, H, W] alike: {x.shape}, {y.shape}")
    g = lambda a: ndimage.gaussian_filter(a, sigma=(0, sigma, sigma), truncate=truncate,  # noqa: E731
                                          mode="reflect")
    mx, my = g(x), g(y)
    vx = g(x * x) - mx * mx
    vy = g(y * y) - my * my
    cxy = g(x * y) - mx * my
    c1, c2 = (SSIM_K[0] * data_range) ** 2, (SSIM_K[1] * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def roi_ssim(x: np.ndarray, y: np.ndarray, roi: np.ndarray, *, data_range: float) -> np.ndarray:
    """Mean of the :func:`ssim_map` over each image's ROI pixels, [N]; NaN for an empty ROI."""
    m = np.asarray(roi, dtype=bool)
    s = ssim_map(x, y, data_range=data_range)
    if m.shape != s.shape:
        raise ValueError(f"roi must be {s.shape}, got {m.shape}")
    n = m.reshape(len(m), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (s * m).reshape(len(m), -1).sum(1) / n
    return np.where(n > 0, out, np.nan)


def mean_sd(values: Iterable[Any]) -> dict[str, Any]:
    """{"mean", "sd" (ddof 1), "n" (values that are not None/NaN), "n_infinite"}: the
    mean and sd of the finite values; None where there are too few."""
    v = np.array([float(x) for x in values if x is not None and not math.isnan(float(x))],
                 dtype=np.float64)
    fin = v[np.isfinite(v)]
    return {"mean": float(fin.mean()) if fin.size else None,
            "sd": float(fin.std(ddof=1)) if fin.size > 1 else None,
            "n": int(v.size), "n_infinite": int(v.size - fin.size)}


# --------------------------------------------------------------------------- inputs
def drop_every_other(study: Study) -> tuple[Study, np.ndarray, np.ndarray]:
    """The slice-drop split: (the study with slices 0, 2, 4, ... only, kept indices [K],
    removed indices [R]: the odd slices with a kept neighbour on both sides). With an even
    number of slices the last one is neither kept nor evaluated (it could only be
    extrapolated). Needs at least 3 slices."""
    S = study.n_slices
    if S < 3:
        raise UsageError(f"slice drop needs at least 3 slices, the study has {S}")
    kept = np.arange(0, S, 2)
    removed = np.arange(1, kept[-1], 2)
    sub = Study(images=study.images[:, kept], geometry=study.geometry.subset(kept),
                trigger_times=study.trigger_times.copy(),
                labels=None if study.labels is None else study.labels[:, kept],
                phase_ids=list(study.phase_ids), ed_phase=study.ed_phase,
                es_phase=study.es_phase, series_uid=study.series_uid,
                description=f"{study.description} (every other slice)", source=study.source,
                source_format=study.source_format, info=dict(study.info),
                warnings=list(study.warnings),
                image_refs=None if study.image_refs is None
                else [[r[s] for s in kept] for r in study.image_refs])
    return sub, kept, removed


def find_sax_lax_pairs(folder) -> list[dict[str, Any]]:
    """SAX + LAX pairs with labels in the M&Ms-2 layout under ``folder`` (searched
    recursively): ``NNN_SA_{ED,ES}.nii.gz`` beside ``NNN_LA_{ED,ES}.nii.gz``, each with
    its ``_gt`` file. Returns [{"id", "phase", "sa", "la"}] sorted by id and phase."""
    import re
    from pathlib import Path

    pat = re.compile(r"^(?P<id>.+)_SA_(?P<ph>ED|ES)\.nii(\.gz)?$")
    out = []
    for sa in sorted(Path(folder).rglob("*_SA_*.nii*")):
        m = pat.match(sa.name)
        if not m:
            continue
        ext = sa.name[sa.name.index(".nii"):]
        la = sa.with_name(f"{m['id']}_LA_{m['ph']}{ext}")
        gts = [p.with_name(p.name.replace(ext, "_gt" + ext)) for p in (sa, la)]
        if la.is_file() and all(g.is_file() for g in gts):
            out.append({"id": m["id"], "phase": m["ph"], "sa": str(sa), "la": str(la)})
    return sorted(out, key=lambda d: (d["id"], d["phase"]))


def load_lax_plane(path) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """A labelled long-axis plane (a NIfTI of one slice, its ``_gt`` beside it, labels in
    the project convention: 1 LV, 2 MYO, 3 RV, as M&Ms-2 writes them): (images [P, H, W]
    float32, labels [P, H, W] uint8, geometry of the plane from the header)."""
    from deeprecon.runtime.io.nifti import load_nifti

    st = load_nifti(path, label_convention="project")
    if st.n_slices != 1:
        raise UsageError(f"{path}: {st.n_slices} slices; a long-axis plane has one")
    if st.labels is None:
        raise UsageError(f"{path}: no label file beside it (expected _gt)")
    return st.images[:, 0], st.labels[:, 0], st.geometry


__all__ = ["STRUCTURES", "plane_points", "volume_coordinates", "sample_labels",
           "resample_labels", "plane_transform", "nearest_slices", "linear_slices",
           "signed_distance", "sdf_slices", "mci_available", "mci_slices", "structure_dice",
           "roi_psnr", "ssim_map", "roi_ssim", "mean_sd", "drop_every_other",
           "find_sax_lax_pairs", "load_lax_plane"]
