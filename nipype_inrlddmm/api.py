"""``register()``: INR-LDDMM on two images, without Nipype."""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

import nibabel as nib
import numpy as np
import torch

from . import engine, host, io


@dataclass
class Registration:
    """The result of :func:`register`.

    ``displacement`` is ``(X, Y, Z, 3)`` mm RAS on the fixed grid, with
    ``warped(x) = moving(x + displacement(x))``; ``warped`` is the moving
    image on that grid; ``model`` the trained velocity network; ``log`` one
    row per iteration of every stage.
    """

    displacement: np.ndarray
    warped: np.ndarray
    affine: np.ndarray
    model: engine.VelocityField
    log: list[dict]

    def apply(self, image, *, interpolation: str = "linear") -> np.ndarray:
        """Carry another moving-space image (or label map, with ``"nearest"``/``"label"``) to the fixed grid."""
        data, affine = _as_volume(image, "image to warp", check=False)
        out = engine.warp(
            as_tensor(data), as_tensor(affine), as_tensor(self.displacement), as_tensor(self.affine),
            interpolation=interpolation,
        )
        return out.numpy()


def as_tensor(array, device="cpu") -> torch.Tensor:
    """A float32 tensor of an array (a volume, a field or an affine) on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)


def _as_volume(image, what: str, *, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """nibabel image, ``(array, affine)`` or a path -> ``(float32 (X, Y, Z), float64 (4, 4))``."""
    if isinstance(image, (str, PathLike)):
        return io.load_image(image) if check else io.load_volume(image, what=what)
    if isinstance(image, nib.spatialimages.SpatialImage):
        data, affine = np.asarray(image.dataobj), image.affine
    elif isinstance(image, tuple) and len(image) == 2:
        data, affine = image
    else:
        raise TypeError(f"{what}: expected a nibabel image, a path or an (array, affine) tuple")
    data, affine = np.asarray(data, np.float32), np.asarray(affine, np.float64)
    if data.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"{what}: need a 3-D array and a 4x4 affine, got {data.shape} and {affine.shape}")
    if check and not np.all(np.isfinite(data)):
        raise ValueError(f"{what}: holds NaN or Inf voxels")
    return data, affine


def register(
    moving,
    fixed,
    *,
    fixed_mask=None,
    initial: engine.VelocityField | None = None,
    config: engine.RegistrationConfig | None = None,
    device: str = "auto",
    num_threads: int | None = None,
    progress: bool = False,
    **options,
) -> Registration:
    """Register ``moving`` onto ``fixed`` with coarse-to-fine INR-LDDMM.

    Parameters
    ----------
    moving, fixed : nibabel images, paths, or ``(array, affine)`` tuples; they
        may differ in shape, spacing and orientation.
    fixed_mask : optional mask on the fixed grid (same forms); iterations
        sample patches inside it.
    initial : optional velocity network to start from (a previous
        :class:`Registration`'s ``model``, or
        :func:`nipype_inrlddmm.io.load_checkpoint`'s): a warm start, the fine
        stage alone, ``warm_iterations`` from ``warm_learning_rate``
        (:func:`~nipype_inrlddmm.engine.register_volumes`), e.g. the same
        planning CT against the next day's CBCT.
    config : the whole configuration at once, in place of ``**options``
        (:func:`~nipype_inrlddmm.engine.config_from_options` builds it).
    device : ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    num_threads : torch CPU threads (``None`` leaves torch's setting).
    **options : registration settings, see
        :func:`nipype_inrlddmm.engine.config_from_options` (``seed``,
        ``n_steps``, ``fine_iterations``, ``similarity``, ...).

    Examples
    --------
    >>> from nipype_inrlddmm import register
    >>> from nipype_inrlddmm.phantom import make_pair
    >>> pair = make_pair((48, 40, 20), seed=3)
    >>> result = register((pair.ct, pair.affine), (pair.cbct, pair.affine),
    ...                   coarse_iterations=5, distill_iterations=5, fine_iterations=5)
    >>> result.displacement.shape, result.warped.shape
    ((48, 40, 20, 3), (48, 40, 20))
    """
    if config is None:
        config = engine.config_from_options(**options)
    elif options:
        raise TypeError(f"register() takes a config or options, not both (options: {', '.join(options)})")
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    device = engine.resolve_device(device)
    moving_data, moving_affine = _as_volume(moving, "moving image")
    fixed_data, fixed_affine = _as_volume(fixed, "fixed image")
    mask = None
    if fixed_mask is not None:
        mask_data, _ = _as_volume(fixed_mask, "fixed mask", check=False)
        if mask_data.shape != fixed_data.shape:
            raise ValueError(f"fixed mask shape {mask_data.shape} differs from the fixed image {fixed_data.shape}")
        mask = torch.from_numpy(mask_data > 0).to(device)

    result = engine.register_volumes(
        *(as_tensor(a, device) for a in (moving_data, moving_affine, fixed_data, fixed_affine)), config,
        fixed_mask=mask, initial=initial, available_memory=host.available_memory(device), progress=progress,
    )
    return Registration(
        displacement=result.displacement.cpu().numpy(),
        warped=result.warped.cpu().numpy(),
        affine=fixed_affine,
        model=result.velocity.cpu(),
        log=result.log,
    )
