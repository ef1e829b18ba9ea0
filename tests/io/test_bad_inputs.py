"""Bad input, faults and interruptions: clear errors, nothing lost.

* ``CASES``: one row per bad input.  Each is fed to the entry point that
  meets it in a real run (a stage of :mod:`nipype_inrlddmm.pipeline`, the
  label check of a study, the manifest reader, the evaluation) and must
  raise :class:`~nipype_inrlddmm.io.InputError` naming the file and the
  problem, with no optimisation started (the engine's stages are replaced by
  a tripwire) and nothing written to the output folder.
* A representative subset (``study=True``) goes through one small study
  together: each bad patient fails in Nipype's crash file and in
  ``study_dice.csv`` with the reason, and ``out_dir/<patient>/`` stays empty.
* Faults: a stage SIGKILLed in the middle of writing its result leaves no
  partial file where the result belongs.
* Fuzzing: random shapes, voxel types, intensities and affines through the
  load-and-validate path end in valid data or an ``InputError``, never
  another exception or a silently altered value.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PHANTOM_SHAPE

from nipype_inrlddmm import engine, evaluation, io, pipeline
from nipype_inrlddmm.evaluation import evaluate_files
from nipype_inrlddmm.phantom import LABELS
from nipype_inrlddmm.workflows import init_study_wf, run_study

FEW = dict(coarse_iterations=5, distill_iterations=3, fine_iterations=5)
CONFIG = engine.config_from_options(**FEW)
FILE_KEYS = ("moving", "fixed", "moving_labels", "fixed_labels", "fixed_mask")


# --- writers of bad files ------------------------------------------------------------------

def _affine_of(path) -> np.ndarray:
    return nib.load(path).affine


def _data_of(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _nifti(path: Path, data, affine, dtype=None) -> Path:
    """Write ``data`` with any sform, even NaN or singular (nibabel would not build such an image)."""
    data = np.asarray(data)
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype or data.dtype)
    header.set_data_shape(data.shape)
    header.set_qform(None, code=0)
    header["srow_x"], header["srow_y"], header["srow_z"] = np.asarray(affine, np.float64)[:3]
    header["sform_code"] = 1
    nib.Nifti1Image(data, None, header).to_filename(str(path))
    return path


def _like(path: Path, source: Path, change: Callable[[np.ndarray], np.ndarray] = lambda d: d, affine=None,
          dtype=None) -> Path:
    """``source`` with its voxels changed by ``change`` and/or another affine."""
    return _nifti(path, change(_data_of(source)), _affine_of(source) if affine is None else affine, dtype)


def _truncated(path: Path, source: Path, keep: float = 0.6) -> Path:
    content = source.read_bytes()
    path.write_bytes(content[: int(len(content) * keep)])
    return path


def _uncompressed(path: Path, source: Path) -> Path:
    image = nib.load(source)
    nib.Nifti1Image(np.asarray(image.dataobj), image.affine).to_filename(str(path))
    return path


def _shifted(affine, mm=3.0) -> np.ndarray:
    out = np.array(affine, float)
    out[:3, 3] += mm
    return out


def _with_column(affine, column: int, value) -> np.ndarray:
    out = np.array(affine, float)
    out[:3, column] = value
    return out


def _checkpoint(path: Path, source: Path, change: Callable[[dict], object]) -> Path:
    payload = torch.load(source, map_location="cpu", weights_only=True)
    torch.save(change(payload), path)
    return path


def _manifest(path: Path, rows: list[list[str]], delimiter="\t") -> Path:
    path.write_text("\n".join(delimiter.join(row) for row in rows) + "\n")
    return path


def _good_manifest_rows(files) -> list[list[str]]:
    return [list(FILE_KEYS) + ["patient"], [str(files[k]) for k in FILE_KEYS] + ["p01"]]


# --- the table ---------------------------------------------------------------------------------

@dataclass
class Case:
    """One bad input.

    ``make(folder, files)`` writes the bad file(s) into ``folder`` and returns
    ``(files, named)``: the patient's files with the bad one swapped in, and
    the paths the error must name (the first is ``InputError.path``).
    ``entry`` is where it is met; ``study`` puts the case in the study test,
    where ``node`` is the Nipype node expected to fail.
    """

    id: str
    make: Callable
    problem: str
    entry: str = "coarse"
    study: bool = False
    node: str = "coarse"


def swap(key: str, writer: Callable[[Path, dict], Path]):
    """A ``make`` that replaces ``files[key]`` by ``writer(folder, files)``."""

    def make(folder: Path, files: dict):
        bad = writer(folder, files)
        return {**files, key: bad}, [bad]

    return make


def _manifest_case(rows_of: Callable[[Path, dict], list[list[str]]], named_of=None, *, name="manifest.tsv",
                   delimiter="\t"):
    def make(folder: Path, files: dict):
        path = _manifest(folder / name, rows_of(folder, files), delimiter)
        return {**files, "manifest": path}, [path, *(named_of(folder, files) if named_of else [])]

    return make


def _missing_row(folder, files, column="moving", value="../elsewhere/ct.nii.gz"):
    rows = _good_manifest_rows(files)
    rows[1][FILE_KEYS.index(column)] = value
    return rows


def _patient_row(files, patient: str):
    header, row = _good_manifest_rows(files)
    return [header, row[:-1] + [patient]]


def _zero_axis(folder, files):
    return _nifti(folder / "empty_axis.nii.gz", np.zeros((32, 0, 16), np.float32), _affine_of(files["fixed"]))


def _nan(data):
    data = data.astype(np.float32)
    data[3, 4, 5] = np.nan
    return data


def _inf(data):
    data = data.astype(np.float32)
    data[::7, ::5, ::3] = np.inf
    return data


def _nearly_constant(data):
    out = np.full(data.shape, -1000.0, np.float32)
    out[1, 1, 1:4] = 500.0  # 3 voxels: fewer than the 0.5 % the intensity normalisation clips
    return out


def _rgb(folder, files):
    data = np.zeros(PHANTOM_SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = folder / "rgb.nii.gz"
    nib.Nifti1Image(data, _affine_of(files["fixed"])).to_filename(str(path))
    return path


def _absent(name):
    return lambda folder, files: folder / name


CASES = [
    # files that cannot be read
    Case("missing_moving", swap("moving", _absent("absent.nii.gz")), "moving file of patient|image file does not "
         "exist", study=True, node="select"),
    Case("fixed_is_a_folder", swap("fixed", lambda d, f: (d / "folder.nii.gz").mkdir() or d / "folder.nii.gz"),
         "does not exist \\(it is a folder\\)"),
    Case("corrupt_nifti", swap("fixed", lambda d, f: (d / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI")
                               and d / "corrupt.nii.gz"), "cannot read the image", study=True),
    Case("garbage_uncompressed", swap("moving", lambda d, f: (d / "garbage.nii").write_bytes(os.urandom(2048))
                                      and d / "garbage.nii"), "cannot read the image"),
    Case("truncated_nii_gz", swap("moving", lambda d, f: _truncated(d / "truncated.nii.gz", f["moving"])),
         "cannot read the image", study=True),
    Case("truncated_nii", swap("fixed", lambda d, f: _truncated(d / "truncated.nii",
                                                                _uncompressed(d / "full.nii", f["fixed"]))),
         "cannot read the image"),
    # wrong dimensionality
    Case("image_2d", swap("fixed", lambda d, f: _like(d / "slice.nii.gz", f["fixed"], lambda x: x[:, :, 8])),
         "must be 3-D"),
    Case("image_one_slice", swap("fixed", lambda d, f: _like(d / "one.nii.gz", f["fixed"], lambda x: x[:, :, 8:9])),
         "2-D in effect"),
    Case("image_4d", swap("fixed", lambda d, f: _like(d / "4d.nii.gz", f["fixed"],
                                                      lambda x: np.stack([x, x], axis=-1))),
         "must be 3-D", study=True),
    Case("image_5d_vector", swap("moving", lambda d, f: _like(d / "5d.nii.gz", f["moving"],
                                                              lambda x: np.stack([x] * 3, -1)[:, :, :, None])),
         "must be 3-D"),
    Case("zero_size_axis", swap("fixed", _zero_axis), "empty axis"),
    # voxel values
    Case("nan_voxel", swap("moving", lambda d, f: _like(d / "nan.nii.gz", f["moving"], _nan)), "1 NaN or Inf",
         study=True),
    Case("inf_voxels", swap("fixed", lambda d, f: _like(d / "inf.nii.gz", f["fixed"], _inf)), "NaN or Inf"),
    Case("beyond_float32", swap("fixed", lambda d, f: _like(d / "huge.nii.gz", f["fixed"],
                                                            lambda x: x.astype(np.float64) * 1e300)),
         "beyond the float32 range"),
    Case("constant_image", swap("fixed", lambda d, f: _like(d / "constant.nii.gz", f["fixed"],
                                                            lambda x: np.full_like(x, 7.0))),
         "constant", study=True),
    Case("nearly_constant_image", swap("moving", lambda d, f: _like(d / "flat.nii.gz", f["moving"],
                                                                    _nearly_constant)),
         "constant once its 0.5 % extreme voxels are clipped"),
    Case("complex_voxels", swap("moving", lambda d, f: _like(d / "complex.nii.gz", f["moving"],
                                                             lambda x: x.astype(np.complex64) * (1 + 1j))),
         "complex"),
    Case("rgb_voxels", swap("fixed", _rgb), "complex or RGB"),
    # geometry
    Case("singular_affine", swap("moving", lambda d, f: _like(d / "singular.nii.gz", f["moving"],
                                                              affine=_with_column(_affine_of(f["moving"]), 2, 0))),
         "singular", study=True),
    Case("nan_affine", swap("fixed", lambda d, f: _like(d / "nan_affine.nii.gz", f["fixed"],
                                                        affine=_with_column(_affine_of(f["fixed"]), 1, np.nan))),
         "affine .* holds NaN or Inf"),
    Case("inf_affine", swap("moving", lambda d, f: _like(d / "inf_affine.nii.gz", f["moving"],
                                                         affine=_with_column(_affine_of(f["moving"]), 0, np.inf))),
         "affine .* holds NaN or Inf"),
    Case("implausible_affine", swap("fixed", lambda d, f: _like(d / "km.nii.gz", f["fixed"],
                                                                affine=_shifted(_affine_of(f["fixed"]), 1e12))),
         "implausible"),
    Case("mask_on_another_grid", swap("fixed_mask", lambda d, f: _like(d / "mask.nii.gz", f["fixed_mask"],
                                                                       affine=_shifted(_affine_of(f["fixed_mask"])))),
         "mask is not on the grid of the fixed image"),
    Case("mask_empty", swap("fixed_mask", lambda d, f: _like(d / "mask0.nii.gz", f["fixed_mask"], np.zeros_like)),
         "mask is empty"),
    # label maps
    Case("labels_other_shape", swap("fixed_labels", lambda d, f: _like(d / "l.nii.gz", f["fixed_labels"],
                                                                       lambda x: x[:, :, :-2])),
         "not on the grid of its image", entry="labels"),
    Case("labels_other_affine", swap("moving_labels", lambda d, f: _like(
        d / "l.nii.gz", f["moving_labels"], affine=_shifted(_affine_of(f["moving_labels"])))),
        "not on the grid of its image", entry="labels", study=True, node="select"),
    Case("labels_non_integer", swap("moving_labels", lambda d, f: _like(
        d / "l.nii.gz", f["moving_labels"], lambda x: x.astype(np.float32) / 2, dtype=np.float32)),
        "non-integer", entry="labels", study=True, node="select"),
    Case("labels_empty", swap("fixed_labels", lambda d, f: _like(d / "l.nii.gz", f["fixed_labels"], np.zeros_like)),
         "empty", entry="labels", study=True, node="select"),
    Case("labels_nan", swap("fixed_labels", lambda d, f: _like(d / "l.nii.gz", f["fixed_labels"], _nan)),
         "NaN or Inf", entry="labels"),
    Case("labels_beyond_int32", swap("fixed_labels", lambda d, f: _like(
        d / "l.nii.gz", f["fixed_labels"], lambda x: x.astype(np.float64) * 3e9)), "int32 range", entry="labels"),
    Case("labels_missing", swap("moving_labels", _absent("absent_labels.nii.gz")), "does not exist",
         entry="labels"),
    Case("labels_corrupt", swap("fixed_labels", lambda d, f: _truncated(d / "l.nii.gz", f["fixed_labels"], 0.5)),
         "cannot read the label map", entry="labels"),
    Case("labels_5d", swap("moving_labels", lambda d, f: _like(d / "l.nii.gz", f["moving_labels"],
                                                               lambda x: np.stack([np.stack([x, x], -1)] * 2, -1))),
         "must be 3-D, or 4-D with one label per volume", entry="labels"),
    # checkpoints (fine stage: init_model; distillation: coarse_model)
    Case("checkpoint_other_version", swap("model", lambda d, f: _checkpoint(
        d / "old.pt", f["model"], lambda p: {**p, "version": "0.99.0"})), "written by nipype_inrlddmm 0.99.0, "
        "incompatible", entry="fine"),
    Case("checkpoint_no_version", swap("model", lambda d, f: _checkpoint(
        d / "nover.pt", f["model"], lambda p: {k: v for k, v in p.items() if k != "version"})),
        "records no package version", entry="distill"),
    Case("checkpoint_other_shape", swap("model", lambda d, f: _checkpoint(
        d / "shape.pt", f["model"], lambda p: {**p, "fixed_shape": [30, 28, 16]})), "another fixed-image grid",
        entry="fine"),
    Case("checkpoint_other_affine", swap("model", lambda d, f: _checkpoint(
        d / "affine.pt", f["model"], lambda p: {**p, "fixed_affine": _shifted(p["fixed_affine"]).tolist()})),
        "another fixed-image grid", entry="distill"),
    Case("checkpoint_corrupt", swap("model", lambda d, f: _truncated(d / "cut.pt", f["model"], 0.5)),
         "cannot read the checkpoint", entry="fine"),
    Case("checkpoint_not_ours", swap("model", lambda d, f: _checkpoint(d / "other.pt", f["model"],
                                                                       lambda p: {"weights": torch.zeros(3)})),
         "not a nipype_inrlddmm checkpoint", entry="fine"),
    Case("checkpoint_damaged", swap("model", lambda d, f: _checkpoint(
        d / "damaged.pt", f["model"], lambda p: {**p, "state_dict": {"center": torch.zeros(3)}})),
        "incomplete or damaged", entry="distill"),
    Case("checkpoint_missing", swap("model", _absent("absent.pt")), "checkpoint file does not exist", entry="fine"),
    # displacement fields
    Case("displacement_nan", swap("coarse_displacement", lambda d, f: _like(
        d / "d.nii.gz", f["coarse_displacement"], _nan)), "displacement holds NaN or Inf", entry="distill"),
    Case("displacement_not_a_field", swap("coarse_displacement", lambda d, f: f["fixed"]),
         "must have shape \\(X, Y, Z, 1, 3\\)", entry="distill"),
    Case("displacement_off_grid", swap("coarse_displacement", lambda d, f: io.save_displacement(
        d / "d.nii.gz", np.zeros((*PHANTOM_SHAPE[:2], 10, 3), np.float32), _affine_of(f["fixed"]))),
        "not on the grid of the reference .*\\(shape \\(32, 28, 10\\) vs \\(32, 28, 16\\)\\)", entry="warp"),
    # manifests
    Case("manifest_missing_column", _manifest_case(lambda d, f: [r[:1] + r[2:] for r in _good_manifest_rows(f)]),
         "missing \\['fixed'\\]", entry="manifest"),
    Case("manifest_csv_named_tsv", _manifest_case(lambda d, f: _good_manifest_rows(f), delimiter=","),
         "missing .* read as tab-separated", entry="manifest"),
    Case("manifest_duplicate_ids", _manifest_case(lambda d, f: _good_manifest_rows(f) + _good_manifest_rows(f)[1:]),
         "duplicate patient id 'p01' \\(lines 2 and 3\\)", entry="manifest"),
    Case("manifest_relative_path_outside_missing",
         _manifest_case(_missing_row, lambda d, f: [(d / "../elsewhere/ct.nii.gz").resolve()]),
         "line 2 \\(patient 'p01'\\), column 'moving'", entry="manifest"),
    Case("manifest_absolute_path_missing",
         _manifest_case(lambda d, f: _missing_row(d, f, "fixed_labels", "/nonexistent/labels.nii.gz"),
                        lambda d, f: ["/nonexistent/labels.nii.gz"]),
         "column 'fixed_labels'", entry="manifest"),
    Case("manifest_empty_patient_id", _manifest_case(lambda d, f: _patient_row(f, "")),
         "line 2: empty patient id", entry="manifest"),
    Case("manifest_patient_id_with_slash", _manifest_case(lambda d, f: _patient_row(f, "../p")),
         "cannot be a folder name", entry="manifest"),
    Case("manifest_extra_fields", _manifest_case(lambda d, f: [_good_manifest_rows(f)[0],
                                                               _good_manifest_rows(f)[1] + ["extra"]]),
         "more fields than the header", entry="manifest"),
    Case("manifest_no_rows", _manifest_case(lambda d, f: _good_manifest_rows(f)[:1]), "no rows", entry="manifest"),
    Case("manifest_not_text", lambda d, f: ({**f, "manifest": (d / "m.tsv").write_bytes(b"\xff\xfe\x00bad\xff")
                                             and d / "m.tsv"}, [d / "m.tsv"]), "cannot read", entry="manifest"),
    Case("manifest_missing", lambda d, f: ({**f, "manifest": d / "absent.tsv"}, [d / "absent.tsv"]),
         "manifest does not exist", entry="manifest"),
    # evaluation inputs
    Case("dice_warped_labels_off_grid", swap("moving_labels", lambda d, f: _like(
        d / "w.nii.gz", f["fixed_labels"], affine=_shifted(_affine_of(f["fixed_labels"])))),
        "not on the grid of its image", entry="dice"),
    Case("dice_label_names_bad", swap("label_names", lambda d, f: (d / "n.tsv").write_text("id\tname\nx\ty\n")
                                      and d / "n.tsv"), "label id is not an integer", entry="dice"),
]


def _entry_points(entry: str, files: dict, out: Path) -> list[Callable[[], object]]:
    """The calls that meet a bad input of kind ``entry`` in a real run."""
    if entry == "coarse":
        return [lambda: pipeline.run_coarse(files["moving"], files["fixed"], out, CONFIG,
                                            fixed_mask=files["fixed_mask"])]
    if entry == "labels":  # a study checks them in SelectPatient, `inrlddmm register` in load_pair
        labels = {"moving_labels": files["moving_labels"], "fixed_labels": files["fixed_labels"]}
        return [lambda: pipeline.check_labels(files["moving"], files["fixed"], **labels),
                lambda: pipeline.load_pair(files["moving"], files["fixed"], fixed_mask=files["fixed_mask"], **labels)]
    if entry == "fine":
        return [lambda: pipeline.run_fine(files["moving"], files["fixed"], files["model"], out, CONFIG)]
    if entry == "distill":
        return [lambda: pipeline.run_distill(files["model"], files["coarse_displacement"], files["fixed"], out, CONFIG)]
    if entry == "warp":
        return [lambda: pipeline.apply_warp(files["moving_labels"], files["coarse_displacement"], files["fixed"],
                                            out / "warped_labels.nii.gz", interpolation="label")]
    if entry == "manifest":
        return [lambda: io.read_manifest(files["manifest"])]
    if entry == "dice":
        return [lambda: evaluate_files(files["moving_labels"], files["fixed_labels"], out / "dice.csv",
                                       out / "dice.json", label_names=files["label_names"])]
    raise ValueError(entry)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_naming_the_file_before_any_optimisation(case, phantom_patient, tmp_path, no_optimisation):
    files, named = case.make(tmp_path, dict(phantom_patient))
    out = tmp_path / "out"
    for call in _entry_points(case.entry, files, out):
        with pytest.raises(io.InputError, match=case.problem) as caught:
            call()
        error = caught.value
        assert error.path == str(named[0]), str(error)
        for path in named:
            assert str(path) in str(error), str(error)
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())  # nothing written


def test_the_table_covers_every_kind_of_bad_input():
    """The issue's list, row by row (a guard against a case silently dropped from the table)."""
    ids = {case.id for case in CASES}
    required = {
        "missing_moving", "corrupt_nifti", "truncated_nii_gz", "image_2d", "image_4d", "zero_size_axis",
        "nan_voxel", "inf_voxels", "constant_image", "labels_other_affine", "labels_non_integer", "labels_empty",
        "singular_affine", "nan_affine", "checkpoint_other_version", "checkpoint_other_shape",
        "checkpoint_other_affine", "manifest_missing_column", "manifest_duplicate_ids",
        "manifest_relative_path_outside_missing",
    }
    assert required <= ids
    assert len(ids) == len(CASES)


