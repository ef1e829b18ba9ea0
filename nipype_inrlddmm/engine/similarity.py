"""Image dissimilarities on batches of patches.

Every function takes ``warped`` and ``fixed`` as ``(B, P, P, P)`` tensors (B
patches of P^3 samples on a regular lattice) and returns a scalar to
minimise.  Patches, not isolated points, are what make a local measure
possible while still sampling only a small part of the image per iteration.
The exception is :func:`mind`, which compares descriptor patches
``(C, B, P, P, P)`` computed beforehand by :func:`mind_ssc`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

#: Added under the square roots.  Intensities are normalised to [0, 1], and a 5^3 window of soft
#: tissue or deep grey matter has a variance of 1e-3 or less: a larger epsilon damps the correlation
#: of exactly the flat, low-contrast windows that need it (figures: docs/decisions.md, "Similarity").
_EPS = 1e-7


def mse(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared difference; for images of the same modality and scale."""
    return (warped - fixed).square().mean()


def ncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Negative global normalised cross-correlation over all samples, in [-1, 1]."""
    a = warped.reshape(-1) - warped.mean()
    b = fixed.reshape(-1) - fixed.mean()
    return -(a * b).sum() / torch.sqrt(a.square().sum() * b.square().sum() + _EPS)


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over every ``window``^3 cube that lies fully inside the last three axes of ``x``.

    ``(..., X, Y, Z) -> (..., X - window + 1, Y - window + 1, Z - window + 1)``,
    as ``avg_pool3d(x, window, stride=1)`` gives it.  A cubic mean is
    separable: three running means of ``window`` samples, one per axis, do
    ``3 * window`` additions per output instead of ``window**3``, about
    half ``avg_pool3d``'s time for :func:`lncc` forward and backward.
    """
    for dim in (-3, -2, -1):
        x = x.unfold(dim, window, 1).mean(dim=-1)
    return x


