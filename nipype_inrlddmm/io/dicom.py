"""DICOM in and out: an image series as a NIfTI volume, an RTSTRUCT as a label map, and back.

Conventions.  DICOM places voxels in LPS patient millimetres; NIfTI affines
here are RAS (x and y negated).  A series' volume is indexed ``(i, j, k)``:
``i`` along a row (the column index, ImageOrientationPatient's first
vector), ``j`` down a column (the row index, its second vector) and ``k``
over the slices in increasing position along ``row x column``, so that
``data[:, :, k] == pixel_array.T`` of slice ``k``.

Contours are closed planar polygons in a slice.  A voxel belongs to an ROI
when its centre lies inside the ROI's polygons of its slice, counted with the
even-odd rule (an inner polygon is a hole), or on one of them (as where
contours are drawn through the centres of an ROI's outermost voxels, the way
rt-utils and many planning systems write them).  Written contours run a quarter
of a voxel inside the border between an ROI's voxels and the rest: both
common readings of a polygon (voxel centres inside it, as here; vertices
rounded to voxels and edges filled, as OpenCV and rt-utils do) then give back
exactly the voxels written.

Every reader fails with :class:`~nipype_inrlddmm.io.InputError` (a
``ValueError``) naming the folder or file and the problem; every writer is
atomic (:func:`~nipype_inrlddmm.io.atomic_path`).
"""

from __future__ import annotations

import csv
import datetime
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from pydicom.valuerep import format_number_as_ds
from skimage.draw import polygon
from skimage.measure import find_contours

from .. import __version__
from .files import InputError, atomic_path
from .nifti import save_image

#: RAS <-> LPS on homogeneous 4x4 matrices (its own inverse).
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Slice positions may stray from a regular grid by this fraction of the slice gap (scanners round positions
#: to a few micrometres); beyond it the spacing is uneven or the stack tilted, and one affine cannot place it.
SLICE_TOLERANCE = 0.01
#: A contour's plane may stray from a slice by this fraction of the slice gap (rounded coordinates); beyond it
#: the contour was drawn on another series' slices and would land on the wrong one.
CONTOUR_TOLERANCE = 0.05
#: A voxel whose centre lies this close to a contour (in voxels) is on it, and the ROI's: planning systems and
#: rt-utils draw contours through the centres of an ROI's outermost voxels.
ON_CONTOUR = 0.1
#: Where written contours cross between an ROI voxel (1) and an outside one (0): a quarter voxel inside.
_CONTOUR_LEVEL = 0.75
#: Referenced SOP class of an RTSTRUCT's referenced study (what planning systems write there).
_STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"


@dataclass(frozen=True)
class Series:
    """One DICOM image series, read.

    ``data`` is float32 ``(X, Y, Z)`` with the rescale slope and intercept
    applied (HU for CT); ``affine`` the RAS voxel -> world matrix (NIfTI);
    ``instances`` per slice ``k`` its ``(SOPClassUID, SOPInstanceUID)``;
    ``header`` the first slice's attributes without pixels (patient and study,
    copied into what is written for it).
    """

    folder: Path
    data: np.ndarray
    affine: np.ndarray
    instances: tuple[tuple[str, str], ...]
    series_uid: str
    frame_of_reference_uid: str
    header: Dataset

    @property
    def lps_affine(self) -> np.ndarray:
        """Voxel ``(i, j, k)`` -> LPS patient mm."""
        return FLIP @ self.affine

    def image(self) -> nib.Nifti1Image:
        return nib.Nifti1Image(self.data, self.affine)


@dataclass(frozen=True)
class Roi:
    """One structure of a label map: voxels equal to ``label`` (and, for an ROI that encloses others, to
    the labels in ``within``, which lie wholly inside it).

    ``number`` is the RTSTRUCT's ROI Number, ``colour`` its display colour (RGB 0-255) or None,
    ``kind`` its RT ROI Interpreted Type (``ORGAN``, ``EXTERNAL``, ``PTV``, ... or empty).
    """

    label: int
    name: str
    number: int
    colour: tuple[int, int, int] | None = None
    kind: str = ""
    within: tuple[int, ...] = field(default=())

    def mask(self, labels: np.ndarray) -> np.ndarray:
        """The ROI's voxels in a label map, bool of its shape."""
        return np.isin(labels, (self.label, *self.within))


@dataclass(frozen=True)
class Structures:
    """An RTSTRUCT on a series' grid: ``labels`` int32 ``(X, Y, Z)``, one :class:`Roi` per area ROI in the
    RTSTRUCT's order (label ``n`` for the ``n``-th), and the names of ROIs ``skipped`` for holding only points
    or open lines (markers, an isocentre), which enclose no voxel."""

    labels: np.ndarray
    rois: tuple[Roi, ...]
    skipped: tuple[str, ...] = ()


# --- image series --------------------------------------------------------------------------------------------

def _image_headers(folder: Path) -> list[tuple[Path, Dataset]]:
    """The image instances among a folder's files (not its subfolders), without their pixels.

    Files that are not DICOM, and DICOM objects without pixels or a position
    (an RTSTRUCT, a DICOMDIR), are not part of an image series and are passed over.
    """
    if not folder.is_dir():
        raise InputError(folder, "is not a folder of DICOM files"
                         + ("" if folder.exists() else " (it does not exist)"))
    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "ImagePositionPatient" in header and "Rows" in header:
            found.append((path, header))
    if not found:
        raise InputError(folder, "holds no DICOM image (no file with pixels and an ImagePositionPatient)")
    return found


def _one_series(folder: Path, headers: list[tuple[Path, Dataset]]) -> None:
    series: dict[str, list] = {}
    for path, header in headers:
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))
    if len(series) > 1:
        listed = "; ".join(f"{uid or 'no UID'} ({len(items)} files, e.g. {items[0][0].name}, "
                           f"{items[0][1].get('Modality', '?')} {items[0][1].get('SeriesDescription', '')!s})"
                           for uid, items in series.items())
        raise InputError(folder, f"holds {len(series)} DICOM image series (SeriesInstanceUID {listed}): "
                         "give a folder with one series")


