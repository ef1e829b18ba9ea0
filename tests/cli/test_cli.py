"""The inrlddmm command line, run as a user would (tiny volumes, few iterations)."""

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_report_renders
from PIL import Image

from nipype_inrlddmm import cli, engine
from nipype_inrlddmm.evaluation import evaluate_files, metrics
from nipype_inrlddmm.phantom import write_cohort

FEW = ["--coarse-iterations", "10", "--distill-iterations", "5", "--fine-iterations", "10", "--quiet"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), 1, shape=(48, 40, 20))


def test_register_writes_every_documented_output(cohort, tmp_path, capsys):
    patient = cohort.parent / "p01"
    code = cli.main([
        "register", "--moving", str(patient / "ct.nii.gz"), "--fixed", str(patient / "cbct.nii.gz"),
        "--moving-labels", str(patient / "ct_labels.nii.gz"), "--fixed-labels", str(patient / "cbct_labels.nii.gz"),
        "--fixed-mask", str(patient / "cbct_fov.nii.gz"), "--label-names", str(cohort.parent / "labels.tsv"),
        "--out-dir", str(tmp_path), "--trajectory", "3", "--timings", str(tmp_path / "timings.json"), *FEW,
    ])
    assert code == 0
    for name in ("warped.nii.gz", "displacement.nii.gz", "model.pt", "log.csv", "warped_labels.nii.gz",
                 "dice.csv", "dice.json", "qc.png", "trajectory.nii.gz", "trajectory.gif"):
        assert (tmp_path / name).is_file(), name
    assert nib.load(tmp_path / "trajectory.nii.gz").shape == (48, 40, 20, 3)
    assert nib.load(tmp_path / "displacement.nii.gz").shape == (48, 40, 20, 1, 3)
    rows = list(csv.DictReader(open(tmp_path / "dice.csv")))
    assert [row["name"] for row in rows] == ["body", "right_lung", "left_lung", "heart", "spinal_cord", "target"]
    assert all(0.0 <= float(row["dice"]) <= 1.0 for row in rows)
    summary = json.loads((tmp_path / "dice.json").read_text())
    assert {"mean_dice", "jacobian_min", "jacobian_nonpositive_percent", "sdlogj"} <= summary.keys()
    log = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [row["stage"] for row in log].count("fine") == 10
    # Evaluated in memory, as the files written say: the evaluation of those files gives the same tables.
    again = evaluate_files(tmp_path / "warped_labels.nii.gz", patient / "cbct_labels.nii.gz", tmp_path / "again.csv",
                           tmp_path / "again.json", label_names=cohort.parent / "labels.tsv",
                           displacement=tmp_path / "displacement.nii.gz", mask=patient / "cbct_fov.nii.gz")
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "dice.csv").read_text()
    assert again[1] == summary
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings) == {"read", "stages", "dense field and warp", "write", "labels", "evaluation", "QC",
                            "trajectory"}
    assert timings["stages"] == pytest.approx(sum(float(log[-1]["seconds"]) for log in _stage_logs(log)))
    captured = capsys.readouterr()
    assert "spinal_cord" in captured.out
    # The summary: the Dice of the labels as they were (the phantom's CT and CBCT share a grid), then after.
    fov = nib.load(patient / "cbct_fov.nii.gz").get_fdata() > 0
    before = np.mean(metrics.dice_scores(nib.load(patient / "ct_labels.nii.gz").get_fdata().astype(int),
                                         nib.load(patient / "cbct_labels.nii.gz").get_fdata().astype(int),
                                         [int(row["label"]) for row in rows], fov))
    assert f"mean Dice over 6 labels: {before:.3f} before, {summary['mean_dice']:.3f} after" in captured.out
    assert f"SDlogJ {summary['sdlogj']:.3f}" in captured.out
    assert "drawing the QC figure" not in captured.err  # --quiet
    assert "loss=" not in captured.err  # --quiet: no progress bars
    assert not list(tmp_path.glob(".*partial*"))  # no temporary left behind


def _stage_logs(log):
    return [[row for row in log if row["stage"] == stage] for stage in ("coarse", "distill", "fine")]


