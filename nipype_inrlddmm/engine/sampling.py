"""Random patches of the fixed grid, drawn fresh at every iteration."""

from __future__ import annotations

import math

import torch


def patch_shape(shape, patch_size: int) -> tuple[int, int, int]:
    """Patch edge per axis: ``patch_size``, or the whole axis where it is shorter."""
    return tuple(min(int(patch_size), int(n)) for n in shape)


def random_patch_corners(
    shape,
    n_patches: int,
    patch_size: int,
    *,
    candidates: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """First voxels of ``n_patches`` cubic patches of a grid.

    Parameters
    ----------
    shape : grid shape ``(X, Y, Z)``.
    candidates : optional ``(M, 3)`` long tensor of voxel indices (e.g. a
        mask's foreground) from which the patch centres are drawn; patches
        lie anywhere in the grid otherwise.

    Returns
    -------
    ``(n_patches, 3)`` long tensor of voxel indices: each patch spans
    ``corner + [0, edge)`` per axis (``edge`` = :func:`patch_shape`) and lies
    fully inside the grid.
    """
    edge = torch.tensor(patch_shape(shape, patch_size))
    upper = torch.tensor(shape) - edge  # largest valid corner, per axis
    if candidates is None:
        corners = (torch.rand(n_patches, 3, generator=generator) * (upper + 1)).long()
    else:
        pick = torch.randint(len(candidates), (n_patches,), generator=generator)
        corners = candidates[pick].cpu() - edge // 2
    return torch.minimum(corners.clamp(min=0), upper)


def gather_patches(volume: torch.Tensor, corners: torch.Tensor, edge) -> torch.Tensor:
    """Values of an ``(X, Y, Z)`` or ``(C, X, Y, Z)`` volume in the patches at ``(B, 3)`` corners.

    Returns ``(B, *edge)``, or ``(C, B, *edge)`` for a ``(C, X, Y, Z)`` volume.
    """
    windows = volume.unfold(-3, edge[0], 1).unfold(-3, edge[1], 1).unfold(-3, edge[2], 1)
    return windows[..., corners[:, 0], corners[:, 1], corners[:, 2], :, :, :]


def random_voxels(shape, n_points: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n_points, 3)`` voxel indices drawn uniformly over a grid."""
    upper = torch.tensor(shape)
    return (torch.rand(n_points, 3, generator=generator) * upper).long()


#: Lattice step (mm) that :func:`lattice_strides` aims at for an automatic stride, and its least stride.
LATTICE_SPACING_MM = 4.0
MIN_AUTOMATIC_STRIDE = 2


def lattice_strides(stride, voxel_mm) -> tuple[int, ...]:
    """Per-axis lattice stride in voxels: ``stride`` as given (one int for all axes, or one per axis).

    ``stride=None`` picks, per axis, the stride whose step is closest to
    :data:`LATTICE_SPACING_MM` and at least :data:`MIN_AUTOMATIC_STRIDE`
    voxels: the velocity's smoothness is a physical scale, not a voxel
    count.  That is 2 on 2 mm grids (the brains' fine stage), and 3 x 3 x
    2 on lung-ct's 1.37 x 1.37 x 2.5 mm grid, whose stride 2 lattice was
    2.7 mm apart in-plane.

    ``voxel_mm`` : voxel size per axis (mm), e.g. :func:`~.grid.spacing`.
    """
    if stride is None:
        return tuple(max(MIN_AUTOMATIC_STRIDE, round(LATTICE_SPACING_MM / float(size))) for size in voxel_mm)
    return per_axis_strides(stride, len(voxel_mm))


def checked_stride(stride, name: str):
    """A config's stride (None, one int or one per axis) validated; a JSON or trait list becomes a tuple,
    so a frozen config stays hashable.  ``name`` is the field, for the error."""
    if stride is None:
        return None
    try:
        strides = per_axis_strides(stride)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    return strides if isinstance(stride, (tuple, list)) else strides[0]


def per_axis_strides(stride, n_axes: int = 3) -> tuple[int, ...]:
    """An explicit stride, one int for all axes or one per axis, as ``n_axes`` ints >= 1 (else ValueError)."""
    strides = tuple(int(s) for s in stride) if isinstance(stride, (tuple, list)) else (int(stride),) * n_axes
    if len(strides) != n_axes or min(strides) < 1:
        raise ValueError(f"a lattice stride is None, an int >= 1 or {n_axes} of them, got {stride!r}")
    return strides


def lattice_shape(edge, stride) -> tuple[int, ...]:
    """Points per axis of :func:`patch_lattice` over a patch of ``edge`` voxels: ``ceil((P - 1) / stride) + 1``.

    ``stride`` : one int for all axes, or one per axis.
    """
    return tuple(math.ceil((int(n) - 1) / q) + 1 for n, q in zip(edge, per_axis_strides(stride, len(edge))))


def patch_lattice(edge, stride, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """A lattice spanning a patch with points at most ``stride`` voxels apart, as offsets from its corner.

    ``stride`` : one int for all axes, or one per axis (:func:`lattice_strides`).

    The flow is integrated on this lattice and interpolated to every voxel
    of the patch (:func:`interpolate_patches`), as the dense field is
    integrated on a sub-grid: the velocity is smooth at that scale.

    Returns
    -------
    ``(Qx, Qy, Qz, 3)`` voxel offsets (:func:`lattice_shape`), evenly spaced
    from the first to the last voxel of each axis, so the interpolation
    never extrapolates; every voxel of the patch for ``stride`` 1.
    """
    axes = [_knots(int(n), q, dtype=dtype, device=device) for n, q in zip(edge, lattice_shape(edge, stride))]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _knots(size: int, points: int, *, dtype, device) -> torch.Tensor:
    """Where :func:`patch_lattice` puts ``points`` along an axis of ``size`` voxels: first to last, evenly."""
    return torch.linspace(0.0, size - 1, points, dtype=dtype, device=device)


def _linear_weights(size: int, points: int, like: torch.Tensor) -> torch.Tensor:
    """``(size, points)`` linear-interpolation weights from the :func:`_knots` to every voxel of an axis."""
    knots = _knots(size, points, dtype=like.dtype, device=like.device)
    voxels = torch.arange(size, dtype=like.dtype, device=like.device)
    return (1 - (voxels[:, None] - knots).abs() / (knots[1] - knots[0])).clamp(min=0)


def interpolate_patches(values: torch.Tensor, size) -> torch.Tensor:
    """``(B, Qx, Qy, Qz, C)`` values on :func:`patch_lattice` -> ``(B, *size, C)`` on every voxel, trilinear.

    Trilinear interpolation between lattices is separable: one small matrix
    per axis: three tensor contractions, forward and backward faster than
    ``F.interpolate`` with its channel-first copies.
    """
    if tuple(values.shape[1:4]) == tuple(size):
        return values
    out = values
    for n in size:
        # Contract the first remaining lattice axis; its voxel axis is appended after the channels.
        q = out.shape[1]
        out = out.movedim(1, -1) if q == n else torch.tensordot(out, _linear_weights(n, q, values), dims=([1], [1]))
    return out.movedim(1, -1)
