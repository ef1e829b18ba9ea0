"""CUDA as a device: the same field as on the CPU, and the command's every output. Skipped without a GPU."""

import json

import numpy as np
import pytest
import torch
from conftest import PHANTOM_SHAPE

from nipype_inrlddmm import cli, engine, register
from nipype_inrlddmm.phantom import make_pair
from nipype_inrlddmm.pipeline import warp_array
from nipype_inrlddmm.pipeline.outputs import FINE_OUTPUTS, REGISTER_OUTPUTS
from nipype_inrlddmm.reports import qc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here (torch.cuda.is_available() is False)")

#: Iterations enough for a field of several mm on the small phantom, seconds on either device.
FEW = dict(coarse_iterations=10, distill_iterations=10, fine_iterations=10, seed=3)
#: CPU and GPU round differently (reduction orders, the GPU's atomic adds in grid_sample's gradient); on the CPU
#: the fused kernels against the layer-by-layer path, two roundings of the same network, part after 20
#: iterations a stage by 1e-4 of the field's largest displacement.  A hundred times that is still a bug's size.
RELATIVE_TOLERANCE = 0.01


def test_same_seed_gives_the_same_field_on_cuda_as_on_the_cpu():
    pair = make_pair(PHANTOM_SHAPE, seed=3)
    fields = {device: register((pair.ct, pair.affine), (pair.cbct, pair.affine), device=device, **FEW).displacement
              for device in ("cpu", "cuda")}
    largest = np.abs(fields["cpu"]).max()
    assert largest > 0.5  # a field that moved, so that the comparison can tell
    assert np.abs(fields["cuda"] - fields["cpu"]).max() <= RELATIVE_TOLERANCE * largest


def test_stages_run_on_the_device_they_are_given():
    pair = make_pair(PHANTOM_SHAPE, seed=3)
    tensors = [torch.as_tensor(np.asarray(a, np.float32), device="cuda")
               for a in (pair.ct, pair.affine, pair.cbct, pair.affine)]
    result = engine.register_volumes(*tensors, engine.config_from_options(**FEW))
    assert result.displacement.device.type == "cuda" and result.warped.device.type == "cuda"
    assert next(result.velocity.parameters()).device.type == "cuda"


def test_labels_carried_on_cuda_are_the_cpus():
    pair = make_pair(PHANTOM_SHAPE, seed=3)
    field = np.random.default_rng(0).normal(scale=2.0, size=(*PHANTOM_SHAPE, 3)).astype(np.float32)
    shifted = pair.affine.copy()
    shifted[:3, 3] += pair.affine[:3, :3] @ [0.4, -0.3, 0.45]  # another grid, by parts of a voxel
    for carry in (lambda device: warp_array(pair.ct_labels, pair.affine, field, pair.affine, interpolation="label",
                                            device=device),
                  lambda device: qc.labels_before(pair.ct_labels, pair.affine, PHANTOM_SHAPE, shifted, device=device)):
        on = {device: carry(device) for device in ("cpu", "cuda")}
        assert len(np.unique(on["cpu"])) > 2  # several labels, many boundaries to vote on
        # Rounding may move a point across a cell's edge: a few boundary voxels may differ, no more.
        assert (on["cuda"] != on["cpu"]).mean() <= 1e-3


def test_register_command_on_cuda_writes_every_output(phantom_patient, tmp_path):
    out = tmp_path / "out"
    code = cli.main([
        "register", "--moving", str(phantom_patient["moving"]), "--fixed", str(phantom_patient["fixed"]),
        "--moving-labels", str(phantom_patient["moving_labels"]), "--fixed-labels",
        str(phantom_patient["fixed_labels"]), "--fixed-mask", str(phantom_patient["fixed_mask"]),
        "--label-names", str(phantom_patient["label_names"]), "--affine", "rigid", "--device", "cuda",
        "--out-dir", str(out), "--timings", str(tmp_path / "timings.json"), "--quiet",
        *(part for name, value in FEW.items() for part in ("--" + name.replace("_", "-"), str(value))),
    ])
    assert code == 0
    for name in [*FINE_OUTPUTS.values(), *REGISTER_OUTPUTS.values(), "affine.txt", "moving_aligned.nii.gz"]:
        if name != FINE_OUTPUTS["log"]:  # the command writes one log.csv of all stages
            assert (out / name).is_file(), name
    summary = json.loads((out / REGISTER_OUTPUTS["dice_summary"]).read_text())
    assert 0.0 < summary["mean_dice"] <= 1.0 and np.isfinite(summary["sdlogj"])
    assert json.loads((tmp_path / "timings.json").read_text())["stages"] > 0
