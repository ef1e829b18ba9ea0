"""Each stage from files to files: what each Nipype interface runs.

Every function reads and validates its input files (failing with
:class:`~nipype_inrlddmm.io.InputError`, which names the file, before any
optimisation starts), runs one engine stage, and writes its outputs
atomically into ``out_dir`` under fixed names, returning their paths.  The
interfaces in :mod:`nipype_inrlddmm.interfaces` only translate traits to
these calls, so the same science runs with or without Nipype.

Chaining :func:`run_coarse`, :func:`run_distill` and :func:`run_fine` with
the same configuration gives the same field as :func:`nipype_inrlddmm.register`
(same seed, same thread count): every intermediate is stored exactly
(float32 fields, full checkpoints).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .. import engine, io
from ..api import as_tensor
from ..engine.affine import AffineConfig, checked_affine_register
from .inputs import LOGGER, Pair, check_memory, load_pair, normalised, pair_tensors, warm_start_model
from .outputs import AFFINE_OUTPUTS, COARSE_OUTPUTS, DISTILL_OUTPUTS, FINE_OUTPUTS, TRAJECTORY_OUTPUTS, fine_writers


@contextlib.contextmanager
def torch_threads(n_threads: int | None):
    """Run a block with ``n_threads`` torch CPU threads, then restore the previous count.

    Nipype's Linear plugin runs every node in the caller's process; restoring
    keeps one node's setting from leaking into the next or into the caller.
    """
    previous = torch.get_num_threads()
    if n_threads:
        torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_coarse(moving, fixed, out_dir, config: engine.RegistrationConfig, *, fixed_mask=None,
               device="auto", progress=False) -> dict[str, Path]:
    """Coarse stage: fit a fresh velocity network on block-averaged images.

    Writes the model (normalised to the fixed image's full grid, so the
    distillation can continue it), the displacement on the coarse fixed grid
    (ITK/ANTs field) and the log; keys as :data:`COARSE_OUTPUTS`.
    """
    pair = load_pair(moving, fixed, fixed_mask=fixed_mask)
    device = engine.resolve_device(device)
    check_memory("coarse", pair.fixed.shape, config, moving_shape=pair.moving.shape, device=device, source=fixed)
    moving_t, moving_affine, fixed_t, fixed_affine, mask = pair_tensors(pair, device)
    moving_n, fixed_n = normalised(moving_t, moving), normalised(fixed_t, fixed)
    result = engine.coarse_stage(moving_n, moving_affine, fixed_n, fixed_affine, config, fixed_mask=mask,
                                 progress=progress)
    out = Path(out_dir)
    return {
        "model": io.save_checkpoint(out / COARSE_OUTPUTS["model"], result.velocity, shape=pair.fixed.shape,
                                    affine=pair.fixed_affine),
        "displacement": io.save_displacement(out / COARSE_OUTPUTS["displacement"], result.displacement.cpu().numpy(),
                                             result.affine.cpu().numpy()),
        "log": io.write_csv(out / COARSE_OUTPUTS["log"], result.log),
    }


def run_distill(coarse_model, coarse_displacement, fixed, out_dir, config: engine.RegistrationConfig, *,
                device="auto", progress=False) -> dict[str, Path]:
    """Distillation: refit the coarse network at full resolution to its upsampled field.

    The architecture comes from the coarse checkpoint (``config.model`` is
    ignored); the checkpoint must have been fitted on ``fixed``'s grid.
    Keys as :data:`DISTILL_OUTPUTS`.
    """
    fixed_data, fixed_affine = io.load_volume(fixed, what="fixed image")
    velocity = io.load_checkpoint(coarse_model, shape=fixed_data.shape, affine=fixed_affine)
    field, field_affine = io.load_displacement(coarse_displacement)
    device = engine.resolve_device(device)
    check_memory("distill", fixed_data.shape, replace(config, model=velocity.config), device=device, source=fixed)
    coarse = engine.StageResult(velocity.to(device), as_tensor(field, device), as_tensor(field_affine, device), log=[])
    result = engine.distill_stage(coarse, fixed_data.shape, as_tensor(fixed_affine, device),
                                  replace(config, model=velocity.config), progress=progress)
    out = Path(out_dir)
    return {
        "model": io.save_checkpoint(out / DISTILL_OUTPUTS["model"], result.velocity, shape=fixed_data.shape,
                                    affine=fixed_affine),
        "log": io.write_csv(out / DISTILL_OUTPUTS["log"], result.log),
    }


def run_fine(moving, fixed, init_model, out_dir, config: engine.RegistrationConfig, *, fixed_mask=None,
             warm_start=False, device="auto", progress=False) -> dict[str, Path]:
    """Fine stage at full resolution from ``init_model``, then warp the moving image.

    The architecture comes from ``init_model`` (``config.model`` is ignored).
    ``init_model`` is this registration's distillation, fitted on this
    fixed grid; with ``warm_start``, another registration's of the moving
    image, whose fixed grid covers this one (:func:`warm_start_model`).
    ``config.fine`` is what runs (a warm start's is
    :func:`~nipype_inrlddmm.engine.warm_config`'s: the workflow sets it).
    Writes the model, the displacement on the fixed grid (ITK/ANTs field),
    the warped moving image and the log; keys as :data:`FINE_OUTPUTS`.
    """
    pair = load_pair(moving, fixed, fixed_mask=fixed_mask)
    fingerprint = io.image_fingerprint(moving, pair.moving, pair.moving_affine)
    if warm_start:
        velocity = warm_start_model(init_model, fixed, pair.fixed.shape, pair.fixed_affine, moving=fingerprint)
    else:
        velocity = io.load_checkpoint(init_model, shape=pair.fixed.shape, affine=pair.fixed_affine)
    device = engine.resolve_device(device)
    config = replace(config, model=velocity.config)
    check_memory("fine", pair.fixed.shape, config, moving_shape=pair.moving.shape, device=device, source=fixed)
    moving_t, moving_affine, fixed_t, fixed_affine, mask = pair_tensors(pair, device)
    moving_n, fixed_n = normalised(moving_t, moving), normalised(fixed_t, fixed)
    result = engine.fine_stage(velocity.to(device), moving_n, moving_affine, fixed_n, fixed_affine, config,
                               fixed_mask=mask, progress=progress)
    warped = engine.warp(moving_t, moving_affine, result.displacement, fixed_affine)
    writers = fine_writers(out_dir, result.velocity, result.displacement.cpu().numpy(), warped.cpu().numpy(),
                           fixed_shape=pair.fixed.shape, fixed_affine=pair.fixed_affine, moving=fingerprint)
    return {name: write() for name, write in writers.items()} | {
        "log": io.write_csv(Path(out_dir) / FINE_OUTPUTS["log"], result.log)}


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in ("linear", "nearest", "label"):
        raise ValueError(f"interpolation must be 'linear', 'nearest' or 'label', got {interpolation!r}")


def _check_labels_for(interpolation: str, in_file, data: np.ndarray) -> None:
    """Refuse, naming ``in_file``, an image that is not a label map under a label interpolation."""
    if interpolation != "linear" and not np.array_equal(data, np.round(data)):
        raise io.InputError(in_file, f"'{interpolation}' interpolation is for label maps; this one is not integer")


def apply_warp(in_file, displacement, reference, out_file, *, interpolation="linear") -> Path:
    """Resample a moving-space image onto the reference grid through a displacement field.

    ``out(x) = in_file(x + d(x))``.  ``interpolation`` is ``"linear"``
    (images, float32 out) or ``"nearest"``/``"label"`` (label maps, int32
    out; ``"label"`` blends each label's indicator, as ANTs' GenericLabel).
    The displacement must lie on the reference grid.
    """
    _check_interpolation(interpolation)
    data, affine = io.load_volume(in_file, what="image to warp")
    field, field_affine = io.load_displacement(displacement)
    ref_shape, ref_affine = _reference_grid(reference)
    io.require_grid(displacement, field.shape[:3], field_affine, ref_shape, ref_affine,
                    what="displacement", reference=f"the reference {reference}")
    _check_labels_for(interpolation, in_file, data)
    return io.save_image(out_file, warp_array(data, affine, field, field_affine, interpolation=interpolation),
                         ref_affine)


def warp_array(data: np.ndarray, affine: np.ndarray, displacement: np.ndarray, field_affine: np.ndarray, *,
               interpolation: str = "linear", device="cpu") -> np.ndarray:
    """``data`` (on the grid of ``affine``) resampled through ``displacement`` (``(X, Y, Z, 3)`` mm RAS on the
    grid of ``field_affine``): float32 for ``"linear"``, int32 label ids for ``"nearest"`` and ``"label"``.

    Resampled on ``device``, the result brought back to the host: a registration's own device, so that
    one on a GPU does not carry its labels over the whole fixed grid on the CPU.
    """
    out = engine.warp(*(as_tensor(a, device) for a in (data, affine, displacement, field_affine)),
                      interpolation=interpolation).cpu().numpy()
    return out if interpolation == "linear" else out.astype(np.int32)


def _reference_grid(reference, what: str = "reference image"):
    """Shape and affine of an image's grid, from its header only."""
    header, shape = io.open_volume(reference, what)
    return shape, np.asarray(header.affine, np.float64)


def apply_inverse_warp(in_file, velocity_checkpoint, reference, out_file, *, interpolation="linear",
                       field_stride: int | tuple[int, int, int] | None = engine.RegistrationConfig().field_stride,
                       ) -> Path:
    """Carry a fixed-space image (e.g. contours drawn on the CBCT) back onto the moving grid.

    The inverse map is integrated backwards through the velocity network of
    ``velocity_checkpoint`` (:func:`~nipype_inrlddmm.engine.flow.integrate_backward`):
    ``out(y) = in_file(y + d_inv(y))`` for every voxel ``y`` of
    ``reference`` (the moving image's grid).  A displacement file cannot be
    inverted this way; the network is needed, which is why the fine stage
    saves it.  ``in_file`` must lie on the fixed grid the checkpoint was
    fitted on.  ``interpolation`` as :func:`apply_warp`.
    """
    _check_interpolation(interpolation)
    data, affine = io.load_volume(in_file, what="image to warp")
    _check_labels_for(interpolation, in_file, data)
    mismatch = io.grid_mismatch(data.shape, affine, *io.checkpoint_grid(velocity_checkpoint))
    if mismatch:
        raise io.InputError(in_file, f"the image to carry back is not on the fixed grid that {velocity_checkpoint} "
                            f"was fitted on ({mismatch})")
    velocity = io.load_checkpoint(velocity_checkpoint)
    ref_shape, ref_affine = _reference_grid(reference)
    inverse = engine.dense_displacement(velocity, ref_shape, as_tensor(ref_affine), velocity.config.n_steps,
                                        stride=field_stride, backward=True)
    return io.save_image(out_file, warp_array(data, affine, inverse.numpy(), ref_affine, interpolation=interpolation),
                         ref_affine)


def trajectory_frames(velocity, moving: np.ndarray, moving_affine: np.ndarray, fixed_shape, fixed_affine: np.ndarray,
                      n_times: int, *,
                      field_stride: int | tuple[int, int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """The moving image carried along the flow to ``n_times`` evenly spaced times of [0, 1].

    Frame ``k`` is ``moving(x + S_t(x))`` on the fixed grid with ``t = k / (n_times - 1)``
    and ``S_t`` the Euler path interpolated linearly in time between step
    boundaries (exact for the Euler scheme, whose path is piecewise linear:
    :func:`~nipype_inrlddmm.engine.flow.path_at_times`).  Frame 0 is the
    moving image resampled onto the fixed grid; the last frame is the warped
    image (the same integration as the fine stage's field when
    ``field_stride`` is the registration's).  Returns ``(frames (X, Y, Z, K)
    float32, times (K,))``; memory is ``K`` displacement fields.
    """
    if n_times < 2:
        raise ValueError(f"a trajectory needs at least 2 times (t = 0 and t = 1), got {n_times}")
    times = np.linspace(0.0, 1.0, n_times)
    fixed_affine_t = as_tensor(fixed_affine)
    with torch.no_grad():
        fields = engine.dense_path(velocity, tuple(fixed_shape), fixed_affine_t, velocity.config.n_steps,
                                   times.tolist(), stride=field_stride)
        moving_t, moving_affine_t = as_tensor(moving), as_tensor(moving_affine)
        frames = [engine.warp(moving_t, moving_affine_t, field, fixed_affine_t) for field in fields]
    return torch.stack(frames, dim=-1).numpy(), times


def write_trajectory(frames: np.ndarray, times: np.ndarray, affine: np.ndarray, out_dir, *, title: str = "") -> dict:
    """Write trajectory frames as a 4-D NIfTI and an animated GIF of one slice; keys as :data:`TRAJECTORY_OUTPUTS`.

    The NIfTI's 4th axis is time (its spacing ``1 / (K - 1)``, in the unit
    interval of the flow); the GIF shows the axial slice through the grid's
    centre.
    """
    from ..reports import qc  # matplotlib is imported only by the stages that draw, not by every interface

    out = Path(out_dir)
    image = nib.Nifti1Image(np.asarray(frames, np.float32), affine)
    image.header.set_xyzt_units("mm")  # the flow's time has no physical unit: left "unknown"
    image.header["pixdim"][4] = float(times[1] - times[0])
    with io.atomic_path(out / TRAJECTORY_OUTPUTS["trajectory"]) as temporary:
        image.to_filename(str(temporary))
    return {
        "trajectory": out / TRAJECTORY_OUTPUTS["trajectory"],
        "animation": qc.write_animation(out / TRAJECTORY_OUTPUTS["animation"], frames, times, affine, title=title),
    }


def run_trajectory(model, moving, fixed, out_dir, *, n_times: int,
                   field_stride: int | tuple[int, int, int] | None = engine.RegistrationConfig().field_stride,
                   title: str = "") -> dict[str, Path]:
    """:func:`trajectory_frames` from files (the fine stage's checkpoint, the moving and fixed images), written."""
    moving_data, moving_affine = io.load_image(moving)
    fixed_shape, fixed_affine = _reference_grid(fixed, "fixed image")
    velocity = io.load_checkpoint(model, shape=fixed_shape, affine=fixed_affine)
    frames, times = trajectory_frames(velocity, moving_data, moving_affine, fixed_shape, fixed_affine, n_times,
                                      field_stride=field_stride)
    return write_trajectory(frames, times, fixed_affine, out_dir, title=title)


def estimate_affine(pair: Pair, moving, fixed, config: AffineConfig = AffineConfig(), *, seed=0,
                    device="auto") -> np.ndarray:
    """The affine ``A`` (fixed world -> moving world, RAS mm, float64 ``(4, 4)``) that pre-aligns a pair.

    :func:`~nipype_inrlddmm.engine.affine.checked_affine_register` on the
    normalised images, inside the fixed mask when the pair has one: a
    degenerate or worse-than-its-start result falls back to a rigid one,
    then to the best start, each rejection logged as a warning naming the
    pair.  ``moving`` and ``fixed`` (the paths) name the image in any error.
    """
    device = engine.resolve_device(device)
    moving_t, fixed_t = (normalised(as_tensor(a, device), path) for a, path in ((pair.moving, moving),
                                                                                (pair.fixed, fixed)))
    # float64 geometry: the transform is what this step returns, keep it exact.
    moving_affine, fixed_affine = (torch.from_numpy(a).to(device) for a in (pair.moving_affine, pair.fixed_affine))
    mask = None if pair.fixed_mask is None else torch.from_numpy(pair.fixed_mask).to(device)
    matrix, rejected = checked_affine_register(moving_t, moving_affine, fixed_t, fixed_affine, config,
                                               fixed_mask=mask, seed=seed)
    for note in rejected:
        LOGGER.warning("%s -> %s: %s", moving, fixed, note)
    return matrix.cpu().numpy()


def write_aligned(pair: Pair, matrix: np.ndarray, out_dir) -> dict[str, Path]:
    """Write the pair's moving image (and labels) with the header ``inv(A) @ moving_affine``, and ``A``.

    Keys as :data:`AFFINE_OUTPUTS` (``aligned_labels`` only when the pair has moving labels).
    """
    aligned = np.linalg.inv(matrix) @ pair.moving_affine
    out = Path(out_dir)
    outputs = {
        "aligned_image": io.save_image(out / AFFINE_OUTPUTS["aligned_image"], pair.moving, aligned),
        "transform": io.save_itk_affine(out / AFFINE_OUTPUTS["transform"], matrix),
    }
    if pair.moving_labels is not None:
        outputs["aligned_labels"] = io.save_image(out / AFFINE_OUTPUTS["aligned_labels"], pair.moving_labels,
                                                  aligned)
    return outputs


def affine_init(moving, fixed, out_dir, *, moving_labels=None, fixed_mask=None, transform_file=None,
                config: AffineConfig = AffineConfig(), seed=0, device="auto") -> dict[str, Path]:
    """Pre-align the moving image by rewriting its header, never its voxels.

    The affine ``A`` (fixed world -> moving world, RAS mm) is estimated by
    :func:`estimate_affine`, or read from ``transform_file`` (ITK
    ``.txt``/ANTs ``.mat``) instead.  The moving image (and its labels) are
    written with the voxel -> world matrix ``inv(A) @ moving_affine``
    (:func:`write_aligned`): in that header the moving image lies on the
    fixed image in world space, so the deformable stages start aligned, and
    no resampling blurs it.  ``A`` is also written as an ITK text transform.
    Keys as :data:`AFFINE_OUTPUTS` (``aligned_labels`` only when given).
    """
    pair = load_pair(moving, fixed, moving_labels=moving_labels, fixed_mask=fixed_mask)
    if transform_file:
        matrix = io.load_itk_affine(transform_file)
    else:
        matrix = estimate_affine(pair, moving, fixed, config, seed=seed, device=device)
    return write_aligned(pair, matrix, out_dir)
