"""Dice, HD95, Jacobian statistics and landmark TRE of a registration, as Learn2Reg reports them."""

from __future__ import annotations

import os

from nipype.interfaces.base import SimpleInterface, TraitedSpec, traits

from ..evaluation import evaluate_files, evaluate_landmarks
from .base import VersionedInputSpec, optional


class _DiceEvalInputSpec(VersionedInputSpec):
    warped_labels = traits.File(exists=True, mandatory=True, desc="moving labels carried to the fixed grid")
    fixed_labels = traits.File(exists=True, mandatory=True, desc="label map of the fixed image")
    label_names = traits.File(exists=True, mandatory=False,
                              desc="JSON {id: name} or TSV/CSV with index and name columns; when given, "
                              "exactly these labels are evaluated (else every label present)")
    displacement = traits.File(exists=True, mandatory=False,
                               desc="ITK/ANTs displacement: adds Jacobian determinant statistics to the summary")
    mask = traits.File(exists=True, mandatory=False,
                       desc="evaluation region on the fixed grid (e.g. the CBCT field of view)")


class _DiceEvalOutputSpec(TraitedSpec):
    out_csv = traits.File(exists=True, desc="dice.csv: label, name, dice, hd95_mm, voxels_fixed, voxels_warped, "
                          "missing")
    out_json = traits.File(exists=True, desc="dice.json: mean_dice, labels, missing_labels and, with a "
                           "displacement, jacobian_min, jacobian_nonpositive_percent, sdlogj")
    mean_dice = traits.Float(desc="mean Dice over the labels present in both maps")


class DiceEval(SimpleInterface):
    """Per-label Dice and HD95 (mm) plus the Jacobian determinant summary of the field.

    Examples
    --------
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.interfaces import DiceEval
    >>> fixed = np.zeros((10, 10, 10), np.int32); fixed[2:8, 2:8, 2:8] = 1
    >>> warped = np.roll(fixed, 1, axis=0)
    >>> paths = [str(io.save_image(f"{n}.nii.gz", a, np.eye(4))) for n, a in (("w", warped), ("f", fixed))]
    >>> result = DiceEval(warped_labels=paths[0], fixed_labels=paths[1]).run()
    >>> round(result.outputs.mean_dice, 3), Path(result.outputs.out_csv).name
    (0.833, 'dice.csv')
    """

    input_spec = _DiceEvalInputSpec
    output_spec = _DiceEvalOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        out_csv, out_json = os.path.join(runtime.cwd, "dice.csv"), os.path.join(runtime.cwd, "dice.json")
        _, summary = evaluate_files(
            inputs.warped_labels, inputs.fixed_labels, out_csv, out_json, label_names=optional(inputs.label_names),
            displacement=optional(inputs.displacement), mask=optional(inputs.mask),
        )
        self._results.update(out_csv=out_csv, out_json=out_json, mean_dice=summary["mean_dice"])
        return runtime


class _LandmarkTREInputSpec(VersionedInputSpec):
    fixed_landmarks = traits.File(exists=True, mandatory=True,
                                  desc="CSV x,y,z (ITK/LPS mm) of landmarks in the fixed image")
    moving_landmarks = traits.File(exists=True, mandatory=True,
                                   desc="CSV x,y,z (ITK/LPS mm) of their partners in the moving image, row by row")
    displacement = traits.File(exists=True, mandatory=True, desc="ITK/ANTs displacement field on the fixed grid")
    affine_transform = traits.File(exists=True, mandatory=False,
                                   desc="ITK/ANTs affine (fixed -> moving) applied before the deformable stages, "
                                   "e.g. AffineInit's transform")


class _LandmarkTREOutputSpec(TraitedSpec):
    out_csv = traits.File(exists=True, desc="tre.csv: landmark, tre_mm and the mapped point (LPS mm)")
    out_json = traits.File(exists=True, desc="tre.json: landmarks, tre_mean_mm, tre_std_mm, tre_median_mm, "
                           "tre_max_mm")
    mean_tre = traits.Float(desc="mean target registration error (mm)")


class LandmarkTRE(SimpleInterface):
    """Target registration error: fixed landmarks mapped to ``A (p + d(p))``, distance to their partners.

    Examples
    --------
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.interfaces import LandmarkTRE
    >>> shift = np.zeros((10, 10, 10, 3), np.float32); shift[..., 0] = 2.0  # 2 mm towards R
    >>> field = io.save_displacement("field.nii.gz", shift, np.eye(4))
    >>> _ = Path("fixed.csv").write_text("x,y,z\\n-4,-4,4\\n-5,-3,2\\n")   # LPS mm
    >>> _ = Path("moving.csv").write_text("x,y,z\\n-6,-4,4\\n-7,-3,3\\n")
    >>> tre = LandmarkTRE(fixed_landmarks="fixed.csv", moving_landmarks="moving.csv",
    ...                   displacement=str(field)).run()
    >>> round(tre.outputs.mean_tre, 3), Path(tre.outputs.out_csv).name
    (0.5, 'tre.csv')
    """

    input_spec = _LandmarkTREInputSpec
    output_spec = _LandmarkTREOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        out_csv, out_json = os.path.join(runtime.cwd, "tre.csv"), os.path.join(runtime.cwd, "tre.json")
        _, summary = evaluate_landmarks(
            inputs.fixed_landmarks, inputs.moving_landmarks, inputs.displacement, out_csv, out_json,
            affine_transform=optional(inputs.affine_transform),
        )
        self._results.update(out_csv=out_csv, out_json=out_json, mean_tre=summary["tre_mean_mm"])
        return runtime
