"""The window that confines the velocity's detail to the anatomy: ``v(x, t) = w(x) f(x, t) + (1 - w(x)) c``.

A SIREN's sine features span the whole image, so a network fitted where
the fixed mask holds anatomy also moves the air around it, and a field
rough there raises SDlogJ with nothing to match.  SyN's field fades to
what its affine stage left away from what its metric sees.  The window does
that by construction: ``w`` is 1 within ``inner_mm`` of the anatomy (the
fixed mask and the moving image's foreground,
:func:`~.stages.velocity_window`), falls along a half cosine (smooth, with
zero slope at both ends) to 0 at ``outer_mm``, and is 0 beyond, where the
velocity is ``c``, the network's output bias: one translation.  A
translation rather than the identity, so that the air follows a body that
a setup shift moves (a CT -> CBCT pair not pre-aligned) instead of being
compressed against it.  Figures: docs/decisions.md ("Regularity").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from .grid import spacing


def taper(distance: torch.Tensor, inner_mm: float, outer_mm: float) -> torch.Tensor:
    """1 up to ``inner_mm``, a half cosine down to 0 at ``outer_mm``, 0 beyond; ``distance`` in mm."""
    ramp = ((distance - inner_mm) / (outer_mm - inner_mm)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * ramp))


def checked_radii(inner_mm, outer_mm, name: str = "the window") -> tuple[float, float]:
    """``(inner_mm, outer_mm)`` as floats; a ValueError naming ``name`` unless ``0 <= inner_mm < outer_mm``."""
    inner_mm, outer_mm = float(inner_mm), float(outer_mm)
    if not 0 <= inner_mm < outer_mm:
        raise ValueError(f"{name} needs radii 0 <= inner < outer mm, got {inner_mm} and {outer_mm}")
    return inner_mm, outer_mm


def mask_window(mask: torch.Tensor, affine: torch.Tensor, inner_mm: float,
                outer_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The window of a mask on its own grid: ``((X, Y, Z) float32, (4, 4) float64 voxel -> world affine)``.

    ``mask`` is ``(X, Y, Z)`` bool with voxel -> world ``affine``; the
    distance to it is Euclidean in mm, anisotropic voxels included.
    """
    inner_mm, outer_mm = checked_radii(inner_mm, outer_mm)
    outside = ~mask.cpu().numpy().astype(bool)
    distance = ndimage.distance_transform_edt(outside, sampling=spacing(affine).tolist())
    window = taper(torch.from_numpy(np.asarray(distance, np.float32)), inner_mm, outer_mm)
    return window.to(mask.device), affine.to(torch.float64)
