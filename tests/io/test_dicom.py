"""DICOM in and out: series geometry, RTSTRUCT contours, bad folders and files, the validator."""

import csv
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.spatial.transform import Rotation

from nipype_inrlddmm import io
from nipype_inrlddmm.io import dicom
from nipype_inrlddmm.evaluation import metrics

SHAPE = (20, 20, 6)


def _affine(spacing, *, degrees=(0.0, 0.0, 0.0), origin=(-12.0, 8.5, -30.25)):
    """A RAS affine with the given voxel size, turned by ``degrees`` about x, y and z (right-handed)."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _labels(shape=SHAPE):
    """A body (1) holding a lung (2) with a hole, and a cord (3): nested and touching the grid's border."""
    x, y, z = np.indices(shape)
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    labels = np.zeros(shape, np.int32)
    labels[(x - cx) ** 2 + (y - cy) ** 2 < (0.45 * shape[0]) ** 2] = 1
    labels[((x - cx + 3) ** 2 + (y - cy) ** 2 < (0.2 * shape[0]) ** 2) & (z > 0)] = 2
    labels[(x - cx + 3) ** 2 + (y - cy) ** 2 < 1.5] = 1  # a hole in the lung
    labels[(x - cx - 4) ** 2 + (y - cy - 3) ** 2 < 3] = 3
    labels[0, :, 2] = 1  # the body touches the border on one slice
    return labels


ROIS = (dicom.Roi(1, "BODY", 1, (0, 255, 0), "EXTERNAL", (2, 3)), dicom.Roi(2, "Lung_L", 7, (0, 0, 255), "ORGAN"),
        dicom.Roi(3, "SpinalCord", 12, (255, 255, 0), "ORGAN"))


@pytest.fixture
def series(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1500, SHAPE).astype(np.float32)
    return dicom.write_series(tmp_path / "ct", data, _affine((1.5, 1.5, 2.5)))


@pytest.mark.parametrize("degrees", [(0.0, 0.0, 0.0), (17.0, -8.0, 31.0)], ids=["axial", "oblique"])
def test_a_series_written_and_read_back_gives_the_same_array_and_affine(tmp_path, degrees):
    rng = np.random.default_rng(1)
    affine = _affine((0.8, 0.65, 2.5), degrees=degrees)
    integers = rng.integers(-1024, 3000, (9, 7, 5)).astype(np.float32)
    back = dicom.read_series(dicom.write_series(tmp_path / "int", integers, affine).folder)
    np.testing.assert_array_equal(back.data, integers)  # a slope of 1: exact
    assert dicom.series_shape(tmp_path / "int") == back.data.shape  # from one header, as a study sizes its nodes
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    floats = rng.normal(0.0, 300.0, (9, 7, 5)).astype(np.float32)
    back = dicom.read_series(dicom.write_series(tmp_path / "float", floats, affine).folder)
    slope = float(pydicom.dcmread(sorted((tmp_path / "float").iterdir())[0]).RescaleSlope)
    assert slope < 0.05
    np.testing.assert_allclose(back.data, floats, atol=slope / 2 + 1e-3)  # the rescale is applied
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    # The NIfTI a command line sees: the same voxels on the same RAS grid.
    converted, read = dicom.as_nifti(tmp_path / "int", tmp_path / "nifti")
    assert read.folder == tmp_path / "int" and dicom.as_nifti(converted, tmp_path) == (converted, None)
    data, nifti_affine = io.load_image(converted)
    np.testing.assert_array_equal(data, integers)
    np.testing.assert_allclose(nifti_affine, affine, atol=1e-4)


def test_slices_are_ordered_by_position_not_by_file_name(tmp_path, series):
    files = sorted(series.folder.iterdir())
    for n, path in enumerate(reversed(files)):  # names now run against the slices
        path.rename(series.folder / f"x{n:03d}.tmp")
    back = dicom.read_series(series.folder)
    np.testing.assert_array_equal(back.data, series.data)
    np.testing.assert_allclose(back.affine, series.affine, atol=1e-6)


