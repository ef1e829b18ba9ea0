"""Pure-PyTorch INR-LDDMM: tensors in, tensors out; no files, no Nipype."""

from .flow import dense_displacement, dense_path, integrate, integrate_backward, path_at_times, resample_field
from .grid import apply_affine, block_grid, downsample, sample, world_grid
from .memory import InsufficientMemoryError, check_memory, estimate_memory
from .stages import (
    RegistrationConfig,
    RegistrationResult,
    StageResult,
    coarse_stage,
    config_from_options,
    distill_stage,
    fine_stage,
    new_velocity_field,
    normalise_intensity,
    option_values,
    register_volumes,
    resolve_device,
    sized_config,
    stage_factors,
    warm_config,
    warm_start_mismatch,
    warp,
)
from .optimise import DivergenceError, StageConfig, fit_field, fit_images, relative_decrease
from .velocity import ModelConfig, VelocityField

__all__ = [
    "DivergenceError", "InsufficientMemoryError", "check_memory", "estimate_memory", "ModelConfig",
    "RegistrationConfig", "RegistrationResult", "StageConfig", "StageResult", "VelocityField", "apply_affine",
    "block_grid", "coarse_stage", "config_from_options", "dense_displacement", "dense_path", "distill_stage",
    "downsample", "fine_stage", "fit_field", "fit_images", "integrate", "integrate_backward", "relative_decrease",
    "new_velocity_field", "option_values", "path_at_times", "normalise_intensity", "register_volumes", "resample_field",
    "resolve_device", "sample", "sized_config", "stage_factors", "warm_config", "warm_start_mismatch", "warp",
    "world_grid",
]
