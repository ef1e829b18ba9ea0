"""End-to-end registrations: accuracy on a known deformation, geometry, determinism, distillation."""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import voxel_epe
from scipy import ndimage

from nipype_inrlddmm import engine, io, register
from nipype_inrlddmm.evaluation import metrics
from nipype_inrlddmm.phantom import LABELS, make_pair

pytestmark = pytest.mark.slow

#: Few iterations: enough to test behaviour, not accuracy.
QUICK = dict(coarse_iterations=60, distill_iterations=20, fine_iterations=40)


@pytest.fixture(scope="module")
def phantom():
    return make_pair((128, 112, 48), seed=0)


def test_phantom_registration_recovers_the_known_deformation(phantom):
    """Package defaults on a CT -> CBCT phantom: EPE, Dice of every label, a smooth fold-free invertible field."""
    pair = phantom
    result = register((pair.ct, pair.affine), (pair.cbct, pair.affine),
                      fixed_mask=(pair.cbct_fov, pair.affine), seed=0)
    body = pair.cbct_labels > 0
    assert voxel_epe(result.displacement, pair.displacement, pair.affine, body) < 1.5

    warped = result.apply((pair.ct_labels, pair.affine), interpolation="nearest")
    before = metrics.label_overlap(pair.ct_labels, pair.cbct_labels, pair.affine, LABELS, mask=pair.cbct_fov)
    after = metrics.label_overlap(warped, pair.cbct_labels, pair.affine, LABELS, mask=pair.cbct_fov)
    for row_before, row_after in zip(before, after):
        assert row_after["dice"] > 0.85, row_after
        assert row_after["dice"] > row_before["dice"], (row_before, row_after)
    regularity = metrics.jacobian_summary(result.displacement, pair.affine)
    truth = metrics.jacobian_summary(pair.displacement, pair.affine)
    assert regularity["jacobian_nonpositive_percent"] == 0, regularity
    # The true field is a few smooth bumps (SDlogJ 0.034): the recovered one may add the noise of matching
    # two images of different contrast, but not the few-voxel speckle of an unregularised fit (0.16).
    assert regularity["sdlogj"] < 3 * truth["sdlogj"], (regularity, truth)

    # The flow integrated backwards undoes it: every second field-of-view voxel comes back within 0.05 voxel.
    affine = torch.tensor(pair.affine, dtype=torch.float32)
    points = engine.world_grid(pair.cbct.shape, affine)[torch.from_numpy(pair.cbct_fov)][::2]
    n_steps = result.model.config.n_steps
    with torch.no_grad():
        forward, _ = engine.integrate(result.model, points, n_steps)
        back = engine.integrate_backward(result.model, points + forward, n_steps)
    spacing = torch.tensor(np.linalg.norm(pair.affine[:3, :3], axis=0), dtype=torch.float32)
    assert (forward / spacing).norm(dim=1).max() > 2  # the flow moved the points: the round trip tests something
    assert (forward + back).div(spacing).norm(dim=1).max() < 0.05


def test_beyond_the_window_the_field_is_one_translation_and_the_model_keeps_the_window(tmp_path):
    """Beyond the window's outer radius from the anatomy (the fixed mask, and the moving image's foreground)
    every point moves by the network's output bias alone; the saved model carries the window, so its flow
    (the inverse's too) is the registration's."""
    pair = make_pair((40, 36, 20), seed=1)
    box = np.zeros(pair.cbct.shape, bool)
    box[12:28, 10:26, 5:15] = True
    moving = np.where(box, pair.ct, pair.ct.min())  # air beyond the box: no anatomy there in either image
    result = register((moving, pair.affine), (pair.cbct, pair.affine), fixed_mask=(box, pair.affine),
                      velocity_window_mm=(5.0, 20.0), seed=0, **QUICK)
    spacing = np.linalg.norm(pair.affine[:3, :3], axis=0)  # 8-12 mm: the window's grid is the fixed grid
    distance = ndimage.distance_transform_edt(~box, sampling=spacing)
    # Past 20 mm, and the dense field's interpolation lattice (2 voxels apart) with it.
    far = distance > 20.0 + 2 * np.sqrt(3) * spacing.max()
    drift = (result.model.output.bias * result.model.scale).detach().numpy()
    # Up to float32's rounding of positions a few hundred mm from the origin, over 4 Euler steps.
    rounding = 1e-3
    assert far.sum() > 10000 and np.abs(result.displacement[far] - drift).max() < rounding
    assert np.linalg.norm(result.displacement - drift, axis=-1)[box].max() > 1.0  # mm: the anatomy moved

    path = io.save_checkpoint(tmp_path / "model.pt", result.model, shape=pair.cbct.shape, affine=pair.affine)
    loaded = io.load_checkpoint(path, shape=pair.cbct.shape, affine=pair.affine)
    affine = torch.tensor(pair.affine, dtype=torch.float32)
    points = engine.world_grid(pair.cbct.shape, affine).reshape(-1, 3)[::7]
    with torch.no_grad():
        assert torch.equal(loaded(points, 0.25), result.model(points, 0.25))
        back = engine.integrate_backward(loaded, points, result.model.config.n_steps)
    assert (back[torch.from_numpy(far.reshape(-1)[::7])] + torch.from_numpy(drift)).abs().max() < rounding
    # A warm start from the saved model continues the windowed field, whatever the options say.
    warm = register((moving, pair.affine), (pair.cbct, pair.affine), fixed_mask=(box, pair.affine), initial=loaded,
                    warm_iterations=3)
    assert torch.equal(warm.model.window, loaded.window)
    warm_drift = (warm.model.output.bias * warm.model.scale).detach().numpy()
    assert np.abs(warm.displacement[far] - warm_drift).max() < rounding


