"""Quality-control figures: what a user looks at before trusting a propagated contour.

* :func:`qc_figure` (arrays) and :func:`write_qc_figure` (files): fixed,
  moving and warped mid-slices in the three planes, label contours before
  and after registration (fixed green, moving/warped red, overlap yellow,
  as the paper's figure 2), a fixed/warped checkerboard and the Jacobian
  determinant with folded voxels (det J <= 0) marked; then, for every label,
  the axial slice through its centroid before and after.
* :func:`write_animation`: an animated GIF of one slice of the trajectory.

Each panel is rendered to pixels here (colour map, overlay, nearest-neighbour
scaling to the voxels' true aspect ratio) and the panels are pasted into one
image, so matplotlib draws a single picture and the titles: a figure of a
hundred panels costs what one costs, not a hundred sets of axes.  It is drawn
on matplotlib's Agg canvas directly (no pyplot, no global backend switch, so
importing this module changes nothing for the caller) and written
atomically.  Volumes are first put in RAS+ voxel order (:func:`_to_ras`, no
resampling), so the planes are anatomical whatever the file's orientation,
and shown as :data:`CONVENTION` says, which the figure states.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .. import io
from ..evaluation import metrics

#: Overlay colours (RGB): the fixed labels, the moving or warped labels, and where their contours agree.
FIXED_COLOUR, WARPED_COLOUR, OVERLAP_COLOUR = (0.0, 0.9, 0.0), (1.0, 0.1, 0.1), (1.0, 0.95, 0.0)
#: The axis each plane cuts across, of a volume in RAS+ order (:func:`_to_ras`).
_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
#: How the panels are oriented, as the figure states it.
CONVENTION = "neurological view: patient's right on the right, anterior and superior up"
_DPI = 80
#: Pixels of a panel's cell (width, height), of the title band at the top of a cell, of the figure's header and
#: margin, and of the colour bar's column.
_CELL, _TITLE, _HEADER, _MARGIN, _COLOUR_BAR = (168, 176), 14, 44, 8, 64


def _to_ras(affine, *volumes):
    """Volumes of one grid with their axes permuted and flipped to the closest RAS+ order, then that grid's affine.

    No resampling, only the voxels' order: array axes 0, 1, 2 then run
    towards the patient's right, anterior and superior, whatever the file's
    orientation (LIA, LPS, oblique), so every plane is cut along anatomy.
    """
    orientation = nib.orientations.io_orientation(affine)
    shape = next(volume.shape for volume in volumes if volume is not None)[:3]
    return (*(None if volume is None else nib.orientations.apply_orientation(volume, orientation)
              for volume in volumes), np.asarray(affine) @ nib.orientations.inv_ornt_aff(orientation, shape))


def _cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2-D slice, transposed so that the first remaining array axis is horizontal.

    A view (basic indexing): ``np.take`` copies through a generic gather, 14 ms a slice of a 1 mm brain.
    """
    return volume[(slice(None),) * axis + (index,)].T


def _aspect(affine, axis: int) -> float:
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    rows, columns = [a for a in range(3) if a != axis][::-1]
    return float(spacing[rows] / spacing[columns])


def _window(volume: np.ndarray) -> tuple[float, float]:
    """A robust display range (0.5 and 99.5 percentiles) so a few extreme voxels do not wash the image out."""
    low, high = np.percentile(volume, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1.0)


