"""One registration as a Nipype workflow, and the execution settings every workflow here uses.

:func:`init_registration_wf`: inputnode -> [AffineInit] -> CoarseINR ->
DistillINR -> FineINR -> ApplyWarp (labels) -> DiceEval -> outputnode, with
a QCReport figure and, on request, the Trajectory of the flow;
:func:`estimate_mem_gb` sizes each node's ``mem_gb``.

Caching rests on Nipype's own hashing, with these choices:

* files are hashed by ``timestamp`` (path, size, mtime; Nipype's default,
  pinned here): cheap on large fields, and every stage rewrites its outputs
  atomically, so a rerun stage always invalidates what follows it.
  Touching an input file (even with identical content) reruns its chain.
* every interface hashes the package ``version``: Nipype never hashes
  code, so upgrading the package reruns everything;
* ``num_threads`` and ``progress`` are not hashed, so a study can be
  resumed with another plugin or thread count; note that on the CPU the
  last bits of a result depend on the thread count (bit-identical results
  need equal ``num_threads``);
* ``remove_unnecessary_outputs`` is off, so connecting another output
  later does not change the upstream nodes' hashes (Nipype adds the list of
  used outputs to the hash when it is on).

A failed node leaves a crash file (text) in ``<work_dir>/crash``; with
``stop_on_first_crash`` off (the default) the other patients go on.
"""

from __future__ import annotations

import math

from nipype import Node, Workflow
from nipype.interfaces.utility import IdentityInterface

from .. import engine
from ..interfaces import AffineInit, ApplyWarp, CoarseINR, DiceEval, DistillINR, FineINR, QCReport, Trajectory
from ..interfaces.base import stage_inputs


#: Peak resident memory of the nodes that do not optimise, as (GB at any size, bytes per voxel of the
#: larger image), measured on phantom pairs of 64x56x24 and 160x140x60 voxels and rounded up.
_MEMORY = {
    "affine": (0.4, 200), "warp_labels": (0.3, 200), "dice": (0.3, 300), "qc": (0.5, 300), "trajectory": (0.6, 200),
}
#: The optimisation stages, whose memory the engine estimates (and its guard checks before starting).
OPTIMISATION_STAGES = ("coarse", "distill", "fine")
#: Resident memory (GB) of a node's process before its work (the interpreter, torch, Nipype: 0.3 GB
#: measured), and the headroom over the engine's estimate of what the work adds.
_PROCESS_GB, _HEADROOM = 0.5, 1.25
#: Grid assumed when the image size is not known when the workflow is built.
_DEFAULT_SHAPE = (128, 128, 128)

#: Execution settings of both workflows (see the module docstring).
EXECUTION = {
    "hash_method": "timestamp",
    "remove_unnecessary_outputs": False,
    "stop_on_first_crash": False,
    "crashfile_format": "txt",
    # Nipype's default 2 s between scheduler polls dominates small studies.
    "poll_sleep_duration": 0.05,
}

def estimate_mem_gb(stage: str, shape=None, config: engine.RegistrationConfig | None = None) -> float:
    """Nipype ``mem_gb`` of a node for images of ``shape`` (the larger of the pair; None: 128^3).

    An optimisation stage asks for the engine's own estimate
    (:func:`~nipype_inrlddmm.engine.estimate_memory` with ``config``, the
    one its memory guard checks) with headroom, above the process's own
    memory: a SLURM job's ``--mem`` always admits the stage it runs.
    """
    shape = tuple(int(n) for n in (shape or _DEFAULT_SHAPE))
    if stage in OPTIMISATION_STAGES:
        total = engine.estimate_memory(stage, shape, config or engine.config_from_options())["total"]
        return round(_PROCESS_GB + _HEADROOM * total / 1e9, 2)
    base_gb, per_voxel = _MEMORY[stage]
    return round(base_gb + math.prod(shape) * per_voxel / 1e9, 2)


def _affine_kind(affine) -> str | None:
    if affine in (False, None):
        return None
    if affine is True:
        return "affine"
    if affine in ("rigid", "affine"):
        return affine
    raise ValueError(f"affine must be False, True, 'rigid' or 'affine', got {affine!r}")


