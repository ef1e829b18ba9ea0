"""Ours on a GPU against FireANTs on the same GPU, end to end, one report.

    python benchmarks/gpu.py [--sets brain-pair brain lung-ct] [--seeds 0 1 2] [--device cuda]
                             [--threads N] [--fast] [--out gpu.md]

Each method runs as its own process, timed from its start to its exit, the
way a user runs it, on the files :func:`end_to_end.user_inputs` writes (the
CTs clipped at -1024 HU, the head as the fixed mask of the brains):

* ours: ``inrlddmm register --device DEVICE --seed SEED`` with both label
  maps and every output (warped image, field, model, log, warped labels,
  dice.csv, qc.png), ``--affine affine`` where the set needs it and
  ``--timings`` for the seconds of each phase.  It runs through
  ``gpu.py --ours-worker``, which calls the command's own entry point
  (:func:`nipype_inrlddmm.cli.run`) and only adds, at exit, the peak GPU
  memory of the process (``torch.cuda.max_memory_allocated``);
* FireANTs (the ``benchmarks`` extra): where the set is not aligned
  (brain -> MNI152, lung-ct), ``MomentsRegistration(scale 1, moments 2)``
  then ``AffineRegistration`` (scales 8-4-2-1, iterations 200-100-50-20,
  cc, Adam, lr 3e-3, cc_kernel_size 5) from it; then
  ``GreedyRegistration`` (scales 4-2-1, iterations 200-100-50, cc,
  cc_kernel_size 5, Adam, lr 0.5, compositive, smooth_grad_sigma 1,
  smooth_warp_sigma 0.5) from that affine; then, as its users do, the
  moving image and the labels carried by its own ``evaluate`` (the labels
  one-hot, the evaluated ones only, as its scripts' ``seg_preprocessor``
  does, then the arg-max) and its transform written with
  ``save_as_ants_transforms`` (an ANTs displacement field holding the
  affine too).  FireANTs gets no mask (its examples use none).

Afterwards, outside the timing, both are scored by the same code from the
files they wrote: mean Dice of the warped label map over the set's labels
(:func:`end_to_end.score`), det J of the written displacement field
(:func:`~nipype_inrlddmm.evaluation.metrics.jacobian_determinant`: the share
of voxels with det J <= 0 and SDlogJ; FireANTs' field holds its affine, which
multiplies det J by a constant and so changes neither figure), and on
lung-ct the landmarks' TRE through each field
(:func:`~nipype_inrlddmm.evaluation.metrics.landmark_errors`; ours with its
``affine.txt``, FireANTs' field holding its own).

Our three stages: each stage's seconds from ``log.csv`` (the last row's
``seconds``) and their float32 FLOP rate, estimated per stage as
``3 x mlp_flops x points x n_steps x iterations / seconds``: ``mlp_flops``
is one point's forward pass through the network's linear layers
(``speed.py``'s count, 2 FLOPs a multiply-add: ``2 (4 w + (depth - 1) w^2
+ 3 w)`` for the SIREN of width ``w``), ``3 x`` adds the backward pass's two
products per layer (input and weight gradients), ``points`` are the points
the stage integrates per iteration (:func:`stage_points`) and
``iterations`` the rows it logged.  Sines, sampling and the similarity are
not counted: the rate is a lower bound of the work done, set beside the
device's float32 matmul rate measured here (:func:`matmul_rate`, torch's
default precision, no TF32).

``--fast`` runs a few iterations of everything (a check of the script, not
a measurement).  FireANTs that does not run (not installed, or not on this
device) is reported as such in its row; ours runs anyway.  Writes the
Markdown report to ``--out`` and every figure as JSON beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cases import SETS, Case, cases
from end_to_end import Inputs, register_arguments, score, user_inputs, write_results
from speed import mlp_flops_per_point_step

from nipype_inrlddmm import __version__, engine, io
from nipype_inrlddmm.engine.grid import block_grid, spacing
from nipype_inrlddmm.evaluation import metrics

DEFAULT_SETS = ("brain-pair", "brain", "lung-ct")
STAGES = ("coarse", "distill", "fine")
#: ``--fast``: a few iterations of each stage, ours and FireANTs'.
FAST_OPTIONS = {"coarse_iterations": 3, "distill_iterations": 3, "fine_iterations": 3}
FIREANTS = {"affine_scales": [8, 4, 2, 1], "affine_iterations": [200, 100, 50, 20], "affine_lr": 3e-3,
            "scales": [4, 2, 1], "iterations": [200, 100, 50], "cc_kernel_size": 5, "lr": 0.5}
FIREANTS_FAST = dict(FIREANTS, affine_iterations=[2, 2, 2, 2], iterations=[2, 2, 2])
#: ``python -c OURS_WORKER MEMORY_FILE ARGS...``: ``inrlddmm ARGS...`` through the console script's own entry point,
#: which also writes the process's peak GPU memory (GiB; null where CUDA was never used) to MEMORY_FILE at exit.
OURS_WORKER = """
import atexit, json, sys
from nipype_inrlddmm import cli