def _normalised(volume: np.ndarray) -> np.ndarray:
    low, high = _window(volume)
    return np.clip((volume - low) / (high - low), 0.0, 1.0)


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """2-D: pixels of a non-zero label with a 4-neighbour of another label (each label's contour)."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = np.zeros(labels.shape, bool)
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        differs |= shifted != centre
    return differs & (labels != 0)


def contour_overlay(fixed_labels: np.ndarray, other_labels: np.ndarray | None) -> np.ndarray:
    """RGBA overlay of 2-D label contours: fixed only green, other only red, both yellow.

    ``other_labels`` are the moving labels on the fixed grid (before) or the
    warped labels (after); None draws the fixed contours alone.
    """
    fixed_edge = _boundaries(fixed_labels)
    other_edge = np.zeros_like(fixed_edge) if other_labels is None else _boundaries(other_labels)
    overlay = np.zeros((*fixed_edge.shape, 4))
    for mask, colour in ((fixed_edge & ~other_edge, FIXED_COLOUR), (other_edge & ~fixed_edge, WARPED_COLOUR),
                         (fixed_edge & other_edge, OVERLAP_COLOUR)):
        overlay[mask] = (*colour, 1.0)
    return overlay


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate ``tiles`` x ``tiles`` blocks of two 2-D images, each scaled to [0, 1] by its own window."""
    a, b = _normalised(a), _normalised(b)
    rows = np.arange(a.shape[0]) * tiles // a.shape[0]
    columns = np.arange(a.shape[1]) * tiles // a.shape[1]
    return np.where((rows[:, None] + columns[None, :]) % 2 == 0, a, b)


def _before(moving, moving_affine, shape, affine, *, labels=False, device="cpu") -> np.ndarray:
    """The moving image (or labels) on the grid of ``shape`` and ``affine`` without any deformation: 'before'.

    Resampled on ``device``, the result brought back to the host.
    """
    from ..api import as_tensor
    from ..engine import resample

    out = resample(as_tensor(moving, device), as_tensor(moving_affine, device), shape, as_tensor(affine, device),
                   interpolation="label" if labels else "linear").cpu()
    return out.numpy().astype(np.int32) if labels else out.numpy()


def _moving_cut(moving, moving_affine, fixed_shape, fixed_affine, axis: int, index: int) -> np.ndarray:
    """:func:`_cut` of the moving image resampled onto the fixed grid, undeformed: only that slice is resampled.

    A figure shows a few slices, and the whole volume costs seconds on a 1 mm grid.
    """
    slice_affine = np.array(fixed_affine, np.float64)
    slice_affine[:3, 3] += slice_affine[:3, axis] * index
    shape = [1 if a == axis else n for a, n in enumerate(fixed_shape)]
    return _cut(_before(moving, moving_affine, shape, slice_affine), axis, 0)


def labels_before(labels, moving_affine, fixed_shape, fixed_affine, *, device="cpu") -> np.ndarray:
    """The moving labels on the whole fixed grid, undeformed: the Dice before; as they are on a shared grid.

    Resampled on ``device`` (a registration's own, as its warped labels are), brought back to the host.
    """
    if io.grid_mismatch(labels.shape, moving_affine, fixed_shape, fixed_affine) is None:
        return labels
    return _before(labels, moving_affine, fixed_shape, fixed_affine, labels=True, device=device)


def render_slice(image: np.ndarray, aspect: float, size: tuple[int, int], *, cmap: str = "gray",
                 vmin: float = 0.0, vmax: float = 1.0, overlay: np.ndarray | None = None) -> np.ndarray:
    """A 2-D slice as ``(H, W, 4)`` uint8 RGBA pixels, as large as fits ``size`` (width, height).

    ``image`` is ``(rows, columns)`` as :func:`_cut` gives it, row 0 at the
    bottom; ``aspect`` is a pixel's height over its width (the voxel
    spacings); ``overlay`` an ``(rows, columns, 4)`` RGBA drawn over the
    image where its alpha is not 0.  Pixels are the nearest voxel's (no
    smoothing: what is shown is what the volume holds); the returned array's
    first row is the top of the picture.
    """
    rows, columns = image.shape
    scale = min(size[0] / columns, size[1] / (rows * aspect))  # pixels per column
    width, height = max(1, int(columns * scale)), max(1, int(rows * aspect * scale))
    column_of = np.minimum(((np.arange(width) + 0.5) * columns / width).astype(int), columns - 1)
    row_of = np.minimum(((np.arange(height) + 0.5) * rows / height).astype(int), rows - 1)[::-1]
    rgba = colormaps[cmap](Normalize(vmin, vmax, clip=True)(image), bytes=True)
    if overlay is not None:
        drawn = overlay[..., 3] > 0
        rgba[drawn] = np.rint(255 * overlay[drawn]).astype(np.uint8)
    return rgba[row_of][:, column_of]


