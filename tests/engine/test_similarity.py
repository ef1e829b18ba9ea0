"""Image dissimilarities on patches."""

import math

import torch
import torch.nn.functional as F

from nipype_inrlddmm.engine.similarity import box_mean, lncc, mind, mind_ssc, mutual_information, ncc


def test_box_mean_is_the_mean_of_every_cube_inside():
    x = torch.rand(3, 9, 8, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = F.avg_pool3d(x[:, None], kernel_size=4, stride=1)[:, 0]
    torch.testing.assert_close(box_mean(x, 4), expected)
    assert box_mean(x, 4).shape == (3, 6, 5, 4)


def test_lncc_is_minus_one_under_a_local_affine_change_of_intensity():
    random = torch.Generator().manual_seed(0)
    fixed = torch.rand(4, 12, 12, 12, generator=random)
    # A different gain and offset per patch, as CBCT's shifted and scaled HU.
    gain, offset = torch.tensor([0.5, 2.0, 3.0, 1.0]), torch.tensor([0.1, -0.4, 2.0, 0.0])
    warped = fixed * gain[:, None, None, None] + offset[:, None, None, None]
    assert lncc(warped, fixed).item() < -0.999
    assert abs(lncc(torch.rand(4, 12, 12, 12, generator=random), fixed).item()) < 0.05
    assert ncc(warped, fixed).item() > -0.999  # the global measure is not invariant to it


def test_lncc_gradient_pulls_towards_the_fixed_patch():
    random = torch.Generator().manual_seed(1)
    fixed = torch.rand(2, 10, 10, 10, generator=random)
    warped = (fixed + 0.3 * torch.rand(2, 10, 10, 10, generator=random)).requires_grad_()
    loss = lncc(warped, fixed)
    loss.backward()
    with torch.no_grad():
        assert lncc(warped - 0.05 * warped.grad / warped.grad.abs().max(), fixed) < loss


def test_mutual_information_is_largest_for_any_one_to_one_intensity_map():
    random = torch.Generator().manual_seed(2)
    fixed = torch.rand(8, 10, 10, 10, generator=random)
    same = mutual_information(fixed, fixed)
    # The fixed image's entropy over 32 bins bounds the MI: at most log(32) = 3.47 nats.  The warped
    # sample's B-spline spreads it over four bins, which costs about one nat.
    assert -3.47 < same.item() < -2.0
    # MI, unlike NCC, does not care how intensities map, only that they map one to one.
    assert abs(mutual_information(1 - fixed, fixed).item() - same.item()) < 0.02
    assert mutual_information(torch.rand(8, 10, 10, 10, generator=random), fixed).item() > -0.05


def test_mutual_information_gradient_matches_finite_differences():
    random = torch.Generator().manual_seed(3)
    fixed = torch.rand(2, 8, 8, 8, dtype=torch.float64, generator=random)
    warped = (0.6 * fixed + 0.3 * torch.rand(2, 8, 8, 8, dtype=torch.float64, generator=random)).requires_grad_()
    gradient, = torch.autograd.grad(mutual_information(warped, fixed), warped)
    for voxel in (0, 333, 1000):
        step = torch.zeros_like(warped).reshape(-1)
        step[voxel] = 1e-6
        step = step.reshape(warped.shape)
        numeric = (mutual_information(warped + step, fixed) - mutual_information(warped - step, fixed)) / 2e-6
        assert abs(gradient.reshape(-1)[voxel].item() - numeric.item()) < 1e-3 * gradient.abs().max().item()


def _blobs(n: int, shift: int) -> torch.Tensor:
    """An ``(n, n, n)`` scene of four soft spheres of different intensities, moved ``shift`` voxels along x."""
    x, y, z = torch.meshgrid(*(torch.arange(n, dtype=torch.float32),) * 3, indexing="ij")
    scene = torch.zeros(n, n, n)
    for cx, cy, cz, radius, level in [(14, 15, 20, 7, 0.3), (26, 24, 18, 6, 0.6), (20, 28, 26, 5, 0.9),
                                      (22, 12, 14, 4, 0.75)]:
        distance = ((x - cx - shift) ** 2 + (y - cy) ** 2 + (z - cz) ** 2).sqrt()
        scene = torch.maximum(scene, level * torch.sigmoid((radius - distance) * 2))
    return scene


def test_mind_finds_a_shift_under_a_non_monotonic_intensity_map_where_lncc_does_not():
    # Another modality: intensities pass through a cosine (two tissues of one brightness in the moving
    # image can differ in the fixed one, and the reverse) and a gain that drifts across the field of view.
    n, truth = 40, 3
    moving = _blobs(n, 0)
    drift = 0.6 + 0.4 * torch.arange(n, dtype=torch.float32)[:, None, None] / n
    fixed = torch.cos(4 * math.pi * _blobs(n, truth)) * drift
    moving_mind, fixed_mind = mind_ssc(moving, (1.0, 1.0, 1.0)), mind_ssc(fixed, (1.0, 1.0, 1.0))
    inside = (slice(8, 32),) * 3
    shifts = range(-6, 7)

    def best(cost):
        return min(shifts, key=cost)

    assert best(lambda s: mind(moving_mind.roll(s, 1)[(slice(None), *inside)][:, None],
                               fixed_mind[(slice(None), *inside)][:, None]).item()) == truth
    assert best(lambda s: lncc(moving.roll(s, 0)[inside][None], fixed[inside][None]).item()) != truth


def test_mind_descriptors_are_in_mm_and_ignore_the_intensity_scale():
    volume = _blobs(30, 0)
    descriptors = mind_ssc(volume, (1.0, 1.0, 1.0))
    assert descriptors.shape == (12, 30, 30, 30)
    assert 0 < descriptors.min() and descriptors.max() <= 1
    torch.testing.assert_close(mind_ssc(5 * volume + 2, (1.0, 1.0, 1.0)), descriptors, atol=1e-5, rtol=1e-4)
    # The same distances on a grid of 0.5 mm voxels are twice as many voxels.
    torch.testing.assert_close(mind_ssc(volume, (0.5, 0.5, 0.5), distance_mm=1.0, radius_mm=1.0),
                               mind_ssc(volume, (1.0, 1.0, 1.0), distance_mm=2.0, radius_mm=2.0))
    assert not torch.allclose(mind_ssc(volume, (1.0, 1.0, 1.0), distance_mm=1.0, radius_mm=1.0),
                              mind_ssc(volume, (1.0, 1.0, 1.0), distance_mm=2.0, radius_mm=2.0))
    assert torch.equal(mind_ssc(torch.zeros(8, 8, 8), (1.0, 1.0, 1.0)), torch.ones(12, 8, 8, 8))
