"""Coarse-to-fine INR-LDDMM on tensors (Algorithm 2 of the paper).

Each stage is a function that the Nipype interfaces call on their own:
:func:`coarse_stage` -> :func:`distill_stage` -> :func:`fine_stage`;
:func:`register_volumes` chains them.  Volumes are ``(X, Y, Z)`` tensors with
``(4, 4)`` voxel -> world (mm, RAS) affines; moving and fixed may differ in
shape, spacing and orientation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .flow import dense_displacement
from .grid import (
    apply_affine, block_grid, bounding_box, downsample, grid_coordinates, labels_at_indices, matching_factors,
    sample_grid, spacing, world_grid,
)
from .memory import check_memory
from .sampling import checked_stride
from .optimise import StageConfig, fit_field, fit_images
from .velocity import ModelConfig, VelocityField
from .window import checked_radii, mask_window


@dataclass(frozen=True)
class RegistrationConfig:
    """All settings of a coarse-to-fine registration.

    ``coarse_factor`` is the block size (per axis, or one int for all) by
    which both images are averaged for the coarse stage, ``fine_factor`` the
    same for the distillation and the fine stage; None picks them from the
    voxel size (:func:`stage_factors`).  ``field_stride``
    is the voxel stride (one int, or one per axis) at which the final dense
    field is integrated before trilinear interpolation to every voxel; None
    picks it from the voxel size as the training lattice's
    (:func:`~.sampling.lattice_strides`: per axis closest to 4 mm, at least
    2).  The fine stage fits the similarity to the field interpolated from a
    lattice about 4 mm apart, so the field between those points is
    unconstrained; interpolated from the same spacing, it is the field the
    training saw, at a fraction of every voxel's work on 1 mm grids
    (docs/decisions.md, "Dense field").  ``warm_iterations``,
    ``warm_learning_rate`` and ``warm_regularity_patches`` replace the fine
    stage's when it continues a given network (:func:`register_volumes`
    with ``initial``, :func:`warm_config`).  With a fixed mask,
    ``velocity_window_mm`` ``(inner, outer)`` confines the velocity to the
    anatomy (:mod:`.window`): the network's within ``inner`` mm of the mask
    and the moving image's foreground, tapering to its output bias alone at
    ``outer`` mm, where the field is one translation; None leaves it
    unconfined.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    coarse_factor: tuple[int, int, int] | int | None = None
    fine_factor: tuple[int, int, int] | int | None = None
    # Iterations lean on the fine stage (100 / 50 / 225): at the same budget that beat a longer coarse
    # stage on every set, and 225 fine iterations keep the network within SyN's time on a 2-core CPU
    # at the same Dice as 300.  The coarse stage's flow lattice is 3 voxels apart (5^3 points a patch,
    # 9 mm at 3 mm voxels): as accurate as stride 2 for a third of the network points.  The coarse patches
    # cover a third of the coarse grid per iteration, at most 48: smaller grids draw fewer, not several
    # times their volume in patches.  Figures: docs/decisions.md ("Stages", "Points per iteration").
    coarse: StageConfig = field(default_factory=lambda: StageConfig(iterations=100, patch_stride=3,
                                                                    sampling_fraction=1 / 3))
    # The distillation's learning rate is 1.5e-3: at omega_0 22.5, 2e-3 fitted a given coarse field less
    # closely than the half voxel tests/engine/test_registration.py asks.  It draws 1/64 of the fine grid per
    # iteration, at most 8192 points: large grids keep 8192, small ones draw fewer in less time with the
    # same Dice.  Figures: docs/decisions.md.
    distill: StageConfig = field(default_factory=lambda: StageConfig(iterations=50, learning_rate=1.5e-3,
                                                                     sampling_fraction=1 / 64))
    # The fine stage's velocity penalty is 2e-4 (1e-4 elsewhere): the same mean Dice and TRE, with every
    # seed under 0.1 % folding before the Jacobian penalty.  Its patches cover a tenth of its grid per
    # iteration, at most 48 (sampling_fraction), as ANTs samples a fraction of the image: the cost follows
    # the image up to the brains' 48, never past it.  Its correlation windows span 11 of a patch's 12
    # voxels (5 in the coarse stage, at 3 mm): the same Dice with a smoother field.  It starts from 7e-4:
    # under the velocity window, the brains' Dice rose by about 0.002 over 1e-3, their fields still smoother
    # than SyN's.  Figures: docs/decisions.md.
    fine: StageConfig = field(default_factory=lambda: StageConfig(iterations=225, learning_rate=7e-4, reg_weight=2e-4,
                                                                  lncc_window=11, sampling_fraction=0.1))
    field_stride: int | tuple[int, int, int] | None = None
    # A warm start (register_volumes with an initial field) runs the fine stage alone, this many iterations
    # from a lower learning rate than a cold fine stage's: the network holds a whole field already, which the
    # full rate scatters before it refines it.  200 iterations with the fine stage's regularity patches are the
    # fewest measured that kept every fraction of a phantom course at or above the Dice of a registration
    # from scratch, on two registration seeds (before the cold fine stage moved to 7e-4; since, the warm
    # start trails it by a few ten-thousandths).  Without the regularity patches an iteration integrates two
    # thirds of the points, and 125 iterations matched the cold Dice on one seed in 0.53 x its time, but
    # fell below it on some fractions of another seed and of another patient.  From 5e-4 rather than 3e-4
    # the warm start came closer to the cold Dice on three courses, and nowhere further.  Figures:
    # docs/decisions.md ("Warm start over a course").
    warm_iterations: int = 200
    warm_learning_rate: float = 5e-4
    warm_regularity_patches: int = 24
    # Around the brains' head masks 5-25 mm raised the Dice leads over SyN to about 0.02 at a lower SDlogJ, and
    # around a CBCT's field of view it kept the Dice with a field still smoother than ANTs' (a wider window
    # lost the brains' gain).  Figures: docs/decisions.md ("Regularity").
    velocity_window_mm: tuple[float, float] | None = (5.0, 25.0)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "field_stride", checked_stride(self.field_stride, "field_stride"))
        if self.velocity_window_mm is not None:
            inner, outer = self.velocity_window_mm
            object.__setattr__(self, "velocity_window_mm", checked_radii(inner, outer, "velocity_window_mm"))
        if self.warm_iterations < 0 or not self.warm_learning_rate > 0 or self.warm_regularity_patches < 0:
            raise ValueError(f"warm_iterations and warm_regularity_patches must be 0 or more and "
                             f"warm_learning_rate positive, got {self.warm_iterations}, "
                             f"{self.warm_regularity_patches} and {self.warm_learning_rate}")


