"""Carry an image or a label map to the fixed grid through a displacement field."""

from __future__ import annotations

import os

from nipype.interfaces.base import SimpleInterface, TraitedSpec, isdefined, traits
from nipype.utils.filemanip import fname_presuffix

from .. import steps
from .base import VersionedInputSpec


class _ApplyWarpInputSpec(VersionedInputSpec):
    in_file = traits.File(exists=True, mandatory=True, desc="image or label map in moving space (its own grid)")
    displacement = traits.File(exists=True, mandatory=True,
                               desc="ITK/ANTs displacement field on the reference grid (FineINR's)")
    reference_image = traits.File(exists=True, mandatory=True,
                                  desc="fixed image: the output grid; must be the displacement's grid")
    interpolation = traits.Enum(
        "linear", "nearest", "label", usedefault=True,
        desc="linear for images; nearest, or label (each label's indicator blended, no mixed label at "
        "boundaries, as ANTs' GenericLabel) for label maps",
    )
    out_file = traits.Str(mandatory=False, desc="output file name (default: <in_file>_warped.nii.gz)")


class _ApplyWarpOutputSpec(TraitedSpec):
    out_file = traits.File(exists=True, desc="in_file on the reference grid (float32, or int32 for label maps)")


class ApplyWarp(SimpleInterface):
    """Resample a moving-space image onto the fixed grid: ``out(x) = in_file(x + d(x))``.

    The same resampling as ``antsApplyTransforms -t displacement.nii.gz``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.interfaces import ApplyWarp
    >>> tmpdir = tempfile.TemporaryDirectory()
    >>> tmp = Path(tmpdir.name)
    >>> labels = np.zeros((8, 8, 8), np.int32); labels[2:6, 2:6, 2:6] = 1
    >>> shift = np.zeros((8, 8, 8, 3), np.float32); shift[..., 0] = 1.0  # sample 1 mm to the right
    >>> moving = io.save_image(tmp / "labels.nii.gz", labels, np.eye(4))
    >>> field = io.save_displacement(tmp / "field.nii.gz", shift, np.eye(4))
    >>> warp = ApplyWarp(in_file=str(moving), displacement=str(field), reference_image=str(moving),
    ...                  interpolation="label", out_file="warped_labels.nii.gz")
    >>> out = io.load_labels(warp.run(cwd=str(tmp)).outputs.out_file)[0]
    >>> int(out[1, 3, 3]), int(out[5, 3, 3])
    (1, 0)
    >>> tmpdir.cleanup()
    """

    input_spec = _ApplyWarpInputSpec
    output_spec = _ApplyWarpOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        if isdefined(inputs.out_file):
            out_file = os.path.join(runtime.cwd, os.path.basename(inputs.out_file))
        else:
            out_file = fname_presuffix(inputs.in_file, suffix="_warped", newpath=runtime.cwd)
        self._results["out_file"] = str(steps.apply_warp(
            inputs.in_file, inputs.displacement, inputs.reference_image, out_file,
            interpolation=inputs.interpolation,
        ))
        return runtime
