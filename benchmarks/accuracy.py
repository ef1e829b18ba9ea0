"""INR-LDDMM against ANTs SyN, side by side in one process, on the real sample sets and a phantom.

    python benchmarks/accuracy.py [--sets brain brain-pair lung-ct phantom] [--threads 2]
                                  [--methods inr-lddmm ants-syn no-distill no-coarse paper-plain]
                                  [--seeds 0 1 2] [--inr-options JSON [JSON ...]] [--out accuracy.md]

Sets (read from $INRLDDMM_DATA, default ../shared/data; never copied):

* ``brain``: subject T1 -> MNI152 template, GM/WM tissue Dice;
* ``brain-pair``: subject A -> B, mean Dice over the 30 labels of labels.tsv;
* ``lung-ct``: follow-up -> baseline chest CT (HU clipped at -1024), lung
  Dice and the target registration error of 51 landmark pairs;
* ``phantom``: a CT -> CBCT pair from the package's cohort generator,
  Dice inside the CBCT field of view.

Methods: ``inr-lddmm`` is the package's pipeline with its defaults (affine
pre-alignment -> coarse -> distillation -> fine); ``ants-syn`` is antspyx's
``registration(type_of_transform="SyN")`` (affine + SyN, its defaults; the
``benchmarks`` extra), given on the brains the head mask in which ours
draws its patches, as ``antsRegistration -x``; the ablations change one thing of ``inr-lddmm``:
``no-distill`` (the fine stage starts from the coarse weights directly),
``no-coarse`` (the fine stage alone, from a fresh network, with the coarse
and distillation iterations added to it so the budget is the same) and
``paper-plain`` (the paper's stated settings: a three-layer ReLU MLP on raw
``(x, y, z, t)``, MSE similarity).

``--seeds 0 1 2`` runs ours (and each ablation) once per seed, a row each:
a seed fixes the result (patch draws and initial weights), and changing the
seed moves it as much as many of the settings on the decisions page did.
``--inr-options`` takes one or more settings (JSON registration options),
each run with every seed.  After each set's table comes its Dice vs SDlogJ
table: one row per method and setting, over its seeds, with the mean Dice
(and TRE), the mean and worst SDlogJ, the worst share of folded voxels and
the mean wall time, so accuracy is read beside regularity.

Every method gets the same torch and ITK thread count.  Wall time covers the
registration (pre-alignment, stages and the dense field), not the
evaluation.  Peak memory is the process's resident set, sampled every 20 ms
while the method runs.  Prints one Markdown table per set, and writes it
with a JSON copy of every figure to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cases import Case, cases

from nipype_inrlddmm import __version__, engine, io
from nipype_inrlddmm.evaluation import metrics
from nipype_inrlddmm.engine.affine import AffineConfig, checked_affine_register

METHODS = ("inr-lddmm", "ants-syn", "no-distill", "no-coarse", "paper-plain")
PAPER_PLAIN = {"encoding": "none", "activation": "relu", "similarity": "mse"}


class PeakMemory:
    """Peak resident memory (GiB) of this process while the ``with`` block runs."""

    def __enter__(self):
        self.peak, self._running = 0, True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self._running:
            with open("/proc/self/statm") as handle:
                self.peak = max(self.peak, int(handle.read().split()[1]) * page)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.gib = self.peak / 2**30


def _load(path, clip_min=None):
    data, affine = io.load_volume(path)
    data = data.astype(np.float32)
    return (np.maximum(data, clip_min) if clip_min is not None else data), affine


def _t(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def run_inr(case: Case, variant: str, options: dict) -> dict:
    """The package's registration, or one ablation of it; returns the field on the fixed grid and the pre-affine.

    ``inr-lddmm`` and ``paper-plain`` (the paper's plain network and loss) run
    :func:`nipype_inrlddmm.engine.register_volumes`, the registration ``register()`` and
    ``inrlddmm register`` run, timed without their file reading and writing (``end_to_end.py``
    times the command); the ablations leave out a stage, so they chain the engine's stages here.
    ``options`` (registration options, as :func:`nipype_inrlddmm.register` takes them) change the
    defaults of every variant, to try settings before making them the defaults.
    """
    moving, moving_affine = _load(case.moving, case.clip_min)
    fixed, fixed_affine = _load(case.fixed, case.clip_min)
    config = engine.config_from_options(**(PAPER_PLAIN if variant == "paper-plain" else {}), **options)
    moving_t, fixed_t = engine.normalise_intensity(_t(moving)), engine.normalise_intensity(_t(fixed))
    fixed_affine_t = _t(fixed_affine)
    mask = fixed_t > engine.FOREGROUND if case.head else None  # the head, by the window's anatomy rule
    pre, start = np.eye(4), time.perf_counter()
    if case.affine:
        # The command's checked pre-alignment: a degenerate estimate is replaced, and said so.
        pre, rejected = checked_affine_register(moving_t, torch.from_numpy(moving_affine), fixed_t,
                                                torch.from_numpy(fixed_affine), AffineConfig(transform=case.affine))
        pre = pre.numpy()
        for note in rejected:
            print(f"{case.name}: {note}", file=sys.stderr, flush=True)
    seconds, iterations = {"affine": time.perf_counter() - start}, {}
    moving_affine_t = _t(np.linalg.inv(pre) @ moving_affine)
    args = (moving_t, moving_affine_t, fixed_t, fixed_affine_t, config)
    start = time.perf_counter()
    if variant in ("inr-lddmm", "paper-plain"):
        result = engine.register_volumes(_t(moving), moving_affine_t, _t(fixed), fixed_affine_t, config,
                                         fixed_mask=mask)
        stages = {"coarse": result.coarse, "distill": result.distilled, "fine": result.fine}
        for name, stage in stages.items():
            seconds[name], iterations[name] = (stage.log[-1]["seconds"] if stage.log else 0.0), len(stage.log)
        seconds["dense field"] = time.perf_counter() - start - sum(seconds[name] for name in stages)
        displacement = result.displacement
    else:
        if variant == "no-distill":
            coarse = engine.coarse_stage(*args, fixed_mask=mask)
            seconds["coarse"], iterations["coarse"] = time.perf_counter() - start, len(coarse.log)
            initial = coarse.velocity
        elif variant == "no-coarse":
            budget = config.coarse.iterations + config.distill.iterations + config.fine.iterations
            config = engine.config_from_options(**dict(options, fine_iterations=budget))
            args = args[:4] + (config,)
            model = engine.sized_config(config, fixed.shape, fixed_affine_t).model
            initial = engine.new_velocity_field(fixed.shape, fixed_affine_t, model, config.seed,
                                                window=engine.velocity_window(config, mask, fixed_affine_t,
                                                                              moving_t, moving_affine_t))
        else:
            raise ValueError(variant)
        start = time.perf_counter()
        fine = engine.fine_stage(initial, *args, fixed_mask=mask)
        seconds["fine"], iterations["fine"] = (fine.log[-1]["seconds"] if fine.log else 0.0), len(fine.log)
        seconds["dense field"] = time.perf_counter() - start - seconds["fine"]
        displacement = fine.displacement
    return {"displacement": displacement.numpy(), "pre_affine": pre, "moving_affine": np.linalg.inv(pre) @
            moving_affine, "stage_seconds": seconds, "stage_iterations": iterations}


def evaluate_inr(case: Case, out: dict) -> dict:
    moving_labels, _ = io.load_labels(case.moving_labels)
    fixed_labels, fixed_affine = io.load_labels(case.fixed_labels)
    warped = engine.warp(_t(moving_labels), _t(out["moving_affine"]), _t(out["displacement"]), _t(fixed_affine),
                         interpolation="label").numpy().astype(np.int32)
    result = _overlap(case, warped, fixed_labels, fixed_affine)
    result.update(metrics.jacobian_summary(out["displacement"], fixed_affine))
    result["stage_seconds"] = {name: round(value, 1) for name, value in out["stage_seconds"].items()}
    result["stage_iterations"] = out["stage_iterations"]
    if case.landmarks:
        fixed_points, moving_points = (io.load_landmarks(p) for p in case.landmarks)
        result["tre_mm"] = float(metrics.landmark_errors(fixed_points, moving_points, out["displacement"],
                                                         fixed_affine, out["pre_affine"]).mean())
    return result


def _overlap(case: Case, warped, fixed_labels, fixed_affine) -> dict:
    mask = None if case.eval_mask is None else io.load_volume(case.eval_mask)[0] > 0
    rows = metrics.label_overlap(warped, fixed_labels, fixed_affine, sorted(case.labels), mask=mask)
    return {
        "dice": {case.labels[r["label"]]: r["dice"] for r in rows},
        "mean_dice": float(np.mean([r["dice"] for r in rows])),
        "mean_hd95_mm": float(np.nanmean([r["hd95_mm"] for r in rows])),
    }


def run_syn(case: Case) -> dict:
    import ants

    def read(path, clip=True):
        image = ants.image_read(str(path))
        if clip and case.clip_min is not None:
            image = image.new_image_like(np.maximum(image.numpy(), case.clip_min))
        return image

    moving, fixed = read(case.moving), read(case.fixed)
    mask = None
    if case.head:  # where ours samples its patches, the head, is SyN's fixed mask too (antsRegistration -x)
        head = engine.foreground(_t(fixed.numpy())).numpy()
        mask = fixed.new_image_like(head.astype(np.float32))
    return {"ants": ants, "fixed": fixed, "registration": ants.registration(fixed, moving, "SyN", mask=mask)}


def evaluate_syn(case: Case, out: dict) -> dict:
    ants, fixed, transforms = out["ants"], out["fixed"], out["registration"]["fwdtransforms"]
    moving_labels = ants.image_read(str(case.moving_labels))
    warped = ants.apply_transforms(fixed, moving_labels, transforms, interpolator="genericLabel")
    fixed_labels, fixed_affine = io.load_labels(case.fixed_labels)
    result = _overlap(case, np.rint(warped.numpy()).astype(np.int32), fixed_labels, fixed_affine)
    result.update(metrics.determinant_summary(ants.create_jacobian_determinant_image(fixed, transforms[0]).numpy()))
    if case.landmarks:
        import pandas as pd

        fixed_points, moving_points = (io.load_landmarks(p) for p in case.landmarks)
        lps = pd.DataFrame(fixed_points * [-1.0, -1.0, 1.0], columns=["x", "y", "z"])
        mapped = ants.apply_transforms_to_points(3, lps, transforms)[["x", "y", "z"]].to_numpy() * [-1.0, -1.0, 1.0]
        result["tre_mm"] = float(np.linalg.norm(mapped - moving_points, axis=1).mean())
    return result


def unregistered(case: Case) -> dict:
    """Labels resampled through the headers alone (identity in world space)."""
    moving_labels, moving_affine = io.load_labels(case.moving_labels)
    fixed_labels, fixed_affine = io.load_labels(case.fixed_labels)
    zero = np.zeros(fixed_labels.shape + (3,), np.float32)
    warped = engine.warp(_t(moving_labels), _t(moving_affine), _t(zero), _t(fixed_affine),
                         interpolation="label").numpy().astype(np.int32)
    result = _overlap(case, warped, fixed_labels, fixed_affine)
    if case.landmarks:
        fixed_points, moving_points = (io.load_landmarks(p) for p in case.landmarks)
        result["tre_mm"] = float(np.linalg.norm(fixed_points - moving_points, axis=1).mean())
    return result


def markdown(case: Case, rows: dict[str, dict]) -> str:
    label_names = list(case.labels.values())
    per_label = len(label_names) <= 6
    head = ["method", "mean Dice"] + ([f"Dice {n}" for n in label_names] if per_label else [])
    head += ["mean HD95 (mm)"] + (["TRE (mm)"] if case.landmarks else [])
    head += ["% det J <= 0", "SDlogJ", "wall (s)", "peak RSS (GiB)"]
    lines = [f"### {case.name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    for method, r in rows.items():
        cells = [method, number(r["mean_dice"])]
        cells += [number(r["dice"][n]) for n in label_names] if per_label else []
        cells += [number(r["mean_hd95_mm"], 2)] + ([number(r.get("tre_mm"), 2)] if case.landmarks else [])
        cells += [number(r.get("jacobian_nonpositive_percent"), 4), number(r.get("sdlogj")),
                  number(r.get("seconds"), 1), number(r.get("peak_gib"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _setting_name(setting: dict) -> str:
    return json.dumps(setting) if setting else "package defaults"


def front(case: Case, groups: dict[str, list[dict]]) -> str:
    """Accuracy against regularity, one row per method and setting over its seeds: the mean Dice (and TRE),
    the mean and worst SDlogJ, the worst share of folded voxels, the mean wall time."""
    head = ["method / setting", "runs", "mean Dice"] + (["TRE (mm)"] if case.landmarks else [])
    head += ["SDlogJ (mean)", "SDlogJ (worst)", "% det J <= 0 (worst)", "wall (s)"]
    lines = [f"#### {case.name}: Dice vs SDlogJ", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, results in groups.items():
        def mean(key):
            return float(np.mean([r[key] for r in results]))
        cells = [group, str(len(results)), f"{mean('mean_dice'):.4f}"]
        cells += [f"{mean('tre_mm'):.3f}"] if case.landmarks else []
        cells += [f"{mean('sdlogj'):.3f}", f"{max(r['sdlogj'] for r in results):.3f}",
                  f"{max(r['jacobian_nonpositive_percent'] for r in results):.4f}", f"{mean('seconds'):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["phantom", "lung-ct", "brain-pair", "brain"],
                        choices=["brain", "brain-pair", "lung-ct", "phantom"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the Markdown tables here (and a .json beside it)")
    parser.add_argument("--inr-options", type=json.loads, nargs="+", default=[{}],
                        help='registration options for inr-lddmm and its ablations, as JSON, e.g. '
                        '\'{"fine_iterations": 400}\' (default: the package defaults); several settings run '
                        'one after the other, and each set gets a Dice vs SDlogJ table over them')
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="run inr-lddmm and its ablations once per seed, one row each (default: the "
                        "seed of --inr-options, else 0); a seed fixes the result, and changing it moves the "
                        "result as much as many settings do")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)

    settings = args.inr_options
    seeds = args.seeds or [settings[0].get("seed", engine.RegistrationConfig().seed)]
    options = "; ".join(_setting_name(setting) for setting in settings)
    header = (f"# INR-LDDMM {__version__} vs ANTs SyN: {args.threads} threads, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}\n\ninr-lddmm options: {options}\n")
    print(header, flush=True)
    report, everything = [header], {}
    runs = [(method, None, None) if method == "ants-syn" else (method, setting, seed)
            for method in args.methods for setting in ([None] if method == "ants-syn" else settings)
            for seed in ([None] if method == "ants-syn" else seeds)]
    with tempfile.TemporaryDirectory() as scratch:
        for case in cases(args.sets, Path(scratch)):
            rows, groups = {"none (headers only)": unregistered(case)}, {}
            for method, setting, seed in runs:
                group = method if setting is None or len(settings) == 1 else f"{method} {_setting_name(setting)}"
                name = group if seed is None or len(seeds) == 1 else f"{group} (seed {seed})"
                with PeakMemory() as memory:
                    start = time.perf_counter()
                    if method == "ants-syn":
                        out = run_syn(case)
                    else:
                        out = run_inr(case, method, {**setting, "seed": seed})
                    seconds = time.perf_counter() - start
                result = evaluate_syn(case, out) if method == "ants-syn" else evaluate_inr(case, out)
                rows[name] = dict(result, seconds=seconds, peak_gib=memory.gib)
                groups.setdefault(group, []).append(rows[name])
                print(f"<!-- {case.name} {name}: {json.dumps(rows[name])} -->", flush=True)
            table = markdown(case, rows) + "\n" + front(case, groups)
            print(table, flush=True)
            report.append(table)
            everything[case.name] = rows
    if args.out:
        with io.atomic_path(args.out) as temporary:
            Path(temporary).write_text("\n".join(report))
        with io.atomic_path(args.out.with_suffix(".json")) as temporary:
            Path(temporary).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
