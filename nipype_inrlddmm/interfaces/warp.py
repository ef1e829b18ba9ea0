"""Carry an image or a label map to the fixed grid through a displacement field, or back through the inverse."""

from __future__ import annotations

import os

from nipype.interfaces.base import SimpleInterface, TraitedSpec, isdefined, traits
from nipype.utils.filemanip import fname_presuffix

from .. import pipeline
from .base import VersionedInputSpec, field_stride_trait

#: The map to apply, one of the two: Nipype refuses both (naming them) and neither (naming both).
_MAP = ["displacement", "velocity_checkpoint"]


class _ApplyWarpInputSpec(VersionedInputSpec):
    in_file = traits.File(exists=True, mandatory=True,
                          desc="image or label map in moving space (its own grid); with invert, in fixed space "
                          "(on the fixed grid the velocity_checkpoint was fitted on)")
    displacement = traits.File(exists=True, mandatory=True, xor=_MAP,
                               desc="ITK/ANTs displacement field on the reference grid (FineINR's); forward only")
    velocity_checkpoint = traits.File(
        exists=True, mandatory=True, xor=_MAP,
        desc="velocity network checkpoint (FineINR's model, or model.pt of `inrlddmm register`); needed by "
        "invert=True, whose inverse map is integrated backwards through it (a displacement file cannot be)")
    invert = traits.Bool(False, usedefault=True,
                         desc="carry a fixed-space image back onto the moving grid (reference_image = the moving "
                         "image) through the inverse map; needs velocity_checkpoint")
    field_stride = field_stride_trait(
        "invert: voxel stride (one for all axes, or three) at which the inverse map is integrated "
        "before trilinear interpolation to every voxel")
    reference_image = traits.File(exists=True, mandatory=True,
                                  desc="the output grid: the fixed image (the displacement's grid), or with invert "
                                  "the moving image")
    interpolation = traits.Enum(
        "linear", "nearest", "label", usedefault=True,
        desc="linear for images; nearest, or label (each label's indicator blended, no mixed label at "
        "boundaries, as ANTs' GenericLabel) for label maps",
    )
    out_file = traits.Str(mandatory=False, desc="output file name (default: <in_file>_warped.nii.gz)")


class _ApplyWarpOutputSpec(TraitedSpec):
    out_file = traits.File(exists=True, desc="in_file on the reference grid (float32, or int32 for label maps)")


class ApplyWarp(SimpleInterface):
    """Resample a moving-space image onto the fixed grid: ``out(x) = in_file(x + d(x))``; or invert.

    Forward (``displacement``): the same resampling as ``antsApplyTransforms
    -t displacement.nii.gz``.  With ``invert=True`` and
    ``velocity_checkpoint``, a fixed-space image (contours drawn or edited on
    the CBCT) is carried back onto the moving image's grid (the
    ``reference_image``): ``out(y) = in_file(y + d_inv(y))``, with ``d_inv``
    integrated backwards in time through the velocity network
    (:func:`~nipype_inrlddmm.engine.flow.integrate_backward`).  After
    :class:`AffineInit`, the moving grid is the aligned image's.

    Examples
    --------
    >>> import numpy as np
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.interfaces import ApplyWarp
    >>> labels = np.zeros((8, 8, 8), np.int32); labels[2:6, 2:6, 2:6] = 1
    >>> shift = np.zeros((8, 8, 8, 3), np.float32); shift[..., 0] = 1.0  # sample 1 mm to the right
    >>> moving = io.save_image("labels.nii.gz", labels, np.eye(4))
    >>> field = io.save_displacement("field.nii.gz", shift, np.eye(4))
    >>> warp = ApplyWarp(in_file=str(moving), displacement=str(field), reference_image=str(moving),
    ...                  interpolation="label", out_file="warped_labels.nii.gz")
    >>> out = io.load_labels(warp.run().outputs.out_file)[0]
    >>> int(out[1, 3, 3]), int(out[5, 3, 3])
    (1, 0)

    The inverse needs the network, not the displacement:

    >>> ApplyWarp(in_file=str(moving), displacement=str(field), reference_image=str(moving),
    ...           invert=True).run()
    Traceback (most recent call last):
    ...
    ValueError: ApplyWarp: invert=True needs velocity_checkpoint (the model.pt of the registration) ...
    """

    input_spec = _ApplyWarpInputSpec
    output_spec = _ApplyWarpOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        if isdefined(inputs.out_file):
            out_file = os.path.join(runtime.cwd, os.path.basename(inputs.out_file))
        else:
            out_file = fname_presuffix(inputs.in_file, suffix="_warped", newpath=runtime.cwd)
        # xor leaves one of the two maps; which one the direction needs, xor cannot say.
        if inputs.invert:
            if not isdefined(inputs.velocity_checkpoint):
                raise ValueError("ApplyWarp: invert=True needs velocity_checkpoint (the model.pt of the "
                                 "registration) instead of displacement: the inverse map is integrated backwards "
                                 "through the velocity network")
            out = pipeline.apply_inverse_warp(inputs.in_file, inputs.velocity_checkpoint, inputs.reference_image,
                                              out_file, interpolation=inputs.interpolation,
                                              field_stride=inputs.field_stride)
        else:
            if not isdefined(inputs.displacement):
                raise ValueError("ApplyWarp: the forward warp needs displacement; velocity_checkpoint is for "
                                 "invert=True")
            out = pipeline.apply_warp(inputs.in_file, inputs.displacement, inputs.reference_image, out_file,
                                      interpolation=inputs.interpolation)
        self._results["out_file"] = str(out)
        return runtime