# --- labels in one map only: reported missing, never a silent 0 ------------------------------

def test_labels_present_in_one_map_only_are_reported_missing(phantom_patient, tmp_path):
    fixed = _data_of(phantom_patient["fixed_labels"])
    affine = _affine_of(phantom_patient["fixed_labels"])
    warped = np.where(fixed == 6, 0, fixed)  # the target lost by the "registration"
    warped[:2, :2, :2] = 9  # and a label the fixed map does not have
    warped_path = io.save_image(tmp_path / "warped_labels.nii.gz", warped.astype(np.uint8), affine)
    names = tmp_path / "names.tsv"
    names.write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in {**LABELS, 9: "extra"}.items()))
    rows, summary = evaluate_files(warped_path, phantom_patient["fixed_labels"], tmp_path / "dice.csv",
                                   tmp_path / "dice.json", label_names=names)

    with open(tmp_path / "dice.csv", newline="") as handle:
        table = {row["name"]: row for row in csv.DictReader(handle)}
    assert "missing" in next(iter(table.values()))
    assert table["target"]["missing"] == "warped" and float(table["target"]["dice"]) == 0.0
    assert table["extra"]["missing"] == "fixed" and float(table["extra"]["dice"]) == 0.0
    assert table["spinal_cord"]["missing"] == "both" and table["spinal_cord"]["dice"] == "nan"
    assert all(table[name]["missing"] == "" for name in ("body", "right_lung", "left_lung", "heart"))
    assert sorted(summary["missing_labels"]) == [5, 6, 9]
    found = [float(table[name]["dice"]) for name in ("body", "right_lung", "left_lung", "heart")]
    assert summary["mean_dice"] == pytest.approx(np.mean(found))  # the missing ones do not drag it silently

    row = evaluation.study_row("p01", tmp_path / "dice.csv", tmp_path / "dice.json")
    assert row["missing_labels"] == ("spinal_cord: absent from both maps; target: absent from warped; "
                                     "extra: absent from fixed")


