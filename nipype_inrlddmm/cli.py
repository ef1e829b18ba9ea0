"""The ``inrlddmm`` command line.

``inrlddmm register``  one pair, all stages, Dice when labels are given.
``inrlddmm study``     a manifest of pairs as a cached, resumable Nipype study.
``inrlddmm demo``      the study on a generated phantom CT -> CBCT cohort.

The commands import what they run (torch among it) only once the arguments
are parsed: ``--help`` answers at once, and a MultiProc study starts its
worker server first, so that the server's imports and this process's run on
two cores at the same time.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import json
import os
import shutil
import sys
import threading
from functools import partial
from pathlib import Path

from . import __version__
from .options import HELP
from .worker_server import start_worker_server

#: The engine's choices (``engine.affine.TRANSFORMS`` and ``STARTS``, ``SIMILARITIES``, ``ENCODINGS``), spelt
#: out so that parsing arguments imports no torch.
TRANSFORMS = ("rigid", "affine")
STARTS = ("moments", "geometry", "identity")
SIMILARITIES = ("lncc", "ncc", "mse", "mi", "mind")
ENCODINGS = ("fourier", "siren", "none")

#: CLI flag -> the type of the registration option it sets (the help is :data:`~nipype_inrlddmm.options.HELP`'s).
_OPTIONS = {
    "n_steps": int, "width": int, "depth": int, "encoding": str, "similarity": str, "mind_distance_mm": float,
    "mind_radius_mm": float, "mi_weight": float, "reg_weight": float, "jacobian_weight": float,
    "outside_jacobian_weight": float, "jacobian_scale": float, "coarse_factor": int, "coarse_iterations": int,
    "distill_iterations": int, "fine_iterations": int, "warm_iterations": int, "warm_learning_rate": float,
    "warm_regularity_patches": int, "convergence_window": int, "convergence_threshold": float, "seed": int,
}


_CHOICES = {"encoding": ENCODINGS, "similarity": SIMILARITIES}


def _engine_default(name: str) -> str:
    """The value the engine uses for registration option ``name`` when it is not given."""
    from .engine import config_from_options, option_values

    values = option_values(config_from_options(), name)
    if len(set(values)) > 1:
        return "coarse / distill / fine " + " / ".join(map(str, values))
    return "sized to the grid" if values[0] is None else str(values[0])


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with every default: the registration options' read from the engine, only when help is shown."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.dest in _OPTIONS:
            return f"{text} (default: {_engine_default(action.dest)})"
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)"


def _add_affine_option(parser, what: str) -> None:
    parser.add_argument("--affine", choices=TRANSFORMS,
                        help=f"pre-align {what} with a rigid or affine transform first, as ANTs does before SyN "
                        "(e.g. subject -> atlas, or scans of two sessions); writes affine.txt, to list after the "
                        "field: antsApplyTransforms ... -t displacement.nii.gz -t affine.txt (default: none)")
    parser.add_argument("--init", choices=STARTS, default="moments",
                        help="where --affine's search starts: centres of mass aligned (moments; both images show the "
                        "same object on a dark background), grid centres aligned (geometry; images cropped around "
                        "the same anatomy, e.g. MR -> ultrasound), or the headers as they are (identity)")


def _add_registration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registration")
    for name, kind in _OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, choices=_CHOICES.get(name), help=HELP[name])
    window = group.add_mutually_exclusive_group()
    window.add_argument("--velocity-window-mm", type=float, nargs=2, metavar=("INNER", "OUTER"),
                        help=HELP["velocity_window_mm"])
    window.add_argument("--no-velocity-window", action="store_true",
                        help="leave the velocity unconfined around a fixed mask")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto uses CUDA when present (default: auto)")
    group.add_argument("--num-threads", type=int, default=None,
                       help="torch CPU threads (register: default torch's own choice; study and demo: "
                       "per node, default 1)")
    group.add_argument("--quiet", action="store_true", help="no progress bars (shown by default: one per stage, "
                       "with the current loss, on stderr)")


def _registration_options(args) -> dict:
    options = {name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None}
    if args.velocity_window_mm is not None:
        options["velocity_window_mm"] = tuple(args.velocity_window_mm)
    if args.no_velocity_window:
        options["velocity_window_mm"] = None
    return options


def _print_dice(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'label':>6}  {'name':<28} {'Dice':>6} {'HD95 mm':>8}")
    for row in rows:
        print(f"{row['label']:>6}  {row['name'][:28]:<28} {row['dice']:>6.3f} {row['hd95_mm']:>8.2f}")


def _print_summary(outputs: dict, out_dir) -> None:
    """Mean Dice before and after, the field's regularity, where the time went and where the outputs are."""
    summary = outputs["summary"]
    print()
    if "mean_dice" in summary:
        before = outputs.get("mean_dice_before")
        print(f"mean Dice over {summary['labels']} labels: "
              + (f"{before:.3f} before, " if before is not None else "") + f"{summary['mean_dice']:.3f} after")
    print(f"field: det J <= 0 in {summary['jacobian_nonpositive_percent']:.3f} % of voxels, min det J "
          f"{summary['jacobian_min']:.3f}, SDlogJ {summary['sdlogj']:.3f}")
    timings = outputs["timings"]
    print(f"time: {sum(timings.values()):.1f} s (" + ", ".join(f"{phase} {seconds:.1f}"
                                                               for phase, seconds in timings.items()) + ")")
    print(f"outputs in {out_dir}")