def lncc(warped: torch.Tensor, fixed: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Negative local normalised cross-correlation with a cubic ``window``.

    Invariant to a local affine change of intensity, which is what CT ->
    CBCT (shifted, scaled and cupped Hounsfield units) needs.  Computed on
    windows that lie fully inside each patch (no padding bias).
    """
    window = min(window, *warped.shape[1:])
    a, b = warped, fixed
    mu_a, mu_b = box_mean(a, window), box_mean(b, window)
    cov = box_mean(a * b, window) - mu_a * mu_b
    var_a = (box_mean(a * a, window) - mu_a.square()).clamp(min=0)
    var_b = (box_mean(b * b, window) - mu_b.square()).clamp(min=0)
    return -(cov / torch.sqrt(var_a * var_b + _EPS)).mean()


def _cubic_bspline_weights(fraction: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The cubic B-spline weights of taps ``i - 1 .. i + 2`` at ``i + fraction``: four tensors like it."""
    f = fraction
    f2, f3 = f * f, f * f * f
    first, last = (1 - f) ** 3 / 6, f3 / 6
    second = 2 / 3 - f2 + f3 / 2
    return first, second, 1 - first - second - last, last  # the four sum to one


def mutual_information(warped: torch.Tensor, fixed: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Negative mutual information (nats) of all samples, as ANTs' Mattes metric.

    Intensities must lie in [0, 1] (:func:`~.stages.normalise_intensity`).
    The joint histogram has ``bins`` bins per image: each warped sample
    spreads over four of them by a cubic B-spline, which makes the measure
    differentiable in it; each fixed sample falls in one (Mattes et al.,
    IEEE TMI 2003).  A global measure of how well intensity classes
    overlap: added to :func:`lncc` it anchors low-contrast tissue that a
    local correlation normalises away (``mi_weight`` of
    :class:`~.optimise.StageConfig`).
    """
    size = bins + 3  # a tap of padding below the intensity range and two above it
    position = warped.reshape(-1).clamp(0, 1) * (bins - 1) + 1
    base = position.detach().floor().clamp(max=bins)
    fixed_bin = (fixed.reshape(-1).clamp(0, 1) * (bins - 1)).round().long() + 1
    first_tap = (base.long() - 1) * size + fixed_bin  # joint[i, j] is joint.reshape(-1)[i * size + j]
    joint = warped.new_zeros(size * size)
    for tap, weight in enumerate(_cubic_bspline_weights(position - base)):
        joint = joint.index_add(0, first_tap + tap * size, weight)
    joint = joint.reshape(size, size) / position.numel()

    def negative_entropy(p):
        return (p * torch.log(p.clamp(min=1e-12))).sum()

    return negative_entropy(joint.sum(1)) + negative_entropy(joint.sum(0)) - negative_entropy(joint)


#: The six neighbours of a voxel, one step along each axis either way.
_SIX_NEIGHBOURS = [tuple(sign * (axis == k) for k in range(3)) for axis in range(3) for sign in (-1, 1)]
#: MIND-SSC's twelve pairs: two of the six neighbours on different axes (sqrt(2) steps apart), the
#: edges of the octahedron they span (Heinrich et al., MICCAI 2013).
_SSC_PAIRS = [(a, b) for a, b in itertools.combinations(_SIX_NEIGHBOURS, 2)
              if sum((x - y) ** 2 for x, y in zip(a, b)) == 2]


def _voxels(mm: float, voxel_mm) -> list[int]:
    """Per axis, the whole number of voxels closest to ``mm`` (at least one)."""
    return [max(1, round(mm / float(size))) for size in voxel_mm]


def mind_ssc(volume: torch.Tensor, voxel_mm, *, distance_mm: float = 1.5, radius_mm: float = 1.5) -> torch.Tensor:
    """MIND-SSC descriptors of an ``(X, Y, Z)`` volume: ``(12, X, Y, Z)``, each in (0, 1].

    Channel ``k`` compares the patches around two of the voxel's six
    neighbours at ``distance_mm`` (the ``k``-th pair at right angles): the
    mean squared difference over a box of half-width ``radius_mm``.  The
    twelve distances are shifted to a minimum of 0, divided by their mean
    (the local noise level) and mapped through ``exp(-d)``: a voxel is
    described by the shape of its neighbourhood, not by its intensity, so
    the descriptors of an MR and an ultrasound of one gland agree where
    no intensity mapping between them does (Heinrich et al., MICCAI 2013).
    Distances are in mm (``voxel_mm`` per axis), rounded to whole voxels
    per axis; edges are replicated.
    """
    step = _voxels(distance_mm, voxel_mm)
    half = _voxels(radius_mm, voxel_mm)
    pad = [s + h for s, h in zip(step, half)]
    padded = F.pad(volume[None, None], [p for p in reversed(pad) for _ in range(2)], mode="replicate")[0, 0]

    def neighbour(offset):
        """The padded volume shifted by ``offset`` steps, on the box-padded grid."""
        return padded[tuple(slice(s * o + s, s * o + s + n + 2 * h)
                            for s, o, n, h in zip(step, offset, volume.shape, half))]

    squared = torch.stack([(neighbour(a) - neighbour(b)).square() for a, b in _SSC_PAIRS])
    distance = F.avg_pool3d(squared[None], [2 * h + 1 for h in half], stride=1)[0]
    distance = distance - distance.amin(0)
    noise = distance.mean(0)
    level = noise.mean()
    noise = noise.clamp(min=level * 1e-3, max=level * 1e3).clamp(min=torch.finfo(volume.dtype).tiny)
    return torch.exp(-distance / noise)


def mind(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of MIND-SSC descriptors, ``(C, B, P, P, P)`` each (:func:`mind_ssc`).

    For images of different modalities (MR -> ultrasound): it compares local
    structure, where :func:`lncc` assumes a locally affine intensity
    mapping and :func:`mutual_information` a global one.
    """
    return (warped - fixed).square().mean()


SIMILARITIES = {"mse": mse, "ncc": ncc, "lncc": lncc, "mi": mutual_information, "mind": mind}
