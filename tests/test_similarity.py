"""Image dissimilarities on patches."""

import torch
import torch.nn.functional as F

from nipype_inrlddmm.engine.similarity import box_mean, lncc, mutual_information, ncc


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
