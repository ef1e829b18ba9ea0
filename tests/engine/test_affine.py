"""Affine pre-alignment: recovery of a known transform, ITK/ANTs files, the header convention."""

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.io import savemat
from scipy.spatial.transform import Rotation

from nipype_inrlddmm import engine, io, pipeline
from nipype_inrlddmm.engine.affine import AffineConfig, affine_register
from nipype_inrlddmm.interfaces import AffineInit
from nipype_inrlddmm.phantom import make_pair

#: A known fixed -> moving world transform: 12 degrees about an oblique axis, then a shift (mm).
AXIS = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
KNOWN = np.eye(4)
KNOWN[:3, :3] = Rotation.from_rotvec(np.deg2rad(12.0) * AXIS).as_matrix()
KNOWN[:3, 3] = (12.0, -8.0, 6.0)


@pytest.fixture(scope="module")
def phantom():
    return make_pair((64, 56, 32), seed=1)


def _errors(found, truth, points):
    """(rotation error in degrees, largest point error in mm over ``points``)."""
    difference = found @ np.linalg.inv(truth)
    u, _, vt = np.linalg.svd(difference[:3, :3])  # nearest rotation: affine fits carry a little scaling
    degrees = np.rad2deg(Rotation.from_matrix(u @ vt).magnitude())
    moved = points @ (found - truth)[:3, :3].T + (found - truth)[:3, 3]
    return degrees, np.linalg.norm(moved, axis=1).max()


@pytest.mark.parametrize("transform", ["rigid", "affine"])
def test_a_known_rotation_and_translation_is_recovered(phantom, transform):
    """The same CT with a rotated and shifted header: A must be the known transform (< 1 degree, < 1 mm)."""
    ct = engine.normalise_intensity(torch.tensor(phantom.ct))
    affine = torch.tensor(phantom.affine)
    with pipeline.torch_threads(1):  # small tensors: more threads only add synchronisation
        found = affine_register(ct, torch.tensor(KNOWN @ phantom.affine), ct, affine,
                                AffineConfig(transform=transform)).numpy()
    body = np.argwhere(phantom.ct_labels > 0) @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
    degrees, millimetres = _errors(found, KNOWN, body)
    assert degrees < 1.0 and millimetres < 1.0, (degrees, millimetres)


def test_affine_init_rewrites_the_header_and_never_the_voxels(phantom, tmp_path):
    """Output header inv(A) @ moving affine == the fixed header here; voxels and labels unchanged."""
    fixed = io.save_image(tmp_path / "fixed.nii.gz", phantom.ct, phantom.affine)
    moving = io.save_image(tmp_path / "moving.nii.gz", phantom.ct, KNOWN @ phantom.affine)
    labels = io.save_image(tmp_path / "labels.nii.gz", phantom.ct_labels, KNOWN @ phantom.affine)
    node = AffineInit(moving_image=str(moving), fixed_image=str(fixed), moving_labels=str(labels), transform="rigid")
    outputs = node.run(cwd=str(tmp_path)).outputs

    aligned = nib.load(outputs.aligned_image)
    np.testing.assert_array_equal(np.asarray(aligned.dataobj), phantom.ct)
    body = np.argwhere(phantom.ct_labels > 0) @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
    # The aligned header places every voxel where the fixed header does.
    degrees, millimetres = _errors(aligned.affine @ np.linalg.inv(phantom.affine), np.eye(4), body)
    assert degrees < 1.0 and millimetres < 1.0, (degrees, millimetres)
    aligned_labels = nib.load(outputs.aligned_labels)
    np.testing.assert_allclose(aligned_labels.affine, aligned.affine)
    np.testing.assert_array_equal(np.asarray(aligned_labels.dataobj), phantom.ct_labels)
    degrees, millimetres = _errors(io.load_itk_affine(outputs.transform), KNOWN, body)
    assert degrees < 1.0 and millimetres < 1.0, (degrees, millimetres)


def test_a_given_transform_is_used_instead_of_estimating(phantom, tmp_path):
    fixed = io.save_image(tmp_path / "fixed.nii.gz", phantom.ct, phantom.affine)
    moving = io.save_image(tmp_path / "moving.nii.gz", phantom.ct, KNOWN @ phantom.affine)
    given = io.save_itk_affine(tmp_path / "given.txt", KNOWN)
    outputs = pipeline.affine_init(moving, fixed, tmp_path / "out", transform_file=given)
    np.testing.assert_allclose(nib.load(outputs["aligned_image"]).affine, phantom.affine, atol=1e-4)


