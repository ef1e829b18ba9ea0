"""Each interface run alone as a Nipype Node: documented outputs, validated inputs, hashing."""

import csv

import nibabel as nib
import numpy as np
import pytest
from nipype import Node
from nipype.pipeline.engine.nodes import NodeExecutionError
from traits.api import TraitError

from nipype_inrlddmm import __version__, engine, io, register
from nipype_inrlddmm.interfaces import AffineInit, ApplyWarp, CoarseINR, DiceEval, DistillINR, FineINR
from nipype_inrlddmm.interfaces.base import stage_inputs
from nipype_inrlddmm.phantom import LABELS, write_cohort

SEED = 3
ITERATIONS = {"coarse": 10, "distill": 5, "fine": 10}


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    manifest = write_cohort(tmp_path_factory.mktemp("cohort"), 1, shape=(48, 40, 20))
    folder = manifest.parent / "p01"
    names = {"moving": "ct", "fixed": "cbct", "moving_labels": "ct_labels", "fixed_labels": "cbct_labels",
             "fixed_mask": "cbct_fov"}
    files = {key: str(folder / f"{name}.nii.gz") for key, name in names.items()}
    files["label_names"] = str(manifest.parent / "labels.tsv")
    return files


def _run(interface, name, base_dir):
    return Node(interface, name=name, base_dir=str(base_dir)).run().outputs


@pytest.fixture(scope="module")
def chain(patient, tmp_path_factory):
    """CoarseINR -> DistillINR -> FineINR -> ApplyWarp -> DiceEval, each a Node run on its own."""
    work = tmp_path_factory.mktemp("nodes")
    p = patient
    coarse = _run(CoarseINR(moving_image=p["moving"], fixed_image=p["fixed"], fixed_mask=p["fixed_mask"],
                            iterations=ITERATIONS["coarse"], seed=SEED), "coarse", work)
    distill = _run(DistillINR(coarse_model=coarse.model, coarse_displacement=coarse.displacement,
                              fixed_image=p["fixed"], iterations=ITERATIONS["distill"], seed=SEED), "distill", work)
    fine = _run(FineINR(moving_image=p["moving"], fixed_image=p["fixed"], fixed_mask=p["fixed_mask"],
                        init_model=distill.model, iterations=ITERATIONS["fine"], seed=SEED), "fine", work)
    warp = _run(ApplyWarp(in_file=p["moving_labels"], displacement=fine.displacement, reference_image=p["fixed"],
                          interpolation="label"), "warp", work)
    dice = _run(DiceEval(warped_labels=warp.out_file, fixed_labels=p["fixed_labels"], label_names=p["label_names"],
                         displacement=fine.displacement, mask=p["fixed_mask"]), "dice", work)
    return {"coarse": coarse, "distill": distill, "fine": fine, "warp": warp, "dice": dice, "work": work}


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_each_stage_writes_its_documented_outputs(chain):
    coarse, distill, fine = chain["coarse"], chain["distill"], chain["fine"]
    assert nib.load(coarse.displacement).shape == (24, 20, 10, 1, 3)  # the coarse grid (factor 2)
    assert nib.load(fine.displacement).shape == (48, 40, 20, 1, 3)
    assert nib.load(fine.displacement).header.get_intent()[0] == "vector"
    assert nib.load(fine.warped_image).shape == (48, 40, 20)
    for stage, outputs in (("coarse", coarse), ("distill", distill), ("fine", fine)):
        assert [row["stage"] for row in _rows(outputs.log)] == [stage] * ITERATIONS[stage]
        io.load_checkpoint(outputs.model, shape=(48, 40, 20), affine=nib.load(fine.warped_image).affine)
    warped_labels = nib.load(chain["warp"].out_file)
    assert warped_labels.get_data_dtype() == np.int32
    assert set(np.unique(np.asarray(warped_labels.dataobj))) <= {0, *LABELS}
    rows = _rows(chain["dice"].out_csv)
    assert [row["name"] for row in rows] == list(LABELS.values())
    assert 0.0 < chain["dice"].mean_dice <= 1.0


