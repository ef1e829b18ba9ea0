"""Image dissimilarities on batches of patches.

Every function takes ``warped`` and ``fixed`` as ``(B, P, P, P)`` tensors (B
patches of P^3 samples on a regular lattice) and returns a scalar to
minimise.  Patches, not isolated points, are what make a local measure
possible while still sampling only a small part of the image per iteration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-5


def mse(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared difference; for images of the same modality and scale."""
    return (warped - fixed).square().mean()


def ncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Negative global normalised cross-correlation over all samples, in [-1, 1]."""
    a = warped.reshape(-1) - warped.mean()
    b = fixed.reshape(-1) - fixed.mean()
    return -(a * b).sum() / torch.sqrt(a.square().sum() * b.square().sum() + _EPS)


def lncc(warped: torch.Tensor, fixed: torch.Tensor, window: int = 5) -> torch.Tensor:
    """Negative local normalised cross-correlation with a cubic ``window``.

    Invariant to a local affine change of intensity, which is what CT ->
    CBCT (shifted, scaled and cupped Hounsfield units) needs.  Computed on
    windows that lie fully inside each patch (no padding bias).
    """
    window = min(window, *warped.shape[1:])
    a, b = warped[:, None], fixed[:, None]

    def mean(x):
        return F.avg_pool3d(x, kernel_size=window, stride=1)

    mu_a, mu_b = mean(a), mean(b)
    cov = mean(a * b) - mu_a * mu_b
    var_a = (mean(a * a) - mu_a.square()).clamp(min=0)
    var_b = (mean(b * b) - mu_b.square()).clamp(min=0)
    return -(cov / torch.sqrt(var_a * var_b + _EPS)).mean()


SIMILARITIES = {"mse": mse, "ncc": ncc, "lncc": lncc}
