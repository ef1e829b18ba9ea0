"""Voxel grids, world coordinates and sampling.

Conventions used throughout the engine:

* A volume is a tensor of shape ``(X, Y, Z)`` or ``(C, X, Y, Z)`` indexed like
  the NIfTI data array, so voxel ``(i, j, k)`` lies at world position
  ``affine @ (i, j, k, 1)``.
* World points are ``(..., 3)`` tensors in millimetres, RAS (the NIfTI
  convention).  Nothing in the engine assumes two volumes share a grid: every
  lookup goes world -> that volume's own voxel indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def apply_affine(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map ``(..., 3)`` points through a ``(4, 4)`` homogeneous affine."""
    return points @ affine[:3, :3].T + affine[:3, 3]


def voxel_indices(shape, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """All voxel indices of a grid as an ``(X, Y, Z, 3)`` tensor."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def world_grid(shape, affine: torch.Tensor) -> torch.Tensor:
    """World coordinates (mm, RAS) of every voxel centre, ``(X, Y, Z, 3)``.

    Any ``(4, 4)`` affine will do: through ``target @ affine`` the result is
    each voxel's coordinates in ``target``'s space (another volume's voxel
    indices, or ``grid_sample``'s coordinates).
    """
    # A sum of each axis' broadcast column, a third of the time of a (3, 3) product per voxel on large grids.
    i, j, k = (torch.arange(n, device=affine.device, dtype=affine.dtype)[:, None] * affine[:3, axis]
               for axis, n in enumerate(shape))  # (n, 3) each
    return (i[:, None, None] + j[None, :, None]) + (k[None, None] + affine[:3, 3])


def unravel(flat: torch.Tensor, shape) -> torch.Tensor:
    """Voxel indices ``(N, 3)`` (int64) of ``(N,)`` flat indices into a C-ordered grid of ``shape``.

    As ``torch.unravel_index`` stacked, whose checks in Python took several
    times the arithmetic on the few thousand voxels of an iteration.
    """
    rest, k = flat.div(shape[2], rounding_mode="floor"), flat.remainder(shape[2])
    return torch.stack([rest.div(shape[1], rounding_mode="floor"), rest.remainder(shape[1]), k], dim=-1)


def bounding_box(shape, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest and highest world coordinates (mm, RAS) of a grid's voxel centres, two ``(3,)`` tensors."""
    corners = voxel_indices((2, 2, 2), device=affine.device, dtype=affine.dtype).reshape(-1, 3)
    world = apply_affine(affine, corners * (torch.tensor(shape, dtype=affine.dtype, device=affine.device) - 1))
    return world.min(dim=0).values, world.max(dim=0).values


def grid_coordinates(shape, affine: torch.Tensor) -> torch.Tensor:
    """``(4, 4)`` map from world mm (RAS) to ``grid_sample``'s coordinates on a volume of ``shape``.

    ``grid_sample`` takes ``(x, y, z)`` = (last, middle, first) array axis,
    in [-1, 1], with ``align_corners=True`` putting -1 and 1 on the edge
    voxel centres.  As a matrix it composes with other affines, so a hot
    loop can map fixed-grid voxels straight to where the moving image is
    read.
    """
    size = torch.tensor(tuple(shape), dtype=affine.dtype, device=affine.device)
    to_unit = torch.eye(4, dtype=affine.dtype, device=affine.device)
    to_unit[:3, :3] = torch.diag(2.0 / (size - 1).clamp(min=1))
    to_unit[:3, 3] = -1.0
    reverse_axes = torch.eye(4, dtype=affine.dtype, device=affine.device)[[2, 1, 0, 3]]
    return reverse_axes @ to_unit @ torch.linalg.inv(affine)


def sample_grid(
    volume: torch.Tensor, grid: torch.Tensor, *, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Interpolate a volume at ``(..., 3)`` points given in its :func:`grid_coordinates`.

    Returns ``(...)`` for a 3-D volume, ``(C, ...)`` for a ``(C, X, Y, Z)`` one.
    """
    squeeze = volume.dim() == 3
    vol = volume[None] if squeeze else volume
    out = F.grid_sample(vol[None], grid.reshape(1, 1, 1, -1, 3).to(vol.dtype), mode=mode,
                        padding_mode=padding_mode, align_corners=True)
    out = out.reshape(vol.shape[0], *grid.shape[:-1])
    return out[0] if squeeze else out


def sample(
    volume: torch.Tensor,
    affine: torch.Tensor,
    points: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Interpolate a volume at world points.

    Parameters
    ----------
    volume : ``(X, Y, Z)`` or ``(C, X, Y, Z)`` tensor on its own grid.
    affine : ``(4, 4)`` voxel -> world affine of ``volume``.
    points : ``(..., 3)`` world points (mm, RAS).
    mode : ``"bilinear"`` (trilinear in 3-D) or ``"nearest"``.
    padding_mode : what points outside the grid see: ``"border"`` (nearest
        edge value) or ``"zeros"``.

    Returns
    -------
    ``(...)`` for a 3-D volume, ``(C, ...)`` for a 4-D one.
    """
    to_grid = grid_coordinates(volume.shape[-3:], affine)
    return sample_grid(volume, apply_affine(to_grid, points), mode=mode, padding_mode=padding_mode)


def downsample(volume: torch.Tensor, affine: torch.Tensor, factors) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-average a ``(X, Y, Z)`` volume by integer ``factors`` per axis.

    Returns the coarse volume and its affine: coarse voxel ``i'`` covers fine
    voxels ``f*i' .. f*i'+f-1`` and so sits at their mean index
    ``f*i' + (f-1)/2``, which keeps both grids in the same world space.
    Edge voxels are replicated so every axis divides evenly.
    """
    factors = tuple(int(f) for f in factors)
    if factors == (1, 1, 1):
        return volume, affine
    pad = [(-n) % f for n, f in zip(volume.shape, factors)]
    vol = volume[None, None]
    if any(pad):
        vol = F.pad(vol, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
    coarse = F.avg_pool3d(vol, kernel_size=factors, stride=factors)[0, 0]
    return coarse, block_grid(volume.shape, affine, factors)[1]


def block_grid(shape, affine: torch.Tensor, factors) -> tuple[tuple[int, int, int], torch.Tensor]:
    """Shape and affine of the grid that :func:`downsample` by ``factors`` gives."""
    scale = torch.eye(4, dtype=affine.dtype, device=affine.device)
    for axis, f in enumerate(factors):
        scale[axis, axis] = f
        scale[axis, 3] = (f - 1) / 2.0
    return tuple(-(-int(n) // int(f)) for n, f in zip(shape, factors)), affine @ scale


def spacing(affine: torch.Tensor) -> torch.Tensor:
    """Voxel size in mm along each array axis, ``(3,)``."""
    return torch.linalg.norm(affine[:3, :3], dim=0)


def matching_factors(affine: torch.Tensor, target_affine: torch.Tensor) -> tuple[int, int, int]:
    """Block sizes that bring a grid's spacing closest to a target grid's.

    Each axis of ``affine`` is paired with the ``target_affine`` axis most
    parallel to it (grids may be oblique to each other); its factor is the
    ratio of their spacings, rounded, at least 1.  Used so that the coarse
    stage sees moving and fixed images at the same physical resolution
    whatever their native spacings.
    """
    size, target_size = spacing(affine), spacing(target_affine)
    cosines = (affine[:3, :3] / size).T @ (target_affine[:3, :3] / target_size)
    partner = cosines.abs().argmax(dim=1)
    return tuple(max(1, int(torch.round(target_size[j] / size[i]))) for i, j in enumerate(partner.tolist()))


#: The eight corners of a lattice cell, as offsets from its lowest corner.
_CELL_CORNERS = [(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)]


def _uniform_cells(labels: torch.Tensor) -> torch.Tensor:
    """``(X, Y, Z)`` bool: whether the cell whose lowest corner is each voxel has one label at its eight
    corners (the far edges replicated, as the clamped lookup of :func:`sample_labels` reads them)."""
    padded = labels
    for axis in range(3):
        padded = torch.cat([padded, padded.narrow(axis, padded.shape[axis] - 1, 1)], dim=axis)
    x, y, z = labels.shape
    uniform = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    for i, j, k in _CELL_CORNERS[1:]:
        uniform &= padded[i:i + x, j:j + y, k:k + z] == labels
    return uniform


def sample_labels(labels: torch.Tensor, affine: torch.Tensor, points: torch.Tensor, *,
                  chunk_size: int = 1 << 20) -> torch.Tensor:
    """The label of largest trilinear weight at ``(..., 3)`` world points, as ANTs' GenericLabel.

    Equal to interpolating each label's indicator trilinearly and taking the
    arg-max (the lowest label on a tie); :func:`labels_at_indices` on the
    points' voxel indices.

    Parameters
    ----------
    labels : ``(X, Y, Z)`` label map on its own grid, voxel -> world ``affine``.
    points : ``(..., 3)`` world points (mm, RAS).

    Returns
    -------
    ``(...)`` labels, the dtype of ``labels``.
    """
    return labels_at_indices(labels, apply_affine(torch.linalg.inv(affine.to(points.dtype)), points),
                             chunk_size=chunk_size)


def _heaviest_label(votes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per row of ``(N, 8)`` corner labels and weights (summing to 1), the label of largest total weight,
    the lowest among equals; int64 ``(N,)``."""
    out = votes[:, 0].long()
    # A label holding over half the weight is the heaviest: only the other rows compare every pair of corners.
    # (The margin covers the weights' float rounding, so that no near-tie is decided here.)
    share = (weights * (votes == votes[:, :1])).sum(dim=1)
    open_rows = (share <= 0.5 + 1e-5).nonzero().squeeze(1)
    votes, weights = votes[open_rows], weights[open_rows]
    totals = ((votes[:, :, None] == votes[:, None, :]) * weights[:, None, :]).sum(dim=-1)
    heaviest = totals == totals.max(dim=1, keepdim=True).values
    out[open_rows] = torch.where(heaviest, votes.long(), torch.iinfo(torch.int64).max).min(dim=1).values
    return out


def labels_at_indices(labels: torch.Tensor, ijk: torch.Tensor, *, chunk_size: int = 1 << 20) -> torch.Tensor:
    """:func:`sample_labels` at ``(..., 3)`` continuous voxel indices of ``labels`` rather than world points.

    Without one pass over the points per label: a point in a cell of one
    label reads it, and only points in cells whose corners disagree (the
    boundaries) have the eight corners vote with their trilinear weights.
    Points outside the grid read its edge.  Returns ``(...)`` labels, the
    dtype of ``labels``.
    """
    shape = torch.tensor(labels.shape, device=ijk.device)
    out_shape = ijk.shape[:-1]
    ijk = torch.minimum(ijk.reshape(-1, 3).clamp(min=0), (shape - 1).to(ijk.dtype))
    flat, uniform = labels.reshape(-1), _uniform_cells(labels).reshape(-1)
    strides = torch.tensor([labels.shape[1] * labels.shape[2], labels.shape[2], 1], device=ijk.device)
    out = torch.empty(len(ijk), dtype=labels.dtype, device=labels.device)
    for start in range(0, len(ijk), chunk_size):
        position = ijk[start:start + chunk_size]
        low = position.floor()
        # The flat index as one matrix product in float64, exact below 2^53 voxels, and several times faster
        # than summing the three products of integer indices.
        cell = (low.double() @ strides.double()).long()
        chosen = flat[cell]
        boundary = (~uniform[cell]).nonzero().squeeze(1)
        if len(boundary):
            low, fraction = low[boundary], position[boundary] - low[boundary]
            # The far corners one stride along each axis, or none where a point lies on the last voxel
            # (its far weight is 0 there): the eight corners' flat indices in the order of _CELL_CORNERS.
            i, j, k = ((low < shape - 1) * strides).unbind(dim=1)
            offsets = torch.stack([torch.zeros_like(i), k, j, j + k, i, i + k, i + j, i + j + k], dim=1)
            votes = flat[cell[boundary, None] + offsets]  # (N, 8)
            wi, wj, wk = (torch.stack([1 - fraction[:, axis], fraction[:, axis]], dim=1) for axis in range(3))
            weights = (wi[:, :, None, None] * wj[:, None, :, None] * wk[:, None, None, :]).reshape(-1, 8)
            chosen[boundary] = _heaviest_label(votes, weights).to(labels.dtype)
        out[start:start + chunk_size] = chosen
    return out.reshape(out_shape)
