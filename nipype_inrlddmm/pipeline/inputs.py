"""What a registration starts from, read and validated before any optimisation.

Every check here fails with :class:`~nipype_inrlddmm.io.InputError` (or,
for memory, :class:`~nipype_inrlddmm.engine.InsufficientMemoryError`),
naming the file, before a stage starts: a pair of images with their label
maps and mask, a previous registration's network to start from, the memory
a stage needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .. import engine, host, io
from ..api import as_tensor
from ..engine.grid import bounding_box

LOGGER = logging.getLogger("nipype_inrlddmm")


@dataclass
class Pair:
    """A validated moving/fixed pair (float32 data, float64 affines); ``fixed_mask`` is bool, labels int32, or None."""

    moving: np.ndarray
    moving_affine: np.ndarray
    fixed: np.ndarray
    fixed_affine: np.ndarray
    fixed_mask: np.ndarray | None = None
    moving_labels: np.ndarray | None = None
    fixed_labels: np.ndarray | None = None
    fixed_label_names: dict[int, str] | None = None  # those of a 4-D fixed label file ("volume k"), None for 3-D


def load_pair(moving, fixed, *, moving_labels=None, fixed_labels=None, fixed_mask=None,
              label_volume: int | None = None) -> Pair:
    """Read and validate a pair and, when given, its label maps and fixed mask.

    Label maps must lie on their image's grid and the mask on the fixed grid;
    any problem raises :class:`~nipype_inrlddmm.io.InputError` naming the file.
    ``label_volume`` picks one volume of 4-D label files (:func:`~nipype_inrlddmm.io.load_named_labels`).
    """
    moving_data, moving_affine = io.load_image(moving)
    fixed_data, fixed_affine = io.load_image(fixed)

    def labels(path, image, data, affine):
        return io.load_named_labels(path, reference=(image, data, affine), volume=label_volume) if path else (None,) * 3

    moving_map, _, _ = labels(moving_labels, moving, moving_data, moving_affine)
    fixed_map, _, fixed_names = labels(fixed_labels, fixed, fixed_data, fixed_affine)
    mask = None
    if fixed_mask:
        mask = io.load_mask(fixed_mask, fixed_data.shape, fixed_affine, reference=f"the fixed image {fixed}")
        if not mask.any():
            raise io.InputError(fixed_mask, "the mask is empty: no voxel to sample")
    return Pair(moving_data, moving_affine, fixed_data, fixed_affine, mask, moving_map, fixed_map, fixed_names)


def check_labels(moving, fixed, *, moving_labels=None, fixed_labels=None) -> None:
    """Validate label maps before any optimisation: readable, integer, non-empty, on their image's grid.

    Only the images' headers are read (their voxels are validated by the
    stage that loads them); an image whose header is unusable (unreadable,
    not 3-D, singular affine, ...) is left for that stage to report, and its
    labels are then checked without the grid.
    Raises :class:`~nipype_inrlddmm.io.InputError` naming the file.
    """
    for labels, image in ((moving_labels, moving), (fixed_labels, fixed)):
        if not labels:
            continue
        try:
            header, shape = io.open_volume(image, "image")
            reference = (image, shape, np.asarray(header.affine, np.float64))
        except io.InputError:  # the image's own stage reports it
            reference = None
        io.load_labels(labels, reference=reference)


def check_memory(stage: str, fixed_shape, config: engine.RegistrationConfig, *, device, source,
                 moving_shape=None) -> None:
    """Refuse, before it starts, a stage that would not fit in the available memory.

    :func:`nipype_inrlddmm.engine.check_memory`, its message starting with
    ``source`` (the fixed image's path); raises
    :class:`~nipype_inrlddmm.engine.InsufficientMemoryError` with advice.
    """
    engine.check_memory(stage, fixed_shape, config, moving_shape=moving_shape, device=device,
                        available=host.available_memory(device), source=source)


def normalised(volume: torch.Tensor, path) -> torch.Tensor:
    """``volume`` (the image read from ``path``) as :func:`~nipype_inrlddmm.engine.normalise_intensity`
    gives it to the similarity, or an :class:`~nipype_inrlddmm.io.InputError` naming ``path``."""
    try:
        return engine.normalise_intensity(volume)
    except ValueError as error:
        raise io.InputError(path, "the image is constant once its 0.5 % extreme voxels are clipped: "
                            "similarity is undefined") from error


def pair_tensors(pair: Pair, device: torch.device):
    """The pair's images and affines as float32 tensors on ``device``, and its mask (bool) or None."""
    mask = None if pair.fixed_mask is None else torch.from_numpy(pair.fixed_mask).to(device)
    arrays = (pair.moving, pair.moving_affine, pair.fixed, pair.fixed_affine)
    return (*(as_tensor(a, device) for a in arrays), mask)

def warm_start_model(path, fixed, fixed_shape, fixed_affine: np.ndarray, *,
                     model_options: dict | None = None, moving: dict | None = None) -> engine.VelocityField:
    """The velocity network of checkpoint ``path`` (a previous registration's ``model.pt``), to start a
    registration on the fixed image ``fixed`` (its grid: ``fixed_shape``, ``fixed_affine``) from.

    Refused with an :class:`~nipype_inrlddmm.io.InputError` naming ``path``
    when it cannot be read, comes from another version, or was fitted on a
    fixed grid that does not cover this one
    (:func:`~nipype_inrlddmm.engine.warm_start_mismatch`: both grids are
    then named), and when ``model_options`` (architecture settings the user
    gave, :class:`~nipype_inrlddmm.engine.ModelConfig` fields) contradict
    the network's.  With ``moving`` (:func:`~nipype_inrlddmm.io.image_fingerprint`
    of this registration's moving image), refused too when the checkpoint
    records another moving image (:func:`check_same_moving`).
    """
    velocity = io.load_checkpoint(path)
    if moving is not None:
        check_same_moving(path, moving)
    mismatch = engine.warm_start_mismatch(velocity, fixed_shape, as_tensor(fixed_affine))
    if mismatch:
        shape, affine = io.checkpoint_grid(path)
        raise io.InputError(path, f"cannot start the registration onto {fixed} from this model: {mismatch}; it was "
                            f"fitted on {_grid_text(shape, affine)}, the fixed image is "
                            f"{_grid_text(fixed_shape, fixed_affine)}")
    contradicted = {name: value for name, value in (model_options or {}).items()
                    if getattr(velocity.config, name) != value}
    if contradicted:
        raise io.InputError(path, "the network's architecture is fixed by the model: "
                            + ", ".join(f"{name} is {getattr(velocity.config, name)!r}, not {value!r}"
                                        for name, value in contradicted.items()) + "; leave those options out")
    return velocity


def check_same_moving(path, moving: dict) -> None:
    """Refuse checkpoint ``path`` when it was fitted with another moving image than ``moving`` (both
    :func:`~nipype_inrlddmm.io.image_fingerprint`): another shape or other voxel values.

    A warm start continues a registration of the same moving image (a
    course's planning CT); another image would start from a field that maps
    someone else's anatomy.  The headers are not compared: a pre-alignment
    gives the same voxels another affine every day.  A checkpoint recording
    no moving image (one written before fingerprints were stored, or a
    coarse or distilled model) is taken as it is, with a warning.
    """
    recorded = io.checkpoint_moving(path)
    if recorded is None:
        LOGGER.warning("%s records no moving image (an older model?): that it was fitted with %s is not checked",
                       path, moving["file"])
        return
    if [int(n) for n in recorded["shape"]] != moving["shape"] or recorded["voxels"] != moving["voxels"]:
        def text(fingerprint):
            return (f"{fingerprint['file']} ({' x '.join(str(int(n)) for n in fingerprint['shape'])} voxels, "
                    f"voxel hash {fingerprint['voxels'][:12]})")
        raise io.InputError(path, f"was fitted with the moving image {text(recorded)}, not with this one, "
                            f"{text(moving)}: a warm start continues a registration of the same moving image "
                            "(the course's planning CT)")


def _grid_text(shape, affine) -> str:
    """A grid in words: its shape, voxel size and the world box of its voxel centres (mm, RAS)."""
    low, high = (point.tolist() for point in bounding_box(shape, as_tensor(affine)))
    sizes = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    return (f"{' x '.join(str(int(n)) for n in shape)} voxels of {' x '.join(f'{v:.2f}' for v in sizes)} mm from "
            f"({', '.join(f'{v:.1f}' for v in low)}) to ({', '.join(f'{v:.1f}' for v in high)}) mm")