def test_register_with_affine_recovers_a_header_shift_and_the_written_chain_reproduces_the_warp(cohort, tmp_path):
    from scipy import ndimage

    from nipype_inrlddmm import io, pipeline

    patient = cohort.parent / "p01"
    ct = nib.load(patient / "ct.nii.gz")
    shift = np.array([24.0, -16.0, 12.0])  # mm, 2-3 voxels of this phantom
    moved = ct.affine.copy()
    moved[:3, 3] += shift
    for name in ("ct", "ct_labels"):
        image = nib.load(patient / f"{name}.nii.gz")
        nib.Nifti1Image(np.asarray(image.dataobj), moved).to_filename(str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    code = cli.main([
        "register", "--moving", str(tmp_path / "ct.nii.gz"), "--fixed", str(patient / "cbct.nii.gz"),
        "--moving-labels", str(tmp_path / "ct_labels.nii.gz"), "--fixed-labels", str(patient / "cbct_labels.nii.gz"),
        "--affine", "affine", "--out-dir", str(out), *FEW,
    ])
    assert code == 0
    matrix = io.load_itk_affine(out / "affine.txt")  # fixed world -> moving world, RAS mm
    # The same search without the shift, then the shift: a header translation moves the result by exactly it.
    unshifted = io.load_itk_affine(pipeline.affine_init(patient / "ct.nii.gz", patient / "cbct.nii.gz",
                                                        tmp_path / "unshifted")["transform"])
    translation = np.eye(4)
    translation[:3, 3] = shift
    np.testing.assert_allclose(matrix, translation @ unshifted, atol=1e-2)
    assert json.loads((out / "dice.json").read_text())["mean_dice"] > 0.8
    # warped(x) = original moving(A (x + d(x))): the documented order, field first, then affine.txt.
    field, field_affine = io.load_displacement(out / "displacement.nii.gz")
    grid = np.stack(np.meshgrid(*map(np.arange, field.shape[:3]), indexing="ij"), -1)
    points = grid @ field_affine[:3, :3].T + field_affine[:3, 3] + field
    to_voxel = np.linalg.inv(moved) @ matrix
    voxels = points @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    expected = ndimage.map_coordinates(np.asarray(ct.dataobj, np.float32), np.moveaxis(voxels, -1, 0), order=1,
                                       mode="nearest")
    warped = np.asarray(nib.load(out / "warped.nii.gz").dataobj)
    inside = (voxels > 0).all(-1) & (voxels < np.array(ct.shape) - 1).all(-1)
    np.testing.assert_allclose(warped[inside], expected[inside], atol=1e-3 * np.abs(expected).max())


def test_register_names_a_bad_file_and_writes_nothing(cohort, tmp_path, capsys):
    bad = tmp_path / "cbct.nii.gz"
    nib.Nifti1Image(np.full((48, 40, 20), np.nan, np.float32), np.eye(4)).to_filename(str(bad))
    code = cli.main(["register", "--moving", str(cohort.parent / "p01" / "ct.nii.gz"), "--fixed", str(bad),
                     "--out-dir", str(tmp_path / "out"), *FEW])
    assert code == 2
    assert f"{bad}: the image holds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_that_fails_after_writing_leaves_its_output_folder_as_it_found_it(cohort, tmp_path, monkeypatch):
    from nipype_inrlddmm.reports import qc

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def broken(*args, **kwargs):
        raise RuntimeError("the QC figure failed")

    monkeypatch.setattr(qc, "qc_figure", broken)  # after the field, the labels and dice.csv are written
    patient = cohort.parent / "p01"
    with pytest.raises(RuntimeError, match="QC figure failed"):
        cli.main(["register", "--moving", str(patient / "ct.nii.gz"), "--fixed", str(patient / "cbct.nii.gz"),
                  "--moving-labels", str(patient / "ct_labels.nii.gz"),
                  "--fixed-labels", str(patient / "cbct_labels.nii.gz"), "--out-dir", str(out), *FEW])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_mr_to_ultrasound_with_4d_labels_and_a_centred_start(real_data, tmp_path, capsys):
    """The prostate set's own label files (gland, then landmark blobs, one per volume) through the command."""
    d = real_data / "prostate-mr-us"
    pair = ["--moving", str(d / "mr_images" / "case000003.nii.gz"),
            "--fixed", str(d / "us_images" / "case000003.nii.gz"),
            "--moving-labels", str(d / "mr_labels" / "case000003.nii.gz"),
            "--fixed-labels", str(d / "us_labels" / "case000003.nii.gz"), "--affine", "rigid", "--init", "geometry",
            "--similarity", "mind", "--mi-weight", "0"]  # across modalities, as docs/usage.md says
    assert cli.main(["register", *pair, "--out-dir", str(tmp_path / "all"), *FEW]) == 0
    rows = list(csv.DictReader(open(tmp_path / "all" / "dice.csv")))
    assert [(row["label"], row["name"]) for row in rows] == [("1", "volume 0"), ("2", "volume 1"), ("3", "volume 2")]
    assert float(rows[0]["dice"]) > 0.5  # the gland, from the grid centres (0.62 before any deformation)
    assert cli.main(["register", *pair, "--label-volume", "0", "--out-dir", str(tmp_path / "gland"), *FEW]) == 0
    gland = list(csv.DictReader(open(tmp_path / "gland" / "dice.csv")))
    assert [(row["label"], row["name"]) for row in gland] == [("1", "volume 0")]
    assert cli.main(["register", *pair, "--label-volume", "5", "--out-dir", str(tmp_path / "none"), *FEW]) == 2
    assert "has no volume 5: it holds 3" in capsys.readouterr().err


def test_init_needs_a_pre_alignment(cohort, tmp_path, capsys):
    patient = cohort.parent / "p01"
    assert cli.main(["register", "--moving", str(patient / "ct.nii.gz"), "--fixed", str(patient / "cbct.nii.gz"),
                     "--init", "geometry", "--out-dir", str(tmp_path / "out"), *FEW]) == 2
    assert "--init: sets where the pre-alignment starts: give --affine" in capsys.readouterr().err


def test_the_program_exits_with_its_code_and_its_exit_handlers_but_without_the_teardown(cohort, tmp_path):
    """`inrlddmm` skips the interpreter's teardown once every output is written: the exit code, the outputs and
    the exit handlers (here one registered before the command runs) are what an ordinary exit gives."""
    patient = cohort.parent / "p01"

    def program(moving, out_dir):
        argv = ["inrlddmm", "register", "--moving", str(moving), "--fixed", str(patient / "cbct.nii.gz"),
                "--out-dir", str(out_dir), *FEW]
        script = ("import atexit, sys; atexit.register(lambda: print('exit handler ran', flush=True)); "
                  f"sys.argv = {argv!r}; from nipype_inrlddmm.cli import run; run()")
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)

    done = program(patient / "ct.nii.gz", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("exit handler ran")
    assert {"warped.nii.gz", "displacement.nii.gz", "model.pt", "log.csv", "qc.png"} <= {
        path.name for path in (tmp_path / "out").iterdir()}
    refused = program(tmp_path / "missing.nii.gz", tmp_path / "refused")
    assert refused.returncode == 2 and "missing.nii.gz" in refused.stderr
    assert refused.stdout.rstrip().endswith("exit handler ran") and not (tmp_path / "refused").exists()


def test_demo_runs_and_prints_the_dice_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nipype_inrlddmm.cli", "demo", "--out-dir", str(tmp_path), "--patients", "2",
         "--shape", "48", "40", "20", *FEW],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    table = list(csv.DictReader(open(tmp_path / "study_dice.csv")))
    assert [row["patient"] for row in table] == ["p01", "p02"]
    # The printed table: whole label names, the summary columns, each patient's figures as written.
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["patient"]).split()
    assert header == ["patient", "body", "right_lung", "left_lung", "heart", "spinal_cord", "target", "mean", "Dice",
                      "HD95", "mm", "%", "detJ<=0", "SDlogJ"]
    p02 = next(line for line in lines if line.split()[:1] == ["p02"]).split()
    assert p02[-4:] == [f"{float(table[1][key]):.3f}" for key in ("mean_dice", "mean_hd95_mm",
                                                                  "jacobian_nonpositive_percent", "sdlogj")]
    # Every figure: a QC figure and a trajectory animation per patient, the report linking them.
    for patient in ("p01", "p02"):
        assert Image.open(tmp_path / patient / "qc.png").size[0] > 500
        assert Image.open(tmp_path / patient / "trajectory.gif").n_frames == 5  # the demo's default K
    assert f"report: {tmp_path / 'report.html'}" in result.stdout
    assert_report_renders(tmp_path / "report.html", {"p01": "ok", "p02": "ok"}, figures=4)


