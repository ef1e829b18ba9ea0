"""What the user waits for: ``inrlddmm register`` end to end against the ANTs command line, in one run.

    python benchmarks/end_to_end.py [--sets brain brain-pair lung-ct phantom small-ct] [--threads 2]
                                    [--seeds 0 1 2] [--study 10] [--out end_to_end.md]

Each method runs as its own process, timed from start to exit, the way a
user runs it:

* ours: ``inrlddmm register`` with both label maps, writing every output
  (warped image, field, model, log, warped labels, dice.csv, qc.png), with
  ``--timings`` for the seconds of each phase;
* ANTs: antspyx (the ``benchmarks`` extra), as ``antsRegistration`` SyN
  followed by ``antsApplyTransforms`` of the image and of the labels
  (GenericLabel) and ``CreateJacobianDeterminantImage``: ``registration``,
  ``apply_transforms`` twice and ``create_jacobian_determinant_image``, the
  three results written as NIfTI.

Both get the same inputs (with the same fixed mask, where the similarity
is measured: the head for the brains, the CBCT's field of view for the
phantoms) and the same thread count (torch and ITK).  Afterwards, outside
the timing, both are scored the same way from the label maps they wrote:
mean Dice over the set's labels (inside the field of view for the CBCT
cases), SDlogJ and the share of voxels with det J <= 0.

Sets (read from $INRLDDMM_DATA, default ../shared/data; never copied):
``brain`` (subject -> MNI152, ``--affine affine``), ``brain-pair``,
``lung-ct`` (follow-up -> baseline, ``--affine affine``, HU clipped at
-1024 for both methods), ``phantom`` (the cohort generator's 128 x 112 x 48
CT -> CBCT, ``--fixed-mask`` its field of view) and ``small-ct`` (the same
generator at 3 mm isotropic, 128 x 112 x 96).  Each seed of ``--seeds``
runs both once: ours with ``--seed``, ANTs with antsRegistration's
``--random-seed`` (its SyN samples the metric at random, and its Dice moves
from run to run by as much as the two methods differ on the small sets);
the tables give the means over the seeds, with the range of each method's
Dice.  Then ``--study N`` times
``inrlddmm study`` (MultiProc, one worker per thread) on a fresh cohort of
N small phantom patients and splits its wall time: start-up, the nodes'
own run time, Nipype's own overhead around them, the report and exit.
Prints a Markdown table of the wall times and one of our phase shares, and
writes both to ``--out`` with a JSON copy of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cases import SETS, Case, cases

from nipype_inrlddmm import __version__, engine, io
from nipype_inrlddmm.evaluation import metrics

PHASES = ("read", "pre-align", "stages", "dense field and warp", "write", "labels", "evaluation", "QC")


@dataclass
class Inputs:
    """A case as the files a user passes to either command line."""

    moving: Path
    fixed: Path
    label_names: Path  # TSV of the evaluated labels
    fixed_mask: Path | None  # where both methods measure their similarity


def _label_table(path: Path, labels: dict[int, str]) -> Path:
    return io.write_csv(path, [{"index": k, "name": v} for k, v in labels.items()], delimiter="\t")


def _clipped(source: Path, target: Path, low: float) -> Path:
    data, affine = io.load_volume(source)
    return io.save_image(target, np.maximum(data, low).astype(np.float32), affine)


def _head_mask(image: Path, target: Path) -> Path:
    """The head, as a user's brain or head mask: the fixed MR's foreground by the rule the velocity window and
    ``accuracy.py`` use (``engine.foreground``)."""
    data, affine = io.load_volume(image)
    head = engine.foreground(torch.from_numpy(np.ascontiguousarray(data, np.float32)))
    return io.save_image(target, head.numpy().astype(np.uint8), affine)


def user_inputs(case: Case, scratch: Path) -> Inputs:
    """The files written to ``scratch`` that the methods get: the CTs clipped, the head or the field of view as mask."""
    moving, fixed = case.moving, case.fixed
    if case.clip_min is not None:
        moving, fixed = (_clipped(path, scratch / path.name, case.clip_min) for path in (case.moving, case.fixed))
    mask = _head_mask(case.fixed, scratch / f"{case.name}_head.nii.gz") if case.head else case.eval_mask
    return Inputs(moving, fixed, _label_table(scratch / f"{case.name}_labels.tsv", case.labels), mask)


def _timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def register_arguments(case: Case, inputs: Inputs, out: Path) -> list[str]:
    """``inrlddmm register``'s arguments for a case as a user passes them: both label maps, every output into
    ``out``, the phases' seconds in ``out/timings.json``, the set's pre-alignment and fixed mask."""
    arguments = ["register", "--moving", str(inputs.moving), "--fixed", str(inputs.fixed),
                 "--moving-labels", str(case.moving_labels), "--fixed-labels", str(case.fixed_labels),
                 "--label-names", str(inputs.label_names), "--out-dir", str(out),
                 "--quiet", "--timings", str(out / "timings.json")]
    arguments += ["--affine", case.affine] if case.affine else []
    return arguments + (["--fixed-mask", str(inputs.fixed_mask)] if inputs.fixed_mask else [])


def run_ours(case: Case, inputs: Inputs, out: Path, threads: int, env: dict, seed: int) -> dict:
    command = [shutil.which("inrlddmm") or str(Path(sys.executable).parent / "inrlddmm"),
               *register_arguments(case, inputs, out), "--num-threads", str(threads), "--seed", str(seed)]
    seconds = _timed(command, env)
    field, affine = io.load_displacement(out / "displacement.nii.gz")
    return {"wall": seconds, "timings": json.loads((out / "timings.json").read_text()),
            "labels": out / "warped_labels.nii.gz", "jacobian": metrics.jacobian_determinant(field, affine)}


def run_ants(case: Case, inputs: Inputs, out: Path, threads: int, env: dict, seed: int) -> dict:
    command = [sys.executable, __file__, "--ants-worker", str(inputs.moving), str(inputs.fixed),
               str(case.moving_labels), str(inputs.fixed_mask or ""), str(out), str(seed)]
    seconds = _timed(command, dict(env, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads)))
    jacobian, _ = io.load_volume(out / "jacobian.nii.gz")
    return {"wall": seconds, "labels": out / "warped_labels.nii.gz", "jacobian": jacobian}


def ants_worker(moving: str, fixed: str, moving_labels: str, fixed_mask: str, out: str, seed: str) -> None:
    """The ANTs command line's work in one process: SyN (``--random-seed seed``), the image and the labels
    carried over, det J."""
    import ants
    import ants.config

    # antspyx passes --random-seed to antsRegistration from here; its public setter, set_ants_deterministic,
    # would also pin ITK to one thread and so time another command than the user's.
    ants.config._random_seed = int(seed)

    fixed_image, moving_image = ants.image_read(fixed), ants.image_read(moving)
    mask = ants.image_read(fixed_mask) if fixed_mask else None
    registration = ants.registration(fixed_image, moving_image, "SyN", mask=mask)
    transforms = registration["fwdtransforms"]
    ants.image_write(ants.apply_transforms(fixed_image, moving_image, transforms), f"{out}/warped.nii.gz")
    labels = ants.apply_transforms(fixed_image, ants.image_read(moving_labels), transforms,
                                   interpolator="genericLabel")
    ants.image_write(labels, f"{out}/warped_labels.nii.gz")
    ants.image_write(ants.create_jacobian_determinant_image(fixed_image, transforms[0]), f"{out}/jacobian.nii.gz")


def score(case: Case, run: dict) -> dict:
    fixed, affine = io.load_labels(case.fixed_labels)
    warped = np.rint(io.load_volume(run["labels"])[0]).astype(np.int32)
    mask = io.load_volume(case.eval_mask)[0] > 0 if case.eval_mask else None
    dice = metrics.dice_scores(warped, fixed, sorted(case.labels), mask)
    return {"wall": run["wall"], "mean_dice": float(np.nanmean(dice)), **metrics.determinant_summary(run["jacobian"])}


def run_study(n_patients: int, scratch: Path, threads: int, env: dict, *, plugin: str = "MultiProc",
              shape=(64, 56, 24)) -> dict:
    """``inrlddmm study`` of a fresh phantom cohort, one node per core: where its wall time goes.

    Each node's start, end and run time are read from its result in the
    work folder.  From the command's start to the first node's start is
    start-up (the interpreter, the imports, building the workflow and
    Nipype's graph); from the last node's end to the command's exit, the
    study report and the exit.  In between Nipype runs the nodes: with
    ``threads`` workers they take at least their summed run time over
    ``threads``, and the rest of that window is Nipype's own (scheduling,
    the worker pool or the SLURM jobs' own start, hashing, result files, the
    data sinks, and workers idle for want of a ready node).  ``plugin`` is
    ``MultiProc`` (``threads`` workers) or ``SLURM`` (a cluster with
    ``threads`` cores, whose ``SLURM_CONF`` is in ``env``).
    """
    from datetime import datetime

    from nipype.utils.filemanip import loadpkl

    from nipype_inrlddmm.phantom import write_cohort

    cohort = scratch / "cohort"
    manifest = cohort / "manifest.tsv" if cohort.is_dir() else write_cohort(cohort, n_patients, shape=shape)
    out, work = scratch / f"study_{plugin}", scratch / f"study_work_{plugin}"
    command = [shutil.which("inrlddmm") or str(Path(sys.executable).parent / "inrlddmm"), "study", str(manifest),
               "--out-dir", str(out), "--work-dir", str(work), "--plugin", plugin, "--num-threads", "1", "--quiet"]
    command += ["--n-procs", str(threads)] if plugin == "MultiProc" else []
    started = time.time()
    wall = _timed(command, env)
    runtimes = [loadpkl(result).runtime for result in work.rglob("result_*.pklz")]
    first = min(datetime.fromisoformat(r.startTime).timestamp() for r in runtimes) - started
    last = max(datetime.fromisoformat(r.endTime).timestamp() for r in runtimes) - started
    busy = sum(r.duration for r in runtimes) / threads
    return {"patients": n_patients, "nodes": len(runtimes), "wall": wall, "node_seconds": busy * threads,
            "out": str(out), "start_up": first, "nipype": last - first - busy, "report_and_exit": wall - last,
            "nipype_share": (last - first - busy) / wall}


def write_results(out: Path, text: str, results: dict) -> None:
    """The Markdown ``text`` to ``out`` and every figure in ``results`` as JSON beside it, each atomically."""
    with io.atomic_path(out) as temporary:
        Path(temporary).write_text(text)
    with io.atomic_path(out.with_suffix(".json")) as temporary:
        Path(temporary).write_text(json.dumps(results, indent=1))


def mean_over_seeds(runs: list[dict], method: str) -> dict:
    """``method``'s figures (``"ours"`` or ``"ants"``) averaged over the runs of one set, one per seed, our phases'
    seconds too; ``dice_range`` is the lowest and the highest of its runs' mean Dice."""
    scored = [run[method] for run in runs]
    mean = {key: float(np.mean([r[key] for r in scored])) for key in scored[0] if key != "timings"}
    if "timings" in scored[0]:
        phases = {phase for r in scored for phase in r["timings"]}
        mean["timings"] = {phase: float(np.mean([r["timings"].get(phase, 0.0) for r in scored])) for phase in phases}
    return dict(mean, dice_range=(min(r["mean_dice"] for r in scored), max(r["mean_dice"] for r in scored)))


