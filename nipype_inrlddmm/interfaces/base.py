"""Input specs shared by the interfaces, and the trait <-> engine-config mapping.

Every default comes from :class:`nipype_inrlddmm.engine.RegistrationConfig`,
so the interfaces, :func:`nipype_inrlddmm.register` and the CLI agree.
"""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, isdefined, traits

from .. import __version__, engine
from ..options import HELP
from ..engine.similarity import SIMILARITIES
from ..engine.velocity import ACTIVATIONS, ENCODINGS

DEFAULTS = engine.RegistrationConfig()
_MODEL = DEFAULTS.model

#: StageConfig fields exposed by the image-matching stages (coarse, fine) and by the distillation.
IMAGE_STAGE_FIELDS = ("iterations", "learning_rate", "similarity", "lncc_window", "mind_distance_mm", "mind_radius_mm",
                      "mi_weight", "n_patches", "sampling_fraction", "patch_size", "patch_stride", "reg_weight",
                      "jacobian_weight", "outside_jacobian_weight", "jacobian_scale", "regularity_patches",
                      "convergence_window", "convergence_threshold")
DISTILL_FIELDS = ("iterations", "learning_rate", "batch_points", "reg_weight", "convergence_window",
                  "convergence_threshold")
MODEL_FIELDS = tuple(engine.ModelConfig.__dataclass_fields__)
#: Traits of each optimisation interface that map onto the engine configuration.
STAGE_TRAITS = {
    "coarse": IMAGE_STAGE_FIELDS + MODEL_FIELDS + ("coarse_factor", "velocity_window_mm", "seed"),
    "distill": DISTILL_FIELDS + ("fine_factor", "field_stride", "seed"),
    "fine": IMAGE_STAGE_FIELDS + ("fine_factor", "field_stride", "seed"),
}
_TOP_LEVEL = ("coarse_factor", "fine_factor", "field_stride", "velocity_window_mm", "seed")


def stage_inputs(config: engine.RegistrationConfig, stage: str) -> dict:
    """The interface inputs of ``stage`` ("coarse", "distill" or "fine") that reproduce ``config``."""
    stage_config = getattr(config, stage)
    inputs = {}
    for name in STAGE_TRAITS[stage]:
        if name in _TOP_LEVEL:
            inputs[name] = getattr(config, name)
        elif name in MODEL_FIELDS:
            inputs[name] = getattr(config.model, name)
        else:
            inputs[name] = getattr(stage_config, name)
    return inputs


def stage_config(inputs, stage: str) -> engine.RegistrationConfig:
    """The engine configuration that an interface's inputs describe (inverse of :func:`stage_inputs`)."""
    options = {}
    for name in STAGE_TRAITS[stage]:
        value = getattr(inputs, name)
        if name in _TOP_LEVEL or name in MODEL_FIELDS:
            options[name] = tuple(value) if isinstance(value, (list, tuple)) else value
        else:
            options[f"{stage}_{name}"] = value
    return engine.config_from_options(**options)


def optional(value):
    """A trait value, or None when it is undefined (what the file-level stages expect)."""
    return value if isdefined(value) else None


def per_axis_trait(default, desc: str):
    """An input that is None (set from the voxel size), one int >= 1 for all axes, or three of them."""
    return traits.Either(
        None, traits.Range(low=1), traits.Tuple(traits.Range(low=1), traits.Range(low=1), traits.Range(low=1)),
        default=default, usedefault=True, desc=desc,
    )


def field_stride_trait(desc: str):
    """A ``field_stride`` input: None (by the voxel size, as the training lattice), one int or three."""
    return per_axis_trait(
        DEFAULTS.field_stride,
        desc + "; None: per axis, the one closest to 4 mm and at least 2, the training lattice's spacing")


def reg_weight_trait(default):
    """The ``reg_weight`` input of an INR stage, whose default differs by stage."""
    return traits.Range(low=0.0, value=default, usedefault=True,
                        desc=HELP["reg_weight"])