def _edit(path, change):
    dataset = pydicom.dcmread(path)
    change(dataset)
    dataset.save_as(path)


def _shift(offset):
    def change(dataset):
        dataset.ImagePositionPatient = [float(v) + o for v, o in zip(dataset.ImagePositionPatient, offset)]
    return change


def _two_series(series, tmp_path):
    other = dicom.write_series(tmp_path / "other", series.data[:, :, :3], series.affine)
    for path in other.folder.iterdir():
        shutil.copy(path, series.folder / f"other-{path.name}")


def _tilt(series, tmp_path):
    for k, path in enumerate(sorted(series.folder.iterdir())):
        _edit(path, _shift((0.3 * k, 0.0, 0.0)))  # 0.3 mm aside per 2.5 mm slice: about 7 degrees


def _unreadable(series, tmp_path):
    path = sorted(series.folder.iterdir())[2]
    _edit(path, lambda dataset: setattr(dataset, "PixelData", dataset.PixelData[:100]))


@pytest.mark.parametrize("damage, problem", [
    (_two_series, "holds 2 DICOM image series"),
    (lambda s, t: sorted(s.folder.iterdir())[3].unlink(), "misses 1 slice(s) between CT.0003.dcm and CT.0005.dcm"),
    (lambda s, t: shutil.copy(sorted(s.folder.iterdir())[2], s.folder / "copy.dcm"),
     "holds duplicated slices: CT.0003.dcm and copy.dcm"),
    (lambda s, t: _edit(sorted(s.folder.iterdir())[3], _shift((0, 0, 0.8))),
     "has uneven slice spacing: CT.0003.dcm and CT.0004.dcm are 3.300 mm apart where the other slices are 2.500 mm"),
    (_tilt, "not stacked along their normal (gantry tilt of about 6.84 degrees"),
    (lambda s, t: _edit(sorted(s.folder.iterdir())[1], lambda d: setattr(d, "Rows", 18)), "its slices differ in rows"),
    (lambda s, t: [p.unlink() for p in s.folder.iterdir()] and (s.folder / "notes.txt").write_text("no images"),
     "holds no DICOM image"),
], ids=["two-series", "missing", "duplicated", "uneven", "gantry-tilt", "sizes", "no-image"])
def test_a_bad_series_is_refused_naming_the_folder_and_the_problem(series, tmp_path, damage, problem):
    damage(series, tmp_path)
    with pytest.raises(io.InputError, match="^" + str(series.folder)) as error:
        dicom.read_series(series.folder)
    assert problem in str(error.value)


def test_pixels_that_cannot_be_decoded_are_refused_naming_the_file(series, tmp_path):
    _unreadable(series, tmp_path)
    with pytest.raises(io.InputError, match=f"^{sorted(series.folder.iterdir())[2]}: cannot read the pixels"):
        dicom.read_series(series.folder)


def test_rtstruct_round_trip_gives_the_label_map_back(series, tmp_path):
    labels = _labels()
    path = dicom.write_rtstruct(tmp_path / "rs.dcm", labels, ROIS, series, label="Test", name="round trip",
                                description="written by the tests")
    read = dicom.read_rtstruct(path, series)
    np.testing.assert_array_equal(read.labels, labels)
    assert [(r.label, r.name, r.number, r.colour, r.kind, r.within) for r in read.rois] == \
        [(r.label, r.name, r.number, r.colour, r.kind, r.within) for r in ROIS]
    written = pydicom.dcmread(path)
    assert written.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == series.frame_of_reference_uid
    referenced = written.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series.series_uid
    assert [i.ReferencedSOPInstanceUID for i in referenced.ContourImageSequence] == [u for _, u in series.instances]
    assert written.ApprovalStatus == "UNAPPROVED"
    assert not list(tmp_path.glob(".*partial*"))


