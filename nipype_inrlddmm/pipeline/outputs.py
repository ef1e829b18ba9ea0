"""The name of every file a registration writes, and the writers of its result.

A study's nodes and ``inrlddmm register`` write the same files under the
same names (the study's DataSink keeps them in ``out_dir/<patient>/``):
each name is defined here once.  The result itself (network, field,
warped image) is written by :func:`fine_writers`, which :mod:`.stages`
(the fine stage's interface) and :mod:`.register` (the command) both call;
each other output has its one function too, which both call: the warped
labels :func:`~.stages.warp_array`, the Dice
:func:`~nipype_inrlddmm.evaluation.write_evaluation`, the QC figure
:func:`~nipype_inrlddmm.reports.qc.qc_figure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .. import engine, io

#: File names of each stage's outputs.
COARSE_OUTPUTS = {"model": "coarse_model.pt", "displacement": "coarse_displacement.nii.gz", "log": "coarse_log.csv"}
DISTILL_OUTPUTS = {"model": "distilled_model.pt", "log": "distill_log.csv"}
FINE_OUTPUTS = {"model": "model.pt", "displacement": "displacement.nii.gz", "warped_image": "warped.nii.gz",
                "log": "fine_log.csv"}
AFFINE_OUTPUTS = {"aligned_image": "moving_aligned.nii.gz", "aligned_labels": "moving_labels_aligned.nii.gz",
                  "transform": "affine.txt"}
TRAJECTORY_OUTPUTS = {"trajectory": "trajectory.nii.gz", "animation": "trajectory.gif"}
#: File names of the outputs of :func:`~nipype_inrlddmm.pipeline.register_files` beyond the fine stage's.
REGISTER_OUTPUTS = {"log": "log.csv", "warped_labels": "warped_labels.nii.gz", "dice": "dice.csv",
                    "dice_summary": "dice.json", "qc": "qc.png"}
#: File names of the outputs of a registration of DICOM series beyond :data:`REGISTER_OUTPUTS`.
RTSTRUCT_OUTPUTS = {"rtstruct": "rtstruct.dcm", "label_table": "labels.tsv"}


def fine_writers(out_dir, velocity: engine.VelocityField, displacement: np.ndarray, warped: np.ndarray, *,
                 fixed_shape, fixed_affine: np.ndarray, moving: dict) -> dict[str, Callable[[], Path]]:
    """The writers of a registration's result, keys as :data:`FINE_OUTPUTS` (but the log), each returning its path.

    ``displacement`` is ``(X, Y, Z, 3)`` mm RAS and ``warped`` the moving
    image on the fixed grid; ``moving`` is the moving image's
    :func:`~nipype_inrlddmm.io.image_fingerprint`, which ``model.pt``
    records.  Returned uncalled, so that the command can compress the
    volumes in threads while it evaluates, and a study's node writes them
    at once.
    """
    out = Path(out_dir)
    return {
        "model": lambda: io.save_checkpoint(out / FINE_OUTPUTS["model"], velocity, shape=fixed_shape,
                                            affine=fixed_affine, moving=moving),
        "displacement": lambda: io.save_displacement(out / FINE_OUTPUTS["displacement"], displacement, fixed_affine),
        "warped_image": lambda: io.save_image(out / FINE_OUTPUTS["warped_image"], warped, fixed_affine),
    }