class _Mosaic:
    """Panels pasted into one picture on a grid of cells, titled; one matplotlib image for all of them."""

    def __init__(self, n_rows: int, n_columns: int, *, colour_bar: bool = False):
        self.width = 2 * _MARGIN + n_columns * _CELL[0] + (_COLOUR_BAR if colour_bar else 0)
        self.height = _HEADER + n_rows * _CELL[1] + _MARGIN
        self.pixels = np.full((self.height, self.width, 4), 255, np.uint8)
        self.figure = Figure(figsize=(self.width / _DPI, self.height / _DPI), dpi=_DPI)
        FigureCanvasAgg(self.figure)

    def place(self, row: int, column: int, image: np.ndarray, aspect: float, title: str, **render) -> None:
        """Render ``image`` (:func:`render_slice`) centred in the cell below ``title``."""
        left, top = _MARGIN + column * _CELL[0], _HEADER + row * _CELL[1]
        box = (_CELL[0] - 6, _CELL[1] - _TITLE - 6)
        tile = render_slice(image, aspect, box, **render)
        y = top + _TITLE + (box[1] - tile.shape[0]) // 2
        x = left + 3 + (box[0] - tile.shape[1]) // 2
        self.pixels[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
        # Long titles (label names) get a smaller font rather than spilling into the next cell.
        self.figure.text((left + _CELL[0] / 2) / self.width, 1.0 - (top + _TITLE - 3) / self.height, title,
                         ha="center", va="baseline", fontsize=8 if len(title) <= 30 else 6)

    def colour_bar(self, rows: int, cmap: str, vmin: float, vmax: float) -> None:
        """A colour bar in the right-hand column beside the first ``rows`` rows."""
        bottom = 1.0 - (_HEADER + rows * _CELL[1] - 10) / self.height
        axis = self.figure.add_axes(((self.width - _COLOUR_BAR + 8) / self.width, bottom, 12 / self.width,
                                     (rows * _CELL[1] - 30) / self.height))
        self.figure.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), cax=axis).ax.tick_params(labelsize=6)

    def save(self, out_png, title: str = "") -> Path:
        if title:
            self.figure.suptitle(title, fontsize=10, y=1.0 - 8 / self.height, va="top")
        self.figure.figimage(self.pixels, 0, 0, origin="upper", zorder=-1)  # beneath the colour bar
        with io.atomic_path(out_png) as temporary:
            # No timestamp in the metadata: the same registration gives the same bytes (reports stay unchanged).
            # zlib level 1 writes these pictures several times faster than the default 6, and no larger.
            self.figure.savefig(temporary, format="png", dpi=_DPI, metadata={"Software": None},
                                pil_kwargs={"compress_level": 1})
        return Path(out_png)


def _centroid_slices(labels: np.ndarray, label_ids: list[int], axis: int) -> np.ndarray:
    """Each label's mean voxel index along ``axis`` (float, ``(len(label_ids),)``); every label must be present.

    From each slice's count of each label: one pass over the map, where a centre of mass per label and axis
    takes several.
    """
    ids = np.asarray(label_ids)
    order = np.argsort(ids)
    position = np.moveaxis(metrics.label_positions(labels, ids[order]), axis, -1)
    counts = np.stack([np.bincount(position[..., index].ravel(), minlength=len(ids) + 1)[:-1]
                       for index in range(position.shape[-1])], axis=1)  # (labels, slices)
    out = np.empty(len(ids))
    out[order] = counts @ np.arange(position.shape[-1]) / counts.sum(axis=1)
    return out


