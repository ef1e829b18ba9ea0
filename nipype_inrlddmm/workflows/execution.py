"""Running a study: the plugins, SLURM's resources, what failed and why, the table and report.

:func:`run_study` runs a workflow of :func:`~.study.init_study_wf` and
writes the table and ``report.html`` even when some patients fail, each
failure named (:func:`slurm_job_end` reads why a SLURM job ended); the
work folder is held meanwhile (:func:`work_folder_lock`).  Nipype's
MultiProc and SLURM plugins are extended (:class:`MultiProcPlugin`,
:class:`SLURMPlugin`) so that a killed worker, a job killed for memory or
a restarting controller costs a patient at most, never the study.

On SLURM (:func:`run_study` with ``plugin="SLURM"`` or ``"SLURMGraph"``)
every node is a job whose ``sbatch`` arguments come from the node's own
declared resources (:func:`set_slurm_resources`: ``-c n_procs``, ``--mem``
from ``mem_gb``, a ``--time`` per stage), followed by the user's
``sbatch_args``; the job runs the Python that submitted it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import getpass
import math
import multiprocessing
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from nipype import Workflow, logging
from nipype.pipeline.plugins import MultiProcPlugin as _NipypeMultiProcPlugin
from nipype.pipeline.plugins import SLURMPlugin as _NipypeSLURMPlugin
from nipype.pipeline.plugins.multiproc import process_initializer, run_node
from nipype.utils.filemanip import loadpkl

from .. import evaluation, io
from ..reports import study as study_report
from ..worker_server import start_worker_server
from .study import branch_prefixes, study_parameters

LOGGER = logging.getLogger("nipype.workflow")

#: Plugin arguments added by :func:`run_study` unless given.  MultiProc's default ``fork`` start
#: method hangs once the parent has run torch; forkserver does not.  The SLURM plugin polls ``squeue``
#: once per queued job and poll, hence Nipype's 2 s there rather than :data:`EXECUTION`'s; at most
#: ``max_jobs`` jobs of a study are queued at once.  ``poll_sleep_duration`` and
#: ``job_finished_timeout`` (how long a finished job's result file may take to appear: raise it on
#: NFS) are moved into the workflow's execution config.  SLURMGraph submits only unfinished nodes.
PLUGIN_DEFAULTS = {
    "MultiProc": {"mp_context": "forkserver"},
    # sbatch is retried for a minute (Nipype's default: twice, 2 s apart), so a controller restart does not
    # fail the node being submitted.
    "SLURM": {"max_jobs": 100, "poll_sleep_duration": 2.0, "job_finished_timeout": 5.0, "max_tries": 30,
              "retry_timeout": 2.0},
    "SLURMGraph": {"dont_resubmit_completed_jobs": True},
}

#: Nipype plugins that run nodes as SLURM jobs.
SLURM_PLUGINS = ("SLURM", "SLURMGraph")
#: ``sbatch --time`` of each node's job by node name (any other node: ``"default"``).  Generous: the
#: optimisation stages run a fixed number of iterations on fixed-size patch batches, minutes on one
#: CPU thread for the defaults; the limit only has to stop a runaway job.  Users override it with
#: ``--time`` in their ``sbatch_args`` (the last ``--time`` wins).
SLURM_TIME = {"affine": "2:00:00", "coarse": "4:00:00", "distill": "2:00:00", "fine": "4:00:00",
              "default": "1:00:00"}
#: Smallest ``--mem`` of a job: its Python with torch and Nipype imported already holds ~0.3 GB.
SLURM_MIN_MEM_GB = 1.0
#: Marks ``node.plugin_args`` written by :func:`set_slurm_resources` (others are the user's).
_DERIVED = "inrlddmm_derived"

def slurm_sbatch_args(node, *, time_limit: str | None = None, extra: str | None = None) -> str:
    """``sbatch`` arguments of one node's job: its CPUs, memory and time, then ``extra``.

    ``-c`` is the node's ``n_procs`` (its interface's ``num_threads``), ``--mem`` its ``mem_gb``
    (at least :data:`SLURM_MIN_MEM_GB`), ``--time`` ``time_limit`` or :data:`SLURM_TIME`.

    >>> from nipype import Node
    >>> from nipype_inrlddmm.interfaces import FineINR
    >>> slurm_sbatch_args(Node(FineINR(num_threads=4), name="fine", mem_gb=2.5), extra="--partition=gpu")
    '-c 4 --mem=2560M --time=4:00:00 --partition=gpu'
    """
    cpus = max(1, int(node.n_procs or 1))
    mem_mb = math.ceil(max(float(node.mem_gb or 0), SLURM_MIN_MEM_GB) * 1024)
    time = time_limit or SLURM_TIME.get(node.name, SLURM_TIME["default"])
    return " ".join(part for part in (f"-c {cpus} --mem={mem_mb}M --time={time}", extra) if part)


def _all_nodes(workflow: Workflow) -> list:
    """Every node of a workflow and of the workflows nested in it, through Nipype's public names."""
    return [workflow.get_node(name) for name in workflow.list_node_names()]