def test_nodes_in_sequence_give_what_register_gives(chain, patient):
    """The thin interfaces change nothing: same seed and threads, bit-identical field and warped image."""
    moving, fixed = (io.load_image(patient[k]) for k in ("moving", "fixed"))
    mask, _ = io.load_volume(patient["fixed_mask"])
    options = {f"{stage}_iterations": n for stage, n in ITERATIONS.items()}
    result = register(moving, fixed, fixed_mask=(mask > 0, fixed[1]), seed=SEED, num_threads=1, **options)
    field, _ = io.load_displacement(chain["fine"].displacement)
    np.testing.assert_array_equal(field, result.displacement)
    np.testing.assert_array_equal(np.asarray(nib.load(chain["fine"].warped_image).dataobj), result.warped)


def test_apply_warp_linear_matches_the_fine_stage_warped_image(chain, patient):
    out = _run(ApplyWarp(in_file=patient["moving"], displacement=chain["fine"].displacement,
                         reference_image=patient["fixed"], out_file="ct_in_cbct.nii.gz"), "warp_ct", chain["work"])
    assert out.out_file.endswith("ct_in_cbct.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(out.out_file).dataobj),
                                  np.asarray(nib.load(chain["fine"].warped_image).dataobj))


def test_affine_init_runs_as_a_node(patient, tmp_path):
    out = _run(AffineInit(moving_image=patient["moving"], fixed_image=patient["fixed"],
                          moving_labels=patient["moving_labels"], fixed_mask=patient["fixed_mask"],
                          iterations=[20, 10, 0]), "affine", tmp_path)
    aligned, labels = nib.load(out.aligned_image), nib.load(out.aligned_labels)
    np.testing.assert_allclose(aligned.affine, labels.affine)
    matrix = io.load_itk_affine(out.transform)
    np.testing.assert_allclose(aligned.affine, np.linalg.inv(matrix) @ nib.load(patient["moving"]).affine, atol=1e-4)


def _nan_image(tmp_path, patient):
    path = tmp_path / "nan.nii.gz"
    image = nib.load(patient["fixed"])
    data = np.asarray(image.dataobj, np.float32)
    data[3, 3, 3] = np.nan
    nib.Nifti1Image(data, image.affine).to_filename(str(path))
    return str(path)


def _other_grid(tmp_path, patient, key):
    path = tmp_path / f"other_{key}.nii.gz"
    image = nib.load(patient[key])
    nib.Nifti1Image(np.asarray(image.dataobj)[:-4], image.affine).to_filename(str(path))
    return str(path)


def _junk(tmp_path, name):
    path = tmp_path / name
    path.write_text("not what it should be")
    return str(path)


