"""Studies of DICOM series and of warm-started fractions: the manifest's other kinds of row."""

import csv

import numpy as np
import pydicom
import pytest
import torch
from conftest import study_table

from nipype_inrlddmm import engine, io
from nipype_inrlddmm.io import dicom
from nipype_inrlddmm.evaluation import metrics
from nipype_inrlddmm.reports import qc
from nipype_inrlddmm.reports import study as study_report
from nipype_inrlddmm.phantom import LABELS, write_cohort
from nipype_inrlddmm.workflows import estimate_mem_gb, init_study_wf, run_study

FEW = dict(coarse_iterations=10, distill_iterations=5, fine_iterations=10, warm_iterations=4,
           warm_learning_rate=5e-4)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two phantom patients in NIfTI and in DICOM (data/generate_cohort.py --dicom)."""
    return write_cohort(tmp_path_factory.mktemp("cohort"), 2, shape=(40, 36, 16), dicom=True).parent


def _manifest(path, rows: list[dict]):
    return io.write_csv(path, rows, delimiter="\t")



def test_a_study_of_dicom_patients_writes_each_an_rtstruct_on_its_own_fixed_series(cohort, tmp_path):
    manifest = cohort / "dicom_manifest.tsv"  # the generator's: series folders and RTSTRUCTs
    assert (manifest.read_text().splitlines()[1].split("\t") ==
            ["p01", "p01/ct", "p01/cbct", "p01/ct_rtstruct.dcm", "p01/cbct_rtstruct.dcm"])
    out = tmp_path / "out"
    workflow = init_study_wf(manifest=manifest, out_dir=out, work_dir=tmp_path / "work", **FEW)
    assert workflow.get_node("dicom_patients").iterables == ("patient", ["p01", "p02"])
    # The nodes' memory is sized from the series' headers, as from a NIfTI file's.
    assert workflow.get_node("dicom_registration.fine").mem_gb == estimate_mem_gb(
        "fine", (40, 36, 16), engine.config_from_options(**FEW))
    rows = run_study(workflow)
    assert [(row["patient"], row["status"]) for row in rows] == [("p01", "ok"), ("p02", "ok")]
    table = study_table(out)
    assert [row["patient"] for row in table] == ["p01", "p02"]
    # Every ROI carried onto its fixed series and overlapping the day's contour.  Ten fine iterations on a
    # 40 x 36 x 16 phantom do not register a cord a few voxels wide reliably: the accuracy is the phantom
    # tests' (tests/engine, tests/cli), and the DICOM route's agreement with the NIfTI one tests/io's.
    for row in table:
        assert all(0.0 < float(row[name]) <= 1.0 for name in LABELS.values()), row
    for patient in ("p01", "p02"):
        folder, fixed = out / patient, dicom.read_series(cohort / patient / "cbct")
        for name in ("rtstruct.dcm", "labels.tsv", "warped_labels.nii.gz", "dice.csv", "model.pt", "qc.png"):
            assert (folder / name).is_file(), (patient, name)
        written = pydicom.dcmread(folder / "rtstruct.dcm")
        frame = written.ReferencedFrameOfReferenceSequence[0]
        assert frame.FrameOfReferenceUID == fixed.frame_of_reference_uid
        series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == fixed.series_uid
        assert written.PatientID == patient
        assert [item.ROIName for item in written.StructureSetROISequence] == list(LABELS.values())
        # The contours are the study's warped labels, on the fixed series' grid.
        carried = dicom.read_rtstruct(folder / "rtstruct.dcm", fixed).labels
        np.testing.assert_array_equal(carried, io.load_labels(folder / "warped_labels.nii.gz")[0])
        dice = {r["name"]: float(r["dice"]) for r in csv.DictReader(open(folder / "dice.csv"))}
        assert dice == pytest.approx({name: float(table[int(patient[-1]) - 1][name]) for name in dice}, abs=1e-4)
    assert (out / "report.html").is_file()
    # The Dice before registration of DICOM rows: their RTSTRUCTs' labels, as the NIfTI labels of the same phantom.
    assert "mean Dice before" in (out / "report.html").read_text()
    before = study_report.dice_before(manifest, out, rows)
    assert sorted(before) == ["p01", "p02"]
    for patient in ("p01", "p02"):
        moving, moving_affine = io.load_labels(cohort / patient / "ct_labels.nii.gz")
        fixed, fixed_affine = io.load_labels(cohort / patient / "cbct_labels.nii.gz")
        nifti = metrics.dice_scores(qc.labels_before(moving, moving_affine, fixed.shape, fixed_affine), fixed,
                                    list(LABELS))
        assert before[patient] == pytest.approx(dict(zip(LABELS.values(), nifti)), abs=0.03), patient


def test_a_row_with_a_model_starts_from_it_and_one_without_registers_from_scratch(cohort, tmp_path):
    """One study, two kinds of row (two branches of the graph): a table in the manifest's order."""
    fixed_shape, fixed_affine = io.load_volume(cohort / "p01" / "cbct.nii.gz")[0].shape, \
        io.load_volume(cohort / "p01" / "cbct.nii.gz")[1]
    start = engine.new_velocity_field(fixed_shape, torch.as_tensor(fixed_affine, dtype=torch.float32),
                                      engine.ModelConfig(width=96), 0)
    model = io.save_checkpoint(tmp_path / "previous.pt", start, shape=fixed_shape, affine=fixed_affine)
    files = {column: name for column, name in (("moving", "ct.nii.gz"), ("fixed", "cbct.nii.gz"),
                                               ("moving_labels", "ct_labels.nii.gz"),
                                               ("fixed_labels", "cbct_labels.nii.gz"),
                                               ("fixed_mask", "cbct_fov.nii.gz"))}
    manifest = _manifest(cohort / "course.tsv", [
        {"patient": "warm", **{c: f"p01/{n}" for c, n in files.items()}, "init_model": str(model)},
        {"patient": "cold", **{c: f"p02/{n}" for c, n in files.items()}, "init_model": ""}])
    out = tmp_path / "out"
    workflow = init_study_wf(manifest=manifest, out_dir=out, work_dir=tmp_path / "work",
                             label_names=cohort / "labels.tsv", **FEW)
    assert workflow.get_node("warm_registration").get_node("coarse") is None
    fine = workflow.get_node("warm_registration").get_node("fine").inputs
    assert (fine.iterations, fine.learning_rate, fine.regularity_patches) == (4, 5e-4, 24)  # the warm ones
    rows = run_study(workflow)
    assert [(row["patient"], row["status"]) for row in rows] == [("warm", "ok"), ("cold", "ok")]
    assert [row["patient"] for row in study_table(out)] == ["warm", "cold"]
    assert not (out / "warm" / "coarse_log.csv").exists() and (out / "cold" / "coarse_log.csv").is_file()
    assert len(list(csv.DictReader(open(out / "warm" / "fine_log.csv")))) == 4
    assert len(list(csv.DictReader(open(out / "cold" / "fine_log.csv")))) == 10


