"""A diverging optimisation is caught within an iteration, retried once with a smaller step, then refused."""

import math

import pytest
import torch

from nipype_inrlddmm.engine import DivergenceError
from nipype_inrlddmm.engine.optimise import StageConfig, _optimise


def _quadratic(blow_up_at=()):
    """A network of one weight pulled to 3; at the iterations in ``blow_up_at`` its loss is NaN, as a
    diverging step would make it (each listed iteration once)."""
    weight = torch.nn.Parameter(torch.tensor([0.0]))
    module = torch.nn.Module()
    module.weight = weight
    pending = list(blow_up_at)

    def objective(iteration):
        loss = ((weight - 3.0) ** 2).sum()
        if pending and iteration == pending[0]:
            pending.pop(0)
            return loss * math.nan, {}
        return loss, {}

    return module, weight, objective


def test_one_divergence_restarts_from_the_last_good_weights_and_the_stage_finishes(caplog):
    module, weight, objective = _quadratic(blow_up_at=[20])
    config = StageConfig(iterations=60, learning_rate=0.1)
    with caplog.at_level("WARNING", logger="nipype_inrlddmm"):
        log = _optimise(module, objective, config, stage="fine", progress=False)
    assert len(log) == 60 and all(math.isfinite(row["loss"]) for row in log)
    assert "the fine stage diverged at iteration 20" in caplog.text and "a tenth of the step" in caplog.text
    assert abs(weight.item() - 3.0) < 2.5  # still moving towards 3, from the last good weights


@pytest.mark.parametrize("blow_up_at, again", [([20, 20], 20), ([20, 35], 35)])
def test_diverging_again_stops_the_stage_naming_it(blow_up_at, again):
    """At once on restarting, or later: the second divergence is the stage's failure."""
    module, _, objective = _quadratic(blow_up_at=blow_up_at)
    with pytest.raises(DivergenceError, match=f"the coarse stage diverged at iteration {again} .* again after "
                                              "restarting at iteration 20"):
        _optimise(module, objective, StageConfig(iterations=60, learning_rate=0.1), stage="coarse", progress=False)


def test_a_loss_far_above_where_it_stood_after_the_first_iterations_is_divergence():
    from nipype_inrlddmm.engine.optimise import _diverged

    assert _diverged(float("nan"), None) and _diverged(float("inf"), -1.0)
    assert not _diverged(100.0, None)  # the first iterations: Adam's first steps may move far
    assert _diverged(-1.0 + 10.5, -1.0) and not _diverged(-1.0 + 9.5, -1.0)
    assert not _diverged(-2.0, -1.0)  # falling is what a loss should do
    assert not _diverged(0.36, 0.03) and _diverged(10.5, 0.03)  # near 0: rises measured against 1


def test_a_loss_that_explodes_without_nan_is_caught_too(caplog):
    weight = torch.nn.Parameter(torch.tensor([0.0]))
    module = torch.nn.Module()
    module.weight = weight

    calls = []

    def objective(iteration):  # explodes the first time it reaches iteration 30
        calls.append(iteration)
        loss = ((weight - 3.0) ** 2).sum()
        return (loss * 1e4 if calls.count(30) == 1 and iteration == 30 else loss), {}

    with caplog.at_level("WARNING", logger="nipype_inrlddmm"):
        log = _optimise(module, objective, StageConfig(iterations=40, learning_rate=0.1), stage="fine",
                        progress=False)
    assert "the fine stage diverged at iteration 30" in caplog.text and len(log) == 40
