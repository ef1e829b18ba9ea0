"""What users look at: the trajectory, labels carried back through the inverse map, QC figures and the study report.

One small registration (conftest's ``registered``) serves every test that needs a trained network; the rest
run on synthetic volumes and tables, or a small phantom cohort.
"""

import os
import platform
import re
import subprocess
import time
from io import BytesIO

import nibabel as nib
import numpy as np
import pytest
from conftest import PHANTOM_SHAPE, REGISTERED_OPTIONS, assert_report_renders
from PIL import Image
from scipy import ndimage

from nipype_inrlddmm import cli, engine, io, pipeline
from nipype_inrlddmm.evaluation import metrics
from nipype_inrlddmm.reports import qc
from nipype_inrlddmm.reports import study as study_report
from nipype_inrlddmm.interfaces import ApplyWarp, QCReport
from nipype_inrlddmm.phantom import LABELS, write_cohort


def test_apply_warp_invert_carries_fixed_space_labels_back(registered, tmp_path):
    root, pair, _, files = registered
    back = ApplyWarp(in_file=str(files["warped_labels"]), velocity_checkpoint=str(files["model"]),
                     reference_image=str(files["moving"]), invert=True, interpolation="label",
                     out_file="labels_back.nii.gz").run(cwd=str(tmp_path)).outputs.out_file
    labels, affine = io.load_labels(back)
    np.testing.assert_allclose(affine, pair.affine)
    inside = pair.cbct_fov  # the warped labels are cut at the CBCT field of view only where the flow left it
    dice = [metrics.dice(np.where(inside, labels, 0), np.where(inside, pair.ct_labels, 0), v) for v in LABELS]
    print("Dice of the moving labels carried forward then back:", np.round(dice, 3))
    # Two label resamplings move a boundary voxel or two whatever the inverse: the 19-voxel target
    # comes back at Dice 0.81 with 0, 2, 4 or 8 inverse corrections alike, at 4 and at 6 Euler steps,
    # and a 28-voxel spinal cord that the flow shifts by half a voxel comes back at 0.67, eroded to its
    # 14 central voxels, with the round trip exact to 0.001 voxel.  So Dice measures the inverse only on
    # labels of 100 voxels and more; a small label must survive and come back where it was.
    sizes = [((pair.ct_labels == v) & inside).sum() for v in LABELS]
    assert min(d for d, size in zip(dice, sizes) if size >= 100) > 0.85
    for value in LABELS:
        back_here = (labels == value) & inside
        near_original = ndimage.binary_dilation(pair.ct_labels == value)  # within one voxel
        assert back_here.any() and not (back_here & ~near_original).any(), LABELS[value]

    with pytest.raises(ValueError, match="invert=True needs velocity_checkpoint"):
        ApplyWarp(in_file=str(files["warped_labels"]), displacement=str(files["displacement"]),
                  reference_image=str(files["moving"]), invert=True).run(cwd=str(tmp_path))
    elsewhere = io.save_image(tmp_path / "other_grid.nii.gz", np.zeros((8, 8, 8), np.int32), np.eye(4))
    refused = re.escape(f"{elsewhere}: the image to carry back is not on the fixed grid")
    with pytest.raises(io.InputError, match=refused):
        pipeline.apply_inverse_warp(elsewhere, files["model"], files["moving"], tmp_path / "x.nii.gz")


def test_trajectory_starts_at_the_moving_image_and_ends_at_the_warped_one(registered, tmp_path):
    _, pair, result, files = registered
    stride = engine.config_from_options(**REGISTERED_OPTIONS).field_stride
    outputs = pipeline.run_trajectory(files["model"], files["moving"], files["fixed"], tmp_path, n_times=4,
                                      field_stride=stride, title="p")
    frames = np.asarray(nib.load(outputs["trajectory"]).dataobj)
    assert frames.shape == (*PHANTOM_SHAPE, 4)
    assert nib.load(outputs["trajectory"]).header.get_zooms()[3] == pytest.approx(1 / 3)
    warped = np.asarray(nib.load(files["warped"]).dataobj)
    scale = np.ptp(pair.ct)
    start, end = np.abs(frames[..., 0] - pair.ct).max() / scale, np.abs(frames[..., -1] - warped).max() / scale
    print(f"trajectory: |t=0 - moving| {start:.2e}, |t=1 - warped| {end:.2e} (of the intensity range)")
    assert start < 1e-5 and end < 1e-5
    assert np.abs(frames[..., 1] - frames[..., 0]).max() > 0  # the middle frames move
    with Image.open(outputs["animation"]) as animation:
        assert animation.n_frames == 4