def test_rtstruct_read_back_by_another_library_gives_the_same_masks(series, tmp_path):
    """rt-utils fills polygons with OpenCV from rounded vertices, where we test voxel centres with scikit-image."""
    rt_utils = pytest.importorskip("rt_utils", reason="rt-utils (OpenCV) is not installed: pip install rt-utils")
    labels = _labels()
    path = dicom.write_rtstruct(tmp_path / "rs.dcm", labels, ROIS, series, label="Test", name="rt-utils",
                                description="written by the tests")
    structures = rt_utils.RTStructBuilder.create_from(str(series.folder), str(path))
    assert structures.get_roi_names() == ["BODY", "Lung_L", "SpinalCord"]
    for roi in ROIS:
        theirs = structures.get_roi_mask_by_name(roi.name).transpose(1, 0, 2)  # (rows, columns, slices) -> (i, j, k)
        mine = roi.mask(labels)
        assert metrics.mask_dice(theirs, mine) >= 0.97, roi.name
        assert mine.sum() > 10


@pytest.mark.filterwarnings("ignore:'FileDataset.is_:DeprecationWarning")  # how rt-utils writes with pydicom
def test_an_rtstruct_written_by_another_library_is_read_as_its_masks(series, tmp_path):
    """rt-utils (OpenCV) draws contours through the centres of an ROI's outermost voxels: those voxels are the ROI's."""
    rt_utils = pytest.importorskip("rt_utils", reason="rt-utils (OpenCV) is not installed: pip install rt-utils")
    labels = _labels()
    structures = rt_utils.RTStructBuilder.create_new(str(series.folder))
    for roi in ROIS:
        structures.add_roi(mask=roi.mask(labels).transpose(1, 0, 2), name=roi.name)  # (rows, columns, slices)
    structures.save(str(tmp_path / "theirs.dcm"))
    read = dicom.read_rtstruct(tmp_path / "theirs.dcm", series)
    assert [roi.name for roi in read.rois] == [roi.name for roi in ROIS]
    for theirs, mine in zip(read.rois, ROIS):
        assert metrics.mask_dice(theirs.mask(read.labels), mine.mask(labels)) >= 0.97, mine.name


def test_overlapping_rois_keep_the_smaller_and_an_enclosing_roi_its_whole(series, tmp_path):
    """Planning systems list the body first or last: either way an organ inside it keeps its voxels."""
    labels = _labels()
    reordered = (ROIS[1], ROIS[2], ROIS[0])
    path = dicom.write_rtstruct(tmp_path / "rs.dcm", labels, reordered, series, label="Test", name="order",
                                description="body last")
    read = dicom.read_rtstruct(path, series)
    assert [r.name for r in read.rois] == ["Lung_L", "SpinalCord", "BODY"]
    names = {r.name: r for r in read.rois}
    for roi in ROIS:
        np.testing.assert_array_equal(names[roi.name].mask(read.labels), roi.mask(labels))
    # A PTV across the lung's edge: the shared voxels go to the smaller, and a warning names the two.
    crossing = labels.copy()
    crossing[(labels == 2) & (np.indices(SHAPE)[0] >= 7)] = 5  # lung and PTV
    crossing[7:12, 8:12, 1:4][crossing[7:12, 8:12, 1:4] != 5] = 4  # PTV alone
    rois = (dicom.Roi(2, "Lung_L", 7, None, "ORGAN", (5,)), dicom.Roi(4, "PTV", 20, None, "PTV", (5,)))
    path = dicom.write_rtstruct(tmp_path / "ptv.dcm", crossing, rois, series, label="Test", name="overlap",
                                description="partial overlap")
    with pytest.warns(UserWarning, match=r"ROI 'Lung_L' overlaps 'PTV' by \d+ voxels, which the label map gives"):
        read = dicom.read_rtstruct(path, series)
    lung, ptv = read.rois
    assert (lung.within, ptv.within) == ((), ())
    sizes = {lung.label: np.isin(crossing, (2, 5)).sum(), ptv.label: np.isin(crossing, (4, 5)).sum()}
    expected = np.select([crossing == 2, crossing == 4, crossing == 5],
                         [lung.label, ptv.label, min(sizes, key=sizes.get)])
    np.testing.assert_array_equal(read.labels, expected)


