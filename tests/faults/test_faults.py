"""The faults a machine or a cluster throws at a study, one test each.

The rows: an output or work folder that cannot be written, a full disk, the
study killed, a node's cached result cut short, a second study on the same
work folder, one patient's registration failing, a MultiProc worker killed
(as the out-of-memory killer does), and on SLURM a restarting controller, a
killed node daemon and a job killed for memory.  A stage's divergence is
caught inside the engine (tests/engine/test_divergence.py) and fails its patient
like any other failing stage; bad input files have their own table
(tests/io/test_bad_inputs.py).

Each test holds the same promise: the run either finishes with every
patient correct, or stops with a message naming the cause (and, in a study,
the patient), leaves no half-written result, and the same command, rerun
once the fault is gone, finishes, recomputing only what the fault
destroyed.  The full disk is a small tmpfs mounted for the test, the SLURM
faults hit the local cluster of ``scripts/local-slurm.sh`` (root only;
elsewhere those tests skip saying why).  Which nodes ran is read from
Nipype's own records, never from timing.
"""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest
from conftest import (SLURM_FAST, SLURM_SCRIPT, finished_nodes, rerun_nodes, start_study, study_outcome, study_table,
                      study_wf)

from nipype_inrlddmm import cli, io
from nipype_inrlddmm.phantom import write_cohort
from nipype_inrlddmm.workflows import run_study, slurm_job_end, work_folder_lock

SHAPE = (48, 40, 20)
FEW = dict(coarse_iterations=5, distill_iterations=3, fine_iterations=5)
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


@pytest.fixture(scope="module")
def pair_cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("pair_cohort"), 2, shape=(32, 28, 16))




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


def test_an_output_folder_that_cannot_be_written_is_named_before_any_work(cohort, tmp_path, capsys):
    """A file where a folder should be stands in for any unwritable place (the tests run as root, whom
    permissions do not stop)."""
    patient = cohort.parent / "p01"
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    pair = ["--moving", str(patient / "ct.nii.gz"), "--fixed", str(patient / "cbct.nii.gz")]
    assert cli.main(["register", *pair, "--out-dir", str(blocker / "out"), *FEW_FLAGS]) == 2
    assert f"{blocker / 'out'}: cannot write the outputs here" in capsys.readouterr().err
    assert cli.main(["register", *pair, "--out-dir", str(blocker), *FEW_FLAGS]) == 2
    assert f"{blocker}: the output folder is a file" in capsys.readouterr().err
    for flag, problem in (("--work-dir", "cannot write the work folder here"),
                          ("--out-dir", "cannot write the results here")):
        folders = {"--out-dir": str(tmp_path / "results"), "--work-dir": str(tmp_path / "work"),
                   flag: str(blocker / "sub")}
        assert cli.main(["study", str(cohort), *(x for item in folders.items() for x in item), *FEW_FLAGS]) == 2
        assert f"{blocker / 'sub'}: {problem}" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not finished_nodes(tmp_path / "work")  # nothing ran

    blocker.unlink()  # the place made writable: the same commands finish
    assert cli.main(["register", *pair, "--out-dir", str(blocker), *FEW_FLAGS]) == 0
    assert (blocker / "displacement.nii.gz").is_file()
    study = ["study", str(cohort), "--out-dir", str(tmp_path / "results"), "--work-dir", str(blocker / "sub")]
    assert cli.main([*study, *FEW_FLAGS]) == 0
    assert [row["status"] for row in study_table(tmp_path / "results")] == ["ok"] * 3


def test_a_killed_study_resumes_without_recomputing_finished_stages(cohort, tmp_path):
    command = [sys.executable, "-m", "nipype_inrlddmm.cli", "study", str(cohort), "--out-dir", str(tmp_path / "out"),
               "--work-dir", str(tmp_path / "work"), *FEW_FLAGS]
    first_coarse = "registration/_patient_p01/coarse"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        while first_coarse not in finished_nodes(tmp_path / "work"):
            assert process.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline, "the first coarse stage never finished"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = finished_nodes(tmp_path / "work")
    assert not (tmp_path / "out" / "study_dice.csv").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [row["status"] for row in study_table(tmp_path / "out")] == ["ok"] * 3
    after = finished_nodes(tmp_path / "work")
    recomputed = {node for node in rerun_nodes(finished, after) if node in finished}
    assert not recomputed, recomputed
    assert first_coarse in finished and after[first_coarse] == finished[first_coarse]


