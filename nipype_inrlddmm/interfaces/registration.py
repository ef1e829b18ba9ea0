"""The three INR-LDDMM optimisation stages as Nipype interfaces.

``CoarseINR`` -> ``DistillINR`` -> ``FineINR`` is Algorithm 2 of the paper,
one node per stage so that Nipype caches each: changing a fine-stage
setting reruns the fine stage only.  Each interface is a thin wrapper over
:mod:`nipype_inrlddmm.pipeline.stages`.
"""

from __future__ import annotations

from nipype.interfaces.base import SimpleInterface, TraitedSpec, traits

from .. import pipeline
from ..options import HELP
from .base import (
    DEFAULTS,
    DenseFieldInputSpec,
    ImageStageInputSpec,
    ModelInputSpec,
    OptimisationInputSpec,
    lncc_window_trait,
    optional,
    patch_stride_trait,
    per_axis_trait,
    progress_of,
    reg_weight_trait,
    sampling_fraction_trait,
    stage_config,
)


class _CoarseINRInputSpec(ImageStageInputSpec, ModelInputSpec):
    iterations = traits.Range(low=0, value=DEFAULTS.coarse.iterations, usedefault=True,
                              desc=HELP["coarse_iterations"])
    learning_rate = traits.Range(low=0.0, exclude_low=True, value=DEFAULTS.coarse.learning_rate, usedefault=True,
                                 desc="Adam learning rate at the start (cosine decay to a tenth)")
    patch_stride = patch_stride_trait(DEFAULTS.coarse.patch_stride)
    coarse_factor = per_axis_trait(
        DEFAULTS.coarse_factor,
        HELP["coarse_factor"] + " (one for all axes, or three; None: the default)")
    velocity_window_mm = traits.Either(
        None, traits.Tuple(traits.Range(low=0.0), traits.Range(low=0.0)), default=DEFAULTS.velocity_window_mm,
        usedefault=True, desc=HELP["velocity_window_mm"] + "; (inner, outer), None: not confined")


class _CoarseINROutputSpec(TraitedSpec):
    model = traits.File(exists=True, desc="velocity network checkpoint (.pt), normalised to the full fixed grid")
    displacement = traits.File(exists=True, desc="displacement on the coarse fixed grid (ITK/ANTs field, LPS mm)")
    log = traits.File(exists=True, desc="CSV: iteration, loss, similarity, regularisation, seconds")


class CoarseINR(SimpleInterface):
    """Coarse stage: fit a fresh velocity network on block-averaged images.

    Both images are block-averaged by ``coarse_factor``; the network is
    normalised to the full fixed grid so :class:`DistillINR` can continue it.
    With a ``fixed_mask`` and a ``velocity_window_mm``, the network's
    velocity is confined to the anatomy, a window the model file carries on
    to the later stages.

    Examples
    --------
    >>> from pathlib import Path
    >>> from nipype_inrlddmm.interfaces import CoarseINR
    >>> stage = CoarseINR(moving_image=str(data / "ct.nii.gz"), fixed_image=str(data / "cbct.nii.gz"),
    ...                   fixed_mask=str(data / "cbct_fov.nii.gz"), iterations=5, seed=1)
    >>> result = stage.run()
    >>> sorted(Path(path).name for path in result.outputs.get().values())
    ['coarse_displacement.nii.gz', 'coarse_log.csv', 'coarse_model.pt']
    """

    input_spec = _CoarseINRInputSpec
    output_spec = _CoarseINROutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        with pipeline.torch_threads(inputs.num_threads):
            outputs = pipeline.run_coarse(
                inputs.moving_image, inputs.fixed_image, runtime.cwd, stage_config(inputs, "coarse"),
                fixed_mask=optional(inputs.fixed_mask), device=inputs.device, progress=progress_of(inputs),
            )
        self._results.update({name: str(path) for name, path in outputs.items()})
        return runtime


class _DistillINRInputSpec(OptimisationInputSpec, DenseFieldInputSpec):
    coarse_model = traits.File(exists=True, mandatory=True, desc="checkpoint written by CoarseINR")
    coarse_displacement = traits.File(exists=True, mandatory=True,
                                      desc="displacement written by CoarseINR (coarse grid)")
    fixed_image = traits.File(exists=True, mandatory=True,
                              desc="the fixed image of the coarse stage: its full grid is fitted")
    iterations = traits.Range(low=0, value=DEFAULTS.distill.iterations, usedefault=True,
                              desc=HELP["distill_iterations"])
    learning_rate = traits.Range(low=0.0, exclude_low=True, value=DEFAULTS.distill.learning_rate, usedefault=True,
                                 desc="Adam learning rate at the start (cosine decay to a tenth)")
    batch_points = traits.Range(low=1, value=DEFAULTS.distill.batch_points, usedefault=True,
                                desc="random fixed-grid voxels per iteration")


