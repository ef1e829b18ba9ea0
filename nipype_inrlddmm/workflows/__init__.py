"""Nipype workflows: one registration, a study of many patients, and running them.

* :mod:`.registration`: :func:`init_registration_wf`, the graph of one
  registration, and the execution settings every workflow here uses (how
  Nipype's caching is pinned, and why);
* :mod:`.study`: :func:`init_study_wf`, that registration once per manifest
  row, with the study's table and per-patient DataSinks;
* :mod:`.execution`: :func:`run_study` and what it needs: the MultiProc
  and SLURM plugins made to survive a killed worker or a restarting
  controller, each SLURM job's resources, the failure of each patient named,
  the work folder held, the table and ``report.html`` written.

The names below are the package's public ones; import them from here.
"""

from .execution import (CONTROLLER_PATIENCE, PLUGIN_DEFAULTS, SLURM_MIN_MEM_GB, SLURM_PLUGINS, SLURM_TIME,
                        MultiProcPlugin, SLURMPlugin, drop_unreadable_results, run_study, set_slurm_resources,
                        slurm_job_end, slurm_sbatch_args, study_slurm_jobs, work_folder_lock)
from .registration import EXECUTION, OPTIMISATION_STAGES, estimate_mem_gb, init_registration_wf
from .study import BRANCHES, SINK_FIELDS, branch_prefixes, init_study_wf, row_branch, study_parameters

__all__ = [
    "BRANCHES", "CONTROLLER_PATIENCE", "EXECUTION", "MultiProcPlugin", "OPTIMISATION_STAGES", "PLUGIN_DEFAULTS",
    "SINK_FIELDS", "SLURMPlugin", "SLURM_MIN_MEM_GB", "SLURM_PLUGINS", "SLURM_TIME", "branch_prefixes",
    "drop_unreadable_results", "estimate_mem_gb", "init_registration_wf", "init_study_wf", "row_branch", "run_study",
    "set_slurm_resources", "slurm_job_end", "slurm_sbatch_args", "study_parameters", "study_slurm_jobs",
    "work_folder_lock",
]
