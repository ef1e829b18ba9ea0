"""Evaluate a registration from files: per-label Dice/HD95 or per-landmark TRE as CSV, and a JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import io
from . import metrics


def evaluate_labels(
    warped: np.ndarray, fixed: np.ndarray, affine: np.ndarray, *, names: dict[int, str] | None = None,
    mask: np.ndarray | None = None, jacobian: np.ndarray | None = None,
) -> tuple[list[dict], dict]:
    """Per-label Dice/HD95 rows and their summary, from arrays on one grid.

    ``names`` (``{id: name}``), when given, are exactly the labels evaluated,
    otherwise every label present; ``mask`` (bool) restricts the evaluation
    to a region; ``jacobian`` (det J of the field on the grid) adds its
    statistics (:func:`~nipype_inrlddmm.evaluation.metrics.determinant_summary`).
    """
    rows = metrics.label_overlap(warped, fixed, affine, sorted(names) if names else None, names=names, mask=mask)
    found = [r["dice"] for r in rows if not r["missing"]]
    summary = {
        "mean_dice": float(np.mean(found)) if found else float("nan"),
        "labels": len(rows),
        "missing_labels": [r["label"] for r in rows if r["missing"]],
    }
    if jacobian is not None:
        summary.update(metrics.determinant_summary(jacobian))
    return rows, summary


def write_evaluation(rows: list[dict], summary: dict, out_csv, out_json) -> tuple[Path, Path]:
    """Write the rows as CSV and the summary as JSON, each atomically."""
    io.write_csv(out_csv, rows)
    with io.atomic_path(out_json) as temporary:
        Path(temporary).write_text(json.dumps(summary, indent=2))
    return Path(out_csv), Path(out_json)


def evaluate_files(
    warped_labels, fixed_labels, out_csv, out_json, *, label_names=None, displacement=None, mask=None
) -> tuple[list[dict], dict]:
    """Compare warped moving labels with fixed labels; write the CSV and JSON.

    Parameters
    ----------
    warped_labels, fixed_labels : label maps on the fixed grid (paths).
    label_names : optional JSON/TSV of label names; when given, exactly
        those labels are evaluated, otherwise every label present.
    displacement : optional ITK displacement (path): its Jacobian
        determinant statistics go into the summary.
    mask : optional evaluation region on the fixed grid (path).

    Returns the rows and the summary that were written.
    """
    fixed, affine = io.load_labels(fixed_labels)
    warped, _ = io.load_labels(warped_labels, reference=(fixed_labels, fixed, affine))
    names = io.load_label_names(label_names) if label_names else None
    region = io.load_mask(mask, fixed.shape, affine, reference=f"the fixed labels {fixed_labels}") if mask else None
    jacobian = None
    if displacement:
        field, field_affine = io.load_displacement(displacement)
        jacobian = metrics.jacobian_determinant(field, field_affine)
    rows, summary = evaluate_labels(warped, fixed, affine, names=names, mask=region, jacobian=jacobian)
    write_evaluation(rows, summary, out_csv, out_json)
    return rows, summary


def evaluate_landmarks(
    fixed_landmarks, moving_landmarks, displacement, out_csv, out_json, *, affine_transform=None
) -> tuple[list[dict], dict]:
    """Target registration error of landmark pairs; write the CSV and JSON.

    Parameters
    ----------
    fixed_landmarks, moving_landmarks : CSVs of ``x, y, z`` (LPS mm), row
        ``i`` of one matching row ``i`` of the other.
    displacement : ITK displacement on the fixed grid (path).
    affine_transform : optional ITK/ANTs affine (fixed -> moving) that was
        applied before the deformable stages (AffineInit's ``transform``).

    Each fixed landmark ``p`` is mapped to ``A (p + d(p))`` and compared
    with its moving partner, as ``antsApplyTransformsToPoints`` does with
    the forward transforms.  Returns the rows and the summary written.
    """
    fixed_points, moving_points = io.load_landmarks(fixed_landmarks), io.load_landmarks(moving_landmarks)
    if len(fixed_points) != len(moving_points):
        raise io.InputError(moving_landmarks, f"holds {len(moving_points)} landmarks, but {fixed_landmarks} "
                            f"holds {len(fixed_points)}: they must pair row by row")
    field, field_affine = io.load_displacement(displacement)
    pre_affine = io.load_itk_affine(affine_transform) if affine_transform else None
    mapped = metrics.map_points(fixed_points, field, field_affine, pre_affine)
    errors = np.linalg.norm(mapped - moving_points, axis=1)
    rows = [{"landmark": i, "tre_mm": float(e), "mapped_x_lps": float(-m[0]), "mapped_y_lps": float(-m[1]),
             "mapped_z_lps": float(m[2])} for i, (e, m) in enumerate(zip(errors, mapped))]
    summary = {"landmarks": len(rows), "tre_mean_mm": float(errors.mean()), "tre_std_mm": float(errors.std()),
               "tre_median_mm": float(np.median(errors)), "tre_max_mm": float(errors.max())}
    write_evaluation(rows, summary, out_csv, out_json)
    return rows, summary