def test_qc_figure_of_a_registration(registered, tmp_path):
    root, _, _, files = registered
    labels_tsv = root / "labels.tsv"
    io.write_csv(labels_tsv, [{"index": k, "name": v} for k, v in LABELS.items()], delimiter="\t")
    figure = QCReport(fixed_image=str(files["fixed"]), moving_image=str(files["moving"]),
                      warped_image=str(files["warped"]), displacement=str(files["displacement"]),
                      fixed_labels=str(files["fixed_labels"]), moving_labels=str(files["moving_labels"]),
                      warped_labels=str(files["warped_labels"]), fixed_mask=str(files["mask"]),
                      label_names=str(labels_tsv), title="p02").run(cwd=str(tmp_path)).outputs.out_file
    pixels = np.asarray(Image.open(figure).convert("RGB")).astype(int)
    height, width, _ = pixels.shape
    assert height > 3 * width / 4  # three planes and three rows of two labels
    yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 60)
    green = (pixels[..., 0] < 60) & (pixels[..., 1] > 200) & (pixels[..., 2] < 60)
    assert yellow.sum() > 100 and green.sum() > 100  # contours drawn, most of them agreeing

    bad = io.save_image(tmp_path / "small.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(io.InputError, match=re.escape(f"{bad}: the warped image is not on the grid")):
        qc.write_qc_figure(tmp_path / "x.png", fixed_image=files["fixed"], moving_image=files["moving"],
                           warped_image=bad)


def test_the_figure_resamples_only_the_slices_it_shows_and_they_are_the_whole_volume_s():
    """A moving image on its own oblique grid: each 'before' slice equals that slice of the whole volume
    resampled onto the fixed grid; labels on the fixed grid are taken as they are."""
    rng = np.random.default_rng(0)
    moving = ndimage.gaussian_filter(rng.random((30, 26, 22)), 2).astype(np.float32)
    angle = np.deg2rad(10.0)
    moving_affine = np.array([[1.2 * np.cos(angle), -np.sin(angle), 0, -15],
                              [1.2 * np.sin(angle), np.cos(angle), 0, -12], [0, 0, 1.5, -14], [0, 0, 0, 1]])
    fixed_shape, fixed_affine = (28, 24, 20), np.diag([1.1, 1.0, 1.4, 1.0])
    fixed_affine[:3, 3] = -14
    whole = qc._before(moving, moving_affine, fixed_shape, fixed_affine)
    for axis in range(3):
        for index in (0, fixed_shape[axis] // 2, fixed_shape[axis] - 1):
            np.testing.assert_allclose(qc._moving_cut(moving, moving_affine, fixed_shape, fixed_affine, axis, index),
                                       qc._cut(whole, axis, index), atol=1e-6)
    labels = rng.integers(0, 4, fixed_shape).astype(np.int32)
    assert qc.labels_before(labels, fixed_affine, fixed_shape, fixed_affine) is labels


def test_contour_overlay_colours():
    square = np.zeros((10, 10), np.int32)
    square[2:7, 2:7] = 1
    same = qc.contour_overlay(square, square)
    edge = same[..., 3] > 0
    assert edge.sum() == 16 and np.all(same[edge, :3] == qc.OVERLAP_COLOUR)
    moved = qc.contour_overlay(square, np.roll(square, 3, axis=0))
    colours = {tuple(c) for c in moved[moved[..., 3] > 0, :3]}
    assert colours == {qc.FIXED_COLOUR, qc.WARPED_COLOUR, qc.OVERLAP_COLOUR}


def _rows():
    ok = {"status": "ok", "body": 0.95, "heart": 0.81, "target": 0.7, "mean_dice": 0.82, "mean_hd95_mm": 3.2,
          "jacobian_min": 0.4, "jacobian_nonpositive_percent": 0.0, "sdlogj": 0.05, "missing_labels": "", "error": ""}
    return [{"patient": "p01", **ok}, {"patient": "p02", "status": "failed", "error": "coarse: p02/cbct.nii.gz: "
                                       "cannot read the image <bad>"},
            {"patient": "p03", **ok, "heart": 0.9}]


def test_study_report_marks_failures_links_figures_and_renders(tmp_path):
    for patient in ("p01", "p03"):
        image = Image.new("RGB", (120, 80), (30, 120, 200))
        (tmp_path / patient).mkdir()
        image.save(tmp_path / patient / "qc.png")
    image.save(tmp_path / "p03" / "trajectory.gif")
    path = study_report.write_study_report(tmp_path, _rows(),
                                           parameters={"fine": {"iterations": 5, "similarity": "lncc"}})
    text = path.read_text()
    assert path.name == "report.html" and "&lt;bad&gt;" in text and "<bad>" not in text  # the reason, escaped
    assert 'href="p01/qc.png"' in text and 'src="p03/trajectory.gif"' in text and "http" not in text  # offline
    assert "nipype_inrlddmm" in text and ">lncc<" in text  # versions and parameters
    # One format per column: HD95 3.2 reads 3.20 and SDlogJ 0.05 reads 0.050, as their neighbours do.
    table = text[text.index('<table id="dice-table">'):text.index("</table>", text.index('<table id="dice-table">'))]
    assert "<td>3.20</td>" in table and "<td>0.050</td>" in table and "<td>0.400</td>" in table
    provenance = text[text.index('<table id="provenance">'):]
    assert f">{platform.python_version()} (" in provenance and ">command<" in provenance
    assert "results written" not in provenance  # no patient's dice.csv here
    (tmp_path / "p01" / "dice.csv").write_text("label,name,dice\n")
    os.utime(tmp_path / "p01" / "dice.csv", (0, 1.7e9))
    text = study_report.write_study_report(tmp_path, _rows(), parameters={"fine": {"iterations": 5}}).read_text()
    assert time.strftime("%Y-%m-%d %H:%M", time.localtime(1.7e9)) in text  # when the results were written
    # Rewritten only when the content changes: a cached rerun leaves the study folder untouched.
    before = path.stat().st_mtime_ns
    study_report.write_study_report(tmp_path, _rows(), parameters={"fine": {"iterations": 5}})
    assert path.stat().st_mtime_ns == before
    assert_report_renders(path, {"p01": "ok", "p02": "failed", "p03": "ok"}, figures=3)



def _wide_rows(n_labels=30, n_patients=4):
    """A brain-sized study: 30 labels with FreeSurfer-length names, Dice a few hundredths apart."""
    names = [f"Left-Cerebral-White-Matter-{i:02d}" for i in range(n_labels)]
    rows = []
    for p in range(n_patients):
        row = {"patient": f"sub-{p:02d}", "status": "ok"}
        row.update({name: 0.93 + 0.01 * ((i + p) % 5) for i, name in enumerate(names)})
        row.update(mean_dice=0.95, mean_hd95_mm=2.1, jacobian_min=0.3, jacobian_nonpositive_percent=0.0,
                   sdlogj=0.1, missing_labels="", error="")
        rows.append(row)
    before = {row["patient"]: {name: 0.88 + 0.005 * (i % 4) for i, name in enumerate(names)} for row in rows}
    return rows, names, before


def test_dice_tables_fit_the_page_and_the_plot_axis_shows_the_change(tmp_path):
    rows, names, before = _wide_rows()
    text = study_report.study_report_html(rows, before=before)
    # The patient table has the same few columns whatever the labels; the labels go into tables of
    # at most LABELS_PER_TABLE columns each, laid out to the page's width.
    patient_table = re.search(r'<table id="dice-table">.*?</table>', text).group(0)
    assert patient_table.count("<th>") == len(study_report.PATIENT_COLUMNS) + 1 and names[0] not in patient_table
    label_tables = re.findall(r'<table class="labels wide">.*?</table>', text)
    assert len(label_tables) == 3
    assert all(t.count("<th>") <= study_report.LABELS_PER_TABLE for t in label_tables)
    assert sum(t.count("<th>") for t in label_tables) == len(names)
    assert "table.labels { table-layout: fixed; } table.labels.wide { width: 100%; }" in text
    assert '<span class="before">0.880</span>' in text  # before registration, beside the Dice after

    # The axis spans the values shown (before and after), padded, not 0-1: the change fills it.
    values = [v for row in rows for v in (row[n] for n in names)] + [v for b in before.values() for v in b.values()]
    low, high = study_report.dice_axis_limits(values)
    assert low <= min(values) and high >= max(values) and high <= 1.005
    assert (max(values) - min(values)) / (high - low) > 0.8, (low, high)
    assert study_report.dice_axis_limits([1.0, 1.0]) == (0.99, 1.005)
    assert Image.open(BytesIO(study_report.dice_boxplot(rows, before))).width <= 1400

    # In a 1400 px window nothing scrolls sideways (the load script records the page's scroll width).
    from conftest import CHROMIUM_FLAGS, chromium

    page = tmp_path / "report.html"
    page.write_text(text)
    binary = chromium()
    dom = subprocess.run([binary, *CHROMIUM_FLAGS, "--window-size=1400,1000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    width = re.search(r'data-scroll-width="(\d+)"', dom.stdout)
    assert width and int(width.group(1)) <= 1400, width and width.group(0)


def test_dice_before_is_the_labels_through_the_headers_in_the_mask(tmp_path):
    manifest = write_cohort(tmp_path / "data", 1, shape=PHANTOM_SHAPE)
    data = manifest.parent / "p01"
    (tmp_path / "out" / "p01").mkdir(parents=True)
    io.write_csv(tmp_path / "out" / "p01" / "dice.csv", [{"label": k, "name": v, "dice": 0.99, "missing": ""}
                                                         for k, v in LABELS.items()])
    rows = [{"patient": "p01", "status": "ok", **{v: 0.99 for v in LABELS.values()}}]
    found = study_report.dice_before(manifest, tmp_path / "out", rows)
    moving, _ = io.load_labels(data / "ct_labels.nii.gz")
    fixed, _ = io.load_labels(data / "cbct_labels.nii.gz")
    mask = np.asarray(nib.load(data / "cbct_fov.nii.gz").dataobj) > 0
    expected = {v: metrics.dice(moving[mask], fixed[mask], k) for k, v in LABELS.items()}
    assert found["p01"] == pytest.approx(expected, abs=1e-4)
    assert min(found["p01"].values()) < 0.9  # the phantom's labels move: some overlap far less before
    path = study_report.write_study_report(tmp_path / "out", rows, manifest=manifest)
    assert '<span class="before">' in path.read_text() and "mean Dice before" in path.read_text()

def test_register_command_shows_a_progress_bar_per_stage(tmp_path, capsys):
    data = write_cohort(tmp_path / "data", 1, shape=PHANTOM_SHAPE).parent / "p01"
    base = ["register", "--moving", str(data / "ct.nii.gz"), "--fixed", str(data / "cbct.nii.gz"),
            "--coarse-iterations", "2", "--distill-iterations", "1", "--fine-iterations", "2"]
    assert cli.main([*base, "--out-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for stage in ("coarse", "distill", "fine"):
        assert re.search(rf"{stage}: .*loss=", err), (stage, err[-500:])
    # --quiet: tests/cli/test_cli.py::test_register_writes_every_documented_output checks that no bar is shown.