def _label_dice(labels: list[int], known: dict[int, float] | None, other, fixed_labels, mask) -> list[float]:
    """Each label's Dice of ``other`` against ``fixed_labels`` over ``mask``: ``known``'s, else counted."""
    known = known or {}
    missing = [label for label in labels if label not in known]
    counted = dict(zip(missing, metrics.dice_scores(other, fixed_labels, missing, mask))) if missing else {}
    return [known[label] if label in known else counted[label] for label in labels]


def qc_figure(
    out_png,
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    warped: np.ndarray,
    *,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    moving_labels_on_fixed: np.ndarray | None = None,
    warped_labels: np.ndarray | None = None,
    dice_before: dict[int, float] | None = None,
    dice_after: dict[int, float] | None = None,
    jacobian: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    label_names: dict[int, str] | None = None,
    title: str = "",
) -> Path:
    """Draw the QC figure of one registration and write it as a PNG.

    Parameters
    ----------
    fixed, fixed_affine : the fixed image; every panel is on its grid.
    moving, moving_affine : the moving image on its own grid (shown
        resampled onto the fixed grid, undeformed: "before").
    warped : the moving image on the fixed grid (the registration's output).
    fixed_labels, moving_labels, warped_labels : optional label maps (on
        the fixed, moving and fixed grid); contours before need the first
        two, contours after the first and the last.
    moving_labels_on_fixed : the moving labels already on the fixed grid,
        undeformed (:func:`labels_before`), to spare resampling them again.
    dice_before, dice_after : ``{label: Dice}`` as the evaluation counted
        them (``dice.csv``), to spare counting them again; a label they
        lack is counted here.
    jacobian : optional ``(X, Y, Z)`` determinant of the field's Jacobian on
        the fixed grid (:func:`~nipype_inrlddmm.evaluation.metrics.jacobian_determinant`):
        its column, with folded voxels (det J <= 0) marked magenta.
    mask : optional bool region of the fixed grid where the Dice in the
        titles is counted (as in ``dice.csv``).
    label_names : ``{id: name}`` for the per-label rows.
    """
    fixed, warped, fixed_labels, warped_labels, jacobian, mask, on_fixed, fixed_affine = _to_ras(
        fixed_affine, fixed, warped, fixed_labels, warped_labels, jacobian, mask, moving_labels_on_fixed)
    moving, moving_labels, moving_affine = _to_ras(moving_affine, moving, moving_labels)
    shape = fixed.shape
    if on_fixed is None and fixed_labels is not None and moving_labels is not None:
        on_fixed = labels_before(moving_labels, moving_affine, shape, fixed_affine)
    # Once, not per slice: a NIfTI volume is read in Fortran order, and each resampled slice would copy it whole.
    moving = np.ascontiguousarray(moving, np.float32)
    moving_cut = partial(_moving_cut, moving, moving_affine, shape, fixed_affine)
    fixed_window, moving_window = _window(fixed), _window(moving)

    # Panels of each plane's row: fixed, moving, warped, checkerboard, [contours before, after], [det J].
    n_panels = 4 + 2 * (fixed_labels is not None) + (jacobian is not None)
    label_ids = [] if fixed_labels is None else [int(v) for v in np.unique(fixed_labels) if v != 0]
    if label_names:  # the evaluated labels, as in dice.csv
        label_ids = [v for v in label_ids if v in label_names]
    scores_before = scores_after = None  # label_ids' Dice
    if label_ids and on_fixed is not None:
        scores_before = _label_dice(label_ids, dice_before, on_fixed, fixed_labels, mask)
    if label_ids and warped_labels is not None:
        scores_after = _label_dice(label_ids, dice_after, warped_labels, fixed_labels, mask)
    per_label_rows = (len(label_ids) + 1) // 2
    mosaic = _Mosaic(3 + per_label_rows, max(n_panels, 6), colour_bar=jacobian is not None)

    summary = [title] if title else []
    if scores_after is not None:
        before = "" if scores_before is None else f"before {np.nanmean(scores_before):.3f}, "
        summary.append(f"mean Dice {before}after {np.nanmean(scores_after):.3f}")
    if jacobian is not None:
        folded = int((jacobian <= 0).sum())
        summary.append(f"det J <= 0: {folded} voxels ({100.0 * folded / jacobian.size:.3f} %), "
                       f"min {jacobian.min():.3f}")
    legend = f"contours: fixed green, moving/warped red, overlap yellow   |   {CONVENTION}"

    fixed_grey, moving_grey = dict(vmin=fixed_window[0], vmax=fixed_window[1]), dict(vmin=moving_window[0],
                                                                                     vmax=moving_window[1])
    for row, plane in enumerate(("axial", "coronal", "sagittal")):
        axis_index = _AXIS[plane]
        index = shape[axis_index] // 2
        aspect = _aspect(fixed_affine, axis_index)
        cut = partial(_cut, axis=axis_index, index=index)
        place = partial(mosaic.place, row, aspect=aspect)
        column = iter(range(n_panels))
        place(next(column), cut(fixed), title=f"fixed ({plane} {index})", **fixed_grey)
        place(next(column), moving_cut(axis_index, index), title="moving (before)", **moving_grey)
        place(next(column), cut(warped), title="warped (after)", **moving_grey)
        place(next(column), checkerboard(cut(fixed), cut(warped)), title="checker fixed/warped")
        if fixed_labels is not None:
            fixed_cut = cut(fixed_labels)
            before = None if on_fixed is None else cut(on_fixed)
            after = None if warped_labels is None else cut(warped_labels)
            place(next(column), cut(fixed), title="contours before", overlay=contour_overlay(fixed_cut, before),
                  **fixed_grey)
            place(next(column), cut(fixed), title="contours after", overlay=contour_overlay(fixed_cut, after),
                  **fixed_grey)
        if jacobian is not None:
            det_cut = cut(jacobian)
            folded = np.zeros((*det_cut.shape, 4))
            folded[det_cut <= 0] = (1.0, 0.0, 1.0, 1.0)
            place(next(column), det_cut, title=f"det J ({int((det_cut <= 0).sum())} folded)", cmap="RdBu_r",
                  vmin=0.0, vmax=2.0, overlay=folded)
    if jacobian is not None:
        mosaic.colour_bar(3, "RdBu_r", 0.0, 2.0)

    # Per label, the axial slice through its centroid in the fixed labels: the fixed image with the fixed
    # contour, the moving image with the contours before, the warped image with the contours after.
    axial = _AXIS["axial"]
    aspect = _aspect(fixed_affine, axial)
    centroids = _centroid_slices(fixed_labels, label_ids, axial) if label_ids else []
    for position, label in enumerate(label_ids):
        row, first = 3 + position // 2, 3 * (position % 2)
        index = int(round(centroids[position]))
        name = (label_names or {}).get(label, str(label))
        fixed_cut = (_cut(fixed_labels, axial, index) == label).astype(np.int32)
        panels = [(_cut(fixed, axial, index), fixed_grey, None, f"{name}: fixed, axial {index}")]
        if on_fixed is not None:
            panels.append((moving_cut(axial, index), moving_grey, on_fixed,
                           f"before: Dice {scores_before[position]:.3f}"))
        if warped_labels is not None:
            panels.append((_cut(warped, axial, index), moving_grey, warped_labels,
                           f"after: Dice {scores_after[position]:.3f}"))
        for offset, (image, grey, other, text) in enumerate(panels):
            other_cut = None if other is None else (_cut(other, axial, index) == label).astype(np.int32)
            mosaic.place(row, first + offset, image, aspect, text, overlay=contour_overlay(fixed_cut, other_cut),
                         **grey)
    return mosaic.save(out_png, "   |   ".join(s for s in summary if s) + "\n" + legend)