# --- one study, many bad patients --------------------------------------------------------------

STUDY_CASES = [case for case in CASES if case.study]


def _crash_texts(work_dir: Path) -> list[str]:
    return [path.read_text(errors="replace") for path in (work_dir / "crash").glob("crash-*.txt")]


def test_bad_patients_fail_alone_in_a_study_with_the_reason(phantom_patient, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_patient["manifest"].parent, data)
    names = ["patient", *FILE_KEYS]
    rows, expected = [names], {}
    for case in STUDY_CASES:
        folder = data / case.id
        folder.mkdir()
        copies = {key: Path(shutil.copy(data / "p01" / phantom_patient[key].name, folder / phantom_patient[key].name))
                  for key in FILE_KEYS}
        files, named = case.make(folder, copies)
        rows.append([case.id, *(os.path.relpath(files[key], data) for key in FILE_KEYS)])
        expected[case.id] = (case, named[0])
    rows.append(["p01", *(f"p01/{phantom_patient[key].name}" for key in FILE_KEYS)])
    manifest = _manifest(data / "manifest.tsv", rows)

    out, work = tmp_path / "out", tmp_path / "work"
    workflow = init_study_wf(manifest=manifest, out_dir=out, work_dir=work, label_names=data / "labels.tsv", **FEW)
    results = {row["patient"]: row for row in run_study(workflow)}

    with open(out / "study_dice.csv", newline="") as handle:
        table = {row["patient"]: row for row in csv.DictReader(handle)}
    assert list(table) == [case.id for case in STUDY_CASES] + ["p01"]
    # The good patient finished; its one-sided label (fixed map lacks spinal_cord) is flagged.
    assert table["p01"]["status"] == "ok" and float(table["p01"]["mean_dice"]) > 0.3
    assert table["p01"]["missing_labels"] == "spinal_cord: absent from fixed"
    assert (out / "p01" / "displacement.nii.gz").is_file() and (out / "p01" / "dice.csv").is_file()

    crashes = _crash_texts(work)
    finished = list((work / "inrlddmm_study").rglob("*"))
    for patient, (case, bad) in expected.items():
        row = table[patient]
        assert row["status"] == "failed" and results[patient]["status"] == "failed", patient
        assert row["error"].startswith(f"{case.node}:"), (patient, row["error"])
        assert str(bad) in row["error"] and re.search(case.problem, row["error"]), (patient, row)
        assert any(str(bad) in text and "InputError" in text for text in crashes), f"no crash file for {patient}"
        assert not (out / patient).exists(), f"{patient}: out_dir holds {sorted((out / patient).rglob('*'))}"
        # Nothing trained for it: no model, field or log anywhere in its nodes' folders.
        produced = [p for p in finished if f"_patient_{patient}" in str(p)
                    and p.name.endswith((".pt", "_log.csv", "displacement.nii.gz"))]
        assert not produced, produced


