#!/usr/bin/env python
"""Subject -> MNI152 template, with an affine pre-alignment: a study you can copy.

Reads ``$INRLDDMM_DATA/brain`` (default ``../shared/data`` beside the
repository; never copied): a skull-stripped T1 in FreeSurfer's LIA space
(moving) and the MNI152 2009a template (fixed, RAS), which differ in
orientation, field of view and position.  ``AffineInit`` first estimates an
affine by global NCC (as ANTs does before SyN), then the INR stages refine
it, in a head mask of the template with the velocity windowed to the head
(the field fades to one translation in the air, as SyN's does); grey and white
matter are scored by Dice::

    python workflows/brain_atlas_study.py --out-dir results/brain --work-dir work/brain

To add subjects, add rows to the manifest written in ``<work-dir>/inputs``
(or write your own and call ``init_study_wf``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from nipype_inrlddmm import engine, io
from nipype_inrlddmm.workflows import init_study_wf, run_study

REPO = Path(__file__).resolve().parents[1]
#: Whole-brain MRI at 1 mm: T1 to T1, so local NCC; a coarser first stage for the larger grid.  The head
#: mask (write_head_mask) is where the similarity is measured, and the velocity's window follows it.
SETTINGS = dict(seed=0, similarity="lncc", coarse_factor=3)


def data_dir() -> Path:
    """The brain set: $INRLDDMM_DATA/brain, else ../shared/data beside the repository."""
    return Path(os.environ.get("INRLDDMM_DATA", REPO.parent / "shared" / "data")) / "brain"


def write_head_mask(template, path) -> Path:
    """The template's head as a mask file, once: where it shows anatomy by the rule the velocity's window
    applies to the moving image (``engine.foreground``)."""
    path = Path(path)
    if not path.is_file():
        data, affine = io.load_volume(template)
        head = engine.foreground(torch.from_numpy(data))
        io.save_image(path, head.numpy().astype("uint8"), affine)
    return path


def prepare_manifest(work_dir, data=None) -> Path:
    """A one-subject manifest (absolute paths into the data folder) and the template's head mask in
    ``work_dir/inputs``."""
    data = Path(data or data_dir())
    if not (data / "mni152_T1w.nii.gz").is_file():
        raise FileNotFoundError(f"brain data not found at {data} (set INRLDDMM_DATA)")
    inputs = Path(work_dir) / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    head = write_head_mask(data / "mni152_T1w.nii.gz", inputs / "mni152_head.nii.gz")
    manifest = inputs / "manifest.tsv"
    text = ("patient\tmoving\tfixed\tmoving_labels\tfixed_labels\tfixed_mask\n"
            f"subject\t{data / 'subject_T1w.nii.gz'}\t{data / 'mni152_T1w.nii.gz'}\t"
            f"{data / 'subject_tissue.nii.gz'}\t{data / 'mni152_tissue.nii.gz'}\t{head}\n")
    # Rewritten only when it changes: a new timestamp would make Nipype re-read every subject.
    if not manifest.is_file() or manifest.read_text() != text:
        manifest.write_text(text)
    names = inputs / "labels.json"
    if not names.is_file():
        names.write_text('{"1": "grey_matter", "2": "white_matter"}\n')
    return manifest


def build_workflow(out_dir, work_dir, *, data=None, num_threads: int = 2, **options):
    """The atlas study: AffineInit -> coarse -> distillation -> fine (in the head mask) -> Dice of GM and WM."""
    manifest = prepare_manifest(work_dir, data)
    return init_study_wf(manifest=manifest, out_dir=out_dir, work_dir=work_dir, name="brain_atlas",
                         label_names=manifest.parent / "labels.json", affine="affine", num_threads=num_threads,
                         **{**SETTINGS, **options})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="results folder")
    parser.add_argument("--work-dir", required=True, help="Nipype cache folder")
    parser.add_argument("--num-threads", type=int, default=2, help="torch threads per node (default 2)")
    args = parser.parse_args(argv)
    rows = run_study(build_workflow(args.out_dir, args.work_dir, num_threads=args.num_threads))
    for row in rows:
        print(row["patient"], row["status"], row.get("mean_dice", ""), row["error"])


if __name__ == "__main__":
    main()