def test_help_shows_every_default_and_the_choices():
    out = subprocess.run([sys.executable, "-m", "nipype_inrlddmm.cli", "register", "--help"],
                         capture_output=True, text=True).stdout
    from nipype_inrlddmm.engine import config_from_options

    config = config_from_options()
    flat = " ".join(out.split())
    assert f"iterations of the fine stage (default: {config.fine.iterations})" in flat
    # The automatic width's rule, spelt out in the help, is the engine's.
    from nipype_inrlddmm.engine.velocity import LARGE_GRID_WIDTH, SMALL_GRID_VOXELS, SMALL_GRID_WIDTH

    assert config.model.width is None
    side = round(SMALL_GRID_VOXELS ** (1 / 3))
    assert (f"--width WIDTH hidden units per layer of the velocity MLP; when not given, {SMALL_GRID_WIDTH} if the "
            f"fine stage's grid has at most {side}^3 voxels, {LARGE_GRID_WIDTH} if more (default: sized to the grid)"
            in flat)
    assert "{lncc,ncc,mse,mi,mind}" in out and "{fourier,siren,none}" in out
    assert "(default: sized to the grid)" in flat


def test_an_option_reads_the_same_in_the_help_and_in_the_interfaces():
    """Each option's help is written once (nipype_inrlddmm.options): the command's --help and the traits say it."""
    from nipype_inrlddmm.interfaces import CoarseINR, DistillINR, FineINR
    from nipype_inrlddmm.options import HELP

    out = subprocess.run([sys.executable, "-m", "nipype_inrlddmm.cli", "register", "--help"],
                         capture_output=True, text=True).stdout
    squeezed = "".join(out.split())  # argparse wraps lines, also after a hyphen
    for name in cli._OPTIONS:
        assert "".join(HELP[name].split()) in squeezed, name
    for interface, stage in ((CoarseINR, "coarse"), (DistillINR, "distill"), (FineINR, "fine")):
        traits = interface().inputs.traits()
        assert traits["iterations"].desc == HELP[f"{stage}_iterations"]
        # Two say more in a trait: how to give a value per axis, how to turn the window off.
        shared = [name for name in HELP if name in traits and name not in ("coarse_factor", "velocity_window_mm")]
        assert shared and all(traits[name].desc == HELP[name] for name in shared), stage
    for name in ("coarse_factor", "velocity_window_mm"):
        assert CoarseINR().inputs.traits()[name].desc.startswith(HELP[name])
    assert "".join(HELP["velocity_window_mm"].split()) in squeezed


