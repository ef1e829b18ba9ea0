"""Warm start over a course of treatment: each fraction from scratch, and from the previous fraction's model.

    python benchmarks/course.py [--shape 128 112 48] [--fractions 5] [--seed 0] [--threads 2]
                                [--warm-iterations 100 150] [--warm-learning-rate 3e-4 6e-4]
                                [--warm-regularity-patches 0 24] [--registration-seed 0] [--out course.md]

The course is generated (:func:`nipype_inrlddmm.phantom.make_course`): one
planning CT and a daily CBCT per fraction of the same phantom patient, the
deformation drifting slowly from day to day.  Fraction 1 is registered
from scratch (cold); every later fraction both cold and warm, with
``--init-model`` the previous fraction's warm ``model.pt`` (fraction 1's
for fraction 2): a course as a user runs it, each day from the day before.
Each combination of ``--warm-iterations``, ``--warm-learning-rate`` and
``--warm-regularity-patches`` values is a warm course of its own.

Every run is ``inrlddmm register`` in its own process, timed from start
to exit (what the user waits for), with both label maps, the CBCT's field
of view as ``--fixed-mask``, every output written.  A fraction's cold and
warm runs follow each other, so that load from other processes falls on
both alike; beside the wall seconds, the CPU seconds of each command
(user + system, its threads together), which waiting for the cores does
not lengthen, and the load average before and after the course, say how
much other work there was.  Dice (inside the field of view), SDlogJ and
the share of det J <= 0 are the command's own (``dice.json``).  Prints, per setting, a
Markdown table per fraction, and writes the tables and a JSON copy of every
figure to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nipype_inrlddmm import __version__, engine, io
from nipype_inrlddmm.phantom import LABELS, make_course

#: The command as a user runs it: the console script installed beside this Python.
COMMAND = [str(Path(sys.executable).with_name("inrlddmm")), "register"]


def write_course(folder: Path, shape, n_fractions: int, seed: int) -> Path:
    """The course as files: ``ct.nii.gz``, ``ct_labels.nii.gz``, ``labels.tsv`` and per fraction ``fxK/``
    (``cbct.nii.gz``, ``cbct_labels.nii.gz``, ``cbct_fov.nii.gz``)."""
    fractions = make_course(tuple(shape), n_fractions, seed=seed)
    io.save_image(folder / "ct.nii.gz", fractions[0].ct, fractions[0].ct_affine)
    io.save_image(folder / "ct_labels.nii.gz", fractions[0].ct_labels, fractions[0].ct_affine)
    io.write_csv(folder / "labels.tsv", [{"index": k, "name": v} for k, v in LABELS.items()], delimiter="\t")
    for k, pair in enumerate(fractions, 1):
        day = folder / f"fx{k}"
        io.save_image(day / "cbct.nii.gz", pair.cbct, pair.affine)
        io.save_image(day / "cbct_labels.nii.gz", pair.cbct_labels, pair.affine)
        io.save_image(day / "cbct_fov.nii.gz", pair.cbct_fov.astype(np.uint8), pair.affine)
    return folder


def register(course: Path, fraction: int, out: Path, threads: int, extra: list[str]) -> dict:
    """One ``inrlddmm register`` of a fraction: wall seconds, and the command's Dice and field summary."""
    day = course / f"fx{fraction}"
    command = [*COMMAND, "--moving", str(course / "ct.nii.gz"), "--fixed", str(day / "cbct.nii.gz"),
               "--moving-labels", str(course / "ct_labels.nii.gz"), "--fixed-labels", str(day / "cbct_labels.nii.gz"),
               "--fixed-mask", str(day / "cbct_fov.nii.gz"), "--label-names", str(course / "labels.tsv"),
               "--num-threads", str(threads), "--quiet", "--out-dir", str(out), *extra]
    start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "dice.json").read_text())
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "dice": summary["mean_dice"], "sdlogj": summary["sdlogj"],
            "folding": summary["jacobian_nonpositive_percent"], "model": str(out / "model.pt")}


def setting_name(iterations: int, rate: float, regularity_patches: int) -> str:
    return f"{iterations} iterations from {rate:g}, {regularity_patches} regularity patches"


def run_course(course: Path, work: Path, n_fractions: int, threads: int, seed: int, warm_settings) -> dict:
    """Fraction 1 cold; then per fraction the cold run and, for each warm setting (iterations, learning
    rate, regularity patches), its warm run."""
    cold = {1: register(course, 1, work / "cold" / "fx1", threads, ["--seed", str(seed)])}
    warm = {setting_name(*setting): {} for setting in warm_settings}
    for fraction in range(2, n_fractions + 1):
        cold[fraction] = register(course, fraction, work / "cold" / f"fx{fraction}", threads, ["--seed", str(seed)])
        for k, ((iterations, rate, patches), runs) in enumerate(zip(warm_settings, warm.values())):
            previous = runs.get(fraction - 1, cold[1])["model"]
            runs[fraction] = register(course, fraction, work / f"warm{k}" / f"fx{fraction}", threads,
                                      ["--seed", str(seed), "--init-model", previous,
                                       "--warm-iterations", str(iterations),
                                       "--warm-learning-rate", str(rate), "--warm-regularity-patches",
                                       str(patches)])
        print(f"fraction {fraction} done", file=sys.stderr, flush=True)
    return {"cold": cold, "warm": warm}


