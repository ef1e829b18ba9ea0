"""Faults a machine throws at a run: a full disk.

Each test holds the same promise: the run stops with a message naming the
cause (and, in a study, the patient), leaves no half-written result, and
the same command, rerun once the fault is gone, finishes, recomputing only
what the fault destroyed.  The full disk is a small tmpfs mounted for the
test (root only; elsewhere the tests skip saying why).
"""

import csv
import subprocess
from pathlib import Path

import nibabel as nib
import pytest
from conftest import finished_nodes, rerun_nodes

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
