"""Small interfaces that turn a manifest into per-patient inputs and gather the study table."""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces.base import SimpleInterface, TraitedSpec, traits

from .. import io, steps
from .base import VersionedInputSpec

class _SelectPatientInputSpec(VersionedInputSpec):
    manifest = traits.File(exists=True, mandatory=True,
                           desc="study manifest (TSV/CSV: patient, moving, fixed, moving_labels, fixed_labels "
                           "[, fixed_mask]; paths relative to the manifest)")
    patient = traits.Str(mandatory=True, desc="patient id (the manifest's 'patient' column)")


class _SelectPatientOutputSpec(TraitedSpec):
    moving_image = traits.File(desc="moving image of the patient")
    fixed_image = traits.File(desc="fixed image of the patient")
    moving_labels = traits.File(desc="moving label map")
    fixed_labels = traits.File(desc="fixed label map")
    fixed_mask = traits.File(desc="fixed mask (undefined when the manifest has none for this patient)")


class SelectPatient(SimpleInterface):
    """One patient's files from a study manifest (absolute paths), label maps validated.

    Every file must exist, and the label maps must be usable (integer,
    non-empty, on their image's grid): checked here, before any optimisation
    starts, so that a bad label map fails its patient at once rather than
    after the registration.  The images themselves are validated by the
    stages that read them.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.interfaces import SelectPatient
    >>> tmp = tempfile.TemporaryDirectory()
    >>> manifest = Path(tmp.name) / "manifest.tsv"
    >>> for name in ("mr.nii.gz", "us.nii.gz", "mr_labels.nii.gz", "us_labels.nii.gz"):
    ...     _ = io.save_image(Path(tmp.name) / name, np.ones((4, 4, 4), np.uint8), np.eye(4))
    >>> _ = manifest.write_text("patient\\tmoving\\tfixed\\tmoving_labels\\tfixed_labels\\n"
    ...                         "case1\\tmr.nii.gz\\tus.nii.gz\\tmr_labels.nii.gz\\tus_labels.nii.gz\\n")
    >>> files = SelectPatient(manifest=str(manifest), patient="case1").run(cwd=tmp.name).outputs
    >>> Path(files.fixed_image).name
    'us.nii.gz'
    >>> tmp.cleanup()
    """

    input_spec = _SelectPatientInputSpec
    output_spec = _SelectPatientOutputSpec

    def _run_interface(self, runtime):
        # Other patients' missing files are theirs to report: check only this patient's.
        rows = {row["patient"]: row for row in io.read_manifest(self.inputs.manifest, check_files=False)}
        if self.inputs.patient not in rows:
            raise io.InputError(self.inputs.manifest, f"no patient {self.inputs.patient!r}")
        row = rows[self.inputs.patient]
        for column, required in io.MANIFEST_FILES.items():
            if not row.get(column):
                if required:
                    raise io.InputError(self.inputs.manifest, f"patient {self.inputs.patient!r} has no {column!r}")
                continue
            if not Path(row[column]).is_file():
                raise io.InputError(row[column], f"{column} file of patient {self.inputs.patient!r} does not exist "
                                    f"(manifest {self.inputs.manifest}, column {column!r})")
            name = column + "_image" if column in ("moving", "fixed") else column
            self._results[name] = row[column]
        steps.check_labels(row["moving"], row["fixed"], moving_labels=row.get("moving_labels"),
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
        rows = [steps.study_row(*row) for row in zip(inputs.patient, inputs.dice_csv, inputs.dice_json)]
        self._results["study_table"] = str(steps.write_study_table(os.path.join(runtime.cwd, "study_dice.csv"), rows))
        return runtime