def _same(folder: Path, headers, keyword: str, what: str) -> np.ndarray:
    """The value of ``keyword`` shared by every slice, refused when a slice differs or lacks it."""
    values = []
    for path, header in headers:
        if keyword not in header:
            raise InputError(path, f"has no {keyword} ({what})")
        values.append(np.asarray(header[keyword].value, np.float64))
    for (path, _), value in zip(headers, values):
        if value.shape != values[0].shape or not np.allclose(value, values[0], atol=1e-4):
            raise InputError(folder, f"its slices differ in {what}: {headers[0][0].name} has "
                             f"{values[0].tolist()}, {path.name} has {value.tolist()}")
    return values[0]


def _directions(folder: Path, orientation: np.ndarray) -> np.ndarray:
    """Row, column and normal unit vectors (LPS) of an ImageOrientationPatient, refused when not orthonormal."""
    row, column = orientation[:3], orientation[3:]
    norms = np.linalg.norm(row), np.linalg.norm(column)
    if orientation.shape != (6,) or min(norms) < 0.99 or max(norms) > 1.01 or abs(row @ column) > 1e-3:
        raise InputError(folder, f"ImageOrientationPatient {orientation.tolist()} is not two orthogonal "
                         "unit vectors")
    row, column = row / norms[0], column / norms[1]
    return np.stack([row, column, np.cross(row, column)])


