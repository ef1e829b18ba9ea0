"""FireANTs' registration of one pair, as a user of its Python API runs it: the process ``gpu.py`` times.

    python benchmarks/fireants_run.py JOB_JSON

``JOB_JSON`` holds ``moving``, ``fixed``, ``moving_labels`` (paths),
``labels`` (the evaluated label ids, comma-separated), ``affine`` (whether to
pre-align), ``out`` (a folder), ``device``, ``seed`` and ``settings``
(``gpu.FIREANTS``: scales, iterations, learning rates, cc_kernel_size).
Writes into ``out``: ``warped.nii.gz``, ``warped_labels.nii.gz`` (carried by
FireANTs' own ``evaluate``), ``displacement.nii.gz`` (its
``save_as_ants_transforms``: an ANTs displacement field that holds the affine
too) and ``memory.json`` (the peak GPU memory, GiB, null on a CPU).  It
imports nothing of this package, so that its start-up is FireANTs' own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import SimpleITK as sitk
import torch
from fireants.io.image import BatchedImages, Image
from fireants.registration.affine import AffineRegistration
from fireants.registration.greedy import GreedyRegistration
from fireants.registration.moments import MomentsRegistration


def pre_align(fixed, moving, settings: dict) -> torch.Tensor:
    """Moments (2nd order, from the centres of mass), then affine from there: FireANTs' ``init_affine``."""
    moments = MomentsRegistration(1, fixed, moving, moments=2)
    moments.optimize()
    affine = AffineRegistration(settings["affine_scales"], settings["affine_iterations"], fixed, moving,
                                loss_type="cc", optimizer="Adam", optimizer_lr=settings["affine_lr"],
                                cc_kernel_size=settings["cc_kernel_size"], init_rigid=moments.get_affine_init())
    affine.optimize()
    return affine.get_affine_matrix().detach()


def evaluated_only(ids: torch.Tensor):
    """A ``seg_preprocessor`` keeping the label ids ``ids[1:]`` as 1..K, every other value as background 0."""
    top = int(ids.max())
    lookup = torch.zeros(top + 1, device=ids.device)
    lookup[ids] = torch.arange(len(ids), dtype=lookup.dtype, device=ids.device)

    def keep(array: torch.Tensor) -> torch.Tensor:
        return torch.where(array <= top, lookup[array.long().clamp(0, top)], 0.0)
    return keep


def carry_labels(registration, fixed, path: str, ids: torch.Tensor, device: str) -> torch.Tensor:
    """The moving labels ``path`` on the fixed grid through FireANTs' ``evaluate``: label ids, ``(Z, Y, X)``.

    Without FireANTs' fused ops a label map is one-hot (one channel per kept
    label, interpolated linearly) and the arg-max is the label; with them it
    is one channel of generic-label interpolation, already an index.
    """
    labels = BatchedImages([Image.load_file(path, device=device, is_segmentation=True,
                                            seg_preprocessor=evaluated_only(ids))])
    carried = registration.evaluate(fixed, labels)[0]
    index = carried.argmax(dim=0) if carried.shape[0] > 1 else carried[0].round().long()
    return ids[index].to(torch.int32)


def run(job: dict) -> None:
    torch.manual_seed(job["seed"])
    device, settings, out = job["device"], job["settings"], Path(job["out"])
    fixed = BatchedImages([Image.load_file(job["fixed"], device=device)])
    moving = BatchedImages([Image.load_file(job["moving"], device=device)])
    init_affine = pre_align(fixed, moving, settings) if job["affine"] else None
    registration = GreedyRegistration(settings["scales"], settings["iterations"], fixed, moving, loss_type="cc",
                                      cc_kernel_size=settings["cc_kernel_size"], optimizer="Adam",
                                      optimizer_lr=settings["lr"], init_affine=init_affine)
    registration.optimize()
    reference = fixed.images[0].itk_image

    def write(array: torch.Tensor, name: str) -> None:
        image = sitk.GetImageFromArray(array.detach().cpu().numpy())
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(out / name))

    with torch.no_grad():
        write(registration.evaluate(fixed, moving)[0, 0], "warped.nii.gz")
        ids = torch.tensor([0, *map(int, job["labels"].split(","))], device=device)
        write(carry_labels(registration, fixed, job["moving_labels"], ids, device), "warped_labels.nii.gz")
    registration.save_as_ants_transforms(str(out / "displacement.nii.gz"))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None
    (out / "memory.json").write_text(json.dumps({"peak_gpu_gib": peak}))


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