def test_the_velocity_window_is_set_on_the_command_line():
    parser = cli.build_parser()
    command = ["register", "--moving", "moving.nii.gz", "--fixed", "fixed.nii.gz", "--out-dir", "out"]
    assert "velocity_window_mm" not in cli._registration_options(parser.parse_args(command))
    options = cli._registration_options(parser.parse_args(command + ["--velocity-window-mm", "3", "9"]))
    assert engine.config_from_options(**options).velocity_window_mm == (3.0, 9.0)
    options = cli._registration_options(parser.parse_args(command + ["--no-velocity-window"]))
    assert engine.config_from_options(**options).velocity_window_mm is None
    with pytest.raises(SystemExit):
        parser.parse_args(command + ["--no-velocity-window", "--velocity-window-mm", "3", "9"])
    # The help states the package's default, which the command line leaves to the engine.
    from nipype_inrlddmm.options import HELP
    assert "(default %g %g)" % engine.RegistrationConfig().velocity_window_mm in HELP["velocity_window_mm"]


def test_help_describes_every_command():
    out = subprocess.run([sys.executable, "-m", "nipype_inrlddmm.cli", "register", "--help"],
                         capture_output=True, text=True).stdout
    assert "--fixed-mask" in out and "--seed" in out and "--device" in out
    out = subprocess.run([sys.executable, "-m", "nipype_inrlddmm.cli", "study", "--help"],
                         capture_output=True, text=True).stdout
    for flag in ("--plugin", "--n-procs", "--work-dir", "--out-dir", "--fine-iterations", "SLURM", "manifest"):
        assert flag in out, flag


def test_parsing_the_command_line_imports_no_torch_and_its_choices_are_the_engines():
    """A MultiProc study's worker server starts importing torch before this process does (in parallel)."""
    from nipype_inrlddmm.engine.affine import TRANSFORMS

    probe = "import sys, nipype_inrlddmm.cli as c; c.build_parser().parse_args(['demo']); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    from nipype_inrlddmm.engine.similarity import SIMILARITIES
    from nipype_inrlddmm.engine.velocity import ENCODINGS

    assert cli.TRANSFORMS == TRANSFORMS and set(cli.SIMILARITIES) == set(SIMILARITIES)
    assert cli.ENCODINGS == ENCODINGS


def test_study_refuses_a_bad_manifest_naming_it(tmp_path, capsys):
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("patient\tmoving\np01\tct.nii.gz\n")
    code = cli.main(["study", str(manifest), "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")])
    assert code == 2
    assert f"{manifest}: manifest needs columns" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_study_refuses_more_threads_per_node_than_slots(cohort, tmp_path, capsys):
    code = cli.main(["study", str(cohort.parent), "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w"),
                     "--plugin", "MultiProc", "--n-procs", "2", "--num-threads", "3"])
    assert code == 2
    assert "exceed --n-procs 2" in capsys.readouterr().err
