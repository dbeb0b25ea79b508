"""The Study model's own writer: to_sitk/volume_to_sitk round trip through the NIfTI loader."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from deeprecon.runtime.io import load_nifti
from deeprecon.runtime.study import Geometry, Study


def _oblique_study(P=3, S=4, H=12, W=10):
    a = np.deg2rad(25.0)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * 0.8, np.cos(a) * 0.8, 0.6])
    normal = np.cross(row, col)
    origins = np.array([10.0, -20.0, 5.0]) + np.arange(S)[:, None] * 8.0 * normal
    g = Geometry(origins=origins, row_dir=row, col_dir=col, pixel_spacing=(1.25, 1.5))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 1000, size=(P, S, H, W)).astype(np.float32)
    labels = rng.integers(0, 4, size=(P, S, H, W)).astype(np.uint8)
    return Study(images=images, geometry=g, labels=labels, trigger_times=np.arange(P) * 40.0)


def test_4d_round_trip_through_nifti(tmp_path):
    st = _oblique_study()
    sitk.WriteImage(st.to_sitk(st.images, dt_ms=40.0), str(tmp_path / "cine.nii.gz"))
    sitk.WriteImage(st.to_sitk(st.labels, dt_ms=40.0), str(tmp_path / "cine_gt.nii.gz"))
    got = load_nifti(tmp_path / "cine.nii.gz")
    np.testing.assert_array_equal(got.images, st.images)
    np.testing.assert_array_equal(got.labels, st.labels)
    np.testing.assert_allclose(got.geometry.origins, st.geometry.origins, atol=1e-4)
    np.testing.assert_allclose(got.geometry.row_dir, st.geometry.row_dir, atol=1e-6)
    np.testing.assert_allclose(got.geometry.col_dir, st.geometry.col_dir, atol=1e-6)
    assert got.geometry.pixel_spacing == pytest.approx(st.geometry.pixel_spacing)
    np.testing.assert_allclose(got.trigger_times, st.trigger_times)


def test_3d_volume_with_finer_slice_spacing():
    st = _oblique_study()
    img = st.to_sitk(np.zeros((9, 12, 10), np.uint8), slice_spacing=2.0)
    assert img.GetSize() == (10, 12, 9) and img.GetSpacing() == pytest.approx((1.5, 1.25, 2.0))
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((0, 0, 4)),
                               st.geometry.origins[1], atol=1e-9)   # 4 x 2 mm = one 8 mm step
    with pytest.raises(ValueError, match="volume must be"):
        st.to_sitk(np.zeros((4, 11, 10)))


def test_validate_study_checks_geometry_and_timing():
    """The loaders' boundary check: finite positive spacing, orthonormal directions,
    finite origins, sane gaps, finite trigger times (NaN = unknown is allowed)."""
    import dataclasses

    import pytest

    from deeprecon.runtime.io import InvalidGeometryError, validate_study

    def study(**geo):
        base = dict(origins=np.arange(3)[:, None] * np.array([0.0, 0.0, 8.0]),
                    row_dir=(1, 0, 0), col_dir=(0, 1, 0), pixel_spacing=(1.5, 1.5),
                    slice_thickness=8.0)
        base.update(geo)
        return Study(images=np.zeros((2, 3, 4, 4)), geometry=Geometry(**base),
                     trigger_times=np.array([0.0, np.nan]))

    validate_study(study())   # NaN trigger time = unknown: fine
    for geo, phrase in [(dict(pixel_spacing=(0.0, 1.5)), "pixel spacing"),
                        (dict(pixel_spacing=(np.nan, 1.5)), "pixel spacing"),
                        (dict(slice_thickness=-1.0), "slice thickness"),
                        (dict(col_dir=(0.3, 0.95, 0)), "orthonormal"),
                        (dict(origins=np.arange(3)[:, None] * np.array([0.0, 0.0, 900.0])),
                         "slice gap"),
                        (dict(origins=np.full((3, 3), np.inf)), "slice origin")]:
        with pytest.raises(InvalidGeometryError, match=phrase):
            validate_study(study(**geo))
    s = study()
    s = dataclasses.replace(s, trigger_times=np.array([0.0, np.inf]))
    with pytest.raises(InvalidGeometryError, match="trigger time"):
        validate_study(s)