def record(path):
    import torch
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None
    open(path, "w").write(json.dumps({"peak_gpu_gib": peak}))


atexit.register(record, sys.argv[1])
sys.argv = ["inrlddmm", *sys.argv[2:]]
cli.run()
"""
PHASES = ("read", "pre-align", "dense field and warp", "labels", "evaluation", "QC", "write")


def mlp_flops(model: engine.ModelConfig) -> float:
    """FLOPs of one network evaluation at one point: :func:`speed.mlp_flops_per_point_step` of this architecture."""
    return mlp_flops_per_point_step(engine.VelocityField(torch.zeros(3), torch.ones(3), model))


def stage_points(fixed_shape, fixed_affine: np.ndarray, config: engine.RegistrationConfig, *,
                 masked: bool) -> dict[str, int]:
    """Points each stage integrates per iteration on the fixed grid ``(shape, (4, 4) affine)``, as it draws them.

    The image stages: the flow lattice of every image and regularity patch
    on their block-averaged grid
    (:meth:`~nipype_inrlddmm.engine.StageConfig.flow_points`; regularity
    patches only with a fixed mask, ``masked``); the distillation: its
    random voxels of the fine stage's grid.
    """
    affine = torch.as_tensor(fixed_affine, dtype=torch.float32)
    grids = {stage: block_grid(fixed_shape, affine, engine.stage_factors(factor, affine, stage, fixed_shape))
             for stage, factor in (("coarse", config.coarse_factor), ("fine", config.fine_factor))}
    return {stage: (config.distill.points(grids["fine"][0]) if stage == "distill" else
                    getattr(config, stage).flow_points(grids[stage][0], spacing(grids[stage][1]).tolist(),
                                                       masked=masked))
            for stage in STAGES}


def stage_rates(log_rows: list[dict], points: dict[str, int], model: engine.ModelConfig) -> dict[str, dict]:
    """Per stage of a registration's log: seconds, iterations, FLOPs (the module's formula) and FLOP/s."""
    out = {}
    for stage in STAGES:
        rows = [row for row in log_rows if row["stage"] == stage]
        seconds = float(rows[-1]["seconds"]) if rows else 0.0
        flops = 3 * mlp_flops(model) * points[stage] * model.n_steps * len(rows)
        out[stage] = {"seconds": seconds, "iterations": len(rows), "flops": flops,
                      "flop_rate": flops / seconds if seconds > 0 else float("nan")}
    return out


def matmul_rate(device: str, n: int, repeats: int) -> float:
    """FLOP/s of an ``(n, n) @ (n, n)`` float32 product on ``device``, torch's default precision, best of
    ``repeats`` after one warm-up."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    best = math.inf
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()  # the timed processes share the GPU with this one
    return 2.0 * n ** 3 / best


def _options_flags(options: dict) -> list[str]:
    return [part for name, value in options.items() for part in ("--" + name.replace("_", "-"), str(value))]


