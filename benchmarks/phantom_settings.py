"""One registration of a phantom CT -> CBCT pair with given settings: stage times, Dice, field regularity.

    python benchmarks/phantom_settings.py [phantom|small-ct] ['{"fine_factor": 1}'] [--threads 2]

``phantom`` is ``make_pair((128, 112, 48), seed=1)``; ``small-ct`` the same
generator at 3 mm isotropic (128 x 112 x 96).  The optional JSON holds
registration options (as :func:`nipype_inrlddmm.register` takes them) on
top of the package defaults.  Prints each stage's iterations and seconds,
the total, the mean Dice of the six labels inside the CBCT's field of view,
and the Jacobian statistics; the figures of the decisions page's "work
sized to the grid" came from it.
"""

import argparse
import json
import time

import numpy as np
import torch

from nipype_inrlddmm import register
from nipype_inrlddmm.evaluation import metrics
from nipype_inrlddmm.phantom import make_pair

PAIRS = {"phantom": ((128, 112, 48), (360.0, 300.0, 240.0)), "small-ct": ((128, 112, 96), (384.0, 336.0, 288.0))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pair", choices=PAIRS)
    parser.add_argument("options", nargs="?", type=json.loads, default={})
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape, field_of_view = PAIRS[args.pair]
    pair = make_pair(shape, seed=1, field_of_view=field_of_view)
    start = time.perf_counter()
    result = register((pair.ct, pair.affine), (pair.cbct, pair.affine), fixed_mask=(pair.cbct_fov, pair.affine),
                      **args.options)
    total = time.perf_counter() - start
    stages = {}
    for row in result.log:
        stages[row["stage"]] = (row["iteration"] + 1, round(row["seconds"], 1))
    warped = result.apply((pair.ct_labels, pair.affine), interpolation="label").astype(np.int32)
    dice = metrics.dice_scores(warped, pair.cbct_labels, [1, 2, 3, 4, 5, 6], pair.cbct_fov)
    print(json.dumps({"pair": args.pair, "options": args.options, "stages (iterations, s)": stages,
                      "total_s": round(total, 1), "mean_dice": round(float(np.nanmean(dice)), 4),
                      **metrics.jacobian_summary(result.displacement, pair.affine)}))


if __name__ == "__main__":
    main()
