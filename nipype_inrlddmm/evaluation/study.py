"""The study table: one row per patient, from each registration's evaluation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .. import io


def study_row(patient: str, dice_csv, dice_json) -> dict:
    """One study-table row: per-label Dice columns (named), mean Dice and HD95, folding."""
    summary = json.loads(Path(dice_json).read_text())
    with open(dice_csv, newline="") as handle:
        labels = list(csv.DictReader(handle))
    row = {"patient": patient, "status": "ok"}
    row.update({label["name"]: round(float(label["dice"]), 4) for label in labels})
    hd95 = [float(label["hd95_mm"]) for label in labels if not label["missing"]]
    row["mean_dice"] = round(summary["mean_dice"], 4)
    row["mean_hd95_mm"] = round(float(np.mean(hd95)), 3) if hd95 else float("nan")
    for key in ("jacobian_min", "jacobian_nonpositive_percent", "sdlogj"):
        if key in summary:
            row[key] = round(summary[key], 4)
    # A label absent from one map has Dice 0 (or NaN from both) by definition: say so, never silently.
    row["missing_labels"] = "; ".join(
        f"{label['name']}: absent from {'both maps' if label['missing'] == 'both' else label['missing']}"
        for label in labels if label["missing"])
    row["error"] = ""
    return row


def failed_row(patient: str, reason: str) -> dict:
    """A study-table row for a patient whose registration did not finish."""
    return {"patient": patient, "status": "failed", "error": reason}


def write_study_table(path, rows: list[dict]) -> Path:
    """Write the study table, in row order, with the columns of a successful row first."""
    template = next((row for row in rows if row["status"] == "ok"), rows[0])
    columns = list(dict.fromkeys([*template, *(key for row in rows for key in row)]))
    return io.write_csv(path, [{key: row.get(key, "") for key in columns} for row in rows])
