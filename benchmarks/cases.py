"""The registration problems the benchmarks share: the real sample sets and the phantom pairs, as files.

Read from $INRLDDMM_DATA (default ../shared/data; never copied); the
phantoms are generated into a scratch folder.  Each benchmark turns a
:class:`Case` into what its methods take: ``accuracy.py`` loads the
volumes in process, ``end_to_end.py`` passes files to the command lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nipype_inrlddmm import io
from nipype_inrlddmm.phantom import LABELS as PHANTOM_LABELS
from nipype_inrlddmm.phantom import make_pair

DATA = Path(os.environ.get("INRLDDMM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SETS = ("brain", "brain-pair", "lung-ct", "phantom", "small-ct")


@dataclass
class Case:
    """One registration problem, as files (moving -> fixed)."""

    name: str
    moving: Path
    fixed: Path
    moving_labels: Path
    fixed_labels: Path
    labels: dict[int, str]  # the evaluated labels
    affine: str | None = None  # pre-alignment, or None when already aligned
    clip_min: float | None = None  # CT: -2048 marks voxels outside the scan cone
    head: bool = False  # an MR head in air: the similarity is measured inside the head
    eval_mask: Path | None = None  # the CBCT's field of view: where the phantoms are scored (None: everywhere)
    landmarks: tuple[Path, Path] | None = None  # (fixed, moving) LPS CSVs


def _phantom_case(name: str, scratch: Path, shape, field_of_view, seed: int) -> Case:
    pair = make_pair(shape, seed=seed, field_of_view=field_of_view)
    files = {key: io.save_image(scratch / f"{name}_{key}.nii.gz", data, pair.affine) for key, data in (
        ("ct", pair.ct), ("cbct", pair.cbct), ("ct_labels", pair.ct_labels.astype(np.int32)),
        ("cbct_labels", pair.cbct_labels.astype(np.int32)), ("fov", pair.cbct_fov.astype(np.uint8)))}
    labels = {k: v for k, v in PHANTOM_LABELS.items() if k}
    return Case(name, files["ct"], files["cbct"], files["ct_labels"], files["cbct_labels"], labels,
                eval_mask=files["fov"])


def cases(names, scratch: Path) -> list[Case]:
    """The sets ``names`` (of :data:`SETS`), in that tuple's order; the phantoms are written to ``scratch``."""
    out = []
    if "brain" in names:
        d = DATA / "brain"
        out.append(Case("brain", d / "subject_T1w.nii.gz", d / "mni152_T1w.nii.gz", d / "subject_tissue.nii.gz",
                        d / "mni152_tissue.nii.gz", {1: "GM", 2: "WM"}, affine="affine", head=True))
    if "brain-pair" in names:
        d = DATA / "brain-pair"
        out.append(Case("brain-pair", d / "subjectA_T1w.nii.gz", d / "subjectB_T1w.nii.gz",
                        d / "subjectA_aseg.nii.gz", d / "subjectB_aseg.nii.gz",
                        io.load_label_names(d / "labels.tsv"), head=True))
    if "lung-ct" in names:
        d = DATA / "lung-ct"
        out.append(Case("lung-ct", d / "followup_ct.nii.gz", d / "baseline_ct.nii.gz", d / "followup_lung.nii.gz",
                        d / "baseline_lung.nii.gz", {1: "lung"}, affine="affine", clip_min=-1024.0,
                        landmarks=(d / "baseline_landmarks_lps_mm.csv", d / "followup_landmarks_lps_mm.csv")))
    if "phantom" in names:
        out.append(_phantom_case("phantom", scratch, (128, 112, 48), (360.0, 300.0, 240.0), seed=1))
    if "small-ct" in names:  # the same generator at 3 mm isotropic
        out.append(_phantom_case("small-ct", scratch, (128, 112, 96), (384.0, 336.0, 288.0), seed=2))
    return out