def test_a_failed_patient_is_marked_and_the_others_finish(cohort, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cohort.parent, data)
    (data / "p02" / "cbct.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI")
    rows = run_study(study_wf(data / "manifest.tsv", tmp_path, **FEW))

    assert [row["status"] for row in rows] == ["ok", "failed", "ok"]
    assert "coarse:" in rows[1]["error"] and "p02/cbct.nii.gz: cannot read the image" in rows[1]["error"]
    table = study_table(tmp_path / "out")
    assert [(row["patient"], row["status"]) for row in table] == [("p01", "ok"), ("p02", "failed"), ("p03", "ok")]
    assert table[1]["error"] == rows[1]["error"] and float(table[0]["mean_dice"]) > 0
    assert '<tr class="failed" data-patient="p02">' in (tmp_path / "out" / "report.html").read_text()
    assert list((tmp_path / "work" / "crash").glob("crash-*coarse*.txt"))
    assert (tmp_path / "out" / "p03" / "dice.csv").is_file() and not (tmp_path / "out" / "p02").exists()

    # Repaired, the rerun registers only the failed patient.
    shutil.copy(cohort.parent / "p02" / "cbct.nii.gz", data / "p02" / "cbct.nii.gz")
    before = finished_nodes(tmp_path / "work")
    rows = run_study(study_wf(data / "manifest.tsv", tmp_path, **FEW))
    assert [row["status"] for row in rows] == ["ok"] * 3
    rerun = rerun_nodes(before, finished_nodes(tmp_path / "work"))
    assert {node for node in rerun if "_patient_" in node} == {
        f"registration/_patient_p02/{stage}" for stage in ("coarse", "distill", "fine", "warp_labels", "dice", "qc")
    }


def test_a_second_study_on_the_same_work_folder_refuses_naming_the_first(cohort, tmp_path):
    with work_folder_lock(tmp_path / "work"):  # as a first study would hold it
        with pytest.raises(io.InputError, match=r"the work folder is in use by another study \(pid \d+ on .*"
                                                r"wait for it to end, or give another --work-dir"):
            run_study(study_wf(cohort, tmp_path, **FEW))
    assert not (tmp_path / "out").exists()  # nothing ran
    with work_folder_lock(tmp_path / "work"):  # released: free again
        pass


def test_a_cut_short_cached_result_is_recomputed_not_failed_on(cohort, tmp_path, caplog):
    """A crash or a full disk truncated one node's result file: the rerun recomputes that node and what
    follows it for that patient, and nothing of the other patients."""
    root = tmp_path
    run_study(study_wf(cohort, root, **FEW))
    nodes = finished_nodes(root / "work")
    result = root / "work" / "inrlddmm_study" / "registration" / "_patient_p02" / "coarse" / "result_coarse.pklz"
    result.write_bytes(result.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="nipype.workflow"):
        rows = run_study(study_wf(cohort, root, **FEW))
    assert [row["status"] for row in rows] == ["ok"] * 3
    assert "_patient_p02/coarse: its cached result could not be read" in caplog.text
    rerun = rerun_nodes(nodes, finished_nodes(root / "work"))
    assert "registration/_patient_p02/coarse" in rerun, rerun
    assert all("_patient_p02" in node or node == "gather_dice" for node in rerun), rerun  # and the study table


def test_a_diverging_stage_is_retried_then_fails_its_patient_naming_it_and_the_rerun_finishes(pair_cohort,
                                                                                              tmp_path):
    """1500 coarse iterations at the default step diverge on this tiny grid with the Jacobian penalty of
    weight 4 over the whole grid (the loss leaps about tenfold after some 600; at the defaults, weight 3
    and a heavier one outside the mask, it does not diverge): each patient's stage goes back once to its last
    good weights with a tenth of the step, diverges again, and fails its patient naming the stage; with
    fewer iterations the rerun finishes."""
    diverging = {"coarse_iterations": 1500, "jacobian_weight": 4.0, "outside_jacobian_weight": None}
    rows = run_study(study_wf(pair_cohort, tmp_path, **{**FEW, **diverging}))
    assert [row["status"] for row in rows] == ["failed", "failed"], rows
    assert all(re.fullmatch(r"coarse: \S*DivergenceError: the coarse stage diverged at iteration \d+ \(loss \S+\), "
                            r"again after restarting at iteration \d+ from its last good weights with a tenth of "
                            r"the step", row["error"]) for row in rows), rows
    _readable_volumes(tmp_path / "out")
    assert [row["status"] for row in run_study(study_wf(pair_cohort, tmp_path, **FEW))] == ["ok", "ok"]


def _pool_workers(study_pid: int) -> set[int]:
    """The MultiProc workers of a study process: the children of its forkserver."""

    def children(pid: int) -> list[int]:
        try:
            return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    servers = [child for child in children(study_pid)
               if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes()]
    return {worker for server in servers for worker in children(server)}