BAD_INPUTS = {
    "coarse: NaN in the fixed image": (
        lambda p, c, t: CoarseINR(moving_image=p["moving"], fixed_image=_nan_image(t, p), iterations=1),
        "holds 1 NaN or Inf voxels"),
    "distill: checkpoint of another grid": (
        lambda p, c, t: DistillINR(coarse_model=c["coarse"].model, coarse_displacement=c["coarse"].displacement,
                                   fixed_image=_other_grid(t, p, "fixed"), iterations=1),
        "fitted on another fixed-image grid"),
    "fine: not a checkpoint": (
        lambda p, c, t: FineINR(moving_image=p["moving"], fixed_image=p["fixed"],
                                init_model=_junk(t, "model.pt"), iterations=1),
        "cannot read the checkpoint"),
    "warp: reference not on the field's grid": (
        lambda p, c, t: ApplyWarp(in_file=p["moving"], displacement=c["fine"].displacement,
                                  reference_image=_other_grid(t, p, "fixed")),
        "not on the grid of the reference"),
    "warp: label interpolation of an image": (
        lambda p, c, t: ApplyWarp(in_file=p["moving"], displacement=c["fine"].displacement,
                                  reference_image=p["fixed"], interpolation="label"),
        "for label maps; this one is not integer"),
    "dice: labels on different grids": (
        lambda p, c, t: DiceEval(warped_labels=c["warp"].out_file,
                                 fixed_labels=_other_grid(t, p, "fixed_labels")),
        "not on the grid"),
    "affine: not a transform": (
        lambda p, c, t: AffineInit(moving_image=p["moving"], fixed_image=p["fixed"],
                                   in_transform=_junk(t, "affine.txt")),
        "expected a 3-D ITK AffineTransform"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_bad_input_fails_the_node_with_the_file_and_the_problem(case, patient, chain, tmp_path):
    make, problem = BAD_INPUTS[case]
    with pytest.raises(NodeExecutionError, match=problem):
        Node(make(patient, chain, tmp_path), name="bad", base_dir=str(tmp_path / "work")).run()


def test_apply_warp_takes_one_map_the_one_its_direction_needs(tmp_path):
    """Nipype's xor refuses both maps or neither, naming them; invert says which of the two it must be."""
    image = str(io.save_image(tmp_path / "image.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4)))
    field = str(io.save_displacement(tmp_path / "field.nii.gz", np.zeros((4, 4, 4, 3), np.float32), np.eye(4)))
    model = tmp_path / "model.pt"
    model.write_bytes(b"")  # never read: each refusal comes first
    with pytest.raises(ValueError, match="requires a value for one of the inputs 'displacement, velocity_checkpoint'"):
        ApplyWarp(in_file=image, reference_image=image).run(cwd=str(tmp_path))
    with pytest.raises(OSError, match='"velocity_checkpoint" is mutually exclusive with input "displacement"'):
        ApplyWarp(in_file=image, reference_image=image, displacement=field, velocity_checkpoint=str(model))
    with pytest.raises(ValueError, match="invert=True needs velocity_checkpoint"):
        ApplyWarp(in_file=image, reference_image=image, displacement=field, invert=True).run(cwd=str(tmp_path))
    with pytest.raises(ValueError, match="the forward warp needs displacement"):
        ApplyWarp(in_file=image, reference_image=image, velocity_checkpoint=str(model)).run(cwd=str(tmp_path))


def test_trait_validation_names_the_input(patient, tmp_path):
    with pytest.raises(TraitError, match="similarity"):
        CoarseINR(similarity="mutual_information")
    with pytest.raises(TraitError, match="existing file"):
        ApplyWarp(in_file=str(tmp_path / "absent.nii.gz"))
    with pytest.raises(TraitError, match="iterations"):
        FineINR(iterations=-1)
    with pytest.raises(ValueError, match="requires a value for input 'moving_image'"):
        CoarseINR(fixed_image=patient["fixed"]).run(cwd=str(tmp_path))


@pytest.mark.parametrize("interface, stage", [(CoarseINR, "coarse"), (DistillINR, "distill"), (FineINR, "fine")])
def test_interface_defaults_are_the_engine_defaults(interface, stage):
    expected = stage_inputs(engine.RegistrationConfig(), stage)
    inputs = interface().inputs
    assert {name: getattr(inputs, name) for name in expected} == expected


def test_patch_stride_is_automatic_one_int_or_three():
    from nipype_inrlddmm.interfaces.base import stage_config

    for stride in (None, 3, (3, 3, 2)):
        assert stage_config(FineINR(patch_stride=stride).inputs, "fine").fine.patch_stride == stride
    with pytest.raises(TraitError, match="patch_stride"):
        FineINR(patch_stride=(3, 0, 2))


def test_field_stride_is_automatic_one_int_or_three():
    from nipype_inrlddmm.interfaces.base import stage_config

    for stride in (None, 3, (3, 3, 2)):
        assert stage_config(FineINR(field_stride=stride).inputs, "fine").field_stride == stride
    with pytest.raises(TraitError, match="field_stride"):
        FineINR(field_stride=0)


def test_threads_are_declared_and_not_hashed_and_the_version_is_hashed(patient):
    def hashed(**settings):
        return CoarseINR(moving_image=patient["moving"], fixed_image=patient["fixed"],
                         **settings).inputs.get_hashval()[1]

    assert Node(CoarseINR(num_threads=2), name="coarse").n_procs == 2
    assert hashed(num_threads=1) == hashed(num_threads=2) == hashed(progress=True, progress_label="p01")
    assert hashed(version=__version__) != hashed(version="0.0.0")
    assert hashed() != hashed(iterations=7)


def test_progress_bars_name_the_patient_so_parallel_nodes_are_told_apart(patient, tmp_path, capfd):
    CoarseINR(moving_image=patient["moving"], fixed_image=patient["fixed"], iterations=2, n_patches=4,
              progress=True, progress_label="p07").run(cwd=str(tmp_path))
    assert "p07: coarse" in capfd.readouterr().err
    CoarseINR(moving_image=patient["moving"], fixed_image=patient["fixed"], iterations=2, n_patches=4,
              progress_label="p07").run(cwd=str(tmp_path))
    assert "p07" not in capfd.readouterr().err  # a label alone draws no bar
