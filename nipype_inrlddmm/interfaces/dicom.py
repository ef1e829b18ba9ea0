"""DICOM conversions as interfaces: a series to NIfTI, an RTSTRUCT to a label map, a label map to an RTSTRUCT.

The conversions themselves are :mod:`nipype_inrlddmm.io.dicom`'s; these only
place their outputs in the node's working directory.
"""

from __future__ import annotations

import datetime
import os

from nipype.interfaces.base import SimpleInterface, TraitedSpec, isdefined, traits

from .. import __version__, io
from ..io import dicom
from .base import VersionedInputSpec


def _out_path(runtime, name) -> str:
    return os.path.join(runtime.cwd, os.path.basename(name))


class _DicomToNiftiInputSpec(VersionedInputSpec):
    dicom_folder = traits.Directory(exists=True, mandatory=True,
                                    desc="folder holding one DICOM image series, one file per slice")
    out_file = traits.Str(mandatory=False, desc="output file name (default: <folder name>.nii.gz)")


class _DicomToNiftiOutputSpec(TraitedSpec):
    out_file = traits.File(exists=True, desc="the series as a float32 NIfTI, RAS affine, rescale applied")
    series_uid = traits.Str(desc="the series' SeriesInstanceUID")
    frame_of_reference_uid = traits.Str(desc="the series' FrameOfReferenceUID")


class DicomToNifti(SimpleInterface):
    """A DICOM image series as a NIfTI volume (:func:`~nipype_inrlddmm.io.dicom.read_series`).

    LPS patient coordinates become the RAS affine, slices are ordered along
    their normal, and two series, missing, duplicated or unevenly spaced
    slices or a gantry tilt are refused, naming the folder.

    Examples
    --------
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.io import dicom
    >>> from nipype_inrlddmm.interfaces import DicomToNifti
    >>> series = dicom.write_series("ct", np.arange(4 * 3 * 2.0).reshape(4, 3, 2), np.diag([1, 1, 2.5, 1]))
    >>> result = DicomToNifti(dicom_folder=str(series.folder)).run()
    >>> image, affine = io.load_image(result.outputs.out_file)
    >>> image.shape, float(affine[2, 2]), Path(result.outputs.out_file).name
    ((4, 3, 2), 2.5, 'ct.nii.gz')
    """

    input_spec = _DicomToNiftiInputSpec
    output_spec = _DicomToNiftiOutputSpec

    def _run_interface(self, runtime):
        series = dicom.read_series(self.inputs.dicom_folder)
        name = self.inputs.out_file if isdefined(self.inputs.out_file) else f"{series.folder.name}.nii.gz"
        self._results["out_file"] = str(io.save_image(_out_path(runtime, name), series.data, series.affine))
        self._results["series_uid"] = series.series_uid
        self._results["frame_of_reference_uid"] = series.frame_of_reference_uid
        return runtime


class _RTStructToLabelsInputSpec(VersionedInputSpec):
    rtstruct = traits.File(exists=True, mandatory=True, desc="RTSTRUCT drawn on the series of dicom_folder")
    dicom_folder = traits.Directory(exists=True, mandatory=True,
                                    desc="folder of the image series the RTSTRUCT was drawn on: the output grid")
    match_table = traits.File(exists=True, mandatory=False,
                              desc="label table of other ROIs (RTStructToLabels' of the planning RTSTRUCT): the ROIs "
                              "of their names take their labels and the others are left out, so that a day's "
                              "reference contours are compared with the planning ROIs carried onto that day")
    out_file = traits.Str("labels.nii.gz", usedefault=True, desc="output label map file name")
    out_table = traits.Str("labels.tsv", usedefault=True, desc="output label table file name")


class _RTStructToLabelsOutputSpec(TraitedSpec):
    out_file = traits.File(exists=True, desc="int32 label map on the series' grid: label n for the n-th area ROI")
    label_table = traits.File(exists=True, desc="TSV: label id (index), ROI name, number, colour, interpreted type "
                              "and the labels each ROI encloses (within); DiceEval reads it as label names")
    skipped = traits.List(traits.Str, desc="ROIs of points or open lines only, not in the label map")


