"""Spatial regularity of a displacement sampled on patch lattices: the penalty that keeps fields smooth.

The paper's velocity penalty ``(1/n) sum_i ||v_i||^2`` bounds how far points
travel, not how the displacement varies from one point to the next: a field
may jitter at the lattice's scale, and fold, at no cost.  LDDMM's norm
``||Lv||^2`` penalises the derivatives instead.  The image-matching stages
already integrate the flow on a lattice in each patch and interpolate it
trilinearly to every voxel (as the dense field is), so the Jacobian of that
interpolant at the corners of each lattice cell is the Jacobian of the
field the similarity sees, from finite differences of values already
computed: no second derivative of the network.
"""

from __future__ import annotations

import math
from itertools import product

import torch


def lattice_jacobian_determinants(displacement: torch.Tensor, knot_spacing, linear: torch.Tensor) -> torch.Tensor:
    """``det J`` of ``x -> x + u(x)`` at the eight corners of every cell of patch lattices.

    Parameters
    ----------
    displacement : ``(B, Qx, Qy, Qz, 3)`` displacement in mm (RAS) at the
        knots of ``B`` lattices (:func:`~.sampling.patch_lattice`).
    knot_spacing : three floats, the knots' distance along each grid axis in
        voxels of that grid.
    linear : ``(3, 3)`` linear part of the grid's voxel -> world affine ``A``.

    Returns
    -------
    ``(K, B, Cx, Cy, Cz)`` determinants of the trilinear interpolant of the
    knots at the ``K`` = 8 corners of each cell, ``C = Q - 1`` cells per axis
    (where ``Q`` is 1: one cell, derivative zero, and half the corners).  At
    a cell's corner the interpolant's derivative along an axis is the
    difference along the cell's edge through that corner; inside the cell
    the Jacobian blends the corners' multilinearly.  A single value per cell
    (its centre, the mean of four edges) would be blind to fields that
    alternate from knot to knot, as a one-point quadrature is to hourglass
    modes in finite elements.  With ``G = du / d(voxel index)``, ``J = I + G
    A^-1 = (A + G) A^-1``, so ``det J = det(A + G) / det A``: the columns of
    ``A + G`` are the edges of the deformed cell.
    """
    axes = (1, 2, 3)
    edges = []  # per grid axis: the deformed cell's edge along it, in mm per voxel index
    for axis, step in zip(axes, knot_spacing):
        difference = (torch.zeros_like(displacement) if displacement.shape[axis] == 1
                      else displacement.diff(dim=axis) / float(step))
        edges.append(difference + linear[:, axis - 1].to(displacement))
    cells = [max(displacement.shape[axis] - 1, 1) for axis in axes]
    offsets = [(0, 1) if displacement.shape[axis] > 1 else (0,) for axis in axes]
    determinants = []
    for corner in product(*offsets):
        columns = []
        for axis, edge in zip(axes, edges):
            for other in axes:
                if other != axis:
                    edge = edge.narrow(other, corner[other - 1], cells[other - 1])
            columns.append(edge)
        determinants.append((columns[0] * torch.linalg.cross(columns[1], columns[2])).sum(dim=-1))
    return torch.stack(determinants) / torch.linalg.det(linear.to(displacement))


def log_jacobian_spread(det: torch.Tensor, scale: float, *, floor: float = 1e-2,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Spread of ``log det J`` about its mean over a tensor of Jacobian determinants, robust to large changes.

    Each deviation ``x`` of ``log det J`` from the mean costs ``2 s^2
    (sqrt(1 + (x / s)^2) - 1)`` (Charbonnier, ``s`` = ``scale``): ``x^2``
    while ``|x|`` is well under ``s``, so small deviations add up to the
    variance (SDlogJ squared), and ``2 s |x|`` beyond, so the few large
    volume changes that anatomy asks for (ventricles, a breathing lung) cost
    in proportion rather than by their square: the weight that silences
    many small fluctuations does not also flatten them.  A uniform volume
    change is free.  ``log det J`` grows without bound as a cell collapses;
    below ``floor`` (folded or nearly) the log is continued by its tangent
    at ``floor``, so a folded cell keeps a gradient that unfolds it instead
    of a clamp's zero.

    ``weights`` (broadcast against ``det``) scale each value's cost, about
    the one mean of all: the mean of the weighted costs.
    """
    log_det = torch.where(det > floor, det.clamp(min=floor).log(), math.log(floor) + (det - floor) / floor)
    deviation = (log_det - log_det.mean()) / scale
    cost = (1 + deviation.square()).sqrt() - 1
    if weights is not None:
        cost = cost * weights
    return 2 * scale**2 * cost.mean()
