"""The optimisers behind the stages of coarse-to-fine INR-LDDMM (:mod:`.stages` chains them).

* :func:`fit_images` is Algorithm 1: minimise
  ``Sim(moving o S, fixed) + reg_weight * (1/n) sum_i ||v_i||^2`` over the
  network weights, on random patches of the fixed grid.  It serves both the
  coarse stage (on downsampled images) and the fine stage.
* :func:`fit_field` is the distillation stage: minimise
  ``||S - S1'||^2 + reg_weight * (1/n) sum_i ||v_i||^2`` where ``S1'`` is a
  given displacement (the coarse result) interpolated trilinearly at random
  points of the fine grid.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..kernels import siren
from .adam import CosineAdam
from .flow import integrate, resample_field
from .grid import apply_affine, grid_coordinates, sample_grid, spacing, voxel_indices, world_grid
from .regularity import lattice_jacobian_determinants, log_jacobian_spread
from .sampling import (
    MIN_AUTOMATIC_STRIDE, checked_stride, gather_patches, interpolate_patches, lattice_shape, lattice_strides,
    patch_lattice, patch_shape, per_axis_strides, random_patch_corners, random_voxels,
)
from .similarity import SIMILARITIES, lncc, mind, mind_ssc, mutual_information

LOGGER = logging.getLogger("nipype_inrlddmm")


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one stage.

    ``n_patches`` patches of ``patch_size``^3 fixed-grid voxels are drawn at
    each image-matching iteration (with a ``sampling_fraction``, at most
    that many: as many as cover that fraction of the stage's grid,
    :meth:`patches`); the flow is integrated on a lattice at
    most ``patch_stride`` voxels apart in each patch (one int, one per axis,
    or None: per axis, the stride closest to 4 mm and at least 2,
    :func:`~.sampling.lattice_strides`) and interpolated trilinearly to
    every voxel (as the dense field, ``field_stride``), and the similarity
    is computed on every voxel.  ``batch_points`` random
    voxels are drawn at each distillation iteration (with a
    ``sampling_fraction``, at most that many: that fraction of the grid,
    :meth:`points`).  The learning rate
    decays along a cosine to a tenth of ``learning_rate``.

    ``similarity="mind"`` compares MIND-SSC descriptors
    (:func:`~.similarity.mind_ssc`) of both images, computed once on the
    stage's grid with neighbourhoods ``mind_distance_mm`` apart and boxes of
    half-width ``mind_radius_mm``, where no intensity mapping relates the
    modalities (MR -> ultrasound).

    ``jacobian_weight`` adds that much of the spread of ``log det J`` of
    the displacement at the corners of the lattice cells, measured where the
    field is computed (:func:`~.regularity.log_jacobian_spread`): SDlogJ
    squared for deviations under ``jacobian_scale``, linear beyond, so the
    field stays smooth and does not fold, while the few large volume changes
    anatomy asks for remain affordable; a uniform volume change is free.
    With a ``fixed_mask`` the image patches lie where the mask allows, so
    ``regularity_patches`` more (at ``n_patches`` image patches;
    proportionally fewer with fewer, :meth:`regularity_patch_count`) are
    drawn for the penalties alone (velocity and Jacobian): a SIREN's sine
    features span the whole image, and a field left unconstrained away from
    the anatomy is rough there.  With an ``outside_jacobian_weight`` they
    are drawn outside the mask (the head of an MR, where the image patches
    are drawn), and their part of the spread weighs
    ``outside_jacobian_weight`` rather than ``jacobian_weight`` (about the
    one mean of all the iteration's cells): where there is no anatomy to
    match, the field need only be smooth.  On the brains the rough field in
    the air around the head was a third of SDlogJ, where SyN's field fades
    to the identity.  Under a velocity window they are drawn only where it
    lets the field move (:func:`regularity_centres`).  The defaults hold
    the air (12) 2.7 times as stiff as the anatomy (4.5): a lower SDlogJ on
    both brains with a higher brain-pair Dice.  With a mask but no outside
    weight they lie anywhere at ``jacobian_weight``.  Without a
    mask none are drawn: the image patches lie anywhere and carry the
    penalties over the whole grid themselves (on lung-ct and the phantom
    the same Dice, TRE and SDlogJ in 0.77 and 0.88 x the time).  Figures:
    docs/decisions.md ("Regularity").

    ``mi_weight`` adds that much of a Mattes mutual information
    (:func:`~.similarity.mutual_information`, over all the iteration's patch
    voxels) to ``similarity`` (unless that is ``"mi"`` already), as ANTs
    combines two metrics.  The local correlation normalises each window's
    contrast away, so low-contrast tissue (deep grey matter, soft tissue
    around the lungs) was matched by its edges alone; the global term asks
    that intensity classes overlap.  It raised Dice on the inter-subject
    brains and the lung CT, and lowered it slightly on CT -> CBCT, whose
    cupping no global intensity mapping describes (hence ``mi_weight=0`` in
    that study script).  It also bought more Dice per unit of SDlogJ than a
    softer Jacobian penalty did, hence a weight of 0.85 with a stiffer
    penalty (4.5) (docs/decisions.md, "Regularity").

    Points per iteration were the strongest lever measured, and the network,
    not the image sampling, is most of an iteration's work: a lattice about
    4 mm apart with 48 patches sees more of the image than every voxel of
    24 patches, in less time, and the velocity is smooth over that distance.
    Figures for all of the above: docs/decisions.md.

    ``convergence_window`` > 0 stops a stage early once the loss fell by less
    than ``convergence_threshold`` of its magnitude over that many iterations
    (:func:`relative_decrease`), as ANTs' convergence test.  Off by default:
    the loss still falls steadily late in the fine stage on smooth cases and
    swings with the patches drawn on noisy ones, so no threshold stops the
    first early without stopping the second at random (docs/decisions.md).
    """

    iterations: int = 200
    learning_rate: float = 2e-3
    similarity: str = "lncc"
    lncc_window: int = 5
    mind_distance_mm: float = 1.5
    mind_radius_mm: float = 1.5
    mi_weight: float = 0.85
    n_patches: int = 48
    sampling_fraction: float | None = None
    patch_size: int = 12
    batch_points: int = 8192
    reg_weight: float = 1e-4
    jacobian_weight: float = 4.5
    jacobian_scale: float = 0.1
    regularity_patches: int = 24
    outside_jacobian_weight: float | None = 12.0
    convergence_window: int = 0
    convergence_threshold: float = 0.0
    patch_stride: int | tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {tuple(SIMILARITIES)}, got {self.similarity!r}")
        if self.iterations < 0 or self.learning_rate <= 0 or min(self.reg_weight, self.mi_weight,
                                                                self.jacobian_weight) < 0:
            raise ValueError("iterations must be >= 0, learning_rate > 0, and reg_weight, mi_weight and "
                             "jacobian_weight >= 0")
        object.__setattr__(self, "patch_stride", checked_stride(self.patch_stride, "patch_stride"))
        if self.n_patches < 1 or self.sampling_fraction is not None and not 0 < self.sampling_fraction <= 1:
            raise ValueError("n_patches must be >= 1, sampling_fraction None or in (0, 1]")
        if min(self.mind_distance_mm, self.mind_radius_mm) <= 0:
            raise ValueError("mind_distance_mm and mind_radius_mm must be > 0")
        if self.regularity_patches < 0 or self.jacobian_scale <= 0:
            raise ValueError("regularity_patches must be >= 0 and jacobian_scale > 0")
        if self.outside_jacobian_weight is not None and self.outside_jacobian_weight < 0:
            raise ValueError(f"outside_jacobian_weight must be None or >= 0, got {self.outside_jacobian_weight}")
        if self.convergence_window < 0 or self.convergence_window == 1 or self.convergence_threshold < 0:
            raise ValueError("convergence_window must be 0 (off) or >= 2, convergence_threshold >= 0")

    def patches(self, grid) -> int:
        """Patches drawn per image-matching iteration on ``grid``: ``n_patches``, or with a
        ``sampling_fraction`` as many as cover that fraction of the grid's voxels (as ANTs' metric
        sampling percentage is a fraction of the image), at least 1 and at most ``n_patches``."""
        return self._covering(grid, math.prod(patch_shape(grid, self.patch_size)), self.n_patches)

    def points(self, grid) -> int:
        """Random voxels drawn per distillation iteration on ``grid``: ``batch_points``, or with a
        ``sampling_fraction`` as many as that fraction of the grid's voxels, at least 1 and at most
        ``batch_points``."""
        return self._covering(grid, 1, self.batch_points)

    def _covering(self, grid, unit_voxels: int, most: int) -> int:
        """Samples of ``unit_voxels`` each that cover ``sampling_fraction`` of ``grid``, in [1, ``most``];
        ``most`` without a fraction."""
        if self.sampling_fraction is None:
            return most
        return min(most, max(1, round(self.sampling_fraction * math.prod(grid) / unit_voxels)))

    def regularity_patch_count(self, grid, *, masked: bool = True) -> int:
        """Regularity patches drawn per iteration on ``grid``: ``regularity_patches`` at ``n_patches``
        image patches, as many fewer as :meth:`patches` draws fewer (at least 1, unless 0), so a small
        grid is not regularised many times over; none when the stage has no fixed mask (``masked``)."""
        if not self.regularity_patches or not masked:
            return 0
        return max(1, round(self.regularity_patches * self.patches(grid) / self.n_patches))

    def flow_points(self, grid, voxel_mm=None, *, masked: bool = True) -> int:
        """Points the network integrates per image-matching iteration on ``grid``: every patch's lattice,
        the regularity patches' included (none without a fixed mask: ``masked`` False).

        ``voxel_mm`` : the grid's voxel size per axis, for an automatic
        ``patch_stride``; without it, the automatic stride's smallest
        (:data:`~.sampling.MIN_AUTOMATIC_STRIDE`), so the count is an upper bound.
        """
        if voxel_mm is None:
            strides = per_axis_strides(self.patch_stride or MIN_AUTOMATIC_STRIDE)
        else:
            strides = lattice_strides(self.patch_stride, voxel_mm)
        lattice = math.prod(lattice_shape(patch_shape(grid, self.patch_size), strides))
        return (self.patches(grid) + self.regularity_patch_count(grid, masked=masked)) * lattice


