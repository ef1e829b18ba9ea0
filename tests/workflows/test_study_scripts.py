"""The ready-to-copy study scripts in workflows/ build their workflows (they are not run here)."""

import importlib.util
import subprocess
import sys

import nibabel as nib
import numpy as np
from conftest import REPO


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "workflows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _registration_nodes(workflow):
    return set(workflow.get_node("registration").list_node_names())


def test_phantom_study_builds(tmp_path):
    workflow = _script("ct_cbct_phantom_study").build_workflow(tmp_path / "out", tmp_path / "work", patients=2,
                                                               shape=(24, 20, 12))
    assert workflow.get_node("patients").iterables == ("patient", ["p01", "p02"])
    assert {"coarse", "distill", "fine", "dice"} <= _registration_nodes(workflow)


def test_prostate_study_extracts_the_gland_into_its_work_dir(real_data, tmp_path):
    module = _script("prostate_mr_us_study")
    workflow = module.build_workflow(tmp_path / "out", tmp_path / "work", data=real_data / "prostate-mr-us")
    assert len(workflow.get_node("patients").iterables[1]) == 8
    assert "affine" in _registration_nodes(workflow)
    registration = workflow.get_node("registration")
    assert {registration.get_node(stage).inputs.similarity for stage in ("coarse", "fine")} == {"mind"}
    source = nib.load(real_data / "prostate-mr-us" / "mr_labels" / "case000000.nii.gz")
    gland = nib.load(tmp_path / "work" / "inputs" / "case000000_mr_gland.nii.gz")
    assert source.ndim == 4 and gland.shape == source.shape[:3]
    np.testing.assert_array_equal(np.asarray(gland.dataobj), np.asarray(source.dataobj)[..., 0] > 0.5)
    np.testing.assert_allclose(gland.affine, source.affine)


def test_brain_study_pre_aligns_with_an_affine_and_windows_the_velocity_to_the_head(real_data, tmp_path):
    workflow = _script("brain_atlas_study").build_workflow(tmp_path / "out", tmp_path / "work",
                                                           data=real_data / "brain")
    assert workflow.get_node("patients").iterables == ("patient", ["subject"])
    registration = workflow.get_node("registration")
    assert registration.get_node("affine").inputs.transform == "affine"
    assert registration.get_node("coarse").inputs.velocity_window_mm == (5.0, 25.0)
    head = nib.load(tmp_path / "work" / "inputs" / "mni152_head.nii.gz")
    template = nib.load(real_data / "brain" / "mni152_T1w.nii.gz")
    inside = np.asarray(head.dataobj) > 0
    np.testing.assert_allclose(head.affine, template.affine)
    assert 0.1 < inside.mean() < 0.5 and inside[tuple(n // 2 for n in inside.shape)]  # the head, not the air
    assert "mni152_head.nii.gz" in (tmp_path / "work" / "inputs" / "manifest.tsv").read_text()


def test_scripts_describe_themselves():
    for name in ("ct_cbct_phantom_study", "prostate_mr_us_study", "brain_atlas_study"):
        out = subprocess.run([sys.executable, str(REPO / "workflows" / f"{name}.py"), "--help"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "--work-dir" in out.stdout, out.stderr
