"""The lattice Jacobian determinants and the log det J spread that keeps fields smooth and fold-free."""

import numpy as np
import pytest
import torch
from test_grid import oblique_affine

from nipype_inrlddmm import engine
from nipype_inrlddmm.engine.regularity import lattice_jacobian_determinants, log_jacobian_spread
from nipype_inrlddmm.engine.sampling import lattice_shape, patch_lattice


def _lattice_points(edge, stride, affine):
    lattice = patch_lattice(edge, stride, dtype=torch.float64)
    spacing = [(n - 1) / (q - 1) for n, q in zip(edge, lattice.shape[:3])]
    return engine.apply_affine(affine, lattice), spacing


@pytest.mark.parametrize("affine", [oblique_affine(), np.diag([-1.0, -1.2, 2.5, 1.0])[[0, 2, 1, 3]]],
                         ids=["oblique", "reflected"])
def test_the_lattice_determinants_of_an_affine_displacement_are_exact(affine):
    affine = torch.tensor(affine, dtype=torch.float64)
    points, spacing = _lattice_points((12, 12, 5), 2, affine)
    matrix = torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1], [0.02, 0.15, -0.25]], dtype=torch.float64)
    det = lattice_jacobian_determinants((points @ matrix.T + 4.0)[None], spacing, affine[:3, :3])
    assert det.shape == (8, 1, *(q - 1 for q in lattice_shape((12, 12, 5), 2)))
    torch.testing.assert_close(det, torch.linalg.det(torch.eye(3, dtype=torch.float64) + matrix).expand_as(det))


def test_the_lattice_determinants_of_a_smooth_field_average_to_its_determinant_at_the_cell_centres():
    """Second-order accurate: on 2-3 mm cells of a field varying over 10 mm, det J to within 1 %."""
    affine = torch.tensor(np.diag([2.0, 2.0, 3.0, 1.0]))
    points, spacing = _lattice_points((25, 25, 17), 1, affine)
    x, y, z = points.unbind(-1)
    field = torch.stack([4 * torch.sin(x / 10), 3 * torch.sin(y / 12 + z / 20), 2 * torch.cos(z / 9)], dim=-1)
    det = lattice_jacobian_determinants(field[None], spacing, affine[:3, :3]).mean(dim=0)[0]
    x, y, z = ((points[:-1, :-1, :-1] + points[1:, 1:, 1:]) / 2).unbind(-1)  # the cell centres
    exact = (1 + 0.4 * torch.cos(x / 10)) * (1 + 0.25 * torch.cos(y / 12 + z / 20)) * (1 - 2 / 9 * torch.sin(z / 9))
    assert (det - exact).abs().max() < 0.01
    assert exact.std() > 0.2  # the field does change volume: the comparison tests something


def test_a_field_that_alternates_from_knot_to_knot_is_seen_at_the_corners():
    """The hourglass mode: zero at every cell centre, a volume change of +-40 % at the corners."""
    affine = torch.eye(4, dtype=torch.float64)
    points, spacing = _lattice_points((9, 9, 9), 2, affine)
    index = (points / 2).round().long()
    sign = 1.0 - 2.0 * (index.sum(dim=-1) % 2).to(torch.float64)
    field = torch.stack([0.4 * sign, torch.zeros_like(sign), torch.zeros_like(sign)], dim=-1)
    det = lattice_jacobian_determinants(field[None], spacing, affine[:3, :3])
    torch.testing.assert_close(det.mean(dim=0), torch.ones_like(det[0]))  # the cell centres see nothing
    assert det.sub(1).abs().min() == pytest.approx(0.4)
    assert log_jacobian_spread(det, 0.1) > 0.01


def test_the_spread_is_the_variance_of_small_log_det_deviations_and_grows_linearly_past_the_scale():
    assert log_jacobian_spread(torch.full((5,), 1.7, dtype=torch.float64), 0.1).item() == pytest.approx(0, abs=1e-12)
    small = torch.tensor([0.999, 1.0, 1.001, 1.002], dtype=torch.float64)
    assert log_jacobian_spread(small, 0.1).item() == pytest.approx(np.var(np.log(small.numpy())), rel=1e-3)
    # A large deviation costs 2 s |x| - 2 s^2 (asymptotically): in proportion, not by its square.
    large = torch.tensor([np.exp(1.0), np.exp(-1.0)], dtype=torch.float64)
    assert log_jacobian_spread(large, 0.1).item() == pytest.approx(2 * 0.1 * 1.0 - 2 * 0.1**2, rel=0.01)
    assert log_jacobian_spread(large, 1e3).item() == pytest.approx(1.0, rel=1e-5)  # a large scale: the variance


@pytest.mark.parametrize("det", [0.005, -0.5])
def test_a_folded_or_collapsing_cell_is_pushed_back_towards_a_positive_determinant(det):
    dets = torch.tensor([det, 1.0], dtype=torch.float64, requires_grad=True)
    penalty = log_jacobian_spread(dets, 0.1)
    penalty.backward()
    assert torch.isfinite(penalty) and penalty.item() > 0.1 * abs(np.log(1e-2)) / 2
    assert dets.grad[0] < 0  # descending the penalty raises det J


