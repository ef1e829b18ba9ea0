"""Compare input encodings of the velocity MLP: phantom CT -> CBCT and the real brain pair.

    python benchmarks/encodings.py [--patients 0 1] [--threads 2] [--variants ...]

Each variant runs the full coarse -> distill -> fine registration with the
package defaults except the named options.  Phantom rows: mean end-point
error inside the body (voxels) after the coarse and the fine stage, Dice
per label inside the CBCT field of view.  Brain-pair row ($INRLDDMM_DATA/
brain-pair, subject A -> B at 2 mm): mean Dice over its 30 labels.  Both
with % det J <= 0 and wall time, as a Markdown table.
"""

import argparse
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from nipype_inrlddmm import engine, io, register
from nipype_inrlddmm.evaluation import metrics
from nipype_inrlddmm.phantom import LABELS, make_pair

VARIANTS = {
    "siren omega0=30": {"encoding": "siren", "omega0": 30.0},
    "fourier sigma=1": {"encoding": "fourier", "sigma": 1.0},
    "fourier sigma=2": {"encoding": "fourier", "sigma": 2.0},
    "none (raw x,y,z,t)": {"encoding": "none"},
}


def run(options: dict, patient: int) -> dict:
    pair = make_pair((128, 112, 48), seed=patient)
    affine = torch.tensor(pair.affine, dtype=torch.float32)
    config = engine.config_from_options(**options)
    start = time.perf_counter()
    result = engine.register_volumes(torch.tensor(pair.ct), affine, torch.tensor(pair.cbct), affine, config,
                                     fixed_mask=torch.tensor(pair.cbct_fov))
    seconds = time.perf_counter() - start
    body = pair.cbct_labels > 0
    spacing = np.linalg.norm(pair.affine[:3, :3], axis=0)

    def epe(field):
        return float(np.linalg.norm((np.asarray(field) - pair.displacement) / spacing, axis=-1)[body].mean())

    grid = engine.world_grid(pair.ct.shape, affine)
    coarse = engine.resample_field(result.coarse.displacement, result.coarse.affine, grid)
    warped = engine.warp(torch.tensor(pair.ct_labels), affine, result.displacement, affine,
                         interpolation="nearest").numpy()
    dice = {LABELS[r["label"]]: r["dice"] for r in
            metrics.label_overlap(warped, pair.cbct_labels, pair.affine, LABELS, mask=pair.cbct_fov)}
    return {
        "epe_coarse": epe(coarse), "epe_fine": epe(result.displacement), "dice": dice,
        "folding": metrics.jacobian_summary(result.displacement.numpy(), pair.affine)["jacobian_nonpositive_percent"],
        "seconds": seconds,
    }


def run_brain_pair(options: dict, folder: Path) -> dict:
    """Subject A -> B of brain-pair, smoothed and subsampled to 2 mm, mean Dice over labels.tsv."""

    def load(name, labels=False):
        image = nib.load(str(folder / name))
        data = np.asarray(image.dataobj, np.float32)
        data = data if labels else ndimage.gaussian_filter(data, 0.8)
        return data[::2, ::2, ::2], image.affine @ np.diag([2.0, 2.0, 2.0, 1.0])

    (moving, affine), (moving_labels, _) = load("subjectA_T1w.nii.gz"), load("subjectA_aseg.nii.gz", True)
    (fixed, _), (fixed_labels, _) = load("subjectB_T1w.nii.gz"), load("subjectB_aseg.nii.gz", True)
    labels = sorted(io.load_label_names(folder / "labels.tsv"))

    def mean_dice(warped):
        return float(np.mean([r["dice"] for r in metrics.label_overlap(warped, fixed_labels, affine, labels)]))

    start = time.perf_counter()
    result = register((moving, affine), (fixed, affine), fixed_mask=(fixed > 0.05, affine), **options)
    seconds = time.perf_counter() - start
    warped = result.apply((moving_labels, affine), interpolation="nearest")
    return {
        "unregistered": mean_dice(moving_labels), "mean_dice": mean_dice(warped), "seconds": seconds,
        "folding": metrics.jacobian_summary(result.displacement, affine)["jacobian_nonpositive_percent"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    brain = Path(os.environ.get("INRLDDMM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    print("| encoding | data | EPE coarse (vox) | EPE final (vox) | mean Dice | min Dice | % detJ<=0 | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.variants:
        if (brain / "brain-pair").is_dir():
            r = run_brain_pair(VARIANTS[name], brain / "brain-pair")
            print(f"| {name} | brain-pair (unregistered {r['unregistered']:.3f}) | - | - | {r['mean_dice']:.3f} | - | "
                  f"{r['folding']:.4f} | {r['seconds']:.0f} |", flush=True)
        for patient in args.patients:
            r = run(VARIANTS[name], patient)
            dice = list(r["dice"].values())
            print(f"| {name} | phantom {patient} | {r['epe_coarse']:.3f} | {r['epe_fine']:.3f} | {np.mean(dice):.3f} | "
                  f"{min(dice):.3f} | {r['folding']:.3f} | {r['seconds']:.0f} |", flush=True)
            print("<!-- " + json.dumps(r) + " -->", flush=True)


if __name__ == "__main__":
    main()