def test_a_bad_rtstruct_is_refused_naming_the_file_and_the_roi(series, tmp_path):
    path = dicom.write_rtstruct(tmp_path / "rs.dcm", _labels(), ROIS, series, label="Test", name="bad",
                                description="to damage")
    other = dicom.write_series(tmp_path / "other", series.data, series.affine)  # a new frame of reference
    with pytest.raises(io.InputError, match=f"^{path}: ROI 'BODY' is in frame of reference "
                       f"{series.frame_of_reference_uid}, the series {other.folder} in "
                       f"{other.frame_of_reference_uid}"):
        dicom.read_rtstruct(path, other)
    _edit(path, lambda dataset: delattr(dataset.ROIContourSequence[1], "ContourSequence"))
    with pytest.raises(io.InputError, match=f"^{path}: ROI 'Lung_L' \\(number 7\\) is empty: it has no contour"):
        dicom.read_rtstruct(path, series)
    with pytest.raises(io.InputError, match=f"^{series.folder / 'CT.0001.dcm'}: is not an RTSTRUCT"):
        dicom.read_rtstruct(series.folder / "CT.0001.dcm", series)
    thicker = dicom.write_series(tmp_path / "thick", series.data[:, :, :3], series.affine @ np.diag([1, 1, 2, 1]),
                                 frame_of_reference_uid=series.frame_of_reference_uid)
    good = dicom.write_rtstruct(tmp_path / "good.dcm", _labels(), ROIS, series, label="Test", name="good",
                                description="on the thin slices")
    with pytest.raises(io.InputError, match="contour .* of ROI 'BODY' does not lie in a slice of the series"):
        dicom.read_rtstruct(good, thicker)


def _validator_errors(path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]