def _dice(scored: dict) -> str:
    low, high = scored["dice_range"]
    return f"{scored['mean_dice']:.4f}" + (f" ({low:.4f}-{high:.4f})" if high > low else "")


def tables(results: dict) -> str:
    # The registration with its pre-alignment too (what antsRegistration's time holds, and the time of
    # benchmarks/accuracy.py), beside register() alone.
    head = ["set", "ours: wall (s)", "register() (s)", "wall / register()", "pre-align (s)",
            "wall / (pre-align + register())", "ANTs: wall (s)", "ours / ANTs",
            "Dice ours / ANTs", "SDlogJ ours / ANTs", "% det J <= 0 ours / ANTs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        ours, ants = r["ours"], r["ants"]
        registration = ours["timings"]["stages"] + ours["timings"]["dense field and warp"]
        pre_align = ours["timings"].get("pre-align", 0.0)
        lines.append("| " + " | ".join([
            name, f"{ours['wall']:.1f}", f"{registration:.1f}", f"{ours['wall'] / registration:.2f}",
            f"{pre_align:.1f}", f"{ours['wall'] / (pre_align + registration):.2f}",
            f"{ants['wall']:.1f}", f"{ours['wall'] / ants['wall']:.2f}",
            f"{_dice(ours)} / {_dice(ants)}", f"{ours['sdlogj']:.3f} / {ants['sdlogj']:.3f}",
            f"{ours['jacobian_nonpositive_percent']:.4f} / {ants['jacobian_nonpositive_percent']:.4f}"]) + " |")
    head = ["set", *PHASES, "start-up and other"]
    lines += ["", "Share of our wall time per phase (%):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        timings, wall = r["ours"]["timings"], r["ours"]["wall"]
        shares = [100.0 * timings.get(phase, 0.0) / wall for phase in PHASES]
        lines.append("| " + " | ".join([name, *(f"{s:.1f}" for s in shares), f"{100.0 - sum(shares):.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=SETS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="run both methods once per seed (ours --seed, ANTs --random-seed) and report the means")
    parser.add_argument("--out", type=Path, help="write the Markdown tables here (and a .json beside it)")
    parser.add_argument("--study", type=int, default=10, metavar="N",
                        help="then time a fresh MultiProc study of N 64 x 56 x 24 phantom patients and report "
                        "Nipype's share of its wall time (0: skip)")
    parser.add_argument("--ants-worker", nargs=6,
                        metavar=("MOVING", "FIXED", "MOVING_LABELS", "FIXED_MASK", "OUT", "SEED"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ants_worker:
        ants_worker(*args.ants_worker)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    header = (f"# inrlddmm register {__version__} vs the ANTs command line, end to end: {args.threads} threads, "
              f"seeds {' '.join(map(str, args.seeds))}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(header, flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for case in cases(args.sets, scratch):
            inputs, runs = user_inputs(case, scratch), []
            for seed in args.seeds:  # the two methods alternate, so that the machine's load falls on both alike
                run = {"seed": seed}
                for method, register in (("ours", run_ours), ("ants", run_ants)):
                    out = scratch / case.name / f"seed{seed}" / method
                    out.mkdir(parents=True)
                    measured = register(case, inputs, out, args.threads, env, seed)
                    run[method] = dict(score(case, measured), **({"timings": measured["timings"]}
                                                                 if method == "ours" else {}))
                runs.append(run)
                print(f"<!-- {case.name}: {json.dumps(run)} -->", flush=True)
            results[case.name] = {method: mean_over_seeds(runs, method) for method in ("ours", "ants")} | {"runs": runs}
        study = run_study(args.study, scratch, args.threads, env) if args.study else None
    table = tables(results) if results else ""
    if study:
        share = {key: 100.0 * study[key] / study["wall"] for key in ("start_up", "nipype", "report_and_exit")}
        table += (f"\nStudy: {study['patients']} patients, {study['nodes']} nodes, MultiProc with {args.threads} "
                  f"workers: {study['wall']:.1f} s wall, {study['node_seconds']:.1f} s in the nodes; Nipype's own "
                  f"overhead {share['nipype']:.1f} % of the wall time, start-up {share['start_up']:.1f} %, the "
                  f"report and exit {share['report_and_exit']:.1f} %.\n")
        results["study"] = study
    print(table)
    if args.out:
        write_results(args.out, header + "\n" + table, results)


if __name__ == "__main__":
    main()
