"""Warm start over a course: `inrlddmm register --init-model` continues a previous registration's network."""

import csv
import json

import numpy as np
import pytest
import torch

from nipype_inrlddmm import cli, engine, io
from nipype_inrlddmm.phantom import grid_affine, make_course

SHAPE = (48, 40, 20)
FEW = ["--coarse-iterations", "10", "--distill-iterations", "5", "--fine-iterations", "20", "--quiet"]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A planning CT and two days' CBCTs of one phantom patient, with labels and field-of-view masks."""
    root = tmp_path_factory.mktemp("course")
    fractions = make_course(SHAPE, 2, seed=4)
    io.save_image(root / "ct.nii.gz", fractions[0].ct, fractions[0].ct_affine)
    io.save_image(root / "ct_labels.nii.gz", fractions[0].ct_labels, fractions[0].ct_affine)
    for k, pair in enumerate(fractions, 1):
        io.save_image(root / f"fx{k}" / "cbct.nii.gz", pair.cbct, pair.affine)
        io.save_image(root / f"fx{k}" / "cbct_labels.nii.gz", pair.cbct_labels, pair.affine)
        io.save_image(root / f"fx{k}" / "cbct_fov.nii.gz", pair.cbct_fov.astype(np.uint8), pair.affine)
    return root


def _register(course, fraction, out, *extra) -> int:
    day = course / f"fx{fraction}"
    return cli.main(["register", "--moving", str(course / "ct.nii.gz"), "--fixed", str(day / "cbct.nii.gz"),
                     "--moving-labels", str(course / "ct_labels.nii.gz"),
                     "--fixed-labels", str(day / "cbct_labels.nii.gz"), "--fixed-mask", str(day / "cbct_fov.nii.gz"),
                     "--num-threads", "2", "--out-dir", str(out), *FEW, *extra])


def _stages(out) -> list[str]:
    return [row["stage"] for row in csv.DictReader(open(out / "log.csv"))]


def _mean_dice(out) -> float:
    return json.loads((out / "dice.json").read_text())["mean_dice"]


@pytest.fixture(scope="module")
def first(course, tmp_path_factory):
    """Fraction 1 registered from scratch."""
    out = tmp_path_factory.mktemp("fx1")
    assert _register(course, 1, out) == 0
    return out


def test_the_next_fraction_starts_from_the_model_without_coarse_stage_or_distillation(course, first, tmp_path):
    assert _register(course, 2, tmp_path, "--init-model", str(first / "model.pt"), "--warm-iterations", "7") == 0
    assert _stages(tmp_path) == ["fine"] * 7
    start = io.load_checkpoint(first / "model.pt")
    continued = io.load_checkpoint(tmp_path / "model.pt")
    assert continued.config == start.config
    torch.testing.assert_close(continued.center, start.center)  # the network keeps the box it was fitted on
    for name in ("warped.nii.gz", "displacement.nii.gz", "dice.csv", "qc.png"):
        assert (tmp_path / name).is_file(), name


def _largest_change(before, after) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_the_warm_learning_rate_is_the_one_given(course, first, tmp_path):
    """--warm-learning-rate reaches the optimiser: Adam's steps are about that size, whatever the gradients."""
    start = io.load_checkpoint(first / "model.pt")
    for rate, out in (("1e-9", tmp_path / "tiny"), (None, tmp_path / "default")):
        extra = ["--warm-learning-rate", rate] if rate else []
        assert _register(course, 2, out, "--init-model", str(first / "model.pt"), "--warm-iterations", "3",
                         *extra) == 0
    assert _largest_change(start, io.load_checkpoint(tmp_path / "tiny" / "model.pt")) < 1e-8
    assert _largest_change(start, io.load_checkpoint(tmp_path / "default" / "model.pt")) > 1e-4


def test_a_warm_start_of_the_same_pair_continues_its_field(course, first, tmp_path):
    """Only the fine stage runs, from where the model's registration ended: with no iteration it gives that
    registration's labels, and with five it matches them better than a registration from scratch whose fine
    stage has the same five.  (On this 48 x 40 x 20 toy the Dice of a short registration swings by a few
    hundredths with its iteration count, so five more iterations are not compared with the model's own.)"""
    warm, again, cold = tmp_path / "warm", tmp_path / "again", tmp_path / "cold"
    assert _register(course, 1, again, "--init-model", str(first / "model.pt"), "--warm-iterations", "0") == 0
    assert _mean_dice(again) == _mean_dice(first)
    assert _register(course, 1, warm, "--init-model", str(first / "model.pt"), "--warm-iterations", "5") == 0
    assert _stages(warm) == ["fine"] * 5 and len(_stages(first)) > 5
    assert _register(course, 1, cold, "--fine-iterations", "5") == 0
    assert _mean_dice(warm) > _mean_dice(cold)