def lncc_window_trait(default):
    """The ``lncc_window`` input of an image-matching stage, whose default differs by stage."""
    return traits.Range(low=1, value=default, usedefault=True,
                        desc="edge of the LNCC window, in voxels (at most the patch edge: windows lie inside patches)")


def sampling_fraction_trait(default):
    """The ``sampling_fraction`` input of an image-matching stage, whose default differs by stage."""
    return traits.Either(None, traits.Range(low=0.0, high=1.0, exclude_low=True), default=default, usedefault=True,
                         desc="draw as many patches as cover this fraction of the stage's grid per iteration, "
                         "at most n_patches; None: always n_patches")


def patch_stride_trait(default):
    """The ``patch_stride`` input of an image-matching stage, whose default differs by stage."""
    return per_axis_trait(
        default,
        "the flow is integrated on a lattice at most this many voxels apart (one for all axes, or three) "
        "in each patch and interpolated trilinearly in between; 1 integrates every voxel; None: per axis, the "
        "stride closest to 4 mm, at least 2")


def enum_values(default, choices) -> tuple:
    """Enum values with the engine's default first (a traits Enum defaults to its first value)."""
    return (default, *(c for c in choices if c != default))


class VersionedInputSpec(BaseInterfaceInputSpec):
    """Every interface hashes the package version: Nipype never hashes code."""

    version = traits.Str(
        __version__, usedefault=True,
        desc="nipype_inrlddmm version; hashed, so upgrading the package invalidates cached results",
    )


class ComputeInputSpec(VersionedInputSpec):
    """Settings of every interface that runs torch."""

    seed = traits.Int(DEFAULTS.seed, usedefault=True,
                      desc=HELP["seed"])
    num_threads = traits.Range(
        low=1, value=1, usedefault=True, nohash=True,
        desc="torch CPU threads; a Node reports it as n_procs so MultiProc never runs more "
        "threads than its n_procs (not hashed: it does not change the result's meaning)",
    )
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True,
                         desc="'auto' uses CUDA when present, else the CPU")


class OptimisationInputSpec(ComputeInputSpec):
    """Settings shared by the three INR stages."""

    reg_weight = reg_weight_trait(DEFAULTS.coarse.reg_weight)
    convergence_window = traits.Range(low=0, value=DEFAULTS.coarse.convergence_window, usedefault=True,
                                      desc=HELP["convergence_window"])
    convergence_threshold = traits.Range(low=0.0, value=DEFAULTS.coarse.convergence_threshold, usedefault=True,
                                         desc=HELP["convergence_threshold"])
    progress = traits.Bool(False, usedefault=True, nohash=True, desc="show a tqdm progress bar on stderr")
    progress_label = traits.Str(nohash=True, desc="name on the progress bar, e.g. the patient, so that the bars "
                                "of parallel nodes are told apart")


def progress_of(inputs):
    """What the engine's ``progress`` takes: False, True, or the bar's label."""
    return inputs.progress and (optional(inputs.progress_label) or True)


class DenseFieldInputSpec(BaseInterfaceInputSpec):
    """Stages that integrate the dense field on the full fixed grid (distillation, fine)."""

    field_stride = field_stride_trait(
        "voxel stride (one for all axes, or three) at which the dense field is integrated before trilinear "
        "interpolation to every voxel")
    fine_factor = per_axis_trait(
        DEFAULTS.fine_factor,
        "block size (one for all axes, or three) by which the fixed image is averaged for the distillation "
        "and the fine stage; None: per axis, the one closest in ratio to 2 mm voxels, at least 1")