def set_slurm_resources(workflow: Workflow, *, sbatch_args: str | None = None,
                        time_limit: str | None = None) -> Workflow:
    """Set ``node.plugin_args`` of every node (sub-workflows included) for Nipype's SLURM plugins.

    Each node gets ``{"sbatch_args": slurm_sbatch_args(node, ...), "overwrite": True}``: its own
    ``-c``/``--mem``/``--time`` followed by ``sbatch_args`` (e.g. ``"--partition=gpu
    --gres=gpu:1"``), replacing the plugin-wide ``sbatch_args``.  Nodes whose ``plugin_args``
    already hold ``sbatch_args`` set by someone else are left alone.  :func:`run_study` calls this.

    >>> from nipype_inrlddmm.workflows import init_registration_wf
    >>> wf = set_slurm_resources(init_registration_wf(num_threads=2), sbatch_args="--partition=cpu")
    >>> wf.get_node("coarse").plugin_args["sbatch_args"]
    '-c 2 --mem=1096M --time=4:00:00 --partition=cpu'
    """
    for node in _all_nodes(workflow):
        current = dict(node.plugin_args or {})
        if "sbatch_args" in current and not current.get(_DERIVED):
            continue
        current.update(sbatch_args=slurm_sbatch_args(node, time_limit=time_limit, extra=sbatch_args),
                       overwrite=True, **{_DERIVED: True})
        node.plugin_args = current
    return workflow


class MultiProcPlugin(_NipypeMultiProcPlugin):
    """Nipype's MultiProc; a worker process killed from outside (the kernel's out-of-memory killer, a
    SIGKILL) costs one retry of the nodes its pool held, not the study.

    Such a kill breaks the whole process pool: every node it held ends in BrokenProcessPool, which
    Nipype's callback lets escape, so those nodes never report and the study waits forever; and the
    pool refuses every later node.  Here the nodes of a broken pool go once more to a fresh pool, and
    a node whose pool breaks again fails, saying so.
    """

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self._nodes = {}  # taskid -> (node, updatehash), to submit again
        self._retried = set()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.processors, initializer=process_initializer,
                                   initargs=(self._cwd,),
                                   mp_context=multiprocessing.get_context(self.plugin_args.get("mp_context")))

    def _submit(self, node, updatehash, taskid) -> None:
        try:
            future = self.pool.submit(run_node, node, updatehash, taskid)
        except BrokenProcessPool:
            self.pool.shutdown(wait=False)
            self.pool = self._new_pool()
            future = self.pool.submit(run_node, node, updatehash, taskid)
        future.add_done_callback(self._async_callback)
        self._task_obj[taskid] = future
        self._nodes[taskid] = (node, updatehash)

    def _submit_job(self, node, updatehash=False):
        self._taskid += 1
        self._submit(node, updatehash, self._taskid)
        return self._taskid

    def _async_callback(self, args):
        if args.exception() is None:  # a failed future is taken up by _get_result, in the scheduler's thread
            super()._async_callback(args)

    def _get_result(self, taskid):
        future = self._task_obj.get(taskid)
        error = future.exception() if future is not None and future.done() else None
        if error is None:
            return super()._get_result(taskid)
        node, updatehash = self._nodes[taskid]
        if isinstance(error, BrokenProcessPool) and taskid not in self._retried:
            LOGGER.warning("%s: a worker process of the pool was killed (out of memory?); running it again",
                           node.fullname)
            self._retried.add(taskid)
            self._submit(node, updatehash, taskid)
            return None
        if isinstance(error, BrokenProcessPool):
            error = ("its worker process was killed twice while it ran (SIGKILL: the kernel's out-of-memory "
                     "killer?): give the study more memory, or fewer --n-procs")
        return {"result": None, "taskid": taskid, "traceback": [f"{error}\n"]}

    def _clear_task(self, taskid):
        super()._clear_task(taskid)
        self._nodes.pop(taskid, None)


