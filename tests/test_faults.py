"""Faults a machine or a cluster throws at a run: a full disk, a SLURM controller or node daemon that dies.

Each test holds the same promise: the run either finishes with every
patient correct, or stops with a message naming the cause (and, in a study,
the patient), leaves no half-written result, and the same command, rerun
once the fault is gone, finishes, recomputing only what the fault
destroyed.  The full disk is a small tmpfs mounted for the test, the SLURM
faults hit the local cluster of ``scripts/local-slurm.sh`` (root only;
elsewhere the tests skip saying why).
"""

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import pytest
from conftest import SLURM_FAST, SLURM_SCRIPT, finished_nodes, rerun_nodes, start_study, study_outcome

from nipype_inrlddmm import cli
from nipype_inrlddmm.phantom import write_cohort

SHAPE = (48, 40, 20)
FEW_FLAGS = ["--coarse-iterations", "5", "--distill-iterations", "3", "--fine-iterations", "5", "--quiet"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"), 3, shape=SHAPE)


class SmallDisk:
    """A tmpfs of a given size at ``path``: a file system that fills up, and can be given more room."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True, text=True)
        if mounted.returncode:
            pytest.skip(f"cannot mount a small tmpfs to fill up (root and CAP_SYS_ADMIN needed): "
                        f"{mounted.stderr.strip()}")

    def grow(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    disks = []

    def make(size: str) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size))
        return disks[-1]

    yield make
    for disk in disks:
        disk.unmount()


def _readable_volumes(folder: Path) -> None:
    """Every NIfTI under ``folder`` reads whole: nothing half-written where results belong."""
    for path in folder.rglob("*.nii.gz"):
        assert nib.load(str(path)).get_fdata().size, path


def test_register_on_a_full_disk_says_so_and_leaves_the_output_folder_as_it_was(cohort, small_disk, capsys):
    # 300 kB: less than the 48x40x20 field alone (460 kB, stored uncompressed), so the outputs cannot all fit.
    disk = small_disk("300k")
    patient = cohort.parent / "p01"
    command = ["register", "--moving", str(patient / "ct.nii.gz"), "--fixed", str(patient / "cbct.nii.gz"),
               "--moving-labels", str(patient / "ct_labels.nii.gz"), "--fixed-labels",
               str(patient / "cbct_labels.nii.gz"), "--out-dir", str(disk.path / "out"), *FEW_FLAGS]
    assert cli.main(command) == 1
    error = capsys.readouterr().err
    assert f"no space left on the device holding {disk.path / 'out'}" in error
    assert "free some space and run the same command again" in error and "Traceback" not in error
    assert list(disk.path.iterdir()) == []  # no output folder, no staging folder left behind

    disk.grow("20m")
    assert cli.main(command) == 0
    assert (disk.path / "out" / "dice.csv").is_file() and (disk.path / "out" / "qc.png").is_file()
    _readable_volumes(disk.path / "out")


def test_a_study_whose_work_disk_fills_stops_naming_the_patients_and_resumes(cohort, small_disk, tmp_path, capsys):
    # 3 MB holds the first patients' nodes (the whole study's cache takes about 4 MB at this size).
    disk = small_disk("3m")
    out, work = tmp_path / "out", disk.path / "work"
    command = ["study", str(cohort), "--out-dir", str(out), "--work-dir", str(work), *FEW_FLAGS]
    assert cli.main(command) == 1
    capsys.readouterr()
    with open(out / "study_dice.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["patient"] for row in rows] == ["p01", "p02", "p03"]
    failed = [row for row in rows if row["status"] == "failed"]
    assert any("No space left on device" in row["error"] for row in failed), failed
    # Every failure names its cause: the node and its error, or the failure that stopped the study.
    assert all(": " in row["error"] for row in failed), failed
    _readable_volumes(out)
    finished = finished_nodes(work)
    assert finished, "the fault came before any node finished: nothing to resume from"

    disk.grow("64m")
    assert cli.main(command) == 0
    with open(out / "study_dice.csv", newline="") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["ok"] * 3
    recomputed = {node for node in rerun_nodes(finished, finished_nodes(work)) if node in finished}
    assert not recomputed, recomputed  # what finished before the disk filled is reused
    _readable_volumes(out)


SLURM_FEW = dict(coarse_iterations=5, distill_iterations=3, fine_iterations=5)


@pytest.fixture(scope="module")
def pair_cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("pair_cohort"), 2, shape=(32, 28, 16))


def _daemon_pid(conf: str, name: str) -> int:
    """The pid of the local cluster's ``slurmctld`` or ``slurmd`` (its pid file beside the configuration)."""
    return int((Path(conf).parents[1] / "run" / f"{name}.pid").read_text())


def _wait_for_running_job(process, root: Path, stage: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "the study ended before the fault"
        assert time.monotonic() < deadline, f"no {stage} job ever ran"
        queue = subprocess.run(["squeue", "-h", "-o", "%j|%T|%o"], capture_output=True, text=True).stdout
        if any(str(root) in line and stage in line.split("|")[0] and "|RUNNING|" in line
               for line in queue.splitlines()):
            return
        time.sleep(0.1)


def _restart_cluster() -> None:
    started = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr


def test_a_job_is_taken_as_running_while_the_controller_does_not_answer(tmp_path, monkeypatch, caplog):
    from nipype_inrlddmm import workflows

    def fake_squeue(name: str, message: str) -> None:
        """An ``squeue`` first on PATH that fails with ``message``, as the real one does."""
        (tmp_path / name).mkdir()
        script = tmp_path / name / "squeue"
        script.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path / name}{os.pathsep}{os.environ['PATH']}")

    fake_squeue("down", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
    plugin = workflows.SLURMPlugin(plugin_args={})
    with caplog.at_level("WARNING", logger="nipype.workflow"):
        assert plugin._is_pending(42)
    assert "the SLURM controller does not answer" in caplog.text and "job 42" in caplog.text
    monkeypatch.setattr(workflows, "CONTROLLER_PATIENCE", 0.0)
    time.sleep(0.01)
    with pytest.raises(RuntimeError, match="the SLURM controller has not answered for 0 s"):
        plugin._is_pending(42)
    fake_squeue("forgotten", "slurm_load_jobs error: Invalid job id specified")
    assert not plugin._is_pending(42)  # finished long ago: the result file decides
    fake_squeue("broken", "squeue: error: Invalid user for SlurmUser")
    with pytest.raises(RuntimeError, match="squeue -j 42 failed: squeue: error: Invalid user"):
        plugin._is_pending(42)


def test_a_study_waits_for_a_restarting_slurm_controller(slurm, pair_cohort, tmp_path):
    """slurmctld stops while the coarse jobs run and comes back 25 s later: the study finishes, every
    patient ok.  The coarse stage runs long enough to outlast the outage (9000 iterations on a tiny grid,
    about 55 s; with a tenth of the step, as so many at the default step diverge there), so that its
    jobs are still running when squeue fails."""
    long_coarse = {**SLURM_FEW, "coarse_iterations": 9000, "coarse_learning_rate": 2e-4}
    process = start_study(pair_cohort, tmp_path, long_coarse, plugin="SLURM", plugin_args=SLURM_FAST)
    try:
        _wait_for_running_job(process, tmp_path, "coarse")
        os.kill(_daemon_pid(slurm, "slurmctld"), signal.SIGTERM)
        time.sleep(25)  # longer than squeue's own retries (about 18 s): it fails meanwhile
        _restart_cluster()
    except BaseException:
        process.kill()
        raise
    rows, log = study_outcome(process, timeout=600)
    assert rows == {"p01": "ok", "p02": "ok"}, log[-3000:]
    assert "the SLURM controller does not answer" in log  # the outage was seen, and waited out


def test_a_killed_slurmd_fails_at_most_its_job_and_the_rerun_finishes(slurm, pair_cohort, tmp_path):
    """slurmd is killed (SIGKILL) while a job runs and started again: the study either finishes, or the
    affected patient fails naming its node; the rerun finishes without recomputing what had finished."""
    process = start_study(pair_cohort, tmp_path, SLURM_FEW, plugin="SLURM", plugin_args=SLURM_FAST)
    try:
        _wait_for_running_job(process, tmp_path, "coarse")
        os.kill(_daemon_pid(slurm, "slurmd"), signal.SIGKILL)
        time.sleep(3)
        _restart_cluster()
    except BaseException:
        process.kill()
        raise
    rows, log = study_outcome(process, timeout=600)
    assert set(rows) == {"p01", "p02"} and "ok" in rows.values(), (rows, log[-3000:])
    finished = finished_nodes(tmp_path / "work")
    _readable_volumes(tmp_path / "out")
    if "failed" in rows.values():
        with open(tmp_path / "out" / "study_dice.csv", newline="") as handle:
            errors = [row["error"] for row in csv.DictReader(handle) if row["status"] == "failed"]
        assert errors and all(": " in error for error in errors), errors

    rerun = start_study(pair_cohort, tmp_path, SLURM_FEW, plugin="SLURM", plugin_args=SLURM_FAST)
    rows, log = study_outcome(rerun, timeout=600)
    assert rows == {"p01": "ok", "p02": "ok"}, log[-3000:]
    recomputed = {node for node in rerun_nodes(finished, finished_nodes(tmp_path / "work")) if node in finished}
    assert not recomputed, recomputed
