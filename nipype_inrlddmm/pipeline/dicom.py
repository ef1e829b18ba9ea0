"""Contour propagation in DICOM: one registration of image series, an RTSTRUCT carried onto the fixed series.

:func:`register_dicom` converts what is DICOM (a series folder to NIfTI,
an RTSTRUCT to a label map on its series' grid) into a temporary folder,
runs :func:`~nipype_inrlddmm.pipeline.register_files` on the result, the
same registration as for NIfTI files, and adds the moving ROIs carried onto
the fixed series as a new RTSTRUCT.
"""

from __future__ import annotations

import datetime
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__, io
from ..io import dicom
from .outputs import AFFINE_OUTPUTS, FINE_OUTPUTS, RTSTRUCT_OUTPUTS
from .register import register_files
from .stages import apply_warp


def _check_options(moving: Path, fixed: Path, *, moving_rtstruct, fixed_rtstruct, moving_labels, fixed_labels,
                   label_names) -> None:
    """Refuse combinations of inputs that cannot work, naming the command line's option."""
    if moving_rtstruct and moving_labels:
        raise io.InputError("--moving-rtstruct", "and --moving-labels both give the moving labels: give one")
    if fixed_rtstruct and fixed_labels:
        raise io.InputError("--fixed-rtstruct", "and --fixed-labels both give the fixed labels: give one")
    if fixed_rtstruct and not moving_rtstruct:
        raise io.InputError("--fixed-rtstruct", "is matched by ROI name to --moving-rtstruct: give that too")
    if moving_rtstruct and label_names:
        raise io.InputError("--label-names", "the ROI names of --moving-rtstruct name the labels: leave it out")
    if moving_rtstruct and not moving.is_dir():
        raise io.InputError("--moving-rtstruct", f"is drawn on the moving series: give --moving as the folder of "
                            f"that DICOM series, not {moving}")
    if moving_rtstruct and not fixed.is_dir():
        raise io.InputError("--moving-rtstruct", f"is carried onto the fixed series as rtstruct.dcm: give --fixed "
                            f"as a folder holding one DICOM series, not {fixed}")


def _warped_labels(outputs: dict, stage: Path, moving_labels: Path, fixed: Path, affine) -> np.ndarray:
    """The moving labels on the fixed grid: the registration's when it evaluated them, else carried now
    through the field it wrote (and the pre-aligned header, with ``affine``), as it would have."""
    path = outputs.get("warped_labels")
    if path is None:
        source = stage / AFFINE_OUTPUTS["aligned_labels"] if affine else moving_labels
        path = apply_warp(source, stage / FINE_OUTPUTS["displacement"], fixed,
                          stage / "warped_labels.nii.gz", interpolation="label")
        outputs["warped_labels"] = path
    return np.asarray(nib.load(path).dataobj, np.int32)


def _description(moving_rtstruct: Path, moving: dicom.Series, fixed: dicom.Series) -> str:
    today = datetime.date.today().isoformat()
    return (f"Propagated by INR-LDDMM (nipype_inrlddmm {__version__}) on {today} from {moving_rtstruct.name} "
            f"(series {moving.series_uid}) onto series {fixed.series_uid}; to be reviewed before clinical use")


def register_dicom(moving, fixed, out_dir, *, moving_rtstruct=None, fixed_rtstruct=None, moving_labels=None,
                   fixed_labels=None, label_names=None, affine=None, **options) -> dict:
    """Register ``moving`` onto ``fixed``, each a NIfTI file or a folder holding one DICOM series.

    With ``moving_rtstruct`` (an RTSTRUCT drawn on the moving series) its
    ROIs become the moving labels (:func:`~nipype_inrlddmm.io.dicom.read_rtstruct`),
    are carried with the field, and are written onto the fixed series as
    ``rtstruct.dcm`` (:func:`~nipype_inrlddmm.io.dicom.write_rtstruct`), with
    ``warped_labels.nii.gz`` and ``labels.tsv`` (label id, ROI name, number,
    colour, type).  With ``fixed_rtstruct`` (the day's reference contours on
    the fixed series) the ROIs of the same name are evaluated
    (``dice.csv``).  Every other option, and every other output, is
    :func:`~nipype_inrlddmm.pipeline.register_files`'.  Everything is read
    and checked before the registration starts, and a run that fails leaves
    ``out_dir`` as it found it.

    Returns :func:`~nipype_inrlddmm.pipeline.register_files`' outputs, plus
    the paths ``rtstruct`` and ``label_table``, ``skipped_rois`` (ROIs of
    points or lines, not carried) and ``empty_rois`` (carried wholly outside
    the fixed image: kept in ``rtstruct.dcm`` without contours).
    """
    moving, fixed, final = Path(moving), Path(fixed), Path(out_dir)
    _check_options(moving, fixed, moving_rtstruct=moving_rtstruct, fixed_rtstruct=fixed_rtstruct,
                   moving_labels=moving_labels, fixed_labels=fixed_labels, label_names=label_names)
    with tempfile.TemporaryDirectory(prefix="inrlddmm-dicom-") as scratch:
        scratch = Path(scratch)
        # A folder each: the two series' folders may have the same name (planning/CT, day1/CT).
        (moving_file, moving_series), (fixed_file, fixed_series) = (dicom.as_nifti(path, scratch / role)
                                                                    for path, role in ((moving, "moving"),
                                                                                       (fixed, "fixed")))
        structures = None
        if moving_rtstruct:
            structures = dicom.read_rtstruct(moving_rtstruct, moving_series)
            moving_labels = io.save_image(scratch / "moving_labels.nii.gz", structures.labels, moving_series.affine)
        if fixed_rtstruct:
            reference = dicom.match_rois(dicom.read_rtstruct(fixed_rtstruct, fixed_series), structures.rois,
                                         fixed_rtstruct)
            fixed_labels = io.save_image(scratch / "fixed_labels.nii.gz", reference.labels, fixed_series.affine)
            label_names = io.write_csv(scratch / "evaluated.tsv", dicom.label_table(reference.rois), delimiter="\t")
        with io.staged_folder(final) as stage:
            outputs = register_files(moving_file, fixed_file, stage, moving_labels=moving_labels,
                                     fixed_labels=fixed_labels, label_names=label_names, affine=affine,
                                     moving_source=moving, **options)
            if structures is not None:
                warped = _warped_labels(outputs, stage, moving_labels, fixed_file, affine)
                outputs["label_table"] = io.write_csv(stage / RTSTRUCT_OUTPUTS["label_table"],
                                                      dicom.label_table(structures.rois), delimiter="\t")
                outputs["rtstruct"] = dicom.write_rtstruct(
                    stage / RTSTRUCT_OUTPUTS["rtstruct"], warped, structures.rois, fixed_series, label="Propagated",
                    name=f"INR-LDDMM {__version__} propagation",
                    description=_description(Path(moving_rtstruct), moving_series, fixed_series))
                outputs["skipped_rois"] = list(structures.skipped)
                outputs["empty_rois"] = [roi.name for roi in structures.rois if not roi.mask(warped).any()]
                if outputs["empty_rois"]:
                    warnings.warn(f"{moving_rtstruct}: ROIs carried wholly outside the fixed image, written without "
                                  f"contours: {', '.join(outputs['empty_rois'])}", stacklevel=2)
    return {name: final / value.name if isinstance(value, Path) else value for name, value in outputs.items()}
