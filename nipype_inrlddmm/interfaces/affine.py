"""Rigid/affine pre-alignment, or an existing ITK/ANTs affine, applied by rewriting the header."""

from __future__ import annotations

from nipype.interfaces.base import SimpleInterface, TraitedSpec, traits

from .. import pipeline
from ..engine.affine import STARTS, TRANSFORMS, AffineConfig
from .base import ComputeInputSpec, enum_values, optional

_AFFINE = AffineConfig()


class _AffineInitInputSpec(ComputeInputSpec):
    moving_image = traits.File(exists=True, mandatory=True, desc="moving image (NIfTI)")
    fixed_image = traits.File(exists=True, mandatory=True, desc="fixed image (NIfTI)")
    moving_labels = traits.File(exists=True, mandatory=False,
                                desc="label map on the moving grid, given the same new header")
    fixed_mask = traits.File(exists=True, mandatory=False, desc="mask on the fixed grid: only its voxels are compared")
    in_transform = traits.File(
        exists=True, mandatory=False,
        desc="use this affine instead of estimating one: ITK text (.txt/.tfm) or ANTs (.mat, e.g. "
        "antsRegistration's ``*0GenericAffine.mat``), mapping fixed to moving points",
    )
    transform = traits.Enum(*enum_values(_AFFINE.transform, TRANSFORMS), usedefault=True,
                            desc="what to estimate: affine (12 parameters) or rigid (6)")
    start = traits.Enum(*enum_values(_AFFINE.start, STARTS), usedefault=True,
                        desc="starting transform: align the centres of mass (moments), the grid centres "
                        "(geometry; images cropped around the same anatomy) or nothing (identity)")
    shrink_factors = traits.List(traits.Range(low=1), value=list(_AFFINE.shrink_factors), usedefault=True,
                                 minlen=1, desc="pyramid block sizes, coarse to fine")
    iterations = traits.List(traits.Range(low=0), value=list(_AFFINE.iterations), usedefault=True, minlen=1,
                             desc="Adam steps at each pyramid level (one per shrink factor)")
    learning_rate = traits.Range(low=0.0, exclude_low=True, value=_AFFINE.learning_rate, usedefault=True,
                                 desc="Adam learning rate (radians, linear distortion, image half-extents)")
    max_points = traits.Range(low=1, value=_AFFINE.max_points, usedefault=True,
                              desc="fixed voxels compared per step (a random subset when there are more)")


class _AffineInitOutputSpec(TraitedSpec):
    aligned_image = traits.File(exists=True, desc="the moving voxels with the header inv(A) @ moving_affine")
    aligned_labels = traits.File(exists=True, desc="the moving labels with the same header (when given)")
    transform = traits.File(exists=True, desc="A as an ITK text transform (fixed -> moving points, LPS)")


class AffineInit(SimpleInterface):
    """Pre-align the moving image to the fixed image with a global affine ``A``.

    Convention: ``A`` maps a fixed-image world point (RAS mm) to the moving
    world point that matches it (``aligned(x) = moving(A x)``), the same
    direction as the displacement fields and as ITK/ANTs transforms.  ``A``
    is estimated by global NCC on an image pyramid (starting from aligned
    centres of mass, or of the grids), or read from ``in_transform``.
    Global NCC suits pairs of similar contrast (T1 -> T1 template, CT ->
    CT); across modalities (MR -> ultrasound) prefer ``iterations=[0]``
    with ``shrink_factors=[1]``: the starting translation alone.

    The moving image is **not resampled**: its voxels are written unchanged
    with the voxel -> world matrix ``inv(A) @ moving_affine``, so in world
    space it lies on the fixed image and the deformable stages start from
    there, without interpolation blur.  The labels get the same header.

    A registration run on ``aligned_image`` gives a displacement ``d`` with
    ``warped(x) = original_moving(A (x + d(x)))``.  Images carried by our
    workflow (warped image, warped labels) already include ``A``; to apply
    the result to the original moving image with ANTs, list both transforms:
    ``antsApplyTransforms -i moving -r fixed -t displacement.nii.gz -t affine.txt``.
    (An affine with shear cannot be stored in a NIfTI qform: readers that
    ignore the sform, such as some ITK versions, should use ``transform``
    with the original image instead.)

    Examples
    --------
    >>> import numpy as np
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.interfaces import AffineInit
    >>> shifted = np.eye(4); shifted[:3, 3] = (10.0, -5.0, 0.0)  # the same CT, moved 10 mm right, 5 mm back
    >>> image, affine = io.load_image(data / "ct.nii.gz")
    >>> moving = io.save_image("moved.nii.gz", image, shifted @ affine)
    >>> init = AffineInit(moving_image=str(moving), fixed_image=str(data / "ct.nii.gz"), transform="rigid",
    ...                   iterations=[100, 50, 0])
    >>> result = init.run()
    >>> (np.round(io.load_itk_affine(result.outputs.transform)[:3, 3]) + 0.0).tolist()  # + 0.0: no "-0.0"
    [10.0, -5.0, 0.0]
    """

    input_spec = _AffineInitInputSpec
    output_spec = _AffineInitOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        config = AffineConfig(transform=inputs.transform, start=inputs.start,
                              shrink_factors=tuple(inputs.shrink_factors), iterations=tuple(inputs.iterations),
                              learning_rate=inputs.learning_rate, max_points=inputs.max_points)
        with pipeline.torch_threads(inputs.num_threads):
            outputs = pipeline.affine_init(
                inputs.moving_image, inputs.fixed_image, runtime.cwd, moving_labels=optional(inputs.moving_labels),
                fixed_mask=optional(inputs.fixed_mask), transform_file=optional(inputs.in_transform), config=config,
                seed=inputs.seed, device=inputs.device,
            )
        self._results.update({name: str(path) for name, path in outputs.items()})
        return runtime
