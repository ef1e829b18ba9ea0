"""The velocity's window: its taper, the anatomy it is measured from, and the settings it refuses."""

import pytest
import torch

from nipype_inrlddmm import engine
from nipype_inrlddmm.engine.optimise import regularity_centres
from nipype_inrlddmm.engine.stages import velocity_window
from nipype_inrlddmm.engine.window import mask_window, taper


def test_the_taper_is_one_inside_zero_beyond_and_a_smooth_half_cosine_between():
    distance = torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 40.0])
    torch.testing.assert_close(taper(distance, 5.0, 25.0),
                               torch.tensor([1.0, 1.0, 0.8535534, 0.5, 0.1464466, 0.0, 0.0]))


def test_the_window_measures_mm_on_anisotropic_voxels():
    affine = torch.diag(torch.tensor([1.0, 2.0, 4.0, 1.0]))
    mask = torch.zeros(41, 21, 11, dtype=torch.bool)
    mask[20, 10, 5] = True
    window, window_affine = mask_window(mask, affine, 0.0, 8.0)
    assert torch.equal(window_affine, affine.double())
    # 4 mm from the voxel along each axis: 4, 2 and 1 voxels away.
    for ijk in ((24, 10, 5), (20, 12, 5), (20, 10, 6)):
        assert window[ijk].item() == pytest.approx(0.5)
    assert window[20, 10, 5] == 1 and window[30, 10, 5] == 0


def test_a_field_of_view_does_not_stop_the_anatomy_the_moving_image_shows_beyond_it():
    """A CBCT's field of view cuts through the body: the window covers the moving image's foreground too."""
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    shape = (60, 30, 30)
    fov = torch.zeros(shape, dtype=torch.bool)
    fov[:20] = True
    moving = torch.zeros(shape)
    moving[:40] = 1.0  # the body reaches 40 mm past the field of view
    config = engine.RegistrationConfig(velocity_window_mm=(4.0, 12.0), fine_factor=1)
    alone, _ = velocity_window(config, fov, affine)
    joined, _ = velocity_window(config, fov, affine, moving, affine)
    assert alone[35].max() == 0 and (joined[:40] == 1).all()
    assert (joined[48:] == 0).all() and 0 < joined[43].min() < 1


def test_a_window_by_default_only_with_a_mask_that_leaves_some_of_the_grid_out():
    affine = torch.eye(4)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[2:5] = True
    default = engine.RegistrationConfig()
    assert velocity_window(default, mask, affine) is not None
    assert velocity_window(default, None, affine) is None
    assert velocity_window(default, torch.ones_like(mask), affine) is None
    assert velocity_window(engine.RegistrationConfig(velocity_window_mm=None), mask, affine) is None


@pytest.mark.parametrize("radii", [(10.0, 5.0), (5.0, 5.0), (-1.0, 5.0)])
def test_the_radii_must_grow_from_zero(radii):
    with pytest.raises(ValueError, match="velocity_window_mm"):
        engine.RegistrationConfig(velocity_window_mm=radii)


def test_regularity_patches_are_centred_outside_the_mask_where_the_window_lets_the_field_move():
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    mask = torch.zeros(40, 12, 12, dtype=torch.bool)
    mask[:10] = True
    model = engine.ModelConfig(width=16, depth=2)
    window = mask_window(mask, affine, 2.0, 10.0)  # above 0 short of 10 mm: 4 voxels past the mask
    windowed = engine.new_velocity_field(mask.shape, affine, model, seed=0, window=window)
    centres = regularity_centres(windowed, mask, affine)
    assert set(centres[:, 0].tolist()) == set(range(10, 14))
    # Without a window, or with one too narrow to reach a voxel outside the mask, the whole outside.
    plain = engine.new_velocity_field(mask.shape, affine, model, seed=0)
    narrow = engine.new_velocity_field(mask.shape, affine, model, seed=0, window=mask_window(mask, affine, 0.0, 1.0))
    for velocity in (plain, narrow):
        assert torch.equal(regularity_centres(velocity, mask, affine), torch.nonzero(~mask))
