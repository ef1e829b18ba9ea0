"""MR -> transrectal ultrasound on the 8 prostate cases: the grid-centre start, ours and ANTs SyN from it.

    python benchmarks/prostate_mr_us.py [--seeds 0 1 2] [--inr-options JSON [JSON ...]] [--syn]
                                        [--threads 2] [--out prostate.md]

Reads ``$INRLDDMM_DATA/prostate-mr-us`` (default ``../shared/data``; never
copied).  Each case's MR is moved onto its ultrasound from the start the
study script uses (``workflows/prostate_mr_us_study.py``: grid centres
aligned, the headers' shared origin being meaningless), and the gland
(label channel 0) is scored by Dice on the ultrasound grid:

* ``centre``: the gland through that translation alone;
* ours: the study script's ``SETTINGS`` (each ``--inr-options`` setting
  changes them), once per seed, with SDlogJ and the share of folded voxels
  of the field;
* ``--syn``: antspyx's ``registration(type_of_transform="SyN")`` (its
  affine stage, then SyN, with mutual information) from the same start: the
  MR's header is shifted by the translation, and ANTs starts from the
  identity.

Prints, per setting, a table per case (its seeds' mean for ours) and the
goal's two figures: the mean Dice and the cases that end below their
centre-aligned Dice.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from nipype_inrlddmm import __version__, engine, io
from nipype_inrlddmm.evaluation import metrics
from nipype_inrlddmm.engine.affine import start_transform

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("INRLDDMM_DATA", REPO.parent / "shared" / "data")) / "prostate-mr-us"


def _study_settings() -> dict:
    """The registration options of the study script, so that the benchmark measures what users run."""
    path = REPO / "workflows" / "prostate_mr_us_study.py"
    spec = importlib.util.spec_from_file_location("prostate_mr_us_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.SETTINGS)


def _gland(path: Path) -> np.ndarray:
    data = np.asarray(nib.load(str(path)).dataobj)
    return (data[..., 0] if data.ndim == 4 else data) > 0.5


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, np.float32))


class Case:
    """One MR -> ultrasound pair, with the MR's affine moved to the grid-centre start."""

    def __init__(self, mr: Path):
        self.name = mr.name[: -len(".nii.gz")]
        self.us_path = DATA / "us_images" / mr.name
        self.mr, self.us = nib.load(str(mr)), nib.load(str(self.us_path))
        self.mr_gland, self.us_gland = _gland(DATA / "mr_labels" / mr.name), _gland(DATA / "us_labels" / mr.name)
        self.moving = engine.normalise_intensity(_tensor(self.mr.get_fdata()))
        self.fixed = engine.normalise_intensity(_tensor(self.us.get_fdata()))
        self.fixed_affine = torch.from_numpy(self.us.affine).float()
        start = start_transform(self.moving, torch.from_numpy(self.mr.affine).float(), self.fixed,
                                self.fixed_affine, "geometry").double().numpy()
        self.moving_affine = np.linalg.inv(start) @ self.mr.affine  # the MR's header, shifted

    def gland_dice(self, displacement: np.ndarray) -> float:
        warped = engine.warp(_tensor(self.mr_gland), torch.from_numpy(self.moving_affine).float(),
                             _tensor(displacement), self.fixed_affine, interpolation="label").numpy() > 0
        return metrics.mask_dice(warped, self.us_gland)


def run_ours(case: Case, options: dict) -> dict:
    config = engine.config_from_options(**options)
    start = time.perf_counter()
    result = engine.register_volumes(case.moving, torch.from_numpy(case.moving_affine).float(), case.fixed,
                                     case.fixed_affine, config)
    seconds = time.perf_counter() - start
    displacement = result.displacement.numpy()
    return {"dice": case.gland_dice(displacement), "seconds": seconds,
            **metrics.jacobian_summary(displacement, case.us.affine)}


