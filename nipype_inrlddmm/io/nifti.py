"""NIfTI volumes: images, label maps and masks, read and validated; images written.

Every loader fails with :class:`~nipype_inrlddmm.io.InputError`, which names
the file and the problem (unreadable, not 3-D, NaN voxels, a singular
affine, labels off their image's grid, ...), before any optimisation starts.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .files import InputError, atomic_path

#: Largest magnitude (mm) accepted in an affine: beyond it (10 km) the header is broken, and the
#: engine's float32 world coordinates would lose all precision.
_MAX_AFFINE_MM = 1e7


def check_affine(path, affine) -> None:
    """Refuse, naming ``path``, an affine that is not a finite, plausible, invertible 4 x 4 matrix."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(path, f"the affine (voxel-to-world matrix) has shape {affine.shape}, not (4, 4)")
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "the affine (voxel-to-world matrix) holds NaN or Inf")
    if np.abs(affine).max() > _MAX_AFFINE_MM:
        raise InputError(path, f"the affine (voxel-to-world matrix) holds an implausible value "
                         f"({np.abs(affine).max():.3g} mm)")
    singular_values = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if singular_values[0] == 0 or singular_values[-1] < 1e-6 * singular_values[0]:
        raise InputError(path, "the affine (voxel-to-world matrix) is singular")


def grid_mismatch(shape, affine, ref_shape, ref_affine, *, atol: float = 1e-4) -> str | None:
    """How a grid differs from a reference grid (``"shape A vs B"``, ``"affine differs by X mm"``), or None."""
    shape, ref_shape = tuple(int(n) for n in shape), tuple(int(n) for n in ref_shape)
    if shape != ref_shape:
        return f"shape {shape} vs {ref_shape}"
    affine, ref_affine = np.asarray(affine, np.float64), np.asarray(ref_affine, np.float64)
    if affine.shape != ref_affine.shape:
        return "the affines differ"
    difference = np.abs(affine - ref_affine).max()
    return None if difference <= atol else f"the affines differ by up to {difference:.4g} mm"


def require_grid(path, shape, affine, ref_shape, ref_affine, *, what: str, reference: str) -> None:
    """Raise :class:`InputError` naming ``path`` when its grid is not the reference grid.

    The message reads "the <what> is not on the grid of <reference> (<how they differ>)".
    """
    mismatch = grid_mismatch(shape, affine, ref_shape, ref_affine)
    if mismatch:
        raise InputError(path, f"the {what} is not on the grid of {reference} ({mismatch})")


def load_mask(path, ref_shape, ref_affine, *, reference: str) -> np.ndarray:
    """A mask (non-zero voxels) as a bool ``(X, Y, Z)`` array, refused unless it lies on the reference grid."""
    data, affine = load_volume(path, what="mask")
    require_grid(path, data.shape, affine, ref_shape, ref_affine, what="mask", reference=reference)
    return data > 0