def test_the_penalty_enters_the_image_loss_with_its_weight(monkeypatch):
    """An image stage adds jacobian_weight x the penalty on its lattice, and logs the term."""
    from nipype_inrlddmm.phantom import make_pair

    pair = make_pair((32, 28, 16), seed=0)
    affine = torch.tensor(pair.affine, dtype=torch.float32)
    moving, fixed = (engine.normalise_intensity(torch.tensor(v, dtype=torch.float32)) for v in (pair.ct, pair.cbct))

    def first_row(weight):
        velocity = engine.new_velocity_field(fixed.shape, affine, engine.ModelConfig(width=96), seed=0)
        torch.nn.init.normal_(velocity.output.weight, std=0.05, generator=torch.Generator().manual_seed(1))
        config = engine.StageConfig(iterations=1, jacobian_weight=weight)
        return engine.fit_images(velocity, moving, affine, fixed, affine, config, n_steps=4,
                                 generator=torch.Generator().manual_seed(2))[0]

    off, on = first_row(0.0), first_row(2.0)
    assert on["log_jacobian_spread"] > 0 and "log_jacobian_spread" not in off
    assert on["loss"] - off["loss"] == pytest.approx(2.0 * on["log_jacobian_spread"], rel=1e-4)
    with pytest.raises(ValueError, match="jacobian_weight"):
        engine.StageConfig(jacobian_weight=-1.0)
    with pytest.raises(ValueError, match="jacobian_scale"):
        engine.StageConfig(jacobian_scale=0.0)


def test_the_dense_jacobian_determinant_is_exact_for_an_affine_field_and_matches_a_batched_determinant():
    """metrics.jacobian_determinant (what dice.csv and the QC figure report), on an oblique grid."""
    from nipype_inrlddmm.evaluation import metrics

    affine = oblique_affine()
    world = engine.world_grid((9, 8, 7), torch.tensor(affine)).numpy()
    matrix = np.array([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1], [0.02, 0.15, -0.25]])
    det = metrics.jacobian_determinant(world @ matrix.T, affine)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + matrix), rtol=1e-10)

    field = np.random.default_rng(0).standard_normal((9, 8, 7, 3))
    per_index = np.stack(np.gradient(field, axis=(0, 1, 2)), axis=-1)  # (..., component, array axis)
    expected = np.linalg.det(per_index @ np.linalg.inv(affine[:3, :3]) + np.eye(3))
    np.testing.assert_allclose(metrics.jacobian_determinant(field, affine), expected, rtol=1e-10, atol=1e-12)


def test_weights_scale_each_value_s_cost_about_one_shared_mean():
    dets = torch.tensor([0.9, 1.0, 1.3, 1.1], dtype=torch.float64)
    assert log_jacobian_spread(dets, 0.1, weights=torch.ones(4, dtype=torch.float64)).item() == pytest.approx(
        log_jacobian_spread(dets, 0.1).item(), rel=1e-12)
    weights = torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=torch.float64)
    log_det = dets.log()
    deviation = (log_det - log_det.mean()) / 0.1  # the mean of all four, not of each weight's group
    expected = 2 * 0.1**2 * (weights * ((1 + deviation.square()).sqrt() - 1)).mean()
    assert log_jacobian_spread(dets, 0.1, weights=weights).item() == pytest.approx(expected.item(), rel=1e-12)


def test_with_a_mask_the_regularity_patches_lie_outside_it_at_the_outside_weight(monkeypatch):
    """The image patches are centred in the mask, the regularity patches outside it; their cells' spread
    weighs outside_jacobian_weight / jacobian_weight times the image patches' cells'."""
    from nipype_inrlddmm.engine import optimise
    from nipype_inrlddmm.phantom import make_pair

    pair = make_pair((32, 28, 16), seed=0)
    affine = torch.tensor(pair.affine, dtype=torch.float32)
    moving, fixed = (engine.normalise_intensity(torch.tensor(v, dtype=torch.float32)) for v in (pair.ct, pair.cbct))
    mask = torch.zeros(fixed.shape, dtype=torch.bool)
    mask[8:24, 6:22, 4:12] = True
    draws, spreads = [], []
    draw, spread = optimise.random_patch_corners, optimise.log_jacobian_spread
    monkeypatch.setattr(optimise, "random_patch_corners",
                        lambda *a, **k: draws.append(k.get("candidates")) or draw(*a, **k))
    monkeypatch.setattr(optimise, "log_jacobian_spread", lambda det, scale, **k: (
        spreads.append((det.shape, k.get("weights"))) or spread(det, scale, **k)))

    def run(outside_weight, fixed_mask):
        draws.clear(), spreads.clear()
        velocity = engine.new_velocity_field(fixed.shape, affine, engine.ModelConfig(width=96), seed=0)
        config = engine.StageConfig(iterations=1, n_patches=4, patch_size=8, regularity_patches=2,
                                    jacobian_weight=2.0, outside_jacobian_weight=outside_weight)
        engine.fit_images(velocity, moving, affine, fixed, affine, config, n_steps=2, fixed_mask=fixed_mask,
                          generator=torch.Generator().manual_seed(2))
        return list(draws), list(spreads)

    (image, regularity), [(shape, weights)] = run(8.0, mask)
    assert mask[tuple(image.T)].all() and not mask[tuple(regularity.T)].any()
    assert shape[1] == 6 and weights.flatten().tolist() == [1.0] * 4 + [4.0] * 2
    (image, regularity), [(_, weights)] = run(None, mask)  # no outside weight: anywhere, one weight
    assert regularity is None and weights is None
    (image,), [(shape, weights)] = run(8.0, None)  # no mask: image patches anywhere, no regularity patches
    assert image is None and weights is None and shape[1] == 4
    with pytest.raises(ValueError, match="outside_jacobian_weight"):
        engine.StageConfig(outside_jacobian_weight=-1.0)
