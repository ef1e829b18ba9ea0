"""ITK/ANTs transforms and points: displacement fields, affine text transforms, landmark tables.

ITK stores physical coordinates in LPS; the package works in RAS
(the SPEC's convention).  Each function here converts at the file's edge, so
what it returns or takes is RAS world mm.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from .files import InputError, atomic_path
from .nifti import check_affine

# RAS <-> LPS: ITK/ANTs store physical vectors in LPS.
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0], dtype=np.float32)


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
    check_affine(path, affine)
    return data[:, :, :, 0, :] * _RAS_TO_LPS, affine


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
