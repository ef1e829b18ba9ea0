"""CT-like chest phantoms: a planning CT and a CBCT of the same patient.

The anatomy is analytic in world millimetres (RAS, origin at the grid
centre), so the CBCT and its labels are the same anatomy evaluated at
``x + u(x)`` with a known smooth deformation ``u``: the true displacement
is exact, with no interpolation error.  The CBCT then gets what makes the
real task hard: a global intensity change, a radial cupping artefact, noise
and a truncated cylindrical field of view.

With the package's convention ``warped(x) = moving(x + d(x))``, registering
moving = CT to fixed = CBCT should recover ``d = u``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

LABELS = {1: "body", 2: "right_lung", 3: "left_lung", 4: "heart", 5: "spinal_cord", 6: "target"}
#: Per label its RTSTRUCT display colour and RT ROI Interpreted Type (:func:`write_dicom`).
ROI_STYLES = {1: ((0, 160, 0), "EXTERNAL"), 2: ((80, 160, 255), "ORGAN"), 3: ((0, 80, 255), "ORGAN"),
              4: ((255, 0, 0), "ORGAN"), 5: ((255, 255, 0), "ORGAN"), 6: ((255, 0, 255), "GTV")}
FIELD_OF_VIEW_MM = (360.0, 300.0, 240.0)
AIR = -1000.0


@dataclass
class PhantomPair:
    """One patient.  The CBCT arrays lie on ``affine``, the CT arrays on ``ct_affine``."""

    ct: np.ndarray  # planning CT, HU (moving)
    ct_labels: np.ndarray
    cbct: np.ndarray  # daily CBCT, HU-like (fixed)
    cbct_labels: np.ndarray  # zero outside the CBCT field of view
    cbct_fov: np.ndarray  # bool, inside the CBCT cone
    displacement: np.ndarray  # (X, Y, Z, 3) true u(x), mm RAS, on the CBCT grid
    affine: np.ndarray  # the CBCT grid
    ct_affine: np.ndarray  # the CT grid (= affine unless make_pair got ct_grid)


def grid_affine(shape, field_of_view=FIELD_OF_VIEW_MM) -> np.ndarray:
    """RAS affine of a grid of ``shape`` covering ``field_of_view`` mm, centred at 0."""
    spacing = np.asarray(field_of_view, float) / np.asarray(shape, float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * spacing
    return affine


class _Texture:
    """A smooth random field in world mm, sampled by cubic interpolation."""

    def __init__(self, rng, cell_mm: float, smooth_cells: float, extent_mm: float = 600.0):
        n = int(extent_mm / cell_mm)
        noise = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), smooth_cells)
        self.values = noise / noise.std()
        self.cell_mm = cell_mm
        self.origin = -extent_mm / 2.0

    def __call__(self, points):
        ijk = (points - self.origin) / self.cell_mm
        return ndimage.map_coordinates(self.values, ijk.T, order=1, mode="nearest")


class _Anatomy:
    """Organ geometry of one patient, randomised around a common template."""

    def __init__(self, rng):
        jitter = lambda scale: rng.normal(0.0, scale)  # noqa: E731
        size = 1.0 + jitter(0.04)
        self.body = np.array([165.0, 115.0]) * size
        self.lungs = {
            2: (np.array([70.0, 5.0, 10.0]) + jitter(3), np.array([55.0, 75.0, 95.0]) * (1 + jitter(0.05))),
            3: (np.array([-75.0, 5.0, 10.0]) + jitter(3), np.array([50.0, 75.0, 95.0]) * (1 + jitter(0.05))),
        }
        self.heart = (np.array([-20.0, 40.0, -25.0]) + jitter(3), np.array([50.0, 42.0, 48.0]) * (1 + jitter(0.05)))
        self.target = (np.array([55.0, 30.0, 35.0]) + rng.normal(0, 5, 3), 18.0 + jitter(2))
        self.soft = _Texture(rng, cell_mm=4.0, smooth_cells=2.0)
        self.vessels = _Texture(rng, cell_mm=2.0, smooth_cells=1.2)

    @staticmethod
    def _inside(points, centre, semi):
        return (((points - centre) / semi) ** 2).sum(axis=1) <= 1.0

    def __call__(self, points):
        """``(N, 3)`` mm -> (HU ``(N,)``, label ``(N,)``)."""
        x, y, z = points.T
        radius = np.sqrt((x / self.body[0]) ** 2 + ((y + 5.0) / self.body[1]) ** 2)
        body = radius <= 1.0
        hu = np.full(len(points), AIR)
        labels = np.zeros(len(points), np.uint8)
        hu[body] = 40.0 + 25.0 * self.soft(points[body])
        labels[body] = 1
        hu[body & (radius > 0.9)] = -100.0  # subcutaneous fat
        ribs = (radius > 0.8) & (radius < 0.86) & (np.sin(2 * np.pi * z / 35.0) > 0.3)
        hu[ribs] = 700.0
        aorta = (x + 20.0) ** 2 + (y + 40.0) ** 2 <= 12.0**2
        hu[aorta] = 60.0
        for label, (centre, semi) in self.lungs.items():
            lung = body & self._inside(points, centre, semi)
            hu[lung] = -850.0 + 220.0 * np.clip(self.vessels(points[lung]) - 0.8, 0.0, 1.5)
            labels[lung] = label
        heart = self._inside(points, *self.heart)
        hu[heart] = 45.0 + 15.0 * self.soft(points[heart])
        chambers = self._inside(points, self.heart[0] + [8.0, 5.0, 0.0], self.heart[1] * 0.55)
        hu[heart & chambers] = 160.0
        labels[heart] = 4
        centre, r = self.target
        target = ((points - centre) ** 2).sum(axis=1) <= r**2
        hu[target] = 25.0 + 10.0 * self.soft(points[target])
        labels[target] = 6
        vertebra = x**2 + (y + 62.0) ** 2 <= 17.0**2
        arch = x**2 + (y + 88.0) ** 2 <= 16.0**2
        cord = x**2 + (y + 88.0) ** 2 <= 8.0**2
        hu[vertebra | arch] = 500.0
        hu[cord] = 35.0
        labels[vertebra | arch] = 1
        labels[cord] = 5
        return hu, labels


def breathing_and_setup(points, rng) -> np.ndarray:
    """A smooth, invertible ``(N, 3)`` displacement (mm) at ``(N, 3)`` points.

    Setup error (a rigid shift of a few mm), breathing (the lung bases move
    inferiorly and the anterior chest wall forwards, fading towards the
    spine) and a few local Gaussian bumps.  Its spatial gradient stays well
    below 1, so ``x -> x + u(x)`` is a diffeomorphism.
    """
    x, y, z = points.T
    shift = rng.uniform(-5.0, 5.0, 3)
    amplitude = rng.uniform(6.0, 12.0)
    posterior_fade = 1.0 / (1.0 + np.exp(-(y + 55.0) / 15.0))
    lungs = np.exp(-(x**2 / (2 * 90.0**2) + (y - 5.0) ** 2 / (2 * 70.0**2) + (z + 50.0) ** 2 / (2 * 80.0**2)))
    chest = np.exp(-(x**2 / (2 * 110.0**2) + (y - 90.0) ** 2 / (2 * 50.0**2) + z**2 / (2 * 100.0**2)))
    u = np.tile(shift, (len(points), 1))
    u[:, 2] -= amplitude * lungs * posterior_fade
    u[:, 1] += 0.4 * amplitude * chest * posterior_fade
    for _ in range(4):
        centre = rng.uniform([-100, -60, -80], [100, 80, 80])
        bump = np.exp(-((points - centre) ** 2).sum(axis=1) / (2 * 35.0**2))
        u += bump[:, None] * rng.uniform(-3.0, 3.0, 3)
    return u


def _grid_points(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def make_pair(
    shape=(128, 112, 48), *, seed: int = 0, field_of_view=FIELD_OF_VIEW_MM, ct_grid=None
) -> PhantomPair:
    """Generate one patient's planning CT, CBCT, labels and true deformation.

    Parameters
    ----------
    shape : grid of the CBCT (and of the CT unless ``ct_grid``); the
        physical field of view stays ``field_of_view`` mm, so a larger shape
        is a finer spacing.
    seed : patient identity; the same seed gives the same patient.
    ct_grid : optional ``(shape, affine)`` of the CT's own grid (any
        spacing and orientation); the CT is then evaluated there, exactly,
        and ``PhantomPair.ct_affine`` is that affine.
    """
    rng = np.random.default_rng(seed)
    anatomy = _Anatomy(rng)
    affine = grid_affine(shape, field_of_view)
    points = _grid_points(shape, affine)
    ct_shape, ct_affine = ct_grid if ct_grid is not None else (shape, affine)
    ct, ct_labels = anatomy(_grid_points(ct_shape, ct_affine))
    u = breathing_and_setup(points, rng)
    return _day_scan(anatomy, ct.reshape(ct_shape).astype(np.float32), ct_labels.reshape(ct_shape).astype(np.uint8),
                     np.asarray(ct_affine, float), u, shape, affine, field_of_view, rng)


def _day_scan(anatomy, ct, ct_labels, ct_affine, u, shape, affine, field_of_view, rng) -> PhantomPair:
    """The CBCT of ``anatomy`` deformed by ``u`` (``(N, 3)`` mm at the grid's points), paired with the CT.

    The CBCT's intensity change, cupping, noise and field of view are drawn from ``rng``.
    """
    points = _grid_points(shape, affine)
    cbct, cbct_labels = anatomy(points + u)
    x, y, z = points.T
    cylinder = np.sqrt(x**2 + y**2) / 155.0
    fov = (cylinder <= 1.0) & (np.abs(z) <= 0.42 * field_of_view[2])
    gain, offset = rng.uniform(0.85, 0.95), rng.uniform(20.0, 60.0)
    cbct = gain * cbct + offset - 80.0 * cylinder**2
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 0.7).reshape(-1)
    cbct = cbct + 30.0 * noise / noise.std()
    cbct[~fov] = AIR
    cbct_labels[~fov] = 0

    def volume(values, dtype):
        return values.reshape(shape).astype(dtype)

    return PhantomPair(ct=ct, ct_labels=ct_labels, cbct=volume(cbct, np.float32),
                       cbct_labels=volume(cbct_labels, np.uint8), cbct_fov=volume(fov, bool),
                       displacement=u.reshape(*shape, 3).astype(np.float32), affine=affine, ct_affine=ct_affine)


def make_course(shape=(128, 112, 48), n_fractions: int = 5, *, seed: int = 0,
                field_of_view=FIELD_OF_VIEW_MM) -> list[PhantomPair]:
    """One patient's course of treatment: the same planning CT against ``n_fractions`` daily CBCTs.

    The deformation drifts slowly from day to day: fraction ``k`` of ``n``
    is ``u_k = (1 - s) u_A + s u_B`` with ``s = k / (n - 1)`` between two
    draws of :func:`breathing_and_setup`, so consecutive days differ by a
    fraction of one day's deformation (setup shift and breathing included).
    A convex combination of two fields whose gradients stay below 1 keeps
    that bound: every ``x -> x + u_k(x)`` is a diffeomorphism.  Each day
    gets its own CBCT intensity change and noise.  Every pair holds the same
    CT arrays; ``seed`` is the patient.
    """
    if n_fractions < 1:
        raise ValueError(f"a course needs at least one fraction, got {n_fractions}")
    rng = np.random.default_rng(seed)
    anatomy = _Anatomy(rng)
    affine = grid_affine(shape, field_of_view)
    points = _grid_points(shape, affine)
    ct, ct_labels = (values.reshape(shape).astype(dtype) for values, dtype in zip(anatomy(points),
                                                                                  (np.float32, np.uint8)))
    first, last = breathing_and_setup(points, rng), breathing_and_setup(points, rng)
    return [_day_scan(anatomy, ct, ct_labels, affine, (1 - s) * first + s * last, shape, affine, field_of_view, rng)
            for s in np.linspace(0.0, 1.0, n_fractions)]


def write_dicom(folder, pair: PhantomPair, patient: str) -> dict[str, Path]:
    """One phantom patient in DICOM, as a planning system and a linac would give it.

    Into ``folder``: ``ct/`` (the planning CT series) and ``ct_rtstruct.dcm``
    (its labels as ROIs), ``cbct/`` (the day's CBCT series, its own study and
    frame of reference) and ``cbct_rtstruct.dcm`` (the CBCT's labels, the
    reference for the propagated contours).  The body ROI is the whole body,
    the organs inside it included, as planning systems draw it.
    """
    from .io import dicom

    folder = Path(folder)
    rois = [dicom.Roi(label, name, label, *ROI_STYLES[label], within=tuple(k for k in LABELS if k > 1) if label == 1
                      else ()) for label, name in LABELS.items()]
    written = {}
    for name, image, labels, affine, description in (("ct", pair.ct, pair.ct_labels, pair.ct_affine, "planning CT"),
                                                     ("cbct", pair.cbct, pair.cbct_labels, pair.affine, "CBCT")):
        series = dicom.write_series(folder / name, image, affine, patient_id=patient, patient_name=f"Phantom^{patient}",
                                    description=f"phantom {description}")
        present = [roi for roi in rois if roi.mask(labels).any()]
        written[name] = series.folder
        written[f"{name}_rtstruct"] = dicom.write_rtstruct(
            folder / f"{name}_rtstruct.dcm", labels, present, series, label="Phantom", name=f"phantom {description}",
            description=f"the phantom's labels on its {description}, written by nipype_inrlddmm")
    return written


def write_cohort(out_dir, n_patients: int = 3, *, shape=(128, 112, 48), seed: int = 0, dicom: bool = False) -> Path:
    """Write a phantom cohort and its manifest; return the manifest path.

    Per patient ``pNN/``: ``ct.nii.gz`` (moving), ``ct_labels.nii.gz``,
    ``cbct.nii.gz`` (fixed), ``cbct_labels.nii.gz``, ``cbct_fov.nii.gz`` and
    ``true_displacement.nii.gz`` (ITK/ANTs convention); with ``dicom`` also
    the CT and CBCT as DICOM series with an RTSTRUCT each (:func:`write_dicom`),
    listed by ``dicom_manifest.tsv`` (a study manifest of series folders and
    RTSTRUCTs).  ``manifest.tsv`` lists the NIfTI files with paths relative
    to ``out_dir``; ``labels.tsv`` names the labels.  Existing NIfTI files are rewritten
    identically (same seeds); DICOM files get new UIDs.
    """
    from . import io

    out_dir = Path(out_dir)
    rows, dicom_rows = [], []
    for index in range(n_patients):
        patient = f"p{index + 1:02d}"
        pair = make_pair(shape, seed=seed + index)
        folder = out_dir / patient
        files = {
            "moving": ("ct.nii.gz", pair.ct),
            "moving_labels": ("ct_labels.nii.gz", pair.ct_labels),
            "fixed": ("cbct.nii.gz", pair.cbct),
            "fixed_labels": ("cbct_labels.nii.gz", pair.cbct_labels),
            "fixed_mask": ("cbct_fov.nii.gz", pair.cbct_fov.astype(np.uint8)),
        }
        row = {"patient": patient}
        for column, (name, data) in files.items():
            io.save_image(folder / name, data, pair.affine)
            row[column] = f"{patient}/{name}"
        io.save_displacement(folder / "true_displacement.nii.gz", pair.displacement, pair.affine)
        if dicom:
            written = write_dicom(folder, pair, patient)
            dicom_rows.append({"patient": patient, **{column: str(written[name].relative_to(out_dir)) for column, name
                                                      in (("moving", "ct"), ("fixed", "cbct"),
                                                          ("moving_rtstruct", "ct_rtstruct"),
                                                          ("fixed_rtstruct", "cbct_rtstruct"))}})
        rows.append(row)
    io.write_csv(out_dir / "manifest.tsv", rows, delimiter="\t")
    if dicom:
        io.write_csv(out_dir / "dicom_manifest.tsv", dicom_rows, delimiter="\t")
    io.write_csv(out_dir / "labels.tsv", [{"index": k, "name": v} for k, v in LABELS.items()], delimiter="\t")
    return out_dir / "manifest.tsv"
