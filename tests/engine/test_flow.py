"""The flow of the velocity field: its path over time, and its inverse integrated backwards.

On analytic velocity fields with a known flow, then through the network of a small registration (conftest's
``registered``), forward and back.
"""

import numpy as np
import pytest
import torch
from conftest import PHANTOM_SHAPE

from nipype_inrlddmm import engine, io
from nipype_inrlddmm.engine import integrate, integrate_backward, path_at_times


def _linear_velocity(matrix):
    """v(p, t) = (1 + t) A p: smooth, time-dependent, with a known Jacobian."""
    matrix = torch.as_tensor(matrix, dtype=torch.float32)
    return lambda points, t: (1.0 + t) * points @ matrix.T


def test_path_at_times_reads_the_euler_path_exactly():
    velocity = _linear_velocity([[0.0, -0.3, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.1]])
    points = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * 10
    displacement, _, path = integrate(velocity, points, 6, return_path=True)
    fields = path_at_times(path, [0.0, 0.5, 1.0 / 12, 1.0])
    assert torch.equal(fields[0], torch.zeros_like(points))
    assert torch.equal(fields[3], displacement)  # t = 1 is the registration's displacement, bit for bit
    torch.testing.assert_close(fields[1], path[3] - points)  # a step boundary
    torch.testing.assert_close(fields[2], (path[1] - points) / 2)  # halfway through the first straight step
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        path_at_times(path, [1.5])


def test_backward_integration_inverts_the_forward_scheme():
    velocity = _linear_velocity([[0.05, -0.4, 0.0], [0.4, 0.05, 0.0], [0.0, 0.1, -0.05]])
    points = torch.randn(200, 3, generator=torch.Generator().manual_seed(1)) * 20
    forward, _ = integrate(velocity, points, 6)
    plain = integrate_backward(velocity, points + forward, 6, corrections=0)
    corrected = integrate_backward(velocity, points + forward, 6)
    plain_error = (forward + plain).norm(dim=1).max().item()
    error = (forward + corrected).norm(dim=1).max().item()
    assert forward.norm(dim=1).max() > 10  # a large deformation (mm)
    assert error < 0.02 * plain_error and error < 0.1, (error, plain_error)  # mm


def test_forward_then_inverse_returns_within_half_a_voxel(registered):
    _, pair, result, files = registered
    velocity = io.load_checkpoint(files["model"])
    affine = torch.tensor(pair.affine, dtype=torch.float32)
    points = engine.world_grid(PHANTOM_SHAPE, affine)[torch.from_numpy(pair.cbct_fov)]
    spacing = np.linalg.norm(pair.affine[:3, :3], axis=0)
    with torch.no_grad():
        forward, _ = integrate(velocity, points, velocity.config.n_steps)
        back = integrate_backward(velocity, points + forward, velocity.config.n_steps)
    moved = np.linalg.norm(forward.numpy() / spacing, axis=1)
    error = np.linalg.norm((forward + back).numpy() / spacing, axis=1)
    print(f"round trip over {len(error)} voxels: displacement up to {moved.max():.2f} voxel; "
          f"error mean {error.mean():.4f}, max {error.max():.4f} voxel")
    assert moved.max() > 0.3  # the flow moved the points: the round trip tests something
    assert error.max() < 0.5