def relative_decrease(losses, window: int) -> float:
    """How much the loss fell over its last ``window`` values, relative to its magnitude.

    A least-squares line through the last ``window`` losses, its drop across
    the window divided by their mean absolute value: a trend estimate that
    the iteration-to-iteration noise of random patches averages out of.
    """
    recent = torch.tensor(losses[-window:], dtype=torch.float64)
    steps = torch.arange(len(recent), dtype=torch.float64)
    steps = steps - steps.mean()
    slope = (steps * (recent - recent.mean())).sum() / steps.square().sum()
    return float(-slope * (len(recent) - 1) / recent.abs().mean().clamp(min=1e-12))


#: A loss that is not finite, or that rises above where it stood after the first iterations by this many
#: times that loss's magnitude (or than 1, for losses near 0), marks a diverging optimisation.
DIVERGENCE_FACTOR = 10.0
#: The first iterations are not held to the rise test: Adam's first steps may move far (a distillation
#: from the coarse weights rises steeply before it settles; docs: decisions).
DIVERGENCE_WARMUP = 10


class DivergenceError(RuntimeError):
    """A stage whose loss diverged again after restarting from its last good weights with a smaller step."""


def _diverged(loss: float, reference: float | None) -> bool:
    """Whether ``loss`` is not finite, or rose :data:`DIVERGENCE_FACTOR` x above ``reference`` (None: not yet)."""
    if not math.isfinite(loss):
        return True
    return reference is not None and loss - reference > DIVERGENCE_FACTOR * max(abs(reference), 1.0)


