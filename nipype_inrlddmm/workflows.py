"""Nipype workflows: one registration, and a study of many patients.

* :func:`init_registration_wf`: inputnode -> [AffineInit] -> CoarseINR ->
  DistillINR -> FineINR -> ApplyWarp (labels) -> DiceEval -> outputnode,
  with a QCReport figure and, on request, the Trajectory of the flow.
* :func:`init_study_wf`: that registration once per manifest row (iterables
  on the patient id), a JoinNode writing ``study_dice.csv``, and DataSinks
  into ``out_dir/<patient>/``; :func:`run_study` runs it and writes the
  table and ``report.html`` even when some patients fail.

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

On SLURM (:func:`run_study` with ``plugin="SLURM"`` or ``"SLURMGraph"``)
every node is a job whose ``sbatch`` arguments come from the node's own
declared resources (:func:`set_slurm_resources`: ``-c n_procs``, ``--mem``
from ``mem_gb``, a ``--time`` per stage), followed by the user's
``sbatch_args``; the job runs the Python that submitted it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import fcntl
import gc
import getpass
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import nibabel as nib
from nipype import JoinNode, Node, Workflow, logging
from nipype.interfaces.base import isdefined, traits
from nipype.interfaces.io import DataSink
from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline.plugins import MultiProcPlugin as _NipypeMultiProcPlugin
from nipype.pipeline.plugins import SLURMPlugin as _NipypeSLURMPlugin
from nipype.pipeline.plugins.multiproc import process_initializer, run_node
from nipype.utils.filemanip import loadpkl

from . import engine, io, steps
from . import report
from .interfaces import (AffineInit, ApplyWarp, CoarseINR, DiceEval, DicomToNifti, DistillINR, FineINR, GatherDice,
                         LabelsToRTStruct, QCReport, RTStructToLabels, SelectPatient, Trajectory)
from .interfaces.base import stage_inputs
from .worker_server import start_worker_server

LOGGER = logging.getLogger("nipype.workflow")

#: Peak resident memory of the nodes that do not optimise, as (GB at any size, bytes per voxel of the
#: larger image), measured on phantom pairs of 64x56x24 and 160x140x60 voxels and rounded up.
_MEMORY = {
    "affine": (0.4, 200), "warp_labels": (0.3, 200), "dice": (0.3, 300), "qc": (0.5, 300), "trajectory": (0.6, 200),
}
#: The optimisation stages, whose memory the engine estimates (and its guard checks before starting).
_STAGES = ("coarse", "distill", "fine")
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

#: Plugin arguments added by :func:`run_study` unless given.  MultiProc's default ``fork`` start
#: method hangs once the parent has run torch; forkserver does not.  The SLURM plugin polls ``squeue``
#: once per queued job and poll, hence Nipype's 2 s there rather than :data:`EXECUTION`'s; at most
#: ``max_jobs`` jobs of a study are queued at once.  ``poll_sleep_duration`` and
#: ``job_finished_timeout`` (how long a finished job's result file may take to appear: raise it on
#: NFS) are moved into the workflow's execution config.  SLURMGraph submits only unfinished nodes.
PLUGIN_DEFAULTS = {
    "MultiProc": {"mp_context": "forkserver"},
    # sbatch is retried for a minute (Nipype's default: twice, 2 s apart), so a controller restart does not
    # fail the node being submitted.
    "SLURM": {"max_jobs": 100, "poll_sleep_duration": 2.0, "job_finished_timeout": 5.0, "max_tries": 30,
              "retry_timeout": 2.0},
    "SLURMGraph": {"dont_resubmit_completed_jobs": True},
}

#: Nipype plugins that run nodes as SLURM jobs.
SLURM_PLUGINS = ("SLURM", "SLURMGraph")
#: ``sbatch --time`` of each node's job by node name (any other node: ``"default"``).  Generous: the
#: optimisation stages run a fixed number of iterations on fixed-size patch batches, minutes on one
#: CPU thread for the defaults; the limit only has to stop a runaway job.  Users override it with
#: ``--time`` in their ``sbatch_args`` (the last ``--time`` wins).
SLURM_TIME = {"affine": "2:00:00", "coarse": "4:00:00", "distill": "2:00:00", "fine": "4:00:00",
              "default": "1:00:00"}
#: Smallest ``--mem`` of a job: its Python with torch and Nipype imported already holds ~0.3 GB.
SLURM_MIN_MEM_GB = 1.0
#: Marks ``node.plugin_args`` written by :func:`set_slurm_resources` (others are the user's).
_DERIVED = "inrlddmm_derived"

#: Outputs copied into ``out_dir/<patient>/`` (registration outputnode field -> kept file name).
SINK_FIELDS = ("warped_image", "displacement", "model", "warped_labels", "dice_csv", "dice_json", "coarse_log",
               "distill_log", "fine_log", "affine_transform", "qc_figure", "trajectory", "trajectory_animation")

#: A study registers each kind of manifest row in a branch of its own, with its own iterables over its
#: patients (Nipype runs every node of a graph for every iterable): (DICOM series, warm start) -> the prefix
#: of the branch's node names.  Rows of NIfTI files registered from scratch keep the plain names.
BRANCHES = {(False, False): "", (False, True): "warm_", (True, False): "dicom_", (True, True): "dicom_warm_"}
#: How the study report names each branch's settings.
_BRANCH_TITLES = {"": "", "warm_": " (warm start)", "dicom_": " (DICOM)", "dicom_warm_": " (DICOM, warm start)"}


def estimate_mem_gb(stage: str, shape=None, config: engine.RegistrationConfig | None = None) -> float:
    """Nipype ``mem_gb`` of a node for images of ``shape`` (the larger of the pair; None: 128^3).

    An optimisation stage asks for the engine's own estimate
    (:func:`~nipype_inrlddmm.engine.estimate_memory` with ``config``, the
    one its memory guard checks) with headroom, above the process's own
    memory: a SLURM job's ``--mem`` always admits the stage it runs.
    """
    shape = tuple(int(n) for n in (shape or _DEFAULT_SHAPE))
    if stage in _STAGES:
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
        stage (:func:`~nipype_inrlddmm.steps.warm_start_model`), which runs
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


def _largest_image(rows: list[dict]) -> tuple[int, int, int] | None:
    """Grid of the largest readable image of a manifest, by voxel count (headers only)."""
    shapes = []
    for row in rows:
        for column in ("moving", "fixed"):
            try:
                shapes.append(tuple(int(n) for n in nib.load(row[column]).shape[:3]))
            except Exception:  # an unreadable file fails its own patient later, with a clear message
                continue
    return max(shapes, key=math.prod, default=None)


def init_study_wf(
    *,
    manifest,
    out_dir,
    work_dir=None,
    name: str = "inrlddmm_study",
    label_names=None,
    num_threads: int = 1,
    affine=False,
    affine_options: dict | None = None,
    device: str = "auto",
    progress: bool = False,
    trajectory: int = 0,
    **options,
) -> Workflow:
    """A registration per manifest row, the Dice of each, and a study table.

    One :func:`init_registration_wf` per manifest row (Nipype iterables over
    the patient ids), a ``JoinNode`` that gathers the study table and
    ``DataSink`` nodes that copy each patient's results into
    ``out_dir/<patient>/``.

    .. workflow::
        :graph2use: colored
        :simple_form: yes

        import shutil
        import tempfile
        from pathlib import Path
        from nipype_inrlddmm.phantom import write_cohort
        from nipype_inrlddmm.workflows import init_study_wf
        tmp = Path(tempfile.mkdtemp())
        manifest = write_cohort(tmp / "data", 2, shape=(24, 20, 12))
        wf = init_study_wf(manifest=manifest, out_dir=tmp / "out", work_dir=tmp / "work")
        shutil.rmtree(tmp)  # the graph needs the workflow, not the cohort it was built from

    Parameters
    ----------
    manifest : TSV/CSV with columns ``patient``, ``moving``, ``fixed``,
        ``moving_labels``, ``fixed_labels`` (or, where ``moving`` and
        ``fixed`` are DICOM series folders, ``moving_rtstruct`` and
        ``fixed_rtstruct``) and optionally ``fixed_mask`` and
        ``init_model`` (paths relative to the manifest); see
        :func:`nipype_inrlddmm.io.read_manifest`.  A malformed manifest
        (missing column, duplicate patient ids) raises
        :class:`~nipype_inrlddmm.io.InputError` here; a file that does not
        exist, or a label map that cannot be used, fails only its own
        patient (in ``select``, before any optimisation), with a warning
        listing the missing files now.
    out_dir : results: ``out_dir/<patient>/`` (warped.nii.gz,
        displacement.nii.gz, model.pt, warped_labels.nii.gz, dice.csv,
        dice.json, the stage logs, qc.png, affine.txt with ``affine``,
        trajectory.nii.gz and trajectory.gif with ``trajectory``;
        rtstruct.dcm and labels.tsv for DICOM series),
        ``out_dir/study_dice.csv`` and ``out_dir/report.html``.
    work_dir : Nipype's working directory (the cache; crash files in
        ``work_dir/crash``); None leaves ``base_dir`` unset.
    label_names : JSON/TSV of label names for every patient given label
        maps (optional; RTSTRUCTs name their ROIs).
    num_threads, affine, affine_options, device, progress, trajectory : as
        :func:`init_registration_wf`.
    **options : registration options, as :func:`init_registration_wf`.

    Notes
    -----
    Run it with :func:`run_study`, which also writes the table when some
    patients failed (Nipype then skips the JoinNode).

    Each kind of row is a branch of the graph (:data:`BRANCHES`), with its
    own iterables, and its node names prefixed: ``warm_`` for rows with an
    ``init_model`` (:func:`init_registration_wf` with ``warm_start``: the
    fine stage alone), ``dicom_`` for DICOM series, whose branch converts
    them first (:class:`~nipype_inrlddmm.interfaces.DicomToNifti`, and
    :class:`~nipype_inrlddmm.interfaces.RTStructToLabels` for both
    RTSTRUCTs, the fixed one's ROIs matched by name to the moving one's)
    and writes the carried ROIs onto the fixed series after the
    registration (:class:`~nipype_inrlddmm.interfaces.LabelsToRTStruct`,
    ``rtstruct.dcm``), as ``inrlddmm register`` does.  A study of several
    kinds has no JoinNode (one joins a single branch's iterables):
    :func:`run_study` writes its table.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from nipype_inrlddmm.phantom import write_cohort
    >>> from nipype_inrlddmm.workflows import init_study_wf
    >>> tmp = tempfile.TemporaryDirectory()
    >>> manifest = write_cohort(Path(tmp.name) / "data", 2, shape=(24, 20, 12))
    >>> wf = init_study_wf(manifest=manifest, out_dir=Path(tmp.name) / "out", work_dir=Path(tmp.name) / "work",
    ...                    coarse_iterations=5, distill_iterations=5, fine_iterations=5)
    >>> wf.get_node("patients").iterables
    ('patient', ['p01', 'p02'])
    >>> tmp.cleanup()
    """
    manifest = Path(manifest).resolve()
    # A missing file fails its own patient (in SelectPatient: crash file, study table), not the study.
    rows = io.read_manifest(manifest, check_files=False)
    try:
        io.read_manifest(manifest)
    except io.InputError as error:
        LOGGER.warning("%s; those patients will fail, the others run", error)
    out_dir = Path(out_dir).resolve()
    _refuse_chained_rows(manifest, rows, out_dir)

    workflow = Workflow(name=name, base_dir=str(Path(work_dir).resolve()) if work_dir else None)
    workflow.config["execution"] = dict(EXECUTION)
    if work_dir:
        workflow.config["execution"]["crashdump_dir"] = str(Path(work_dir).resolve() / "crash")

    branches = {}
    for row in rows:
        branches.setdefault(row_branch(row), []).append(row["patient"])
    for prefix, patients in branches.items():
        registration = init_registration_wf(
            name=f"{prefix}registration", num_threads=num_threads, affine=affine, affine_options=affine_options,
            device=device, image_shape=_largest_image(rows), progress=progress, trajectory=trajectory,
            warm_start="warm" in prefix, **options,
        )
        _add_branch(workflow, prefix, patients, registration, manifest=manifest, out_dir=out_dir,
                    label_names=label_names, progress=progress, join=len(branches) == 1)
    return workflow


def _refuse_chained_rows(manifest: Path, rows: list[dict], out_dir: Path) -> None:
    """Refuse a row whose ``init_model`` is the ``model.pt`` that this study writes for another of its rows.

    Days of a course chained within one study would need that row's fine
    stage to wait for the other's, across the patients' iterables, and a
    rerun would race the model it starts from against its rewrite: not
    done.  The error says how to run such a course instead.
    """
    written = {(out_dir / row["patient"] / "model.pt").resolve(): row["patient"] for row in rows}
    for row in rows:
        source = written.get(Path(row["init_model"]).resolve()) if row.get("init_model") else None
        if source is not None:
            raise io.InputError(manifest, f"row {row['patient']!r} starts from {row['init_model']}, the model this "
                                f"study writes for row {source!r}: days of a course cannot be chained within one "
                                f"study; run a study of {source!r} first, then one of the rows that start from its "
                                "model (or inrlddmm register --init-model, day by day)")


def row_branch(row: dict) -> str:
    """The prefix of the study branch (:data:`BRANCHES`) that registers a manifest row."""
    return BRANCHES[bool(row.get("moving_rtstruct")), bool(row.get("init_model"))]


def _add_branch(workflow: Workflow, prefix: str, patients: list[str], registration: Workflow, *, manifest: Path,
                out_dir: Path, label_names, progress: bool, join: bool) -> None:
    """One branch of a study: iterables over ``patients``, their files, ``registration``, the DataSink, and
    with ``join`` the JoinNode of the study table.  A DICOM branch converts the series and RTSTRUCTs first and
    writes ``rtstruct.dcm`` after (:func:`_connect_dicom`)."""
    iterate = Node(IdentityInterface(fields=["patient"]), name=f"{prefix}patients")
    iterate.iterables = ("patient", patients)
    select = Node(SelectPatient(manifest=str(manifest)), name=f"{prefix}select", run_without_submitting=True)
    # DataSinks always run (Nipype's default) but copy a file only when its content changed.
    patient_sink = Node(DataSink(base_directory=str(out_dir), parameterization=False),
                        name=f"{prefix}patient_sink", run_without_submitting=True)
    produced = registration.get_node("outputnode").inputs.copyable_trait_names()
    stages = [stage for stage in _STAGES if registration.get_node(stage) is not None]
    workflow.connect([
        (iterate, registration, [("patient", "qc.title")]
         + ([("patient", "trajectory.title")] if registration.get_node("trajectory") else [])
         + ([("patient", f"{stage}.progress_label") for stage in stages] if progress else [])),
        (iterate, select, [("patient", "patient")]),
        (select, registration, [("fixed_mask", "inputnode.fixed_mask")]
         + ([("init_model", "inputnode.init_model")] if "warm" in prefix else [])),
        (iterate, patient_sink, [("patient", "container")]),
        (registration, patient_sink, [(f"outputnode.{field}", f"@{field}") for field in SINK_FIELDS
                                      if field in produced]),
    ])
    if "dicom" in prefix:
        _connect_dicom(workflow, prefix, select, registration, patient_sink)
    else:
        workflow.connect(select, "moving_image", registration, "inputnode.moving_image")
        workflow.connect(select, "fixed_image", registration, "inputnode.fixed_image")
        workflow.connect(select, "moving_labels", registration, "inputnode.moving_labels")
        workflow.connect(select, "fixed_labels", registration, "inputnode.fixed_labels")
        if label_names:
            registration.inputs.inputnode.label_names = str(Path(label_names).resolve())
    if join:
        gather = JoinNode(GatherDice(), joinsource=f"{prefix}patients", joinfield=["patient", "dice_csv", "dice_json"],
                          name=f"{prefix}gather_dice", run_without_submitting=True)
        study_sink = Node(DataSink(base_directory=str(out_dir), parameterization=False), name=f"{prefix}study_sink",
                          run_without_submitting=True)
        workflow.connect([
            (iterate, gather, [("patient", "patient")]),
            (registration, gather, [("outputnode.dice_csv", "dice_csv"), ("outputnode.dice_json", "dice_json")]),
            (gather, study_sink, [("study_table", "@study_table")]),
        ])


def _connect_dicom(workflow: Workflow, prefix: str, select, registration: Workflow, patient_sink) -> None:
    """DICOM series and RTSTRUCTs into a registration, and its warped labels onto the fixed series.

    The series become NIfTI volumes and the RTSTRUCTs label maps on them,
    the fixed (reference) ROIs numbered by name as the moving ones, whose
    matched table names the labels evaluated; the warped labels are written
    as ``rtstruct.dcm`` on the fixed series, the moving ROIs' table as
    ``labels.tsv``.
    """
    def node(interface, name):
        return Node(interface, name=f"{prefix}{name}")

    series = {role: node(DicomToNifti(out_file=f"{role}.nii.gz"), f"{role}_series") for role in ("moving", "fixed")}
    moving_rois = node(RTStructToLabels(out_file="moving_labels.nii.gz"), "moving_rois")
    fixed_rois = node(RTStructToLabels(out_file="fixed_labels.nii.gz", out_table="evaluated.tsv"), "fixed_rois")
    rtstruct = node(LabelsToRTStruct(), "rtstruct")
    workflow.connect([
        (select, series["moving"], [("moving_image", "dicom_folder")]),
        (select, series["fixed"], [("fixed_image", "dicom_folder")]),
        (select, moving_rois, [("moving_rtstruct", "rtstruct"), ("moving_image", "dicom_folder")]),
        (select, fixed_rois, [("fixed_rtstruct", "rtstruct"), ("fixed_image", "dicom_folder")]),
        (moving_rois, fixed_rois, [("label_table", "match_table")]),
        (series["moving"], registration, [("out_file", "inputnode.moving_image")]),
        (series["fixed"], registration, [("out_file", "inputnode.fixed_image")]),
        (moving_rois, registration, [("out_file", "inputnode.moving_labels")]),
        (fixed_rois, registration, [("out_file", "inputnode.fixed_labels"),
                                    ("label_table", "inputnode.label_names")]),
        (registration, rtstruct, [("outputnode.warped_labels", "labels")]),
        (moving_rois, rtstruct, [("label_table", "label_table")]),
        (select, rtstruct, [("fixed_image", "dicom_folder")]),
        (rtstruct, patient_sink, [("out_file", "@rtstruct")]),
        (moving_rois, patient_sink, [("label_table", "@label_table")]),
    ])


#: Registration nodes whose settings the study report lists.
_REPORTED_NODES = ("affine", "coarse", "distill", "fine", "trajectory")


def study_parameters(workflow: Workflow) -> dict[str, dict]:
    """The settings each registration stage of a study was given: ``{stage: {input: value}}``.

    Read from the nodes themselves (what ran, not what was meant to): every
    defined input except files (connected per patient), ``version`` (listed
    apart) and ``progress``.  The stages of a branch other than the plain
    one (:data:`BRANCHES`) are named with it, e.g. ``fine (warm start)``.
    """
    parameters = {}
    for prefix in _branch_prefixes(workflow):
        registration = workflow.get_node(f"{prefix}registration")
        for name in _REPORTED_NODES:
            node = registration.get_node(name)
            if node is None:
                continue
            spec = node.inputs
            parameters[name + _BRANCH_TITLES[prefix]] = {
                key: value for key, value in sorted(spec.get().items())
                if isdefined(value) and key not in ("version", "progress")
                and not spec.trait(key).is_trait_type(traits.File)}
    return parameters


def _branch_prefixes(workflow: Workflow) -> list[str]:
    """The prefixes of the branches (:data:`BRANCHES`) a study workflow has."""
    return [prefix for prefix in BRANCHES.values() if workflow.get_node(f"{prefix}registration") is not None]


def slurm_sbatch_args(node, *, time_limit: str | None = None, extra: str | None = None) -> str:
    """``sbatch`` arguments of one node's job: its CPUs, memory and time, then ``extra``.

    ``-c`` is the node's ``n_procs`` (its interface's ``num_threads``), ``--mem`` its ``mem_gb``
    (at least :data:`SLURM_MIN_MEM_GB`), ``--time`` ``time_limit`` or :data:`SLURM_TIME`.

    >>> from nipype import Node
    >>> from nipype_inrlddmm.interfaces import FineINR
    >>> slurm_sbatch_args(Node(FineINR(num_threads=4), name="fine", mem_gb=2.5), extra="--partition=gpu")
    '-c 4 --mem=2560M --time=4:00:00 --partition=gpu'
    """
    cpus = max(1, int(node.n_procs or 1))
    mem_mb = math.ceil(max(float(node.mem_gb or 0), SLURM_MIN_MEM_GB) * 1024)
    time = time_limit or SLURM_TIME.get(node.name, SLURM_TIME["default"])
    return " ".join(part for part in (f"-c {cpus} --mem={mem_mb}M --time={time}", extra) if part)


def _all_nodes(workflow: Workflow) -> list:
    """Every node of a workflow and of the workflows nested in it, through Nipype's public names."""
    return [workflow.get_node(name) for name in workflow.list_node_names()]


