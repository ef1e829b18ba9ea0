"""Nipype interfaces of INR-LDDMM.

================  ==============================================================
AffineInit        rigid/affine pre-alignment (or an ITK/ANTs affine), by header
CoarseINR         coarse stage on block-averaged images
DistillINR        refit the coarse network at full resolution
FineINR           fine stage; the final field, model and warped image
ApplyWarp         carry an image or label map through a displacement field, or back (invert)
DiceEval          per-label Dice/HD95 and Jacobian statistics
QCReport          the per-patient QC figure (slices, contours, checkerboard, det J)
Trajectory        the moving image at K times of the flow (4-D NIfTI, GIF)
LandmarkTRE       target registration error of landmark pairs
SelectPatient     one patient's files from a study manifest
GatherDice        the study table (a JoinNode over patients)
DicomToNifti      a DICOM image series as a NIfTI volume
RTStructToLabels  an RTSTRUCT's ROIs as a label map on its series' grid
LabelsToRTStruct  a label map on a series' grid as a new RTSTRUCT
================  ==============================================================

Each is a :class:`~nipype.interfaces.base.SimpleInterface` over
:mod:`nipype_inrlddmm.pipeline` (the DICOM conversions over
:mod:`nipype_inrlddmm.io.dicom`); outputs are written into the node's working
directory.  Every interface takes a hashed ``version`` input (the package
version) so that upgrading the package invalidates Nipype's cache; the
optimisation interfaces take ``num_threads`` (not hashed), which a Node
reports as its ``n_procs``.

Each example runs in an empty working folder.  ``data`` there is one
phantom patient's folder as :func:`~nipype_inrlddmm.phantom.write_cohort`
writes it (``ct.nii.gz``, ``cbct.nii.gz``, their label maps and
``cbct_fov.nii.gz``), and ``coarse`` the outputs of :class:`CoarseINR` on
that patient (5 iterations), which the later stages' examples continue.
"""

from .affine import AffineInit
from .dicom import DicomToNifti, LabelsToRTStruct, RTStructToLabels
from .evaluation import DiceEval, LandmarkTRE
from .qc import QCReport, Trajectory
from .registration import CoarseINR, DistillINR, FineINR
from .study import GatherDice, SelectPatient
from .warp import ApplyWarp

__all__ = ["AffineInit", "ApplyWarp", "CoarseINR", "DiceEval", "DicomToNifti", "DistillINR", "FineINR",
           "GatherDice", "LabelsToRTStruct", "LandmarkTRE", "QCReport", "RTStructToLabels", "SelectPatient",
           "Trajectory"]