class RTStructToLabels(SimpleInterface):
    """An RTSTRUCT's ROIs as a label map on its series' grid (:func:`~nipype_inrlddmm.io.dicom.read_rtstruct`).

    A voxel belongs to an ROI when its centre lies inside the ROI's
    contours; where ROIs overlap, the smaller wins, and the label table
    records which labels an ROI encloses, so that :class:`LabelsToRTStruct`
    writes it back whole.  An RTSTRUCT in another frame of reference than
    the series, or an empty ROI, is refused, naming the file and the ROI.
    With ``match_table`` the ROIs are renumbered by name as that table's
    (:func:`~nipype_inrlddmm.io.dicom.match_rois`), and the label table lists
    those matched.

    Examples
    --------
    >>> import numpy as np
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.io import dicom
    >>> from nipype_inrlddmm.interfaces import RTStructToLabels
    >>> series = dicom.write_series("ct", np.random.default_rng(0).normal(size=(8, 8, 3)), np.eye(4))
    >>> labels = np.zeros((8, 8, 3), np.int32); labels[2:6, 2:6, 1] = 1
    >>> rs = dicom.write_rtstruct("rs.dcm", labels, [dicom.Roi(1, "GTV", 4)], series, label="Plan",
    ...                           name="plan", description="drawn by hand")
    >>> result = RTStructToLabels(rtstruct=str(rs), dicom_folder=str(series.folder)).run()
    >>> int(io.load_labels(result.outputs.out_file)[0].sum())
    16
    >>> io.load_label_names(result.outputs.label_table)
    {1: 'GTV'}
    """

    input_spec = _RTStructToLabelsInputSpec
    output_spec = _RTStructToLabelsOutputSpec

    def _run_interface(self, runtime):
        series = dicom.read_series(self.inputs.dicom_folder)
        structures = dicom.read_rtstruct(self.inputs.rtstruct, series)
        if isdefined(self.inputs.match_table):
            structures = dicom.match_rois(structures, dicom.read_label_table(self.inputs.match_table),
                                          self.inputs.rtstruct)
        self._results["out_file"] = str(io.save_image(_out_path(runtime, self.inputs.out_file), structures.labels,
                                                      series.affine))
        self._results["label_table"] = str(io.write_csv(_out_path(runtime, self.inputs.out_table),
                                                        dicom.label_table(structures.rois), delimiter="\t"))
        self._results["skipped"] = list(structures.skipped)
        return runtime


class _LabelsToRTStructInputSpec(VersionedInputSpec):
    labels = traits.File(exists=True, mandatory=True,
                         desc="label map on the grid of the series of dicom_folder (e.g. ApplyWarp's warped labels)")
    label_table = traits.File(exists=True, mandatory=True,
                              desc="TSV of the ROIs to write: RTStructToLabels' label_table, or columns index and "
                              "name alone (ROI numbers are then the label ids)")
    dicom_folder = traits.Directory(exists=True, mandatory=True,
                                    desc="folder of the image series to reference and draw the contours on")
    structure_set_label = traits.Str("Propagated", usedefault=True,
                                     desc="StructureSetLabel of the new RTSTRUCT (at most 16 characters)")
    description = traits.Str("Propagated by INR-LDDMM", usedefault=True,
                             desc="StructureSetDescription; the package version and the date are appended")
    out_file = traits.Str("rtstruct.dcm", usedefault=True, desc="output file name")


class _LabelsToRTStructOutputSpec(TraitedSpec):
    out_file = traits.File(exists=True, desc="the new RTSTRUCT, referencing the series of dicom_folder")


class LabelsToRTStruct(SimpleInterface):
    """A label map on a series' grid as a new RTSTRUCT referencing that series
    (:func:`~nipype_inrlddmm.io.dicom.write_rtstruct`): one ROI per row of the label table, marked UNAPPROVED.

    Examples
    --------
    >>> import numpy as np
    >>> import pydicom
    >>> from nipype_inrlddmm import io
    >>> from nipype_inrlddmm.io import dicom
    >>> from nipype_inrlddmm.interfaces import LabelsToRTStruct
    >>> series = dicom.write_series("cbct", np.random.default_rng(0).normal(size=(8, 8, 3)), np.eye(4))
    >>> labels = np.zeros((8, 8, 3), np.int32); labels[2:6, 2:6, 1] = 1
    >>> warped = io.save_image("warped_labels.nii.gz", labels, series.affine)
    >>> table = io.write_csv("labels.tsv", [{"index": 1, "name": "GTV"}], delimiter="\\t")
    >>> result = LabelsToRTStruct(labels=str(warped), label_table=str(table),
    ...                           dicom_folder=str(series.folder)).run()
    >>> written = pydicom.dcmread(result.outputs.out_file)
    >>> written.StructureSetROISequence[0].ROIName, written.StructureSetLabel
    ('GTV', 'Propagated')
    """

    input_spec = _LabelsToRTStructInputSpec
    output_spec = _LabelsToRTStructOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        series = dicom.read_series(inputs.dicom_folder)
        labels, _ = io.load_labels(inputs.labels, reference=(inputs.dicom_folder, series.data, series.affine))
        description = f"{inputs.description} (nipype_inrlddmm {__version__}, {datetime.date.today().isoformat()})"
        self._results["out_file"] = str(dicom.write_rtstruct(
            _out_path(runtime, inputs.out_file), labels, dicom.read_label_table(inputs.label_table), series,
            label=inputs.structure_set_label, name=f"{inputs.structure_set_label} (nipype_inrlddmm {__version__})",
            description=description))
        return runtime
