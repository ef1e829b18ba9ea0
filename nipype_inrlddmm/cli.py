"""The ``inrlddmm`` command line.

``inrlddmm register``  one pair, all stages, Dice when labels are given.
``inrlddmm demo``      the phantom CT -> CBCT cohort, registered and scored.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__, io
from .api import register
from .evaluate import evaluate_files

#: CLI flag -> registration option, for the hyper-parameters users tune most.
_OPTIONS = {
    "n_steps": (int, "Euler steps of the flow over t in [0, 1]"),
    "width": (int, "hidden units per layer of the velocity MLP"),
    "depth": (int, "hidden layers of the velocity MLP (the paper uses 3)"),
    "encoding": (str, "input encoding: fourier, siren or none"),
    "similarity": (str, "image similarity: lncc (CT->CBCT, MR), ncc or mse"),
    "reg_weight": (float, "weight of the velocity penalty (1/n) sum ||v_i||^2 (mm^-2)"),
    "coarse_factor": (int, "block size of the coarse stage's downsampling"),
    "coarse_iterations": (int, "iterations of the coarse stage"),
    "distill_iterations": (int, "iterations of the distillation stage"),
    "fine_iterations": (int, "iterations of the fine stage"),
    "seed": (int, "random seed (same seed and threads give the same field)"),
}


def _add_registration_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("registration (defaults: the package's tuned defaults)")
    for name, (kind, help_text) in _OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto uses CUDA when present (default: auto)")
    group.add_argument("--num-threads", type=int, default=None,
                       help="torch CPU threads (default: torch's own choice)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _registration_options(args) -> dict:
    return {name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None}


def register_files(
    moving, fixed, out_dir, *, moving_labels=None, fixed_labels=None, fixed_mask=None, label_names=None,
    device="auto", num_threads=None, progress=True, **options,
) -> dict:
    """Register two NIfTI files and write every output into ``out_dir``.

    Writes ``warped.nii.gz``, ``displacement.nii.gz`` (ITK/ANTs),
    ``model.pt``, ``log.csv`` and, with both label maps,
    ``warped_labels.nii.gz``, ``dice.csv`` and ``dice.json``.  All inputs are
    validated before any optimisation starts.  Returns the written paths.
    """
    out_dir = Path(out_dir)
    moving_data, moving_affine = io.load_image(moving)
    fixed_data, fixed_affine = io.load_image(fixed)
    if moving_labels:
        io.load_labels(moving_labels, reference=(moving, moving_data, moving_affine))
    if fixed_labels:
        io.load_labels(fixed_labels, reference=(fixed, fixed_data, fixed_affine))
    mask = None
    if fixed_mask:
        mask_data, _ = io.load_volume(fixed_mask, what="mask")
        if mask_data.shape != fixed_data.shape:
            raise io.InputError(fixed_mask, f"mask shape {mask_data.shape} differs from the fixed image")
        mask = (mask_data, fixed_affine)

    result = register((moving_data, moving_affine), (fixed_data, fixed_affine), fixed_mask=mask,
                      device=device, num_threads=num_threads, progress=progress, **options)
    outputs = {
        "warped": io.save_image(out_dir / "warped.nii.gz", result.warped, fixed_affine),
        "displacement": io.save_displacement(out_dir / "displacement.nii.gz", result.displacement, fixed_affine),
        "model": io.save_checkpoint(out_dir / "model.pt", result.model, shape=fixed_data.shape, affine=fixed_affine),
        "log": io.write_csv(out_dir / "log.csv", result.log),
    }
    if moving_labels and fixed_labels:
        labels, _ = io.load_labels(moving_labels)
        warped_labels = result.apply((labels, moving_affine), interpolation="label").astype(np.int32)
        outputs["warped_labels"] = io.save_image(out_dir / "warped_labels.nii.gz", warped_labels, fixed_affine)
        rows, summary = evaluate_files(
            outputs["warped_labels"], fixed_labels, out_dir / "dice.csv", out_dir / "dice.json",
            label_names=label_names, displacement=outputs["displacement"], mask=fixed_mask,
        )
        outputs.update(dice=out_dir / "dice.csv", rows=rows, summary=summary)
    return outputs


def _print_dice(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'label':>6}  {'name':<28} {'Dice':>6} {'HD95 mm':>8}")
    for row in rows:
        print(f"{row['label']:>6}  {row['name'][:28]:<28} {row['dice']:>6.3f} {row['hd95_mm']:>8.2f}")


def _cmd_register(args) -> int:
    outputs = register_files(
        args.moving, args.fixed, args.out_dir, moving_labels=args.moving_labels,
        fixed_labels=args.fixed_labels, fixed_mask=args.fixed_mask, label_names=args.label_names,
        device=args.device, num_threads=args.num_threads, progress=not args.quiet,
        **_registration_options(args),
    )
    if "rows" in outputs:
        _print_dice(outputs["rows"], f"Dice in {outputs['dice']}")
    print(f"outputs in {args.out_dir}")
    return 0


def _cmd_demo(args) -> int:
    from .phantom import write_cohort

    out_dir = Path(args.out_dir)
    manifest = write_cohort(out_dir / "data", args.patients, shape=tuple(args.shape))
    table = []
    for row in io.read_manifest(manifest):
        start = time.perf_counter()
        outputs = register_files(
            row["moving"], row["fixed"], out_dir / row["patient"], moving_labels=row["moving_labels"],
            fixed_labels=row["fixed_labels"], fixed_mask=row["fixed_mask"],
            label_names=manifest.parent / "labels.tsv", device=args.device, num_threads=args.num_threads,
            progress=not args.quiet, **_registration_options(args),
        )
        seconds = time.perf_counter() - start
        table.append({"patient": row["patient"], **{r["name"]: round(r["dice"], 4) for r in outputs["rows"]},
                      "mean_dice": round(outputs["summary"]["mean_dice"], 4),
                      "jacobian_nonpositive_percent": outputs["summary"]["jacobian_nonpositive_percent"],
                      "seconds": round(seconds, 1)})
        print(f"{row['patient']}: mean Dice {outputs['summary']['mean_dice']:.3f} in {seconds:.0f} s", flush=True)
    io.write_csv(out_dir / "study_dice.csv", table)
    columns = list(table[0])
    print("\nDice per patient and label (inside the CBCT field of view); " f"written to {out_dir / 'study_dice.csv'}")
    print("  ".join(f"{c[:12]:>12}" for c in columns))
    for row in table:
        print("  ".join(f"{row[c]:>12}" if isinstance(row[c], str) else f"{row[c]:>12.3f}" for c in columns))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inrlddmm",
        description="INR-LDDMM deformable registration (coarse INR -> distillation -> fine INR). "
        "Fields are written as ITK/ANTs displacement fields (LPS mm) that antsApplyTransforms reads.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    reg = commands.add_parser("register", help="register one moving image onto one fixed image",
                              description="Register MOVING onto FIXED and write warped image, field, model, "
                              "log and (with both label maps) Dice into --out-dir.")
    reg.add_argument("--moving", required=True, help="moving image (NIfTI), e.g. the planning CT")
    reg.add_argument("--fixed", required=True, help="fixed image (NIfTI), e.g. the day's CBCT")
    reg.add_argument("--moving-labels", help="label map on the moving grid, carried to the fixed grid")
    reg.add_argument("--fixed-labels", help="label map on the fixed grid, for Dice")
    reg.add_argument("--fixed-mask", help="mask on the fixed grid: where to sample and evaluate (e.g. CBCT FOV)")
    reg.add_argument("--label-names", help="JSON {id: name} or TSV with index/name columns")
    reg.add_argument("--out-dir", required=True, help="output folder (created)")
    _add_registration_options(reg)
    reg.set_defaults(func=_cmd_register)

    demo = commands.add_parser("demo", help="register the embedded phantom CT -> CBCT cohort and print Dice",
                               description="Generate a phantom chest CT/CBCT cohort, register every patient "
                               "and print the Dice table.")
    demo.add_argument("--out-dir", default="inrlddmm-demo", help="output folder (default: ./inrlddmm-demo)")
    demo.add_argument("--patients", type=int, default=3, help="patients in the cohort (default: 3)")
    demo.add_argument("--shape", type=int, nargs=3, default=(128, 112, 48), metavar=("X", "Y", "Z"),
                      help="phantom grid (default: 128 112 48)")
    _add_registration_options(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except io.InputError as error:
        print(f"inrlddmm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