def _divergence(stage: str, iteration: int, loss: float, restarted: int) -> DivergenceError:
    return DivergenceError(f"the {stage} stage diverged at iteration {iteration} (loss {loss:.4g}), again after "
                           f"restarting at iteration {restarted} from its last good weights with a tenth of the step")


def _optimise(velocity, objective, config: StageConfig, *, stage: str, progress: bool | str) -> list[dict]:
    """Adam on ``objective(iteration) -> (loss, {term: value})``; returns the log rows.

    ``progress`` shows a bar named after the stage; a string also names
    what is registered (a patient), telling apart the bars of parallel runs.

    Stops before ``config.iterations`` once the loss fell by less than
    ``config.convergence_threshold`` (relative) over the last
    ``config.convergence_window`` iterations, as ANTs' convergence test.

    A diverging loss (:func:`_diverged`: NaN, or past
    :data:`DIVERGENCE_WARMUP` iterations :data:`DIVERGENCE_FACTOR` times
    above where it stood then) is caught at once: the weights of
    the last good iteration are restored and the stage goes on with a tenth
    of the learning rate; diverging again raises :class:`DivergenceError`,
    naming the stage and the iterations.
    """
    parameters = [p for p in velocity.parameters() if p.requires_grad]
    optimiser = CosineAdam(parameters, config.learning_rate, config.learning_rate / 10, config.iterations)
    log = []
    start = time.perf_counter()
    losses, window = [], config.convergence_window
    label = f"{progress}: {stage}" if isinstance(progress, str) and progress else stage
    bar = tqdm(range(config.iterations), desc=label, disable=not progress, leave=False)
    good, restarted = None, None
    for iteration in bar:
        optimiser.zero_grad()
        loss, terms = objective(iteration)
        value = loss.item()  # read once: on a GPU each read waits for the device
        reference = losses[DIVERGENCE_WARMUP - 1] if len(losses) >= DIVERGENCE_WARMUP else None
        if good is not None and _diverged(value, reference):
            if restarted is not None:
                raise _divergence(stage, iteration, value, restarted)
            with torch.no_grad():
                for parameter, kept in zip(parameters, good):
                    parameter.copy_(kept)
            restarted = iteration
            rate = config.learning_rate / 10
            optimiser = CosineAdam(parameters, rate, rate / 10, config.iterations - iteration)
            LOGGER.warning("the %s stage diverged at iteration %d (loss %.4g): restarting from its last good "
                           "weights with a tenth of the step", stage, iteration, value)
            loss, terms = objective(iteration)
            value = loss.item()
            if _diverged(value, reference):
                raise _divergence(stage, iteration, value, restarted)
        good = [parameter.detach().clone() for parameter in parameters]
        loss.backward()
        optimiser.step()
        row = {"stage": stage, "iteration": iteration, "loss": value}
        row.update({name: value.item() for name, value in terms.items()})
        row["seconds"] = time.perf_counter() - start
        log.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        losses.append(row["loss"])
        if window and len(losses) >= window and relative_decrease(losses, window) < config.convergence_threshold:
            break
    bar.close()
    siren.release_buffers()
    return log