class _DistillINROutputSpec(TraitedSpec):
    model = traits.File(exists=True, desc="checkpoint fitted to the upsampled coarse field")
    log = traits.File(exists=True, desc="CSV: iteration, loss, field_error (mm^2), regularisation, seconds")


class DistillINR(SimpleInterface):
    """Distillation: refit the coarse network at full resolution to its upsampled field.

    INR weights cannot simply be upsampled; this stage trains the coarse
    network (its architecture comes from the checkpoint) on random voxels of
    the full fixed grid to reproduce the trilinearly upsampled coarse field.

    Examples
    --------
    >>> from pathlib import Path
    >>> from nipype_inrlddmm.interfaces import DistillINR
    >>> distill = DistillINR(coarse_model=coarse.model, coarse_displacement=coarse.displacement,
    ...                      fixed_image=str(data / "cbct.nii.gz"), iterations=5)
    >>> Path(distill.run().outputs.model).name
    'distilled_model.pt'
    """

    input_spec = _DistillINRInputSpec
    output_spec = _DistillINROutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        with pipeline.torch_threads(inputs.num_threads):
            outputs = pipeline.run_distill(
                inputs.coarse_model, inputs.coarse_displacement, inputs.fixed_image, runtime.cwd,
                stage_config(inputs, "distill"), device=inputs.device, progress=progress_of(inputs),
            )
        self._results.update({name: str(path) for name, path in outputs.items()})
        return runtime


class _FineINRInputSpec(ImageStageInputSpec, DenseFieldInputSpec):
    init_model = traits.File(exists=True, mandatory=True,
                             desc="checkpoint to start from (DistillINR's), fitted on the fixed image's grid")
    warm_start = traits.Bool(False, usedefault=True,
                             desc="init_model is another registration's of the same moving image (the previous "
                             "fraction of a course), fitted on a fixed grid that covers this one, not this "
                             "registration's distillation")
    iterations = traits.Range(low=0, value=DEFAULTS.fine.iterations, usedefault=True,
                              desc=HELP["fine_iterations"])
    learning_rate = traits.Range(low=0.0, exclude_low=True, value=DEFAULTS.fine.learning_rate, usedefault=True,
                                 desc="Adam learning rate at the start (cosine decay to a tenth)")
    reg_weight = reg_weight_trait(DEFAULTS.fine.reg_weight)
    lncc_window = lncc_window_trait(DEFAULTS.fine.lncc_window)
    sampling_fraction = sampling_fraction_trait(DEFAULTS.fine.sampling_fraction)
    patch_stride = patch_stride_trait(DEFAULTS.fine.patch_stride)


class _FineINROutputSpec(TraitedSpec):
    model = traits.File(exists=True, desc="final velocity network checkpoint")
    displacement = traits.File(
        exists=True, desc="displacement on the fixed grid: ITK/ANTs field (LPS mm, (X, Y, Z, 1, 3)), "
        "warped(x) = moving(x + d(x)), read by antsApplyTransforms and nitransforms")
    warped_image = traits.File(exists=True, desc="moving image resampled onto the fixed grid (linear)")
    log = traits.File(exists=True, desc="CSV: iteration, loss, similarity, regularisation, seconds")


class FineINR(SimpleInterface):
    """Fine stage: continue a network on the full-resolution images; write the final field.

    With ``warm_start`` the network is a previous registration's of the same
    moving image (:func:`~nipype_inrlddmm.pipeline.warm_start_model`): this
    node is then the whole optimisation.

    When the moving image went through :class:`AffineInit`, the displacement
    maps the fixed grid into the *pre-aligned* moving image; to carry an
    original moving-space image yourself, compose it with the affine:
    ``antsApplyTransforms -i moving -r fixed -t displacement.nii.gz -t affine.txt``.

    Examples
    --------
    >>> from pathlib import Path
    >>> from nipype_inrlddmm.interfaces import FineINR
    >>> fine = FineINR(moving_image=str(data / "ct.nii.gz"), fixed_image=str(data / "cbct.nii.gz"),
    ...                init_model=coarse.model, iterations=5)
    >>> outputs = fine.run().outputs
    >>> Path(outputs.displacement).name, Path(outputs.warped_image).name
    ('displacement.nii.gz', 'warped.nii.gz')
    """

    input_spec = _FineINRInputSpec
    output_spec = _FineINROutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        with pipeline.torch_threads(inputs.num_threads):
            outputs = pipeline.run_fine(
                inputs.moving_image, inputs.fixed_image, inputs.init_model, runtime.cwd, stage_config(inputs, "fine"),
                fixed_mask=optional(inputs.fixed_mask), warm_start=inputs.warm_start, device=inputs.device,
                progress=progress_of(inputs),
            )
        self._results.update({name: str(path) for name, path in outputs.items()})
        return runtime
