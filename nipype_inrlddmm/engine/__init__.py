"""INR-LDDMM in PyTorch (and scipy's distance transform for the velocity's window): tensors in, tensors out;
no files, no Nipype."""

from .flow import dense_displacement, dense_path, integrate, integrate_backward, path_at_times, resample_field
from .grid import apply_affine, block_grid, downsample, sample, world_grid
from .memory import InsufficientMemoryError, check_memory, estimate_memory
from .stages import (
    FOREGROUND,
    RegistrationConfig,
    RegistrationResult,
    StageResult,
    coarse_stage,
    config_from_options,
    distill_stage,
    fine_stage,
    foreground,
    new_velocity_field,
    normalise_intensity,
    option_values,
    register_volumes,
    resample,
    resolve_device,
    sized_config,
    stage_factors,
    velocity_window,
    warm_config,
    warm_start_mismatch,
    warp,
)
from .optimise import DivergenceError, StageConfig, fit_field, fit_images, relative_decrease
from .velocity import ModelConfig, VelocityField

__all__ = [
    "apply_affine", "block_grid", "check_memory", "coarse_stage", "config_from_options", "dense_displacement",
    "dense_path", "distill_stage", "DivergenceError", "downsample", "estimate_memory", "fine_stage", "fit_field",
    "fit_images", "FOREGROUND", "foreground", "InsufficientMemoryError", "integrate", "integrate_backward",
    "ModelConfig", "new_velocity_field", "normalise_intensity", "option_values", "path_at_times",
    "register_volumes", "RegistrationConfig", "RegistrationResult", "relative_decrease", "resample",
    "resample_field", "resolve_device", "sample", "sized_config", "stage_factors", "StageConfig", "StageResult",
    "velocity_window", "VelocityField", "warm_config", "warm_start_mismatch", "warp", "world_grid",
]
