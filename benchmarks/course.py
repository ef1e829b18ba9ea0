"""Warm start over a course of treatment: each fraction from scratch, and from the previous fraction's model.

    python benchmarks/course.py [--shape 128 112 48] [--fractions 5] [--seed 0] [--threads 2]
                                [--warm-iterations 100 150] [--out course.md]

The course is generated (:func:`nipype_inrlddmm.phantom.make_course`): one
planning CT and a daily CBCT per fraction of the same phantom patient, the
deformation drifting slowly from day to day.  Fraction 1 is registered
from scratch (cold); every later fraction both cold and warm, with
``--init-model`` the previous fraction's warm ``model.pt`` (fraction 1's
for fraction 2): a course as a user runs it, each day from the day before.
With several ``--warm-iterations`` values, each is a course of its own.

Every run is ``inrlddmm register`` in its own process, timed from start
to exit (what the user waits for), with both label maps, the CBCT's field
of view as ``--fixed-mask``, every output written.  A fraction's cold and
warm runs follow each other, so that load from other processes falls on
both alike.  Dice (inside the field of view), SDlogJ and the share of
det J <= 0 are the command's own (``dice.json``).  Prints, per setting, a
Markdown table per fraction, and writes the tables and a JSON copy of every
figure to ``--out``.
"""

from __future__ import annotations

import argparse
import json
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
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "dice.json").read_text())
    return {"seconds": seconds, "dice": summary["mean_dice"], "sdlogj": summary["sdlogj"],
            "folding": summary["jacobian_nonpositive_percent"], "model": str(out / "model.pt")}


def run_course(course: Path, work: Path, n_fractions: int, threads: int, warm_settings: list[int]) -> dict:
    """Fraction 1 cold; then per fraction the cold run and, for each warm setting, its warm run."""
    cold = {1: register(course, 1, work / "cold" / "fx1", threads, [])}
    warm = {iterations: {} for iterations in warm_settings}
    for fraction in range(2, n_fractions + 1):
        cold[fraction] = register(course, fraction, work / "cold" / f"fx{fraction}", threads, [])
        for iterations, runs in warm.items():
            previous = runs.get(fraction - 1, cold[1])["model"]
            runs[fraction] = register(course, fraction, work / f"warm{iterations}" / f"fx{fraction}", threads,
                                      ["--init-model", previous, "--warm-iterations", str(iterations)])
        print(f"fraction {fraction} done", file=sys.stderr, flush=True)
    return {"cold": cold, "warm": warm}


def table(cold: dict, warm: dict) -> str:
    """Markdown: per fraction the cold and warm seconds, their ratio, Dice, SDlogJ and % det J <= 0."""
    lines = ["| fraction | cold s | warm s | warm / cold | cold Dice | warm Dice | SDlogJ cold / warm "
             "| % det J <= 0 cold / warm |", "|---|---|---|---|---|---|---|---|"]
    for fraction, c in cold.items():
        w = warm.get(fraction)
        if w is None:
            lines.append(f"| {fraction} | {c['seconds']:.1f} | - | - | {c['dice']:.4f} | - | {c['sdlogj']:.3f} / - "
                         f"| {c['folding']:.3f} / - |")
            continue
        lines.append(f"| {fraction} | {c['seconds']:.1f} | {w['seconds']:.1f} | {w['seconds'] / c['seconds']:.2f} "
                     f"| {c['dice']:.4f} | {w['dice']:.4f} | {c['sdlogj']:.3f} / {w['sdlogj']:.3f} "
                     f"| {c['folding']:.3f} / {w['folding']:.3f} |")
    later = [f for f in warm if f in cold]
    ratio = np.mean([warm[f]["seconds"] / cold[f]["seconds"] for f in later])
    lines.append(f"| 2-{max(later)} mean | {np.mean([cold[f]['seconds'] for f in later]):.1f} "
                 f"| {np.mean([warm[f]['seconds'] for f in later]):.1f} | {ratio:.2f} "
                 f"| {np.mean([cold[f]['dice'] for f in later]):.4f} | {np.mean([warm[f]['dice'] for f in later]):.4f} "
                 "| | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 112, 48), help="CT and CBCT grid")
    parser.add_argument("--fractions", type=int, default=5, help="fractions of the course (at least 2)")
    parser.add_argument("--seed", type=int, default=0, help="the phantom patient")
    parser.add_argument("--threads", type=int, default=2, help="--num-threads of every command")
    parser.add_argument("--warm-iterations", type=int, nargs="+",
                        default=[engine.RegistrationConfig().warm_iterations],
                        help="warm-start iterations: one course per value (default: the engine's)")
    parser.add_argument("--out", type=Path, help="write the tables (Markdown) and a JSON copy of the figures here")
    args = parser.parse_args(argv)
    if args.fractions < 2:
        parser.error("a course to warm-start needs at least 2 fractions")
    with tempfile.TemporaryDirectory(prefix="inrlddmm-course-") as scratch:
        scratch = Path(scratch)
        course = write_course(scratch / "course", args.shape, args.fractions, args.seed)
        results = run_course(course, scratch / "runs", args.fractions, args.threads, args.warm_iterations)
    header = (f"nipype_inrlddmm {__version__}, phantom course {' x '.join(map(str, args.shape))}, seed {args.seed}, "
              f"{args.threads} threads")
    text = "\n\n".join([header] + [f"warm start: {iterations} fine iterations\n\n{table(results['cold'], runs)}"
                                   for iterations, runs in results["warm"].items()])
    print(text)
    if args.out:
        for path, content in ((args.out, text + "\n"), (args.out.with_suffix(".json"), json.dumps(results, indent=2))):
            with io.atomic_path(path) as temporary:
                temporary.write_text(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