def write_qc_figure(
    out_png, *, fixed_image, moving_image, warped_image, fixed_labels=None, moving_labels=None, warped_labels=None,
    displacement=None, fixed_mask=None, label_names=None, title: str = "",
) -> Path:
    """:func:`qc_figure` from files (NIfTI images and label maps, an ITK/ANTs displacement).

    Every file is validated (:mod:`nipype_inrlddmm.io`); a map on the wrong
    grid raises :class:`~nipype_inrlddmm.io.InputError` naming it.
    """
    fixed, fixed_affine = io.load_volume(fixed_image, what="fixed image")
    moving, moving_affine = io.load_volume(moving_image, what="moving image")
    warped, warped_affine = io.load_volume(warped_image, what="warped image")
    on_fixed_grid = f"the fixed image {fixed_image}"
    io.require_grid(warped_image, warped.shape, warped_affine, fixed.shape, fixed_affine, what="warped image",
                    reference=on_fixed_grid)
    reference = (fixed_image, fixed, fixed_affine)
    maps = {
        "fixed_labels": io.load_labels(fixed_labels, reference=reference)[0] if fixed_labels else None,
        "moving_labels": (io.load_labels(moving_labels, reference=(moving_image, moving, moving_affine))[0]
                          if moving_labels else None),
        "warped_labels": io.load_labels(warped_labels, reference=reference)[0] if warped_labels else None,
    }
    det = None
    if displacement:
        field, field_affine = io.load_displacement(displacement)
        io.require_grid(displacement, field.shape[:3], field_affine, fixed.shape, fixed_affine, what="displacement",
                        reference=on_fixed_grid)
        det = metrics.jacobian_determinant(field, fixed_affine)
    mask = io.load_mask(fixed_mask, fixed.shape, fixed_affine, reference=on_fixed_grid) if fixed_mask else None
    names = io.load_label_names(label_names) if label_names else None
    return qc_figure(out_png, fixed, fixed_affine, moving, moving_affine, warped, jacobian=det, mask=mask,
                     label_names=names, title=title, **maps)


