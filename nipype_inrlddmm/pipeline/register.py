"""One registration from files to every output: what ``inrlddmm register`` runs.

:func:`register_files` reads and validates the inputs once, keeps every
intermediate in memory (the field, the warped labels, the Jacobian
determinant) and derives each output from it: the evaluation and the QC
figure never read back what was just written.  :class:`PhaseClock` records
where the time goes, phase by phase.
"""

from __future__ import annotations

import contextlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .. import engine, io
from ..api import register
from ..engine.affine import AffineConfig
from ..evaluation import evaluate_labels, metrics, write_evaluation
from ..reports import qc
from .inputs import load_pair, warm_start_model
from .outputs import REGISTER_OUTPUTS, fine_writers
from .stages import estimate_affine, torch_threads, trajectory_frames, warp_array, write_aligned, write_trajectory


class PhaseClock:
    """Wall seconds per named phase: ``with clock("write"): ...``; a phase entered twice adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _stage_seconds(log: list[dict]) -> float:
    """The optimisation's seconds in a registration log: each stage's last row holds its duration."""
    last = {}
    for row in log:
        last[row["stage"]] = row["seconds"]
    return sum(last.values())


def register_files(
    moving, fixed, out_dir, *, moving_labels=None, fixed_labels=None, fixed_mask=None, label_names=None,
    label_volume=None, affine=None, affine_start="moments", init_model=None, device="auto", num_threads=None,
    progress=True, trajectory=0, moving_source=None, **options,
) -> dict:
    """Register two NIfTI files and write every output into ``out_dir``.

    Writes ``warped.nii.gz``, ``displacement.nii.gz`` (ITK/ANTs),
    ``model.pt``, ``log.csv``, ``qc.png`` (:mod:`nipype_inrlddmm.reports.qc`) and,
    with both label maps, ``warped_labels.nii.gz``, ``dice.csv`` and
    ``dice.json`` (4-D label files: one label per volume, or volume
    ``label_volume`` alone, named "volume k" unless ``label_names`` says
    otherwise); with ``trajectory=K`` (K >= 2) ``trajectory.nii.gz`` and
    ``trajectory.gif``, the moving image at K times of the flow.  With
    ``affine`` (``"rigid"`` or ``"affine"``) the moving image is first
    pre-aligned, as ANTs does before SyN, the search starting from
    ``affine_start`` (one of :data:`~nipype_inrlddmm.engine.affine.STARTS`;
    :func:`~nipype_inrlddmm.pipeline.affine_init`: ``affine.txt``, and
    ``moving_aligned.nii.gz`` with its header rewritten, voxels untouched),
    and registered from there; ``antsApplyTransforms ... -t
    displacement.nii.gz -t affine.txt`` applies both to the original moving
    image.  With ``init_model`` (the ``model.pt`` of a registration of the
    same moving image onto a fixed image whose grid covers this one: the
    previous fraction of a course), a warm start: the fine stage alone
    continues that network, ``warm_iterations`` from ``warm_learning_rate``
    (:func:`~nipype_inrlddmm.pipeline.warm_start_model` checks the file and the
    grids, and that the model was fitted with this moving image: each
    ``model.pt`` records its moving image's
    :func:`~nipype_inrlddmm.io.image_fingerprint`, naming
    ``moving_source``, default ``moving``, as its file).  All inputs are
    validated before any optimisation starts, and a run that fails leaves
    ``out_dir`` as it found it
    (:func:`~nipype_inrlddmm.io.staged_folder`).

    Returns the written paths; the ``summary`` of det J (with labels also
    of the Dice, whose ``rows`` come too, and ``mean_dice_before``: the
    mean Dice of the moving labels undeformed); and ``timings``, the
    seconds of each phase (read, pre-align, stages, dense field and warp,
    labels, evaluation, QC, trajectory, and write: the volumes are
    compressed by threads while the phases after the registration run, so
    this is the wait left at the end).
    """
    if trajectory and trajectory < 2:
        raise io.InputError("--trajectory", f"needs at least 2 times (t = 0 and t = 1), got {trajectory}")
    config = engine.config_from_options(**options)
    clock, final, title = PhaseClock(), Path(out_dir), Path(moving).name

    def say(what: str) -> None:  # what runs, for phases that take seconds without a progress bar
        if progress:
            print(f"inrlddmm: {what}", file=sys.stderr, flush=True)
    with clock("read"):
        pair = load_pair(moving, fixed, moving_labels=moving_labels, fixed_labels=fixed_labels,
                         fixed_mask=fixed_mask, label_volume=label_volume)
        names = io.load_label_names(label_names) if label_names else pair.fixed_label_names
        initial = fingerprint = None
        if init_model:
            fingerprint = io.image_fingerprint(moving_source or moving, pair.moving, pair.moving_affine)
            initial = warm_start_model(init_model, fixed, pair.fixed.shape, pair.fixed_affine,
                                       model_options={name: value for name, value in options.items()
                                                      if name in engine.ModelConfig.__dataclass_fields__},
                                       moving=fingerprint)
            say(f"warm start from {init_model}: no coarse stage or distillation, {config.warm_iterations} fine "
                "iterations")
    evaluate = pair.moving_labels is not None and pair.fixed_labels is not None
    fixed_affine, moving_affine = pair.fixed_affine, pair.moving_affine
    outputs = {}
    # Compressing a volume takes a core for seconds: threads write while the phases after the registration run.
    # Every output goes to a staging folder first, moved into out_dir only once all of them are written.
    with io.staged_folder(final) as out_dir, torch_threads(num_threads), \
            ThreadPoolExecutor(max_workers=2) as writer:
        if affine:
            with clock("pre-align"):
                say(f"pre-aligning ({affine})")
                matrix = estimate_affine(pair, moving, fixed, AffineConfig(transform=affine, start=affine_start),
                                         seed=config.seed, device=device)
                aligned = write_aligned(pair, matrix, out_dir)
            outputs.update(aligned_image=aligned["aligned_image"], affine_transform=aligned["transform"])
            moving_affine = np.linalg.inv(matrix) @ pair.moving_affine

        start = time.perf_counter()
        mask = None if pair.fixed_mask is None else (pair.fixed_mask, fixed_affine)
        result = register((pair.moving, moving_affine), (pair.fixed, fixed_affine), fixed_mask=mask, initial=initial,
                          config=config, device=device, progress=progress)
        clock.seconds["stages"] = _stage_seconds(result.log)
        clock.seconds["dense field and warp"] = time.perf_counter() - start - clock.seconds["stages"]

        fingerprint = fingerprint or io.image_fingerprint(moving_source or moving, pair.moving, pair.moving_affine)
        writers = fine_writers(out_dir, result.model, result.displacement, result.warped, fixed_shape=pair.fixed.shape,
                               fixed_affine=fixed_affine, moving=fingerprint)
        writes = {name: writer.submit(write) for name, write in writers.items()}
        writes["log"] = writer.submit(io.write_csv, out_dir / REGISTER_OUTPUTS["log"], result.log)
        warped_labels = before = dice_before = dice_after = None
        if evaluate:
            with clock("labels"):
                say("carrying the labels")
                on_device = engine.resolve_device(device)  # the registration's: labels carried where it ran
                warped_labels = warp_array(pair.moving_labels, moving_affine, result.displacement, fixed_affine,
                                           interpolation="label", device=on_device)
                writes["warped_labels"] = writer.submit(io.save_image, out_dir / REGISTER_OUTPUTS["warped_labels"],
                                                        warped_labels, fixed_affine)
                before = qc.labels_before(pair.moving_labels, moving_affine, pair.fixed.shape, fixed_affine,
                                          device=on_device)
        with clock("evaluation"):
            say("evaluating: Dice, HD95, det J")
            jacobian = metrics.jacobian_determinant(result.displacement, fixed_affine)
            if evaluate:
                rows, summary = evaluate_labels(warped_labels, pair.fixed_labels, fixed_affine, names=names,
                                                mask=pair.fixed_mask, jacobian=jacobian)
                outputs["dice"], _ = write_evaluation(rows, summary, out_dir / REGISTER_OUTPUTS["dice"],
                                                      out_dir / REGISTER_OUTPUTS["dice_summary"])
                labels = [row["label"] for row in rows]
                dice_after = {row["label"]: row["dice"] for row in rows}
                dice_before = dict(zip(labels, metrics.dice_scores(before, pair.fixed_labels, labels,
                                                                   pair.fixed_mask))) if labels else {}
                outputs.update(rows=rows, summary=summary,
                               mean_dice_before=float(np.nanmean(list(dice_before.values()))) if labels else None)
            else:
                outputs["summary"] = metrics.determinant_summary(jacobian)
        with clock("QC"):
            say("drawing the QC figure")
            outputs["qc"] = qc.qc_figure(
                out_dir / REGISTER_OUTPUTS["qc"], pair.fixed, fixed_affine, pair.moving, moving_affine, result.warped,
                fixed_labels=pair.fixed_labels if evaluate else None, moving_labels_on_fixed=before,
                warped_labels=warped_labels, dice_before=dice_before, dice_after=dice_after, jacobian=jacobian,
                mask=pair.fixed_mask, label_names=names, title=title,
            )
        if trajectory:
            with clock("trajectory"):
                say("drawing the trajectory")
                frames, times = trajectory_frames(result.model, pair.moving, moving_affine, pair.fixed.shape,
                                                  fixed_affine, trajectory, field_stride=config.field_stride)
                outputs.update(write_trajectory(frames, times, fixed_affine, out_dir, title=title))
        with clock("write"):  # what is left of it once everything else is done
            outputs |= {name: write.result() for name, write in writes.items()}
    outputs = {name: final / value.name if isinstance(value, Path) else value for name, value in outputs.items()}
    outputs["timings"] = clock.seconds
    return outputs
