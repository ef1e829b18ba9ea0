"""Random patches of the fixed grid, drawn fresh at every iteration."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .grid import voxel_indices


def patch_shape(shape, patch_size: int) -> tuple[int, int, int]:
    """Patch edge per axis: ``patch_size``, or the whole axis where it is shorter."""
    return tuple(min(int(patch_size), int(n)) for n in shape)


def random_patches(
    shape,
    n_patches: int,
    patch_size: int,
    *,
    candidates: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Voxel indices of ``n_patches`` cubic patches of a grid.

    Parameters
    ----------
    shape : grid shape ``(X, Y, Z)``.
    candidates : optional ``(M, 3)`` long tensor of voxel indices (e.g. a
        mask's foreground) from which the patch centres are drawn; patches
        lie anywhere in the grid otherwise.

    Returns
    -------
    ``(n_patches, Px, Py, Pz, 3)`` long tensor of voxel indices, every patch
    fully inside the grid.
    """
    edge = torch.tensor(patch_shape(shape, patch_size))
    upper = torch.tensor(shape) - edge  # largest valid corner, per axis
    if candidates is None:
        corners = (torch.rand(n_patches, 3, generator=generator) * (upper + 1)).long()
    else:
        pick = torch.randint(len(candidates), (n_patches,), generator=generator)
        corners = candidates[pick].cpu() - edge // 2
    corners = torch.minimum(corners.clamp(min=0), upper)
    offsets = voxel_indices(tuple(edge.tolist()), dtype=torch.long)
    return corners[:, None, None, None, :] + offsets


def random_voxels(shape, n_points: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n_points, 3)`` voxel indices drawn uniformly over a grid."""
    upper = torch.tensor(shape)
    return (torch.rand(n_points, 3, generator=generator) * upper).long()


def lattice_shape(edge, stride: int) -> tuple[int, ...]:
    """Points per axis of :func:`patch_lattice` over a patch of ``edge`` voxels: ``ceil((P - 1) / stride) + 1``."""
    return tuple(math.ceil((int(n) - 1) / stride) + 1 for n in edge)


def patch_lattice(voxels: torch.Tensor, stride: int) -> torch.Tensor:
    """A lattice spanning each patch with points at most ``stride`` voxels apart.

    The flow is integrated on this lattice and interpolated to every voxel
    of the patch (:func:`interpolate_patches`), as the dense field is
    integrated on a sub-grid: the velocity is smooth at that scale.

    Parameters
    ----------
    voxels : ``(B, Px, Py, Pz, 3)`` float voxel indices of B patches.

    Returns
    -------
    ``(B, Qx, Qy, Qz, 3)`` float voxel indices (:func:`lattice_shape`),
    evenly spaced from the first to the last voxel of each axis, so the
    interpolation never extrapolates; ``voxels`` itself for ``stride`` 1.
    """
    if stride <= 1:
        return voxels
    first, last = voxels[:, 0, 0, 0], voxels[:, -1, -1, -1]
    axes = [torch.linspace(0.0, 1.0, n, dtype=voxels.dtype, device=voxels.device)
            for n in lattice_shape(voxels.shape[1:4], stride)]
    fraction = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return first[:, None, None, None] + fraction * (last - first)[:, None, None, None]


def interpolate_patches(values: torch.Tensor, size) -> torch.Tensor:
    """``(B, Qx, Qy, Qz, C)`` values on :func:`patch_lattice` -> ``(B, *size, C)`` on every voxel, trilinear."""
    if tuple(values.shape[1:4]) == tuple(size):
        return values
    # align_corners=True puts the Q lattice points exactly on the first and last of the P voxels.
    channels_first = values.permute(0, 4, 1, 2, 3)
    return F.interpolate(channels_first, size=tuple(size), mode="trilinear", align_corners=True).permute(0, 2, 3, 4, 1)