def _kill_a_worker_running(process, root: Path, node: str, spared: set[int] = frozenset(),
                           timeout: float = 180) -> set[int]:
    """SIGKILL one pool worker (as the out-of-memory killer does) once ``node`` runs and a worker not in
    ``spared`` exists; returns the workers seen."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "the study ended before the fault"
        assert time.monotonic() < deadline, f"no worker ever ran {node}"
        running = list((root / "work" / "inrlddmm_study").glob(f"**/{node}/_0x*_unfinished.json"))
        workers = _pool_workers(process.pid) - set(spared)
        if running and workers:
            os.kill(min(workers), signal.SIGKILL)
            return workers | set(spared)
        time.sleep(0.1)


#: A coarse stage that runs long enough (about 15 s) to be killed mid-way; a tenth of the step, as so many
#: iterations at the default step diverge on this tiny grid.
LONG_COARSE = {**FEW, "coarse_iterations": 1000, "coarse_learning_rate": 2e-4}


def test_a_multiproc_worker_killed_once_costs_a_retry_and_the_study_finishes(pair_cohort, tmp_path):
    """The kernel's out-of-memory killer takes one worker: the broken pool is replaced, the nodes it held
    run again, and every patient finishes (Nipype alone would wait forever)."""
    process = start_study(pair_cohort, tmp_path, LONG_COARSE, plugin="MultiProc", plugin_args={"n_procs": 2})
    try:
        _kill_a_worker_running(process, tmp_path, "coarse")
    except BaseException:
        process.kill()
        raise
    rows, log = study_outcome(process, timeout=600)
    assert rows == {"p01": "ok", "p02": "ok"}, log[-3000:]
    assert "a worker process of the pool was killed (out of memory?); running it again" in log
    _readable_volumes(tmp_path / "out")


def test_a_multiproc_node_killed_twice_fails_naming_the_cause_and_the_rerun_finishes(pair_cohort, tmp_path):
    process = start_study(pair_cohort, tmp_path, LONG_COARSE, plugin="MultiProc", plugin_args={"n_procs": 2})
    try:
        first = _kill_a_worker_running(process, tmp_path, "coarse")
        _kill_a_worker_running(process, tmp_path, "coarse", spared=first)  # the retry's fresh pool
    except BaseException:
        process.kill()
        raise
    rows, log = study_outcome(process, timeout=600)
    assert "failed" in rows.values(), (rows, log[-3000:])
    with open(tmp_path / "out" / "study_dice.csv", newline="") as handle:
        errors = [row["error"] for row in csv.DictReader(handle) if row["status"] == "failed"]
    assert errors and all(error.startswith("coarse: its worker process was killed twice") and "memory" in error
                          for error in errors), errors
    _readable_volumes(tmp_path / "out")
    finished = finished_nodes(tmp_path / "work")

    rerun = start_study(pair_cohort, tmp_path, LONG_COARSE, plugin="MultiProc", plugin_args={"n_procs": 2})
    rows, log = study_outcome(rerun, timeout=600)
    assert rows == {"p01": "ok", "p02": "ok"}, log[-3000:]
    recomputed = {node for node in rerun_nodes(finished, finished_nodes(tmp_path / "work")) if node in finished}
    assert not recomputed, recomputed


# SLURM: the local cluster of scripts/local-slurm.sh

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
    from nipype_inrlddmm.workflows import execution

    def fake_squeue(name: str, message: str) -> None:
        """An ``squeue`` first on PATH that fails with ``message``, as the real one does."""
        (tmp_path / name).mkdir()
        script = tmp_path / name / "squeue"
        script.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path / name}{os.pathsep}{os.environ['PATH']}")

    fake_squeue("down", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
    plugin = execution.SLURMPlugin(plugin_args={})
    with caplog.at_level("WARNING", logger="nipype.workflow"):
        assert plugin._is_pending(42)
    assert "the SLURM controller does not answer" in caplog.text and "job 42" in caplog.text
    monkeypatch.setattr(execution, "CONTROLLER_PATIENCE", 0.0)
    time.sleep(0.01)
    with pytest.raises(RuntimeError, match="the SLURM controller has not answered for 0 s"):
        plugin._is_pending(42)
    fake_squeue("forgotten", "slurm_load_jobs error: Invalid job id specified")
    assert not plugin._is_pending(42)  # finished long ago: the result file decides
    fake_squeue("broken", "squeue: error: Invalid user for SlurmUser")
    with pytest.raises(RuntimeError, match="squeue -j 42 failed: squeue: error: Invalid user"):
        plugin._is_pending(42)


@pytest.mark.parametrize("log, says", [
    ("slurmstepd-vm: error: StepId=895.batch exceeded memory limit (243986432 > 157286400), being killed\n"
     "slurmstepd-vm: error: *** JOB 895 ON vm CANCELLED AT 2026-12-04T19:53:26 ***\n"
     "slurmstepd-vm: error: Exceeded job memory limit\n",
     "was killed for exceeding its memory limit (233 MB used, 150 MB allowed): rerun with more memory "
     "(--sbatch-args '--mem=...')"),
    ("slurmstepd: error: Detected 1 oom_kill event in StepId=895.batch. Some of the step tasks have been OOM "
     "Killed.\n", "was killed for exceeding its memory limit: rerun with more memory (--sbatch-args '--mem=...')"),
    ("slurmstepd-vm: error: *** JOB 895 ON vm CANCELLED AT 2026-12-04T19:53:26 DUE TO TIME LIMIT ***\n",
     "reached its time limit: rerun with a longer --time in --sbatch-args"),
    ("slurmstepd-vm: error: *** JOB 895 ON vm CANCELLED AT 2026-12-04T19:53:26 DUE TO NODE FAILURE ***\n",
     "ended with the failure of its node"),
    ("slurmstepd-vm: error: *** JOB 895 ON vm CANCELLED AT 2026-12-04T19:53:26 ***\n",
     "was cancelled (scancel, or an administrator)"),
    ("Traceback (most recent call last):\n", "ended without a result: cancelled, or out of time or memory? "
     "(its log: LOG)"),
])
def test_what_ended_a_slurm_job_is_read_from_its_log(tmp_path, log, says):
    (tmp_path / "slurm-895.out").write_text(log)
    assert slurm_job_end(895, tmp_path / "slurm-895.out") == "its SLURM job 895 " + says.replace(
        "LOG", str(tmp_path / "slurm-895.out"))
    assert slurm_job_end(895, tmp_path / "gone.out").endswith("cancelled, or out of time or memory? (its log: "
                                                              f"{tmp_path / 'gone.out'})")


def test_a_study_waits_for_a_restarting_slurm_controller(slurm, pair_cohort, tmp_path):
    """slurmctld stops while the coarse jobs run and comes back 25 s later: the study finishes, every
    patient ok.  The coarse stage runs long enough to outlast the outage (9000 iterations on a tiny grid,
    about 55 s; with a tenth of the step, as so many at the default step diverge there), so that its
    jobs are still running when squeue fails."""
    long_coarse = {**FEW, "coarse_iterations": 9000, "coarse_learning_rate": 2e-4}
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
    process = start_study(pair_cohort, tmp_path, FEW, plugin="SLURM", plugin_args=SLURM_FAST)
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

    rerun = start_study(pair_cohort, tmp_path, FEW, plugin="SLURM", plugin_args=SLURM_FAST)
    rows, log = study_outcome(rerun, timeout=600)
    assert rows == {"p01": "ok", "p02": "ok"}, log[-3000:]
    recomputed = {node for node in rerun_nodes(finished, finished_nodes(tmp_path / "work")) if node in finished}
    assert not recomputed, recomputed

def test_a_job_killed_for_memory_fails_its_patient_naming_the_limit_and_the_rerun_finishes(slurm, pair_cohort,
                                                                                           tmp_path):
    """Every job given 150 MB (torch alone takes more): the cluster kills them, and each patient's row says
    its stage was killed for exceeding the memory limit, with the figures; the rerun with the package's own
    --mem finishes, recomputing nothing that had finished."""
    starved = {**SLURM_FAST, "sbatch_args": "--mem=150M"}
    rows, log = study_outcome(start_study(pair_cohort, tmp_path, FEW, plugin="SLURM", plugin_args=starved),
                              timeout=600)
    assert rows == {"p01": "failed", "p02": "failed"}, log[-3000:]
    with open(tmp_path / "out" / "study_dice.csv", newline="") as handle:
        errors = [row["error"] for row in csv.DictReader(handle)]
    assert all(error.startswith("coarse: its SLURM job ") and "killed for exceeding its memory limit" in error
               and "MB allowed" in error and "--mem" in error for error in errors), errors
    assert not (tmp_path / "out" / "p01").exists()  # no result of a killed job
    finished = finished_nodes(tmp_path / "work")

    rows, log = study_outcome(start_study(pair_cohort, tmp_path, FEW, plugin="SLURM", plugin_args=SLURM_FAST),
                              timeout=600)
    assert rows == {"p01": "ok", "p02": "ok"}, log[-3000:]
    recomputed = {node for node in rerun_nodes(finished, finished_nodes(tmp_path / "work")) if node in finished}
    assert not recomputed, recomputed
    _readable_volumes(tmp_path / "out")