def _run(command: list[str], env: dict) -> tuple[float, str | None]:
    """Wall seconds of ``command`` from its start to its exit, and the end of its stderr if it failed."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, (done.stderr.strip()[-2000:] or f"exit status {done.returncode}") if done.returncode else None


def _peak_memory(path: Path) -> float | None:
    """The peak GPU memory (GiB) a worker recorded at its exit; None on a CPU run."""
    return json.loads(path.read_text())["peak_gpu_gib"]


def run_ours(case: Case, inputs: Inputs, out: Path, *, device: str, seed: int, options: dict, threads, env) -> dict:
    """``inrlddmm register`` (through :data:`OURS_WORKER`) into ``out``: wall seconds, phases, log, peak memory."""
    command = [sys.executable, "-c", OURS_WORKER, str(out / "memory.json"), *register_arguments(case, inputs, out),
               "--device", device, "--seed", str(seed), *_options_flags(options)]
    command += ["--num-threads", str(threads)] if threads else []
    seconds, error = _run(command, env)
    if error:
        raise RuntimeError(f"inrlddmm register failed on {case.name}:\n{error}")
    with open(out / "log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    return {"wall": seconds, "timings": json.loads((out / "timings.json").read_text()), "log": log,
            "peak_gpu_gib": _peak_memory(out / "memory.json"), "labels": out / "warped_labels.nii.gz",
            "field": out / "displacement.nii.gz", "pre_affine": out / "affine.txt" if case.affine else None}


def run_fireants(case: Case, inputs: Inputs, out: Path, *, device: str, seed: int, fast: bool, env) -> dict:
    """FireANTs (``fireants_run.py``) into ``out``: wall seconds and its files, or ``{"error": why}``."""
    settings = FIREANTS_FAST if fast else FIREANTS
    labels = ",".join(str(label) for label in sorted(case.labels))
    command = [sys.executable, str(Path(__file__).with_name("fireants_run.py")), json.dumps(
        {"moving": str(inputs.moving), "fixed": str(inputs.fixed), "moving_labels": str(case.moving_labels),
         "labels": labels, "affine": bool(case.affine), "out": str(out), "device": device, "seed": seed,
         "settings": settings})]
    seconds, error = _run(command, env)
    if error:
        return {"error": error.splitlines()[-1]}
    return {"wall": seconds, "peak_gpu_gib": _peak_memory(out / "memory.json"), "labels": out / "warped_labels.nii.gz",
            "field": out / "displacement.nii.gz", "pre_affine": None}


def evaluate(case: Case, run: dict) -> dict:
    """The same scores for either method from the files it wrote: Dice, det J, TRE (lung-ct), peak memory."""
    field, affine = io.load_displacement(run["field"])
    result = score(case, dict(run, jacobian=metrics.jacobian_determinant(field, affine)))
    result["peak_gpu_gib"] = run["peak_gpu_gib"]
    if case.landmarks:
        fixed_points, moving_points = (io.load_landmarks(path) for path in case.landmarks)
        pre_affine = io.load_itk_affine(run["pre_affine"]) if run["pre_affine"] else None
        result["tre_mm"] = float(metrics.landmark_errors(fixed_points, moving_points, field, affine, pre_affine).mean())
    return result


def _pair(ours, theirs, form: str) -> str:
    def text(value):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, form)
    return f"{text(ours)} / {text(theirs)}"


def tables(results: list[dict], matmul: float) -> str:
    """The Markdown report: one row per set and seed (then each set's mean), and our stages' split."""
    head = ["set", "seed", "ours: wall (s)", "FireANTs: wall (s)", "ours / FireANTs", "Dice ours / FireANTs",
            "TRE mm ours / FireANTs", "% det J <= 0 ours / FireANTs", "SDlogJ ours / FireANTs",
            "peak GPU GiB ours / FireANTs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["set"], []).append(r)
    for name, rows in groups.items():
        for r in rows + ([_mean(rows)] if len(rows) > 1 else []):
            ours, theirs = r["ours"], r["fireants"]
            ran = "error" not in theirs
            lines.append("| " + " | ".join([
                name, str(r["seed"]), f"{ours['wall']:.1f}",
                f"{theirs['wall']:.1f}" if ran else f"not run: {theirs['error'][:160].replace('|', '/')}",
                f"{ours['wall'] / theirs['wall']:.2f}" if ran else "-",
                _pair(ours["mean_dice"], theirs.get("mean_dice"), ".3f"),
                _pair(ours.get("tre_mm"), theirs.get("tre_mm"), ".2f"),
                _pair(ours["jacobian_nonpositive_percent"], theirs.get("jacobian_nonpositive_percent"), ".4f"),
                _pair(ours["sdlogj"], theirs.get("sdlogj"), ".3f"),
                _pair(ours["peak_gpu_gib"], theirs.get("peak_gpu_gib"), ".2f")]) + " |")
    head = ["set", "seed", *(f"{stage} (s)" for stage in STAGES), "stages TFLOP/s", "% of matmul",
            *(f"{phase} (s)" for phase in PHASES), "start-up and other (s)"]
    lines += ["", f"Ours, where the wall time goes; the stages' float32 rate against a measured {matmul / 1e12:.2f} "
              "TFLOP/s float32 matmul on this device (formula in benchmarks/gpu.py):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        stages, timings, wall = r["ours"]["stages"], r["ours"]["timings"], r["ours"]["wall"]
        seconds = sum(stages[s]["seconds"] for s in STAGES)
        rate = sum(stages[s]["flops"] for s in STAGES) / seconds if seconds > 0 else float("nan")
        phases = [timings.get(phase, 0.0) for phase in PHASES]
        lines.append("| " + " | ".join([
            r["set"], str(r["seed"]), *(f"{stages[s]['seconds']:.2f}" for s in STAGES), f"{rate / 1e12:.3f}",
            f"{100 * rate / matmul:.1f}", *(f"{p:.2f}" for p in phases),
            f"{wall - timings.get('stages', 0.0) - sum(phases):.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def _mean(rows: list[dict]) -> dict:
    """The mean over seeds of each figure in both methods' results (FireANTs' failures stay failures)."""
    def average(key, method):
        values = [r[method][key] for r in rows if r[method].get(key) is not None]
        return float(np.mean(values)) if values else None
    keys = ("wall", "mean_dice", "tre_mm", "jacobian_nonpositive_percent", "sdlogj", "peak_gpu_gib")
    theirs = rows[0]["fireants"] if "error" in rows[0]["fireants"] else {k: average(k, "fireants") for k in keys}
    return {"set": rows[0]["set"], "seed": "mean", "ours": {k: average(k, "ours") for k in keys}, "fireants": theirs}


def run_case(case: Case, inputs: Inputs, scratch: Path, *, device: str, seed: int, fast: bool, threads, env) -> dict:
    """Both methods on one set (its files as :func:`end_to_end.user_inputs` wrote them) with one seed, each into
    its own folder under ``scratch``, then scored."""
    options = FAST_OPTIONS if fast else {}
    folders = {method: scratch / case.name / f"seed{seed}" / method for method in ("ours", "fireants")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    ours = run_ours(case, inputs, folders["ours"], device=device, seed=seed, options=options, threads=threads,
                    env=env)
    theirs = run_fireants(case, inputs, folders["fireants"], device=device, seed=seed, fast=fast, env=env)
    config = engine.config_from_options(**options)
    header, fixed_shape = io.open_volume(inputs.fixed, "fixed image")
    sized = engine.sized_config(config, fixed_shape, torch.as_tensor(header.affine, dtype=torch.float32))
    points = stage_points(fixed_shape, np.asarray(header.affine, np.float64), config,
                          masked=inputs.fixed_mask is not None)
    scored_ours = dict(evaluate(case, ours), wall=ours["wall"], timings=ours["timings"],
                       stages=stage_rates(ours["log"], points, sized.model), points=points)
    scored_theirs = theirs if "error" in theirs else dict(evaluate(case, theirs), wall=theirs["wall"])
    return {"set": case.name, "seed": seed, "ours": scored_ours, "fireants": scored_theirs}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="*", default=list(DEFAULT_SETS), choices=SETS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--threads", type=int, help="torch CPU threads of ours (default: torch's own choice)")
    parser.add_argument("--fast", action="store_true", help="a few iterations of everything: a check, not a figure")
    parser.add_argument("--out", type=Path, help="write the Markdown report here (and a .json beside it)")
    args = parser.parse_args(argv)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    # Measured first: it also reads torch's CUDA libraries into the page cache, so that the first timed process
    # does not pay their reading from disk where the others do not.
    matmul = matmul_rate(args.device, 8192 if args.device == "cuda" else 256, 5 if args.device == "cuda" else 1)
    header = (f"# inrlddmm register {__version__} against FireANTs on {name} ({args.device}), torch {torch.__version__}"
              f"{', --fast: not a measurement' if args.fast else ''}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(header, flush=True)
    results, report = [], header
    with tempfile.TemporaryDirectory() as scratch:
        for case in cases(args.sets, Path(scratch)):
            inputs = user_inputs(case, Path(scratch))
            for seed in args.seeds:
                results.append(run_case(case, inputs, Path(scratch), device=args.device, seed=seed, fast=args.fast,
                                        threads=args.threads, env=env))
                print(f"<!-- {json.dumps(results[-1])} -->", flush=True)
                report = header + "\n" + tables(results, matmul)
                if args.out:  # after every run: a run cut short by its time limit still brings back the rest
                    write_results(args.out, report, {"matmul_flop_rate": matmul, "runs": results})
    print(report)
    return report


if __name__ == "__main__":
    main()
