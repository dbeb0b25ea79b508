"""Quality-control pictures: SAX slice montages with label contours, plus long-axis planes;
long-axis-like cuts through SAX stacks (:func:`save_long_axis_cuts`) and volume curves over
the cardiac cycle (:func:`save_volume_curves`).

Used for the phantom's preview and for the pipeline's QC pictures (see
:mod:`deeprecon.runtime.outputs.pictures`). Rendering uses matplotlib's Agg backend only
(no display, no network). matplotlib and Pillow are the ``report`` extra: the module
imports without them, and :func:`check_drawing` says what is missing.

Label colours follow the Okabe-Ito colour-blind-safe palette: LV cavity vermillion
(#D55E00), LV myocardium bluish green (#009E73), RV cavity sky blue (#56B4E9).
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from deeprecon.runtime.errors import UnavailableError
from deeprecon.runtime.study import LABELS, Study

log = logging.getLogger(__name__)

LABEL_COLOURS: dict[int, str] = {1: "#D55E00", 2: "#009E73", 3: "#56B4E9"}
# contours are drawn in this order, so the cavity outlines lie on top of the myocardium's
_DRAW_ORDER = (2, 3, 1)


#: what drawing imports: module -> distribution
_DRAWING = {"matplotlib": "matplotlib", "PIL": "Pillow"}


def check_drawing() -> None:
    """Raise UnavailableError (exit 69) naming the ``report`` extra when matplotlib or
    Pillow cannot be imported here; return when pictures can be drawn."""
    missing = []
    for module, dist in _DRAWING.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing:
        one = len(missing) == 1
        raise UnavailableError(
            f"{' and '.join(missing)} {'is' if one else 'are'} not installed, and the "
            f"pictures need {'it' if one else 'them'}", hint="pip install 'deeprecon-rt[report]'")


class PlaneView(NamedTuple):
    """An extra plane to show beside the SAX montage (e.g. a long-axis view).

    images: [P, h, w] (one per montage phase, or the same for all) or [h, w], any float;
    labels: same shape, uint8 project labels, or None;
    name:   the panel title;
    pixel_spacing: (between rows, between columns) in mm, for the aspect ratio.
    """

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    pixel_spacing: tuple[float, float] = (1.0, 1.0)


def pick_slices(labels: np.ndarray | None, n_slices: int, *, phases: Sequence[int],
                n_total: int) -> list[int]:
    """Up to ``n_slices`` slice indices spread evenly over the slices that hold labels at
    any of ``phases`` (over all ``n_total`` slices when there are no labels)."""
    if labels is not None:
        has = np.flatnonzero(np.any(labels[list(phases)] > 0, axis=(0, 2, 3)))
    else:
        has = np.arange(n_total)
    if has.size == 0:
        has = np.arange(n_total)
    if has.size <= n_slices:
        return [int(s) for s in has]
    pick = np.round(np.linspace(0, has.size - 1, n_slices)).astype(int)
    return [int(has[i]) for i in pick]


def crop_box(labels: np.ndarray | None, shape: tuple[int, int], margin: int | None):
    """(r0, r1, c0, c1) around the labels of a [..., H, W] array, or the full image."""
    H, W = shape
    if margin is None or labels is None or not np.any(labels):
        return 0, H, 0, W
    any_lab = np.any(labels.reshape(-1, H, W) > 0, axis=0)
    rows = np.flatnonzero(any_lab.any(axis=1))
    cols = np.flatnonzero(any_lab.any(axis=0))
    return (max(0, rows[0] - margin), min(H, rows[-1] + 1 + margin),
            max(0, cols[0] - margin), min(W, cols[-1] + 1 + margin))


def image_window(images: np.ndarray) -> tuple[float, float]:
    """Grey window (vmin, vmax) of an image array: its 1st and 99.5th percentiles."""
    finite = images[np.isfinite(images)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, (1.0, 99.5))
    return float(lo), float(hi if hi > lo else lo + 1.0)


def draw_labels(ax, img, lab, *, vmin, vmax, aspect, box, linewidth):
    """One panel: ``img`` [H, W] in grey inside ``box`` (r0, r1, c0, c1), the outline of
    each structure of ``lab`` (None: none) in its LABEL_COLOURS colour, no ticks."""
    r0, r1, c0, c1 = box
    ax.imshow(img[r0:r1, c0:c1], cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect,
              interpolation="nearest")
    if lab is not None:
        sub = lab[r0:r1, c0:c1]
        for k in _DRAW_ORDER:
            colour = LABEL_COLOURS[k]
            mask = sub == k
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour],
                           linewidths=linewidth)
    ax.set_xticks([])
    ax.set_yticks([])


def save_montage(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None, *,
                 phases: Sequence[int] | None = None, phase_names: Sequence[str] | None = None,
                 slices: Sequence[int] | None = None, n_slices: int = 6,
                 pixel_spacing: tuple[float, float] = (1.0, 1.0), lax: PlaneView | None = None,
                 title: str | None = None, crop_margin_px: int | None = 30, dpi: int = 80,
                 panel_inches: float = 1.7, linewidth: float = 0.9,
                 palette_colours: int | None = 128) -> Path:
    """Write a PNG: one row per phase, ``n_slices`` SAX slices with label contours, and
    optionally one long-axis plane per row at the right.

    images: [P, S, H, W] float (any intensity scale; windowed at the 1st-99.5th percentile);
    labels: [P, S, H, W] uint8 project labels (1 LVC, 2 LVM, 3 RVC) or None;
    phases: phase indices to show as rows (default: 0, and the phase of smallest LV
            cavity when labels exist); phase_names: the row titles;
    slices: slice indices to show (default: :func:`pick_slices`);
    pixel_spacing: (between rows, between columns) mm, for the aspect ratio;
    lax:    a :class:`PlaneView`; with [P, h, w] images, frame ``phases[r]`` goes in row r;
    crop_margin_px: crop every panel to the labels' bounding box plus this margin
            (None: full field of view);
    palette_colours: store the PNG as an indexed-colour image with this many colours
            (a few times smaller; None: full RGBA).
    Returns the path written.
    """
    # a bare Figure renders with Agg and leaves pyplot's global backend alone
    from matplotlib.figure import Figure

    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [P, S, H, W], got {images.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != images.shape:
            raise ValueError(f"labels {labels.shape} must match images {images.shape}")
    P, S, H, W = images.shape
    if phases is None:
        phases = [0]
        if labels is not None and P > 1:
            lv = (labels == 1).sum(axis=(1, 2, 3))
            es = int(np.argmin(np.where(lv > 0, lv, lv.max() + 1)))
            if es != 0:
                phases.append(es)
    phases = [int(p) for p in phases]
    if phase_names is None:
        phase_names = [f"phase {p}" for p in phases]
    if slices is None:
        slices = pick_slices(labels, n_slices, phases=phases, n_total=S)
    slices = [int(s) for s in slices]
    n_cols = len(slices) + (1 if lax is not None else 0)
    n_rows = len(phases)

    sel_lab = None if labels is None else labels[phases][:, slices]
    box = crop_box(sel_lab, (H, W), crop_margin_px)
    r0, r1, c0, c1 = box
    vmin, vmax = image_window(images[phases][:, slices, r0:r1, c0:c1])
    aspect = pixel_spacing[0] / pixel_spacing[1]
    box_h = (r1 - r0) * pixel_spacing[0]
    box_w = (c1 - c0) * pixel_spacing[1]

    widths = [1.0] * len(slices)
    lax_imgs = lax_labs = None
    if lax is not None:
        lax_imgs = np.asarray(lax.images)
        lax_imgs = lax_imgs[None] if lax_imgs.ndim == 2 else lax_imgs
        lax_labs = None if lax.labels is None else np.asarray(lax.labels)
        if lax_labs is not None and lax_labs.ndim == 2:
            lax_labs = lax_labs[None]
        lh, lw = lax_imgs.shape[-2:]
        lbox = crop_box(lax_labs, (lh, lw), None if crop_margin_px is None else 2 * crop_margin_px)
        lr0, lr1, lc0, lc1 = lbox
        l_aspect = lax.pixel_spacing[0] / lax.pixel_spacing[1]
        l_h = (lr1 - lr0) * lax.pixel_spacing[0]
        l_w = (lc1 - lc0) * lax.pixel_spacing[1]
        widths.append(max(1.0, (l_w / l_h) / (box_w / box_h)) * 1.25)

    fig_w = panel_inches * sum(widths) * box_w / max(box_h, box_w) + 0.5
    fig_h = panel_inches * n_rows * box_h / max(box_h, box_w) + 0.9
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    gs = fig.add_gridspec(n_rows, n_cols, width_ratios=widths, wspace=0.04, hspace=0.06,
                          left=0.3 / fig_w, right=0.99, top=1 - 0.55 / fig_h, bottom=0.35 / fig_h)
    for r, p in enumerate(phases):
        for c, s in enumerate(slices):
            ax = fig.add_subplot(gs[r, c])
            draw_labels(ax, images[p, s], None if labels is None else labels[p, s],
                        vmin=vmin, vmax=vmax, aspect=aspect, box=box, linewidth=linewidth)
            if r == 0:
                ax.set_title(f"slice {s}", fontsize=7, pad=2)
            if c == 0:
                ax.set_ylabel(phase_names[r], fontsize=8)
        if lax is not None:
            f = p if lax_imgs.shape[0] > p else 0
            ax = fig.add_subplot(gs[r, n_cols - 1])
            lvmin, lvmax = image_window(lax_imgs[:, lr0:lr1, lc0:lc1])
            draw_labels(ax, lax_imgs[f], None if lax_labs is None else lax_labs[min(f, lax_labs.shape[0] - 1)],
                        vmin=lvmin, vmax=lvmax, aspect=l_aspect, box=lbox, linewidth=linewidth)
            if r == 0:
                ax.set_title(lax.name, fontsize=7, pad=2)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.12 / fig_h, va="top")
    return _finish(fig, path, legend=labels is not None, dpi=dpi,
                   palette_colours=palette_colours, what="montage")


def _finish(fig, path: str | Path, *, legend: bool, dpi: int, palette_colours: int | None,
            what: str) -> Path:
    """Add the label legend (when ``legend``) under the panels and save the PNG."""
    from matplotlib.patches import Patch

    if legend:
        handles = [Patch(facecolor=c, edgecolor=c, label=LABELS[k])
                   for k, c in LABEL_COLOURS.items()]
        fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(fig, path, dpi=dpi, palette_colours=palette_colours)
    log.debug("%s written to %s", what, path)
    return path


def _save_png(fig, path: Path, *, dpi: int, palette_colours: int | None) -> None:
    """Save ``fig`` as PNG; with ``palette_colours``, as an indexed image whose palette is a
    grey ramp plus the exact label colours (so the contours keep their colours)."""
    if palette_colours is None:
        fig.savefig(path, dpi=dpi)
        return
    import io

    from matplotlib.colors import to_rgb
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        rgb = im.convert("RGB")
    n_grey = max(2, min(int(palette_colours), 256) - len(LABEL_COLOURS))
    greys = np.linspace(0, 255, n_grey).round().astype(np.uint8)
    colours = [tuple(int(round(255 * v)) for v in to_rgb(c)) for c in LABEL_COLOURS.values()]
    entries = [(g, g, g) for g in greys] + colours
    flat = [v for e in entries for v in e]
    flat += flat[-3:] * (256 - len(entries))
    pal = Image.new("P", (1, 1))
    pal.putpalette(flat)
    rgb.quantize(palette=pal, dither=Image.Dither.NONE).save(path, format="PNG", optimize=True)


def save_study_montage(study: Study, path: str | Path, *, labels: np.ndarray | None = None,
                       lax: PlaneView | None = None, **kwargs) -> Path:
    """:func:`save_montage` of a :class:`Study` (its labels unless ``labels`` is given,
    rows ED and ES when the study knows them, its pixel spacing)."""
    labels = study.labels if labels is None else labels
    phases = kwargs.pop("phases", None)
    if phases is None and study.ed_phase is not None:
        phases = [study.ed_phase] + ([study.es_phase] if study.es_phase not in (None, study.ed_phase) else [])
    names = kwargs.pop("phase_names", None)
    if names is None and phases is not None:
        names = [study.phase_name(p) for p in phases]
    return save_montage(path, study.images, labels, phases=phases, phase_names=names,
                        pixel_spacing=study.geometry.pixel_spacing, lax=lax, **kwargs)


# --------------------------------------------------------------------------- long-axis cuts
class CutStack(NamedTuple):
    """A stack of parallel slices on one in-plane grid, to cut through along the normal.

    images:       [P, S, H, W] float, any intensity scale;
    labels:       [P, S, H, W] uint8 project labels, or None;
    positions_mm: [S] each slice's position along the slice normal (mm, increasing),
                  e.g. ``Geometry.positions``; only differences matter;
    name:         the panel title (e.g. "input (10 mm)", "high resolution").

    Every stack given to :func:`save_long_axis_cuts` shares one in-plane grid (the model
    grid): same H x W, same pixel spacing, slices aligned along the normal.
    """

    images: np.ndarray
    labels: np.ndarray | None
    positions_mm: np.ndarray
    name: str


def lv_centre(labels: np.ndarray) -> tuple[float, float, float] | None:
    """(slice, row, column) centroid, in index units, of the LV cavity (label 1) of a
    [S, H, W] label volume; of the LV cavity and myocardium (1, 2) when it has no
    cavity; None when it has neither."""
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be [S, H, W], got {lab.shape}")
    mask = lab == 1
    if not mask.any():
        mask = (lab == 1) | (lab == 2)
    if not mask.any():
        return None
    idx = np.argwhere(mask)
    s, r, c = idx.mean(axis=0)
    return float(s), float(r), float(c)


def _nearest_slices(positions: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """For each position of ``grid`` [Z], the index of the stack slice whose slab (its
    centre +- half the gap to each neighbour; +- half the median gap at the ends) holds
    it, or -1 outside the stack."""
    pos = np.asarray(positions, dtype=np.float64)
    if pos.size == 1:
        half = 0.5 * (grid[1] - grid[0]) if grid.size > 1 else 0.5
        return np.where(np.abs(grid - pos[0]) <= half + 1e-6, 0, -1)
    gaps = np.diff(pos)
    edges = np.concatenate([[pos[0] - gaps[0] / 2], (pos[:-1] + pos[1:]) / 2,
                            [pos[-1] + gaps[-1] / 2]])
    k = np.searchsorted(edges, grid, side="right") - 1
    return np.where((grid >= edges[0] - 1e-6) & (grid <= edges[-1] + 1e-6),
                    np.clip(k, 0, pos.size - 1), -1)


def save_long_axis_cuts(path: str | Path, stacks: Sequence[CutStack], *,
                        pixel_spacing: tuple[float, float], phases: Sequence[int] | None = None,
                        phase_names: Sequence[str] | None = None,
                        centre: tuple[float, float] | None = None, apex_up: bool = True,
                        title: str | None = None, crop_margin_mm: float = 25.0, dpi: int = 80,
                        panel_inches: float = 2.4, max_width_inches: float = 20.0,
                        linewidth: float = 0.9, palette_colours: int | None = 128) -> Path:
    """Write a PNG of long-axis-like cuts through short-axis stacks: one row per phase; a
    SAX reference slice with the two cut lines, then a *vertical* cut (the plane through
    the LV centre along the image's column axis and the slice normal: a two-chamber-like
    view) and a *horizontal* cut (along the row axis and the normal: four-chamber-like,
    LV and RV side by side), each for every stack, with label contours.

    stacks:        :class:`CutStack` s sharing one in-plane grid; typically the input on
                   the model grid (thick slices, drawn as slabs) and the high-resolution
                   volume. The through-plane axis of every cut is one common grid with the
                   finest slice gap of all stacks, each stack shown by its nearest slice, so
                   all panels have the same physical scale: the aspect ratio is the
                   physical one (slice gap vs ``pixel_spacing``, (rows, columns) mm).
    phases:        phase indices into the stacks' first axis (default: 0);
    centre:        (row, column) of the cuts; default: the LV cavity centroid of the last
                   stack with labels at ``phases[0]`` (the image centre without labels).
                   The same planes are cut at every phase.
    apex_up:       put the end of the stack with the smaller LV section at the top (where
                   long-axis views put the apex); else the first slice is at the top.
    crop_margin_mm: in-plane crop around the labels of every stack (no crop without labels).
    panel_inches:  row height; lowered so that the figure is at most ``max_width_inches``
                   wide.
    Returns the path written.
    """
    from matplotlib.figure import Figure

    if not stacks:
        raise ValueError("give at least one stack to cut")
    stacks = [CutStack(np.asarray(s.images), None if s.labels is None else np.asarray(s.labels),
                       np.asarray(s.positions_mm, dtype=np.float64).reshape(-1), s.name)
              for s in stacks]
    P, _, H, W = stacks[0].images.shape
    for s in stacks:
        if s.images.ndim != 4 or s.images.shape[0] != P or s.images.shape[2:] != (H, W):
            raise ValueError(f"stack {s.name!r}: images {s.images.shape} must be [{P}, S, {H}, {W}]")
        if s.labels is not None and s.labels.shape != s.images.shape:
            raise ValueError(f"stack {s.name!r}: labels {s.labels.shape} must match images "
                             f"{s.images.shape}")
        if s.positions_mm.size != s.images.shape[1] or np.any(np.diff(s.positions_mm) <= 0):
            raise ValueError(f"stack {s.name!r}: positions_mm must be {s.images.shape[1]} "
                             "increasing values")
    phases = [0] if phases is None else [int(p) for p in phases]
    if phase_names is None:
        phase_names = [f"phase {p}" for p in phases]
    dr, dc = (float(pixel_spacing[0]), float(pixel_spacing[1]))

    # the common through-plane grid: the finest gap of all stacks, over their union
    gaps = [np.diff(s.positions_mm) for s in stacks if s.positions_mm.size > 1]
    dz = float(min(np.min(g) for g in gaps)) if gaps else min(dr, dc)
    lo = min(s.positions_mm[0] for s in stacks)
    hi = max(s.positions_mm[-1] for s in stacks)
    z = lo + dz * np.arange(int(np.floor((hi - lo) / dz + 1e-6)) + 1)
    if z.size < 2:   # single slices: two rows across the slab (contours need two)
        dz /= 2.0
        z = np.array([lo - dz / 2.0, lo + dz / 2.0])
    picks = [_nearest_slices(s.positions_mm, z) for s in stacks]

    ref_i = max((i for i, s in enumerate(stacks) if s.labels is not None), default=None)
    ref = None if ref_i is None else stacks[ref_i]
    found = lv_centre(ref.labels[phases[0]]) if ref is not None else None
    if centre is None:
        centre = (found[1], found[2]) if found is not None else ((H - 1) / 2, (W - 1) / 2)
    r_cut = int(np.clip(round(centre[0]), 0, H - 1))
    c_cut = int(np.clip(round(centre[1]), 0, W - 1))
    ref_slice = int(round(found[0])) if found is not None else stacks[-1].images.shape[1] // 2

    # apex at the top: the end of the reference stack with the smaller LV section
    flip = apex_known = False
    if apex_up and ref is not None:
        area = np.isin(ref.labels[phases[0]], (1, 2)).sum(axis=(1, 2))
        has = np.flatnonzero(area)
        if has.size >= 2:
            k = max(1, has.size // 3)
            flip = bool(area[has[-k:]].mean() < area[has[:k]].mean())
            apex_known = True

    # in-plane crop around all labels
    labelled = [s.labels[phases] for s in stacks if s.labels is not None]
    if labelled and any(np.any(lab) for lab in labelled):
        any_lab = np.zeros((H, W), dtype=bool)
        for lab in labelled:
            any_lab |= np.any(lab > 0, axis=(0, 1))
        rows = np.flatnonzero(any_lab.any(axis=1))
        cols = np.flatnonzero(any_lab.any(axis=0))
        mr, mc = int(round(crop_margin_mm / dr)), int(round(crop_margin_mm / dc))
        box = (max(0, rows[0] - mr), min(H, rows[-1] + 1 + mr),
               max(0, cols[0] - mc), min(W, cols[-1] + 1 + mc))
    else:
        box = (0, H, 0, W)
    r0, r1, c0, c1 = box

    def cut(stack: CutStack, pick: np.ndarray, p: int, axis: str):
        """[Z, n] image and labels of one cut (NaN / 0 outside the stack)."""
        inside = pick >= 0
        k = np.clip(pick, 0, None)
        if axis == "vertical":          # fixed column: in-plane axis = rows
            img = stack.images[p][k, r0:r1, c_cut].astype(np.float32)
            lab = None if stack.labels is None else stack.labels[p][k, r0:r1, c_cut]
        else:                           # fixed row: in-plane axis = columns
            img = stack.images[p][k, r_cut, c0:c1].astype(np.float32)
            lab = None if stack.labels is None else stack.labels[p][k, r_cut, c0:c1]
        img[~inside] = np.nan
        if lab is not None:
            lab = np.where(inside[:, None], lab, 0)
        if flip:
            img, lab = img[::-1], None if lab is None else lab[::-1]
        return img, lab

    windows = [image_window(s.images[phases]) for s in stacks]
    z_mm = z.size * dz
    # panel widths in units of the row height, so every panel keeps its physical aspect
    sax_ratio = ((c1 - c0) * dc) / ((r1 - r0) * dr)
    widths = ([sax_ratio] + [((r1 - r0) * dr) / z_mm] * len(stacks)
              + [((c1 - c0) * dc) / z_mm] * len(stacks))
    # a shallow stack under a wide field of view makes very wide cuts: cap the width
    panel_inches = min(panel_inches, (max_width_inches - 0.6) / (sum(widths) * 1.08))
    fig_w = panel_inches * sum(widths) * 1.08 + 0.6
    fig_h = panel_inches * len(phases) + 0.95
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    gs = fig.add_gridspec(len(phases), len(widths), width_ratios=widths, wspace=0.08, hspace=0.1,
                          left=0.35 / fig_w, right=0.99, top=1 - 0.6 / fig_h, bottom=0.35 / fig_h)
    sax_i = len(stacks) - 1 if ref_i is None else ref_i
    sax_stack = stacks[sax_i]
    sax_window = windows[sax_i]
    for row, p in enumerate(phases):
        ax = fig.add_subplot(gs[row, 0])
        s_idx = int(np.clip(ref_slice, 0, sax_stack.images.shape[1] - 1))
        draw_labels(ax, sax_stack.images[p, s_idx], None if sax_stack.labels is None
                    else sax_stack.labels[p, s_idx], vmin=sax_window[0], vmax=sax_window[1],
                    aspect=dr / dc, box=box, linewidth=linewidth)
        ax.axvline(c_cut - c0, color="white", linestyle="--", linewidth=0.8)
        ax.axhline(r_cut - r0, color="white", linestyle=":", linewidth=0.8)
        ax.set_ylabel(phase_names[row], fontsize=8)
        if row == 0:
            ax.set_title(f"{sax_stack.name}, slice {s_idx}\n-- vertical, .. horizontal cut",
                         fontsize=7, pad=2)
        for a, axis in enumerate(("vertical", "horizontal")):
            for i, (stack, pick) in enumerate(zip(stacks, picks)):
                img, lab = cut(stack, pick, p, axis)
                ax = fig.add_subplot(gs[row, 1 + a * len(stacks) + i])
                n = img.shape[1]
                draw_labels(ax, img, lab, vmin=windows[i][0], vmax=windows[i][1],
                            aspect=dz / (dr if axis == "vertical" else dc),
                            box=(0, z.size, 0, n), linewidth=linewidth)
                if row == 0:
                    ax.set_title(f"{axis} cut: {stack.name}", fontsize=7, pad=2)
    top = ("apex (the end with the smaller LV section) at the top" if apex_known
           else "first slice at the top")
    note = f"through-plane grid {dz:g} mm, pixel {dr:g} x {dc:g} mm; {top}"
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=8, y=1 - 0.08 / fig_h, va="top")
    return _finish(fig, path, legend=labelled, dpi=dpi, palette_colours=palette_colours,
                   what="long-axis cuts")


# --------------------------------------------------------------------------- volume curves
class VolumeCurve(NamedTuple):
    """One volume-over-the-cycle series for :func:`save_volume_curves`.

    name:       legend entry (e.g. "native", "high resolution", "target");
    volumes_ml: structure -> [P] volumes in mL, as in the measures' ``volume_curves_ml``
                ("LVC", "LVM", "RVC");
    x:          [P] x positions (frame numbers, or fractions of the cycle); default 0..P-1;
    ed, es:     indices into the P phases of ED and ES, marked on the curve (or None).
    """

    name: str
    volumes_ml: Mapping[str, Sequence[float]]
    x: Sequence[float] | None = None
    ed: int | None = None
    es: int | None = None


# Okabe-Ito colours for the series (the label colours stay for the structures' contours)
_SERIES_COLOURS = ("#000000", "#E69F00", "#0072B2", "#CC79A7", "#009E73", "#D55E00")
_SERIES_STYLES = ("-", "--", "-.", ":")
_STRUCTURE_TITLES = {"LVC": "LV cavity", "LVM": "LV myocardium", "RVC": "RV cavity"}


def save_volume_curves(path: str | Path, curves: Sequence[VolumeCurve], *,
                       structures: Sequence[str] = ("LVC", "RVC"), xlabel: str = "frame",
                       title: str | None = None, dpi: int = 100) -> Path:
    """Write a PNG of volume curves over the cardiac cycle: one panel per structure
    (default LV cavity and RV cavity), one line per :class:`VolumeCurve`, ED marked with an
    upward triangle and ES with a downward one (each in its series' colour). A series
    without a structure is skipped in that panel. Returns the path written.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if not curves:
        raise ValueError("give at least one curve")
    n = len(structures)
    fig = Figure(figsize=(3.6 * n + 0.4, 3.0 + (0.3 if title else 0.0)), dpi=dpi)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, name in zip(axes, structures):
        for i, c in enumerate(curves):
            if name not in c.volumes_ml:
                continue
            v = np.asarray(c.volumes_ml[name], dtype=np.float64)
            x = np.arange(v.size) if c.x is None else np.asarray(c.x, dtype=np.float64)
            if x.shape != v.shape:
                raise ValueError(f"curve {c.name!r}: x has {x.size} values, {name} has {v.size}")
            colour = _SERIES_COLOURS[i % len(_SERIES_COLOURS)]
            ax.plot(x, v, _SERIES_STYLES[i % len(_SERIES_STYLES)], color=colour, marker=".",
                    markersize=5, linewidth=1.4, label=c.name)
            for idx, marker in ((c.ed, "^"), (c.es, "v")):
                if idx is not None and 0 <= idx < v.size:
                    ax.plot([x[idx]], [v[idx]], marker=marker, markersize=9, color=colour,
                            markeredgecolor="white", markeredgewidth=0.8, linestyle="none")
        ax.set_title(_STRUCTURE_TITLES.get(name, name), fontsize=9)
        xs = [np.asarray(c.x, dtype=np.float64) for c in curves if c.x is not None]
        if not xs or all(np.all(x == np.round(x)) for x in xs):   # frame numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("volume (mL)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, linewidth=0.4, alpha=0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], marker="^", color="grey", linestyle="none", markersize=8),
                Line2D([], [], marker="v", color="grey", linestyle="none", markersize=8)]
    labels += ["ED", "ES"]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    log.debug("volume curves written to %s", path)
    return path