def fit_images(
    velocity,
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    fixed: torch.Tensor,
    fixed_affine: torch.Tensor,
    config: StageConfig,
    *,
    n_steps: int,
    fixed_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stage: str = "fit",
    progress: bool | str = False,
) -> list[dict]:
    """Train ``velocity`` in place so that ``moving o S`` matches ``fixed``.

    Parameters
    ----------
    moving, fixed : ``(X, Y, Z)`` intensity volumes on their own grids,
        already normalised to comparable ranges.
    moving_affine, fixed_affine : their ``(4, 4)`` voxel -> world affines.
    fixed_mask : optional ``(X, Y, Z)`` bool volume on the fixed grid; patch
        centres are drawn inside it (body, lungs, CBCT field of view).
    generator : CPU generator for the patch draws (reproducibility).

    Returns
    -------
    One log row per iteration (loss, similarity, regularisation, seconds).
    """
    candidates = None if fixed_mask is None else torch.nonzero(fixed_mask).cpu()
    if candidates is not None and len(candidates) == 0:
        raise ValueError("the fixed mask is empty: no voxel to sample")
    device = fixed.device

    descriptors = config.similarity == "mind"
    moving_values, fixed_values = moving, fixed
    if descriptors:
        # Channel 0 keeps the intensity for the mutual information; the descriptors are computed once, on
        # the stage's grid, and interpolated at the warped points like the intensity.
        moving_values, fixed_values = (
            torch.cat([volume[None], mind_ssc(volume, spacing(affine), distance_mm=config.mind_distance_mm,
                                              radius_mm=config.mind_radius_mm)])
            for volume, affine in ((moving, moving_affine), (fixed, fixed_affine)))

    def similarity(warped, target):
        if descriptors:
            value = mind(warped[1:], target[1:])
            warped, target = warped[0], target[0]
        elif config.similarity == "lncc":
            value = lncc(warped, target, config.lncc_window)
        else:
            value = SIMILARITIES[config.similarity](warped, target)
        if config.mi_weight and config.similarity != "mi":
            value = value + config.mi_weight * mutual_information(warped, target)
        return value

    edge = patch_shape(fixed.shape, config.patch_size)
    dtype = fixed_affine.dtype
    lattice = patch_lattice(edge, lattice_strides(config.patch_stride, spacing(fixed_affine).tolist()), dtype=dtype,
                            device=device)
    # Fixed voxel v displaced by d mm is read from the moving image at to_moving @ (fixed_affine @ v + d),
    # in its grid_sample coordinates.  Both terms are linear: a patch's sampling grid is one offset grid
    # plus its corner's shift, and d is mapped on the lattice, before it is interpolated to every voxel.
    to_moving = grid_coordinates(moving.shape, moving_affine)
    voxel_to_moving = to_moving @ fixed_affine
    patch_grid = apply_affine(voxel_to_moving, voxel_indices(edge, device=device, dtype=dtype))
    knot_spacing = [(n - 1) / max(q - 1, 1) for n, q in zip(edge, lattice.shape[:3])]

    masked = fixed_mask is not None and not bool(fixed_mask.all())
    n_patches, n_regularity = config.patches(fixed.shape), config.regularity_patch_count(fixed.shape, masked=masked)
    # With a mask and an outside weight, the regularity patches are drawn outside the mask (where no image
    # patch is centred) and their Jacobian spread weighs outside_jacobian_weight, not jacobian_weight.
    outside, patch_weights = None, None
    if n_regularity and config.jacobian_weight and config.outside_jacobian_weight is not None:
        outside = regularity_centres(velocity, fixed_mask, fixed_affine)
        patch_weights = torch.ones(n_patches + n_regularity, 1, 1, 1, dtype=dtype, device=device)
        patch_weights[n_patches:] = config.outside_jacobian_weight / config.jacobian_weight

    def objective(iteration):
        corners = random_patch_corners(
            fixed.shape, n_patches, config.patch_size, candidates=candidates, generator=generator
        ).to(device)
        if n_regularity:
            corners = torch.cat([corners, random_patch_corners(fixed.shape, n_regularity, config.patch_size,
                                                               candidates=outside,
                                                               generator=generator).to(device)])
        target = gather_patches(fixed_values, corners[:n_patches], edge)
        corner_voxels = corners.to(dtype)[:, None, None, None]
        displacement, kinetic = integrate(velocity, apply_affine(fixed_affine, corner_voxels + lattice).reshape(-1, 3),
                                          n_steps)
        displacement = displacement.reshape(len(corners), *lattice.shape)
        shift = displacement[:n_patches] @ to_moving[:3, :3].T
        grid = patch_grid + corner_voxels[:n_patches] @ voxel_to_moving[:3, :3].T + interpolate_patches(shift, edge)
        sim = similarity(sample_grid(moving_values, grid), target)
        loss, terms = sim + config.reg_weight * kinetic, {"similarity": sim, "regularisation": kinetic}
        if config.jacobian_weight:
            determinants = lattice_jacobian_determinants(displacement, knot_spacing, fixed_affine[:3, :3])
            terms["log_jacobian_spread"] = log_jacobian_spread(determinants, config.jacobian_scale,
                                                               weights=patch_weights)
            loss = loss + config.jacobian_weight * terms["log_jacobian_spread"]
        return loss, terms

    return _optimise(velocity, objective, config, stage=stage, progress=progress)


