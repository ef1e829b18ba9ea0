"""Out-of-memory guard: estimate a stage's peak memory and refuse, with advice, what cannot fit.

A volume too large for the machine should fail in a second with a message
saying what to change, not hours later (or by taking the machine down with
it).  The estimate is cheap (arithmetic on shapes and settings) and was
calibrated against the peak resident memory of each stage on this package's
phantoms, 86 k to 10.7 M voxels, where it errs on the high side by 0-20 %:

* a fixed overhead (torch kernels, thread pools);
* the images as float32, raw and normalised, and with ``similarity="mind"``
  their descriptors on the stage's grid (:func:`~.similarity.mind_ssc`);
* the larger of the training batch (activations of every Euler step kept
  for the backward pass) and the dense-field evaluation on the fixed grid
  (the integration sub-grid at ``field_stride``, the trilinear upsampling,
  the warp of the moving image, the write).

The distillation integrates nothing on the fixed grid (the fine stage needs
only its weights), so its estimate is the overhead, the fixed image it reads
and the training batch: 0.27 / 0.29 GB at 86 k / 6.3 M voxels, where its peak
rose 0.15 / 0.19 GB above the 0.30 GB of the imports (phantoms, 2 threads).

The caller says how much memory is available
(:func:`nipype_inrlddmm.host.available_memory` reads it from the system).
Set the environment variable ``INRLDDMM_NO_MEMORY_CHECK=1`` to skip the
check (e.g. where the available memory cannot be read reliably).
"""

from __future__ import annotations

import math
import os

import torch

from .sampling import MIN_AUTOMATIC_STRIDE, per_axis_strides

#: Environment variable that disables :func:`check_memory`.
SKIP_VARIABLE = "INRLDDMM_NO_MEMORY_CHECK"
_OVERHEAD = 150e6  # bytes: torch's lazily created kernels and thread pools
_TRAIN_FACTOR = 1.5  # activations saved for backward, plus gradients and optimiser transients
_DENSE_CHUNK = 65536  # points per network call in flow.dense_displacement
#: Bytes per fixed-grid voxel of the full-resolution dense field, beyond the integration sub-grid.
_FIELD_BYTES = {"coarse": 100.0, "fine": 110.0}
_SUBGRID_BYTES = 36.0  # per integrated point: its index, world position and displacement
#: Bytes per image voxel: float32 raw and normalised, plus one transient copy (quantiles, block averages).
_IMAGE_BYTES = 12.0
#: Bytes per fixed-grid voxel of the distillation, which reads the fixed image for its grid (measured: 6).
_DISTILL_IMAGE_BYTES = 8.0
#: Bytes per stage-grid voxel of an image's MIND-SSC descriptors: 13 float32 channels kept (the intensity
#: and 12 descriptors), and while the larger image's are computed, their shifted differences and box means
#: (measured: a peak of 212 on a 200^3 grid).
_DESCRIPTOR_BYTES, _DESCRIPTOR_PEAK_BYTES = 52.0, 215.0
_STAGES = ("coarse", "distill", "fine")


class InsufficientMemoryError(MemoryError):
    """A stage would need more memory than is available; the message says what to change."""


def _training_bytes(points: int, model) -> float:
    per_point_step = 3 * model.width * model.depth + 20  # floats kept per point and Euler step
    return points * model.n_steps * per_point_step * 4 * _TRAIN_FACTOR


def _model(config, fixed_shape):
    """``config.model``, an automatic width sized as if the fine grid were the fixed grid, which it never
    exceeds: at most the width the registration gets."""
    return config.model.sized(math.prod(int(n) for n in fixed_shape))


def _subgrid_points(shape, stride) -> int:
    """Points of the dense field's integration sub-grid; for stride None (set by the voxel size), the
    automatic stride's smallest, so the count is an upper bound."""
    strides = per_axis_strides(MIN_AUTOMATIC_STRIDE if stride is None else stride)
    return math.prod(len(range(0, n, s)) + (1 if (n - 1) % s else 0) for n, s in zip(shape, strides))


