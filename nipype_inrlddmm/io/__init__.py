"""Files in and out: every format the package reads or writes, validated at the edge.

* :mod:`.files`: :class:`InputError` (a user's file that cannot be used,
  named in the message) and atomic writes;
* :mod:`.nifti`: images, label maps and masks;
* :mod:`.transforms`: ITK/ANTs displacement fields, affine transforms and
  landmarks (LPS in the file, RAS here);
* :mod:`.checkpoints`: velocity networks with their grid and version;
* :mod:`.tables`: CSV logs, label names and a study's manifest;
* :mod:`.dicom`: image series and RTSTRUCTs (imported on its own: it loads
  pydicom and scikit-image).

The names below are the public ones; import them from here.
"""

from .checkpoints import (CHECKPOINT_FORMAT, checkpoint_grid, checkpoint_moving, image_fingerprint, load_checkpoint,
                          save_checkpoint)
from .files import InputError, atomic_path, staged_folder
from .nifti import (check_affine, grid_mismatch, load_image, load_labels, load_mask, load_named_labels, load_volume,
                    open_volume, require_grid, save_image)
from .tables import (MANIFEST_COLUMNS, MANIFEST_FILES, MANIFEST_LABELS, check_image_kinds, load_label_names,
                     read_manifest, write_csv)
from .transforms import load_displacement, load_itk_affine, load_landmarks, save_displacement, save_itk_affine

__all__ = [
    "CHECKPOINT_FORMAT", "InputError", "MANIFEST_COLUMNS", "MANIFEST_FILES", "MANIFEST_LABELS", "atomic_path",
    "check_affine", "check_image_kinds", "checkpoint_grid", "checkpoint_moving", "grid_mismatch",
    "image_fingerprint", "load_checkpoint", "load_displacement", "load_image", "load_itk_affine",
    "load_label_names", "load_labels", "load_landmarks", "load_mask", "load_named_labels", "load_volume",
    "open_volume", "read_manifest", "require_grid", "save_checkpoint", "save_displacement", "save_image",
    "save_itk_affine", "staged_folder", "write_csv",
]
