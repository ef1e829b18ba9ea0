"""Shared fixtures: the real-data folder, small phantom patients and a registration of one, deterministic torch."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("NIPYPE_NO_ET", "1")

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The real sample sets: $INRLDDMM_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("INRLDDMM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def real_data():
    """Path of the sample sets; skips (with the reason) where they are absent."""
    folder = data_dir()
    if not folder.is_dir():
        pytest.skip(f"real sample data not found at {folder} (set INRLDDMM_DATA)")
    return folder


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


#: The grid of the small phantoms several files test on: a registration takes seconds on one core.
PHANTOM_SHAPE = (32, 28, 16)


@pytest.fixture(scope="session")
def phantom_patient(tmp_path_factory) -> dict[str, Path]:
    """A valid phantom patient, a valid checkpoint and coarse field on its grid, and label names.

    The fixed labels lack ``spinal_cord`` (label 5): a label present in one
    map only, which the evaluation must report as missing.  Read only: the
    tests that break or change a file write their copy into their own folder.
    """
    import nibabel as nib

    from nipype_inrlddmm import engine, io
    from nipype_inrlddmm.phantom import write_cohort

    root = tmp_path_factory.mktemp("phantom_patient")
    manifest = write_cohort(root, 1, shape=PHANTOM_SHAPE)
    folder = root / "p01"
    labels = nib.load(folder / "cbct_labels.nii.gz")
    data = np.asarray(labels.dataobj)
    assert (data == 5).any()
    io.save_image(folder / "cbct_labels.nii.gz", np.where(data == 5, 0, data).astype(np.uint8), labels.affine)
    affine = labels.affine
    affine_t = torch.tensor(affine, dtype=torch.float32)
    model = engine.sized_config(engine.config_from_options(), PHANTOM_SHAPE, affine_t).model
    velocity = engine.new_velocity_field(PHANTOM_SHAPE, affine_t, model, seed=0)
    coarse_shape = tuple(-(-n // 2) for n in PHANTOM_SHAPE)
    coarse_affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    coarse_affine[:3, 3] += affine[:3, :3] @ [0.5, 0.5, 0.5]
    return {
        "moving": folder / "ct.nii.gz", "fixed": folder / "cbct.nii.gz",
        "moving_labels": folder / "ct_labels.nii.gz", "fixed_labels": folder / "cbct_labels.nii.gz",
        "fixed_mask": folder / "cbct_fov.nii.gz",
        "model": io.save_checkpoint(root / "model.pt", velocity, shape=PHANTOM_SHAPE, affine=affine),
        "coarse_displacement": io.save_displacement(root / "coarse_displacement.nii.gz",
                                                    np.zeros((*coarse_shape, 3), np.float32), coarse_affine),
        "label_names": manifest.parent / "labels.tsv",
        "manifest": manifest,
    }


def tripwire(*args, **kwargs):
    raise AssertionError("an optimisation started on bad input")


@pytest.fixture
def no_optimisation(monkeypatch):
    """Make any optimisation (or the whole registration) fail loudly if it is reached."""
    from nipype_inrlddmm import engine, pipeline

    for name in ("coarse_stage", "distill_stage", "fine_stage", "register_volumes"):
        monkeypatch.setattr(engine, name, tripwire)
    monkeypatch.setattr(pipeline.stages, "checked_affine_register", tripwire)


#: Few, small iterations of :func:`registered`: enough for a non-trivial field, seconds on one core.
REGISTERED_OPTIONS = dict(coarse_iterations=15, distill_iterations=5, fine_iterations=5, n_patches=4, seed=0)


@pytest.fixture(scope="session")
def registered(tmp_path_factory):
    """A small phantom registration and its files: moving/fixed images and labels, model, field, warped."""
    from nipype_inrlddmm import io
    from nipype_inrlddmm.api import register
    from nipype_inrlddmm.phantom import make_pair

    root = tmp_path_factory.mktemp("registered")
    pair = make_pair(PHANTOM_SHAPE, seed=2)
    result = register((pair.ct, pair.affine), (pair.cbct, pair.affine), num_threads=2, **REGISTERED_OPTIONS)
    files = {
        "moving": io.save_image(root / "ct.nii.gz", pair.ct, pair.affine),
        "fixed": io.save_image(root / "cbct.nii.gz", pair.cbct, pair.affine),
        "moving_labels": io.save_image(root / "ct_labels.nii.gz", pair.ct_labels, pair.affine),
        "fixed_labels": io.save_image(root / "cbct_labels.nii.gz", pair.cbct_labels, pair.affine),
        "mask": io.save_image(root / "cbct_fov.nii.gz", pair.cbct_fov.astype(np.uint8), pair.affine),
        "model": io.save_checkpoint(root / "model.pt", result.model, shape=PHANTOM_SHAPE, affine=pair.affine),
        "displacement": io.save_displacement(root / "displacement.nii.gz", result.displacement, pair.affine),
        "warped": io.save_image(root / "warped.nii.gz", result.warped, pair.affine),
    }
    warped_labels = result.apply((pair.ct_labels, pair.affine), interpolation="label").astype(np.int32)
    files["warped_labels"] = io.save_image(root / "warped_labels.nii.gz", warped_labels, pair.affine)
    return root, pair, result, files


def voxel_epe(displacement, truth, affine, mask) -> float:
    """Mean end-point error in voxels (per-axis spacing) inside ``mask``."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return float(np.linalg.norm((displacement - truth) / spacing, axis=-1)[mask].mean())


