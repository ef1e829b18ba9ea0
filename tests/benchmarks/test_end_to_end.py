"""benchmarks/end_to_end.py's figures from its runs: the means over seeds and the tables built from them."""

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import end_to_end  # noqa: E402  (a script's folder, not a package)


def _run(seed, wall, dice, stages, pre_align=None):
    timings = {"read": 0.5, "stages": stages, "dense field and warp": 1.0, "QC": 0.5}
    if pre_align is not None:
        timings["pre-align"] = pre_align
    ours = {"wall": wall, "mean_dice": dice, "sdlogj": 0.1 + seed / 100, "jacobian_nonpositive_percent": 0.0,
            "timings": timings}
    ants = {"wall": 2 * wall, "mean_dice": dice - 0.01, "sdlogj": 0.2, "jacobian_nonpositive_percent": 0.0}
    return {"seed": seed, "ours": ours, "ants": ants}


def test_mean_over_seeds_averages_every_figure_and_keeps_the_dice_range():
    runs = [_run(0, 10.0, 0.96, 6.0, pre_align=2.0), _run(1, 14.0, 0.98, 8.0)]
    ours = end_to_end.mean_over_seeds(runs, "ours")
    assert ours["wall"] == pytest.approx(12.0)
    assert ours["mean_dice"] == pytest.approx(0.97)
    assert ours["sdlogj"] == pytest.approx(0.105)
    assert ours["dice_range"] == (0.96, 0.98)
    # A phase one run did not have counts as 0 s there, not as missing from the mean.
    assert ours["timings"]["pre-align"] == pytest.approx(1.0)
    assert ours["timings"]["stages"] == pytest.approx(7.0)
    assert "timings" not in end_to_end.mean_over_seeds(runs, "ants")


def test_tables_give_the_ratios_of_the_means_and_each_dice_range():
    runs = [_run(0, 10.0, 0.96, 6.0), _run(1, 14.0, 0.98, 8.0)]
    single = [_run(0, 10.0, 0.96, 6.0)]
    results = {name: {method: end_to_end.mean_over_seeds(r, method) for method in ("ours", "ants")}
               for name, r in (("two-seeds", runs), ("one-seed", single))}
    lines = end_to_end.tables(results).splitlines()
    two = next(line for line in lines if line.startswith("| two-seeds | 12.0 |"))
    cells = [cell.strip() for cell in two.strip("|").split("|")]
    # wall 12.0 s over register() (stages + dense field) 8.0 s; ANTs took twice our wall time.
    assert cells[1:4] == ["12.0", "8.0", "1.50"]
    assert cells[7] == "0.50"
    assert cells[8] == "0.9700 (0.9600-0.9800) / 0.9600 (0.9500-0.9700)"
    one = next(line for line in lines if line.startswith("| one-seed | 10.0 |"))
    assert "0.9600 / 0.9500" in one  # a single run has no range
    shares = next(line for line in lines[lines.index("Share of our wall time per phase (%):"):]
                  if line.startswith("| two-seeds |"))
    values = [float(cell) for cell in shares.strip("|").split("|")[1:]]
    assert sum(values) == pytest.approx(100.0, abs=0.2)
    assert values[end_to_end.PHASES.index("stages")] == pytest.approx(100 * 7.0 / 12.0, abs=0.05)