FEW = ["--coarse-iterations", "10", "--distill-iterations", "5", "--fine-iterations", "10", "--quiet"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One phantom patient in NIfTI and in DICOM (data/generate_cohort.py --dicom)."""
    from nipype_inrlddmm.phantom import write_cohort

    return write_cohort(tmp_path_factory.mktemp("cohort"), 1, shape=(64, 56, 24), dicom=True).parent / "p01"


def test_registering_through_dicom_carries_the_rois_as_the_nifti_route_does(phantom, tmp_path, capsys):
    from nipype_inrlddmm import cli
    from nipype_inrlddmm.phantom import LABELS

    # The NIfTI route registers the series' own voxels (the DICOM pixels are HU rounded to integers): the
    # same images give the same field, so what differs is the structures' route alone.
    images = {name: io.save_image(tmp_path / f"{name}.nii.gz", series.data, series.affine)
              for name, series in (("ct", dicom.read_series(phantom / "ct")),
                                   ("cbct", dicom.read_series(phantom / "cbct")))}
    nifti = ["--moving", str(images["ct"]), "--fixed", str(images["cbct"]),
             "--moving-labels", str(phantom / "ct_labels.nii.gz"),
             "--fixed-labels", str(phantom / "cbct_labels.nii.gz")]
    assert cli.main(["register", *nifti, "--out-dir", str(tmp_path / "nifti"), *FEW]) == 0
    day = tmp_path / "day" / "ct"  # the day's series in a folder of the planning series' name
    shutil.copytree(phantom / "cbct", day)
    through_dicom = ["--moving", str(phantom / "ct"), "--fixed", str(day),
                     "--moving-rtstruct", str(phantom / "ct_rtstruct.dcm"),
                     "--fixed-rtstruct", str(phantom / "cbct_rtstruct.dcm")]
    out = tmp_path / "dicom"
    capsys.readouterr()
    assert cli.main(["register", *through_dicom, "--out-dir", str(out), *FEW]) == 0
    assert f"RTSTRUCT on the fixed series: {out / 'rtstruct.dcm'}" in capsys.readouterr().out
    cbct = dicom.read_series(phantom / "cbct")
    written = pydicom.dcmread(out / "rtstruct.dcm")
    assert [item.ROIName for item in written.StructureSetROISequence] == list(LABELS.values())
    frame = written.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == cbct.frame_of_reference_uid
    referenced = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == cbct.series_uid
    assert [i.ReferencedSOPInstanceUID for i in referenced.ContourImageSequence] == [u for _, u in cbct.instances]
    assert "Propagated by INR-LDDMM" in written.StructureSetDescription
    carried = dicom.read_rtstruct(out / "rtstruct.dcm", cbct)
    by_nifti = np.asarray(nib.load(tmp_path / "nifti" / "warped_labels.nii.gz").dataobj)
    np.testing.assert_array_equal(nib.load(out / "displacement.nii.gz").get_fdata(),
                                  nib.load(tmp_path / "nifti" / "displacement.nii.gz").get_fdata())
    for roi in carried.rois:  # the body encloses the organs in both: the voxels of every label
        assert metrics.mask_dice(roi.mask(carried.labels), roi.mask(by_nifti)) >= 0.97, roi.name
    assert [row["name"] for row in csv.DictReader(open(out / "labels.tsv"), delimiter="\t")] == list(LABELS.values())
    assert [row["name"] for row in csv.DictReader(open(out / "dice.csv"))] == list(LABELS.values())
    assert (out / "warped_labels.nii.gz").is_file()


def test_a_moving_rtstruct_needs_dicom_series_and_nothing_is_written_otherwise(phantom, tmp_path, capsys):
    from nipype_inrlddmm import cli

    out = tmp_path / "out"
    code = cli.main(["register", "--moving", str(phantom / "ct"), "--fixed", str(phantom / "cbct.nii.gz"),
                     "--moving-rtstruct", str(phantom / "ct_rtstruct.dcm"), "--out-dir", str(out), *FEW])
    assert code == 2
    assert "--moving-rtstruct: is carried onto the fixed series as rtstruct.dcm: give --fixed as a folder" \
        in capsys.readouterr().err
    code = cli.main(["register", "--moving", str(phantom / "ct"), "--fixed", str(phantom / "cbct"),
                     "--moving-rtstruct", str(phantom / "cbct_rtstruct.dcm"), "--out-dir", str(out), *FEW])
    assert code == 2
    assert f"{phantom / 'cbct_rtstruct.dcm'}: ROI 'body' is in frame of reference" in capsys.readouterr().err
    assert not out.exists()


def test_the_written_files_pass_the_dicom_validator(series, phantom, tmp_path):
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy is not installed (Debian: apt-get install dicom3tools; `make test` installs it as "
                    "root through scripts/ensure-package.sh)")
    path = dicom.write_rtstruct(tmp_path / "rs.dcm", _labels(), ROIS, series, label="Test", name="validated",
                                description="for dciodvfy")
    generated = [phantom / "ct" / "CT.0001.dcm", phantom / "cbct" / "CT.0001.dcm", phantom / "ct_rtstruct.dcm",
                 phantom / "cbct_rtstruct.dcm"]
    for written in (path, *sorted(series.folder.iterdir())[:2], *generated):
        assert _validator_errors(written) == [], written


@pytest.mark.parametrize("affine", [[], ["--affine", "rigid"]], ids=["deformable", "pre-aligned"])
def test_the_rois_are_carried_the_same_with_or_without_reference_contours(phantom, tmp_path, affine):
    """Without --fixed-rtstruct nothing is evaluated, and the labels are carried through the written field (and
    the pre-aligned header): the same voxels as the registration's own evaluation carries."""
    from nipype_inrlddmm import cli

    series = ["--moving", str(phantom / "ct"), "--fixed", str(phantom / "cbct"),
              "--moving-rtstruct", str(phantom / "ct_rtstruct.dcm")]
    reference = ["--fixed-rtstruct", str(phantom / "cbct_rtstruct.dcm")]
    for name, extra in (("evaluated", reference), ("alone", [])):
        assert cli.main(["register", *series, *extra, *affine, "--out-dir", str(tmp_path / name), *FEW]) == 0
    assert not (tmp_path / "alone" / "dice.csv").exists()
    warped = [np.asarray(nib.load(tmp_path / name / "warped_labels.nii.gz").dataobj) for name in ("evaluated", "alone")]
    np.testing.assert_array_equal(*warped)
    cbct = dicom.read_series(phantom / "cbct")
    carried = [dicom.read_rtstruct(tmp_path / name / "rtstruct.dcm", cbct).labels for name in ("evaluated", "alone")]
    np.testing.assert_array_equal(*carried)
    np.testing.assert_array_equal(carried[0], warped[0])


def test_the_conversion_interfaces_chain_as_nodes(phantom, tmp_path):
    """Series -> NIfTI, RTSTRUCT -> labels on the CT, and those labels on the CBCT -> an RTSTRUCT of the CBCT."""
    from nipype import Node

    from nipype_inrlddmm.interfaces import DicomToNifti, LabelsToRTStruct, RTStructToLabels
    from nipype_inrlddmm.phantom import LABELS

    def run(interface, name):
        return Node(interface, name=name, base_dir=str(tmp_path)).run().outputs

    image = run(DicomToNifti(dicom_folder=str(phantom / "ct")), "series")
    ct = dicom.read_series(phantom / "ct")
    assert image.out_file == str(tmp_path / "series" / "ct.nii.gz")
    assert (image.series_uid, image.frame_of_reference_uid) == (ct.series_uid, ct.frame_of_reference_uid)
    data, affine = io.load_image(image.out_file)
    np.testing.assert_allclose(data, io.load_image(phantom / "ct.nii.gz")[0], atol=0.02)  # the rescale's rounding
    np.testing.assert_allclose(affine, io.load_image(phantom / "ct.nii.gz")[1], atol=1e-4)
    labels = run(RTStructToLabels(rtstruct=str(phantom / "ct_rtstruct.dcm"), dicom_folder=str(phantom / "ct")),
                 "labels")
    np.testing.assert_array_equal(io.load_labels(labels.out_file)[0], io.load_labels(phantom / "ct_labels.nii.gz")[0])
    assert io.load_label_names(labels.label_table) == LABELS and labels.skipped == []
    written = run(LabelsToRTStruct(labels=str(phantom / "cbct_labels.nii.gz"), label_table=labels.label_table,
                                   dicom_folder=str(phantom / "cbct")), "rtstruct")
    cbct = dicom.read_series(phantom / "cbct")
    back = dicom.read_rtstruct(written.out_file, cbct)
    np.testing.assert_array_equal(back.labels, io.load_labels(phantom / "cbct_labels.nii.gz")[0])
    assert back.rois[0].within == (2, 3, 4, 5, 6)  # the body is written whole, as the CT's RTSTRUCT had it
    assert pydicom.dcmread(written.out_file).ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == \
        cbct.frame_of_reference_uid


def test_labels_off_the_series_grid_are_refused_naming_the_file(phantom, tmp_path):
    from nipype_inrlddmm.interfaces import LabelsToRTStruct

    moved = dicom.read_series(phantom / "cbct").affine.copy()
    moved[:3, 3] += 1.0  # a millimetre off
    shifted = io.save_image(tmp_path / "shifted.nii.gz", io.load_labels(phantom / "cbct_labels.nii.gz")[0], moved)
    table = io.write_csv(tmp_path / "labels.tsv", [{"index": 1, "name": "body"}], delimiter="\t")
    with pytest.raises(io.InputError, match=f"^{shifted}: the label map is not on the grid of its image "
                       f"{phantom / 'cbct'}"):
        LabelsToRTStruct(labels=str(shifted), label_table=str(table), dicom_folder=str(phantom / "cbct")).run(
            cwd=str(tmp_path))