def _label_names_beside(labels) -> str | None:
    """``labels.tsv`` or ``labels.json`` in the folder of a label map (or of a manifest), if present."""
    folder = Path(labels).parent
    return next((str(p) for p in (folder / "labels.tsv", folder / "labels.json") if p.is_file()), None)


def _check_init(args) -> None:
    from . import io

    if args.init != "moments" and not args.affine:
        raise io.InputError("--init", "sets where the pre-alignment starts: give --affine rigid or affine too")


def _cmd_register(args) -> int:
    from . import io
    from .pipeline import register_files

    _check_init(args)

    label_names = args.label_names or (_label_names_beside(args.fixed_labels) if args.fixed_labels else None)
    dicom = args.moving_rtstruct or args.fixed_rtstruct or Path(args.moving).is_dir() or Path(args.fixed).is_dir()
    if dicom:
        from .pipeline.dicom import register_dicom

        register = partial(register_dicom, moving_rtstruct=args.moving_rtstruct, fixed_rtstruct=args.fixed_rtstruct)
    else:
        register = register_files
    outputs = register(
        args.moving, args.fixed, args.out_dir, moving_labels=args.moving_labels,
        fixed_labels=args.fixed_labels, fixed_mask=args.fixed_mask, label_names=label_names,
        label_volume=args.label_volume,
        affine=args.affine, affine_start=args.init, init_model=args.init_model, device=args.device,
        num_threads=args.num_threads, progress=not args.quiet,
        trajectory=args.trajectory, **_registration_options(args),
    )
    if "rows" in outputs:
        _print_dice(outputs["rows"], f"Dice in {outputs['dice']}")
    if args.timings:
        with io.atomic_path(args.timings) as temporary:
            Path(temporary).write_text(json.dumps(outputs["timings"], indent=2))
    if "rtstruct" in outputs:
        _print_rtstruct(outputs)
    _print_summary(outputs, args.out_dir)
    return 0


def _print_rtstruct(outputs: dict) -> None:
    """Where the carried contours are, and which ROIs were not carried or left the fixed image."""
    print(f"\nRTSTRUCT on the fixed series: {outputs['rtstruct']} (ROIs named in {outputs['label_table']})")
    if outputs["skipped_rois"]:
        print(f"not carried (points or open lines only): {', '.join(outputs['skipped_rois'])}")
    if outputs["empty_rois"]:
        print(f"carried wholly outside the fixed image, written without contours: {', '.join(outputs['empty_rois'])}")