def regularity_centres(velocity, fixed_mask: torch.Tensor, fixed_affine: torch.Tensor) -> torch.Tensor:
    """``(M, 3)`` voxel indices (CPU) of the grid of ``fixed_mask`` at which regularity patches are centred:
    outside the mask and, where ``velocity`` has a window, where that is above 0.

    Beyond the window's support the flow is one translation, so a patch
    there measures ``det J = 1`` and regularises nothing: with the brains' 5-25 mm
    window, 55 % of the air on the atlas's fine grid and 44 % on brain-pair's
    lay beyond the support.  Where no voxel outside the mask is within the
    support (a taper narrower than a coarse voxel), the whole outside is
    kept.
    """
    outside = ~fixed_mask
    if velocity.window is not None:
        moves = velocity.window_at(world_grid(fixed_mask.shape, fixed_affine).reshape(-1, 3)) > 0
        within = outside & moves.reshape(fixed_mask.shape)
        if bool(within.any()):
            outside = within
    return torch.nonzero(outside).cpu()


def fit_field(
    velocity,
    target: torch.Tensor,
    target_affine: torch.Tensor,
    shape,
    affine: torch.Tensor,
    config: StageConfig,
    *,
    n_steps: int,
    generator: torch.Generator | None = None,
    stage: str = "distill",
    progress: bool | str = False,
) -> list[dict]:
    """Train ``velocity`` in place so that its flow reproduces a displacement.

    Parameters
    ----------
    target : ``(x, y, z, 3)`` displacement (mm, RAS) on its own (coarse) grid
        with affine ``target_affine``.
    shape, affine : the (fine) grid whose voxels are sampled.

    Returns
    -------
    One log row per iteration; ``field_error`` is the mean squared end-point
    difference in mm^2.
    """

    n_points = config.points(shape)

    def objective(iteration):
        ijk = random_voxels(shape, n_points, generator=generator).to(affine.device)
        points = apply_affine(affine, ijk.to(affine.dtype))
        wanted = resample_field(target, target_affine, points)
        displacement, kinetic = integrate(velocity, points, n_steps)
        error = (displacement - wanted).square().sum(dim=1).mean()
        return error + config.reg_weight * kinetic, {"field_error": error, "regularisation": kinetic}

    return _optimise(velocity, objective, config, stage=stage, progress=progress)