def set_slurm_resources(workflow: Workflow, *, sbatch_args: str | None = None,
                        time_limit: str | None = None) -> Workflow:
    """Set ``node.plugin_args`` of every node (sub-workflows included) for Nipype's SLURM plugins.

    Each node gets ``{"sbatch_args": slurm_sbatch_args(node, ...), "overwrite": True}``: its own
    ``-c``/``--mem``/``--time`` followed by ``sbatch_args`` (e.g. ``"--partition=gpu
    --gres=gpu:1"``), replacing the plugin-wide ``sbatch_args``.  Nodes whose ``plugin_args``
    already hold ``sbatch_args`` set by someone else are left alone.  :func:`run_study` calls this.

    >>> wf = set_slurm_resources(init_registration_wf(num_threads=2), sbatch_args="--partition=cpu")
    >>> wf.get_node("coarse").plugin_args["sbatch_args"]
    '-c 2 --mem=1024M --time=4:00:00 --partition=cpu'
    """
    for node in _all_nodes(workflow):
        current = dict(node.plugin_args or {})
        if "sbatch_args" in current and not current.get(_DERIVED):
            continue
        current.update(sbatch_args=slurm_sbatch_args(node, time_limit=time_limit, extra=sbatch_args),
                       overwrite=True, **{_DERIVED: True})
        node.plugin_args = current
    return workflow


