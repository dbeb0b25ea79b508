"""Post-processing of a segmentation: each structure keeps its largest 3D component.

A slice-wise segmentation network sees one slice at a time, so it can leave islands:
a blob of "RV" on a basal slice above the heart, a speck of myocardium in the liver.
They inflate volumes a little and the Hausdorff distance a lot. The common remedy in
cardiac segmentation (e.g. the ACDC challenge's nnU-Net) is to keep, per structure,
only its largest connected component in 3D; the removed voxels become background.

Plain connectivity cuts real anatomy: on the manual labels of the 80 ACDC patients
(ED and ES), the largest 26-connected component alone would remove up to 3.9% of the
myocardium in 11 patients and up to 3.2% of the RV in 8 (a partial basal ring, a slice
that the breath-hold shifted). So parts are first grown by half of ``BRIDGE_MM`` in plane
and onto the neighbouring slices: parts up to 10 mm apart count as one. With that
bridge the manual labels lose nothing but 0.02% of one patient's RV, while an island
farther away goes. The removed fraction is reported per phase and structure (the
pipeline warns above 10%), and the step can be turned off
(``reconstruct(..., largest_component=False)``, ``--keep-islands``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

BRIDGE_MM = 10.0
_FULL = np.ones((3, 3, 3), bool)  # 26-connectivity of the bridged mask


def _bridge(spacing_rc: Sequence[float], bridge_mm: float) -> np.ndarray:
    """The structuring element that grows each part by half of ``bridge_mm`` in plane
    (in whole pixels, rounded down) and onto the neighbouring slices: a 3-slice stack
    of in-plane ellipses. Two grown parts touch when their gap is at most
    ``bridge_mm``."""
    rr = max(0, int(bridge_mm / (2 * float(spacing_rc[0]))))
    rc = max(0, int(bridge_mm / (2 * float(spacing_rc[1]))))
    r, c = np.ogrid[-rr:rr + 1, -rc:rc + 1]
    disc = (r / max(rr, 1)) ** 2 + (c / max(rc, 1)) ** 2 <= 1.0
    return np.broadcast_to(disc, (3,) + disc.shape)


def keep_largest_component(labels: np.ndarray, spacing_rc: Sequence[float], *,
                           bridge_mm: float = BRIDGE_MM, classes: Sequence[int] = (1, 2, 3)
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Labels [P, S, H, W] (one 3D volume per phase, pixel spacing ``spacing_rc`` in mm)
    with every class in ``classes`` reduced to its largest component per phase, where
    parts up to ``bridge_mm`` apart (in plane, on the same or a neighbouring
    slice) count as one component.

    Returns (new labels, removed [P, len(classes)]: the fraction of each structure's
    voxels that were removed, 0 where the structure is absent). The input is not
    changed."""
    labels = np.asarray(labels)
    if labels.ndim != 4:
        raise ValueError(f"labels must be [P, S, H, W], got shape {labels.shape}")
    structure = _bridge(spacing_rc, bridge_mm)
    out = labels.copy()
    removed = np.zeros((labels.shape[0], len(classes)), np.float64)
    pad = [(1, 1)] + [(n // 2, n // 2) for n in structure.shape[1:]]
    for p in range(labels.shape[0]):
        for j, k in enumerate(classes):
            where = ndimage.find_objects((labels[p] == k).astype(np.uint8))
            if not where:
                continue
            box = where[0]  # the structure's bounding box: the work stays small
            mask = np.pad(labels[p][box] == k, pad)
            comps, n = ndimage.label(ndimage.binary_dilation(mask, structure), structure=_FULL)
            if n <= 1:
                continue
            sizes = np.bincount(comps[mask], minlength=n + 1)[1:]
            drop = mask & (comps != 1 + int(np.argmax(sizes)))
            drop = drop[tuple(slice(a, m - b) for (a, b), m in zip(pad, drop.shape))]
            out[p][box][drop] = 0
            removed[p, j] = drop.sum() / mask.sum()  # the padding adds no voxels
    return out, removed


ISLAND_WARN_FRACTION = 0.10
_NAMES = ("LVC", "LVM", "RVC")


def island_warnings(removed: np.ndarray, frame_ids: Sequence[int], *,
                    classes: Sequence[int] = (1, 2, 3)) -> list[str]:
    """One warning per phase and structure that lost more than
    :data:`ISLAND_WARN_FRACTION` of its voxels to :func:`keep_largest_component`: the
    segmentation was fragmented there, and its measures deserve a look."""
    out = []
    for p, frame in enumerate(frame_ids):
        for j, k in enumerate(classes):
            if removed[p, j] > ISLAND_WARN_FRACTION:
                out.append(f"frame {frame}: {100 * removed[p, j]:.0f}% of the {_NAMES[k - 1]} "
                           f"segmentation lay in parts more than {BRIDGE_MM:g} mm from its "
                           "largest part and was removed; check this phase's segmentation")
    return out
