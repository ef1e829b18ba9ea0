"""Checkpoints of a velocity network: its weights, architecture, fixed grid, version and moving image."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..engine import ModelConfig, VelocityField
from .files import InputError, atomic_path
from .nifti import grid_mismatch

# 2: SIREN layers are single SineLinear modules (state-dict keys changed).
CHECKPOINT_FORMAT = 2


def image_fingerprint(path, data: np.ndarray, affine: np.ndarray) -> dict:
    """What identifies an image a model was fitted with: its file, grid and a hash of its voxels.

    ``data`` as :func:`load_image` reads it (float32); the hash is of the
    voxel values in their array order (BLAKE2b, 128 bits), so the same
    volume gives the same fingerprint whatever header it was later given
    (a pre-alignment rewrites the affine alone).
    """
    values = np.asfortranarray(data, dtype=np.float32)
    return {"file": str(path), "shape": [int(n) for n in values.shape],
            "affine": np.asarray(affine, np.float64).tolist(),
            "voxels": hashlib.blake2b(values.T, digest_size=16).hexdigest()}


def save_checkpoint(path, velocity: VelocityField, *, shape, affine: np.ndarray, moving: dict | None = None) -> Path:
    """Save a velocity network with its architecture, fixed-grid geometry and version, and with
    ``moving`` (:func:`image_fingerprint`) the moving image it was fitted with."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "model": velocity.hyperparameters(),
        "state_dict": {k: v.detach().cpu() for k, v in velocity.state_dict().items()},
        "fixed_shape": [int(n) for n in shape],
        "fixed_affine": np.asarray(affine, np.float64).tolist(),
    }
    if moving is not None:
        payload["moving"] = moving
    # Through a file object: torch names the archive inside after a path, which would be the temporary
    # file's random name, and the same model would not give the same bytes.
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint's payload, after checking its format and package version."""
    if not path.is_file():
        raise InputError(path, "checkpoint file does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(path, f"cannot read the checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, "not a nipype_inrlddmm checkpoint of a format this version reads")
    version = payload.get("version")
    if not isinstance(version, str):
        raise InputError(path, f"the checkpoint records no package version: incompatible with {__version__}")
    if version.split(".")[:2] != __version__.split(".")[:2]:
        raise InputError(path, f"checkpoint written by nipype_inrlddmm {version}, incompatible with {__version__}")
    return payload


def checkpoint_grid(path) -> tuple[tuple[int, int, int], np.ndarray]:
    """The fixed grid ``(shape, affine)`` a checkpoint was fitted on."""
    payload = _read_checkpoint(Path(path))
    try:
        return tuple(int(n) for n in payload["fixed_shape"]), np.asarray(payload["fixed_affine"], np.float64)
    except Exception as error:  # missing keys, wrong types
        raise InputError(path, f"the checkpoint records no usable fixed grid ({type(error).__name__}: {error})") \
            from error


def checkpoint_moving(path) -> dict | None:
    """The :func:`image_fingerprint` of the moving image a checkpoint was fitted with; None when it records
    none (written by a version before fingerprints, or without one, as a coarse or distilled model)."""
    moving = _read_checkpoint(Path(path)).get("moving")
    if moving is not None and not (isinstance(moving, dict) and {"file", "shape", "voxels"} <= set(moving)):
        raise InputError(path, "the checkpoint's record of its moving image is damaged")
    return moving


def load_checkpoint(path, *, shape=None, affine=None) -> VelocityField:
    """Rebuild a velocity network; refuse another version's or another grid's checkpoint.

    ``shape``/``affine`` (optional) are the fixed grid the caller is working
    on; a checkpoint fitted on a different grid is rejected.
    """
    path = Path(path)
    payload = _read_checkpoint(path)
    try:
        if shape is not None:
            mismatch = grid_mismatch(payload["fixed_shape"], payload["fixed_affine"], shape, affine)
            if mismatch:
                raise InputError(path, f"checkpoint was fitted on another fixed-image grid ({mismatch}: "
                                 "checkpoint vs this image)")
        state = payload["state_dict"]
        window = (state["window"], state["window_affine"]) if "window" in state else None
        velocity = VelocityField(state["center"], state["half_extent"], ModelConfig(**payload["model"]), window=window)
        velocity.load_state_dict(state)
    except InputError:
        raise
    except Exception as error:  # missing keys, wrong types, mismatched tensor shapes
        raise InputError(path, f"the checkpoint is incomplete or damaged ({type(error).__name__}: {error})") from error
    return velocity