class MultiProcPlugin(_NipypeMultiProcPlugin):
    """Nipype's MultiProc; a worker process killed from outside (the kernel's out-of-memory killer, a
    SIGKILL) costs one retry of the nodes its pool held, not the study.

    Such a kill breaks the whole process pool: every node it held ends in BrokenProcessPool, which
    Nipype's callback lets escape, so those nodes never report and the study waits forever; and the
    pool refuses every later node.  Here the nodes of a broken pool go once more to a fresh pool, and
    a node whose pool breaks again fails, saying so.
    """

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self._nodes = {}  # taskid -> (node, updatehash), to submit again
        self._retried = set()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.processors, initializer=process_initializer,
                                   initargs=(self._cwd,),
                                   mp_context=multiprocessing.get_context(self.plugin_args.get("mp_context")))

    def _submit(self, node, updatehash, taskid) -> None:
        try:
            future = self.pool.submit(run_node, node, updatehash, taskid)
        except BrokenProcessPool:
            self.pool.shutdown(wait=False)
            self.pool = self._new_pool()
            future = self.pool.submit(run_node, node, updatehash, taskid)
        future.add_done_callback(self._async_callback)
        self._task_obj[taskid] = future
        self._nodes[taskid] = (node, updatehash)

    def _submit_job(self, node, updatehash=False):
        self._taskid += 1
        self._submit(node, updatehash, self._taskid)
        return self._taskid

    def _async_callback(self, args):
        if args.exception() is None:  # a failed future is taken up by _get_result, in the scheduler's thread
            super()._async_callback(args)

    def _get_result(self, taskid):
        future = self._task_obj.get(taskid)
        error = future.exception() if future is not None and future.done() else None
        if error is None:
            return super()._get_result(taskid)
        node, updatehash = self._nodes[taskid]
        if isinstance(error, BrokenProcessPool) and taskid not in self._retried:
            LOGGER.warning("%s: a worker process of the pool was killed (out of memory?); running it again",
                           node.fullname)
            self._retried.add(taskid)
            self._submit(node, updatehash, taskid)
            return None
        if isinstance(error, BrokenProcessPool):
            error = ("its worker process was killed twice while it ran (SIGKILL: the kernel's out-of-memory "
                     "killer?): give the study more memory, or fewer --n-procs")
        return {"result": None, "taskid": taskid, "traceback": [f"{error}\n"]}

    def _clear_task(self, taskid):
        super()._clear_task(taskid)
        self._nodes.pop(taskid, None)