def table(cold: dict, warm: dict) -> str:
    """Markdown: per fraction the cold and warm wall seconds, their ratio, the same in CPU seconds, Dice, SDlogJ
    and % det J <= 0; the last column says whether the warm Dice is at least the cold one."""
    lines = ["| fraction | cold s | warm s | warm / cold | CPU s cold / warm | CPU warm / cold | cold Dice | warm Dice "
             "| warm >= cold | SDlogJ cold / warm | % det J <= 0 cold / warm |", "|---" * 11 + "|"]
    for fraction, c in cold.items():
        w = warm.get(fraction)
        if w is None:
            lines.append(f"| {fraction} | {c['seconds']:.1f} | - | - | {c['cpu_seconds']:.1f} / - | - "
                         f"| {c['dice']:.4f} | - | - | {c['sdlogj']:.3f} / - | {c['folding']:.3f} / - |")
            continue
        lines.append(f"| {fraction} | {c['seconds']:.1f} | {w['seconds']:.1f} | {w['seconds'] / c['seconds']:.2f} "
                     f"| {c['cpu_seconds']:.1f} / {w['cpu_seconds']:.1f} | {w['cpu_seconds'] / c['cpu_seconds']:.2f} "
                     f"| {c['dice']:.4f} | {w['dice']:.4f} | {'yes' if w['dice'] >= c['dice'] else 'no'} "
                     f"| {c['sdlogj']:.3f} / {w['sdlogj']:.3f} | {c['folding']:.3f} / {w['folding']:.3f} |")
    later = [f for f in warm if f in cold]

    def mean(runs, key):
        return np.mean([runs[f][key] for f in later])
    lines.append(f"| 2-{max(later)} mean | {mean(cold, 'seconds'):.1f} | {mean(warm, 'seconds'):.1f} "
                 f"| {np.mean([warm[f]['seconds'] / cold[f]['seconds'] for f in later]):.2f} "
                 f"| {mean(cold, 'cpu_seconds'):.1f} / {mean(warm, 'cpu_seconds'):.1f} "
                 f"| {np.mean([warm[f]['cpu_seconds'] / cold[f]['cpu_seconds'] for f in later]):.2f} "
                 f"| {mean(cold, 'dice'):.4f} | {mean(warm, 'dice'):.4f} "
                 f"| {sum(warm[f]['dice'] >= cold[f]['dice'] for f in later)} of {len(later)} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 112, 48), help="CT and CBCT grid")
    parser.add_argument("--fractions", type=int, default=5, help="fractions of the course (at least 2)")
    parser.add_argument("--seed", type=int, default=0, help="the phantom patient")
    parser.add_argument("--threads", type=int, default=2, help="--num-threads of every command")
    parser.add_argument("--registration-seed", type=int, default=0, help="--seed of every command")
    parser.add_argument("--warm-iterations", type=int, nargs="+",
                        default=[engine.RegistrationConfig().warm_iterations],
                        help="warm-start iterations (default: the engine's)")
    parser.add_argument("--warm-learning-rate", type=float, nargs="+",
                        default=[engine.RegistrationConfig().warm_learning_rate],
                        help="warm-start learning rates (default: the engine's)")
    parser.add_argument("--warm-regularity-patches", type=int, nargs="+",
                        default=[engine.RegistrationConfig().warm_regularity_patches],
                        help="warm-start regularity patches (default: the engine's); one warm course per "
                        "combination of iterations, rate and regularity patches")
    parser.add_argument("--out", type=Path, help="write the tables (Markdown) and a JSON copy of the figures here")
    args = parser.parse_args(argv)
    if args.fractions < 2:
        parser.error("a course to warm-start needs at least 2 fractions")
    with tempfile.TemporaryDirectory(prefix="inrlddmm-course-") as scratch:
        scratch = Path(scratch)
        course = write_course(scratch / "course", args.shape, args.fractions, args.seed)
        load = os.getloadavg()[0]
        results = run_course(course, scratch / "runs", args.fractions, args.threads, args.registration_seed,
                             list(itertools.product(args.warm_iterations, args.warm_learning_rate,
                                                    args.warm_regularity_patches)))
    results["load_average"] = [load, os.getloadavg()[0]]
    header = (f"nipype_inrlddmm {__version__}, phantom course {' x '.join(map(str, args.shape))}, seed {args.seed}, "
              f"registration seed {args.registration_seed}, {args.threads} threads, {os.cpu_count()} cores, load "
              f"average (1 min) {load:.1f} before the course and {results['load_average'][1]:.1f} after")
    text = "\n\n".join([header] + [f"warm start: {setting}\n\n{table(results['cold'], runs)}"
                                   for setting, runs in results["warm"].items()])
    print(text)
    if args.out:
        for path, content in ((args.out, text + "\n"), (args.out.with_suffix(".json"), json.dumps(results, indent=2))):
            with io.atomic_path(path) as temporary:
                temporary.write_text(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