# --- faults: a kill during a write --------------------------------------------------------------

_KILLED_DURING_WRITE = textwrap.dedent(
    """
    import gzip, os, sys, time
    from pathlib import Path
    from nipype_inrlddmm import engine, pipeline
    import torch

    moving, fixed, out, marker = sys.argv[1:5]
    original = gzip.GzipFile.write
    writes = []

    def write(self, data):
        written = original(self, data)
        name = getattr(self.fileobj, "name", "")
        if "coarse_displacement" in str(name):
            writes.append(len(memoryview(data).cast("B")))
            if len(writes) == 4:  # the header and the first chunk of voxels are out: block mid-file
                self.flush()
                Path(marker).write_text(str(name))
                time.sleep(600)
        return written

    gzip.GzipFile.write = write
    torch.set_num_threads(2)
    pipeline.run_coarse(moving, fixed, out, engine.config_from_options(coarse_iterations=2, n_patches=4, patch_size=8))
    """
)


def test_a_stage_killed_while_writing_leaves_no_partial_result_and_a_rerun_writes_it(phantom_patient, tmp_path):
    out, marker, stderr = tmp_path / "out", tmp_path / "blocked", tmp_path / "stderr.txt"
    with open(stderr, "w") as errors:
        process = subprocess.Popen([sys.executable, "-c", _KILLED_DURING_WRITE, str(phantom_patient["moving"]),
                                    str(phantom_patient["fixed"]), str(out), str(marker)], stdout=subprocess.DEVNULL,
                                   stderr=errors)
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            assert process.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.05)
        partial = Path(marker.read_text())
        assert partial.parent == out and partial.stat().st_size > 0  # a half-written file exists...
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL

    result = out / pipeline.COARSE_OUTPUTS["displacement"]
    assert not result.exists()  # ...but never where the result belongs
    with pytest.raises(Exception):
        np.asarray(nib.load(partial).dataobj)  # (it really is incomplete)
    assert not (out / pipeline.COARSE_OUTPUTS["log"]).exists()
    kept = io.load_checkpoint(out / pipeline.COARSE_OUTPUTS["model"], shape=PHANTOM_SHAPE,
                              affine=_affine_of(phantom_patient["fixed"]))
    assert kept is not None  # what was finished before the kill is whole

    outputs = pipeline.run_coarse(phantom_patient["moving"], phantom_patient["fixed"], out,
                                  engine.config_from_options(coarse_iterations=2, n_patches=4, patch_size=8))
    field, _ = io.load_displacement(outputs["displacement"])
    assert outputs["displacement"] == result and field.shape == (16, 14, 8, 3) and np.isfinite(field).all()


