"""Formats: ITK/ANTs displacement fields, checkpoints, atomic writes, validated loading."""

import nibabel as nib
import numpy as np
import pytest
import torch

from nipype_inrlddmm import engine, io
from nipype_inrlddmm.phantom import make_pair


def test_displacement_file_is_read_by_nitransforms_as_our_warp(tmp_path):
    """nitransforms, reading our file as ITK, resamples exactly as engine.warp does."""
    nonlinear = pytest.importorskip("nitransforms.nonlinear")
    resampling = pytest.importorskip("nitransforms.resampling")
    pair = make_pair((40, 36, 16), seed=2)
    affine32 = torch.tensor(pair.affine, dtype=torch.float32)
    # Moving on another (oblique, finer) grid, so the test also exercises geometry.
    moving_affine = pair.affine.copy()
    moving_affine[:3, :3] = moving_affine[:3, :3] @ np.array([[0.9, 0.1, 0], [-0.1, 0.9, 0], [0, 0, 0.8]])
    moving = engine.warp(torch.tensor(pair.ct), affine32, torch.zeros(40, 36, 16, 3), affine32).numpy()
    mov_path = io.save_image(tmp_path / "moving.nii.gz", moving, moving_affine)
    ref_path = io.save_image(tmp_path / "fixed.nii.gz", pair.cbct, pair.affine)
    field_path = io.save_displacement(tmp_path / "warp.nii.gz", pair.displacement, pair.affine)

    ours = engine.warp(torch.tensor(moving), torch.tensor(moving_affine, dtype=torch.float32),
                       torch.tensor(pair.displacement), affine32).numpy()
    transform = nonlinear.load(str(field_path), fmt="itk")
    theirs = np.asarray(resampling.apply(transform, str(mov_path), reference=str(ref_path), order=1,
                                         mode="constant", cval=0.0, prefilter=False).dataobj)
    inside = np.abs(theirs) > 0  # both fill 0 outside the moving grid; compare where nitransforms sampled
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=0.5)  # HU; float32 rounding only


def test_displacement_roundtrip_and_header(tmp_path):
    field = np.random.default_rng(0).normal(size=(5, 4, 3, 3)).astype(np.float32)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    path = io.save_displacement(tmp_path / "d.nii.gz", field, affine)
    image = nib.load(path)
    assert image.shape == (5, 4, 3, 1, 3)
    assert image.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(np.asarray(image.dataobj)[..., 0, :], field * [-1, -1, 1])  # LPS on disk
    back, back_affine = io.load_displacement(path)
    np.testing.assert_allclose(back, field)
    np.testing.assert_allclose(back_affine, affine)


def test_checkpoint_roundtrip_and_refusals(tmp_path, monkeypatch):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    velocity = engine.new_velocity_field((10, 10, 6), torch.tensor(affine, dtype=torch.float32),
                                         engine.ModelConfig(width=16, depth=2), seed=0)
    torch.nn.init.normal_(velocity.output.weight)
    path = io.save_checkpoint(tmp_path / "m.pt", velocity, shape=(10, 10, 6), affine=affine)
    loaded = io.load_checkpoint(path, shape=(10, 10, 6), affine=affine)
    points = torch.randn(7, 3) * 5
    torch.testing.assert_close(loaded(points, 0.3), velocity(points, 0.3))

    with pytest.raises(io.InputError, match="another fixed-image grid"):
        io.load_checkpoint(path, shape=(10, 10, 7), affine=affine)
    monkeypatch.setattr(io.checkpoints, "__version__", "9.0.0")
    with pytest.raises(io.InputError, match="incompatible"):
        io.load_checkpoint(path)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def _write(tmp_path, name, data, affine=np.eye(4)):
    path = tmp_path / name
    nib.Nifti1Image(np.asarray(data), affine).to_filename(str(path))
    return path


def _write_bytes(path, content):
    path.write_bytes(content)
    return path


