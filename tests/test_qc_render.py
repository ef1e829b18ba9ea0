"""The QC figure's panels: pixels rendered from slices at their true aspect, origin at the bottom."""

import numpy as np

from nipype_inrlddmm import qc


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
