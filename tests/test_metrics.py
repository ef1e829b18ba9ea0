"""Evaluation metrics: the vectorised Dice against its per-label definition."""

import numpy as np
import pytest

from nipype_inrlddmm import metrics


@pytest.mark.parametrize("with_mask", [False, True])
def test_dice_scores_equal_the_per_label_dice_of_every_label_asked(with_mask):
    rng = np.random.default_rng(0)
    warped = rng.choice([-3, 0, 2, 7, 1000], size=(20, 18, 16)).astype(np.int32)
    fixed = np.where(rng.random(warped.shape) < 0.7, warped, rng.choice([0, 2, 7, 9], size=warped.shape))
    mask = rng.random(warped.shape) < 0.5 if with_mask else None
    labels = [1000, 2, -3, 9, 7, 5]  # unsorted; 9 only in the fixed map, 5 in neither
    got = metrics.dice_scores(warped, fixed, labels, mask)
    region = np.ones(warped.shape, bool) if mask is None else mask
    expected = [metrics.dice(np.where(region, warped, 0), np.where(region, fixed, 0), label) for label in labels]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.isnan(got[-1]) and got[3] == 0 and 0 < got[0] < 1