class ImageStageInputSpec(OptimisationInputSpec):
    """Inputs of a stage that matches images (coarse and fine)."""

    moving_image = traits.File(exists=True, mandatory=True,
                               desc="moving image (NIfTI), any grid: it is sampled through its own affine")
    fixed_image = traits.File(exists=True, mandatory=True,
                              desc="fixed image (NIfTI); the displacement lives on its grid")
    fixed_mask = traits.File(exists=True, mandatory=False,
                             desc="mask on the fixed grid: patches are drawn inside it "
                             "(body, lungs, CBCT field of view)")
    similarity = traits.Enum(*enum_values(DEFAULTS.coarse.similarity, SIMILARITIES), usedefault=True,
                             desc=HELP["similarity"])
    lncc_window = lncc_window_trait(DEFAULTS.coarse.lncc_window)
    mind_distance_mm = traits.Range(low=0.0, value=DEFAULTS.coarse.mind_distance_mm, exclude_low=True,
                                    usedefault=True,
                                    desc=HELP["mind_distance_mm"])
    mind_radius_mm = traits.Range(low=0.0, value=DEFAULTS.coarse.mind_radius_mm, exclude_low=True, usedefault=True,
                                  desc=HELP["mind_radius_mm"])
    mi_weight = traits.Range(low=0.0, value=DEFAULTS.coarse.mi_weight, usedefault=True,
                             desc=HELP["mi_weight"])
    n_patches = traits.Range(low=1, value=DEFAULTS.coarse.n_patches, usedefault=True,
                             desc="patches of the fixed grid drawn at each iteration (with sampling_fraction: at "
                             "most)")
    sampling_fraction = sampling_fraction_trait(DEFAULTS.coarse.sampling_fraction)
    jacobian_weight = traits.Range(low=0.0, value=DEFAULTS.coarse.jacobian_weight, usedefault=True,
                                   desc=HELP["jacobian_weight"])
    outside_jacobian_weight = traits.Either(None, traits.Range(low=0.0),
                                            default=DEFAULTS.coarse.outside_jacobian_weight, usedefault=True,
                                            desc=HELP["outside_jacobian_weight"])
    jacobian_scale = traits.Range(low=0.0, exclude_low=True, value=DEFAULTS.coarse.jacobian_scale, usedefault=True,
                                  desc=HELP["jacobian_scale"])
    regularity_patches = traits.Range(low=0, value=DEFAULTS.coarse.regularity_patches, usedefault=True,
                                      desc="with a fixed mask, patches drawn outside it at each iteration for the "
                                      "penalties alone, so the field stays smooth away from the anatomy (none "
                                      "without a mask: the image patches cover the grid)")
    patch_size = traits.Range(low=1, value=DEFAULTS.coarse.patch_size, usedefault=True,
                              desc="patch edge in voxels")


class ModelInputSpec(BaseInterfaceInputSpec):
    """The velocity-network architecture: chosen by the coarse stage, then read from checkpoints."""

    width = traits.Either(None, traits.Range(low=1), default=_MODEL.width, usedefault=True, desc=HELP["width"])
    depth = traits.Range(low=1, value=_MODEL.depth, usedefault=True, desc=HELP["depth"])
    encoding = traits.Enum(*enum_values(_MODEL.encoding, ENCODINGS), usedefault=True,
                           desc=HELP["encoding"])
    n_frequencies = traits.Range(low=1, value=_MODEL.n_frequencies, usedefault=True,
                                 desc="number of Fourier features (fourier encoding)")
    sigma = traits.Range(low=0.0, exclude_low=True, value=_MODEL.sigma, usedefault=True,
                         desc="std of the Fourier frequencies, in cycles per image half-extent")
    omega0 = traits.Range(low=0.0, exclude_low=True, value=_MODEL.omega0, usedefault=True,
                          desc="frequency scale of the sine layers (siren encoding)")
    activation = traits.Enum(*enum_values(_MODEL.activation, ACTIVATIONS), usedefault=True,
                             desc="hidden activation (fourier and none encodings)")
    n_steps = traits.Range(low=1, value=_MODEL.n_steps, usedefault=True,
                           desc=HELP["n_steps"])