# --- fuzzing the load-and-validate path ---------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "float32", "float64", "complex64")
_AFFINES = ("identity", "oblique", "anisotropic", "singular", "nan", "inf", "huge", "tiny_voxels")


def _fuzz_affine(kind: str, rng) -> np.ndarray:
    affine = np.eye(4)
    if kind == "oblique":
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        affine[:3, :3] = q * rng.uniform(0.5, 3, 3)
    elif kind == "anisotropic":
        affine[:3, :3] = np.diag(rng.uniform(0.1, 5, 3))
    elif kind == "singular":
        affine[:3, rng.integers(3)] = 0
    elif kind in ("nan", "inf"):
        affine[rng.integers(3), rng.integers(4)] = np.nan if kind == "nan" else -np.inf
    elif kind == "huge":
        affine[:3, 3] = 1e30
    elif kind == "tiny_voxels":
        affine[:3, :3] *= 1e-3
    affine[:3, 3] += rng.normal(0, 50, 3) if np.isfinite(affine).all() and kind != "huge" else 0
    return affine


def _fuzz_values(kind: str, shape, dtype: np.dtype, rng) -> np.ndarray:
    if kind == "constant":
        values = np.full(shape, rng.uniform(-5, 5))
    elif kind == "labels":
        values = rng.integers(0, 5, size=shape).astype(float)
    elif kind == "huge":
        values = rng.normal(size=shape) * 1e300
    elif kind == "big_ints":
        values = rng.integers(-(2**40), 2**40, size=shape).astype(float)
    else:
        values = rng.normal(size=shape) * 1000
    if kind in ("nan", "inf") and values.size:
        values.flat[rng.integers(values.size)] = np.nan if kind == "nan" else np.inf
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = max(info.min, -(2**53)), min(info.max, 2**53)  # exact in float64
        values = np.clip(np.nan_to_num(values, nan=0.0, posinf=high, neginf=low), low, high)
        return np.round(values).astype(dtype)
    with np.errstate(over="ignore"):
        return values.astype(dtype)