#: Seconds the SLURM controller may stay unreachable (a restart, a fail-over) before a study gives up on it.
CONTROLLER_PATIENCE = 600.0
#: What ``squeue`` and ``sbatch`` say when they cannot reach the controller.
_UNREACHABLE = ("Unable to contact slurm controller", "Connection refused")


class SLURMPlugin(_NipypeSLURMPlugin):
    """Nipype's SLURM plugin; a job that ends without a result fails its node, not the whole run, and a
    controller that restarts is waited for.

    A job killed by ``scancel``, its time limit or the out-of-memory killer leaves no result file.
    Nipype 1.11 then builds the crash report by adding a list to a string and raises a TypeError
    that stops the run, other patients included; the traceback is passed as a list here.

    While ``slurmctld`` restarts, ``squeue`` fails, and Nipype took that for a finished job, which then
    failed for want of its result; yet the jobs run on, and the controller recovers them from its saved
    state.  Here a job is taken as still running while the controller does not answer, for up to
    :data:`CONTROLLER_PATIENCE` seconds, and then the study stops saying that the controller is gone.

    Where Nipype then reports only that the result file is missing, the failure names what ended the job,
    read from the job's own log (:func:`slurm_job_end`): the memory limit, the time limit, ``scancel``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._unreachable_since = None
        self._job_logs = {}

    def _submit_batchtask(self, scriptfile, node):
        taskid = super()._submit_batchtask(scriptfile, node)
        # Nipype's own -o, unless the user's --sbatch-args gave one (then the reason stays generic).
        self._job_logs[taskid] = Path(scriptfile).parent / f"slurm-{taskid}.out"
        return taskid

    def _get_result(self, taskid):
        log = self._job_logs.get(taskid)
        result = super()._get_result(taskid)
        if result is not None:
            self._job_logs.pop(taskid, None)
            if result["result"] is None and "results file does not exist" in str(result["traceback"]):
                result["traceback"] = slurm_job_end(taskid, log)
        return result

    def _report_crash(self, node, result=None):
        if result is not None and isinstance(result.get("traceback"), str):
            result = {**result, "traceback": result["traceback"].splitlines(keepends=True)}
        return super()._report_crash(node, result=result)

    def _is_pending(self, taskid):
        # Nipype's own check reads a failed squeue as "not in the queue": during a controller restart every
        # running job would look finished, and fail for want of its result.
        answer = subprocess.run(["squeue", "-h", "-j", str(taskid), "-o", "%i"], capture_output=True, text=True)
        message = " ".join((answer.stderr or answer.stdout).split())
        if answer.returncode == 0 or "Invalid job id" in message:  # the latter: finished and forgotten
            self._unreachable_since = None
            return answer.returncode == 0 and str(taskid) in answer.stdout.split()
        if not any(text in message for text in _UNREACHABLE):
            raise RuntimeError(f"squeue -j {taskid} failed: {message}")
        now = time.monotonic()
        self._unreachable_since = self._unreachable_since or now
        if now - self._unreachable_since > CONTROLLER_PATIENCE:
            raise RuntimeError(f"the SLURM controller has not answered for {CONTROLLER_PATIENCE:.0f} s ({message}); "
                               "its jobs may still run: rerun the study once it is back")
        LOGGER.warning("the SLURM controller does not answer (%s): job %s is taken as still running", message,
                       taskid)
        return True


#: What slurmstepd writes into a job's log when it ends a job, and how a study says it.
_JOB_ENDS = (
    (("exceeded memory limit", "Exceeded job memory limit", "oom-kill", "oom_kill"),
     "was killed for exceeding its memory limit{usage}: rerun with more memory (--sbatch-args '--mem=...')"),
    (("DUE TO TIME LIMIT",), "reached its time limit: rerun with a longer --time in --sbatch-args"),
    (("DUE TO NODE FAILURE",), "ended with the failure of its node"),
    (("CANCELLED",), "was cancelled (scancel, or an administrator)"),
)


def slurm_job_end(job: int, log: Path | None) -> str:
    """One line saying why SLURM job ``job`` ended without a result, read from its log file ``log``.

    slurmstepd writes the cause there (``exceeded memory limit (used > limit)``, ``CANCELLED ... DUE TO
    TIME LIMIT``, ...); where the log is missing or says nothing of it, the line says so and where to look.
    """
    try:
        text = Path(log).read_text(errors="replace") if log else ""
    except OSError:
        text = ""
    for markers, says in _JOB_ENDS:
        if any(marker in text for marker in markers):
            used = next((line for line in text.splitlines() if "exceeded memory limit (" in line), "")
            usage = ""
            if used:
                numbers = used.split("exceeded memory limit (", 1)[1].split(")", 1)[0].split(">")
                usage = " ({:.0f} MB used, {:.0f} MB allowed)".format(*(int(n) / 2**20 for n in numbers))
            return f"its SLURM job {job} " + says.format(usage=usage)
    where = f" (its log: {log})" if log else ""
    return f"its SLURM job {job} ended without a result: cancelled, or out of time or memory?{where}"


def _prepare_slurm(workflow: Workflow, arguments: dict) -> None:
    """LOGNAME, the job script's interpreter and PATH, per-node ``sbatch`` arguments.

    Nipype's SLURM plugin names jobs after ``$LOGNAME`` (a KeyError when unset, as under some CI
    and cron).  Jobs run ``sys.executable``; the template also puts its folder (the venv's ``bin``)
    first on the job's PATH, even where the cluster does not export the submitting environment.
    """
    if not os.environ.get("LOGNAME"):
        try:
            os.environ["LOGNAME"] = getpass.getuser()
        except Exception:  # no passwd entry (some containers)
            os.environ["LOGNAME"] = str(os.getuid())
    bin_dir = str(Path(sys.executable).parent)
    arguments.setdefault("template", "#!/bin/bash\n# inrlddmm: run by the Python that submitted it\n"
                         f"export PATH={shlex.quote(bin_dir)}:\"$PATH\"\n")
    set_slurm_resources(workflow, sbatch_args=arguments.pop("sbatch_args", None))
    # SLURMGraph's submit script ignores a refused sbatch, and the SLURM plugin would fail every node
    # one by one: check each distinct set of arguments once (an unknown partition, a --gres the
    # cluster lacks, a time over the partition's limit) before anything is submitted.
    for sbatch_args in sorted({node.plugin_args["sbatch_args"] for node in _all_nodes(workflow)}):
        check = subprocess.run(["sbatch", "--test-only", *shlex.split(sbatch_args), "--wrap", "true"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise io.InputError("--sbatch-args", f"sbatch refuses '{sbatch_args}': "
                                f"{(check.stderr or check.stdout).strip()}")


def study_slurm_jobs(workflow: Workflow, *, cancel_stuck: bool = False) -> list[dict]:
    """This study's SLURM jobs still in the queue: ``[{"job", "state", "reason"}, ...]``.

    A job belongs to the study when its batch script lies in the study's ``batch/`` folder (where
    Nipype writes them).  With ``cancel_stuck``, jobs that can never start (``PENDING`` with reason
    ``DependencyNeverSatisfied``: a SLURMGraph job whose upstream job failed) are cancelled and
    left out.
    """
    batch_dir = str(Path(workflow.base_dir) / workflow.name / "batch") + os.sep
    user = os.environ.get("LOGNAME") or getpass.getuser()
    listing = subprocess.run(["squeue", "-h", "-u", user, "-o", "%i|%T|%r|%o"], capture_output=True, text=True,
                             check=True).stdout
    jobs = []
    for line in listing.splitlines():
        job, state, reason, command = (line.split("|", 3) + ["", "", ""])[:4]
        if command.startswith(batch_dir):
            jobs.append({"job": job, "state": state, "reason": reason})
    if cancel_stuck:
        stuck = [j["job"] for j in jobs if j["state"] == "PENDING" and j["reason"] == "DependencyNeverSatisfied"]
        if stuck:
            subprocess.run(["scancel", *stuck], check=False)
        jobs = [j for j in jobs if j["job"] not in stuck]
    return jobs


def _patient_of(node) -> str | None:
    """The patient id of an expanded node (its ``_patient_<id>`` parameterization)."""
    for part in getattr(node, "parameterization", None) or []:
        if part.startswith("_patient_"):
            return part[len("_patient_"):]
    return None


def _failure_reason(node, stopped: Exception | None = None) -> str:
    """``"<node>: <exception line>"`` from the failed node's result file.

    ``stopped`` is the exception that ended the whole run, if one did: when
    a node's failure could not even be recorded (no result, no traceback;
    a full disk also refuses the crash file), it is that failure's cause.
    """
    try:
        traceback = node.result.runtime.traceback or ""
        last = [line.strip() for line in traceback.splitlines() if line.strip()][-1]
    except Exception:  # no result file (killed worker or SLURM job, a full disk, ...)
        # Nipype's crash report appends a note on the missing result file to the traceback: not the cause.
        details = "".join(getattr(node, "_traceback", None) or []).split("When creating this crashfile")[0]
        last = [line.strip() for line in details.splitlines() if line.strip()][-1:]
        if last:
            return f"{node.name}: {last[0]}"[:500]
        if stopped is not None:
            return f"{node.name}: {type(stopped).__name__}: {stopped}"[:500]
        return f"{node.name} failed (see the crash file)"
    return f"{node.name}: {last}"[:500]


def run_study(workflow: Workflow, *, plugin: str = "Linear", plugin_args: dict | None = None) -> list[dict] | None:
    """Run a workflow from :func:`init_study_wf` and return the study table's rows.

    Patients whose registration raised are rows with ``status = "failed"``
    and the exception in ``error``; the others finish (Nipype's
    ``stop_on_first_crash`` is off).  With every patient done, the
    JoinNode's ``study_dice.csv`` is already in the output folder; otherwise
    (Nipype skips a JoinNode after an upstream failure) the table is written
    here from the patients' own results.  ``report.html``
    (:func:`nipype_inrlddmm.report.write_study_report`) is written beside
    it, with the failed patients marked and each patient's Dice before
    registration read from the manifest's label maps.

    ``plugin`` is a Nipype plugin (``Linear``, ``MultiProc``, ``SLURM``, ...);
    :data:`PLUGIN_DEFAULTS` fills unset ``plugin_args``.  The SLURM plugins
    need the same venv path and a shared file system on the compute nodes;
    every node gets its own ``sbatch`` arguments (:func:`set_slurm_resources`;
    ``plugin_args["sbatch_args"]`` is appended to each node's), and
    ``$SLURM_CONF`` and the rest of the environment pass to ``sbatch``.
    ``SLURMGraph`` submits every unfinished node at once (with
    ``--dependency=afterok``) and returns None without waiting: once
    :func:`study_slurm_jobs` is empty, run the study again (e.g. with the
    ``SLURM`` plugin) to gather the table; finished nodes are not recomputed.

    The work folder is held for the run (:func:`work_folder_lock`): a second
    study on it meanwhile refuses, naming this one.
    """
    if not workflow.base_dir:
        return _run_study(workflow, plugin, plugin_args)
    with work_folder_lock(workflow.base_dir):
        for folder in drop_unreadable_results(workflow.base_dir):
            LOGGER.warning("%s: its cached result could not be read (a crash cut it short?); recomputing that node",
                           folder)
        return _run_study(workflow, plugin, plugin_args)


def drop_unreadable_results(work_dir) -> list[Path]:
    """Remove the node folders of ``work_dir`` whose cached result file cannot be read; returns them.

    A crash or a full disk can cut a ``result_<node>.pklz`` short: Nipype
    would then fail the nodes that read it, run after run.  Without the
    folder, Nipype recomputes that node (and what depends on it) instead.
    """
    dropped = []
    for result in sorted(Path(work_dir).rglob("result_*.pklz")):
        try:
            loadpkl(result)
        except Exception:  # truncated gzip, broken pickle: whatever reading it raises
            shutil.rmtree(result.parent, ignore_errors=True)
            dropped.append(result.parent)
    return dropped


@contextlib.contextmanager
def work_folder_lock(work_dir):
    """Hold ``work_dir`` for one run; another run on it meanwhile raises an InputError naming the holder.

    Two Nipype runs on one cache would compute the same nodes at once and
    overwrite each other's results.  The lock is the kernel's (``flock``):
    it ends with the process, so a killed run leaves none behind.
    """
    folder = Path(work_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".inrlddmm-study.lock", "a+")
    except OSError as error:  # read-only, no permission, a file where a folder should be
        raise io.InputError(folder, f"cannot write the work folder here ({error.strerror or error})") from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise io.InputError(folder, f"the work folder is in use by another study ({holder}): wait for it to "
                                "end, or give another --work-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{shlex.join(sys.argv)}")
        handle.flush()
        yield


def _run_study(workflow: Workflow, plugin: str, plugin_args: dict | None) -> list[dict] | None:
    prefixes = _branch_prefixes(workflow)
    manifest = workflow.get_node(f"{prefixes[0]}select").inputs.manifest
    # Each branch holds the patients of one kind; the table keeps the manifest's order.
    branch_patients = {p for prefix in prefixes for p in workflow.get_node(f"{prefix}patients").iterables[1]}
    patients = [row["patient"] for row in io.read_manifest(manifest, check_files=False)
                if row["patient"] in branch_patients]
    out_dir = Path(workflow.get_node(f"{prefixes[0]}patient_sink").inputs.base_directory)
    try:  # now, not after hours of computing, when the data sinks would find it
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise io.InputError(out_dir, f"cannot write the results here ({error.strerror or error})") from error
    failed = {}

    def record(node, status):
        if status == "exception":
            failed.setdefault(_patient_of(node), node)

    arguments = {**PLUGIN_DEFAULTS.get(plugin, {}), **(plugin_args or {})}
    for key in ("poll_sleep_duration", "job_finished_timeout"):
        if key in arguments:
            workflow.config["execution"][key] = arguments.pop(key)
    if plugin in SLURM_PLUGINS:
        _prepare_slurm(workflow, arguments)
    if plugin == "MultiProc" and arguments.get("mp_context") == "forkserver":
        start_worker_server()  # the command line started it already, before its own imports
    if plugin == "SLURMGraph":  # submits and returns; status callbacks are not supported there
        workflow.run(plugin=plugin, plugin_args=arguments)
        return None
    arguments["status_callback"] = record
    # Nipype's schedulers run gc.collect() before every submission, and a full collection over the objects
    # of torch, scipy and matplotlib dominated a small study's scheduling (docs: decisions).  Frozen, they
    # are not scanned again: each collection sees only what the run itself creates.
    gc.freeze()
    stopped = None
    try:
        plugins = {"SLURM": SLURMPlugin, "MultiProc": MultiProcPlugin}
        workflow.run(plugin=plugins[plugin](plugin_args=arguments) if plugin in plugins else plugin,
                     plugin_args=arguments)
    except Exception as error:
        if not failed:
            raise  # not a node failure (a broken graph, a dead worker pool, ...)
        stopped = error
    finally:
        gc.unfreeze()
    if None in failed:
        raise RuntimeError(f"study node {failed[None].fullname} failed: {_failure_reason(failed[None])}")

    rows = []
    for patient in patients:
        if patient in failed:
            rows.append(steps.failed_row(patient, _failure_reason(failed[patient], stopped)))
        elif not (out_dir / patient / "dice.json").is_file():
            # Nipype stops scheduling when it cannot even record a failure (a full disk): the patients after
            # it never ran, and a rerun takes them up.
            rows.append(steps.failed_row(patient, "not run: the study stopped at another patient's failure"))
        else:
            rows.append(steps.study_row(patient, out_dir / patient / "dice.csv", out_dir / patient / "dice.json"))
    # Otherwise the JoinNode's table is in out_dir already; a study of several branches has none.
    if any(row["status"] == "failed" for row in rows) or len(prefixes) > 1:
        steps.write_study_table(out_dir / "study_dice.csv", rows)
    report.write_study_report(out_dir, rows, parameters=study_parameters(workflow), manifest=manifest)
    return rows