def chromium() -> str:
    """Path of a Chromium binary; skips (with the reason) where there is none."""
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; `make test` installs it as "
                    "root through scripts/ensure-package.sh)")
    return found


#: Headless Chromium without a sandbox (root in CI), a GPU or background network traffic.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def render_in_chromium(page: Path, screenshot: Path | None = None) -> str:
    """The DOM of a local HTML page after it loaded (and its scripts ran), from headless Chromium.

    With ``screenshot``, a PNG of the page (1200x2000) is written there too.
    """
    import subprocess

    binary = chromium()
    url = Path(page).resolve().as_uri()
    dom = subprocess.run([binary, *CHROMIUM_FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    if screenshot is not None:
        shot = subprocess.run([binary, *CHROMIUM_FLAGS, "--hide-scrollbars", "--window-size=1200,2000",
                               f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and Path(screenshot).is_file(), shot.stderr[-2000:]
    return dom.stdout


def assert_report_renders(report: Path, patients: dict[str, str], *, figures: int) -> None:
    """Open a study report in headless Chromium: one table row per patient with its status, every image loaded.

    ``patients`` maps patient id -> expected row class ("ok" or "failed"); ``figures`` is the number of
    linked QC figures and animations expected (the embedded box plot comes on top).  The screenshot must
    not be blank: some variance, and more than a few non-white pixels.
    """
    import re

    from PIL import Image

    screenshot = Path(report).with_name("report-screenshot.png")
    dom = render_in_chromium(report, screenshot)
    rows = {patient: status for status, patient in re.findall(r'<tr class="(ok|failed)" data-patient="([^"]+)"', dom)}
    assert rows == patients, rows
    images = re.findall(r"<img [^>]*>", dom)
    widths = [re.search(r'data-loaded-width="(\d+)"', image) for image in images]
    assert all(widths), f"the load script did not run: {images}"
    assert [int(w.group(1)) > 0 for w in widths] == [True] * len(images), images  # every image loaded
    assert len([image for image in images if 'class="qc' in image]) == figures
    assert 'id="dice-boxplot"' in dom
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.var() > 0 and (pixels < 250).mean() > 0.02, "the screenshot is blank"


def finished_nodes(work_dir, name="inrlddmm_study") -> dict[str, int]:
    """Node folder (e.g. ``registration/_patient_p01/coarse``) -> mtime of its result file, finished nodes only.

    Read from Nipype's own records, never from timing: a node counts as finished once Nipype has replaced
    its ``_0x<hash>_unfinished.json`` by ``_0x<hash>.json``.
    """
    root = Path(work_dir) / name
    nodes = {}
    for result in root.glob("**/result_*.pklz"):
        if any(not h.name.endswith("_unfinished.json") for h in result.parent.glob("_0x*.json")):
            nodes[str(result.parent.relative_to(root))] = result.stat().st_mtime_ns
    return nodes


def rerun_nodes(before: dict, after: dict) -> set[str]:
    """Nodes that executed between two :func:`finished_nodes` snapshots, data sinks aside (Nipype runs them
    every time, and they copy only what changed: not a recomputation)."""
    return {node for node, mtime in after.items() if before.get(node) != mtime and not node.endswith("_sink")}


SLURM_SCRIPT = REPO / "scripts" / "local-slurm.sh"
#: Fast polling for a 2-patient study on an idle local cluster (the package's defaults suit real ones).
SLURM_FAST = {"poll_sleep_duration": 0.2, "job_finished_timeout": 2.0}


def local_cluster() -> str:
    """SLURM_CONF of the running local cluster; skips (with the reason) when there is none."""
    import subprocess

    try:
        status = subprocess.run(["bash", str(SLURM_SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"local SLURM cluster: `{SLURM_SCRIPT} status` failed: {error}")
    if status.returncode != 0:
        pytest.skip(f"local SLURM cluster not running: {(status.stdout + status.stderr).strip()} "
                    f"(`make test` starts it; by hand, as root: scripts/local-slurm.sh start)")
    return next(line.split("=", 1)[1] for line in status.stdout.splitlines() if line.startswith("export SLURM_CONF="))


@pytest.fixture(scope="module")
def slurm():
    """The local cluster's SLURM_CONF in the environment, LOGNAME unset (as under some CI), fast polling."""
    from nipype_inrlddmm.workflows import PLUGIN_DEFAULTS

    conf = local_cluster()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", conf)
        patch.delenv("LOGNAME", raising=False)  # Nipype's SLURM plugin needs it: the package sets it
        patch.setitem(PLUGIN_DEFAULTS, "SLURM", {**PLUGIN_DEFAULTS["SLURM"], **SLURM_FAST})
        yield conf


def study_wf(manifest, root, **options):
    """The study workflow of a cohort's manifest (its ``labels.tsv`` beside it): ``root/out``, ``root/work``."""
    from nipype_inrlddmm.workflows import init_study_wf

    return init_study_wf(manifest=manifest, out_dir=Path(root) / "out", work_dir=Path(root) / "work",
                         label_names=Path(manifest).parent / "labels.tsv", **options)


def study_table(out_dir) -> list[dict]:
    """The rows of ``out_dir/study_dice.csv``."""
    import csv

    with open(Path(out_dir) / "study_dice.csv", newline="") as handle:
        return list(csv.DictReader(handle))


_STUDY_DRIVER = f"""\
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import study_wf
from nipype_inrlddmm.workflows import run_study
manifest, root, options, plugin, plugin_args = sys.argv[1:]
rows = run_study(study_wf(manifest, root, **json.loads(options)), plugin=plugin, plugin_args=json.loads(plugin_args))
print('ROWS=' + json.dumps({{row['patient']: row['status'] for row in rows}}), flush=True)
"""


def start_study(manifest, root, options: dict, *, plugin: str, plugin_args: dict):
    """A study in its own process (to be disturbed while it runs): ``root/out``, ``root/work``."""
    import json
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _STUDY_DRIVER, str(manifest), str(root), json.dumps(options),
                             plugin, json.dumps(plugin_args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def study_outcome(process, timeout: float) -> tuple[dict[str, str], str]:
    """``({patient: status}, log)`` of a :func:`start_study` process once it ends (its stdout, where Nipype
    logs, and stderr); fails if it died."""
    import json

    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    assert "ROWS=" in stdout, f"the study died: {(stdout + stderr)[-3000:]}"
    return json.loads(next(line[5:] for line in stdout.splitlines() if line.startswith("ROWS="))), stdout + stderr
