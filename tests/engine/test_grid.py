"""World-coordinate sampling, downsampling and dense-field evaluation."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from nipype_inrlddmm import engine


def oblique_affine(spacing=(1.5, 2.0, 2.5), angle=0.3, origin=(-20.0, 10.0, 5.0)):
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * spacing
    affine[:3, 3] = origin
    return affine


def test_sample_matches_scipy_on_an_oblique_grid():
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((12, 10, 8)).astype(np.float32)
    affine = oblique_affine()
    ijk = rng.uniform(0, [11, 9, 7], size=(200, 3))
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    expected = ndimage.map_coordinates(volume.astype(np.float64), ijk.T, order=1)
    got = engine.sample(torch.tensor(volume), torch.tensor(affine, dtype=torch.float32),
                        torch.tensor(world, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_downsample_keeps_world_positions():
    affine = torch.tensor(oblique_affine(), dtype=torch.float32)
    world = engine.world_grid((8, 6, 4), affine)
    # A linear ramp in world x averages to the ramp at the block centre.
    volume = world[..., 0]
    coarse, coarse_affine = engine.downsample(volume, affine, (2, 3, 2))
    assert coarse.shape == (4, 2, 2)
    np.testing.assert_allclose(coarse.numpy(), engine.world_grid(coarse.shape, coarse_affine)[..., 0].numpy(),
                               atol=1e-4)


def test_integrate_constant_velocity_moves_points_by_it():
    v = torch.tensor([1.0, -2.0, 0.5])
    points = torch.randn(10, 3)
    displacement, kinetic = engine.integrate(lambda p, t: v.expand_as(p), points, n_steps=5)
    torch.testing.assert_close(displacement, v.expand_as(points))
    assert kinetic.item() == pytest.approx(v.square().sum().item())


def test_dense_field_with_stride_interpolates_the_full_field():
    affine = torch.tensor(oblique_affine(), dtype=torch.float32)
    # A field that varies over tens of voxels, as registration fields do.
    shape = (40, 36, 24)
    model = engine.ModelConfig(width=96, encoding="fourier", sigma=0.5)
    velocity = engine.new_velocity_field(shape, affine, model, seed=1)
    torch.nn.init.normal_(velocity.output.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    full = engine.dense_displacement(velocity, shape, affine, 4)
    strided = engine.dense_displacement(velocity, shape, affine, 4, stride=3)
    assert full.abs().max() > 1.0
    assert (full - strided).norm(dim=-1).mean() < 0.05 * full.norm(dim=-1).mean()
    torch.testing.assert_close(full[::3, ::3, ::3], strided[::3, ::3, ::3])


def test_dense_field_stride_none_is_the_training_lattice_spacing_per_axis():
    # lung-ct's voxels: the automatic stride is 3 x 3 x 2 voxels, as the fine stage's lattice on that grid.
    affine = torch.diag(torch.tensor([1.366, 1.366, 2.5, 1.0]))
    shape = (31, 25, 13)
    model = engine.ModelConfig(width=96, encoding="fourier", sigma=0.5)
    velocity = engine.new_velocity_field(shape, affine, model, seed=1)
    torch.nn.init.normal_(velocity.output.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    automatic = engine.dense_displacement(velocity, shape, affine, 4, stride=None)
    torch.testing.assert_close(automatic, engine.dense_displacement(velocity, shape, affine, 4, stride=(3, 3, 2)))
    assert not torch.equal(automatic, engine.dense_displacement(velocity, shape, affine, 4, stride=2))
    assert engine.RegistrationConfig().field_stride is None
    assert engine.config_from_options(field_stride=[3, 3, 2]).field_stride == (3, 3, 2)
    with pytest.raises(ValueError, match="field_stride"):
        engine.RegistrationConfig(field_stride=(3, 0, 2))


def test_patch_lattice_spans_each_patch_and_interpolates_a_linear_field_exactly():
    from nipype_inrlddmm.engine.sampling import interpolate_patches, lattice_shape, patch_lattice, patch_shape

    edge = patch_shape((40, 30, 9), 12)
    assert edge == (12, 12, 9)
    lattice = patch_lattice(edge, 2)
    assert lattice.shape[:3] == lattice_shape(edge, 2) == (7, 7, 5)
    torch.testing.assert_close(lattice[0, 0, 0], torch.zeros(3))
    torch.testing.assert_close(lattice[-1, -1, -1], torch.tensor(edge, dtype=torch.float32) - 1)
    spacing = lattice[1:, 0, 0, 0] - lattice[:-1, 0, 0, 0]
    assert spacing.max() <= 2.0 and spacing.min() > 1.5
    # Trilinear interpolation reproduces an affine function of position on every voxel, for every patch.
    corners = torch.tensor([[0.0, 0.0, 0.0], [28.0, 3.0, 0.0], [5.0, 18.0, 0.0]])[:, None, None, None]
    matrix, offset = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, 4.0]]), torch.tensor([3.0, -1.0])
    field = interpolate_patches((corners + lattice) @ matrix.T + offset, edge)
    voxels = corners + patch_lattice(edge, 1)
    assert voxels.shape[1:4] == edge
    torch.testing.assert_close(field, voxels @ matrix.T + offset, atol=1e-4, rtol=0)
    assert interpolate_patches(voxels, edge) is voxels


def test_the_automatic_lattice_stride_is_closest_to_4_mm_and_at_least_2_voxels():
    from nipype_inrlddmm.engine.sampling import lattice_shape, lattice_strides, patch_lattice

    assert lattice_strides(None, (2.0, 2.0, 2.0)) == (2, 2, 2)  # the brains' fine grid
    assert lattice_strides(None, (1.366, 1.366, 2.5)) == (3, 3, 2)  # lung-ct's
    assert lattice_strides(None, (0.5, 2.8, 5.0)) == (8, 2, 2)
    assert lattice_strides(3, (1.366, 1.366, 2.5)) == (3, 3, 3)
    assert lattice_strides((1, 2, 4), (2.0, 2.0, 2.0)) == (1, 2, 4)
    lattice = patch_lattice((12, 12, 12), (3, 3, 2))
    assert lattice.shape[:3] == lattice_shape((12, 12, 12), (3, 3, 2)) == (5, 5, 7)
    assert (lattice[-1, -1, -1] == 11).all()
    config = engine.StageConfig()
    # Without the voxel size (the memory estimate) the count is the automatic stride's largest.
    patches = 48 + config.regularity_patches  # the regularity patches share the lattice
    lung = config.flow_points((64, 64, 64), (1.366, 1.366, 2.5))
    assert lung == patches * 5 * 5 * 7 < config.flow_points((64, 64, 64))
    assert config.flow_points((64, 64, 64)) == patches * 7**3
    assert engine.StageConfig(patch_stride=[3, 3, 2]).patch_stride == (3, 3, 2)
    for bad in (0, (2, 2), (2, 0, 2)):
        with pytest.raises(ValueError, match="patch_stride"):
            engine.StageConfig(patch_stride=bad)


def test_an_image_stage_integrates_the_flow_on_the_lattice_its_voxel_size_gives(monkeypatch):
    from nipype_inrlddmm.engine import optimise

    counts = []

    def counting(velocity, points, n_steps):
        counts.append(len(points))
        return engine.integrate(velocity, points, n_steps)

    monkeypatch.setattr(optimise, "integrate", counting)
    affine = torch.diag(torch.tensor([1.366, 1.366, 2.5, 1.0]))
    volume = torch.rand(30, 30, 20, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(volume.shape, dtype=torch.bool)
    mask[5:25, 5:25, 3:17] = True
    for stride, lattice in ((None, 5 * 5 * 7), (2, 7 * 7 * 7)):
        config = engine.StageConfig(iterations=1, n_patches=3, patch_stride=stride)
        for fixed_mask, regularity in ((mask, config.regularity_patches), (None, 0)):  # none without a mask
            velocity = engine.new_velocity_field(volume.shape, affine, engine.ModelConfig(width=96), seed=0)
            optimise.fit_images(velocity, volume, affine, volume, affine, config, n_steps=4, fixed_mask=fixed_mask)
            assert counts.pop() == (3 + regularity) * lattice


def test_a_sampling_fraction_draws_the_patches_that_cover_it_at_most_n_patches(monkeypatch):
    from nipype_inrlddmm.engine import optimise

    grid = (30, 30, 20)  # 18,000 voxels: half of them is 5.2 patches of 12^3
    assert engine.StageConfig(n_patches=48, sampling_fraction=0.5).patches(grid) == 5
    assert engine.StageConfig(n_patches=3, sampling_fraction=0.5).patches(grid) == 3
    assert engine.StageConfig(n_patches=48, sampling_fraction=1e-6).patches(grid) == 1
    assert engine.StageConfig(n_patches=7).patches(grid) == 7
    with pytest.raises(ValueError, match="sampling_fraction"):
        engine.StageConfig(sampling_fraction=1.5)

    drawn, draw = [], optimise.random_patch_corners

    def counting(shape, n_patches, patch_size, **kwargs):
        drawn.append(n_patches)
        return draw(shape, n_patches, patch_size, **kwargs)

    monkeypatch.setattr(optimise, "random_patch_corners", counting)
    affine = torch.eye(4)
    volume = torch.rand(*grid, generator=torch.Generator().manual_seed(0))
    config = engine.StageConfig(iterations=1, sampling_fraction=0.5)
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[:20] = True
    for fixed_mask in (mask, None):
        velocity = engine.new_velocity_field(volume.shape, affine, engine.ModelConfig(width=96), seed=0)
        optimise.fit_images(velocity, volume, affine, volume, affine, config, n_steps=4, fixed_mask=fixed_mask)
    # with a mask, then the regularity patches: as many fewer as the image patches (24 at 48, 2 at 5); none
    # without one
    assert drawn == [5, round(config.regularity_patches * 5 / config.n_patches), 5] == [5, 2, 5]
    assert config.regularity_patch_count(grid, masked=False) == 0
    assert engine.StageConfig(n_patches=48, sampling_fraction=1e-6).regularity_patch_count(grid) == 1
    assert engine.StageConfig(regularity_patches=0).regularity_patch_count(grid) == 0
    # a distillation draws points the same way: a fraction of the grid, at most batch_points
    assert engine.StageConfig(batch_points=8192, sampling_fraction=1 / 64).points(grid) == round(18_000 / 64)
    assert engine.StageConfig(batch_points=100, sampling_fraction=1 / 64).points(grid) == 100
    assert engine.StageConfig(batch_points=100).points(grid) == 100


def test_patches_are_gathered_from_their_corners_inside_the_grid():
    from nipype_inrlddmm.engine.sampling import gather_patches, patch_shape, random_patch_corners

    volume = torch.arange(40 * 30 * 9, dtype=torch.float32).reshape(40, 30, 9)
    edge = patch_shape(volume.shape, 12)
    corners = random_patch_corners(volume.shape, 50, 12, generator=torch.Generator().manual_seed(0))
    assert corners.min() >= 0 and (corners + torch.tensor(edge) <= torch.tensor(volume.shape)).all()
    patches = gather_patches(volume, corners, edge)
    assert patches.shape == (50, *edge)
    for corner, patch in zip(corners.tolist(), patches):
        x, y, z = corner
        torch.testing.assert_close(patch, volume[x:x + 12, y:y + 12, z:z + 9], rtol=0, atol=0)


def test_world_grid_is_the_affine_of_every_voxel_index():
    affine = oblique_affine()
    ijk = np.stack(np.meshgrid(*map(np.arange, (7, 5, 4)), indexing="ij"), axis=-1)
    np.testing.assert_allclose(engine.world_grid((7, 5, 4), torch.tensor(affine)).numpy(),
                               ijk @ affine[:3, :3].T + affine[:3, 3], atol=1e-12)


def test_warp_reads_the_volume_at_x_plus_d_and_fills_outside_it():
    """On oblique grids of different spacings: trilinear as scipy's map_coordinates at the moving voxel
    index of x + d(x), and ``fill_value`` where that lies over half a voxel beyond the volume."""
    rng = np.random.default_rng(1)
    volume = rng.standard_normal((14, 12, 10)).astype(np.float32)
    moving_affine = oblique_affine((1.5, 2.0, 2.5), 0.3, (-20, 10, 5))
    fixed_affine = oblique_affine((2.0, 1.8, 2.2), -0.2, (-14, 12, 9))
    displacement = rng.normal(0, 3.0, (9, 10, 8, 3))
    ijk = np.stack(np.meshgrid(*map(np.arange, (9, 10, 8)), indexing="ij"), axis=-1)
    points = ijk @ fixed_affine[:3, :3].T + fixed_affine[:3, 3] + displacement
    index = (points - moving_affine[:3, 3]) @ np.linalg.inv(moving_affine[:3, :3]).T
    inside = ((index >= -0.5) & (index <= np.array(volume.shape) - 0.5)).all(axis=-1)
    expected = ndimage.map_coordinates(volume.astype(np.float64), index.reshape(-1, 3).T, order=1, mode="nearest")
    expected = np.where(inside, expected.reshape(inside.shape), -7.0)
    got = engine.warp(*(torch.tensor(a, dtype=torch.float32) for a in (volume, moving_affine, displacement,
                                                                       fixed_affine)), fill_value=-7.0)
    assert 0.2 < inside.mean() < 0.95  # both kinds of voxel are tested
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("interpolation", ["linear", "label"])
def test_resample_is_the_warp_of_a_zero_field(interpolation):
    rng = np.random.default_rng(2)
    volume = torch.tensor(ndimage.zoom(rng.integers(0, 4, (5, 4, 4)), 3, order=0), dtype=torch.float32)
    grids = (((1.5, 2.0, 2.5), 0.3, (-20, 10, 5)), ((2.0, 1.8, 2.2), -0.2, (-14, 12, 9)))
    moving_affine, fixed_affine = (torch.tensor(oblique_affine(*grid), dtype=torch.float32) for grid in grids)
    warped = engine.warp(volume, moving_affine, torch.zeros(9, 10, 8, 3), fixed_affine, interpolation=interpolation)
    resampled = engine.resample(volume, moving_affine, (9, 10, 8), fixed_affine, interpolation=interpolation)
    assert len(resampled.unique()) > 2
    torch.testing.assert_close(resampled, warped, rtol=0, atol=1e-6)


@pytest.mark.parametrize("interpolation", ["nearest", "label"])
def test_label_warp_keeps_only_existing_labels(interpolation):
    labels = torch.zeros(10, 10, 10)
    labels[2:6, 2:6, 2:6] = 3
    labels[6:9, 2:6, 2:6] = 7
    affine = torch.eye(4)
    shift = torch.full((10, 10, 10, 3), 0.4)
    out = engine.warp(labels, affine, shift, affine, interpolation=interpolation)
    assert set(out.unique().tolist()) <= {0.0, 3.0, 7.0}
    assert (out == 3).sum() > 0 and (out == 7).sum() > 0


def test_label_sampling_is_the_arg_max_of_each_label_s_interpolated_indicator():
    """One vote of eight neighbours per point == one trilinear pass per label (ANTs' GenericLabel), on oblique
    grids; float rounding of the weights may flip an exact tie, nothing else."""
    from nipype_inrlddmm.engine.grid import sample_labels

    rng = np.random.default_rng(0)
    labels = torch.tensor(ndimage.zoom(rng.integers(0, 6, (8, 8, 6)), 5, order=0), dtype=torch.float32)
    affine = torch.tensor(oblique_affine(), dtype=torch.float32)
    points = engine.world_grid((45, 44, 33), torch.tensor(oblique_affine((1.2, 1.1, 1.7), 0.1, (-15, 12, 3)),
                                                          dtype=torch.float32))
    points = points + torch.tensor(rng.normal(0, 0.7, points.shape), dtype=torch.float32)
    best = torch.full(points.shape[:3], -1.0)
    expected = torch.zeros_like(best)
    for label in torch.unique(labels):
        weight = engine.sample((labels == label).float(), affine, points)
        expected = torch.where(weight > best, label, expected)
        best = torch.maximum(weight, best)
    got = sample_labels(labels, affine, points)
    assert len(got.unique()) == 6 and (got != labels.flatten()[0]).any()
    assert (got != expected).float().mean() <= 1e-4


#: A grid large enough that the voxel size alone sets the automatic stage factors.
LARGE_GRID = (512, 512, 512)


@pytest.mark.parametrize("spacing, coarse, fine", [
    ((1.0, 1.0, 1.0), (3, 3, 3), (2, 2, 2)),  # MR brain: 3 mm coarse, 2 mm fine
    ((1.366, 1.366, 2.5), (3, 3, 2), (2, 2, 1)),  # chest CT: fine 2.73 mm (nearer 2 mm in ratio than 1.37), coarse 4.1
    ((1.5, 1.5, 1.5), (3, 3, 3), (2, 2, 2)),  # fine at half resolution at least, as ANTs' SyN stops
    ((2.8, 2.7, 5.0), (3, 3, 2), (2, 2, 1)),  # CBCT-like: fine at half the finest resolution, coarse 1.5 x that
    ((3.0, 3.0, 3.0), (3, 3, 3), (2, 2, 2)),  # a CT at 3 mm: fine stage at 6 mm, coarse at 9 mm
])
def test_automatic_stage_factors_follow_the_voxel_size(spacing, coarse, fine):
    affine = torch.tensor(oblique_affine(spacing), dtype=torch.float32)
    assert engine.stage_factors(None, affine, "coarse", LARGE_GRID) == coarse
    assert engine.stage_factors(None, affine, "fine", LARGE_GRID) == fine
    assert engine.stage_factors(4, affine, "coarse", LARGE_GRID) == (4, 4, 4)
    with pytest.raises(ValueError, match="fine_factor"):
        engine.stage_factors((2, 0, 2), affine, "fine", LARGE_GRID)


def test_automatic_stage_factors_leave_small_fields_of_view_two_patch_edges_per_axis():
    """Prostate ultrasound at 0.4 mm: 3 mm and 2 mm voxels would leave grids of 5-11 voxels, one patch."""
    affine = torch.tensor(oblique_affine((0.4, 0.4, 0.4)), dtype=torch.float32)
    shape = (44, 59, 41)
    assert engine.stage_factors(None, affine, "coarse", LARGE_GRID) == (8, 8, 8)  # by the voxel size alone
    assert engine.stage_factors(None, affine, "coarse", shape) == (2, 2, 2)  # the stage's minimum
    assert engine.stage_factors(None, affine, "fine", shape) == (1, 2, 1)  # at least 24 voxels per axis
    assert engine.stage_factors(5, affine, "fine", shape) == (5, 5, 5)  # a factor given is kept
    brain = (160, 192, 224)  # large grids keep the factors of their voxel size
    one_mm = torch.tensor(oblique_affine((1.0, 1.0, 1.0)), dtype=torch.float32)
    assert engine.stage_factors(None, one_mm, "coarse", brain) == engine.stage_factors(None, one_mm, "coarse",
                                                                                       LARGE_GRID)


def test_block_grid_is_the_downsampled_grid():
    affine = torch.tensor(oblique_affine(), dtype=torch.float32)
    volume = torch.rand(13, 10, 7)
    coarse, coarse_affine = engine.downsample(volume, affine, (3, 2, 2))
    shape, grid_affine = engine.block_grid(volume.shape, affine, (3, 2, 2))
    assert shape == tuple(coarse.shape)
    torch.testing.assert_close(grid_affine, coarse_affine)
