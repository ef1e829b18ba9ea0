"""Evaluation as Learn2Reg reports it: Dice, HD95, Jacobian determinant statistics, landmark TRE.

Arrays are NumPy ``(X, Y, Z)`` label maps on one grid, or ``(X, Y, Z, 3)``
displacements in mm (RAS) with the grid's ``(4, 4)`` affine; points are
``(N, 3)`` world mm, RAS.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def dice(warped: np.ndarray, fixed: np.ndarray, label: int) -> float:
    """Dice overlap of one label; NaN when the label is absent from both."""
    return mask_dice(warped == label, fixed == label)


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks on one grid; NaN when both are empty."""
    total = a.sum() + b.sum()
    return float("nan") if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


#: Label ids up to this are looked up in a table of every id (a label map's usual case), others by bisection.
_TABLE_IDS = 1 << 16


def label_positions(values: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """Each value's position among the sorted label ids ``ranked``, or ``len(ranked)`` for any other value."""
    largest = int(values.max()) if np.issubdtype(values.dtype, np.integer) and values.size else _TABLE_IDS
    if largest < _TABLE_IDS and values.min() >= 0:
        table = np.full(largest + 1, len(ranked), np.intp)
        listed = (ranked >= 0) & (ranked < len(table))
        table[ranked[listed]] = np.flatnonzero(listed)
        return table[values]
    position = np.searchsorted(ranked, values).clip(max=len(ranked) - 1)
    return np.where(ranked[position] == values, position, len(ranked))


def dice_scores(warped: np.ndarray, fixed: np.ndarray, labels, mask: np.ndarray | None = None) -> np.ndarray:
    """Dice of each of ``labels`` (NaN where absent from both maps), in one pass over the maps.

    Equal to :func:`dice` label by label, restricted to ``mask`` (bool, same
    grid) when given; each voxel is looked up once among the sorted labels,
    rather than each label compared with every voxel.
    """
    labels = np.asarray(labels)
    order = np.argsort(labels)
    ranked = labels[order]
    if mask is not None:
        warped, fixed = warped[mask], fixed[mask]
    # Any voxel order will do if both maps share it: NIfTI maps are read in Fortran order, and C order would copy.
    layout = "F" if warped.flags.f_contiguous and fixed.flags.f_contiguous else "C"
    warped_rank, fixed_rank = (label_positions(values.ravel(order=layout), ranked) for values in (warped, fixed))
    size = len(ranked) + 1
    both = np.bincount(warped_rank[warped_rank == fixed_rank], minlength=size)[:-1]
    total = np.bincount(warped_rank, minlength=size)[:-1] + np.bincount(fixed_rank, minlength=size)[:-1]
    with np.errstate(invalid="ignore"):
        scores = 2.0 * both / total
    out = np.empty(len(labels))
    out[order] = scores
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(warped: np.ndarray, fixed: np.ndarray, label: int, spacing) -> float:
    """95th percentile of the symmetric surface distance (mm); NaN if either is empty."""
    return _hd95_masks(warped == label, fixed == label, spacing)


def _hd95_masks(a: np.ndarray, b: np.ndarray, spacing) -> float:
    if not a.any() or not b.any():
        return float("nan")
    # Distances between the two surfaces never leave their joint bounding box: crop to it (plus one
    # voxel, so the crop edge is background as the volume's outside is) before finding the surfaces.
    nonzero = np.nonzero(a | b)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in nonzero)
    points_a, points_b = (np.argwhere(_surface(mask[box])) * np.asarray(spacing, np.float64) for mask in (a, b))
    # Each surface voxel's distance to the other surface's nearest: what a Euclidean distance transform of
    # the other surface holds there, from a k-d tree of the surface points alone rather than a transform
    # of every voxel of the box: on whole-brain label maps the evaluation takes about two thirds of the time.
    to_b = cKDTree(points_b).query(points_a, workers=-1)[0]
    to_a = cKDTree(points_a).query(points_b, workers=-1)[0]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))


def _label_boxes(labels_map: np.ndarray, ranked: np.ndarray) -> list:
    """The bounding box (slices) of each of the sorted label ids ``ranked`` in ``labels_map``; None if absent."""
    position = label_positions(labels_map, ranked)
    # find_objects numbers objects from 1; 0 (and any label not asked for) is background.
    return ndimage.find_objects(np.where(position < len(ranked), position + 1, 0), max_label=len(ranked))


def _union(a, b) -> tuple[slice, ...]:
    """The smallest box holding boxes ``a`` and ``b`` (None: empty); both empty gives an empty box."""
    if a is None or b is None:
        return a or b or (slice(0, 0),) * 3
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b))


