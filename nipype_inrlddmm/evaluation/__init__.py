"""How good a registration is: overlap, surface distance, landmark error and the field's regularity.

* :mod:`.metrics`: the measures on arrays (Dice, HD95, det J, SDlogJ, TRE);
* :mod:`.scores`: one registration's per-label or per-landmark rows and
  their summary, from arrays or files, written as ``dice.csv`` and
  ``dice.json``;
* :mod:`.study`: the study table, one row per patient.

The names below are the public ones; import them from here.
"""

from . import metrics
from .scores import evaluate_files, evaluate_labels, evaluate_landmarks, write_evaluation
from .study import failed_row, study_row, write_study_table

__all__ = ["evaluate_files", "evaluate_labels", "evaluate_landmarks", "failed_row", "metrics", "study_row",
           "write_evaluation", "write_study_table"]
