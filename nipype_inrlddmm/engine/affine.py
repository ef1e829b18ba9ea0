"""Rigid or affine pre-alignment by global normalised cross-correlation.

The deformable stages model smooth, moderate motion; images that differ by
a large rotation, translation or scaling (subject -> template, scans of
different sessions) are first brought together by a global transform, as
ANTs does before SyN.

Convention (the same as the displacement's): the result ``A`` is a
``(4, 4)`` RAS-mm matrix mapping a fixed-image world point to the moving
image's world point that should match it, ``aligned(x) = moving(A x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .adam import CosineAdam
from .grid import apply_affine, bounding_box, downsample, grid_coordinates, sample_grid, unravel
from .grid import sample as sample_volume
from .similarity import ncc

TRANSFORMS = ("rigid", "affine")
#: How the search starts: centres of mass aligned (ANTs' "moments"; robust when both images show
#: the same object on a dark background), grid centres aligned (images cropped around the same
#: anatomy, e.g. across modalities), or the identity (headers already roughly right).
STARTS = ("moments", "geometry", "identity")
_START_MEANING = {"moments": "centres of mass aligned", "geometry": "grid centres aligned",
                  "identity": "the headers as they are"}
#: A plausible pre-alignment scales by at most this factor, up or down, along any direction, and never
#: mirrors: two scans of one anatomy, or a subject and a template, differ by far less.  Beyond it the search
#: has failed (an ultrasound's narrow field of view lets an affine shrink an axis to almost nothing).
MAX_SCALE = 2.0
#: Nor does it turn by more than this (degrees): scans whose headers place one anatomy that differently are
#: rare, and a search that ends there has followed a similarity that does not hold across the modalities.
MAX_ROTATION = 45.0


@dataclass(frozen=True)
class AffineConfig:
    """Settings of :func:`affine_register`.

    ``shrink_factors`` are the pyramid levels (block sizes, coarse to fine)
    and ``iterations`` the Adam steps at each; every step uses at most
    ``max_points`` fixed-grid voxels drawn at random.  The learning rate
    (per unit of rotation in radians, of linear distortion, and of
    translation in image half-extents) decays along a cosine within each
    level to a twentieth.  ``start`` is one of :data:`STARTS`; with no
    iterations the result is that starting transform alone.
    """

    transform: str = "affine"
    start: str = "moments"
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (150, 100, 50)
    learning_rate: float = 0.02
    max_points: int = 32768

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        if len(self.shrink_factors) != len(self.iterations) or not self.shrink_factors:
            raise ValueError("give one iteration count per shrink factor")
        if min(self.shrink_factors) < 1 or min(self.iterations) < 0 or self.learning_rate <= 0:
            raise ValueError("shrink factors must be >= 1, iterations >= 0 and the learning rate > 0")


def centre_of_mass(volume: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centre (mm, RAS) of a non-negative volume."""
    weights = volume.clamp(min=0).to(affine.dtype)
    total = weights.sum()
    if total <= 0:
        raise ValueError("the image has no positive intensity: no centre of mass")
    # The affine is linear, so the world centre is the affine of the mean voxel index, and each
    # index's mean needs only the weights summed over the other two axes.
    mean_index = torch.stack([
        (weights.sum(dim=tuple(a for a in range(3) if a != axis))
         * torch.arange(n, dtype=affine.dtype, device=affine.device)).sum()
        for axis, n in enumerate(volume.shape)
    ]) / total
    return apply_affine(affine, mean_index)


def grid_centre(shape, affine: torch.Tensor) -> torch.Tensor:
    """World position (mm, RAS) of a grid's central point."""
    middle = (torch.tensor(shape, dtype=affine.dtype, device=affine.device) - 1) / 2
    return apply_affine(affine, middle)