def test_moving_on_another_grid_gives_the_same_result_as_after_resampling():
    """A CT on its own oblique, finer, differently shaped grid == that CT resampled onto the CBCT grid."""
    angle = np.deg2rad(8.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rotation @ np.diag([2.2, 2.0, 4.0])
    oblique_shape = (170, 160, 62)
    oblique[:3, 3] = -oblique[:3, :3] @ ((np.array(oblique_shape) - 1) / 2)
    # The phantom is analytic: the CT is evaluated exactly on the oblique grid.
    pair = make_pair((128, 112, 48), seed=0, ct_grid=(oblique_shape, oblique))
    fixed_affine = torch.tensor(pair.affine, dtype=torch.float32)
    moving_common = engine.warp(torch.tensor(pair.ct), torch.tensor(oblique, dtype=torch.float32),
                                torch.zeros(*pair.cbct.shape, 3), fixed_affine, fill_value=-1000.0).numpy()
    fixed = (pair.cbct, pair.affine)
    mask = (pair.cbct_fov, pair.affine)
    on_own_grid = register((pair.ct, oblique), fixed, fixed_mask=mask, seed=0, **QUICK)
    on_common_grid = register((moving_common, pair.affine), fixed, fixed_mask=mask, seed=0, **QUICK)

    body = pair.cbct_labels > 0
    assert voxel_epe(on_own_grid.displacement, on_common_grid.displacement, pair.affine, body) < 0.5
    difference = np.abs(on_own_grid.warped - on_common_grid.warped)[body].mean()
    assert difference < 0.1 * moving_common[body].std()
    # And both registered (as accurately as the main phantom test demands).
    for result in (on_own_grid, on_common_grid):
        assert voxel_epe(result.displacement, pair.displacement, pair.affine, body) < 1.5


def test_same_seed_gives_the_same_field_and_another_seed_does_not():
    pair = make_pair((48, 40, 20), seed=5)
    # Four patches per iteration: determinism does not depend on how much work an iteration does.
    settings = dict(coarse_iterations=15, distill_iterations=5, fine_iterations=10, n_patches=4, num_threads=2)
    first = register((pair.ct, pair.affine), (pair.cbct, pair.affine), seed=7, **settings)
    second = register((pair.ct, pair.affine), (pair.cbct, pair.affine), seed=7, **settings)
    other = register((pair.ct, pair.affine), (pair.cbct, pair.affine), seed=8, **settings)
    assert np.array_equal(first.displacement, second.displacement)
    assert np.abs(first.displacement).max() > 0.1
    assert not np.array_equal(first.displacement, other.displacement)


def test_a_block_averaged_fine_stage_still_gives_the_field_on_every_fixed_voxel():
    """On a 1 mm grid the fine stage runs at 2 mm; the result is the network integrated at full resolution."""
    pair = make_pair((48, 48, 48), seed=2)  # 2 mm blocks leave 24 voxels per axis: the automatic factors stand
    one_mm = pair.affine @ np.diag([1 / pair.affine[0, 0], 1 / pair.affine[1, 1], 1 / pair.affine[2, 2], 1.0])
    assert engine.stage_factors(None, torch.tensor(one_mm), "fine", pair.cbct.shape) == (2, 2, 2)
    result = register((pair.ct, one_mm), (pair.cbct, one_mm), coarse_iterations=5, distill_iterations=3,
                      fine_iterations=5, field_stride=1, num_threads=2)
    assert result.displacement.shape == (*pair.cbct.shape, 3)
    full = engine.dense_displacement(result.model, pair.cbct.shape, torch.tensor(one_mm, dtype=torch.float32),
                                     result.model.config.n_steps)
    np.testing.assert_allclose(result.displacement, full.numpy(), atol=1e-5)
    assert np.abs(result.displacement).max() > 0.05
    assert result.model.config.width == 96  # a 24^3 fine grid: the automatic width's smaller network


def test_the_automatic_width_follows_the_fine_grid_and_a_given_width_stays():
    """128 units where the fine stage's grid has more than 64^3 voxels, 96 up to that; the fine grid, not the
    fixed one, decides: a 1 mm grid is averaged in 2 mm blocks."""
    auto = engine.RegistrationConfig()
    one_mm = torch.eye(4)
    assert engine.sized_config(auto, (160, 192, 224), one_mm).model.width == 128
    assert engine.sized_config(auto, (130, 128, 128), one_mm).model.width == 128  # 65 x 64 x 64 at 2 mm
    assert engine.sized_config(auto, (128, 128, 128), one_mm).model.width == 96  # 64^3 at 2 mm
    assert engine.sized_config(engine.config_from_options(width=40), (160, 192, 224), one_mm).model.width == 40
    with pytest.raises(ValueError, match="automatic"):
        engine.VelocityField(torch.zeros(3), torch.ones(3), auto.model)


def test_distillation_alone_reproduces_a_coarse_field_at_fine_resolution(phantom):
    """Default distillation settings, from an untrained network, fit a given coarse field."""
    pair = phantom
    affine = torch.tensor(pair.affine, dtype=torch.float32)
    truth = torch.tensor(pair.displacement)
    coarse = torch.stack([engine.downsample(truth[..., c], affine, (2, 2, 2))[0] for c in range(3)], dim=-1)
    coarse_affine = engine.downsample(truth[..., 0], affine, (2, 2, 2))[1]
    config = engine.RegistrationConfig()
    model = engine.sized_config(config, pair.ct.shape, affine).model  # as the coarse stage sizes it
    untrained = engine.new_velocity_field(pair.ct.shape, affine, model, seed=0)
    given = engine.StageResult(untrained, coarse, coarse_affine, log=[])

    distilled = engine.distill_stage(given, pair.ct.shape, affine, config)
    assert distilled.displacement is None  # the fine stage needs only the weights
    field = engine.dense_displacement(distilled.velocity, pair.ct.shape, affine, config.model.n_steps,
                                      stride=config.field_stride)
    upsampled = engine.resample_field(coarse, coarse_affine, engine.world_grid(pair.ct.shape, affine))
    inside = np.ones(pair.ct.shape, bool)
    assert voxel_epe(field.numpy(), upsampled.numpy(), pair.affine, inside) < 0.5
    assert distilled.log[-1]["field_error"] < distilled.log[0]["field_error"]


def _brain_pair_at_2mm(folder):
    """Subjects A and B on their shared grid, smoothed and subsampled to 2 mm."""

    def load(name, labels=False):
        image = nib.load(str(folder / name))
        data = np.asarray(image.dataobj, np.float32)
        data = data if labels else ndimage.gaussian_filter(data, 0.8)
        return data[::2, ::2, ::2], image.affine @ np.diag([2.0, 2.0, 2.0, 1.0])

    return [load(name, labels=name.endswith("aseg.nii.gz")) for name in
            ("subjectA_T1w.nii.gz", "subjectA_aseg.nii.gz", "subjectB_T1w.nii.gz", "subjectB_aseg.nii.gz")]


def test_real_brain_pair_dice_rises_above_unregistered(real_data):
    folder = real_data / "brain-pair"
    (moving, moving_affine), (moving_labels, _), (fixed, fixed_affine), (fixed_labels, _) = _brain_pair_at_2mm(folder)
    labels = sorted(io.load_label_names(folder / "labels.tsv"))
    assert len(labels) == 30

    def mean_dice(warped):
        return np.mean([row["dice"] for row in metrics.label_overlap(warped, fixed_labels, fixed_affine, labels)])

    unregistered = mean_dice(moving_labels)
    assert unregistered == pytest.approx(0.522, abs=0.03)  # the README's full-resolution figure
    result = register((moving, moving_affine), (fixed, fixed_affine),
                      fixed_mask=(fixed > 0.05, fixed_affine), seed=0)
    registered = mean_dice(result.apply((moving_labels, moving_affine), interpolation="nearest"))
    assert registered > max(unregistered, 0.522) + 0.05, (unregistered, registered)
    assert metrics.jacobian_summary(result.displacement, fixed_affine)["jacobian_nonpositive_percent"] < 0.1


def test_relative_decrease_is_the_fitted_fall_over_the_last_window():
    falling = [1.0 - 0.01 * i for i in range(11)]  # 1.0 -> 0.9: a tenth of a mean of 0.95
    assert engine.relative_decrease(falling, 11) == pytest.approx(0.1 / 0.95)
    assert engine.relative_decrease([50.0, -7.0] + falling, 11) == pytest.approx(0.1 / 0.95)
    rising = falling[::-1]
    assert engine.relative_decrease(rising, 11) == pytest.approx(-0.1 / 0.95)
    # Noise around a level (an LNCC plateau is negative) is no trend: the fit averages it out.
    noisy = [-0.5 + (0.02 if i % 2 else -0.02) for i in range(40)]
    assert abs(engine.relative_decrease(noisy, 40)) < 0.01


def _fit_small_phantom(**settings) -> list[dict]:
    """The log of an image stage on a small phantom pair, from an untrained network and fixed patch draws."""
    pair = make_pair((32, 28, 16), seed=3)
    affine = torch.tensor(pair.affine, dtype=torch.float32)
    moving = engine.normalise_intensity(torch.tensor(pair.ct))
    fixed = engine.normalise_intensity(torch.tensor(pair.cbct))
    velocity = engine.new_velocity_field(fixed.shape, affine, engine.ModelConfig(width=96), seed=0)
    config = engine.StageConfig(**{"n_patches": 4, "patch_size": 8, **settings})
    return engine.fit_images(velocity, moving, affine, fixed, affine, config, n_steps=2,
                             generator=torch.Generator().manual_seed(0))


def test_an_image_stage_stops_at_the_first_window_whose_loss_fell_too_little():
    assert len(_fit_small_phantom(iterations=30)) == 30
    # Any fall counts as too little against an unreachable threshold: the stage stops at the first full window.
    assert len(_fit_small_phantom(iterations=30, convergence_window=10, convergence_threshold=1e9)) == 10


def test_the_mutual_information_term_is_added_with_its_weight():
    def first_similarity(**settings):
        return _fit_small_phantom(iterations=1, **settings)[0]["similarity"]

    # The same patches and the same untrained network: only the weight of the term differs.
    lncc_alone = first_similarity(mi_weight=0.0)
    half, whole = first_similarity(mi_weight=0.5) - lncc_alone, first_similarity(mi_weight=1.0) - lncc_alone
    assert half < -0.1  # the mutual information of the phantom's CT and CBCT patches is positive
    assert whole == pytest.approx(2 * half, rel=1e-4)
    assert first_similarity(similarity="mi", mi_weight=0.5) == pytest.approx(first_similarity(similarity="mi",
                                                                                              mi_weight=0.0))
    # With MIND descriptors the mutual information still compares the intensities, of the same samples.
    mind_alone = first_similarity(similarity="mind", mi_weight=0.0)
    assert 0 < mind_alone < 1
    assert first_similarity(similarity="mind", mi_weight=0.5) - mind_alone == pytest.approx(half, rel=1e-4)


def test_a_mind_stage_lowers_its_descriptor_distance():
    def late_distance(**settings):  # over the last ten iterations' patches, the same draws in every run
        log = _fit_small_phantom(iterations=40, similarity="mind", mi_weight=0.0, **settings)
        return sum(row["similarity"] for row in log[-10:])

    assert late_distance() < 0.85 * late_distance(learning_rate=1e-12)  # trained against (almost) untrained


def test_stage_settings_are_checked():
    with pytest.raises(ValueError, match="mi_weight"):
        engine.StageConfig(mi_weight=-0.5)
    with pytest.raises(ValueError, match="convergence_window"):
        engine.StageConfig(convergence_window=1)
    with pytest.raises(ValueError, match="mind_distance_mm"):
        engine.StageConfig(similarity="mind", mind_distance_mm=0)
    with pytest.raises(ValueError, match="convergence_threshold"):
        engine.StageConfig(convergence_threshold=-0.1)