@dataclass
class StageResult:
    """A trained velocity field and the dense displacement it gives on a grid."""

    velocity: VelocityField
    displacement: torch.Tensor | None  # (X, Y, Z, 3) mm, RAS; None when not integrated (distill_stage)
    affine: torch.Tensor  # the grid of `displacement`
    log: list[dict]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when present, else CPU; ``"cpu"``/``"cuda"`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but no CUDA device is available")
    return torch.device(device)


def normalise_intensity(volume: torch.Tensor, low: float = 0.005, high: float = 0.995) -> torch.Tensor:
    """Clip to the ``low``/``high`` quantiles and rescale to [0, 1].

    Keeps similarity values and learning rates comparable across CT (HU),
    MR and ultrasound intensities.
    """
    flat = volume.reshape(-1)
    lo = flat.kthvalue(max(1, int(low * flat.numel()))).values
    hi = flat.kthvalue(max(1, int(high * flat.numel()))).values
    if hi <= lo:
        raise ValueError("the image is constant (after clipping outliers): nothing to register")
    return ((volume - lo) / (hi - lo)).clamp(0, 1)


def new_velocity_field(shape, affine: torch.Tensor, config: ModelConfig, seed: int, *,
                       window: tuple[torch.Tensor, torch.Tensor] | None = None) -> VelocityField:
    """A freshly initialised (identity) field normalised to a grid's bounding box, with an optional
    ``window`` (:class:`~.velocity.VelocityField`)."""
    low, high = bounding_box(shape, affine)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        velocity = VelocityField((low + high) / 2, ((high - low) / 2).clamp(min=1.0), config, window=window)
    return velocity.to(affine.device)


def velocity_window(config: RegistrationConfig, fixed_mask, fixed_affine: torch.Tensor, moving=None,
                    moving_affine=None):
    """The window (:func:`~.window.mask_window`) around the anatomy on the fine stage's grid; None without a
    mask, with one of the whole grid, or with ``config.velocity_window_mm`` None.

    The anatomy is ``fixed_mask`` as the fine stage sees it, joined by
    the ``moving`` image's foreground (normalised intensity above
    :data:`FOREGROUND`) where that lies on the grid: a mask of the
    anatomy (a head) is then all there is, but a field of view that cuts
    through the body (a CBCT's) does not stop the tissue beyond it, which
    the moving image shows, from moving in.  The taper is many of the fine
    grid's voxels wide, and there the distance transform takes a tenth of
    its time on a 1 mm grid.
    """
    if fixed_mask is None or config.velocity_window_mm is None or bool(fixed_mask.all()):
        return None
    factors = stage_factors(config.fine_factor, fixed_affine, "fine", fixed_mask.shape)
    anatomy, affine = _stage_mask(fixed_mask, fixed_affine, factors)
    if moving is not None:
        anatomy = anatomy | (resample(moving, moving_affine, anatomy.shape, affine) > FOREGROUND)
    return mask_window(anatomy, affine, *config.velocity_window_mm)


#: Normalised intensity (:func:`normalise_intensity`) above which a voxel of the moving image shows anatomy
#: for the velocity's window (:func:`velocity_window`): above air and the background's noise.
FOREGROUND = 0.05


def foreground(volume: torch.Tensor) -> torch.Tensor:
    """Where ``volume`` shows anatomy: bool, its shape; its normalised intensity above :data:`FOREGROUND`, the
    rule the velocity's window applies to the moving image (a head mask of an MR)."""
    return normalise_intensity(volume) > FOREGROUND


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


#: Voxel sizes (mm) the coarse and the fine stage aim at when their factors are None.
COARSE_SPACING_MM = 3.0
FINE_SPACING_MM = 2.0
#: Voxels per axis an automatic factor leaves a stage's grid (unless the factor's minimum takes more).
MIN_STAGE_VOXELS = 24


def stage_factors(factor, fixed_affine: torch.Tensor, stage: str, shape) -> tuple[int, int, int]:
    """Block sizes (per fixed-grid axis) by which a stage averages the fixed image of ``shape``.

    ``factor`` is one int, three ints, or None: then, per axis, the block
    size that brings the voxel closest in ratio (``|log(f * voxel /
    target)|`` smallest: pyramid levels are a geometric series) to
    :data:`FINE_SPACING_MM` or twice the finest voxel, whichever is larger
    (at least 1), for the ``"fine"`` stage and its distillation, and to
    :data:`COARSE_SPACING_MM` or 1.5 times the fine stage's target (at least
    2) for the ``"coarse"`` stage, one pyramid level above it, as ANTs'
    SyN stops at half resolution: on grids of coarse voxels (a CT at 3 mm)
    the fine stage then costs what their size asks, not what a 1 mm brain's
    2 mm grid does, with the same Dice.  The 3 mm and 2 mm targets were the
    best of the resolutions measured on a 1 mm brain pair.  Closest in ratio
    rather than in mm sends 1.366 mm axes to 2.73 mm rather than 1.37 mm
    (it changes the fine factor only in narrow bands: 1.33-1.41 mm,
    0.80-0.82 mm, ...), where the fine patches cover 4 x the volume, with a
    higher lung Dice.  Figures: docs/decisions.md ("Stages").

    An automatic factor also leaves the stage's grid at least
    :data:`MIN_STAGE_VOXELS` voxels per axis (two patch edges, unless
    the stage's minimum factor takes more): on a field of view a few
    centimetres across (prostate ultrasound at 0.4 mm, 44 voxels) 2 mm
    voxels leave a grid no larger than one patch, whose lattice then sits on
    the same few knots at every iteration, and the field between them, never
    seen, folded.
    """
    if factor is None:
        sizes = spacing(fixed_affine).tolist()
        fine_target = max(FINE_SPACING_MM, 2 * min(sizes))
        target, minimum = ((max(COARSE_SPACING_MM, 1.5 * fine_target), 2) if stage == "coarse"
                           else (fine_target, 1))
        closest = [max(minimum, min(range(1, math.ceil(target / size) + 1),
                                    key=lambda f: abs(math.log(f * size / target))))
                   for size in sizes]
        return tuple(min(f, max(minimum, int(n) // MIN_STAGE_VOXELS)) for f, n in zip(closest, shape))
    factors = (factor,) * 3 if isinstance(factor, int) else tuple(factor)
    if len(factors) != 3 or any(int(f) < 1 for f in factors):
        raise ValueError(f"{stage}_factor must be None, a positive int or three of them, got {factor!r}")
    return tuple(int(f) for f in factors)


def fine_grid(config: RegistrationConfig, fixed_shape, fixed_affine: torch.Tensor):
    """``(shape, (4, 4) affine)`` of the grid the distillation and the fine stage work on: the fixed grid in
    blocks of ``fine_factor`` (:func:`stage_factors`)."""
    return block_grid(fixed_shape, fixed_affine, stage_factors(config.fine_factor, fixed_affine, "fine", fixed_shape))


def sized_config(config: RegistrationConfig, fixed_shape, fixed_affine: torch.Tensor) -> RegistrationConfig:
    """``config`` with its network sized to the fine stage's grid on this fixed image
    (:meth:`~.velocity.ModelConfig.sized`: an automatic width is set, a given one kept)."""
    fine_shape, _ = fine_grid(config, fixed_shape, fixed_affine)
    return replace(config, model=config.model.sized(math.prod(fine_shape)))


def _stage_mask(fixed_mask, fixed_affine, factors):
    """The fixed mask on the grid block-averaged by ``factors``: the blocks it covers more than half of."""
    mask, affine = downsample(fixed_mask.to(fixed_affine.dtype), fixed_affine, factors)
    return mask > 0.5, affine


def _stage_images(moving, moving_affine, fixed, fixed_affine, fixed_mask, factors):
    """Fixed image (and mask) block-averaged by ``factors``, the moving image to the same resolution."""
    stage_fixed, stage_fixed_affine = downsample(fixed, fixed_affine, factors)
    stage_moving, stage_moving_affine = downsample(moving, moving_affine,
                                                   matching_factors(moving_affine, stage_fixed_affine))
    stage_mask = None if fixed_mask is None else _stage_mask(fixed_mask, fixed_affine, factors)[0]
    return stage_moving, stage_moving_affine, stage_fixed, stage_fixed_affine, stage_mask


def coarse_stage(
    moving, moving_affine, fixed, fixed_affine, config: RegistrationConfig, *, fixed_mask=None, progress=False
) -> StageResult:
    """Algorithm 1 on block-averaged images; the result is S1 on the coarse fixed grid.

    The network is created here, for the whole registration: an automatic
    width is sized to the fine stage's grid (:func:`sized_config`), and a
    ``fixed_mask`` gives it its window (:func:`velocity_window`; ``moving``
    normalised, as :func:`register_volumes` gives it).  The
    fixed image is averaged by ``coarse_factor``; the moving image by the
    factors that bring it closest to the same physical resolution, so a fine
    CT and a coarse CBCT are compared at one scale.
    """
    config = sized_config(config, fixed.shape, fixed_affine)
    factors = stage_factors(config.coarse_factor, fixed_affine, "coarse", fixed.shape)
    coarse_moving, coarse_moving_affine, coarse_fixed, coarse_fixed_affine, coarse_mask = _stage_images(
        moving, moving_affine, fixed, fixed_affine, fixed_mask, factors)
    window = velocity_window(config, fixed_mask, fixed_affine, moving, moving_affine)
    velocity = new_velocity_field(fixed.shape, fixed_affine, config.model, config.seed, window=window)
    log = fit_images(
        velocity, coarse_moving, coarse_moving_affine, coarse_fixed, coarse_fixed_affine, config.coarse,
        n_steps=config.model.n_steps, fixed_mask=coarse_mask, generator=_generator(config.seed + 1),
        stage="coarse", progress=progress,
    )
    displacement = dense_displacement(velocity, coarse_fixed.shape, coarse_fixed_affine, config.model.n_steps)
    return StageResult(velocity, displacement, coarse_fixed_affine, log)


def distill_stage(coarse: StageResult, fixed_shape, fixed_affine, config: RegistrationConfig, *,
                  progress=False) -> StageResult:
    """Fit the network at the fine stage's resolution to the trilinearly upsampled S1.

    Starts from the coarse weights, architecture and window (one MLP throughout, as
    Algorithm 2; ``config.model`` is ignored) and returns a copy;
    ``coarse.velocity`` is left untouched.  Points are drawn on the fixed
    grid block-averaged by ``fine_factor``.  The fine stage
    needs only the weights: the result's displacement is None (the field
    would cost about 2 s on a 1 mm brain; :func:`dense_displacement` gives
    it when wanted).
    """
    velocity = new_velocity_field(fixed_shape, fixed_affine, coarse.velocity.config, config.seed,
                                  window=coarse.velocity.window_grid)
    velocity.load_state_dict(coarse.velocity.state_dict())
    fine_shape, fine_affine = fine_grid(config, fixed_shape, fixed_affine)
    log = fit_field(
        velocity, coarse.displacement, coarse.affine, fine_shape, fine_affine, config.distill,
        n_steps=config.model.n_steps, generator=_generator(config.seed + 2), progress=progress,
    )
    return StageResult(velocity, None, fixed_affine, log)


def fine_stage(
    initial: VelocityField, moving, moving_affine, fixed, fixed_affine, config: RegistrationConfig,
    *, fixed_mask=None, progress=False,
) -> StageResult:
    """Algorithm 1 at the fine resolution, from a copy of ``initial``'s weights, architecture and window
    (``config.model`` is ignored).

    The images are block-averaged by ``fine_factor`` (none for voxels of
    1.5 mm and more by default); the displacement is integrated on the full
    fixed grid.
    """
    config = replace(config, model=initial.config)
    velocity = new_velocity_field(fixed.shape, fixed_affine, config.model, config.seed, window=initial.window_grid)
    velocity.load_state_dict(initial.state_dict())
    factors = stage_factors(config.fine_factor, fixed_affine, "fine", fixed.shape)
    fine_moving, fine_moving_affine, fine_fixed, fine_fixed_affine, fine_mask = _stage_images(
        moving, moving_affine, fixed, fixed_affine, fixed_mask, factors)
    log = fit_images(
        velocity, fine_moving, fine_moving_affine, fine_fixed, fine_fixed_affine, config.fine,
        n_steps=config.model.n_steps, fixed_mask=fine_mask, generator=_generator(config.seed + 3),
        stage="fine", progress=progress,
    )
    displacement = dense_displacement(
        velocity, fixed.shape, fixed_affine, config.model.n_steps, stride=config.field_stride
    )
    return StageResult(velocity, displacement, fixed_affine, log)


def warp(
    volume: torch.Tensor,
    volume_affine: torch.Tensor,
    displacement: torch.Tensor,
    fixed_affine: torch.Tensor,
    *,
    interpolation: str = "linear",
    fill_value: float = 0.0,
) -> torch.Tensor:
    """Resample a moving-space volume onto the fixed grid: ``out(x) = volume(x + d(x))``.

    Parameters
    ----------
    volume : ``(X', Y', Z')`` on its own grid.
    displacement : ``(X, Y, Z, 3)`` mm (RAS) on the fixed grid.
    interpolation : ``"linear"`` for images; ``"nearest"`` or ``"label"``
        (each label's indicator interpolated linearly, then the arg-max, as
        ANTs' GenericLabel: no mixed label at boundaries) for label maps.
    fill_value : value where ``x + d(x)`` falls outside ``volume``.
    """
    return _read_at(volume, volume_affine, displacement.shape[:3], fixed_affine, displacement,
                    interpolation=interpolation, fill_value=fill_value)


def resample(volume: torch.Tensor, volume_affine: torch.Tensor, shape, affine: torch.Tensor, *,
             interpolation: str = "linear", fill_value: float = 0.0) -> torch.Tensor:
    """``volume`` on the grid of ``shape`` and ``affine`` through the headers alone: :func:`warp` without a field."""
    return _read_at(volume, volume_affine, shape, affine, None, interpolation=interpolation, fill_value=fill_value)


def _read_at(volume, volume_affine, shape, affine, displacement, *, interpolation, fill_value) -> torch.Tensor:
    """``volume`` at every voxel ``x`` of the grid of ``shape`` and ``affine``, moved by ``displacement`` (or not)."""
    if interpolation not in ("linear", "nearest", "label"):
        raise ValueError(f"interpolation must be 'linear', 'nearest' or 'label', got {interpolation!r}")
    # Where each x + d(x) lies in the volume, in one pass: the grid through the composed affine plus the
    # displacement through its linear part; voxel indices for the labels, grid_sample's coordinates else.
    to_target = (torch.linalg.inv(volume_affine) if interpolation == "label"
                 else grid_coordinates(volume.shape, volume_affine))
    target = world_grid(shape, to_target @ affine)
    if displacement is not None:
        target = target + displacement @ to_target[:3, :3].T
    # The volume's extent, half a voxel beyond its edge voxels' centres, in the same coordinates.
    size = torch.tensor(volume.shape, dtype=target.dtype, device=target.device)
    extent = apply_affine(to_target @ volume_affine, torch.stack([torch.full_like(size, -0.5), size - 0.5]))
    inside = ((target >= extent.amin(dim=0)) & (target <= extent.amax(dim=0))).all(dim=-1)
    source = volume.to(target.dtype)
    if interpolation == "label":
        out = labels_at_indices(source, target)
    else:
        out = sample_grid(source, target, mode="bilinear" if interpolation == "linear" else "nearest")
    if interpolation != "linear":
        out = out.to(volume.dtype)
    return out.masked_fill(~inside, fill_value)


@dataclass
class RegistrationResult:
    """What :func:`register_volumes` returns; ``coarse`` and ``distilled`` are None after a warm start."""

    displacement: torch.Tensor  # (X, Y, Z, 3) mm, RAS, on the fixed grid
    warped: torch.Tensor  # moving image on the fixed grid
    velocity: VelocityField
    coarse: StageResult | None
    distilled: StageResult | None
    fine: StageResult

    @property
    def log(self) -> list[dict]:
        return [row for stage in (self.coarse, self.distilled, self.fine) if stage is not None for row in stage.log]


def _uncovered_mm(velocity: VelocityField, shape, affine: torch.Tensor) -> torch.Tensor:
    """How far (mm, ``(3,)`` per world axis, 0 where inside) a grid's voxel centres reach beyond the box
    that ``velocity``'s inputs are normalised to: the fixed grid it was fitted on."""
    low, high = bounding_box(shape, affine)
    velocity_low, velocity_high = velocity.center - velocity.half_extent, velocity.center + velocity.half_extent
    return torch.maximum(velocity_low.to(low) - low, high - velocity_high.to(high)).clamp(min=0)


def warm_start_mismatch(velocity: VelocityField, shape, affine: torch.Tensor) -> str | None:
    """Why ``velocity`` cannot start a registration on the fixed grid ``(shape, affine)``, or None.

    A network fitted on one fixed grid is a field in world mm over that
    grid's box; another grid (a later day's scan, even of another size or
    spacing) may start from it where it lies within that box, give or take
    one of its own voxels.  Beyond it the network was never fitted, and a
    sine network's values there are arbitrary.
    """
    excess = _uncovered_mm(velocity, shape, affine)
    tolerance = float(spacing(affine).max())
    if float(excess.max()) <= tolerance:
        return None
    reach = ", ".join(f"{float(mm):.1f} mm along {axis}" for mm, axis in zip(excess, "xyz") if mm > tolerance)
    return f"the fixed grid reaches beyond the box the network was fitted on ({reach}; more than one voxel)"


def warm_config(config: RegistrationConfig) -> RegistrationConfig:
    """``config`` for a warm start: the fine stage's iterations, learning rate and regularity patches are
    the warm ones."""
    return replace(config, fine=replace(config.fine, iterations=config.warm_iterations,
                                        learning_rate=config.warm_learning_rate,
                                        regularity_patches=config.warm_regularity_patches))


def register_volumes(
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    fixed: torch.Tensor,
    fixed_affine: torch.Tensor,
    config: RegistrationConfig = RegistrationConfig(),
    *,
    fixed_mask: torch.Tensor | None = None,
    initial: VelocityField | None = None,
    available_memory: int | None = None,
    progress: bool = False,
) -> RegistrationResult:
    """Coarse stage -> distillation -> fine stage, then warp the moving image.

    With ``initial`` (a velocity network fitted on this fixed grid's box,
    such as the previous fraction's of a course of treatment: the same
    moving image against another day's fixed image), a warm start: there is
    no coarse stage or distillation, since the network is a field at full
    resolution already, and the fine stage continues a copy of it
    (:func:`warm_config`); its architecture is ``initial``'s
    (``config.model`` is ignored).  A grid outside its box raises
    ValueError (:func:`warm_start_mismatch`).

    ``available_memory`` is the bytes this process can still allocate on
    the volumes' device (:func:`nipype_inrlddmm.host.available_memory` reads
    it; the engine reads no files).  Given, each stage is checked against it
    before anything is trained, raising
    :class:`~nipype_inrlddmm.engine.memory.InsufficientMemoryError` with
    advice when one would not fit; None checks nothing.
    """
    if initial is not None:
        mismatch = warm_start_mismatch(initial, fixed.shape, fixed_affine)
        if mismatch:
            raise ValueError(f"cannot start from this initial velocity network: {mismatch}")
        config = replace(warm_config(config), model=initial.config)
    else:
        config = sized_config(config, fixed.shape, fixed_affine)
    stages = ("coarse", "distill", "fine") if initial is None else ("fine",)
    for stage in stages:
        check_memory(stage, fixed.shape, config, moving_shape=moving.shape, device=fixed.device,
                     available=available_memory)
    moving_n, fixed_n = normalise_intensity(moving), normalise_intensity(fixed)
    coarse = distilled = None
    if initial is None:
        coarse = coarse_stage(moving_n, moving_affine, fixed_n, fixed_affine, config,
                              fixed_mask=fixed_mask, progress=progress)
        distilled = distill_stage(coarse, fixed.shape, fixed_affine, config, progress=progress)
        initial = distilled.velocity
    fine = fine_stage(initial, moving_n, moving_affine, fixed_n, fixed_affine, config,
                      fixed_mask=fixed_mask, progress=progress)
    warped = warp(moving, moving_affine, fine.displacement, fixed_affine)
    return RegistrationResult(fine.displacement, warped, fine.velocity, coarse, distilled, fine)


_STAGE_NAMES = ("coarse", "distill", "fine")


def _locate(option: str) -> tuple[str, tuple[str, ...], str]:
    """Where flat ``option`` lives in a :class:`RegistrationConfig`: ``(part, stages, field)``.

    ``part`` is ``"model"``, ``"stages"`` (``stages`` names them: one for a
    ``coarse_``/``distill_``/``fine_`` prefix, all three for a bare stage
    field) or ``"top"``.
    """
    prefix, _, rest = option.partition("_")
    if option in ModelConfig.__dataclass_fields__:
        return "model", (), option
    if prefix in _STAGE_NAMES and rest in StageConfig.__dataclass_fields__:
        return "stages", (prefix,), rest
    if option in StageConfig.__dataclass_fields__:
        return "stages", _STAGE_NAMES, option
    if option in RegistrationConfig.__dataclass_fields__ and option not in _STAGE_NAMES and option != "model":
        return "top", (), option
    raise TypeError(f"unknown registration option {option!r}")


def config_from_options(**options) -> RegistrationConfig:
    """Build a :class:`RegistrationConfig` from flat keyword options.

    * a :class:`ModelConfig` field (``width``, ``n_steps``, ...) sets the model;
    * ``coarse_<x>``, ``distill_<x>``, ``fine_<x>`` set field ``x`` of one
      stage (``fine_iterations=100``);
    * a bare :class:`StageConfig` field (``reg_weight``, ``similarity``) sets
      it for every stage;
    * ``coarse_factor``, ``fine_factor``, ``field_stride``, ``seed`` as in :class:`RegistrationConfig`.
    """
    base = RegistrationConfig()
    model, stages, top = {}, {stage: {} for stage in _STAGE_NAMES}, {}
    for key, value in options.items():
        part, named, field_name = _locate(key)
        if part == "model":
            model[field_name] = value
        elif part == "top":
            top[field_name] = value
        elif len(named) == 1:  # a prefixed setting wins over a bare one, whatever their order
            stages[named[0]][field_name] = value
        else:
            for stage in named:
                stages[stage].setdefault(field_name, value)
    return replace(
        base,
        model=replace(base.model, **model),
        coarse=replace(base.coarse, **stages["coarse"]),
        distill=replace(base.distill, **stages["distill"]),
        fine=replace(base.fine, **stages["fine"]),
        **top,
    )


def option_values(config: RegistrationConfig, option: str) -> list:
    """The value of flat ``option`` (as :func:`config_from_options` takes it) in ``config``: one per stage
    it sets (coarse, distillation, fine), otherwise one."""
    part, named, field_name = _locate(option)
    if part == "model":
        return [getattr(config.model, field_name)]
    if part == "top":
        return [getattr(config, field_name)]
    return [getattr(getattr(config, stage), field_name) for stage in named]