#: The printed study table's summary columns and their headers.
_SUMMARY_HEADERS = {"mean_dice": "mean Dice", "mean_hd95_mm": "HD95 mm", "jacobian_nonpositive_percent": "% detJ<=0",
                    "sdlogj": "SDlogJ"}
#: Per-label Dice columns are printed for studies of at most this many labels (study_dice.csv has them all).
_PRINTED_LABELS = 8


def _print_study(rows: list[dict], table_path: Path) -> None:
    """The study table: per patient the Dice of each label (few labels) and the summary, then each failure."""
    from .reports.study import label_columns

    ok = [row for row in rows if row["status"] == "ok"]
    labels = label_columns(ok or rows)
    shown = labels if len(labels) <= _PRINTED_LABELS else []
    headers = {"patient": "patient", **{label: label for label in shown}, **_SUMMARY_HEADERS}
    widths = {key: max(len(header), 7) for key, header in headers.items()}
    widths["patient"] = max(widths["patient"], *(len(row["patient"]) for row in rows))
    print(f"\nDice per patient{' and label' if shown else ''} (inside the fixed mask, when given), HD95, folding "
          f"and SDlogJ; every label in {table_path}")
    print("  ".join(f"{header:>{widths[key]}}" for key, header in headers.items()))
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['patient']:>{widths['patient']}}  FAILED: {row['error']}")
            continue
        print("  ".join(f"{row[key]:>{widths[key]}}" if isinstance(row[key], str) else
                        f"{row[key]:>{widths[key]}.3f}" for key in headers))


def _study_manifest(path) -> Path:
    """A manifest file, or a folder holding ``manifest.tsv`` / ``manifest.csv``."""
    from . import io

    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("manifest.tsv", "manifest.csv") if (path / name).is_file()]
        if not found:
            raise io.InputError(path, "folder has no manifest.tsv or manifest.csv")
        return found[0]
    return path


def _run_study(args, manifest: Path, out_dir: Path, work_dir: Path, label_names) -> int:
    """Build, run and report a study; exit status 1 when any patient failed."""
    from nipype import config, logging

    from . import io
    from .workflows import SLURM_PLUGINS, init_study_wf, run_study, study_slurm_jobs

    _check_init(args)

    if not args.verbose:
        config.set("logging", "workflow_level", "WARNING")
        logging.update_logging(config)
    num_threads = args.num_threads or 1
    plugin_args = {}
    if args.plugin == "MultiProc":
        plugin_args["n_procs"] = args.n_procs or os.cpu_count()
        if num_threads > plugin_args["n_procs"]:
            raise io.InputError("--num-threads", f"{num_threads} threads per node exceed --n-procs "
                                f"{plugin_args['n_procs']}: MultiProc could not run any node")
    collect = getattr(args, "collect", False)
    plugin = "SLURM" if collect else args.plugin
    if plugin in SLURM_PLUGINS:
        if not shutil.which("sbatch"):
            raise io.InputError("--plugin", f"{plugin} needs SLURM's sbatch and squeue on PATH (not found)")
        if args.sbatch_args:
            plugin_args["sbatch_args"] = args.sbatch_args
    workflow = init_study_wf(
        manifest=manifest, out_dir=out_dir, work_dir=work_dir, label_names=label_names, num_threads=num_threads,
        affine=args.affine or False, affine_options={"start": args.init}, device=args.device,
        progress=not args.quiet, trajectory=args.trajectory,
        **_registration_options(args),
    )
    if collect:
        queued = study_slurm_jobs(workflow, cancel_stuck=True)
        if queued:
            print(f"{len(queued)} SLURM jobs of this study are still queued or running "
                  f"({', '.join(j['job'] for j in queued)}); run --collect again once squeue no longer lists them")
            return 3
    rows = run_study(workflow, plugin=plugin, plugin_args=plugin_args)
    if rows is None:  # SLURMGraph: submitted, not run
        batch = Path(workflow.base_dir) / workflow.name / "batch"
        submitted = sum("=$(sbatch " in line for line in (batch / "submit_jobs.sh").read_text().splitlines())
        print(f"submitted {submitted} SLURM jobs (batch scripts and job logs in {batch}); when squeue no longer "
              "lists them, run the same command with --collect to gather the results")
        return 0
    _print_study(rows, out_dir / "study_dice.csv")
    print(f"report: {out_dir / 'report.html'}")
    failed = [row["patient"] for row in rows if row["status"] != "ok"]
    if failed:
        print(f"\n{len(failed)} of {len(rows)} patients failed: {', '.join(failed)} "
              f"(crash files in {work_dir / 'crash'}); rerun the same command to retry only them")
    return 1 if failed else 0