#: Seconds the SLURM controller may stay unreachable (a restart, a fail-over) before a study gives up on it.
CONTROLLER_PATIENCE = 600.0
#: What ``squeue`` and ``sbatch`` say when they cannot reach the controller.
_UNREACHABLE = ("Unable to contact slurm controller", "Connection refused")


class SLURMPlugin(_NipypeSLURMPlugin):
    """Nipype's SLURM plugin; a job that ends without a result fails its node, not the whole run, and a
    controller that restarts is waited for.

    A job killed by ``scancel``, its time limit or the out-of-memory killer leaves no result file.
    Nipype 1.11 then builds the crash report by adding a list to a string and raises a TypeError
    that stops the run, other patients included; the traceback is passed as a list here.

    While ``slurmctld`` restarts, ``squeue`` fails, and Nipype took that for a finished job, which then
    failed for want of its result; yet the jobs run on, and the controller recovers them from its saved
    state.  Here a job is taken as still running while the controller does not answer, for up to
    :data:`CONTROLLER_PATIENCE` seconds, and then the study stops saying that the controller is gone.

    Where Nipype then reports only that the result file is missing, the failure names what ended the job,
    read from the job's own log (:func:`slurm_job_end`): the memory limit, the time limit, ``scancel``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._unreachable_since = None
        self._job_logs = {}

    def _submit_batchtask(self, scriptfile, node):
        taskid = super()._submit_batchtask(scriptfile, node)
        # Nipype's own -o, unless the user's --sbatch-args gave one (then the reason stays generic).
        self._job_logs[taskid] = Path(scriptfile).parent / f"slurm-{taskid}.out"
        return taskid

    def _get_result(self, taskid):
        log = self._job_logs.get(taskid)
        result = super()._get_result(taskid)
        if result is not None:
            self._job_logs.pop(taskid, None)
            if result["result"] is None and "results file does not exist" in str(result["traceback"]):
                result["traceback"] = slurm_job_end(taskid, log)
        return result

    def _report_crash(self, node, result=None):
        if result is not None and isinstance(result.get("traceback"), str):
            result = {**result, "traceback": result["traceback"].splitlines(keepends=True)}
        return super()._report_crash(node, result=result)

    def _is_pending(self, taskid):
        # Nipype's own check reads a failed squeue as "not in the queue": during a controller restart every
        # running job would look finished, and fail for want of its result.
        answer = subprocess.run(["squeue", "-h", "-j", str(taskid), "-o", "%i"], capture_output=True, text=True)
        message = " ".join((answer.stderr or answer.stdout).split())
        if answer.returncode == 0 or "Invalid job id" in message:  # the latter: finished and forgotten
            self._unreachable_since = None
            return answer.returncode == 0 and str(taskid) in answer.stdout.split()
        if not any(text in message for text in _UNREACHABLE):
            raise RuntimeError(f"squeue -j {taskid} failed: {message}")
        now = time.monotonic()
        self._unreachable_since = self._unreachable_since or now
        if now - self._unreachable_since > CONTROLLER_PATIENCE:
            raise RuntimeError(f"the SLURM controller has not answered for {CONTROLLER_PATIENCE:.0f} s ({message}); "
                               "its jobs may still run: rerun the study once it is back")
        LOGGER.warning("the SLURM controller does not answer (%s): job %s is taken as still running", message,
                       taskid)
        return True


#: What slurmstepd writes into a job's log when it ends a job, and how a study says it.
_JOB_ENDS = (
    (("exceeded memory limit", "Exceeded job memory limit", "oom-kill", "oom_kill"),
     "was killed for exceeding its memory limit{usage}: rerun with more memory (--sbatch-args '--mem=...')"),
    (("DUE TO TIME LIMIT",), "reached its time limit: rerun with a longer --time in --sbatch-args"),
    (("DUE TO NODE FAILURE",), "ended with the failure of its node"),
    (("CANCELLED",), "was cancelled (scancel, or an administrator)"),
)


def slurm_job_end(job: int, log: Path | None) -> str:
    """One line saying why SLURM job ``job`` ended without a result, read from its log file ``log``.

    slurmstepd writes the cause there (``exceeded memory limit (used > limit)``, ``CANCELLED ... DUE TO
    TIME LIMIT``, ...); where the log is missing or says nothing of it, the line says so and where to look.
    """
    try:
        text = Path(log).read_text(errors="replace") if log else ""
    except OSError:
        text = ""
    for markers, says in _JOB_ENDS:
        if any(marker in text for marker in markers):
            used = next((line for line in text.splitlines() if "exceeded memory limit (" in line), "")
            usage = ""
            if used:
                numbers = used.split("exceeded memory limit (", 1)[1].split(")", 1)[0].split(">")
                usage = " ({:.0f} MB used, {:.0f} MB allowed)".format(*(int(n) / 2**20 for n in numbers))
            return f"its SLURM job {job} " + says.format(usage=usage)
    where = f" (its log: {log})" if log else ""
    return f"its SLURM job {job} ended without a result: cancelled, or out of time or memory?{where}"


def _prepare_slurm(workflow: Workflow, arguments: dict) -> None:
    """LOGNAME, the job script's interpreter and PATH, per-node ``sbatch`` arguments.

    Nipype's SLURM plugin names jobs after ``$LOGNAME`` (a KeyError when unset, as under some CI
    and cron).  Jobs run ``sys.executable``; the template also puts its folder (the venv's ``bin``)
    first on the job's PATH, even where the cluster does not export the submitting environment.
    """
    if not os.environ.get("LOGNAME"):
        try:
            os.environ["LOGNAME"] = getpass.getuser()
        except Exception:  # no passwd entry (some containers)
            os.environ["LOGNAME"] = str(os.getuid())
    bin_dir = str(Path(sys.executable).parent)
    arguments.setdefault("template", "#!/bin/bash\n# inrlddmm: run by the Python that submitted it\n"
                         f"export PATH={shlex.quote(bin_dir)}:\"$PATH\"\n")
    set_slurm_resources(workflow, sbatch_args=arguments.pop("sbatch_args", None))
    # SLURMGraph's submit script ignores a refused sbatch, and the SLURM plugin would fail every node
    # one by one: check each distinct set of arguments once (an unknown partition, a --gres the
    # cluster lacks, a time over the partition's limit) before anything is submitted.
    for sbatch_args in sorted({node.plugin_args["sbatch_args"] for node in _all_nodes(workflow)}):
        check = subprocess.run(["sbatch", "--test-only", *shlex.split(sbatch_args), "--wrap", "true"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise io.InputError("--sbatch-args", f"sbatch refuses '{sbatch_args}': "
                                f"{(check.stderr or check.stdout).strip()}")


def study_slurm_jobs(workflow: Workflow, *, cancel_stuck: bool = False) -> list[dict]:
    """This study's SLURM jobs still in the queue: ``[{"job", "state", "reason"}, ...]``.

    A job belongs to the study when its batch script lies in the study's ``batch/`` folder (where
    Nipype writes them).  With ``cancel_stuck``, jobs that can never start (``PENDING`` with reason
    ``DependencyNeverSatisfied``: a SLURMGraph job whose upstream job failed) are cancelled and
    left out.
    """
    batch_dir = str(Path(workflow.base_dir) / workflow.name / "batch") + os.sep
    user = os.environ.get("LOGNAME") or getpass.getuser()
    listing = subprocess.run(["squeue", "-h", "-u", user, "-o", "%i|%T|%r|%o"], capture_output=True, text=True,
                             check=True).stdout
    jobs = []
    for line in listing.splitlines():
        job, state, reason, command = (line.split("|", 3) + ["", "", ""])[:4]
        if command.startswith(batch_dir):
            jobs.append({"job": job, "state": state, "reason": reason})
    if cancel_stuck:
        stuck = [j["job"] for j in jobs if j["state"] == "PENDING" and j["reason"] == "DependencyNeverSatisfied"]
        if stuck:
            subprocess.run(["scancel", *stuck], check=False)
        jobs = [j for j in jobs if j["job"] not in stuck]
    return jobs


def _patient_of(node) -> str | None:
    """The patient id of an expanded node (its ``_patient_<id>`` parameterization)."""
    for part in getattr(node, "parameterization", None) or []:
        if part.startswith("_patient_"):
            return part[len("_patient_"):]
    return None


def _failure_reason(node, stopped: Exception | None = None) -> str:
    """``"<node>: <exception line>"`` from the failed node's result file.

    ``stopped`` is the exception that ended the whole run, if one did: when
    a node's failure could not even be recorded (no result, no traceback;
    a full disk also refuses the crash file), it is that failure's cause.
    """
    try:
        traceback = node.result.runtime.traceback or ""
        last = [line.strip() for line in traceback.splitlines() if line.strip()][-1]
    except Exception:  # no result file (killed worker or SLURM job, a full disk, ...)
        # Nipype's crash report appends a note on the missing result file to the traceback: not the cause.
        details = "".join(getattr(node, "_traceback", None) or []).split("When creating this crashfile")[0]
        last = [line.strip() for line in details.splitlines() if line.strip()][-1:]
        if last:
            return f"{node.name}: {last[0]}"[:500]
        if stopped is not None:
            return f"{node.name}: {type(stopped).__name__}: {stopped}"[:500]
        return f"{node.name} failed (see the crash file)"
    return f"{node.name}: {last}"[:500]


def run_study(workflow: Workflow, *, plugin: str = "Linear", plugin_args: dict | None = None) -> list[dict] | None:
    """Run a workflow from :func:`init_study_wf` and return the study table's rows.

    Patients whose registration raised are rows with ``status = "failed"``
    and the exception in ``error``; the others finish (Nipype's
    ``stop_on_first_crash`` is off).  With every patient done, the
    JoinNode's ``study_dice.csv`` is already in the output folder; otherwise
    (Nipype skips a JoinNode after an upstream failure) the table is written
    here from the patients' own results.  ``report.html``
    (:func:`nipype_inrlddmm.reports.study.write_study_report`) is written beside
    it, with the failed patients marked and each patient's Dice before
    registration read from the manifest's label maps.

    ``plugin`` is a Nipype plugin (``Linear``, ``MultiProc``, ``SLURM``, ...);
    :data:`PLUGIN_DEFAULTS` fills unset ``plugin_args``.  The SLURM plugins
    need the same venv path and a shared file system on the compute nodes;
    every node gets its own ``sbatch`` arguments (:func:`set_slurm_resources`;
    ``plugin_args["sbatch_args"]`` is appended to each node's), and
    ``$SLURM_CONF`` and the rest of the environment pass to ``sbatch``.
    ``SLURMGraph`` submits every unfinished node at once (with
    ``--dependency=afterok``) and returns None without waiting: once
    :func:`study_slurm_jobs` is empty, run the study again (e.g. with the
    ``SLURM`` plugin) to gather the table; finished nodes are not recomputed.

    The work folder is held for the run (:func:`work_folder_lock`): a second
    study on it meanwhile refuses, naming this one.
    """
    if not workflow.base_dir:
        return _run_study(workflow, plugin, plugin_args)
    with work_folder_lock(workflow.base_dir):
        for folder in drop_unreadable_results(workflow.base_dir):
            LOGGER.warning("%s: its cached result could not be read (a crash cut it short?); recomputing that node",
                           folder)
        return _run_study(workflow, plugin, plugin_args)


def drop_unreadable_results(work_dir) -> list[Path]:
    """Remove the node folders of ``work_dir`` whose cached result file cannot be read; returns them.

    A crash or a full disk can cut a ``result_<node>.pklz`` short: Nipype
    would then fail the nodes that read it, run after run.  Without the
    folder, Nipype recomputes that node (and what depends on it) instead.
    """
    dropped = []
    for result in sorted(Path(work_dir).rglob("result_*.pklz")):
        try:
            loadpkl(result)
        except Exception:  # truncated gzip, broken pickle: whatever reading it raises
            shutil.rmtree(result.parent, ignore_errors=True)
            dropped.append(result.parent)
    return dropped


@contextlib.contextmanager
def work_folder_lock(work_dir):
    """Hold ``work_dir`` for one run; another run on it meanwhile raises an InputError naming the holder.

    Two Nipype runs on one cache would compute the same nodes at once and
    overwrite each other's results.  The lock is the kernel's (``flock``):
    it ends with the process, so a killed run leaves none behind.
    """
    folder = Path(work_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".inrlddmm-study.lock", "a+")
    except OSError as error:  # read-only, no permission, a file where a folder should be
        raise io.InputError(folder, f"cannot write the work folder here ({error.strerror or error})") from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise io.InputError(folder, f"the work folder is in use by another study ({holder}): wait for it to "
                                "end, or give another --work-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{shlex.join(sys.argv)}")
        handle.flush()
        yield


def _run_study(workflow: Workflow, plugin: str, plugin_args: dict | None) -> list[dict] | None:
    prefixes = branch_prefixes(workflow)
    manifest = workflow.get_node(f"{prefixes[0]}select").inputs.manifest
    # Each branch holds the patients of one kind; the table keeps the manifest's order.
    branch_patients = {p for prefix in prefixes for p in workflow.get_node(f"{prefix}patients").iterables[1]}
    patients = [row["patient"] for row in io.read_manifest(manifest, check_files=False)
                if row["patient"] in branch_patients]
    out_dir = Path(workflow.get_node(f"{prefixes[0]}patient_sink").inputs.base_directory)
    try:  # now, not after hours of computing, when the data sinks would find it
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise io.InputError(out_dir, f"cannot write the results here ({error.strerror or error})") from error
    failed = {}

    def record(node, status):
        if status == "exception":
            failed.setdefault(_patient_of(node), node)

    arguments = {**PLUGIN_DEFAULTS.get(plugin, {}), **(plugin_args or {})}
    for key in ("poll_sleep_duration", "job_finished_timeout"):
        if key in arguments:
            workflow.config["execution"][key] = arguments.pop(key)
    if plugin in SLURM_PLUGINS:
        _prepare_slurm(workflow, arguments)
    if plugin == "MultiProc" and arguments.get("mp_context") == "forkserver":
        start_worker_server()  # the command line started it already, before its own imports
    if plugin == "SLURMGraph":  # submits and returns; status callbacks are not supported there
        workflow.run(plugin=plugin, plugin_args=arguments)
        return None
    arguments["status_callback"] = record
    # Nipype's schedulers run gc.collect() before every submission, and a full collection over the objects
    # of torch, scipy and matplotlib dominated a small study's scheduling (docs: decisions).  Frozen, they
    # are not scanned again: each collection sees only what the run itself creates.
    gc.freeze()
    stopped = None
    try:
        plugins = {"SLURM": SLURMPlugin, "MultiProc": MultiProcPlugin}
        workflow.run(plugin=plugins[plugin](plugin_args=arguments) if plugin in plugins else plugin,
                     plugin_args=arguments)
    except Exception as error:
        if not failed:
            raise  # not a node failure (a broken graph, a dead worker pool, ...)
        stopped = error
    finally:
        gc.unfreeze()
    if None in failed:
        raise RuntimeError(f"study node {failed[None].fullname} failed: {_failure_reason(failed[None])}")

    rows = []
    for patient in patients:
        if patient in failed:
            rows.append(evaluation.failed_row(patient, _failure_reason(failed[patient], stopped)))
        elif not (out_dir / patient / "dice.json").is_file():
            # Nipype stops scheduling when it cannot even record a failure (a full disk): the patients after
            # it never ran, and a rerun takes them up.
            rows.append(evaluation.failed_row(patient, "not run: the study stopped at another patient's failure"))
        else:
            rows.append(evaluation.study_row(patient, out_dir / patient / "dice.csv", out_dir / patient / "dice.json"))
    # Otherwise the JoinNode's table is in out_dir already; a study of several branches has none.
    if any(row["status"] == "failed" for row in rows) or len(prefixes) > 1:
        evaluation.write_study_table(out_dir / "study_dice.csv", rows)
    study_report.write_study_report(out_dir, rows, parameters=study_parameters(workflow), manifest=manifest)
    return rows
