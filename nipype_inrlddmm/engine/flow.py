"""Euler integration of points through the velocity field (Algorithm 1), forwards and backwards.

Coordinates: points are ``(N, 3)`` world mm (RAS); the velocity is a callable
``(N, 3) mm, t -> (N, 3) mm per unit time`` over ``t`` in [0, 1], evaluated at
the step times ``t_i = i / n_steps``.  Forwards, points of the fixed image
travel to the moving image (``warped(x) = moving(x + S(x))``); backwards,
points of the moving image travel to the fixed image (the inverse map).
"""

from __future__ import annotations

import torch

from .grid import apply_affine, sample, spacing, voxel_indices
from .sampling import lattice_strides
from .velocity import VelocityField


def integrate(velocity, points: torch.Tensor, n_steps: int, *, return_path: bool = False):
    """Carry points from t = 0 to t = 1 by ``n_steps`` Euler steps.

    ``p <- p + f(p, t) dt`` with ``dt = 1 / n_steps``; the displacement is the
    sum of the steps.

    Parameters
    ----------
    velocity : callable ``(N, 3) mm, t -> (N, 3) mm/unit time``; a
        :class:`~.velocity.VelocityField` whose network runs fused takes
        every step as one autograd node (:func:`~.siren.siren_flow`).
    points : ``(N, 3)`` start points, world mm (RAS), on the fixed image.

    Returns
    -------
    displacement : ``(N, 3)`` mm, end point minus start point.
    kinetic : scalar, ``(1/n) sum_i mean_N ||v_i||^2`` in mm^2, the paper's
        velocity penalty.
    path : list of ``n_steps + 1`` ``(N, 3)`` positions (only with
        ``return_path=True``).
    """
    if not return_path and isinstance(velocity, VelocityField) and velocity.fused(points):
        return velocity.fused_flow(points, n_steps)
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


def integrate_backward(velocity, points: torch.Tensor, n_steps: int, *, corrections: int = 2) -> torch.Tensor:
    """Carry points from t = 1 back to t = 0: the inverse map of :func:`integrate`.

    The forward Euler scheme run in reverse, with the same step times: for
    ``i = n_steps - 1`` down to ``0``, ``p <- p - f(p, t_i) dt``.  That
    plain reverse step evaluates the velocity where the point is now, not
    where the forward step started, so it undoes the step only up to
    ``O(dt * |grad v| * |v dt|)``.  Each of ``corrections`` fixed-point
    iterations ``p <- q - f(p, t_i) dt`` (``q`` the position before the
    step) then moves the evaluation point to where the forward step must
    have started, so the result converges to the exact inverse of the
    forward scheme (contraction while ``dt * |grad v| < 1``, which a
    diffeomorphic flow satisfies).  ``corrections=0`` is the plain reverse
    scheme; each correction costs one more network call per step.

    Parameters
    ----------
    velocity : callable ``(N, 3) mm, t -> (N, 3) mm/unit time``.
    points : ``(N, 3)`` start points, world mm (RAS), on the moving image.

    Returns
    -------
    ``(N, 3)`` mm: end point minus start point (the inverse displacement:
    ``image(y + returned(y))`` carries a fixed-space image onto the moving
    image).
    """
    dt = 1.0 / n_steps
    position = points
    for step in reversed(range(n_steps)):
        t = step * dt
        after = position
        position = after - velocity(after, t) * dt
        for _ in range(corrections):
            position = after - velocity(position, t) * dt
    return position - points


def path_at_times(path, times) -> torch.Tensor:
    """Displacements of an Euler path at arbitrary times ``t`` in [0, 1].

    The Euler path is piecewise linear in time (each step moves on a
    straight line at constant velocity), so linear interpolation between
    the two step boundaries around ``t`` gives exactly where the scheme puts
    the point at ``t``, not an approximation; at ``t = 1`` it is the sum of
    all steps, the displacement :func:`integrate` returns.

    Parameters
    ----------
    path : ``n_steps + 1`` positions ``(N, 3)`` (``integrate(...,
        return_path=True)``'s third result); ``path[0]`` are the start points.
    times : ``K`` floats in [0, 1].

    Returns
    -------
    ``(K, N, 3)`` mm: position at each time minus the start point.
    """
    n_steps = len(path) - 1
    out = []
    for t in times:
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"times must lie in [0, 1], got {t}")
        where = float(t) * n_steps
        lower = min(int(where), n_steps - 1)
        weight = where - lower
        if weight == 0:
            position = path[lower]
        elif weight == 1:  # t = 1: the end point itself, bit-identical to integrate()'s
            position = path[lower + 1]
        else:
            position = path[lower] * (1 - weight) + path[lower + 1] * weight
        out.append(position - path[0])
    return torch.stack(out)