def _write_sform(tmp_path, name, affine):
    """An image whose sform is ``affine`` (nibabel refuses to build such an image directly)."""
    image = nib.Nifti1Image(np.arange(64.0).reshape(4, 4, 4), np.eye(4))
    image.header.set_qform(None, code=0)
    image.header["srow_x"], image.header["srow_y"], image.header["srow_z"] = affine[:3]
    image.header["sform_code"] = 1
    path = tmp_path / name
    nib.save(nib.Nifti1Image(image.get_fdata(), None, image.header), str(path))
    return path


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: p / "absent.nii.gz", "does not exist"),
        (lambda p: _write_bytes(p / "junk.nii.gz", b"not a nifti"), "cannot read"),
        (lambda p: _write(p, "flat.nii.gz", np.ones((4, 4), np.float32)), "must be 3-D"),
        (lambda p: _write(p, "4d.nii.gz", np.ones((4, 4, 4, 2), np.float32)), "must be 3-D"),
        (lambda p: _write(p, "nan.nii.gz", np.where(np.eye(4)[:, :, None] > 0, np.nan, 1.0)
                          * np.ones((4, 4, 4))), "NaN or Inf"),
        (lambda p: _write(p, "const.nii.gz", np.ones((4, 4, 4), np.float32)), "constant"),
        (lambda p: _write_sform(p, "singular.nii.gz", np.diag([1, 0, 1, 1.0])), "singular"),
        (lambda p: _write_sform(p, "inf.nii.gz", np.diag([1, np.inf, 1, 1.0])), "NaN or Inf"),
    ],
)
def test_bad_images_are_refused_with_the_file_named(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(io.InputError, match=problem) as error:
        io.load_image(path)
    assert str(path) in str(error.value)


def test_truncated_gzip_is_refused(tmp_path):
    good = _write(tmp_path, "good.nii.gz", np.arange(4096.0).reshape(16, 16, 16))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(io.InputError, match="cannot read"):
        io.load_image(cut)


def test_labels_must_be_integer_nonempty_and_on_their_image_grid(tmp_path):
    image = np.arange(64.0).reshape(4, 4, 4)
    ref = (tmp_path / "img.nii.gz", image, np.eye(4))
    with pytest.raises(io.InputError, match="non-integer"):
        io.load_labels(_write(tmp_path, "frac.nii.gz", image / 3.0))
    with pytest.raises(io.InputError, match="empty"):
        io.load_labels(_write(tmp_path, "empty.nii.gz", np.zeros((4, 4, 4))))
    with pytest.raises(io.InputError, match="not on the grid"):
        io.load_labels(_write(tmp_path, "other.nii.gz", np.ones((4, 4, 4)), np.diag([2, 1, 1, 1.0])),
                       reference=ref)


def test_a_4d_label_file_is_one_label_per_volume_named_as_read(tmp_path):
    """The names come from the same reading as the labels (the command names dice.csv's rows by them)."""
    stack = np.zeros((4, 4, 4, 2), np.uint8)
    stack[:2, ..., 0], stack[1:3, ..., 1] = 1, 1  # volume 1 overlaps volume 0 and wins there
    path = _write(tmp_path, "stack.nii.gz", stack)
    labels, _, names = io.load_named_labels(path)
    assert names == {1: "volume 0", 2: "volume 1"}
    assert labels[:, 0, 0].tolist() == [1, 2, 2, 0]
    labels, _, names = io.load_named_labels(path, volume=1)
    assert names == {2: "volume 1"} and labels[:, 0, 0].tolist() == [0, 2, 2, 0]
    assert io.load_named_labels(_write(tmp_path, "plain.nii.gz", np.ones((4, 4, 4))))[2] is None


def test_a_manifest_follows_one_rule_both_label_maps_on_every_row(tmp_path):
    """The study evaluates: a manifest without label maps is refused when it is read, naming what lacks."""
    for name in ("ct.nii.gz", "cbct.nii.gz", "l.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    no_labels = tmp_path / "no_labels.tsv"
    no_labels.write_text("patient\tmoving\tfixed\np01\tct.nii.gz\tcbct.nii.gz\n")
    with pytest.raises(io.InputError, match=r"missing \['moving_labels', 'fixed_labels'\]"):
        io.read_manifest(no_labels)
    empty = tmp_path / "empty.tsv"
    empty.write_text("patient\tmoving\tfixed\tmoving_labels\tfixed_labels\n"
                     "p01\tct.nii.gz\tcbct.nii.gz\tl.nii.gz\t\n")
    with pytest.raises(io.InputError, match=r"line 2 \(patient 'p01'\): empty 'fixed_labels'"):
        io.read_manifest(empty)