def _centres(moving, moving_affine, fixed, fixed_affine, start: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed and moving points (mm, RAS) that ``start`` (one of :data:`STARTS`) maps onto each other."""
    if start == "moments":
        return centre_of_mass(fixed, fixed_affine), centre_of_mass(moving, moving_affine)
    if start == "geometry":
        return grid_centre(fixed.shape, fixed_affine), grid_centre(moving.shape, moving_affine)
    centre = grid_centre(fixed.shape, fixed_affine)
    return centre, centre


def start_transform(moving, moving_affine, fixed, fixed_affine, start: str) -> torch.Tensor:
    """The translation a search from ``start`` begins with: ``(4, 4)``, fixed world -> moving world."""
    centre_fixed, centre_moving = _centres(moving, moving_affine, fixed, fixed_affine, start)
    out = torch.eye(4, dtype=torch.float64, device=fixed_affine.device)
    out[:3, 3] = (centre_moving - centre_fixed).to(torch.float64)
    return out


def implausibility(matrix: torch.Tensor) -> str | None:
    """Why ``matrix``'s linear part cannot map one anatomy onto another, or None: a mirror, a scaling by more
    than :data:`MAX_SCALE` along some direction, or a turn by more than :data:`MAX_ROTATION` degrees."""
    linear = matrix[:3, :3].to(torch.float64)
    det = float(torch.linalg.det(linear))
    if det <= 0:
        return f"it mirrors the image (determinant {det:.3f})"
    left, scales, right = torch.linalg.svd(linear)
    if scales.min() < 1.0 / MAX_SCALE or scales.max() > MAX_SCALE:
        return (f"it scales by {float(scales.min()):.2f} to {float(scales.max()):.2f} along some directions "
                f"(determinant {det:.3f}; anatomy stays within 1/{MAX_SCALE:g} to {MAX_SCALE:g})")
    rotation = left @ right  # the polar decomposition's rotation
    degrees = math.degrees(math.acos(max(-1.0, min(1.0, (float(torch.trace(rotation)) - 1.0) / 2.0))))
    if degrees > MAX_ROTATION:
        return f"it turns the image by {degrees:.0f} degrees (at most {MAX_ROTATION:g})"
    return None


def matching(moving, moving_affine, fixed, fixed_affine, matrix, *, fixed_mask=None, max_points=32768,
             seed=0) -> float:
    """Global NCC (in [-1, 1], 1 a perfect match) of ``fixed`` and ``moving(A x)``, at full resolution.

    The same ``max_points`` voxels of the fixed grid (within ``fixed_mask``) for a given seed, so that two
    transforms are compared on the same voxels.
    """
    candidates = (torch.arange(fixed.numel(), device=fixed.device) if fixed_mask is None
                  else torch.nonzero(fixed_mask.reshape(-1)).reshape(-1))
    if len(candidates) > max_points:
        generator = torch.Generator().manual_seed(seed)
        candidates = candidates[torch.randperm(len(candidates), generator=generator)[:max_points].to(fixed.device)]
    ijk = unravel(candidates, fixed.shape).to(fixed_affine.dtype)
    points = apply_affine(matrix.to(fixed_affine.dtype), apply_affine(fixed_affine, ijk))
    with torch.no_grad():
        warped = sample_volume(moving, moving_affine.to(fixed_affine.dtype), points, padding_mode="zeros")
        return -float(ncc(warped, fixed.reshape(-1)[candidates].to(warped.dtype)))


def checked_affine_register(moving, moving_affine, fixed, fixed_affine, config: AffineConfig = AffineConfig(), *,
                            fixed_mask=None, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """:func:`affine_register`, its result checked; returns the transform and what was rejected on the way.

    A result that is implausible (:func:`implausibility`) or matches the
    fixed image worse than where its search started (:func:`matching`) is
    rejected; an affine then gives way to a rigid search from the same
    start, and a rigid one to that start alone: the user's choice, as the
    global similarity that misled the search cannot rank the starts either
    (across MR and ultrasound it prefers the worst).
    """
    def match(matrix):
        return matching(moving, moving_affine, fixed, fixed_affine, matrix, fixed_mask=fixed_mask,
                        max_points=config.max_points, seed=seed)

    start_matrix = start_transform(moving, moving_affine, fixed, fixed_affine, config.start)
    start = match(start_matrix)
    notes = []
    for transform in ("affine", "rigid") if config.transform == "affine" else ("rigid",):
        matrix = affine_register(moving, moving_affine, fixed, fixed_affine, replace(config, transform=transform),
                                 fixed_mask=fixed_mask, seed=seed)
        reached = match(matrix)
        why = implausibility(matrix) or (f"it matches worse than its start (NCC {reached:.3f} against {start:.3f})"
                                         if reached < start else None)
        if why is None:
            return matrix, notes
        notes.append(f"the {transform} pre-alignment from the {config.start} start was rejected: {why}")
    notes.append(f"kept its {config.start} start alone ({_START_MEANING[config.start]})")
    return start_matrix, notes


def _rotation(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of an axis-angle vector (its norm is the angle in radians)."""
    x, y, z = axis_angle
    zero = torch.zeros_like(x)
    skew = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])
    return torch.linalg.matrix_exp(skew)