def test_a_model_of_another_grid_is_refused_naming_the_file_and_both_grids(course, tmp_path, capsys):
    smaller = grid_affine(SHAPE, (200.0, 160.0, 240.0))  # a narrower field of view: the CBCT reaches beyond it
    velocity = engine.new_velocity_field(SHAPE, torch.as_tensor(smaller, dtype=torch.float32),
                                         engine.ModelConfig(width=96), 0)
    model = io.save_checkpoint(tmp_path / "narrow.pt", velocity, shape=SHAPE, affine=smaller)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _register(course, 2, out, "--init-model", str(model)) == 2
    error = capsys.readouterr().err
    assert f"{model}: cannot start the registration onto {course / 'fx2' / 'cbct.nii.gz'} from this model" in error
    assert "reaches beyond the box the network was fitted on (78.3 mm along x, 68.2 mm along y; more than one " \
        "voxel)" in error
    assert "48 x 40 x 20 voxels of 4.17 x 4.00 x 12.00 mm" in error and "7.50 x 7.50 x 12.00 mm" in error
    assert not out.exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]), "cannot read the checkpoint"),
    (lambda path: path.write_text("not a model"), "cannot read the checkpoint"),
], ids=["truncated", "not-a-checkpoint"])
def test_a_corrupt_model_is_refused_naming_the_file(course, first, tmp_path, capsys, damage, problem):
    model = tmp_path / "model.pt"
    model.write_bytes((first / "model.pt").read_bytes())
    damage(model)
    capsys.readouterr()
    assert _register(course, 2, tmp_path / "out", "--init-model", str(model)) == 2
    assert f"{model}: {problem}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_architecture_options_that_contradict_the_model_are_refused(course, first, tmp_path, capsys):
    capsys.readouterr()
    assert _register(course, 2, tmp_path / "out", "--init-model", str(first / "model.pt"), "--width", "32") == 2
    assert f"{first / 'model.pt'}: the network's architecture is fixed by the model: width is 96, not 32" in \
        capsys.readouterr().err


def test_the_engine_refuses_a_network_of_another_box():
    affine = torch.as_tensor(grid_affine(SHAPE), dtype=torch.float32)
    narrow = torch.as_tensor(grid_affine(SHAPE, (200.0, 160.0, 240.0)), dtype=torch.float32)
    velocity = engine.new_velocity_field(SHAPE, narrow, engine.ModelConfig(width=8, depth=1), 0)
    image = torch.rand(SHAPE)
    with pytest.raises(ValueError, match="reaches beyond the box the network was fitted on"):
        engine.register_volumes(image, affine, image, affine, initial=velocity)
    assert engine.warm_start_mismatch(velocity, SHAPE, narrow) is None
    # One voxel beyond the box is tolerated: a day's grid placed a little differently.
    shifted = affine.clone()
    shifted[0, 3] += 2.0
    wide = engine.new_velocity_field(SHAPE, affine, engine.ModelConfig(width=8, depth=1), 0)
    assert engine.warm_start_mismatch(wide, SHAPE, shifted) is None


def test_the_model_records_the_moving_image_it_was_fitted_with(course, first):
    recorded = io.checkpoint_moving(first / "model.pt")
    data, affine = io.load_image(course / "ct.nii.gz")
    assert recorded == io.image_fingerprint(course / "ct.nii.gz", data, affine)
    assert recorded["file"] == str(course / "ct.nii.gz") and recorded["shape"] == list(SHAPE)


def test_a_model_of_another_moving_image_is_refused_naming_both_files(course, first, tmp_path, capsys):
    data, affine = io.load_image(course / "ct.nii.gz")
    data[10, 10, 10] += 1.0  # one voxel differs: another image, on the same grid
    other = io.save_image(tmp_path / "other_ct.nii.gz", data, affine)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["register", "--moving", str(other), "--fixed", str(course / "fx2" / "cbct.nii.gz"),
                     "--init-model", str(first / "model.pt"), "--out-dir", str(out), *FEW]) == 2
    error = capsys.readouterr().err
    assert f"{first / 'model.pt'}: was fitted with the moving image {course / 'ct.nii.gz'} (48 x 40 x 20 " \
        "voxels" in error
    assert f"not with this one, {other} (48 x 40 x 20 voxels" in error
    assert not out.exists()


def test_a_model_that_records_no_moving_image_is_taken_with_a_warning(course, first, tmp_path, caplog):
    """Models written before the moving image was recorded: the check is skipped, and the log says so."""
    velocity = io.load_checkpoint(first / "model.pt")
    shape, affine = io.checkpoint_grid(first / "model.pt")
    older = io.save_checkpoint(tmp_path / "older.pt", velocity, shape=shape, affine=affine)
    assert io.checkpoint_moving(older) is None
    with caplog.at_level("WARNING", logger="nipype_inrlddmm"):
        assert _register(course, 2, tmp_path / "out", "--init-model", str(older), "--warm-iterations", "2") == 0
    assert f"{older} records no moving image" in caplog.text


@pytest.mark.parametrize("given, drawn", [(None, 24), ("3", 3), ("0", 0)], ids=["default", "given", "none"])
def test_the_warm_stage_draws_the_warm_regularity_patches(course, first, tmp_path, monkeypatch, given, drawn):
    """Patches for the penalties alone as the fine stage draws them by default (24 at 48 image patches), as
    many as --warm-regularity-patches asks otherwise, scaled alike: each iteration draws the image patches,
    then those (outside the fixed mask, with the default outside_jacobian_weight)."""
    from nipype_inrlddmm.engine import optimise

    counts, draw = [], optimise.random_patch_corners

    def counted(shape, n, *args, candidates=None, **kwargs):
        counts.append(n)
        return draw(shape, n, *args, candidates=candidates, **kwargs)
    monkeypatch.setattr(optimise, "random_patch_corners", counted)
    extra = ["--warm-regularity-patches", given] if given else []
    assert _register(course, 2, tmp_path, "--init-model", str(first / "model.pt"), "--warm-iterations", "2",
                     *extra) == 0
    assert len(counts) == 2 * (2 if drawn else 1)
    if drawn:
        image, regularity = counts[0::2], counts[1::2]
        assert all(n == max(1, round(drawn * image[0] / 48)) for n in regularity)