def write_animation(out_gif, frames: np.ndarray, times, affine: np.ndarray, *, title: str = "",
                    frame_ms: int = 400) -> Path:
    """An animated GIF of the axial slice through the grid's centre, one frame per time.

    ``frames`` is ``(X, Y, Z, K)`` on the grid of ``affine``; all frames share
    one grey window (from the first frame, the moving image) so intensity
    changes are not hidden by rescaling.  The GIF loops, holding the last
    frame twice as long.
    """
    from PIL import Image

    frames, affine = _to_ras(affine, np.asarray(frames))
    axial = _AXIS["axial"]
    index = frames.shape[axial] // 2
    aspect = _aspect(affine, axial)
    low, high = _window(frames[..., 0])
    pictures = []
    for k, t in enumerate(times):
        tile = render_slice(_cut(frames[..., k], axial, index), aspect, (320, 320), vmin=low, vmax=high)
        figure = Figure(figsize=(tile.shape[1] / _DPI, (tile.shape[0] + 24) / _DPI), dpi=_DPI)
        canvas = FigureCanvasAgg(figure)
        figure.figimage(tile, 0, 0, origin="upper")
        figure.suptitle(f"{title + '  ' if title else ''}t = {float(t):.2f}", fontsize=10, y=1.0, va="top")
        canvas.draw()
        pictures.append(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).convert("P", palette=Image.ADAPTIVE))
    durations = [frame_ms] * (len(pictures) - 1) + [2 * frame_ms]
    with io.atomic_path(out_gif) as temporary:
        pictures[0].save(temporary, format="GIF", save_all=True, append_images=pictures[1:], duration=durations,
                         loop=0)
    return Path(out_gif)