def affine_register(
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    fixed: torch.Tensor,
    fixed_affine: torch.Tensor,
    config: AffineConfig = AffineConfig(),
    *,
    fixed_mask: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Estimate the rigid or affine ``A`` with ``moving(A x) ~ fixed(x)``.

    Parameters
    ----------
    moving, fixed : ``(X, Y, Z)`` volumes on their own grids, intensities
        normalised to [0, 1] with background near 0 (the centres of mass
        that start the search are intensity-weighted).
    moving_affine, fixed_affine : their voxel -> world (mm, RAS) affines.
    fixed_mask : optional ``(X, Y, Z)`` bool volume: only its voxels are compared.
    seed : seed of the random voxel subsets.

    Returns
    -------
    ``(4, 4)`` float64 matrix, RAS mm, fixed world -> moving world.

    The transform is ``A x = c_m + s t + R(w) (I + B) (x - c_f)``; it starts
    (``t = 0``, ``w = 0``, ``B = 0``) by mapping the fixed centre ``c_f`` to
    the moving centre ``c_m``: centres of mass, grid centres, or one point
    (the identity), as ``config.start`` says.  ``s`` is the fixed image's
    mean half-extent, so that one learning rate suits rotation, distortion
    and translation.  ``B`` (the nine linear parameters beyond rotation)
    stays zero for ``"rigid"``.
    """
    dtype, device = fixed_affine.dtype, fixed_affine.device
    centre_fixed, centre_moving = _centres(moving, moving_affine, fixed, fixed_affine, config.start)
    low, high = bounding_box(fixed.shape, fixed_affine)
    scale = ((high - low) / 2).mean().clamp(min=1.0)

    rotation = torch.zeros(3, dtype=dtype, device=device, requires_grad=True)
    translation = torch.zeros(3, dtype=dtype, device=device, requires_grad=True)
    linear = torch.zeros(3, 3, dtype=dtype, device=device, requires_grad=config.transform == "affine")
    parameters = [rotation, translation] + ([linear] if config.transform == "affine" else [])
    identity = torch.eye(3, dtype=dtype, device=device)

    def matrix() -> torch.Tensor:
        m = _rotation(rotation) @ (identity + linear)
        out = torch.eye(4, dtype=dtype, device=device)
        out[:3, :3] = m
        out[:3, 3] = centre_moving + scale * translation - m @ centre_fixed
        return out

    generator = torch.Generator().manual_seed(seed)
    for factor, iterations in zip(config.shrink_factors, config.iterations):
        level_fixed, level_affine = downsample(fixed, fixed_affine, (factor,) * 3)
        level_moving, level_moving_affine = downsample(moving, moving_affine, (factor,) * 3)
        if fixed_mask is not None:
            inside = downsample(fixed_mask.to(fixed.dtype), fixed_affine, (factor,) * 3)[0] > 0.5
            candidates = torch.nonzero(inside.reshape(-1)).reshape(-1)
        else:
            candidates = torch.arange(level_fixed.numel(), device=device)
        if len(candidates) == 0:
            raise ValueError("the fixed mask is empty: no voxel to compare")
        values = level_fixed.reshape(-1)
        to_moving_grid = grid_coordinates(level_moving.shape, level_moving_affine.to(dtype))

        optimiser = CosineAdam(parameters, config.learning_rate, config.learning_rate / 20, iterations)
        for _ in range(iterations):
            if len(candidates) > config.max_points:
                # Drawn with replacement: a permutation of every voxel at each step cost 0.1 s at 1 mm.
                flat = candidates[torch.randint(len(candidates), (config.max_points,), generator=generator).to(device)]
            else:
                flat = candidates
            ijk = unravel(flat, level_fixed.shape)
            optimiser.zero_grad()
            # Fixed voxel -> fixed world -> moving world -> the moving grid's sampling coordinates, composed
            # as 4 x 4 matrices: one product per point rather than three.  Zero padding: moving content that
            # leaves the field of view stops matching instead of being replaced by stretched edge voxels.
            to_moving = to_moving_grid @ matrix() @ level_affine
            warped = sample_grid(level_moving, apply_affine(to_moving, ijk.to(dtype)), padding_mode="zeros")
            loss = ncc(warped, values[flat].to(warped.dtype))
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        return matrix().to(torch.float64)