def _cmd_study(args) -> int:
    manifest = _study_manifest(args.manifest)
    return _run_study(args, manifest, Path(args.out_dir), Path(args.work_dir),
                      args.label_names or _label_names_beside(manifest))


def _cmd_demo(args) -> int:
    from . import io
    from .phantom import write_cohort

    out_dir = Path(args.out_dir)
    shape = tuple(args.shape)
    data = out_dir / "data" / f"phantom-{'x'.join(map(str, shape))}"
    manifest = data / "manifest.tsv"
    # Rewriting the cohort would give its files new timestamps, and Nipype would recompute everything.
    if not manifest.is_file() or len(io.read_manifest(manifest)) != args.patients:
        manifest = write_cohort(data, args.patients, shape=shape)
    return _run_study(args, manifest, out_dir, out_dir / "work", data / "labels.tsv")


def _add_study_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("execution (Nipype)")
    group.add_argument("--plugin", default="Linear", choices=("Linear", "MultiProc", "SLURM", "SLURMGraph"),
                       help="Linear: one node at a time in this process; MultiProc: patients in parallel on "
                       "this machine (forkserver workers); SLURM: one job per node, submitted as they become "
                       "ready, waiting for all; SLURMGraph: submit every node at once with dependencies, then "
                       "exit (gather later with --collect) (default: Linear)")
    group.add_argument("--n-procs", type=int, help="MultiProc: CPU slots in total (default: all cores); each "
                       "optimisation node takes --num-threads of them")
    group.add_argument("--sbatch-args", help='SLURM: sbatch arguments added to each job\'s own (-c from '
                       '--num-threads, --mem from the stage\'s estimate, a --time per stage), e.g. '
                       '"--partition=cpu --time=2:00:00" or "--partition=gpu --gres=gpu:1" with --device cuda')
    _add_affine_option(group, "each moving image")
    group.add_argument("--verbose", action="store_true", help="log every Nipype node")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inrlddmm",
        description="INR-LDDMM deformable registration (coarse INR -> distillation -> fine INR). "
        "Fields are written as ITK/ANTs displacement fields (LPS mm) that antsApplyTransforms reads.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    reg = commands.add_parser("register", help="register one moving image onto one fixed image",
                              formatter_class=_HelpFormatter,
                              description="Register MOVING onto FIXED and write warped image, field, model, "
                              "log, QC figure and (with both label maps) Dice into --out-dir.")
    reg.add_argument("--moving", required=True, help="moving image: a NIfTI file or a folder holding one DICOM "
                     "series, e.g. the planning CT")
    reg.add_argument("--fixed", required=True, help="fixed image: a NIfTI file or a folder holding one DICOM series, "
                     "e.g. the day's CBCT")
    reg.add_argument("--moving-rtstruct", metavar="RS", help="RTSTRUCT drawn on the moving DICOM series: its ROIs are "
                     "the moving labels, carried onto the fixed DICOM series as OUT_DIR/rtstruct.dcm (with "
                     "warped_labels.nii.gz and labels.tsv, the ROI names)")
    reg.add_argument("--fixed-rtstruct", metavar="RS", help="RTSTRUCT drawn on the fixed DICOM series (the day's "
                     "reference contours): its ROIs of the same names as --moving-rtstruct's are evaluated (dice.csv)")
    reg.add_argument("--moving-labels", help="label map on the moving grid, carried to the fixed grid")
    reg.add_argument("--fixed-labels", help="label map on the fixed grid, for Dice")
    reg.add_argument("--fixed-mask", help="mask on the fixed grid: where to sample and evaluate (e.g. CBCT FOV)")
    reg.add_argument("--label-names", help="JSON {id: name} or TSV with index/name columns: exactly these labels "
                     "are evaluated, named (default: labels.tsv or labels.json beside --fixed-labels, if present; "
                     "otherwise every label present, by number)")
    reg.add_argument("--label-volume", type=int, metavar="K",
                     help="of 4-D label files (one structure per volume, e.g. a gland then landmarks), evaluate "
                     "volume K alone, counted from 0 (default: every volume, volume k as label k + 1)")
    reg.add_argument("--out-dir", required=True, help="output folder (created)")
    reg.add_argument("--init-model", metavar="MODEL", help="start from the model.pt of a registration of the same "
                     "moving image, e.g. the previous fraction's of a course (the planning CT against each day's "
                     "CBCT): no coarse stage or distillation, --warm-iterations of the fine stage; that registration's "
                     "fixed grid must cover this fixed image's (default: none, a cold start)")
    reg.add_argument("--trajectory", type=int, default=0, metavar="K",
                     help="also write the moving image at K times t in [0, 1] of the flow: trajectory.nii.gz "
                     "(4-D) and trajectory.gif (the axial centre slice); t = 0 is the moving image, t = 1 the "
                     "warped one (default: none)")
    reg.add_argument("--timings", metavar="FILE", help="also write the wall seconds of each phase (read, "
                     "pre-align, stages, dense field and warp, write, labels, evaluation, QC, trajectory) "
                     "as JSON to FILE")
    _add_affine_option(reg, "the moving image")
    _add_registration_options(reg)
    reg.set_defaults(func=_cmd_register)

    study = commands.add_parser(
        "study", help="register every patient of a manifest (a cached, resumable Nipype study)",
        formatter_class=_HelpFormatter,
        description="Register every row of MANIFEST with the Nipype study workflow and write, per patient, "
        "OUT_DIR/<patient>/ (warped.nii.gz, displacement.nii.gz, model.pt, warped_labels.nii.gz, dice.csv, "
        "dice.json, stage logs, qc.png), OUT_DIR/study_dice.csv (one row per patient; failed patients marked "
        "with the reason) and OUT_DIR/report.html (the Dice table, box plots, QC figures, parameters).",
        epilog="""manifest (TSV or CSV; paths relative to the manifest's folder):
  patient  moving            fixed               moving_labels            fixed_labels              fixed_mask
  p01      p01/ct.nii.gz     p01/cbct.nii.gz     p01/ct_labels.nii.gz     p01/cbct_labels.nii.gz    p01/cbct_fov.nii.gz
(fixed_mask is optional.)  `python data/generate_cohort.py DIR` writes a phantom cohort with its manifest.
DICOM: moving and fixed may be folders each holding one DICOM series, with moving_rtstruct and fixed_rtstruct
columns instead of the label maps; each such patient also gets rtstruct.dcm (the moving ROIs on the fixed series)
and labels.tsv (`generate_cohort.py DIR --dicom` writes DIR/dicom_manifest.tsv).  A course of treatment: an
init_model column (a previous fraction's model.pt) starts that row from it (--warm-iterations of the fine stage
alone); a row without one registers from scratch.

caching: WORK_DIR is Nipype's cache.  Rerunning the same command recomputes nothing; after a crash or a kill
it recomputes only what had not finished; changing a fine-stage option (e.g. --fine-iterations) reruns the
fine stage and what follows, never the coarse or distillation stages.  A failed patient leaves a crash file
in WORK_DIR/crash and does not stop the others; the exit status is then 1.

SLURM: every node is a job (-c, --mem and --time from the node, then --sbatch-args) run by this command's
Python (the same venv must exist on the compute nodes, and WORK_DIR/OUT_DIR on a shared file system);
SLURM_CONF and the rest of the environment pass to sbatch.  --plugin SLURMGraph submits and exits;
`inrlddmm study ... --collect` later gathers the table (exit status 3 while jobs are still queued).""",
    )
    study.add_argument("manifest", help="manifest TSV/CSV, or a folder holding manifest.tsv")
    study.add_argument("--out-dir", required=True, help="results folder (created)")
    study.add_argument("--work-dir", required=True, help="Nipype working folder: the cache that makes reruns cheap")
    study.add_argument("--label-names", help="JSON/TSV of label names (default: labels.tsv or labels.json beside "
                       "the manifest, if present)")
    study.add_argument("--trajectory", type=int, default=0, metavar="K",
                       help="per patient, the moving image at K times of the flow (trajectory.nii.gz, "
                       "trajectory.gif) (default: none)")
    study.add_argument("--collect", action="store_true",
                       help="after --plugin SLURMGraph: once none of the study's jobs is queued, gather the results "
                       "(a node whose job failed is resubmitted through the SLURM plugin); exit status 3 while "
                       "jobs are still queued or running")
    _add_study_options(study)
    _add_registration_options(study)
    study.set_defaults(func=_cmd_study)

    demo = commands.add_parser("demo", help="run the study on a generated phantom CT -> CBCT cohort",
                               formatter_class=_HelpFormatter,
                               description="Generate a phantom chest CT/CBCT cohort (once), run the Nipype study "
                               "workflow on it and print the Dice table.  Rerunning is instant (cached).")
    demo.add_argument("--out-dir", default="inrlddmm-demo",
                      help="output folder; the cohort goes to OUT_DIR/data, Nipype's cache to OUT_DIR/work "
                      "(default: ./inrlddmm-demo)")
    demo.add_argument("--patients", type=int, default=3, help="patients in the cohort (default: 3)")
    demo.add_argument("--shape", type=int, nargs=3, default=(128, 112, 48), metavar=("X", "Y", "Z"),
                      help="phantom grid (default: 128 112 48)")
    demo.add_argument("--trajectory", type=int, default=5, metavar="K",
                      help="per patient, the moving image at K times of the flow (default: 5)")
    _add_study_options(demo)
    _add_registration_options(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    args = build_parser().parse_args(argv)
    if getattr(args, "plugin", None) == "MultiProc":
        start_worker_server()
    from .engine import DivergenceError
    from .io import InputError

    try:
        return args.func(args)
    except InputError as error:
        print(f"inrlddmm: error: {error}", file=sys.stderr)
        return 2
    except DivergenceError as error:  # not the input's fault: exit 1, as a failed study
        print(f"inrlddmm: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every output is staged and moved into place whole, so what a full disk interrupted left nothing behind.
        where = error.filename or getattr(args, "out_dir", None) or os.getcwd()
        print(f"inrlddmm: error: no space left on the device holding {where} ({error.strerror}); nothing "
              "half-written was kept: free some space and run the same command again", file=sys.stderr)
        return 1


def run() -> None:
    """The ``inrlddmm`` program: :func:`main`, then an exit that skips tearing the interpreter down.

    With torch loaded, Python's teardown (freeing every module's objects, which the operating system
    reclaims at exit anyway) takes about a second after the last output is written (docs: decisions).
    The exit handlers run as at any exit; while another thread still runs (a pool's), the exit is the
    ordinary one, which waits for it.
    """
    code = main()
    if any(not thread.daemon for thread in threading.enumerate() if thread is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
