"""The QC figure's panels: pixels rendered from slices at their true aspect, origin at the bottom."""

import numpy as np

from nipype_inrlddmm.evaluation import metrics
from nipype_inrlddmm.reports import qc


def test_a_slice_fills_its_box_at_the_voxels_aspect_with_row_zero_at_the_bottom():
    image = np.zeros((4, 8))
    image[0, 0] = 1.0  # first row (bottom), first column (left)
    pixels = qc.render_slice(image, 2.0, (64, 100))  # voxels twice as tall as wide: 8 x 8 mm of 4 x 8 voxels
    assert pixels.shape == (64, 64, 4) and pixels.dtype == np.uint8
    bright = np.argwhere(pixels[..., 0] == 255)
    assert bright.min(axis=0).tolist() == [48, 0] and bright.max(axis=0).tolist() == [63, 7]  # 16 x 8 px
    assert pixels[..., 0].max() == 255 and (pixels[..., 0] == 0).sum() == 64 * 64 - 16 * 8


def test_the_overlay_replaces_the_image_where_drawn_and_the_window_clips():
    image = np.array([[-5.0, 0.5], [2.0, 1.0]])
    overlay = np.zeros((2, 2, 4))
    overlay[1, 1] = (*qc.OVERLAP_COLOUR, 1.0)
    pixels = qc.render_slice(image, 1.0, (2, 2), vmin=0.0, vmax=1.0, overlay=overlay)
    top, bottom = pixels[0], pixels[1]  # the array's first row is the picture's top: image row 1
    assert bottom[0, :3].tolist() == [0, 0, 0]  # -5 clipped to the window's black
    assert top[0, :3].tolist() == [255, 255, 255]  # 2 clipped to white
    assert top[1, :3].tolist() == [255, 242, 0]  # the overlay's yellow
    assert 120 <= bottom[1, 0] <= 135  # 0.5: mid grey


def _reoriented(codes, affine, *volumes):
    """The same voxels stored in the axis order and directions ``codes`` (e.g. "LIA"), and their affine."""
    import nibabel as nib

    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt(codes))
    shape = volumes[0].shape
    return ([nib.orientations.apply_orientation(v, transform) for v in volumes],
            affine @ nib.orientations.inv_ornt_aff(transform, shape))


def _figure(path, fixed_affine, moving_affine, fixed, warped, fixed_labels, warped_labels, jacobian, moving,
            moving_labels):
    from PIL import Image

    qc.qc_figure(path, fixed, fixed_affine, moving, moving_affine, warped, fixed_labels=fixed_labels,
                 moving_labels=moving_labels, warped_labels=warped_labels, jacobian=jacobian, title="case")
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_panels_are_anatomical_whatever_the_files_orientation(tmp_path):
    """LIA (FreeSurfer), LPS (DICOM) and oblique copies of one case draw the RAS case's figure."""
    rng = np.random.default_rng(0)
    shape = (22, 18, 14)
    fixed = np.zeros(shape, np.float32)
    fixed[4:18, 3:15, 2:12] = 1.0
    fixed[5:9, 4:8, 3:6] = 2.0  # an off-centre block: any flip or turn of a panel shows
    fixed += 0.05 * rng.random(shape).astype(np.float32)
    labels = (fixed > 1.5).astype(np.int32) + (fixed > 0.5)
    warped, warped_labels = np.roll(fixed, 1, axis=0), np.roll(labels, 1, axis=0)
    jacobian = 1.0 + 0.2 * rng.standard_normal(shape).astype(np.float32)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-15.0, -9.0, -14.0)
    moving, moving_labels = np.roll(fixed, 2, axis=1), np.roll(labels, 2, axis=1)
    expected = _figure(tmp_path / "ras.png", affine, affine, fixed, warped, labels, warped_labels, jacobian,
                       moving, moving_labels)
    for codes in ("LIA", "LPS"):
        volumes, fixed_affine = _reoriented(codes, affine, fixed, warped, labels, warped_labels, jacobian)
        got = _figure(tmp_path / f"{codes}.png", fixed_affine, affine, *volumes, moving, moving_labels)
        np.testing.assert_array_equal(got, expected, err_msg=codes)
    angle = np.deg2rad(8.0)
    turn = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0, 0], [0, 0, 1, 0],
                     [0, 0, 0, 1]])
    oblique = _figure(tmp_path / "oblique.png", turn @ affine, turn @ affine, fixed, warped, labels, warped_labels,
                      jacobian, moving, moving_labels)
    assert np.mean(np.any(oblique != expected, axis=-1)) < 0.002  # rounding in the 'before' resampling at most


def test_the_figure_draws_the_dice_it_is_given_and_counts_those_it_is_not(tmp_path):
    """`inrlddmm register` hands the figure the Dice of its evaluation: the figure it would have drawn by counting
    them, the given numbers drawn as given, and a label the evaluation lacks counted by the figure."""
    from PIL import Image

    shape = (22, 18, 14)
    fixed = np.zeros(shape, np.float32)
    fixed[4:18, 3:15, 2:12] = 1.0
    fixed[5:9, 4:8, 3:6] = 2.0
    labels = (fixed > 1.5).astype(np.int32) + (fixed > 0.5)
    moving, moving_labels = np.roll(fixed, 2, axis=1), np.roll(labels, 2, axis=1)
    warped, warped_labels = np.roll(fixed, 1, axis=0), np.roll(labels, 1, axis=0)
    mask = np.zeros(shape, bool)
    mask[:, :, :10] = True

    def figure(name, **dice):
        qc.qc_figure(tmp_path / name, fixed, np.eye(4), moving, np.eye(4), warped, fixed_labels=labels,
                     moving_labels=moving_labels, warped_labels=warped_labels, mask=mask, **dice)
        return np.asarray(Image.open(tmp_path / name).convert("RGB"))

    before = dict(zip([1, 2], metrics.dice_scores(moving_labels, labels, [1, 2], mask)))
    after = {row["label"]: row["dice"] for row in metrics.label_overlap(warped_labels, labels, np.eye(4), mask=mask)}
    counted = figure("counted.png")
    np.testing.assert_array_equal(figure("given.png", dice_before=before, dice_after=after), counted)
    np.testing.assert_array_equal(figure("part.png", dice_before={1: before[1]}, dice_after={2: after[2]}), counted)
    assert np.any(figure("other.png", dice_after={1: 0.0, 2: 0.0}) != counted)


def test_each_labels_slice_is_its_centre_of_mass_along_the_axis():
    """The per-label rows cut each label through its centroid: the centre of mass by its definition."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    labels = np.where(rng.random((14, 12, 30)) < 0.3, rng.choice([3, 70, 5], size=(14, 12, 30)), 0).astype(np.int32)
    labels[:, :, :10] = np.where(labels[:, :, :10] == 70, 0, labels[:, :, :10])  # 70 sits higher than the others
    ids = [70, 3, 5]
    for axis in range(3):
        expected = [centre[axis] for centre in ndimage.center_of_mass(np.ones(labels.shape), labels, ids)]
        np.testing.assert_allclose(qc._centroid_slices(labels, ids, axis), expected, rtol=1e-12)