def _sorted_slices(folder: Path, headers, directions: np.ndarray, pixel_spacing: np.ndarray):
    """Slices in increasing position along the normal, and the LPS step from one to the next.

    Refuses duplicated and missing slices, uneven spacing and a gantry tilt
    (slices not stacked along their normal), each naming the slices concerned.
    """
    positions = np.array([np.asarray(h.ImagePositionPatient, np.float64) for _, h in headers])
    along = positions @ directions[2]
    order = np.argsort(along, kind="stable")
    headers, positions, along = [headers[i] for i in order], positions[order], along[order]
    if len(headers) < 2:
        raise InputError(folder, f"holds a single slice ({headers[0][0].name}): a 3-D volume needs at least 2")
    gaps = np.diff(along)
    gap = float(np.median(gaps))
    tolerance = SLICE_TOLERANCE * max(gap, float(pixel_spacing.min()))
    for n in np.flatnonzero(gaps <= tolerance):
        raise InputError(folder, f"holds duplicated slices: {headers[n][0].name} and {headers[n + 1][0].name} "
                         f"are both at {along[n]:.3f} mm along the slice normal")
    for n in np.flatnonzero(np.abs(gaps - gap) > tolerance):
        ratio = gaps[n] / gap
        if abs(ratio - round(ratio)) * gap <= tolerance:
            raise InputError(folder, f"misses {round(ratio) - 1} slice(s) between {headers[n][0].name} and "
                             f"{headers[n + 1][0].name} ({gaps[n]:.3f} mm apart where slices are {gap:.3f} mm)")
        raise InputError(folder, f"has uneven slice spacing: {headers[n][0].name} and {headers[n + 1][0].name} "
                         f"are {gaps[n]:.3f} mm apart where the other slices are {gap:.3f} mm")
    offsets = (positions - positions[0]) @ directions[:2].T  # in-plane drift of each slice from the first
    drift = np.linalg.norm(offsets, axis=1)
    if drift.max() > tolerance:
        degrees = np.degrees(np.arctan2(drift[-1], along[-1] - along[0]))
        raise InputError(folder, f"its slices are not stacked along their normal (gantry tilt of about "
                         f"{degrees:.2f} degrees: {headers[-1][0].name} lies {drift[-1]:.3f} mm aside): "
                         "resample it to an untilted series first")
    step = (positions[-1] - positions[0]) / (len(headers) - 1)
    return headers, positions[0], step


def _pixels(path: Path, header: Dataset) -> np.ndarray:
    """One slice's stored values through its rescale (slope and intercept, or a modality LUT), float32 (Y, X)."""
    try:
        dataset = pydicom.dcmread(path)
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError("a multi-frame image; one file per slice is expected")
        return np.asarray(apply_rescale(dataset.pixel_array, dataset), np.float32)
    except Exception as error:  # pydicom raises many types for pixel data it cannot decode
        raise InputError(path, f"cannot read the pixels ({type(error).__name__}: {error})") from error


def series_shape(folder) -> tuple[int, int, int]:
    """The grid :func:`read_series` reads from a folder, ``(columns, rows, slices)``, from one file's header.

    The slices are the folder's files, counted, not read: cheap enough to
    size a study's nodes before any series is read.  A file beside the
    series that is not a slice counts as one; a folder :func:`read_series`
    would refuse is refused there, naming what is wrong.
    """
    folder = Path(folder)
    files = sorted(path for path in folder.iterdir() if path.is_file())
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "Rows" in header and "Columns" in header:
            return int(header.Columns), int(header.Rows), len(files)
    raise InputError(folder, "holds no DICOM image (no file with rows and columns)")


