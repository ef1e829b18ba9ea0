"""Random patches of the fixed grid, drawn fresh at every iteration."""

from __future__ import annotations

import torch

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