def label_overlap(
    warped: np.ndarray, fixed: np.ndarray, affine: np.ndarray, labels=None, *, names=None, mask=None
) -> list[dict]:
    """One row per label: Dice, HD95 (mm) and voxel counts.

    ``labels`` defaults to every non-zero label of either map; ``names`` maps
    label ids to names.  ``mask`` (bool, fixed grid) restricts the
    evaluation to a region, e.g. a CBCT's field of view, outside which the
    fixed labels do not exist.  A label present in only one map is reported
    with ``missing`` naming the map that lacks it (its Dice is then 0 by
    definition, never silently).
    """
    if warped.shape != fixed.shape:
        raise ValueError(f"label maps differ in shape: {warped.shape} vs {fixed.shape}")
    if mask is not None:
        warped, fixed = np.where(mask, warped, 0), np.where(mask, fixed, 0)
    names = names or {}
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if labels is None:
        labels = sorted((set(np.unique(warped).tolist()) | set(np.unique(fixed).tolist())) - {0})
    labels = np.asarray(list(labels), np.int64)  # any iterable of ids, a {id: name} dict's keys too
    if labels.size == 0:
        return []
    order = np.argsort(labels)
    # Every label is compared only inside the box that holds it in either map: one pass over each map.
    boxes = zip(*(_label_boxes(labels_map, labels[order]) for labels_map in (warped, fixed)))
    box_of = dict(zip(labels[order].tolist(), (_union(*pair) for pair in boxes)))
    rows = []
    for label in labels.tolist():
        box = box_of[label]
        in_warped, in_fixed = warped[box] == label, fixed[box] == label
        n_warped, n_fixed = int(in_warped.sum()), int(in_fixed.sum())
        missing = "both" if not (n_warped or n_fixed) else "warped" if not n_warped else "fixed" if not n_fixed else ""
        rows.append({
            "label": int(label),
            "name": names.get(int(label), str(label)),
            "dice": mask_dice(in_warped, in_fixed),
            "hd95_mm": _hd95_masks(in_warped, in_fixed, spacing),
            "voxels_fixed": n_fixed,
            "voxels_warped": n_warped,
            "missing": missing,
        })
    return rows


def jacobian_determinant(displacement: np.ndarray, affine: np.ndarray, *, planes: int = 4) -> np.ndarray:
    """det of d(x + u(x))/dx at every voxel, by central differences, ``(X, Y, Z)``.

    Computed ``planes`` planes of the first axis at a time (each with its
    neighbours, so the differences are those of the whole volume): the two
    dozen whole-volume temporaries of the determinant then stay in the cache,
    three times as fast on a brain's 1 mm grid.
    """
    import torch  # the metrics need no torch otherwise; its threads make this several times faster than NumPy

    # With G = du/d(i, j, k) (per voxel index) and L the affine's linear part (dx/d(i, j, k)), the Jacobian is
    # I + G L^-1 = (L + G) L^-1, so det J = det(L + G) / det(L): oblique and anisotropic grids without a
    # matrix product per voxel; the determinant by cofactors, several times faster than a batched LU of
    # (X, Y, Z, 3, 3) matrices.
    field = torch.from_numpy(np.ascontiguousarray(displacement))  # in its own precision, float32 or float64
    linear = np.asarray(affine, np.float64)[:3, :3]
    out = torch.empty(field.shape[:3], dtype=field.dtype)
    for start in range(0, len(field), planes):
        stop = min(start + planes, len(field))
        below, above = max(start - 1, 0), min(stop + 1, len(field))
        kept = slice(start - below, stop - below)
        gradients = torch.gradient(field[below:above], dim=(0, 1, 2))  # d(u_x, u_y, u_z)/di, /dj, /dk
        (a, d, g), (b, e, h), (c, f, i) = [[gradient[kept, ..., component] + linear[component, axis]
                                            for component in range(3)]
                                           for axis, gradient in enumerate(gradients)]  # columns of L + G
        out[start:stop] = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return out.div_(float(np.linalg.det(linear))).numpy()


def jacobian_summary(displacement: np.ndarray, affine: np.ndarray, border: int = 2) -> dict:
    """Folding statistics: min det J, % of voxels with det J <= 0, SDlogJ.

    SDlogJ (std of log det J, with det J clipped to >= 1e-9) is computed on
    the grid cropped by ``border`` voxels, as Learn2Reg does.
    """
    return determinant_summary(jacobian_determinant(displacement, affine), border)


def determinant_summary(det: np.ndarray, border: int = 2) -> dict:
    """:func:`jacobian_summary`'s statistics of a given ``(X, Y, Z)`` det J map (e.g. ANTs')."""
    inner = det[border:-border, border:-border, border:-border] if border else det
    if inner.size == 0:
        inner = det
    return {
        "jacobian_min": float(det.min()),
        "jacobian_nonpositive_percent": float(100.0 * (det <= 0).mean()),
        "sdlogj": float(np.log(np.clip(inner, 1e-9, None)).std()),
    }


def map_points(points: np.ndarray, displacement: np.ndarray, affine: np.ndarray,
               pre_affine: np.ndarray | None = None) -> np.ndarray:
    """Carry fixed-space points to moving space: ``A (p + d(p))``.

    ``d`` is interpolated trilinearly at ``p`` (clamped to the grid's edge);
    ``pre_affine`` ``A`` is the fixed -> moving affine applied before the
    deformable stages (identity when None), as AffineInit writes it.
    """
    ijk = (np.linalg.inv(affine) @ np.c_[points, np.ones(len(points))].T)[:3]
    moved = points + np.stack(
        [ndimage.map_coordinates(displacement[..., c], ijk, order=1, mode="nearest") for c in range(3)], axis=1
    )
    if pre_affine is None:
        return moved
    return (pre_affine @ np.c_[moved, np.ones(len(moved))].T)[:3].T


def landmark_errors(fixed_points: np.ndarray, moving_points: np.ndarray, displacement: np.ndarray,
                    affine: np.ndarray, pre_affine: np.ndarray | None = None) -> np.ndarray:
    """Target registration error (mm) of each landmark pair, ``(N,)``.

    Row ``i`` of ``fixed_points`` and ``moving_points`` is one pair; the fixed
    landmark is mapped by :func:`map_points` and compared with its partner.
    """
    if fixed_points.shape != moving_points.shape or fixed_points.ndim != 2 or fixed_points.shape[1] != 3:
        raise ValueError(f"landmark sets must both be (N, 3), got {fixed_points.shape} and {moving_points.shape}")
    mapped = map_points(fixed_points, displacement, affine, pre_affine)
    return np.linalg.norm(mapped - moving_points, axis=1)