def read_series(folder) -> Series:
    """Read a folder holding one DICOM image series (one file per slice) as a volume with its RAS affine.

    Raises :class:`~nipype_inrlddmm.io.InputError` naming the folder or
    file for: no DICOM image in the folder, two series, slices of different
    size, spacing or orientation, duplicated or missing slices, uneven slice
    spacing, a gantry tilt, and pixels that cannot be decoded.
    """
    folder = Path(folder)
    headers = _image_headers(folder)
    _one_series(folder, headers)
    directions = _directions(folder, _same(folder, headers, "ImageOrientationPatient", "orientation"))
    spacing = _same(folder, headers, "PixelSpacing", "pixel spacing")  # (between rows, between columns) mm
    size = _same(folder, headers, "Rows", "rows").item(), _same(folder, headers, "Columns", "columns").item()
    headers, origin, step = _sorted_slices(folder, headers, directions, spacing)
    lps = np.eye(4)
    # PixelSpacing is (between rows, between columns): i steps along a row by the second.
    lps[:3, 0], lps[:3, 1] = directions[0] * spacing[1], directions[1] * spacing[0]
    lps[:3, 2], lps[:3, 3] = step, origin
    data = np.empty((int(size[1]), int(size[0]), len(headers)), np.float32)
    for k, (path, header) in enumerate(headers):
        data[:, :, k] = _pixels(path, header).T
    first = headers[0][1]
    return Series(folder=folder, data=data, affine=FLIP @ lps,
                  instances=tuple((str(h.SOPClassUID), str(h.SOPInstanceUID)) for _, h in headers),
                  series_uid=str(first.SeriesInstanceUID),
                  frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")), header=first)


def as_nifti(path, folder) -> tuple[Path, Series | None]:
    """An image given as a NIfTI file or a folder holding one DICOM series, as a NIfTI file and its series.

    A file is returned as it is, with no series; a folder's series is read
    and written to ``folder/<its name>.nii.gz``.
    """
    path = Path(path)
    if not path.is_dir():
        return path, None
    series = read_series(path)
    return save_image(Path(folder) / f"{path.name}.nii.gz", series.data, series.affine), series


def _ds(values) -> list[str]:
    """Decimal strings of at most 16 characters (DICOM's DS), as precise as that allows."""
    return [format_number_as_ds(float(v)) for v in values]


def _file_dataset(sop_class: str, sop_instance: str) -> Dataset:
    """A dataset with the file meta information of a DICOM Part 10 file, explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.SOPClassUID, dataset.SOPInstanceUID = sop_class, sop_instance
    return dataset


def _save(dataset: Dataset, path: Path) -> Path:
    with atomic_path(path) as temporary:
        dataset.save_as(temporary, enforce_file_format=True)
    return path


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def write_series(folder, data, affine, *, patient_id: str = "PHANTOM", patient_name: str = "Phantom^Chest",
                 study_uid: str | None = None, frame_of_reference_uid: str | None = None, description: str = "",
                 series_number: int = 1) -> Series:
    """Write a volume as a CT image series, one file per slice, into ``folder`` (created); return it read back.

    ``data`` is ``(X, Y, Z)`` and ``affine`` its RAS voxel -> world matrix,
    whose columns must be orthogonal (DICOM has no shear) and right-handed in
    LPS (``k`` along ``i x j``, the order :func:`read_series` gives back).
    Values are stored as 16-bit integers through a rescale: a slope of 1 for
    integer values spanning at most 65535, otherwise the finest slope that
    spans them (a rounding error of at most half of it).  Slices of one call
    share a new SeriesInstanceUID and, unless given, a new study and frame of
    reference.
    """
    data, lps = np.asarray(data, np.float64), FLIP @ np.asarray(affine, np.float64)
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    directions = (columns / spacing).T
    if data.ndim != 3:
        raise ValueError(f"a series needs a 3-D volume, got shape {data.shape}")
    if np.abs(directions @ directions.T - np.eye(3)).max() > 1e-6:
        raise ValueError("DICOM slices cannot be sheared: the affine's columns must be orthogonal")
    if np.cross(directions[0], directions[1]) @ directions[2] < 0:
        raise ValueError("the affine is left-handed in LPS (slices against i x j): reverse its third axis first")
    low, high = float(data.min()), float(data.max())
    integers = np.array_equal(data, np.round(data)) and high - low <= 65535
    slope = 1.0 if integers else max(high - low, 1e-6) / 65535
    stored = np.round((data - low) / slope).astype(np.uint16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, frame_of_reference_uid = study_uid or generate_uid(), frame_of_reference_uid or generate_uid()
    series_uid, (date, time) = generate_uid(), _now()
    for k in range(data.shape[2]):
        instance = generate_uid()
        ds = _file_dataset(CTImageStorage, instance)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = "CT", "nipype_inrlddmm", description
        ds.BodyPartExamined = "CHEST"  # the phantom's; an unpaired part, so no Laterality is due
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = series_number, k + 1, 1
        ds.PositionReferenceIndicator, ds.PatientPosition, ds.KVP = "", "HFS", ""
        ds.ImagePositionPatient = _ds(lps[:3, :3] @ [0, 0, k] + lps[:3, 3])
        ds.ImageOrientationPatient = _ds(directions[:2].reshape(-1))
        ds.PixelSpacing = _ds((spacing[1], spacing[0]))  # between rows (along j), between columns (along i)
        ds.SliceThickness = _ds([spacing[2]])[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = _ds([low])[0], _ds([slope])[0]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        _save(ds, folder / f"CT.{k + 1:04d}.dcm")
    return read_series(folder)


# --- RTSTRUCT -------------------------------------------------------------------------------------------------

def _read_rtstruct_file(path: Path) -> Dataset:
    if not path.is_file():
        raise InputError(path, "RTSTRUCT file does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise InputError(path, f"cannot read it as DICOM ({type(error).__name__}: {error})") from error
    if dataset.get("SOPClassUID") != RTStructureSetStorage or "StructureSetROISequence" not in dataset:
        raise InputError(path, f"is not an RTSTRUCT (SOP class {dataset.get('SOPClassUID', 'missing')}, "
                         f"modality {dataset.get('Modality', 'missing')})")
    return dataset


def _rasterise(path: Path, name: str, contours, series: Series) -> np.ndarray:
    """The voxels of an ROI's closed planar contours (LPS mm) on the series grid, bool ``(X, Y, Z)``."""
    shape = series.data.shape
    to_voxel = np.linalg.inv(series.lps_affine)
    mask, edges = np.zeros(shape, bool), []
    for number, points in enumerate(contours, 1):
        ijk = points @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        k = float(np.median(ijk[:, 2]))
        if np.abs(ijk[:, 2] - round(k)).max() > CONTOUR_TOLERANCE:
            raise InputError(path, f"contour {number} of ROI {name!r} does not lie in a slice of the series "
                             f"{series.folder} (it spans slices {ijk[:, 2].min():.2f} to {ijk[:, 2].max():.2f}): "
                             "was it drawn on another series?")
        if not 0 <= round(k) < shape[2]:
            raise InputError(path, f"contour {number} of ROI {name!r} lies outside the series {series.folder} "
                             f"(at slice {k:.2f} of {shape[2]})")
        rows, columns = polygon(ijk[:, 0], ijk[:, 1], shape[:2])
        plane = np.zeros(shape[:2], bool)
        plane[rows, columns] = True
        mask[:, :, round(k)] ^= plane  # even-odd: a contour inside another is a hole
        edges.append((round(k), _on_contour(ijk[:, :2], shape[:2])))
    for k, (rows, columns) in edges:  # after every hole: a voxel on a hole's contour is the ROI's too
        mask[rows, columns, k] = True
    return mask


def _on_contour(vertices: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """The voxels ``(i, j)`` whose centres lie on a closed polygon's edges, within :data:`ON_CONTOUR` voxel.

    Each edge is sampled every quarter voxel along its longer axis, so that
    the sample nearest to such a centre rounds to it; each rounded sample is
    then kept if it lies that close to its edge.
    """
    start, end = vertices, np.roll(vertices, -1, axis=0)
    counts = 4 * np.ceil(np.abs(end - start).max(axis=1)).astype(int) + 1
    edge = np.repeat(np.arange(len(start)), counts)
    fraction = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) / np.repeat(
        np.maximum(counts - 1, 1), counts)
    step = end[edge] - start[edge]
    centres = np.rint(start[edge] + fraction[:, None] * step)
    along = np.clip(((centres - start[edge]) * step).sum(axis=1) / np.maximum((step * step).sum(axis=1), 1e-12), 0, 1)
    near = np.linalg.norm(centres - start[edge] - along[:, None] * step, axis=1) <= ON_CONTOUR
    inside = near & (centres >= 0).all(axis=1) & (centres < np.asarray(shape)).all(axis=1)
    rows, columns = centres[inside].astype(int).T
    return rows, columns


def _roi_contours(path: Path, dataset: Dataset) -> dict[int, tuple]:
    """ROI number -> (display colour or None, closed planar contours as (N, 3) LPS arrays, other contour count)."""
    found = {}
    for item in dataset.get("ROIContourSequence", []):
        closed, other = [], 0
        for contour in item.get("ContourSequence", []):
            points = np.asarray(contour.get("ContourData", []), np.float64).reshape(-1, 3)
            if contour.get("ContourGeometricType", "") == "CLOSED_PLANAR" and len(points) >= 3:
                closed.append(points)
            else:
                other += 1
        colour = item.get("ROIDisplayColor")
        found[int(item.ReferencedROINumber)] = (tuple(int(c) for c in colour) if colour else None, closed, other)
    return found


def _kinds(dataset: Dataset) -> dict[int, str]:
    return {int(item.ReferencedROINumber): str(item.get("RTROIInterpretedType", "") or "")
            for item in dataset.get("RTROIObservationsSequence", [])}


def _label_map(masks: list[np.ndarray], rois: list[Roi], path: Path) -> tuple[np.ndarray, list[Roi]]:
    """Paint ROI masks into one label map, the smaller ROI winning where they overlap, so that an ROI that
    encloses others (a body contour) never hides them whatever their order; record which labels each encloses."""
    sizes = [int(np.count_nonzero(m)) for m in masks]
    labels = np.zeros(masks[0].shape, np.int32)
    for n in sorted(range(len(masks)), key=lambda n: -sizes[n]):
        labels[masks[n]] = rois[n].label
    counts = np.bincount(labels.ravel(), minlength=len(rois) + 1)
    result = []
    for roi, mask in zip(rois, masks):
        inside = np.bincount(labels[mask], minlength=len(rois) + 1)
        within = tuple(int(b) for b in np.flatnonzero((inside == counts) & (counts > 0)) if b not in (0, roi.label))
        shared = int(mask.sum() - inside[[roi.label, *within]].sum())
        if shared:
            others = [r.name for r in rois if inside[r.label] and r.label not in (roi.label, *within)]
            warnings.warn(f"{path}: ROI {roi.name!r} overlaps {', '.join(map(repr, others))} by {shared} voxels, "
                          "which the label map gives to the smaller ROI", stacklevel=3)
        result.append(Roi(roi.label, roi.name, roi.number, roi.colour, roi.kind, within))
    return labels, result


def read_rtstruct(path, series: Series) -> Structures:
    """The ROIs of an RTSTRUCT as a label map on ``series``' grid (see the module's rules for voxels).

    ROIs are numbered 1, 2, ... in the RTSTRUCT's order; where two overlap,
    the smaller wins and the larger records it in :attr:`Roi.within` when it
    encloses it wholly (a warning names partial overlaps).  Raises
    :class:`~nipype_inrlddmm.io.InputError` naming the file (and the ROI)
    when it is not an RTSTRUCT, an ROI's frame of reference is not the
    series', an ROI has no contour or covers no voxel, or a contour lies off
    the series' slices.  ROIs of points or open lines only are listed in
    :attr:`Structures.skipped`.
    """
    path = Path(path)
    dataset = _read_rtstruct_file(path)
    contours, kinds = _roi_contours(path, dataset), _kinds(dataset)
    rois, masks, skipped = [], [], []
    for item in dataset.StructureSetROISequence:
        number, name = int(item.ROINumber), str(item.get("ROIName", "") or f"ROI {item.ROINumber}")
        frame = str(item.get("ReferencedFrameOfReferenceUID", ""))
        if frame != series.frame_of_reference_uid:
            raise InputError(path, f"ROI {name!r} is in frame of reference {frame or '(none)'}, the series "
                             f"{series.folder} in {series.frame_of_reference_uid or '(none)'}: the RTSTRUCT was "
                             "not drawn on this series")
        colour, closed, other = contours.get(number, (None, [], 0))
        if not closed:
            if other:
                skipped.append(name)
                continue
            raise InputError(path, f"ROI {name!r} (number {number}) is empty: it has no contour")
        mask = _rasterise(path, name, closed, series)
        if not mask.any():
            raise InputError(path, f"ROI {name!r} (number {number}) covers no voxel centre of the series "
                             f"{series.folder}")
        rois.append(Roi(len(rois) + 1, name, number, colour, kinds.get(number, "")))
        masks.append(mask)
    if not rois:
        raise InputError(path, "holds no ROI with a closed contour")
    labels, rois = _label_map(masks, rois, path)
    return Structures(labels, tuple(rois), tuple(skipped))


def match_rois(structures: Structures, rois, path) -> Structures:
    """``structures`` (read from the RTSTRUCT ``path``) renumbered by ROI name as ``rois``: a day's
    reference contours in the labels of the planning ROIs, to be compared with them.

    Each ROI of a name in ``rois`` takes that ROI's label; the others are
    left out.  Returns the label map with the matched ROIs of ``rois``, by
    label (and ``structures``' skipped ones).  Raises :class:`~nipype_inrlddmm.io.InputError` naming ``path``
    when no name is shared, listing both.
    """
    by_name = {roi.name: roi for roi in rois}
    labels, matched = np.zeros(structures.labels.shape, np.int32), []
    for roi in structures.rois:
        if roi.name in by_name:
            labels[structures.labels == roi.label] = by_name[roi.name].label
            matched.append(by_name[roi.name])
    if not matched:
        raise InputError(path, f"shares no ROI name with the moving RTSTRUCT (its ROIs: "
                         f"{', '.join(r.name for r in structures.rois)}; the moving ones: "
                         f"{', '.join(r.name for r in rois)})")
    return Structures(labels, tuple(sorted(matched, key=lambda roi: roi.label)), structures.skipped)


def _slice_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (without the repeated first vertex) ``(N, 2)`` in ``(i, j)`` voxels around a 2-D mask."""
    padded = np.pad(plane, 1).astype(np.float32)  # closes the polygons of ROIs touching the border
    return [contour[:-1] - 1 for contour in find_contours(padded, _CONTOUR_LEVEL)]


def _referenced_frame(series: Series) -> Dataset:
    """The RTSTRUCT's reference to the series: frame of reference, study, series and every slice."""
    images = []
    for sop_class, sop_instance in series.instances:
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = sop_class, sop_instance
        images.append(image)
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_COMPONENT_CLASS
    study.ReferencedSOPInstanceUID = str(series.header.StudyInstanceUID)
    study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    return frame


def _roi_items(roi: Roi, mask: np.ndarray, series: Series) -> tuple[Dataset, Dataset, Dataset]:
    """The StructureSetROI, ROIContour and RTROIObservations items of one ROI; its contours on every slice."""
    structure = Dataset()
    structure.ROINumber, structure.ROIName = roi.number, roi.name
    structure.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
    structure.ROIGenerationAlgorithm = "AUTOMATIC"
    contours, lps = [], series.lps_affine
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        for vertices in _slice_contours(mask[:, :, k]):
            points = np.column_stack([vertices, np.full(len(vertices), k)]) @ lps[:3, :3].T + lps[:3, 3]
            image = Dataset()
            image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = series.instances[k]
            contour = Dataset()
            contour.ContourImageSequence = [image]
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            contour.ContourNumber = len(contours) + 1
            contour.ContourData = [f"{v:.4f}" for v in points.reshape(-1)]
            contours.append(contour)
    item = Dataset()
    item.ReferencedROINumber = roi.number
    if roi.colour is not None:
        item.ROIDisplayColor = list(roi.colour)
    if contours:  # an ROI carried wholly outside the image keeps its place, without contours
        item.ContourSequence = contours
    observation = Dataset()
    observation.ObservationNumber = observation.ReferencedROINumber = roi.number
    observation.RTROIInterpretedType, observation.ROIInterpreter = roi.kind, ""
    return structure, item, observation


def write_rtstruct(path, labels: np.ndarray, rois, series: Series, *, label: str, name: str,
                   description: str) -> Path:
    """Write the ROIs of a label map on ``series``' grid as a new RTSTRUCT referencing that series.

    ``labels`` is integer ``(X, Y, Z)`` on the series' grid; each :class:`Roi`
    becomes one ROI (its name, number, colour and interpreted type) whose
    contours are drawn on the series' slices (:meth:`Roi.mask`).  The
    structure set belongs to the series' patient and study, references its
    frame of reference, series and every slice, is labelled ``label`` (at
    most 16 characters), named ``name`` (at most 64) and described by
    ``description``, and is marked UNAPPROVED: contours made by a program
    await a clinician's review.  Written atomically.
    """
    labels = np.asarray(labels)
    if labels.shape != series.data.shape:
        raise ValueError(f"the label map has shape {labels.shape}, the series {series.folder} {series.data.shape}")
    if len(label) > 16 or len(name) > 64:
        raise ValueError(f"a structure set label holds at most 16 characters and a name 64: {label!r}, {name!r}")
    header, uid, (date, time) = series.header, generate_uid(), _now()
    ds = _file_dataset(RTStructureSetStorage, uid)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription"):
        setattr(ds, keyword, header.get(keyword, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.OperatorsName = "RTSTRUCT", generate_uid(), 1, ""
    ds.SeriesDescription, ds.Manufacturer, ds.SoftwareVersions = name, "nipype_inrlddmm", __version__
    ds.InstanceCreationDate = ds.StructureSetDate = ds.SeriesDate = date
    ds.InstanceCreationTime = ds.StructureSetTime = ds.SeriesTime = time
    ds.StructureSetLabel, ds.StructureSetName, ds.StructureSetDescription = label, name, description
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "")
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(series)]
    items = [_roi_items(roi, roi.mask(labels), series) for roi in rois]
    ds.StructureSetROISequence = [structure for structure, _, _ in items]
    ds.ROIContourSequence = [contour for _, contour, _ in items]
    ds.RTROIObservationsSequence = [observation for _, _, observation in items]
    ds.ApprovalStatus = "UNAPPROVED"
    return _save(ds, Path(path))


def label_table(rois) -> list[dict]:
    """Rows of ``labels.tsv`` for :func:`~nipype_inrlddmm.io.write_csv`: label id, ROI name, number, colour
    (``R G B``), interpreted type and the labels it encloses (space-separated ids)."""
    return [{"index": roi.label, "name": roi.name, "roi_number": roi.number,
             "colour": "" if roi.colour is None else " ".join(map(str, roi.colour)), "type": roi.kind,
             "within": " ".join(map(str, roi.within))} for roi in rois]


def read_label_table(path) -> tuple[Roi, ...]:
    """The ROIs of a ``labels.tsv`` (:func:`label_table`); of a plain one (columns ``index`` and ``name``),
    ROI numbers are the label ids, with no colour, type or enclosed labels."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "label table does not exist")
    rows = list(csv.DictReader(path.read_text().splitlines(), delimiter="\t"))
    if not rows or not {"index", "name"} <= set(rows[0]):
        raise InputError(path, "expected a TSV with columns 'index' and 'name' (and optionally 'roi_number', "
                         "'colour', 'type', 'within') and at least one row")
    try:
        rois = tuple(Roi(int(row["index"]), row["name"], int(row.get("roi_number") or row["index"]),
                         tuple(int(c) for c in row["colour"].split()) if row.get("colour") else None,
                         row.get("type") or "", tuple(int(k) for k in (row.get("within") or "").split()))
                     for row in rows)
    except ValueError as error:
        raise InputError(path, f"an id, ROI number or colour is not an integer ({error})") from error
    for roi in rois:
        if roi.colour is not None and (len(roi.colour) != 3 or not all(0 <= c <= 255 for c in roi.colour)):
            raise InputError(path, f"the colour of ROI {roi.name!r} is not three values 0-255: {roi.colour}")
    return rois
