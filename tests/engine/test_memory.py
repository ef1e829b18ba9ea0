"""The out-of-memory guard: a stage that would not fit is refused before it starts, saying what to change.

Its estimates are checked against what each stage draws (the patches of a
sampling fraction, the distillation's points, the MIND descriptors, the
dense field), and the guard is met through the stages and :func:`register`,
with a faked small available memory: nothing is allocated to provoke it.
"""

import pytest
from conftest import PHANTOM_SHAPE, tripwire

from nipype_inrlddmm import engine, host, io, pipeline, register

FEW = dict(coarse_iterations=5, distill_iterations=3, fine_iterations=5)
CONFIG = engine.config_from_options(**FEW)
#: The stages drawing all their 48 patches (the distillation its 8192 points), as on a patient-sized grid;
#: on this small one their default fractions of the grid are a few, whose memory no faked limit above the
#: overhead refuses.
ALL_PATCHES = engine.config_from_options(**FEW, sampling_fraction=None)


def test_a_volume_too_large_for_the_memory_fails_early_with_advice(phantom_patient, tmp_path, monkeypatch,
                                                                   no_optimisation):
    """The guard, with a faked small available memory (nothing is allocated to provoke it)."""
    monkeypatch.setattr(host, "available_memory", lambda device="cpu": 200_000_000)
    files, out = phantom_patient, tmp_path / "out"
    calls = {
        "coarse": lambda: pipeline.run_coarse(files["moving"], files["fixed"], out, ALL_PATCHES),
        "distill": lambda: pipeline.run_distill(files["model"], files["coarse_displacement"], files["fixed"], out,
                                                ALL_PATCHES),
        "fine": lambda: pipeline.run_fine(files["moving"], files["fixed"], files["model"], out, ALL_PATCHES),
    }
    for stage, call in calls.items():
        with pytest.raises(engine.InsufficientMemoryError) as caught:
            call()
        message = str(caught.value)
        assert message.startswith(f"{files['fixed']}: the {stage} stage on a 32x28x16 fixed grid needs about")
        assert "0.20 GB is available" in message and "To fit:" in message and "INRLDDMM_NO_MEMORY_CHECK" in message
        assert ("batch_points" if stage == "distill" else "n_patches") in message
    assert not out.exists()


def test_register_has_the_same_memory_guard_and_an_escape_hatch(phantom_patient, monkeypatch):
    monkeypatch.setattr(host, "available_memory", lambda device="cpu": 200_000_000)
    monkeypatch.setattr(engine.stages, "coarse_stage", tripwire)
    moving, fixed = io.load_volume(phantom_patient["moving"]), io.load_volume(phantom_patient["fixed"])
    with pytest.raises(engine.InsufficientMemoryError, match="the coarse stage on a 32x28x16 fixed grid"):
        register(moving, fixed, **FEW, sampling_fraction=None)
    monkeypatch.setenv("INRLDDMM_NO_MEMORY_CHECK", "1")
    assert engine.check_memory("fine", PHANTOM_SHAPE, ALL_PATCHES)["total"] > 200_000_000  # passes: the check is off


def test_the_fine_estimate_counts_the_patches_its_sampling_fraction_draws():
    """A tenth of a 96x96x48 grid is 26 patches of 12^3 voxels: the guard budgets and names those, not all 48
    (with the regularity patches on top, 13 at 26 against 24 at 48)."""
    shape = (96, 96, 48)
    tenth = engine.estimate_memory("fine", shape, CONFIG)
    regularity, all_regularity = CONFIG.fine.regularity_patch_count(shape), ALL_PATCHES.fine.regularity_patches
    assert (regularity, all_regularity) == (13, 24)
    assert tenth["training"] == pytest.approx(
        engine.estimate_memory("fine", shape, ALL_PATCHES)["training"] * (26 + regularity) / (48 + all_regularity))
    with pytest.raises(engine.InsufficientMemoryError) as caught:
        engine.check_memory("fine", shape, CONFIG, available=tenth["total"] - 1)
    message = str(caught.value)
    assert f"(26 patches of 12^3 voxels and {regularity} regularity patches" in message
    assert "lower sampling_fraction, n_patches, regularity_patches" in message


def test_the_distillation_estimate_counts_the_points_its_sampling_fraction_draws():
    """A 64th of a 96x96x48 grid is 6912 points, under the 8192 of batch_points: the guard budgets those."""
    shape = (96, 96, 48)
    assert CONFIG.distill.points(shape) == 6912
    assert engine.estimate_memory("distill", shape, CONFIG)["training"] == pytest.approx(
        engine.estimate_memory("distill", shape, ALL_PATCHES)["training"] * 6912 / 8192)


def test_mind_descriptors_are_counted_on_each_stage_grid():
    """13 float32 channels per image and the computation's peak: at least 52 + 52 + 212 bytes a stage voxel."""
    shape = (96, 96, 48)
    mind = engine.config_from_options(**FEW, similarity="mind")
    for stage, grid_voxels in (("coarse", 48 * 48 * 24), ("fine", 96 * 96 * 48)):
        extra = engine.estimate_memory(stage, shape, mind)["images"] - engine.estimate_memory(stage, shape,
                                                                                              CONFIG)["images"]
        assert 316 * grid_voxels <= extra < 400 * grid_voxels
    assert engine.estimate_memory("distill", shape, mind) == engine.estimate_memory("distill", shape, CONFIG)


def test_a_huge_fixed_grid_is_refused_by_its_estimate():
    """Real available memory, a grid no machine here holds: refused with the dense-field advice."""
    with pytest.raises(engine.InsufficientMemoryError) as caught:
        engine.check_memory("fine", (4096, 4096, 2048), CONFIG, available=host.available_memory(),
                            source="huge.nii.gz")
    message = str(caught.value)
    assert message.startswith("huge.nii.gz: the fine stage on a 4096x4096x2048 fixed grid")
    assert "dense field and warp" in message and "field_stride" in message and "downsample" in message
    small = engine.estimate_memory("fine", PHANTOM_SHAPE, CONFIG)
    assert small["total"] < 1.5e9  # a phantom-sized pair fits anywhere these tests run
    assert engine.check_memory("fine", (4096, 4096, 2048), CONFIG)["total"] > 1e12  # unknown: not refused
    strided = engine.estimate_memory("fine", (256, 256, 256), engine.config_from_options(field_stride=4))
    assert strided["field"] < engine.estimate_memory("fine", (256, 256, 256), CONFIG)["field"]


def test_the_distillation_of_a_large_ct_is_not_refused_for_a_field_it_never_computes():
    """512x512x300 voxels: the distillation reads the grid and trains on points, nothing per voxel but the image."""
    shape = (512, 512, 300)
    assert engine.check_memory("distill", shape, CONFIG, available=1.5e9)["field"] == 0  # not refused
    with pytest.raises(engine.InsufficientMemoryError):  # while the fine stage's dense field does not fit
        engine.check_memory("fine", shape, CONFIG, available=1.5e9)
