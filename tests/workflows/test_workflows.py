"""Workflows: the registration graph, a 3-patient study, its caching and reruns (faults: tests/faults/test_faults.py).

Which nodes ran is read from Nipype's own records (each node folder's
``result_<node>.pklz`` and its mtime), never from timing.
"""

import csv

import nibabel as nib
import pytest
from conftest import finished_nodes, rerun_nodes, study_table, study_wf

from nipype_inrlddmm import cli, engine
from nipype_inrlddmm.phantom import write_cohort
from nipype_inrlddmm.workflows import estimate_mem_gb, init_registration_wf, run_study

FEW = dict(coarse_iterations=10, distill_iterations=5, fine_iterations=10)
FEW_FLAGS = ["--coarse-iterations", "10", "--distill-iterations", "5", "--fine-iterations", "10", "--quiet"]
PATIENTS = ["p01", "p02", "p03"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), 3, shape=(48, 40, 20))




@pytest.fixture(scope="module")
def linear_study(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    rows = run_study(study_wf(cohort, root, **FEW))
    return root, rows


def test_the_command_and_the_study_write_the_same_registration(linear_study, cohort, tmp_path):
    """`inrlddmm register` and the study's workflow, same patient and settings: the same files, byte for byte,
    and the same optimisation (the study logs each stage apart; only the seconds differ)."""
    root, _ = linear_study
    run_study(study_wf(cohort, root, **FEW))  # the reference state, whatever ran before
    patient, study = cohort.parent / "p02", root / "out" / "p02"
    assert cli.main(["register", "--moving", str(patient / "ct.nii.gz"), "--fixed", str(patient / "cbct.nii.gz"),
                     "--moving-labels", str(patient / "ct_labels.nii.gz"),
                     "--fixed-labels", str(patient / "cbct_labels.nii.gz"),
                     "--fixed-mask", str(patient / "cbct_fov.nii.gz"),
                     "--label-names", str(cohort.parent / "labels.tsv"), "--num-threads", "1",
                     "--out-dir", str(tmp_path), *FEW_FLAGS]) == 0
    for name in ("warped.nii.gz", "displacement.nii.gz", "model.pt", "warped_labels.nii.gz", "dice.csv", "dice.json"):
        assert (tmp_path / name).read_bytes() == (study / name).read_bytes(), name

    def rows(path):
        with open(path, newline="") as handle:
            return [{k: v for k, v in row.items() if k != "seconds" and v != ""}
                    for row in csv.DictReader(handle)]

    assert rows(tmp_path / "log.csv") == sum((rows(study / f"{stage}_log.csv")
                                              for stage in ("coarse", "distill", "fine")), [])


@pytest.mark.parametrize("stage", ["coarse", "distill", "fine"])
@pytest.mark.parametrize("shape", [(48, 40, 20), (182, 218, 182), (512, 512, 300)])
def test_a_stage_node_asks_for_what_the_engine_guard_will_check(stage, shape):
    """One memory model: the memory a node (a SLURM job's --mem) gets, less its process's own 0.3 GB, admits
    the engine's estimate, so the guard inside the job never refuses what the scheduler granted."""
    config = engine.config_from_options()
    granted = estimate_mem_gb(stage, shape, config) * 1e9
    engine.check_memory(stage, shape, config, available=granted - 0.3e9)  # raises if it would refuse
    assert granted < 2 * engine.estimate_memory(stage, shape, config)["total"] + 1e9  # and not wastefully more


def test_registration_wf_graph_and_settings():
    wf = init_registration_wf(affine="rigid", num_threads=2, fine_iterations=33, reg_weight=1e-3,
                              image_shape=(512, 512, 300))
    assert set(wf.list_node_names()) == {"inputnode", "affine", "coarse", "distill", "fine", "warp_labels", "dice",
                                         "qc", "outputnode"}
    fine, coarse = wf.get_node("fine"), wf.get_node("coarse")
    assert (fine.inputs.iterations, fine.inputs.reg_weight, coarse.inputs.reg_weight) == (33, 1e-3, 1e-3)
    assert (fine.n_procs, fine.inputs.num_threads, wf.get_node("dice").n_procs) == (2, 2, 1)
    config = engine.config_from_options(fine_iterations=33, reg_weight=1e-3)
    assert fine.mem_gb == estimate_mem_gb("fine", (512, 512, 300), config) > estimate_mem_gb("fine", (48, 40, 20))
    assert "affine_transform" in wf.get_node("inputnode").inputs.copyable_trait_names()
    bare = init_registration_wf(evaluate=False, qc=False)
    assert set(bare.list_node_names()) == {"inputnode", "coarse", "distill", "fine", "outputnode"}
    moving_path = init_registration_wf(trajectory=7, field_stride=3)
    assert moving_path.get_node("trajectory").inputs.n_times == 7
    assert moving_path.get_node("trajectory").inputs.field_stride == 3  # the registration's: t = 1 is the warped image
    with pytest.raises(ValueError, match="at least 2 times"):
        init_registration_wf(trajectory=1)
    with pytest.raises(TypeError, match="unknown registration option 'fine_iteration'"):
        init_registration_wf(fine_iteration=3)


def test_registration_wf_with_affine_runs_end_to_end(cohort, tmp_path):
    """The affine branch: aligned image and labels feed the stages, the warped labels and Dice."""
    wf = init_registration_wf(affine="rigid", **FEW)
    wf.base_dir = str(tmp_path)
    folder = cohort.parent / "p01"
    for field, name in (("moving_image", "ct"), ("fixed_image", "cbct"), ("moving_labels", "ct_labels"),
                        ("fixed_labels", "cbct_labels"), ("fixed_mask", "cbct_fov")):
        setattr(wf.inputs.inputnode, field, str(folder / f"{name}.nii.gz"))
    wf.inputs.inputnode.label_names = str(cohort.parent / "labels.tsv")
    wf.run()
    dice = next(tmp_path.glob("*/dice/dice.csv"))
    assert [row["name"] for row in csv.DictReader(open(dice))][0] == "body"
    assert next(tmp_path.glob("*/affine/affine.txt")).is_file()
    assert nib.load(next(tmp_path.glob("*/warp_labels/warped_labels.nii.gz"))).shape == (48, 40, 20)


def test_study_writes_every_patient_and_the_table(linear_study):
    root, rows = linear_study
    assert [row["patient"] for row in rows] == PATIENTS and {row["status"] for row in rows} == {"ok"}
    table = study_table(root / "out")
    assert [row["patient"] for row in table] == PATIENTS
    assert {"body", "heart", "target", "mean_dice", "jacobian_nonpositive_percent", "error"} <= table[0].keys()
    for patient in PATIENTS:
        for name in ("warped.nii.gz", "displacement.nii.gz", "model.pt", "warped_labels.nii.gz", "dice.csv",
                     "dice.json", "coarse_log.csv", "distill_log.csv", "fine_log.csv", "qc.png"):
            assert (root / "out" / patient / name).is_file(), (patient, name)
    page = (root / "out" / "report.html").read_text()
    assert all(f'data-patient="{p}"' in page and f'src="{p}/qc.png"' in page for p in PATIENTS)


def test_linear_and_multiproc_give_the_same_table(linear_study, cohort, tmp_path):
    root, _ = linear_study
    rows = run_study(study_wf(cohort, tmp_path, **FEW), plugin="MultiProc", plugin_args={"n_procs": 2})
    assert {row["status"] for row in rows} == {"ok"}
    assert (tmp_path / "out" / "study_dice.csv").read_text() == (root / "out" / "study_dice.csv").read_text()


def test_a_rerun_recomputes_nothing(linear_study, cohort):
    root, _ = linear_study
    run_study(study_wf(cohort, root, **FEW))  # the reference state, whatever ran before
    nodes = finished_nodes(root / "work")
    outputs = {path: path.stat().st_mtime_ns for path in (root / "out").rglob("*") if path.is_file()}
    run_study(study_wf(cohort, root, **FEW))
    rerun = rerun_nodes(nodes, finished_nodes(root / "work"))
    assert len(nodes) == 3 * 8 + 2  # per patient: select, coarse, distill, fine, warp_labels, dice, qc, sink
    assert not rerun, rerun
    assert {path: path.stat().st_mtime_ns for path in outputs} == outputs  # no output rewritten


def test_a_fine_parameter_change_reruns_only_fine_and_what_follows(linear_study, cohort):
    root, _ = linear_study
    run_study(study_wf(cohort, root, **FEW))
    before = finished_nodes(root / "work")
    run_study(study_wf(cohort, root, **{**FEW, "fine_iterations": 12}))
    rerun = rerun_nodes(before, finished_nodes(root / "work"))
    expected = {f"registration/_patient_{p}/{stage}" for p in PATIENTS
                for stage in ("fine", "warp_labels", "dice", "qc")}
    assert rerun == expected | {"gather_dice"}
    log = root / "out" / "p01" / "fine_log.csv"
    assert len(log.read_text().splitlines()) == 1 + 12
