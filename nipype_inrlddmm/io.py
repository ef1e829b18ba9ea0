"""Files: validated NIfTI loading, ITK/ANTs displacement fields and affines, checkpoints, CSV logs.

Every writer is atomic (a temporary sibling, then ``os.replace``), so a
killed run never leaves a half-written result where a finished one belongs.
Every loader fails with :class:`InputError`, which names the file and the
problem, before any optimisation starts.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from . import __version__
from .engine import ModelConfig, VelocityField

CHECKPOINT_FORMAT = 1
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


def _check_affine(path, affine) -> None:
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "the affine (voxel-to-world matrix) holds NaN or Inf")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise InputError(path, "the affine (voxel-to-world matrix) is singular")


def load_volume(path, *, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI volume; return ``(data float32 (X, Y, Z), affine (4, 4))``.

    A trailing singleton 4th axis is dropped.  Raises :class:`InputError` for
    a missing, unreadable or truncated file, a non-3-D or empty volume, a
    singular or non-finite affine, or NaN/Inf voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} file does not exist")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # nibabel/gzip/zlib raise many types for corrupt files
        raise InputError(path, f"cannot read the {what} as NIfTI ({type(error).__name__}: {error})") from error
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"the {what} must be 3-D, got shape {data.shape}")
    if 0 in data.shape:
        raise InputError(path, f"the {what} has an empty axis, shape {data.shape}")
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_affine(path, affine)
    if not np.all(np.isfinite(data)):
        raise InputError(path, f"the {what} holds {int((~np.isfinite(data)).sum())} NaN or Inf voxels")
    return data, affine


def load_image(path) -> tuple[np.ndarray, np.ndarray]:
    """An intensity image: :func:`load_volume` plus a check that it is not constant."""
    data, affine = load_volume(path, what="image")
    if data.min() == data.max():
        raise InputError(path, f"the image is constant ({data.min()}): similarity is undefined")
    return data, affine


def load_labels(path, *, reference=None) -> tuple[np.ndarray, np.ndarray]:
    """A label map: integer-valued, non-empty, and on ``reference``'s grid when given.

    ``reference`` is ``(path, data, affine)`` of the image the labels belong to.
    """
    data, affine = load_volume(path, what="label map")
    if not np.array_equal(data, np.round(data)):
        raise InputError(path, "the label map holds non-integer values")
    if not data.any():
        raise InputError(path, "the label map is empty (no non-zero label)")
    if reference is not None:
        ref_path, ref_data, ref_affine = reference
        if data.shape != ref_data.shape or not np.allclose(affine, ref_affine, atol=1e-4):
            raise InputError(path, f"the label map is not on the grid of its image {ref_path}")
    return data.astype(np.int32), affine


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
    """
    field = (np.asarray(displacement, np.float32) * _RAS_TO_LPS)[:, :, :, None, :]
    image = nib.Nifti1Image(field, affine)
    image.header.set_intent("vector")
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as temporary:
        image.to_filename(str(temporary))
    return Path(path)


def load_displacement(path) -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK/ANTs displacement field; return ``((X, Y, Z, 3) mm RAS, affine)``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "displacement file does not exist")
    try:
        image = nib.load(str(path))
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


def save_checkpoint(path, velocity: VelocityField, *, shape, affine: np.ndarray) -> Path:
    """Save a velocity network with its architecture, fixed-grid geometry and version."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "model": velocity.hyperparameters(),
        "state_dict": {k: v.detach().cpu() for k, v in velocity.state_dict().items()},
        "fixed_shape": [int(n) for n in shape],
        "fixed_affine": np.asarray(affine, np.float64).tolist(),
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def load_checkpoint(path, *, shape=None, affine=None) -> VelocityField:
    """Rebuild a velocity network; refuse another version's or another grid's checkpoint.

    ``shape``/``affine`` (optional) are the fixed grid the caller is working
    on; a checkpoint fitted on a different grid is rejected.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(path, f"cannot read the checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(path, "not a nipype_inrlddmm checkpoint of a format this version reads")
    if payload["version"].split(".")[:2] != __version__.split(".")[:2]:
        raise InputError(
            path, f"checkpoint written by nipype_inrlddmm {payload['version']}, incompatible with {__version__}"
        )
    if shape is not None and (
        list(shape) != payload["fixed_shape"]
        or not np.allclose(np.asarray(affine), np.asarray(payload["fixed_affine"]), atol=1e-4)
    ):
        raise InputError(path, "checkpoint was fitted on another fixed-image grid (shape or affine differ)")
    state = payload["state_dict"]
    velocity = VelocityField(state["center"], state["half_extent"], ModelConfig(**payload["model"]))
    velocity.load_state_dict(state)
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


MANIFEST_COLUMNS = ("patient", "moving", "fixed")


def read_manifest(path) -> list[dict]:
    """Rows of a study manifest (TSV or CSV) with paths made absolute.

    Required columns: ``patient``, ``moving``, ``fixed``; optional
    ``moving_labels``, ``fixed_labels``, ``fixed_mask``.  Relative paths are
    relative to the manifest's folder.  Patient ids must be unique.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest does not exist")
    delimiter = "\t" if path.suffix == ".tsv" else ","
    rows = list(csv.DictReader(path.read_text().splitlines(), delimiter=delimiter))
    columns = rows[0].keys() if rows else []
    missing = [c for c in MANIFEST_COLUMNS if c not in columns]
    if not rows or missing:
        raise InputError(path, f"manifest needs columns {MANIFEST_COLUMNS}; missing {missing or 'all rows'}")
    seen = set()
    for row in rows:
        if row["patient"] in seen:
            raise InputError(path, f"duplicate patient id {row['patient']!r}")
        seen.add(row["patient"])
        for column in ("moving", "fixed", "moving_labels", "fixed_labels", "fixed_mask"):
            if row.get(column):
                row[column] = str((path.parent / row[column]).resolve())
    return rows
