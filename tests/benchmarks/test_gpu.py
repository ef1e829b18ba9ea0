"""benchmarks/gpu.py on the CPU: its count of the stages' network points, its table, and the whole script on a
tiny case, so that the GPU comparison cannot rot where there is no GPU."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from nipype_inrlddmm import engine
from nipype_inrlddmm.engine import optimise
from nipype_inrlddmm.phantom import make_pair

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu  # noqa: E402  (a script's folder, not a package)

ITERATIONS = {"coarse": 2, "distill": 3, "fine": 2}


def test_stage_points_are_the_points_the_stages_integrate(monkeypatch):
    pair = make_pair((40, 36, 20), seed=1)
    config = engine.config_from_options(**{f"{stage}_iterations": n for stage, n in ITERATIONS.items()})
    seen = []

    def counting(velocity, points, n_steps, **kwargs):
        seen.append(len(points))
        return integrate(velocity, points, n_steps, **kwargs)

    integrate = optimise.integrate
    monkeypatch.setattr(optimise, "integrate", counting)
    tensors = [torch.as_tensor(np.asarray(a, np.float32)) for a in (pair.ct, pair.affine, pair.cbct, pair.affine)]
    engine.register_volumes(*tensors, config)
    points = gpu.stage_points(pair.cbct.shape, pair.affine, config, masked=False)
    assert seen == [points[stage] for stage in gpu.STAGES for _ in range(ITERATIONS[stage])]
    assert len(set(points.values())) == 3  # three different counts: the comparison tells the stages apart


def test_flops_follow_the_stated_formula():
    model = engine.ModelConfig(width=8, depth=2, n_steps=4)
    assert gpu.mlp_flops(model) == 2 * (4 * 8 + 8 * 8 + 8 * 3)
    log = [{"stage": "coarse", "seconds": "0.5"}, {"stage": "coarse", "seconds": "2.0"}]
    rates = gpu.stage_rates(log, {"coarse": 10, "distill": 1, "fine": 1}, model)
    assert rates["coarse"]["flops"] == 3 * gpu.mlp_flops(model) * 10 * 4 * 2
    assert rates["coarse"]["flop_rate"] == rates["coarse"]["flops"] / 2.0
    assert rates["fine"]["iterations"] == 0 and rates["fine"]["flops"] == 0


def _run(seed, wall, dice, fireants):
    stages = {stage: {"seconds": 1.0, "iterations": 1, "flops": 1e12, "flop_rate": 1e12} for stage in gpu.STAGES}
    ours = {"wall": wall, "mean_dice": dice, "jacobian_nonpositive_percent": 0.0, "sdlogj": 0.1,
            "peak_gpu_gib": 2.0, "timings": {"stages": 3.0, "QC": 1.0}, "stages": stages}
    return {"set": "lung-ct", "seed": seed, "ours": ours, "fireants": fireants}


def test_table_shows_each_seed_the_means_and_a_fireants_that_did_not_run():
    theirs = {"wall": 4.0, "mean_dice": 0.5, "jacobian_nonpositive_percent": 0.0, "sdlogj": 0.2,
              "peak_gpu_gib": 1.0, "tre_mm": 2.0}
    text = gpu.tables([_run(0, 8.0, 0.9, theirs), _run(1, 12.0, 0.8, dict(theirs, wall=6.0))], matmul=6e12)
    assert "| lung-ct | mean | 10.0 | 5.0 | 2.00 | 0.850 / 0.500 | - / 2.00 |" in text
    assert "| lung-ct | 0 | 1.00 | 1.00 | 1.00 | 1.000 | 16.7 |" in text  # 3e12 FLOPs in 3 s of a 6e12 matmul
    failed = gpu.tables([_run(0, 8.0, 0.9, {"error": "RuntimeError: no CUDA | here"})], matmul=6e12)
    assert "not run: RuntimeError: no CUDA / here" in failed


@pytest.mark.slow
def test_the_script_runs_ours_and_fireants_on_the_cpu_and_scores_both(tmp_path):
    out = tmp_path / "gpu.md"
    gpu.main(["--sets", "phantom", "--seeds", "0", "--fast", "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert "| phantom | 0 |" in out.read_text()
    run = json.loads(out.with_suffix(".json").read_text())["runs"][0]
    ours, theirs = run["ours"], run["fireants"]
    assert 0.5 < ours["mean_dice"] <= 1.0 and ours["peak_gpu_gib"] is None
    assert all(ours["stages"][stage]["iterations"] == 3 for stage in gpu.STAGES)
    assert ours["timings"]["stages"] > 0
    # FireANTs runs on the CPU where it is installed (the benchmarks extra); where not, its row says why.
    assert "error" in theirs or 0.5 < theirs["mean_dice"] <= 1.0