def _raw_nifti(path: Path, data: np.ndarray, affine: np.ndarray, slope) -> Path:
    """Write a NIfTI byte by byte: any shape, voxel type, sform (NaN too) and scaling slope."""
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header.set_qform(None, code=0)
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[:3]
    header["sform_code"] = 1
    header["scl_slope"], header["scl_inter"] = (np.nan, np.nan) if slope is None else (slope, 0.0)
    header["vox_offset"] = 352
    with nib.openers.Opener(str(path), "wb") as handle:
        handle.write(header.binaryblock)
        handle.write(b"\0" * 4)  # no extensions
        handle.write(data.tobytes(order="F"))
    return path


@st.composite
def _shapes(draw) -> tuple[int, ...]:
    """Mostly 3-D shapes (so that many files are valid), some with a trailing singleton, some anything."""
    kind = draw(st.sampled_from(("3d", "3d", "3d", "trailing_1", "any", "any")))
    if kind == "any":  # 1 to 4 axes, empty axes included
        return tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=4)))
    shape = tuple(draw(st.lists(st.integers(2, 6), min_size=3, max_size=3)))
    return shape + (1,) if kind == "trailing_1" else shape


@hypothesis.settings(max_examples=300, deadline=None, database=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(
    shape=_shapes(),
    dtype=st.sampled_from(_DTYPES),
    values=st.sampled_from(("normal", "normal", "labels", "labels", "constant", "nan", "inf", "huge", "big_ints")),
    affine=st.sampled_from(_AFFINES[:3] * 3 + _AFFINES[3:]),
    slope=st.sampled_from((None, None, None, 1.0, 2.5, 0.0, float("nan"), 1e30)),
    corruption=st.sampled_from((None, None, None, None, "truncate", "uncompressed")),
    seed=st.integers(0, 2**16),
)
# A 4-D file of any values is a stack of structures to the label loader: always tried.
@hypothesis.example(shape=(2, 2, 2, 2), dtype="uint8", values="normal", affine="identity", slope=None, corruption=None,
                    seed=0)
def test_fuzzed_files_load_validly_or_fail_with_an_input_error(shape, dtype, values, affine, slope, corruption,
                                                               seed):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    data = _fuzz_values(values, tuple(shape), dtype, rng)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("fuzz.nii" if corruption == "uncompressed" else "fuzz.nii.gz")
        _raw_nifti(path, data, _fuzz_affine(affine, rng), slope)
        if corruption == "truncate":
            path.write_bytes(path.read_bytes()[: rng.integers(0, path.stat().st_size)])
        try:  # what nibabel itself reads, when it can: the reference a successful load must match
            stored = np.asarray(nib.load(path).dataobj)
        except Exception:
            stored = None

        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # overflow or invalid casts: a silent change
            warnings.simplefilter("error", getattr(np, "exceptions", np).ComplexWarning)
            for load in (io.load_volume, io.load_image, io.load_labels):
                try:
                    loaded, loaded_affine = load(path)
                except io.InputError as error:
                    assert error.path == str(path)
                    hypothesis.event(f"{load.__name__}: InputError", re.sub(r"\(.*|\d[\d.e+-]*", "#", error.problem))
                    continue
                hypothesis.event(f"{load.__name__}: loaded")
                assert stored is not None
                assert loaded.ndim == 3 and min(loaded.shape) >= 2 and np.isfinite(loaded).all()
                assert loaded_affine.shape == (4, 4) and np.isfinite(loaded_affine).all()
                assert abs(np.linalg.det(loaded_affine[:3, :3])) > 0
                reference = stored.reshape(loaded.shape) if stored.size == loaded.size else None
                if load is io.load_labels and reference is None:  # 4-D: volume k is structure k + 1
                    assert stored.ndim == 4 and loaded.shape == stored.shape[:3]
                    reference = np.zeros(loaded.shape)
                    for k in range(stored.shape[3]):
                        reference[stored[..., k] != 0] = k + 1
                if load is io.load_labels:  # exactly the stored ids
                    assert loaded.dtype == np.int32 and np.array_equal(loaded.astype(np.float64), reference)
                else:  # the stored values to float32 precision
                    assert loaded.dtype == np.float32
                    np.testing.assert_allclose(loaded, reference.astype(np.float64), rtol=1e-6, atol=0)
            try:
                pair = pipeline.load_pair(path, path, moving_labels=path, fixed_labels=path, fixed_mask=path)
            except io.InputError as error:
                assert error.path == str(path)
                hypothesis.event("load_pair: InputError")
            else:
                hypothesis.event("load_pair: loaded")
                assert pair.fixed.ndim == 3 and np.isfinite(pair.fixed).all() and pair.fixed_mask.any()
