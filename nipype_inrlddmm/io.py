"""Files: validated NIfTI loading, ITK/ANTs displacement fields and affines, checkpoints, CSV logs.

Every writer is atomic (a temporary sibling, then ``os.replace``), so a
killed run never leaves a half-written result where a finished one belongs.
Every loader fails with :class:`InputError`, which names the file and the
problem, before any optimisation starts.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from . import __version__
from .engine import ModelConfig, VelocityField

# 2: SIREN layers are single SineLinear modules (state-dict keys changed).
CHECKPOINT_FORMAT = 2
# RAS <-> LPS: ITK/ANTs store physical vectors in LPS.
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0], dtype=np.float32)


class InputError(ValueError):
    """A user-supplied file that cannot be used; the message names it."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling of ``path`` (same extension) to write to.

    On success it is renamed onto ``path``; on any error it is removed, so
    ``path`` is either absent, the old file, or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    temporary = path.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(path):
    """Yield a fresh hidden sibling of folder ``path`` to write a run's outputs into.

    On success its files move into ``path`` (created when absent); on any
    error it is removed: a run that fails leaves ``path`` as it found it,
    never a field without its evaluation.
    """
    path = Path(path)
    stage = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    if path.exists() and not path.is_dir():
        raise InputError(path, "the output folder is a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    except OSError as error:  # read-only, no permission, a file where a folder should be, a full disk
        raise InputError(path, f"cannot write the outputs here ({error.strerror or error})") from error
    try:
        yield stage
        path.mkdir(exist_ok=True)
        for item in stage.iterdir():
            os.replace(item, path / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


#: Largest magnitude (mm) accepted in an affine: beyond it (10 km) the header is broken, and the
#: engine's float32 world coordinates would lose all precision.
_MAX_AFFINE_MM = 1e7


def _check_affine(path, affine) -> None:
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
    _check_affine(path, affine)
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


def save_displacement(path, displacement: np.ndarray, affine: np.ndarray) -> Path:
    """Write a displacement as an ITK/ANTs displacement field.

    ``displacement`` is ``(X, Y, Z, 3)`` mm RAS on the fixed grid
    (``warped(x) = moving(x + d(x))``).  The file holds it in LPS, shape
    ``(X, Y, Z, 1, 3)``, float32, intent vector: what ``antsApplyTransforms``
    and nitransforms read as a displacement field.

    A ``.nii.gz`` is written as gzip's stored blocks (level 0): a field's
    float32 values barely compress, and deflating them cost more than
    carrying the labels (docs: decisions).  Every gzip reader opens it.
    """
    field = (np.asarray(displacement, np.float32) * _RAS_TO_LPS)[:, :, :, None, :]
    image = nib.Nifti1Image(field, affine)
    image.header.set_intent("vector")
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as temporary:
        if str(path).endswith(".gz"):
            # No name and no time in the gzip header: the same field gives the same bytes.
            with open(temporary, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=0,
                                                            mtime=0) as stored:
                image.to_file_map({"image": nib.FileHolder(fileobj=stored)})
        else:
            image.to_filename(str(temporary))
    return Path(path)


def load_displacement(path) -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK/ANTs displacement field; return ``((X, Y, Z, 3) mm RAS, affine)``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "displacement file does not exist")
    try:
        image = nib.load(str(path))
        if np.dtype(image.get_data_dtype()).kind not in "iuf":
            raise TypeError(f"voxels of type {image.get_data_dtype()} are not real numbers")
        with np.errstate(over="ignore"):
            data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:
        raise InputError(path, f"cannot read the displacement ({type(error).__name__}: {error})") from error
    if data.ndim != 5 or data.shape[3:] != (1, 3):
        raise InputError(path, f"a displacement field must have shape (X, Y, Z, 1, 3), got {data.shape}")
    if not np.all(np.isfinite(data)):
        raise InputError(path, "the displacement holds NaN or Inf")
    affine = np.asarray(image.affine, np.float64)
    _check_affine(path, affine)
    return data[:, :, :, 0, :] * _RAS_TO_LPS, affine


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
        velocity = VelocityField(state["center"], state["half_extent"], ModelConfig(**payload["model"]))
        velocity.load_state_dict(state)
    except InputError:
        raise
    except Exception as error:  # missing keys, wrong types, mismatched tensor shapes
        raise InputError(path, f"the checkpoint is incomplete or damaged ({type(error).__name__}: {error})") from error
    return velocity


# ITK/ANTs linear transforms: y = M (x - c) + c + t in LPS mm, with
# Parameters = (M row by row, t) and FixedParameters = c.
_ITK_AFFINE_TYPES = ("AffineTransform", "MatrixOffsetTransformBase")
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS on homogeneous 4x4 matrices


def save_itk_affine(path, matrix: np.ndarray) -> Path:
    """Write a ``(4, 4)`` RAS fixed -> moving point map as an ITK text transform.

    ``antsApplyTransforms -t FILE`` and nitransforms (``fmt="itk"``) read it
    as the same map: the fixed-space point ``x`` samples the moving image at
    ``matrix @ x``.
    """
    lps = _FLIP @ np.asarray(matrix, np.float64) @ _FLIP
    parameters = [*lps[:3, :3].reshape(-1), *lps[:3, 3]]
    text = (
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(repr(float(v)) for v in parameters)}\nFixedParameters: 0 0 0\n"
    )
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text)
    return Path(path)


