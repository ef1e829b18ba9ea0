"""Landmark TRE: LPS landmark files, the A (p + d(p)) point map, and clear errors on bad files."""

import json

import numpy as np
import pytest

from nipype_inrlddmm import io
from nipype_inrlddmm.evaluation import metrics
from nipype_inrlddmm.evaluation import evaluate_landmarks


def _write_points(path, lps_points):
    path.write_text("x,y,z\n" + "".join(f"{x},{y},{z}\n" for x, y, z in lps_points))
    return path


def test_landmarks_are_read_as_ras(tmp_path):
    points = io.load_landmarks(_write_points(tmp_path / "p.csv", [(1.0, 2.0, 3.0)]))
    np.testing.assert_allclose(points, [[-1.0, -2.0, 3.0]])


def test_tre_composes_the_affine_after_the_displacement(tmp_path):
    # An oblique 2 mm grid, a smooth displacement and a rotation + shift: moving = A (p + d(p)) exactly.
    rng = np.random.default_rng(0)
    grid_affine = np.array([[2.0, 0.1, 0, -20], [0, 2.0, 0, -18], [0, 0, 2.5, -15], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in (20, 18, 12)), indexing="ij"), -1).astype(float)
    world = ijk @ grid_affine[:3, :3].T + grid_affine[:3, 3]
    field = np.stack([0.05 * world[..., 1], -0.03 * world[..., 0], np.full(world.shape[:3], 1.5)], -1)
    angle = np.deg2rad(7)
    pre = np.eye(4)
    pre[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    pre[:3, 3] = [4.0, -3.0, 2.0]
    fixed = world.reshape(-1, 3)[rng.choice(world[..., 0].size, 10, replace=False)]
    moved = fixed + np.stack([0.05 * fixed[:, 1], -0.03 * fixed[:, 0], np.full(10, 1.5)], -1)  # linear: exact
    moving = (pre @ np.c_[moved, np.ones(10)].T)[:3].T
    lps = np.array([-1.0, -1.0, 1.0])
    fixed_csv, moving_csv = _write_points(tmp_path / "f.csv", fixed * lps), _write_points(tmp_path / "m.csv",
                                                                                          moving * lps)
    displacement = io.save_displacement(tmp_path / "d.nii.gz", field.astype(np.float32), grid_affine)
    transform = io.save_itk_affine(tmp_path / "a.txt", pre)
    _, summary = evaluate_landmarks(fixed_csv, moving_csv, displacement, tmp_path / "t.csv", tmp_path / "t.json",
                                    affine_transform=transform)
    assert summary["tre_max_mm"] < 1e-3
    assert json.loads((tmp_path / "t.json").read_text())["landmarks"] == 10
    # Without the affine the error is the affine's own displacement of the points: far from zero.
    errors = metrics.landmark_errors(fixed, moving, field, grid_affine)
    assert errors.min() > 1.0


@pytest.mark.parametrize("text, problem", [
    ("a,b,c\n1,2,3\n", "columns x, y, z"),
    ("x,y,z\n", "at least one landmark"),
    ("x,y,z\n1,nan,3\n", "NaN"),
    ("x,y,z\n1,two,3\n", "not a number"),
])
def test_bad_landmark_files_are_named(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(io.InputError, match=problem) as error:
        io.load_landmarks(path)
    assert str(path) in str(error.value)


def test_unpaired_landmark_sets_are_refused(tmp_path):
    field = io.save_displacement(tmp_path / "d.nii.gz", np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    fixed = _write_points(tmp_path / "f.csv", [(0, 0, 0), (1, 1, 1)])
    moving = _write_points(tmp_path / "m.csv", [(0, 0, 0)])
    with pytest.raises(io.InputError, match="pair row by row"):
        evaluate_landmarks(fixed, moving, field, tmp_path / "t.csv", tmp_path / "t.json")
