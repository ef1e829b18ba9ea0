"""Euler integration of points through the velocity field (Algorithm 1)."""

from __future__ import annotations

import torch

from .grid import apply_affine, sample, voxel_indices


def integrate(velocity, points: torch.Tensor, n_steps: int, *, return_path: bool = False):
    """Carry points from t = 0 to t = 1 by ``n_steps`` Euler steps.

    ``p <- p + f(p, t) dt`` with ``dt = 1 / n_steps``; the displacement is the
    sum of the steps.

    Parameters
    ----------
    velocity : callable ``(N, 3) mm, t -> (N, 3) mm/unit time``.
    points : ``(N, 3)`` start points, world mm (RAS), on the fixed image.

    Returns
    -------
    displacement : ``(N, 3)`` mm, end point minus start point.
    kinetic : scalar, ``(1/n) sum_i mean_N ||v_i||^2`` in mm^2, the paper's
        velocity penalty.
    path : list of ``n_steps + 1`` ``(N, 3)`` positions (only with
        ``return_path=True``).
    """
    dt = 1.0 / n_steps
    position = points
    kinetic = points.new_zeros(())
    path = [points]
    for step in range(n_steps):
        v = velocity(position, step * dt)
        kinetic = kinetic + v.square().sum(dim=1).mean()
        position = position + v * dt
        if return_path:
            path.append(position)
    displacement = position - points
    kinetic = kinetic / n_steps
    return (displacement, kinetic, path) if return_path else (displacement, kinetic)


@torch.no_grad()
def dense_displacement(
    velocity,
    shape,
    affine: torch.Tensor,
    n_steps: int,
    *,
    stride: int = 1,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """The displacement on every voxel of a grid, without autograd.

    Parameters
    ----------
    shape, affine : the grid (normally the fixed image's).
    stride : integrate only every ``stride``-th voxel along each axis (plus
        the last one) and interpolate trilinearly in between; the velocity is
        smooth at that scale and this divides the cost by ``stride**3``.
    chunk_size : points per network call, to bound memory.

    Returns
    -------
    ``(X, Y, Z, 3)`` displacement in mm (RAS) on the grid.
    """
    device = affine.device
    if stride > 1:
        # Sub-grid that keeps the last voxel of each axis so interpolation
        # never extrapolates.
        axes = []
        for n in shape:
            idx = torch.arange(0, n, stride, device=device, dtype=affine.dtype)
            if idx[-1] != n - 1:
                idx = torch.cat([idx, idx.new_tensor([n - 1])])
            axes.append(idx)
        sub_ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    else:
        sub_ijk = voxel_indices(shape, device=device, dtype=affine.dtype)
    points = apply_affine(affine, sub_ijk).reshape(-1, 3)
    out = torch.empty_like(points)
    for start in range(0, points.shape[0], chunk_size):
        stop = start + chunk_size
        out[start:stop] = integrate(velocity, points[start:stop], n_steps)[0]
    field = out.reshape(*sub_ijk.shape)
    if stride == 1:
        return field
    return _upsample_irregular(field, axes, shape)


def _upsample_irregular(field: torch.Tensor, axes, shape) -> torch.Tensor:
    """Trilinear interpolation from a rectilinear sub-grid to the full grid."""
    out = field.permute(3, 0, 1, 2)
    for dim, (idx, n) in enumerate(zip(axes, shape)):
        full = torch.arange(n, device=idx.device, dtype=idx.dtype)
        upper = torch.searchsorted(idx, full, right=False).clamp(1, len(idx) - 1)
        lower = upper - 1
        weight = ((full - idx[lower]) / (idx[upper] - idx[lower])).clamp(0, 1)
        shape_w = [1] * out.dim()
        shape_w[dim + 1] = n
        weight = weight.reshape(shape_w)
        out = out.index_select(dim + 1, lower) * (1 - weight) + out.index_select(dim + 1, upper) * weight
    return out.permute(1, 2, 3, 0)


def resample_field(field: torch.Tensor, field_affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinearly interpolate a ``(X, Y, Z, 3)`` displacement at ``(..., 3)`` world points."""
    return sample(field.permute(3, 0, 1, 2), field_affine, points).movedim(0, -1)