def _itk_matrix(path, parameters, centre) -> np.ndarray:
    parameters, centre = np.asarray(parameters, np.float64).ravel(), np.asarray(centre, np.float64).ravel()
    if parameters.size != 12 or centre.size != 3:
        raise InputError(path, "an ITK affine needs 12 parameters and a 3-D centre")
    lps = np.eye(4)
    lps[:3, :3] = parameters[:9].reshape(3, 3)
    lps[:3, 3] = parameters[9:] + centre - lps[:3, :3] @ centre
    if not np.all(np.isfinite(lps)) or abs(np.linalg.det(lps[:3, :3])) < 1e-8:
        raise InputError(path, "the affine transform is singular or holds NaN/Inf")
    return _FLIP @ lps @ _FLIP


def load_itk_affine(path) -> np.ndarray:
    """Read an ITK text (``.txt``/``.tfm``) or ANTs binary (``.mat``) affine.

    Returns the ``(4, 4)`` RAS fixed -> moving point map (the inverse of
    :func:`save_itk_affine`).  Only 3-D affine transforms
    (``AffineTransform``, ``MatrixOffsetTransformBase``; what
    ``antsRegistration`` writes as ``*GenericAffine.mat``) are accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "transform file does not exist")
    if path.suffix == ".mat":
        from scipy.io import loadmat

        try:
            content = loadmat(str(path))
        except Exception as error:  # scipy raises several types for non-MATLAB files
            raise InputError(path, f"cannot read the ANTs transform ({type(error).__name__}: {error})") from error
        key = next((k for k in content if k.startswith(_ITK_AFFINE_TYPES) and k.endswith("_3_3")), None)
        if key is None or "fixed" not in content:
            raise InputError(path, f"not a 3-D ANTs affine (variables: {sorted(k for k in content if k[0] != '_')})")
        return _itk_matrix(path, content[key], content["fixed"])
    fields = {}
    for line in path.read_text(errors="replace").splitlines():
        name, _, value = line.partition(":")
        if value and name.strip() in ("Transform", "Parameters", "FixedParameters"):
            fields.setdefault(name.strip(), value.strip())
    kind = fields.get("Transform", "")
    if not kind.startswith(_ITK_AFFINE_TYPES) or not kind.endswith("_3_3"):
        raise InputError(path, f"expected a 3-D ITK AffineTransform, found {kind or 'no transform'!r}")
    try:
        return _itk_matrix(path, fields["Parameters"].split(), fields.get("FixedParameters", "0 0 0").split())
    except (KeyError, ValueError) as error:
        raise InputError(path, f"cannot parse the transform parameters ({error})") from error


def load_landmarks(path) -> np.ndarray:
    """Landmarks from a CSV with columns ``x, y, z`` in ITK/LPS physical mm (as ANTs and elastix write them).

    Returns ``(N, 3)`` float64 points in world mm, RAS (the engine's convention).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "landmark file does not exist")
    rows = list(csv.DictReader(path.read_text(errors="replace").splitlines()))
    if not rows or not {"x", "y", "z"} <= set(rows[0]):
        raise InputError(path, "expected a CSV with columns x, y, z (LPS mm) and at least one landmark")
    try:
        points = np.array([[float(row[c]) for c in "xyz"] for row in rows], np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(path, f"a coordinate is not a number ({error})") from error
    if not np.all(np.isfinite(points)):
        raise InputError(path, "holds NaN or Inf coordinates")
    return points * _RAS_TO_LPS.astype(np.float64)


def write_csv(path, rows: list[dict], *, delimiter: str = ",") -> Path:
    """Write dict rows (keys of the first row, in order, as the header) atomically."""
    fieldnames = list(rows[0]) if rows else []
    for row in rows:
        fieldnames += [key for key in row if key not in fieldnames]
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames, delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def load_label_names(path) -> dict[int, str]:
    """Label names from a JSON object ``{"1": "body"}`` or a TSV/CSV with an id and a name column.

    The id column may be called ``index``, ``label``, ``id`` or ``label_id``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "label-name file does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            return {int(k): str(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError) as error:
            raise InputError(path, f"expected a JSON object of id -> name ({error})") from error
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","))
    id_column = next((c for c in ("index", "label", "id", "label_id") if rows and c in rows[0]), None)
    if id_column is None or "name" not in rows[0]:
        raise InputError(path, "expected columns 'index' (or 'label'/'id') and 'name'")
    try:
        return {int(row[id_column]): row["name"] for row in rows}
    except ValueError as error:
        raise InputError(path, f"a label id is not an integer ({error})") from error


#: The file columns of a study manifest (paths relative to the manifest's folder, or absolute).  ``moving``
#: and ``fixed`` are NIfTI files, or folders each holding one DICOM series; the others are files.
MANIFEST_FILES = ("moving", "fixed", "moving_labels", "fixed_labels", "moving_rtstruct", "fixed_rtstruct",
                  "fixed_mask", "init_model")
#: The columns every manifest has.
MANIFEST_COLUMNS = ("patient", "moving", "fixed")
#: The one rule of the labels, which a study evaluates: every row fills one of these pairs of columns, label
#: maps or (with DICOM series) RTSTRUCTs, and the manifest has at least one of them.
MANIFEST_LABELS = (("moving_labels", "fixed_labels"), ("moving_rtstruct", "fixed_rtstruct"))


def _missing_columns(columns) -> list[str]:
    """The columns a manifest's header lacks: the required ones, and the label maps' when it has no label pair."""
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if not any(set(pair) <= set(columns) for pair in MANIFEST_LABELS):
        missing += [c for c in MANIFEST_LABELS[0] if c not in columns]
    return missing


def _row_labels_problem(row) -> str | None:
    """What is wrong with a manifest row's label columns (:data:`MANIFEST_LABELS`), or None."""
    filled = [pair for pair in MANIFEST_LABELS if any(row.get(column) for column in pair)]
    if len(filled) > 1:
        return "gives both label maps and RTSTRUCTs: give one pair"
    for column in (filled or MANIFEST_LABELS)[0]:
        if not row.get(column):
            return f"empty {column!r}"
    return None


def read_manifest(path, *, check_files: bool = True) -> list[dict]:
    """Rows of a study manifest (TSV or CSV) with paths made absolute.

    Columns (:data:`MANIFEST_FILES`): ``patient``, ``moving``, ``fixed``
    (NIfTI files or DICOM series folders), each non-empty on every row;
    labels on every row, ``moving_labels`` and ``fixed_labels`` (label
    maps) or ``moving_rtstruct`` and ``fixed_rtstruct`` (RTSTRUCTs drawn
    on the DICOM series); optionally ``fixed_mask`` and ``init_model`` (a
    previous registration's ``model.pt`` to start from; a row without one
    registers from scratch).  Relative paths are
    relative to the manifest's folder.  Patient ids must be unique, non-empty
    and usable as a folder name.  With ``check_files`` (the default) every
    referenced file (or folder) must exist; the error names the manifest's line, the
    patient and the column of each missing one.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest does not exist")
    delimiter = "\t" if path.suffix == ".tsv" else ","
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read the manifest as UTF-8 text ({error})") from error
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as error:
        raise InputError(path, f"cannot parse the manifest ({error})") from error
    columns = reader.fieldnames or []
    missing = _missing_columns(columns)
    if missing or not rows:
        separated = "tab" if delimiter == "\t" else "comma"
        needed = (*MANIFEST_COLUMNS, *MANIFEST_LABELS[0])
        raise InputError(path, f"manifest needs columns {needed} (or, for DICOM series, {MANIFEST_LABELS[1]} "
                         f"for the labels); "
                         + (f"missing {missing} (found {columns}, read as {separated}-separated)" if missing
                            else "it has no rows"))
    seen, absent = {}, []
    for line, row in rows:
        where = f"line {line}"
        if None in row:
            raise InputError(path, f"{where} has more fields than the header")
        patient = row["patient"] or ""
        if not patient.strip():
            raise InputError(path, f"{where}: empty patient id")
        if patient in (".", "..") or "/" in patient or "\\" in patient:
            raise InputError(path, f"{where}: patient id {patient!r} cannot be a folder name")
        if patient in seen:
            raise InputError(path, f"duplicate patient id {patient!r} (lines {seen[patient]} and {line})")
        seen[patient] = line
        for column in MANIFEST_COLUMNS[1:]:
            if not row[column]:
                raise InputError(path, f"{where} (patient {patient!r}): empty {column!r}")
        problem = _row_labels_problem(row)
        if problem:
            raise InputError(path, f"{where} (patient {patient!r}): {problem}")
        for column in MANIFEST_FILES:
            if row.get(column):
                row[column] = str((path.parent / row[column]).resolve())
                found = Path(row[column]).exists() if column in ("moving", "fixed") else Path(row[column]).is_file()
                if check_files and not found:
                    absent.append(f"{where} (patient {patient!r}), column {column!r}: {row[column]}")
    if absent:
        shown = "; ".join(absent[:10]) + (f"; and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise InputError(path, f"{len(absent)} referenced file(s) do not exist: {shown}")
    return [row for _, row in rows]
