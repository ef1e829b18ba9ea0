"""Evaluate a registration from files: per-label Dice/HD95 CSV and a JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import io, metrics


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
    region = None
    if mask:
        region_data, _ = io.load_volume(mask, what="mask")
        if region_data.shape != fixed.shape:
            raise io.InputError(mask, f"mask shape {region_data.shape} differs from the labels {fixed.shape}")
        region = region_data > 0
    rows = metrics.label_overlap(warped, fixed, affine, sorted(names) if names else None, names=names, mask=region)
    found = [r["dice"] for r in rows if not r["missing"]]
    summary = {
        "mean_dice": float(np.mean(found)) if found else float("nan"),
        "labels": len(rows),
        "missing_labels": [r["label"] for r in rows if r["missing"]],
    }
    if displacement:
        field, field_affine = io.load_displacement(displacement)
        summary.update(metrics.jacobian_summary(field, field_affine))
    io.write_csv(out_csv, rows)
    with io.atomic_path(out_json) as temporary:
        Path(temporary).write_text(json.dumps(summary, indent=2))
    return rows, summary