def open_volume(path, what: str, *, stacked: bool = False):
    """Open a NIfTI (or other nibabel) volume and check its header: shape, voxel type, affine.

    Returns ``(image, shape)`` where ``shape`` is 3-D (trailing singleton
    axes dropped), or with ``stacked`` also 4-D ``(X, Y, Z, volumes)``; the
    voxels are not read yet.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} file does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        image = nib.load(str(path))
        header_shape = tuple(int(n) for n in image.shape)
        dtype = np.dtype(image.get_data_dtype())
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel/gzip/zlib raise many types for corrupt files
        raise InputError(path, f"cannot read the {what} as NIfTI ({type(error).__name__}: {error})") from error
    if dtype.kind not in "biuf":
        raise InputError(path, f"the {what} has voxels of type {dtype} (complex or RGB): real numbers are needed")
    if 0 in header_shape:
        raise InputError(path, f"the {what} has an empty axis, shape {header_shape}")
    shape = header_shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 and not (stacked and len(shape) == 4):
        allowed = "3-D, or 4-D with one label per volume" if stacked else "3-D"
        raise InputError(path, f"the {what} must be {allowed}, got shape {header_shape}")
    if 1 in shape[:3]:
        raise InputError(path, f"the {what} is 2-D in effect, shape {header_shape}: a 3-D volume needs at "
                         "least 2 voxels along every axis")
    check_affine(path, affine)
    return image, shape


def _read_voxels(path, image, shape, what: str, dtype=None) -> np.ndarray:
    try:
        data = np.asarray(image.dataobj) if dtype is None else np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:  # truncated or corrupt data: EOFError, zlib.error, ValueError, OSError...
        raise InputError(path, f"cannot read the {what}'s voxels ({type(error).__name__}: {error})") from error
    if data.size != np.prod(shape):
        raise InputError(path, f"cannot read the {what}'s voxels: got {data.size} of {np.prod(shape)}")
    return data.reshape(shape)


def load_volume(path, *, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI volume; return ``(data float32 (X, Y, Z), affine (4, 4))``.

    Trailing singleton axes (4th, 5th) are dropped.  Raises
    :class:`InputError` for a missing, unreadable or truncated file, complex
    or RGB voxels, a non-3-D volume or one with an axis shorter than 2
    voxels, a singular, non-finite or implausible affine, or NaN/Inf voxels
    (including values beyond the float32 range).
    """
    image, shape = open_volume(path, what)
    with np.errstate(over="ignore", invalid="ignore"):
        data = _read_voxels(path, image, shape, what, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(path, f"the {what} holds {int(bad.sum())} NaN or Inf voxels (or values beyond the "
                         "float32 range)")
    return data, np.asarray(image.affine, dtype=np.float64)


def load_image(path) -> tuple[np.ndarray, np.ndarray]:
    """An intensity image: :func:`load_volume` plus a check that it is not constant."""
    data, affine = load_volume(path, what="image")
    if data.min() == data.max():
        raise InputError(path, f"the image is constant ({data.min()}): similarity is undefined")
    return data, affine


_LABEL_RANGE = (np.iinfo(np.int32).min, np.iinfo(np.int32).max)


def load_labels(path, *, reference=None, volume: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_named_labels` without the names."""
    labels, affine, _ = load_named_labels(path, reference=reference, volume=volume)
    return labels, affine


def load_named_labels(path, *, reference=None,
                      volume: int | None = None) -> tuple[np.ndarray, np.ndarray, dict[int, str] | None]:
    """A label map: integer-valued, non-empty, and on ``reference``'s grid when given.

    ``reference`` is ``(path, data, affine)`` of the image the labels belong
    to (``data`` may also be just its shape).  The labels are read in their
    stored type, so large label ids are never rounded through float32;
    they must fit in int32.  A 4-D file holds one structure per volume
    (e.g. a gland, then landmarks): volume ``k`` becomes label ``k + 1``,
    a later volume's label winning where they overlap; ``volume`` keeps
    that volume's label alone.

    Returns the labels, their affine and, for a 4-D file, the names of its
    labels, ``{k + 1: "volume k"}`` (None for a 3-D file).
    """
    image, shape = open_volume(path, "label map", stacked=True)
    volumes = shape[3] if len(shape) == 4 else 1
    if volume is not None and not 0 <= volume < volumes:
        raise InputError(path, f"the label map has no volume {volume}: it holds {volumes} (counted from 0)")
    with np.errstate(invalid="ignore"):
        data = _read_voxels(path, image, shape, "label map")
        if data.dtype.kind == "f":
            bad = ~np.isfinite(data)
            if bad.any():
                raise InputError(path, f"the label map holds {int(bad.sum())} NaN or Inf voxels")
            if not np.array_equal(data, np.round(data)):
                raise InputError(path, "the label map holds non-integer values")
    names = None
    if len(shape) == 4:
        stack, data = data, np.zeros(shape[:3], np.int32)
        kept = range(volumes) if volume is None else (volume,)
        for k in kept:
            data[stack[..., k] != 0] = k + 1
        names = {k + 1: f"volume {k}" for k in kept}
    low, high = data.min(), data.max()
    if low < _LABEL_RANGE[0] or high > _LABEL_RANGE[1]:
        raise InputError(path, f"the label map holds ids from {low} to {high}, beyond the int32 range")
    if not data.any():
        raise InputError(path, "the label map is empty (no non-zero label)" if volume is None else
                         f"volume {volume} of the label map is empty")
    affine = np.asarray(image.affine, dtype=np.float64)
    if reference is not None:
        ref_path, ref_data, ref_affine = reference
        require_grid(path, shape[:3], affine, getattr(ref_data, "shape", ref_data), ref_affine, what="label map",
                     reference=f"its image {ref_path}")
    return data.astype(np.int32), affine, names


def save_image(path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI volume atomically."""
    with atomic_path(path) as temporary:
        nib.Nifti1Image(np.asarray(data), affine).to_filename(str(temporary))
    return Path(path)
