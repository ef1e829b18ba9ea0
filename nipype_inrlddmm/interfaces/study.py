"""Small interfaces that turn a manifest into per-patient inputs and gather the study table."""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces.base import SimpleInterface, TraitedSpec, traits

from .. import evaluation, io, pipeline
from .base import VersionedInputSpec

class _SelectPatientInputSpec(VersionedInputSpec):
    manifest = traits.File(exists=True, mandatory=True,
                           desc="study manifest (TSV/CSV: patient, moving, fixed, then moving_labels, fixed_labels "
                           "or moving_rtstruct, fixed_rtstruct [, fixed_mask, init_model]; paths relative to the "
                           "manifest)")
    patient = traits.Str(mandatory=True, desc="patient id (the manifest's 'patient' column)")


class _SelectPatientOutputSpec(TraitedSpec):
    moving_image = traits.Str(desc="moving image of the patient: a NIfTI file, or a DICOM series folder")
    fixed_image = traits.Str(desc="fixed image of the patient: a NIfTI file, or a DICOM series folder")
    moving_labels = traits.File(desc="moving label map (undefined for DICOM series: moving_rtstruct)")
    fixed_labels = traits.File(desc="fixed label map (undefined for DICOM series: fixed_rtstruct)")
    moving_rtstruct = traits.File(desc="RTSTRUCT drawn on the moving series (undefined for NIfTI images)")
    fixed_rtstruct = traits.File(desc="RTSTRUCT drawn on the fixed series (undefined for NIfTI images)")
    fixed_mask = traits.File(desc="fixed mask (undefined when the manifest has none for this patient)")
    init_model = traits.File(desc="model.pt of a previous registration to start from (undefined when the manifest "
                             "has none for this patient)")


#: SelectPatient's output of each manifest column (the others keep the column's name).
_OUTPUTS = {"moving": "moving_image", "fixed": "fixed_image"}


class SelectPatient(SimpleInterface):
    """One patient's files from a study manifest (absolute paths), label maps validated.

    Every file must exist, the images must be NIfTI files with label maps or
    DICOM series folders with RTSTRUCTs, and the label maps must be usable
    (integer, non-empty, on their image's grid): checked here, before any
    optimisation starts, so that a bad label map fails its patient at once
    rather than after the registration.  The images themselves (and the
    RTSTRUCTs) are validated by the nodes that read them.

    Examples
    --------
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.interfaces import SelectPatient
    >>> for name in ("mr.nii.gz", "us.nii.gz", "mr_labels.nii.gz", "us_labels.nii.gz"):
    ...     _ = io.save_image(name, np.ones((4, 4, 4), np.uint8), np.eye(4))
    >>> _ = Path("manifest.tsv").write_text("patient\\tmoving\\tfixed\\tmoving_labels\\tfixed_labels\\n"
    ...                                     "case1\\tmr.nii.gz\\tus.nii.gz\\tmr_labels.nii.gz\\tus_labels.nii.gz\\n")
    >>> files = SelectPatient(manifest="manifest.tsv", patient="case1").run().outputs
    >>> Path(files.fixed_image).name
    'us.nii.gz'
    """

    input_spec = _SelectPatientInputSpec
    output_spec = _SelectPatientOutputSpec

    def _run_interface(self, runtime):
        # Other patients' missing files are theirs to report: check only this patient's.
        manifest, patient = self.inputs.manifest, self.inputs.patient
        rows = {row["patient"]: row for row in io.read_manifest(manifest, check_files=False)}
        if patient not in rows:
            raise io.InputError(manifest, f"no patient {patient!r}")
        row = rows[patient]
        for column in io.MANIFEST_FILES:
            if not row.get(column):
                continue
            if not Path(row[column]).exists():
                raise io.InputError(row[column], f"{column} file of patient {patient!r} does not exist "
                                    f"(manifest {manifest}, column {column!r})")
            self._results[_OUTPUTS.get(column, column)] = row[column]
        io.check_image_kinds(manifest, patient, row)
        pipeline.check_labels(row["moving"], row["fixed"], moving_labels=row.get("moving_labels"),
                              fixed_labels=row.get("fixed_labels"))
        return runtime


class _GatherDiceInputSpec(VersionedInputSpec):
    patient = traits.List(traits.Str, mandatory=True, desc="patient ids, in study order")
    dice_csv = traits.List(traits.File(exists=True), mandatory=True, desc="each patient's dice.csv (DiceEval)")
    dice_json = traits.List(traits.File(exists=True), mandatory=True, desc="each patient's dice.json (DiceEval)")


class _GatherDiceOutputSpec(TraitedSpec):
    study_table = traits.File(exists=True, desc="study_dice.csv: one row per patient, one Dice column per label")


class GatherDice(SimpleInterface):
    """Join every patient's Dice into ``study_dice.csv`` (the study's JoinNode).

    Columns: patient, status, one Dice column per label name, mean_dice,
    mean_hd95_mm, jacobian_min, jacobian_nonpositive_percent, sdlogj, error.
    """

    input_spec = _GatherDiceInputSpec
    output_spec = _GatherDiceOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        if not len(inputs.patient) == len(inputs.dice_csv) == len(inputs.dice_json):
            raise ValueError("GatherDice: patient, dice_csv and dice_json must have the same length")
        rows = [evaluation.study_row(*row) for row in zip(inputs.patient, inputs.dice_csv, inputs.dice_json)]
        table = evaluation.write_study_table(os.path.join(runtime.cwd, "study_dice.csv"), rows)
        self._results["study_table"] = str(table)
        return runtime