def test_a_row_starting_from_a_model_that_the_same_study_writes_is_refused(cohort, tmp_path):
    """Days chained within one study (day 2 from the model.pt the study writes for day 1): refused, saying how."""
    files = {"moving": "ct.nii.gz", "fixed": "cbct.nii.gz", "moving_labels": "ct_labels.nii.gz",
             "fixed_labels": "cbct_labels.nii.gz"}
    out = tmp_path / "out"
    manifest = _manifest(tmp_path / "course.tsv", [
        {"patient": "fx1", **{c: str(cohort / "p01" / n) for c, n in files.items()}, "init_model": ""},
        {"patient": "fx2", **{c: str(cohort / "p01" / n) for c, n in files.items()}, "init_model": "out/fx1/model.pt"}])
    with pytest.raises(io.InputError, match=f"row 'fx2' starts from {out / 'fx1' / 'model.pt'}, the model this study "
                       "writes for row 'fx1': days of a course cannot be chained within one study; run a study of "
                       "'fx1' first"):
        init_study_wf(manifest=manifest, out_dir=out, work_dir=tmp_path / "work", **FEW)
    # A model from elsewhere (an earlier study's) is what a row may start from.
    (tmp_path / "earlier").mkdir()
    manifest = _manifest(tmp_path / "course.tsv", [
        {"patient": "fx2", **{c: str(cohort / "p01" / n) for c, n in files.items()},
         "init_model": "earlier/model.pt"}])
    assert init_study_wf(manifest=manifest, out_dir=out, work_dir=tmp_path / "work", **FEW).get_node(
        "warm_patients").iterables == ("patient", ["fx2"])