def test_itk_text_and_ants_mat_affines_read_as_nitransforms_reads_them(tmp_path):
    nitransforms = pytest.importorskip("nitransforms.linear")
    text = io.save_itk_affine(tmp_path / "a.txt", KNOWN)
    np.testing.assert_allclose(io.load_itk_affine(text), KNOWN, atol=1e-12)
    np.testing.assert_allclose(nitransforms.load(str(text), fmt="itk").matrix, KNOWN, atol=1e-6)
    # antsRegistration's *GenericAffine.mat: LPS matrix and translation about a centre.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps, centre = flip @ KNOWN @ flip, np.array([5.0, -3.0, 7.0])
    translation = lps[:3, 3] - centre + lps[:3, :3] @ centre
    mat = tmp_path / "a.mat"
    savemat(mat, {"AffineTransform_double_3_3": np.r_[lps[:3, :3].ravel(), translation][:, None],
                  "fixed": centre[:, None]}, format="4")
    np.testing.assert_allclose(io.load_itk_affine(mat), KNOWN, atol=1e-12)
    np.testing.assert_allclose(nitransforms.load(str(mat), fmt="itk").matrix, KNOWN, atol=1e-6)


@pytest.mark.parametrize("content, problem", [
    ("#Insight Transform File V1.0\nTransform: Euler3DTransform_double_3_3\nParameters: 0 0 0 1 2 3\n",
     "expected a 3-D ITK AffineTransform"),
    ("#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: 1 0 0\n", "12 parameters"),
    ("#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: 0 0 0 0 0 0 0 0 0 1 2 3\n",
     "singular"),
])
def test_bad_transform_files_are_refused_with_the_file_named(tmp_path, content, problem):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(io.InputError, match=problem) as error:
        io.load_itk_affine(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("linear, problem", [
    (np.diag([1.0, 1.0, -1.0]), "mirrors"),
    (np.diag([1.1, 0.9, 0.043]), "scales by 0.04 to 1.10"),
    (Rotation.from_rotvec(np.deg2rad(80.0) * AXIS).as_matrix(), "turns the image by 80 degrees"),
])
def test_implausible_pre_alignments_are_named(linear, problem):
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    assert problem in engine.affine.implausibility(torch.from_numpy(matrix))
    assert engine.affine.implausibility(torch.from_numpy(KNOWN)) is None
    assert engine.affine.implausibility(torch.from_numpy(np.diag([1.3, 0.8, 1.1, 1.0]))) is None


def test_a_collapsing_estimate_falls_back_to_rigid_then_to_its_start(phantom, monkeypatch):
    moving, fixed, affine = (torch.from_numpy(a) for a in (phantom.ct, phantom.cbct, phantom.affine))
    collapse = torch.from_numpy(np.diag([1.0, 1.0, 0.05, 1.0]))
    searched = []

    def search(*args, **kwargs):
        searched.append(args[4].transform)
        return collapse

    monkeypatch.setattr(engine.affine, "affine_register", search)
    config = AffineConfig(start="geometry")
    matrix, notes = engine.affine.checked_affine_register(moving, affine, fixed, affine, config)
    assert searched == ["affine", "rigid"]
    assert ["affine pre-alignment from the geometry start was rejected" in notes[0],
            "rigid pre-alignment" in notes[1], "kept its geometry start alone" in notes[2]] == [True] * 3
    torch.testing.assert_close(matrix, engine.affine.start_transform(moving, affine, fixed, affine, "geometry"))


def test_mr_to_ultrasound_estimates_that_mirror_or_turn_are_caught(real_data, caplog):
    """On this MR -> ultrasound pair the affine search mirrors the prostate and the rigid one turns it by
    74 degrees: both are rejected, naming the pair, and the centres-of-mass start is kept."""
    moving, fixed = (real_data / "prostate-mr-us" / kind / "case000003.nii.gz" for kind in ("mr_images", "us_images"))
    pair = pipeline.load_pair(moving, fixed)
    with caplog.at_level("WARNING", logger="nipype_inrlddmm"):
        matrix = pipeline.estimate_affine(pair, moving, fixed, AffineConfig(transform="affine"))
    assert engine.affine.implausibility(torch.from_numpy(matrix)) is None
    assert len(caplog.records) == 3 and all(str(moving) in r.getMessage() for r in caplog.records)
    assert "mirrors" in caplog.records[0].getMessage() and "turns" in caplog.records[1].getMessage()
