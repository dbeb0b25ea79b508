"""Metrics against independent computations: counts for Dice, brute-force point-set
distances (scipy.spatial.distance.cdist) for HD95/ASSD, a shifted sphere for the Hausdorff
distance, and the file-level comparison with its grid checks."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from deeprecon.runtime.errors import InvalidStudyError, NoInputError, UsageError
from deeprecon.runtime.jsonsafe import json_safe
from deeprecon.runtime.metrics import (assd, compare_label_files, dice, evaluate_segmentation,
                                       hausdorff, hausdorff95, surface_distances)
from deeprecon.runtime.study import ACDC_TO_PROJECT

SPACING = (3.0, 1.2, 0.8)   # (z, y, x) mm, strongly anisotropic
DIAG = math.sqrt(sum(s * s for s in SPACING))


def _blobs(rng, shape, n_labels=3, sigma=1.6):
    """Random smooth label blobs with values 0..n_labels."""
    out = np.zeros(shape, dtype=np.uint8)
    for k in range(1, n_labels + 1):
        field = ndimage.gaussian_filter(rng.random(shape), sigma)
        thr = np.quantile(field, 0.8)
        out[field > thr] = k
    return out


def _surface_points_bruteforce(mask: np.ndarray, spacing) -> np.ndarray:
    """Physical coordinates [N, 3] (mm) of voxels with a face-neighbour outside the mask
    (outside of the array = background), by explicit neighbour look-ups."""
    pad = np.pad(mask, 1, constant_values=False)
    core = pad[1:-1, 1:-1, 1:-1]
    outside = np.zeros_like(core)
    for axis in range(3):
        for step in (-1, 1):
            sl = [slice(1, -1)] * 3
            sl[axis] = slice(1 + step, pad.shape[axis] - 1 + step)
            outside |= ~pad[tuple(sl)]
    idx = np.argwhere(core & outside)
    return idx * np.asarray(spacing, dtype=np.float64)


def _bruteforce(a, b, spacing):
    pa, pb = _surface_points_bruteforce(a, spacing), _surface_points_bruteforce(b, spacing)
    d = cdist(pa, pb)
    dab, dba = d.min(axis=1), d.min(axis=0)
    pooled = np.concatenate([dab, dba])
    return float(np.percentile(pooled, 95)), float((dab.mean() + dba.mean()) / 2), float(pooled.max())


@pytest.mark.parametrize("seed", range(5))
def test_dice_matches_independent_count(seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 4, size=(7, 23, 19)).astype(np.uint8)
    ref = rng.integers(0, 4, size=(7, 23, 19)).astype(np.uint8)
    for k in (1, 2, 3):
        a, b = pred == k, ref == k
        expected = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
        assert abs(dice(pred, ref, k) - expected) < 1e-6
    assert dice(ref, ref, 2) == 1.0


def test_dice_absent_structures():
    z = np.zeros((3, 5, 5), np.uint8)
    one = z.copy()
    one[1, 2, 2] = 1
    assert math.isnan(dice(z, z, 1))
    assert dice(one, z, 1) == 0.0 and dice(z, one, 1) == 0.0
    assert math.isnan(hausdorff95(z, z, 1, (1, 1, 1)))
    assert hausdorff95(one, z, 1, (1, 1, 1)) == math.inf
    assert assd(z, one, 1, (1, 1, 1)) == math.inf


@pytest.mark.parametrize("seed", range(6))
def test_hd95_and_assd_match_bruteforce_cdist(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (9, 18, 16)
    pred = _blobs(rng, shape)
    ref = _blobs(rng, shape)
    for k in (1, 2, 3):
        a, b = pred == k, ref == k
        assert a.any() and b.any()
        hd95_bf, assd_bf, hd_bf = _bruteforce(a, b, SPACING)
        hd95 = hausdorff95(pred, ref, k, SPACING)
        # same surface definition and exact EDT: equal to rounding, and well within a voxel diagonal
        assert abs(hd95 - hd95_bf) <= DIAG
        assert abs(hd95 - hd95_bf) < 1e-6
        assert abs(assd(pred, ref, k, SPACING) - assd_bf) < 1e-6
        assert abs(hausdorff(pred, ref, k, SPACING) - hd_bf) < 1e-6


def test_surface_distances_are_anisotropic():
    # two single-voxel masks one slice apart: the distance is the slice spacing, not 1 voxel
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[1, 1, 1] = True
    b[2, 1, 2] = True
    dab, dba = surface_distances(a, b, SPACING)
    expected = math.hypot(SPACING[0], SPACING[2])
    assert dab.tolist() == pytest.approx([expected]) and dba.tolist() == pytest.approx([expected])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 1.25, 0.9)])
def test_shifted_sphere_hausdorff(spacing):
    shape = (40, 48, 52)
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    c = [n * s / 2 for n, s in zip(shape, spacing)]
    sphere = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 15.0 ** 2
    shift_vox = 3
    moved = np.roll(sphere, shift_vox, axis=0)   # an exact translation of the digital sphere
    d = shift_vox * spacing[0]
    hd = hausdorff(moved, sphere, None, spacing)
    hd95 = hausdorff95(moved, sphere, None, spacing)
    # every surface voxel has its translate on the other surface: HD <= d; the caps reach d
    assert d - math.sqrt(sum(s * s for s in spacing)) <= hd <= d + 1e-9
    assert 0 < hd95 <= hd
    assert dice(sphere, sphere) == 1.0 and assd(sphere, sphere, None, spacing) == 0.0


def test_evaluate_segmentation_3d_and_4d():
    rng = np.random.default_rng(7)
    ref = np.stack([_blobs(rng, (6, 20, 18)) for _ in range(3)])   # [P, S, H, W]
    pred = ref.copy()
    pred[1] = _blobs(rng, (6, 20, 18))
    pred[2][pred[2] == 3] = 0                                       # RVC absent in phase 2
    res = evaluate_segmentation(pred, ref, SPACING)
    assert set(res) == {"LVC", "LVM", "RVC"}
    lvc = res["LVC"]
    per = [dice(pred[p], ref[p], 1) for p in range(3)]
    assert lvc["dice"] == pytest.approx(np.mean(per), abs=1e-12)
    assert lvc["per_phase"][0]["dice"] == 1.0 and lvc["per_phase"][0]["hd95_mm"] == 0.0
    assert res["RVC"]["per_phase"][2]["dice"] == 0.0
    assert res["RVC"]["per_phase"][2]["absent_in"] == "pred"
    assert res["RVC"]["hd95_mm"] == math.inf
    vox = float(np.prod(SPACING)) / 1000
    assert lvc["ref_volume_ml"] == pytest.approx(np.mean([(ref[p] == 1).sum() * vox for p in range(3)]))
    one = evaluate_segmentation(pred[1], ref[1], SPACING, labels=(2,))
    assert list(one) == ["LVM"] and "per_phase" not in one["LVM"]
    assert one["LVM"]["hd95_mm"] == pytest.approx(hausdorff95(pred[1], ref[1], 2, SPACING))
    safe = json_safe(res)
    json.dumps(safe, allow_nan=False)   # raises on NaN/inf
    assert safe["RVC"]["hd95_mm"] is None


def _write(path, arr, spacing=(0.8, 1.2, 3.0), origin=(10.0, -5.0, 2.0), direction=None):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def test_compare_label_files(tmp_path):
    rng = np.random.default_rng(3)
    ref = _blobs(rng, (6, 20, 18))
    pred = ref.copy()
    pred[2:4][pred[2:4] == 2] = 0
    rp = _write(tmp_path / "ref.nii.gz", ref)
    pp = _write(tmp_path / "pred.nii.gz", pred)
    res = compare_label_files(pp, rp)
    json.dumps(res, allow_nan=False)
    assert res["spacing_mm"] == pytest.approx([3.0, 1.2, 0.8])
    assert res["structures"]["LVC"]["dice"] == 1.0
    assert res["structures"]["LVM"]["dice"] == pytest.approx(dice(pred, ref, 2), abs=1e-12)
    assert res["structures"]["LVM"]["hd95_mm"] == pytest.approx(hausdorff95(pred, ref, 2, SPACING))
    # an ACDC-convention reference of the same segmentation (1 RV, 2 MYO, 3 LV)
    to_acdc = np.argsort(ACDC_TO_PROJECT).astype(np.uint8)
    ap = _write(tmp_path / "ref_acdc.nii.gz", to_acdc[ref])
    res_acdc = compare_label_files(rp, ap, ref_convention="acdc")
    assert all(m["dice"] == 1.0 for m in res_acdc["structures"].values())
    # 4D (x, y, z, t)
    ref4 = sitk.JoinSeries([sitk.GetImageFromArray(ref), sitk.GetImageFromArray(ref)])
    sitk.WriteImage(ref4, str(tmp_path / "r4.nii.gz"))
    sitk.WriteImage(ref4, str(tmp_path / "p4.nii.gz"))
    res4 = compare_label_files(tmp_path / "p4.nii.gz", tmp_path / "r4.nii.gz")
    assert res4["phases"] == 2 and res4["structures"]["RVC"]["dice"] == 1.0


def test_compare_label_files_errors(tmp_path):
    ref = np.zeros((4, 8, 8), np.uint8)
    ref[1:3, 2:6, 2:6] = 1
    rp = _write(tmp_path / "ref.nii.gz", ref)
    with pytest.raises(NoInputError):
        compare_label_files(tmp_path / "missing.nii.gz", rp)
    with pytest.raises(InvalidStudyError, match="size"):
        compare_label_files(_write(tmp_path / "a.nii.gz", ref[:3]), rp)
    with pytest.raises(InvalidStudyError, match="spacing"):
        compare_label_files(_write(tmp_path / "b.nii.gz", ref, spacing=(0.8, 1.2, 2.0)), rp)
    with pytest.raises(InvalidStudyError, match="origin"):
        compare_label_files(_write(tmp_path / "c.nii.gz", ref, origin=(10.0, -5.0, 2.5)), rp)
    tilted = (1, 0, 0, 0, 0.8, -0.6, 0, 0.6, 0.8)
    with pytest.raises(InvalidStudyError, match="direction"):
        compare_label_files(_write(tmp_path / "d.nii.gz", ref, direction=tilted), rp)
    with pytest.raises(InvalidStudyError, match="outside 0..3"):
        compare_label_files(_write(tmp_path / "e.nii.gz", ref * 4), rp)
    with pytest.raises(InvalidStudyError, match="non-integer"):
        compare_label_files(_write(tmp_path / "f.nii.gz", ref.astype(np.float32) * 0.5), rp)
    with pytest.raises(UsageError):
        compare_label_files(rp, rp, ref_convention="nnunet")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(InvalidStudyError):
        compare_label_files(tmp_path / "junk.nii.gz", rp)


def test_cli_eval_seg_json(tmp_path, capsys):
    from deeprecon.runtime import cli   # in-tree: an import error fails, never skips
    rng = np.random.default_rng(5)
    ref = _blobs(rng, (5, 16, 16))
    pred = ref.copy()
    pred[pred == 3] = 0
    rp = _write(tmp_path / "ref.nii.gz", ref)
    pp = _write(tmp_path / "pred.nii.gz", pred)
    assert cli.run(["eval", "seg", str(pp), str(rp), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["structures"]["LVC"]["dice"] == 1.0
    assert out["structures"]["RVC"]["dice"] == 0.0 and out["structures"]["RVC"]["hd95_mm"] is None
    assert cli.run(["eval", "seg", str(tmp_path / "nope.nii.gz"), str(rp)]) == 66