def run_syn(case: Case, scratch: Path) -> dict:
    import ants

    shifted = scratch / f"{case.name}_mr.nii.gz"
    nib.save(nib.Nifti1Image(case.mr.get_fdata(dtype=np.float32), case.moving_affine), str(shifted))
    labels = scratch / f"{case.name}_mr_gland.nii.gz"
    nib.save(nib.Nifti1Image(case.mr_gland.astype(np.uint8), case.moving_affine), str(labels))
    fixed = ants.image_read(str(case.us_path))
    start = time.perf_counter()
    out = ants.registration(fixed, ants.image_read(str(shifted)), "SyN", initial_transform="Identity")
    seconds = time.perf_counter() - start
    warped = ants.apply_transforms(fixed, ants.image_read(str(labels)), out["fwdtransforms"],
                                   interpolator="genericLabel").numpy() > 0.5
    determinant = ants.create_jacobian_determinant_image(fixed, out["fwdtransforms"][0]).numpy()
    return {"dice": metrics.mask_dice(warped, case.us_gland), "seconds": seconds,
            **metrics.determinant_summary(determinant)}


def table(cases: list[Case], centre: dict, ours: dict, syn: dict | None) -> str:
    head = ["case", "centre", "ours", "ours SDlogJ", "ours % det J <= 0"] + (["SyN", "SyN SDlogJ"] if syn else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        runs = ours[case.name]
        cells = [case.name, f"{centre[case.name]:.3f}", f"{np.mean([r['dice'] for r in runs]):.3f}",
                 f"{np.mean([r['sdlogj'] for r in runs]):.3f}",
                 f"{max(r['jacobian_nonpositive_percent'] for r in runs):.4f}"]
        if syn:
            cells += [f"{syn[case.name]['dice']:.3f}", f"{syn[case.name]['sdlogj']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    mean_ours = np.mean([np.mean([r["dice"] for r in ours[c.name]]) for c in cases])
    below = [f"{c.name} (seed {r['seed']})" for c in cases for r in ours[c.name] if r["dice"] < centre[c.name]]
    lines += ["", f"mean gland Dice: centre {np.mean(list(centre.values())):.3f}, ours {mean_ours:.3f}"
              + (f", SyN {np.mean([s['dice'] for s in syn.values()]):.3f}" if syn else "")
              + f"; below the centre start: {', '.join(below) or 'none'}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--inr-options", type=json.loads, nargs="+", default=[{}],
                        help="registration options that change the study script's, as JSON; several run one "
                        "after the other")
    parser.add_argument("--syn", action="store_true", help="also run ANTs SyN from the same start")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the tables here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    if not (DATA / "mr_images").is_dir():
        sys.exit(f"prostate data not found at {DATA} (set INRLDDMM_DATA)")

    cases = [Case(mr) for mr in sorted((DATA / "mr_images").glob("case*.nii.gz"))]
    centre = {c.name: c.gland_dice(np.zeros(c.us_gland.shape + (3,), np.float32)) for c in cases}
    syn = None
    if args.syn:
        with tempfile.TemporaryDirectory() as scratch:
            syn = {c.name: run_syn(c, Path(scratch)) for c in cases}
    study = _study_settings()
    report = [f"# MR -> ultrasound, {len(cases)} prostate cases: INR-LDDMM {__version__}, {args.threads} threads, "
              f"seeds {' '.join(map(str, args.seeds))}, {time.strftime('%Y-%m-%d %H:%M')}\n"]
    for setting in args.inr_options:
        options = {**study, **setting}
        ours = {c.name: [dict(run_ours(c, {**options, "seed": seed}), seed=seed) for seed in args.seeds]
                for c in cases}
        report.append(f"## {json.dumps(options)}\n\n" + table(cases, centre, ours, syn))
        print(report[-1], flush=True)
    if args.out:
        # Atomically: an interrupted run leaves the previous tables, never a truncated file.
        with io.atomic_path(args.out) as temporary:
            Path(temporary).write_text("\n".join(report))


if __name__ == "__main__":
    main()