def _training_grid(stage: str, fixed_shape, config) -> list[int]:
    """The largest grid an image-matching stage can train on for ``fixed_shape``: the fixed grid
    itself for the fine stage (its automatic factor, set by the voxel size, can be 1), the grid
    at ``coarse_factor`` for the coarse stage, whose automatic factors are at least 2."""
    if stage == "fine":
        return [int(n) for n in fixed_shape]
    factor = config.coarse_factor
    factors = (factor or 2,) * 3 if factor is None or isinstance(factor, int) else factor
    return [-(-int(n) // int(f)) for n, f in zip(fixed_shape, factors)]


def _descriptor_bytes(stage_voxels: int, fixed_voxels: int, moving_voxels: int) -> float:
    """The MIND-SSC descriptors of both images on a stage grid of ``stage_voxels`` fixed voxels; the
    moving image's grid is taken to shrink by the same ratio as the fixed one (an equal target in mm)."""
    moving_stage = moving_voxels * stage_voxels / fixed_voxels
    return _DESCRIPTOR_BYTES * (stage_voxels + moving_stage) + _DESCRIPTOR_PEAK_BYTES * max(stage_voxels,
                                                                                              moving_stage)


def estimate_memory(stage: str, fixed_shape, config, *, moving_shape=None) -> dict[str, float]:
    """Peak memory of one stage, in bytes, by part.

    Parameters
    ----------
    stage : ``"coarse"``, ``"distill"`` or ``"fine"``.
    fixed_shape : the fixed (full-resolution) grid.
    config : :class:`~nipype_inrlddmm.engine.RegistrationConfig`.
    moving_shape : the moving image's grid (coarse and fine stages).

    Returns ``{"overhead", "images", "training", "field", "total"}``, with
    ``total = overhead + images + max(training, field)`` (the training batch
    is freed before the dense field is evaluated); ``field`` is 0 for the
    distillation.
    """
    if stage not in _STAGES:
        raise ValueError(f"stage must be 'coarse', 'distill' or 'fine', got {stage!r}")
    fixed_voxels = math.prod(int(n) for n in fixed_shape)
    moving_voxels = math.prod(int(n) for n in (moving_shape or fixed_shape))
    model = _model(config, fixed_shape)
    chunk = min(_DENSE_CHUNK, fixed_voxels) * (3 * model.width + 20) * 4
    if stage == "coarse":
        grid = _training_grid("coarse", fixed_shape, config)
        images = _IMAGE_BYTES * (fixed_voxels + moving_voxels)
        training = _training_bytes(config.coarse.flow_points(grid), model)
        field = _FIELD_BYTES["coarse"] * math.prod(grid) + chunk
    elif stage == "distill":
        images = _DISTILL_IMAGE_BYTES * fixed_voxels
        # The distillation's grid is at most the fixed grid: the points drawn there bound its batch.
        training = _training_bytes(config.distill.points(fixed_shape), model)
        field = 0.0
    else:
        images = _IMAGE_BYTES * (fixed_voxels + moving_voxels)
        # Without the voxel size, the automatic lattice stride's largest point count.
        training = _training_bytes(config.fine.flow_points(_training_grid("fine", fixed_shape, config)), model)
        field = (_FIELD_BYTES["fine"] * fixed_voxels
                 + _SUBGRID_BYTES * _subgrid_points(fixed_shape, config.field_stride) + chunk)
    if stage != "distill" and getattr(config, stage).similarity == "mind":
        stage_grid = fixed_shape if stage == "fine" else _training_grid("coarse", fixed_shape, config)
        images += _descriptor_bytes(math.prod(int(n) for n in stage_grid), fixed_voxels, moving_voxels)
    parts = {"overhead": _OVERHEAD, "images": images, "training": training, "field": field}
    parts["total"] = _OVERHEAD + images + max(training, field)
    return parts


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def check_memory(stage: str, fixed_shape, config, *, moving_shape=None, device="cpu", available=None,
                 source=None) -> dict[str, float]:
    """Refuse a stage that would not fit in memory, before it allocates anything.

    ``available`` is the bytes this process can still allocate on
    ``device`` (named in the message), as the caller found them: the engine
    reads no files, :func:`nipype_inrlddmm.host.available_memory` does.
    When it is None (unknown), or ``INRLDDMM_NO_MEMORY_CHECK=1``, the check
    passes.  ``source`` (e.g. the fixed image's path) starts the message.
    Returns the estimate (:func:`estimate_memory`).

    Raises
    ------
    InsufficientMemoryError
        naming the estimate, what is available, the part that dominates and
        the settings that reduce it.
    """
    parts = estimate_memory(stage, fixed_shape, config, moving_shape=moving_shape)
    if os.environ.get(SKIP_VARIABLE, "").strip() not in ("", "0"):
        return parts
    if available is None or parts["total"] <= available:
        return parts
    shape = "x".join(str(int(n)) for n in fixed_shape)
    if parts["training"] >= parts["field"]:
        stage_config = getattr(config, stage)
        fraction = "sampling_fraction, " if stage_config.sampling_fraction is not None else ""
        batch = fraction + ("batch_points" if stage == "distill" else
                            "n_patches, regularity_patches or patch_size (or raise patch_stride)")
        stride, grid = stage_config.patch_stride, _training_grid(stage, fixed_shape, config)
        lattice = f"the flow every {stride} voxels" if stride else "the flow on a lattice about 4 mm apart"
        points = (f"{stage_config.points(fixed_shape)} points" if stage == "distill" else
                  f"{stage_config.patches(grid)} patches of {stage_config.patch_size}^3 voxels and "
                  f"{stage_config.regularity_patch_count(grid)} regularity patches, "
                  f"{lattice}")
        culprit = f"the training batch ({points}, x {config.model.n_steps} steps, {_gb(parts['training'])})"
        width = _model(config, fixed_shape).width
        advice = (f"lower {batch} of the {stage} stage, or the network's width ({width}) or "
                  f"n_steps ({config.model.n_steps})")
    else:
        culprit = f"the dense field and warp on the {shape} fixed grid ({_gb(parts['field'])})"
        advice = ("crop or downsample the fixed image (the field lives on its grid)"
                  + (", or raise coarse_factor" if stage == "coarse" else
                     f", or raise field_stride (now {config.field_stride or 'set by the voxel size'}) to integrate "
                     "fewer points"))
    message = (
        f"the {stage} stage on a {shape} fixed grid needs about {_gb(parts['total'])} of memory, "
        f"{_gb(available)} is available on {torch.device(device).type}; most of it is {culprit}. "
        f"To fit: {advice}; or run where more memory is free (e.g. a SLURM node with a larger --mem). "
        f"Set {SKIP_VARIABLE}=1 to run anyway."
    )
    raise InsufficientMemoryError(f"{source}: {message}" if source else message)
