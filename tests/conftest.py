"""Shared fixtures: the real-data folder, small phantom pairs, deterministic torch."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("NIPYPE_NO_ET", "1")

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The real sample sets: $INRLDDMM_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("INRLDDMM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def real_data():
    """Path of the sample sets; skips (with the reason) where they are absent."""
    folder = data_dir()
    if not folder.is_dir():
        pytest.skip(f"real sample data not found at {folder} (set INRLDDMM_DATA)")
    return folder


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def voxel_epe(displacement, truth, affine, mask) -> float:
    """Mean end-point error in voxels (per-axis spacing) inside ``mask``."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return float(np.linalg.norm((displacement - truth) / spacing, axis=-1)[mask].mean())
