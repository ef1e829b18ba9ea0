"""Evaluation metrics: the vectorised Dice and the k-d tree HD95 against their definitions."""

import numpy as np
import pytest
from scipy import ndimage

from nipype_inrlddmm.evaluation import metrics


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("offset", [0, 3, 70000], ids=["negative ids", "small ids", "large ids"])
def test_dice_scores_equal_the_per_label_dice_of_every_label_asked(with_mask, offset):
    """Whichever way each voxel's label is looked up: bisection (negative or large ids) or a table of ids."""
    rng = np.random.default_rng(0)
    warped = rng.choice([-3, 0, 2, 7, 1000], size=(20, 18, 16)).astype(np.int32) + offset
    fixed = np.where(rng.random(warped.shape) < 0.7, warped, rng.choice([0, 2, 7, 9], size=warped.shape) + offset)
    mask = rng.random(warped.shape) < 0.5 if with_mask else None
    labels = [label + offset for label in (1000, 2, -3, 9, 7, 5)]  # unsorted; 9 only in the fixed map, 5 in neither
    got = metrics.dice_scores(warped, fixed, labels, mask)
    region = np.ones(warped.shape, bool) if mask is None else mask
    expected = [metrics.dice(np.where(region, warped, -1), np.where(region, fixed, -1), label) for label in labels]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.isnan(got[-1]) and got[3] == 0 and 0 < got[0] < 1


@pytest.mark.parametrize("layout", ["C", "F"])
def test_dice_scores_agree_whatever_the_maps_memory_layout(layout):
    """NIfTI maps are read in Fortran order: a map of each layout must still be compared voxel by voxel."""
    rng = np.random.default_rng(1)
    warped = rng.integers(0, 4, (12, 10, 8)).astype(np.int32)
    fixed = np.where(rng.random(warped.shape) < 0.6, warped, 0).astype(np.int32)
    other = np.asfortranarray(fixed) if layout == "F" else np.ascontiguousarray(fixed)
    np.testing.assert_array_equal(metrics.dice_scores(np.asfortranarray(warped), other, [1, 2, 3]),
                                  metrics.dice_scores(warped, fixed, [1, 2, 3]))


def test_label_overlap_rows_equal_the_per_label_definitions():
    """Each label compared in its own bounding box gives what whole-volume Dice and HD95 give."""
    rng = np.random.default_rng(2)
    shape = (30, 26, 20)
    fixed = np.zeros(shape, np.int32)
    fixed[3:12, 4:20, 2:9] = 4
    fixed[15:29, 10:25, 8:19] = -2  # touches the grid's edge
    fixed[20:24, 1:5, 1:4] = 9  # absent from the warped map
    warped = np.roll(np.where(fixed == 9, 0, fixed), (1, -2, 1), axis=(0, 1, 2))
    warped[rng.random(shape) < 0.02] = 4  # scattered voxels widen its box to the whole grid
    mask = np.ones(shape, bool)
    mask[:, :, -3:] = False
    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    rows = metrics.label_overlap(warped, fixed, affine, [9, 4, -2, 5], mask=mask)
    masked_warped, masked_fixed = np.where(mask, warped, 0), np.where(mask, fixed, 0)
    for row in rows:
        label = row["label"]
        np.testing.assert_equal(row["dice"], metrics.dice(masked_warped, masked_fixed, label))
        np.testing.assert_equal(row["hd95_mm"], metrics.hd95(masked_warped, masked_fixed, label, [1.2, 0.9, 2.0]))
        assert row["voxels_fixed"] == int((masked_fixed == label).sum())
    assert [row["missing"] for row in rows] == ["warped", "", "", "both"]
    assert 0 < rows[1]["dice"] < 1 and rows[1]["hd95_mm"] > 0


def _hd95_by_distance_transforms(a, b, spacing):
    """HD95 by its definition on the voxel grid: each surface voxel's Euclidean distance transform value of the
    other surface, over every voxel of the volume."""
    surface_a, surface_b = metrics._surface(a), metrics._surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return np.percentile(np.concatenate([to_b, to_a]), 95)


def test_hd95_equals_the_distance_transforms_on_anisotropic_voxels():
    rng = np.random.default_rng(3)
    spacing = [0.8, 1.3, 2.5]
    shape = (34, 28, 18)
    a = ndimage.binary_dilation(rng.random(shape) < 0.01, iterations=3)
    b = np.roll(a, (2, -1, 1), axis=(0, 1, 2)) | (rng.random(shape) < 0.002)
    np.testing.assert_allclose(metrics.hd95(a.astype(int), b.astype(int), 1, spacing),
                               _hd95_by_distance_transforms(a, b, spacing), rtol=1e-12)


@pytest.mark.parametrize("linear", [[[0.9, 0.3, 0.0], [-0.2, 1.1, 0.4], [0.1, 0.0, 2.5]],
                                    np.diag([-1.0, 1.2, 2.5])[[0, 2, 1]]], ids=["oblique", "reflected"])
def test_jacobian_determinant_of_an_affine_displacement_is_exact_on_any_grid(linear):
    """u(x) = M x + t: det J = det(I + M) at every voxel, the grid's edges too, whatever the grid's axes."""
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, (-20.0, 5.0, 12.0)
    matrix = np.array([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1], [0.02, 0.15, -0.25]])
    index = np.stack(np.meshgrid(*(np.arange(n) for n in (9, 8, 7)), indexing="ij"), axis=-1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    det = metrics.jacobian_determinant(world @ matrix.T + 4.0, affine)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + matrix), rtol=1e-10)


@pytest.mark.parametrize("planes", [1, 3, 4])
def test_jacobian_determinant_a_few_planes_at_a_time_is_that_of_the_whole_volume(planes):
    """The planes' neighbours join each slab's differences: the edges of the slabs do not show."""
    rng = np.random.default_rng(5)
    field = ndimage.gaussian_filter(rng.normal(0, 4.0, (11, 9, 7, 3)), (1.5, 1.5, 1.5, 0))
    affine = np.diag([1.2, 0.9, 2.0, 1.0])
    whole = metrics.jacobian_determinant(field, affine, planes=len(field))
    assert whole.std() > 0.05  # a field whose determinant varies from plane to plane
    np.testing.assert_allclose(metrics.jacobian_determinant(field, affine, planes=planes), whole, rtol=1e-12)