def init_registration_wf(
    *,
    name: str = "inrlddmm_wf",
    num_threads: int = 1,
    affine=False,
    affine_options: dict | None = None,
    evaluate: bool = True,
    device: str = "auto",
    image_shape: tuple[int, int, int] | None = None,
    progress: bool = False,
    qc: bool = True,
    trajectory: int = 0,
    warm_start: bool = False,
    **options,
) -> Workflow:
    """Coarse-to-fine INR-LDDMM of one pair, with label propagation and Dice.

    Coarse stage, distillation, fine stage, then the warp of the labels,
    their evaluation and the QC figure; with ``affine`` an
    :class:`~nipype_inrlddmm.interfaces.AffineInit` node pre-aligns the
    moving image first.  With ``warm_start`` the fine stage alone
    continues a given model (a previous fraction's) for ``warm_iterations``.

    .. workflow::
        :graph2use: orig
        :simple_form: yes

        from nipype_inrlddmm.workflows import init_registration_wf
        wf = init_registration_wf(affine=True, trajectory=5)

    Parameters
    ----------
    name : workflow name.
    num_threads : torch threads of every optimisation node, declared to
        Nipype as its ``n_procs`` (MultiProc never runs more threads than its
        own ``n_procs``).
    affine : ``False``; ``True`` or ``"affine"``, or ``"rigid"``: pre-align
        with :class:`~nipype_inrlddmm.interfaces.AffineInit` (then the
        inputnode also has ``affine_transform``: an ITK/ANTs affine to use
        instead of estimating one).
    affine_options : inputs of ``AffineInit`` (``start``, ``iterations``,
        ``shrink_factors``, ...).
    evaluate : warp the moving labels and compute Dice (needs both label maps).
    device : ``"auto"``, ``"cpu"`` or ``"cuda"``.
    image_shape : grid of the larger image, for the nodes' ``mem_gb``
        (:func:`estimate_mem_gb`; default: 128^3).
    progress : progress bars of the optimisation stages.
    qc : draw the QC figure (:class:`~nipype_inrlddmm.interfaces.QCReport`,
        node ``qc``; its ``title`` input names the patient).
    trajectory : with ``K >= 2``, write the moving image at ``K`` times of
        the flow (:class:`~nipype_inrlddmm.interfaces.Trajectory`, node
        ``trajectory``): a 4-D NIfTI and an animated GIF.
    warm_start : no coarse stage or distillation: the inputnode's
        ``init_model`` (the ``model.pt`` of a registration of the same
        moving image onto a fixed grid covering this one) starts the fine
        stage (:func:`~nipype_inrlddmm.pipeline.warm_start_model`), which runs
        ``warm_iterations`` from ``warm_learning_rate``.
    **options : registration settings, as
        :func:`nipype_inrlddmm.engine.config_from_options` (``seed``,
        ``fine_iterations``, ``width``, ``similarity``, ``reg_weight``, ...),
        validated here.

    Notes
    -----
    Inputs (``inputnode``): ``moving_image``, ``fixed_image``,
    ``moving_labels``, ``fixed_labels``, ``fixed_mask`` (optional: where
    patches are drawn and Dice is evaluated), ``label_names`` (optional).

    With ``warm_start`` also ``init_model``.

    Outputs (``outputnode``): ``coarse_model``, ``coarse_displacement``,
    ``distilled_model`` (none of the three with ``warm_start``), ``model``,
    ``displacement`` (ITK/ANTs field on the fixed grid), ``warped_image``,
    the logs of the stages that run, and with
    ``evaluate`` ``warped_labels``, ``dice_csv``, ``dice_json``,
    ``mean_dice``; with ``affine`` ``aligned_image`` and ``affine_transform``;
    with ``qc`` ``qc_figure``; with ``trajectory`` ``trajectory`` and
    ``trajectory_animation``.

    Examples
    --------
    >>> from nipype_inrlddmm.workflows import init_registration_wf
    >>> wf = init_registration_wf(fine_iterations=100, num_threads=2)
    >>> sorted(wf.list_node_names())
    ['coarse', 'dice', 'distill', 'fine', 'inputnode', 'outputnode', 'qc', 'warp_labels']
    >>> wf.get_node("fine").inputs.iterations, wf.get_node("fine").n_procs
    (100, 2)
    """
    config = engine.config_from_options(**options)
    affine_kind = _affine_kind(affine)
    if trajectory and trajectory < 2:
        raise ValueError(f"trajectory needs at least 2 times (t = 0 and t = 1), got {trajectory}")
    common = {"device": device, "num_threads": num_threads}

    def node(interface, stage, threads=True):
        return Node(interface, name=stage, mem_gb=estimate_mem_gb(stage, image_shape, config),
                    n_procs=num_threads if threads else 1)

    workflow = Workflow(name=name)
    workflow.config["execution"] = dict(EXECUTION)
    fields = ["moving_image", "fixed_image", "moving_labels", "fixed_labels", "fixed_mask", "label_names"]
    outputs = ["model", "displacement", "warped_image", "fine_log"]
    if warm_start:
        fields.append("init_model")
    else:
        outputs = ["coarse_model", "coarse_displacement", "coarse_log", "distilled_model", "distill_log", *outputs]
    if evaluate:
        outputs += ["warped_labels", "dice_csv", "dice_json", "mean_dice"]
    if affine_kind:
        fields.append("affine_transform")
        outputs += ["aligned_image", "affine_transform"]
    if qc:
        outputs.append("qc_figure")
    if trajectory:
        outputs += ["trajectory", "trajectory_animation"]
    inputnode = Node(IdentityInterface(fields=fields), name="inputnode")
    outputnode = Node(IdentityInterface(fields=outputs), name="outputnode")

    if warm_start:
        fine = node(FineINR(**stage_inputs(engine.warm_config(config), "fine"), warm_start=True, progress=progress,
                            **common), "fine")
    else:
        fine = node(FineINR(**stage_inputs(config, "fine"), progress=progress, **common), "fine")

    moving, moving_labels = (inputnode, "moving_image"), (inputnode, "moving_labels")
    if affine_kind:
        align = node(AffineInit(transform=affine_kind, seed=config.seed, **common, **(affine_options or {})),
                     "affine")
        workflow.connect([
            (inputnode, align, [("moving_image", "moving_image"), ("fixed_image", "fixed_image"),
                                ("fixed_mask", "fixed_mask"), ("affine_transform", "in_transform")]),
            (align, outputnode, [("aligned_image", "aligned_image"), ("transform", "affine_transform")]),
        ])
        if evaluate:
            workflow.connect(inputnode, "moving_labels", align, "moving_labels")
        moving, moving_labels = (align, "aligned_image"), (align, "aligned_labels")

    workflow.connect([
        (moving[0], fine, [(moving[1], "moving_image")]),
        (inputnode, fine, [("fixed_image", "fixed_image"), ("fixed_mask", "fixed_mask")]),
        (fine, outputnode, [("model", "model"), ("displacement", "displacement"),
                            ("warped_image", "warped_image"), ("log", "fine_log")]),
    ])
    if warm_start:
        workflow.connect(inputnode, "init_model", fine, "init_model")
    else:
        coarse = node(CoarseINR(**stage_inputs(config, "coarse"), progress=progress, **common), "coarse")
        distill = node(DistillINR(**stage_inputs(config, "distill"), progress=progress, **common), "distill")
        workflow.connect([
            (moving[0], coarse, [(moving[1], "moving_image")]),
            (inputnode, coarse, [("fixed_image", "fixed_image"), ("fixed_mask", "fixed_mask")]),
            (coarse, distill, [("model", "coarse_model"), ("displacement", "coarse_displacement")]),
            (inputnode, distill, [("fixed_image", "fixed_image")]),
            (distill, fine, [("model", "init_model")]),
            (coarse, outputnode, [("model", "coarse_model"), ("displacement", "coarse_displacement"),
                                  ("log", "coarse_log")]),
            (distill, outputnode, [("model", "distilled_model"), ("log", "distill_log")]),
        ])
    if evaluate:
        warp_labels = node(ApplyWarp(interpolation="label", out_file="warped_labels.nii.gz"), "warp_labels",
                           threads=False)
        dice = node(DiceEval(), "dice", threads=False)
        workflow.connect([
            (moving_labels[0], warp_labels, [(moving_labels[1], "in_file")]),
            (fine, warp_labels, [("displacement", "displacement")]),
            (inputnode, warp_labels, [("fixed_image", "reference_image")]),
            (warp_labels, dice, [("out_file", "warped_labels")]),
            (fine, dice, [("displacement", "displacement")]),
            (inputnode, dice, [("fixed_labels", "fixed_labels"), ("label_names", "label_names"),
                               ("fixed_mask", "mask")]),
            (warp_labels, outputnode, [("out_file", "warped_labels")]),
            (dice, outputnode, [("out_csv", "dice_csv"), ("out_json", "dice_json"), ("mean_dice", "mean_dice")]),
        ])
    if qc:
        figure = node(QCReport(), "qc", threads=False)
        workflow.connect([
            (inputnode, figure, [("fixed_image", "fixed_image"), ("fixed_mask", "fixed_mask"),
                                 ("label_names", "label_names")]),
            (moving[0], figure, [(moving[1], "moving_image")]),
            (fine, figure, [("warped_image", "warped_image"), ("displacement", "displacement")]),
            (figure, outputnode, [("out_file", "qc_figure")]),
        ])
        if evaluate:
            workflow.connect([
                (inputnode, figure, [("fixed_labels", "fixed_labels")]),
                (moving_labels[0], figure, [(moving_labels[1], "moving_labels")]),
                (warp_labels, figure, [("out_file", "warped_labels")]),
            ])
    if trajectory:
        path = node(Trajectory(n_times=trajectory, field_stride=config.field_stride, num_threads=num_threads),
                    "trajectory")
        workflow.connect([
            (moving[0], path, [(moving[1], "moving_image")]),
            (inputnode, path, [("fixed_image", "fixed_image")]),
            (fine, path, [("model", "model")]),
            (path, outputnode, [("trajectory", "trajectory"), ("animation", "trajectory_animation")]),
        ])
    return workflow


