"""What users look at: the per-patient QC figure and the flow's trajectory."""

from __future__ import annotations

import os

from nipype.interfaces.base import SimpleInterface, TraitedSpec, traits

from .. import pipeline
from ..reports import qc
from .base import VersionedInputSpec, field_stride_trait, optional


class _QCReportInputSpec(VersionedInputSpec):
    fixed_image = traits.File(exists=True, mandatory=True, desc="fixed image: every panel is on its grid")
    moving_image = traits.File(exists=True, mandatory=True,
                               desc="moving image that was registered (after AffineInit, the aligned one), "
                               "shown undeformed as 'before'")
    warped_image = traits.File(exists=True, mandatory=True, desc="the moving image on the fixed grid (FineINR's)")
    displacement = traits.File(exists=True, mandatory=False,
                               desc="ITK/ANTs displacement on the fixed grid: adds the Jacobian determinant "
                               "column, folded voxels (det J <= 0) marked")
    fixed_labels = traits.File(exists=True, mandatory=False, desc="label map of the fixed image (green contours)")
    moving_labels = traits.File(exists=True, mandatory=False,
                                desc="label map of the moving image: red contours before registration")
    warped_labels = traits.File(exists=True, mandatory=False,
                                desc="moving labels on the fixed grid: red contours after registration")
    fixed_mask = traits.File(exists=True, mandatory=False,
                             desc="region of the fixed grid where the Dice in the titles is counted (as DiceEval)")
    label_names = traits.File(exists=True, mandatory=False,
                              desc="JSON/TSV of label names; when given, only these labels get their own row")
    title = traits.Str(mandatory=False, desc="figure title, e.g. the patient id")
    out_file = traits.Str("qc.png", usedefault=True, desc="output file name (PNG)")


class _QCReportOutputSpec(TraitedSpec):
    out_file = traits.File(exists=True, desc="the QC figure (PNG)")


class QCReport(SimpleInterface):
    """The QC figure of one registration (:func:`nipype_inrlddmm.reports.qc.qc_figure`).

    Fixed, moving and warped mid-slices in the three planes, a fixed/warped
    checkerboard, label contours before and after registration (fixed
    green, moving or warped red, overlap yellow), the Jacobian determinant
    with folded voxels marked, and for each label the axial slice through
    its centroid with its Dice before and after.

    Examples
    --------
    >>> from pathlib import Path
    >>> from nipype_inrlddmm.interfaces import QCReport
    >>> figure = QCReport(fixed_image=str(data / "cbct.nii.gz"), moving_image=str(data / "ct.nii.gz"),
    ...                   warped_image=str(data / "ct.nii.gz"), fixed_labels=str(data / "cbct_labels.nii.gz"),
    ...                   warped_labels=str(data / "ct_labels.nii.gz"), title="p01 (unregistered)")
    >>> Path(figure.run().outputs.out_file).name
    'qc.png'
    """

    input_spec = _QCReportInputSpec
    output_spec = _QCReportOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        out_file = os.path.join(runtime.cwd, os.path.basename(inputs.out_file))
        self._results["out_file"] = str(qc.write_qc_figure(
            out_file, fixed_image=inputs.fixed_image, moving_image=inputs.moving_image,
            warped_image=inputs.warped_image, fixed_labels=optional(inputs.fixed_labels),
            moving_labels=optional(inputs.moving_labels), warped_labels=optional(inputs.warped_labels),
            displacement=optional(inputs.displacement), fixed_mask=optional(inputs.fixed_mask),
            label_names=optional(inputs.label_names), title=optional(inputs.title) or "",
        ))
        return runtime


class _TrajectoryInputSpec(VersionedInputSpec):
    model = traits.File(exists=True, mandatory=True, desc="velocity network checkpoint (FineINR's model)")
    moving_image = traits.File(exists=True, mandatory=True, desc="the moving image that was registered")
    fixed_image = traits.File(exists=True, mandatory=True,
                              desc="the fixed image: the frames' grid (the checkpoint's fixed grid)")
    n_times = traits.Range(low=2, value=5, usedefault=True,
                           desc="frames at evenly spaced times of [0, 1]: the first is the moving image on the "
                           "fixed grid, the last the warped image")
    field_stride = field_stride_trait(
        "voxel stride (one for all axes, or three) of the integration before trilinear "
        "interpolation (the registration's, so that the last frame equals the warped image)")
    title = traits.Str(mandatory=False, desc="title of the animation, e.g. the patient id")
    num_threads = traits.Range(low=1, value=1, usedefault=True, nohash=True,
                               desc="torch CPU threads (a Node reports it as n_procs)")


class _TrajectoryOutputSpec(TraitedSpec):
    trajectory = traits.File(exists=True, desc="trajectory.nii.gz: (X, Y, Z, K) float32, the moving image at K times")
    animation = traits.File(exists=True, desc="trajectory.gif: the axial centre slice, one frame per time")


class Trajectory(SimpleInterface):
    """The moving image carried along the flow: the deformation over time (the paper's figure 3).

    Frames at ``t = k / (n_times - 1)`` follow the Euler path of the fine
    stage's network, interpolated linearly in time between step boundaries
    (exact for the Euler scheme: :func:`nipype_inrlddmm.pipeline.trajectory_frames`).

    Examples
    --------
    >>> from pathlib import Path
    >>> import nibabel as nib
    >>> from nipype_inrlddmm.interfaces import Trajectory
    >>> frames = Trajectory(model=coarse.model, moving_image=str(data / "ct.nii.gz"),
    ...                     fixed_image=str(data / "cbct.nii.gz"), n_times=3).run().outputs
    >>> nib.load(frames.trajectory).shape, Path(frames.animation).name
    ((32, 28, 16, 3), 'trajectory.gif')
    """

    input_spec = _TrajectoryInputSpec
    output_spec = _TrajectoryOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        with pipeline.torch_threads(inputs.num_threads):
            outputs = pipeline.run_trajectory(inputs.model, inputs.moving_image, inputs.fixed_image, runtime.cwd,
                                              n_times=inputs.n_times, field_stride=inputs.field_stride,
                                              title=optional(inputs.title) or "")
        self._results.update({name: str(path) for name, path in outputs.items()})
        return runtime