def _integration_points(shape, affine: torch.Tensor, stride):
    """World points where the dense field is integrated: every voxel, or a sub-grid and its axes."""
    device = affine.device
    strides = lattice_strides(stride, spacing(affine).tolist())
    if max(strides) <= 1:
        return voxel_indices(shape, device=device, dtype=affine.dtype), None
    # Sub-grid that keeps the last voxel of each axis so interpolation never extrapolates.
    axes = []
    for n, step in zip(shape, strides):
        idx = torch.arange(0, n, step, device=device, dtype=affine.dtype)
        if idx[-1] != n - 1:
            idx = torch.cat([idx, idx.new_tensor([n - 1])])
        axes.append(idx)
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1), axes


@torch.no_grad()
def dense_displacement(
    velocity,
    shape,
    affine: torch.Tensor,
    n_steps: int,
    *,
    stride: int | tuple[int, int, int] | None = 1,
    chunk_size: int = 65536,
    backward: bool = False,
) -> torch.Tensor:
    """The displacement on every voxel of a grid, without autograd.

    Parameters
    ----------
    shape, affine : the grid (normally the fixed image's; the moving
        image's for ``backward``).
    stride : integrate only every ``stride``-th voxel along each axis (plus
        the last one; one int, or one per axis) and interpolate trilinearly in
        between; the velocity is smooth at that scale and this divides the
        cost by ``stride**3``.  None: per axis, the stride of the training
        lattice (:func:`~.sampling.lattice_strides`, closest to 4 mm and at
        least 2), so the field is interpolated from points as far apart as
        those the similarity saw.
    chunk_size : points per network call, to bound memory.
    backward : integrate from t = 1 back to t = 0 (:func:`integrate_backward`,
        default corrections): the inverse map, moving grid -> fixed space.

    Returns
    -------
    ``(X, Y, Z, 3)`` displacement in mm (RAS) on the grid.
    """
    sub_ijk, axes = _integration_points(shape, affine, stride)
    points = apply_affine(affine, sub_ijk).reshape(-1, 3)
    out = torch.empty_like(points)
    for start in range(0, points.shape[0], chunk_size):
        stop = start + chunk_size
        if backward:
            out[start:stop] = integrate_backward(velocity, points[start:stop], n_steps)
        else:
            out[start:stop] = integrate(velocity, points[start:stop], n_steps)[0]
    field = out.reshape(*sub_ijk.shape)
    return field if axes is None else _upsample_irregular(field, axes, shape)


@torch.no_grad()
def dense_path(
    velocity,
    shape,
    affine: torch.Tensor,
    n_steps: int,
    times,
    *,
    stride: int | tuple[int, int, int] | None = 1,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """The displacement of every voxel of a grid at intermediate times of the flow.

    The same integration as :func:`dense_displacement` (same sub-grid,
    chunks and interpolation), read at ``times`` by :func:`path_at_times`;
    at ``t = 1`` it equals :func:`dense_displacement` with the same
    ``stride``, and at ``t = 0`` it is zero.

    Returns
    -------
    ``(K, X, Y, Z, 3)`` mm (RAS), one field per time.
    """
    times = [float(t) for t in times]
    sub_ijk, axes = _integration_points(shape, affine, stride)
    points = apply_affine(affine, sub_ijk).reshape(-1, 3)
    out = points.new_empty((len(times), *points.shape))
    for start in range(0, points.shape[0], chunk_size):
        stop = start + chunk_size
        path = integrate(velocity, points[start:stop], n_steps, return_path=True)[2]
        out[:, start:stop] = path_at_times(path, times)
    fields = out.reshape(len(times), *sub_ijk.shape)
    if axes is None:
        return fields
    return torch.stack([_upsample_irregular(field, axes, shape) for field in fields])


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
