"""Quality-control pictures: SAX slice montages with label contours, plus long-axis planes.

Used for the phantom's preview and for the pipeline's QC pictures. Rendering uses
matplotlib's Agg backend only (no display, no network).

Label colours follow the Okabe-Ito colour-blind-safe palette: LV cavity vermillion
(#D55E00), LV myocardium bluish green (#009E73), RV cavity sky blue (#56B4E9).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from deeprecon.runtime.study import LABELS, Study

log = logging.getLogger(__name__)

LABEL_COLOURS: dict[int, str] = {1: "#D55E00", 2: "#009E73", 3: "#56B4E9"}
# contours are drawn in this order, so the cavity outlines lie on top of the myocardium's
_DRAW_ORDER = (2, 3, 1)


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


def _crop_box(labels: np.ndarray | None, shape: tuple[int, int], margin: int | None):
    """(r0, r1, c0, c1) around the labels of a [..., H, W] array, or the full image."""
    H, W = shape
    if margin is None or labels is None or not np.any(labels):
        return 0, H, 0, W
    any_lab = np.any(labels.reshape(-1, H, W) > 0, axis=0)
    rows = np.flatnonzero(any_lab.any(axis=1))
    cols = np.flatnonzero(any_lab.any(axis=0))
    return (max(0, rows[0] - margin), min(H, rows[-1] + 1 + margin),
            max(0, cols[0] - margin), min(W, cols[-1] + 1 + margin))


def _window(images: np.ndarray) -> tuple[float, float]:
    finite = images[np.isfinite(images)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, (1.0, 99.5))
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _draw(ax, img, lab, *, vmin, vmax, aspect, box, linewidth):
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
    from matplotlib.patches import Patch

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
    box = _crop_box(sel_lab, (H, W), crop_margin_px)
    r0, r1, c0, c1 = box
    vmin, vmax = _window(images[phases][:, slices, r0:r1, c0:c1])
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
        lbox = _crop_box(lax_labs, (lh, lw), None if crop_margin_px is None else 2 * crop_margin_px)
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
            _draw(ax, images[p, s], None if labels is None else labels[p, s],
                  vmin=vmin, vmax=vmax, aspect=aspect, box=box, linewidth=linewidth)
            if r == 0:
                ax.set_title(f"slice {s}", fontsize=7, pad=2)
            if c == 0:
                ax.set_ylabel(phase_names[r], fontsize=8)
        if lax is not None:
            f = p if lax_imgs.shape[0] > p else 0
            ax = fig.add_subplot(gs[r, n_cols - 1])
            lvmin, lvmax = _window(lax_imgs[:, lr0:lr1, lc0:lc1])
            _draw(ax, lax_imgs[f], None if lax_labs is None else lax_labs[min(f, lax_labs.shape[0] - 1)],
                  vmin=lvmin, vmax=lvmax, aspect=l_aspect, box=lbox, linewidth=linewidth)
            if r == 0:
                ax.set_title(lax.name, fontsize=7, pad=2)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.12 / fig_h, va="top")
    handles = [Patch(facecolor=c, edgecolor=c, label=LABELS[k]) for k, c in LABEL_COLOURS.items()]
    if labels is not None:
        fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(fig, path, dpi=dpi, palette_colours=palette_colours)
    log.debug("montage written to %s", path)
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
