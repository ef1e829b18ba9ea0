"""A registration assembled from files: the one place where files meet the engine.

* :mod:`.inputs`: a pair of images with its label maps and mask, read and
  validated; a previous registration's network to start from; the memory
  a stage needs;
* :mod:`.stages`: each stage from files to files (pre-alignment, coarse,
  distillation, fine, warps, the flow's trajectory): what each Nipype
  interface runs;
* :mod:`.register`: :func:`register_files`, the whole registration in one
  process with every output: what ``inrlddmm register`` runs;
* :mod:`.outputs`: the name of every output file, and the writers of the
  registration's result (network, field, warped image);
* :mod:`.dicom`: :func:`~.dicom.register_dicom`, the same registration of
  DICOM series with an RTSTRUCT carried onto the fixed series (imported on
  its own: it loads pydicom).

The command, the interfaces, the API and the workflows call these, so a
study's node and ``inrlddmm register`` write the same files.  The names
below are the public ones; import them from here.
"""

from .inputs import (Pair, check_labels, check_memory, check_same_moving, load_pair, normalised, pair_tensors,
                     warm_start_model)
from .outputs import (AFFINE_OUTPUTS, COARSE_OUTPUTS, DISTILL_OUTPUTS, FINE_OUTPUTS, REGISTER_OUTPUTS,
                      RTSTRUCT_OUTPUTS, TRAJECTORY_OUTPUTS, fine_writers)
from .register import PhaseClock, register_files
from .stages import (affine_init, apply_inverse_warp, apply_warp, estimate_affine, run_coarse, run_distill, run_fine,
                     run_trajectory, torch_threads, trajectory_frames, warp_array, write_aligned, write_trajectory)

__all__ = [
    "AFFINE_OUTPUTS", "COARSE_OUTPUTS", "DISTILL_OUTPUTS", "FINE_OUTPUTS", "Pair", "PhaseClock", "REGISTER_OUTPUTS",
    "RTSTRUCT_OUTPUTS", "TRAJECTORY_OUTPUTS", "affine_init", "apply_inverse_warp", "apply_warp", "check_labels",
    "check_memory", "check_same_moving", "estimate_affine", "fine_writers", "load_pair", "normalised",
    "pair_tensors", "register_files", "run_coarse", "run_distill", "run_fine", "run_trajectory", "torch_threads",
    "trajectory_frames", "warm_start_model", "warp_array", "write_aligned", "write_trajectory",
]
