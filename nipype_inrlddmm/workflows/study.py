"""A study: the registration of :mod:`.registration` once per manifest row.

:func:`init_study_wf` gives each kind of row (NIfTI or DICOM, from scratch
or warm-started) a branch of its own with iterables on the patient id, a
JoinNode writing ``study_dice.csv``, and DataSinks into
``out_dir/<patient>/``; :func:`study_parameters` says which settings each
branch ran with, for the report.  Running it is :mod:`.execution`'s.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
from nipype import JoinNode, Node, Workflow, logging
from nipype.interfaces.base import isdefined, traits
from nipype.interfaces.io import DataSink
from nipype.interfaces.utility import IdentityInterface

from .. import io
from ..interfaces import DicomToNifti, GatherDice, LabelsToRTStruct, RTStructToLabels, SelectPatient
from .registration import EXECUTION, OPTIMISATION_STAGES, init_registration_wf

LOGGER = logging.getLogger("nipype.workflow")

#: Outputs copied into ``out_dir/<patient>/`` (registration outputnode field -> kept file name).
SINK_FIELDS = ("warped_image", "displacement", "model", "warped_labels", "dice_csv", "dice_json", "coarse_log",
               "distill_log", "fine_log", "affine_transform", "qc_figure", "trajectory", "trajectory_animation")

#: A study registers each kind of manifest row in a branch of its own, with its own iterables over its
#: patients (Nipype runs every node of a graph for every iterable): (DICOM series, warm start) -> the prefix
#: of the branch's node names.  Rows of NIfTI files registered from scratch keep the plain names.
BRANCHES = {(False, False): "", (False, True): "warm_", (True, False): "dicom_", (True, True): "dicom_warm_"}
#: How the study report names each branch's settings.
_BRANCH_TITLES = {"": "", "warm_": " (warm start)", "dicom_": " (DICOM)", "dicom_warm_": " (DICOM, warm start)"}


def _largest_image(rows: list[dict]) -> tuple[int, int, int] | None:
    """Grid of the largest readable image of a manifest, NIfTI file or DICOM series, by voxel count (headers
    only)."""
    shapes = []
    for row in rows:
        for column in ("moving", "fixed"):
            path = Path(row[column])
            try:
                if path.is_dir():
                    from ..io.dicom import series_shape  # pydicom, for studies of DICOM series only

                    shapes.append(series_shape(path))
                else:
                    shapes.append(tuple(int(n) for n in nib.load(path).shape[:3]))
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
    stages = [stage for stage in OPTIMISATION_STAGES if registration.get_node(stage) is not None]
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
    for prefix in branch_prefixes(workflow):
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


def branch_prefixes(workflow: Workflow) -> list[str]:
    """The prefixes of the branches (:data:`BRANCHES`) a study workflow has."""
    return [prefix for prefix in BRANCHES.values() if workflow.get_node(f"{prefix}registration") is not None]


