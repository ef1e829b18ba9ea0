"""The fused SIREN velocity network: values, gradients, sine and cosine, threads, buffer reuse, refusals.

The reference is the portable path (the layers through PyTorch and ``torch.sin``) in float64: the
flow and its gradients are tested against it on every path this install and CPU can take.
"""

import shutil
import sysconfig
from pathlib import Path
from unittest import mock

import pytest
import torch

from nipype_inrlddmm import engine
from nipype_inrlddmm.engine import window
from nipype_inrlddmm.kernels import sine, siren
from test_sine import EDGES  # zero, the range reduction's edges, the libm hand-over at 8192, non-finite

#: Where the fused kernels do not run, why: their tests skip saying so, and the layers' tests run.
WHY_NOT_FUSED = ("this CPU lacks AVX-512F" if siren._siren else "the _siren extension is not built in this install") \
    + ": the fused kernels do not run here, the layers do"
fused_only = pytest.mark.skipif(not siren.FUSED_NETWORK, reason=WHY_NOT_FUSED)


def test_installs_that_can_compile_on_avx512_cpus_have_the_kernels():
    compiler = (sysconfig.get_config_var("CC") or "").split()
    if not compiler or shutil.which(compiler[0]) is None:
        pytest.skip("no C compiler here: the extension is optional")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or " avx512f " not in cpuinfo.read_text():
        pytest.skip("this CPU has no AVX-512F: the layer-by-layer path runs")
    assert siren.FUSED_NETWORK, "setup.py builds nipype_inrlddmm.kernels._siren where a C compiler exists"


def _field(width=96, depth=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    velocity = engine.VelocityField(torch.tensor([10.0, -20.0, 5.0]), torch.tensor([90.0, 110.0, 60.0]),
                                    engine.ModelConfig(width=width, depth=depth))
    # A trained field moves the points: its output layer, which starts at zero, is not.
    with torch.no_grad():
        for parameter in velocity.output.parameters():
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return velocity


def _flow_and_gradients(velocity, points, n_steps=4, *, stepwise=False):
    """The training iteration's network work: displacement, kinetic energy, and every gradient.

    ``stepwise``: integrate a plain callable around the field, which takes the steps one by one.
    """
    velocity.zero_grad()
    start = points.clone().requires_grad_()
    field = (lambda p, t: velocity(p, t)) if stepwise else velocity
    displacement, kinetic = engine.integrate(field, start, n_steps)
    (displacement.square().mean() + kinetic).backward()
    return [displacement.detach(), kinetic.detach(), start.grad] + [p.grad.clone() for p in velocity.parameters()]


def _points(n, seed=1):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed)) * torch.tensor([80.0, 100.0, 50.0])


#: Each path a float32 network can take: (fused kernels, compiled sine-cosine pass), each where it runs.
PATHS = [
    pytest.param(True, True, id="fused", marks=fused_only),
    pytest.param(False, True, id="layers-sincos", marks=pytest.mark.skipif(
        not sine.COMPILED_SINCOS, reason="the _sincos extension is not built in this install: torch.sin runs")),
    pytest.param(False, False, id="layers-torch"),
]


@pytest.mark.parametrize("fused_network, compiled_sincos", PATHS)
@pytest.mark.parametrize("n, width, depth", [(16_464, 96, 3), (1, 96, 3), (65, 32, 2), (130, 112, 1),
                                             (1000, 128, 4)])
def test_flow_and_gradients_match_the_portable_path_in_float64(n, width, depth, fused_network, compiled_sincos):
    # Tile edges (1, 65 and 130 points around the 64-point tile), a column block of 16 beside one
    # of 96 (112), fewer tiles than partitions, and the default network on the fine stage's points.
    velocity = _field(width, depth)
    points = _points(n)
    with (mock.patch.object(siren, "FUSED_NETWORK", fused_network),
          mock.patch.object(sine, "COMPILED_SINCOS", compiled_sincos)):
        assert (velocity(points[:2], 0.5).grad_fn.name() == "_SirenVelocityBackward") == fused_network
        ours = _flow_and_gradients(velocity, points)
    # float64 takes the portable path on every install: no kernel takes it.
    reference = _flow_and_gradients(velocity.double(), points.double())
    for value, expected in zip(ours, reference):
        # float32 sums over up to 16,464 points and 128 units against float64.
        torch.testing.assert_close(value.double(), expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


@fused_only
def test_sine_and_cosine_are_within_two_tenths_of_a_micro_of_float64():
    # One sine layer that passes each coordinate through unchanged (exact products by 1 and 0) and
    # an output layer that picks those three units: the velocity is the kernel's sine of each
    # coordinate, the gradient of the points its cosine.
    z = torch.cat([torch.linspace(-200.0, 200.0, 200_001), torch.tensor(EDGES)])
    points = z[:, None].expand(-1, 3).contiguous().requires_grad_()
    first = torch.zeros(16, 4)
    first[:3, :3] = torch.eye(3)
    layers = [(first, torch.zeros(16))]
    output = (torch.eye(3, 16), torch.zeros(3))
    velocity = siren.siren_velocity(points, 0.5, layers=layers, output=output, omega0=1.0, center=torch.zeros(3),
                                    half_extent=torch.ones(3), scale=1.0)
    velocity.sum().backward()
    reference = z.double()[:, None].expand(-1, 3)
    # Infinite coordinates meet the zero weights of the other two: inf * 0 is NaN, as is their sine.
    torch.testing.assert_close(velocity.double(), reference.sin(), atol=2e-7, rtol=0, equal_nan=True)
    torch.testing.assert_close(points.grad.double(), reference.cos(), atol=2e-7, rtol=0, equal_nan=True)


@fused_only
def test_result_does_not_depend_on_the_thread_count():
    velocity, points = _field(), _points(5000)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(_flow_and_gradients(velocity, points))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@fused_only
def test_saved_buffers_are_kept_while_a_graph_needs_them_and_reused_once_free():
    velocity, points = _field(), _points(3000)
    siren.release_buffers()

    def buffer(out):
        return out.grad_fn.saved_tensors[2].data_ptr()

    first, second = velocity(points, 0.25), velocity(points, 0.75)
    held = {buffer(first), buffer(second)}
    assert len(held) == 2, "two graphs alive must not share a buffer"
    expected = [torch.autograd.grad(out.sum(), list(velocity.parameters()), retain_graph=True)
                for out in (first, second)]
    # retain_graph kept each buffer: a second backward pass through each graph gives the same gradients.
    again = [torch.autograd.grad(out.sum(), list(velocity.parameters())) for out in (first, second)]
    assert all(torch.equal(a, b) for pair in zip(expected, again) for a, b in zip(*pair))
    # Both graphs are freed now, and the next call of that size takes one of their buffers.
    assert buffer(velocity(points, 0.5)) in held
    siren.release_buffers()


@fused_only
def test_inference_saves_nothing_and_matches_training():
    velocity, points = _field(), _points(2000)
    with torch.no_grad():
        inferred = velocity(points, 0.25)
    assert inferred.grad_fn is None
    torch.testing.assert_close(inferred, velocity(points, 0.25).detach(), atol=0, rtol=0)


@fused_only
def test_second_derivatives_are_refused_not_wrong():
    velocity, points = _field(width=32, depth=1), _points(10).requires_grad_()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(velocity(points, 0.5).sum(), points, create_graph=True)


def test_other_dtypes_and_widths_take_the_layers():
    points = _points(20)
    for velocity, inputs in ((_field().double(), points.double()), (_field(width=40), points)):
        assert velocity(inputs, 0.5).grad_fn.name() != "_SirenVelocityBackward"
    with mock.patch.object(siren, "FUSED_NETWORK", False):
        assert _field()(points, 0.5).grad_fn.name() != "_SirenVelocityBackward"


@fused_only
def test_kernel_refuses_buffers_of_the_wrong_size_or_alignment():
    n, width, depth = 10, 16, 1
    net = ((n, width, depth, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.0, 1.0, 1.0)
    params = torch.zeros(width * 4 + width + 3 * width + 3)
    points, velocity = torch.zeros(n, 3), torch.zeros(n, 3)
    with pytest.raises(ValueError, match="params: expected"):
        siren._siren.forward(*net, points.numpy(), params[1:].numpy(), velocity.numpy(), None)
    with pytest.raises(ValueError, match="points: expected"):
        siren._siren.forward(*net, points[1:].numpy(), params.numpy(), velocity.numpy(), None)
    z = torch.zeros(depth * n * width + 1)
    with pytest.raises(ValueError, match="64-byte aligned"):
        siren._siren.forward(*net, points.numpy(), params.numpy(), velocity.numpy(), z[1:].numpy())
    with pytest.raises(ValueError, match="multiple of 16"):
        siren._siren.forward((n, 40, depth, 3), *net[1:], points.numpy(), params.numpy(), velocity.numpy(), None)


@fused_only
def test_every_kernel_refuses_each_buffer_of_the_wrong_size_naming_it():
    n, width, depth, n_steps = 10, 16, 1, 2
    shape, box, weights = (n, width, depth, 3), ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), (1.0, 1.0)
    params = width * 4 + width + 3 * width + 3
    workspace = siren._siren.workspace_size(shape)
    # (function, its leading arguments, its buffers by name and size in float32 values)
    calls = [
        (siren._siren.forward, (shape, *box, 0.0, *weights),
         {"points": n * 3, "params": params, "v": n * 3, "z": depth * n * width}),
        (siren._siren.backward, (shape, *box, 0.0, *weights),
         {"points": n * 3, "params": params, "z": depth * n * width, "grad of v": n * 3, "grad": params,
          "grad of points": n * 3, "workspace": workspace}),
        (siren._siren.flow_forward, (shape, *box, n_steps, *weights),
         {"points": n * 3, "params": params, "displacement": n * 3, "z": n_steps * depth * n * width,
          "positions": n_steps * n * 3, "velocities": n_steps * n * 3}),
        (siren._siren.flow_backward, (shape, *box, n_steps, *weights),
         {"params": params, "z": n_steps * depth * n * width, "positions": n_steps * n * 3,
          "velocities": n_steps * n * 3, "grad of displacement": n * 3, "grad": params, "grad of points": n * 3,
          "workspace": workspace}),
    ]
    for function, leading, sizes in calls:
        buffers = {name: torch.zeros(size).numpy() for name, size in sizes.items()}

        def call(**replaced):
            arguments = [replaced.get(name, buffer) for name, buffer in buffers.items()]
            if function in (siren._siren.flow_forward, siren._siren.flow_backward):  # no window, after params
                arguments.insert(list(buffers).index("params") + 1, None)
            if function is siren._siren.flow_backward:  # the kinetic energy's gradient, after the buffers it reads
                arguments.insert(6, 0.0)
            return function(*leading, *arguments)

        call()  # every size right: the kernel runs
        for name, buffer in buffers.items():
            # One value short; the start stays where it was, 64-byte aligned as z must be.
            with pytest.raises(ValueError, match=f"^{name}: expected {buffer.size} float32 values"):
                call(**{name: buffer[:-1]})
    with pytest.raises(ValueError, match="n_steps >= 1"):
        siren._siren.flow_forward(shape, *box, 0, *weights, torch.zeros(n * 3).numpy(), torch.zeros(params).numpy(),
                                  None, torch.zeros(n * 3).numpy(), None, None, None)
    flow = (shape, *box, n_steps, *weights, torch.zeros(n * 3).numpy(), torch.zeros(params).numpy())
    to_voxel = (1.0, 0.0, 0.0, 0.0) * 3
    with pytest.raises(ValueError, match="window: expected 24 float32 values"):
        siren._siren.flow_forward(*flow, (torch.zeros(23).numpy(), (2, 3, 4), to_voxel), torch.zeros(n * 3).numpy(),
                                  None, None, None)
    with pytest.raises(ValueError, match="window: need at least 2 voxels"):
        siren._siren.flow_forward(*flow, (torch.zeros(12).numpy(), (1, 3, 4), to_voxel), torch.zeros(n * 3).numpy(),
                                  None, None, None)


@fused_only
def test_the_flow_node_matches_autograd_through_the_steps():
    # integrate() takes a fused VelocityField's steps as one node with its own chain rule (Euler
    # steps and kinetic energy); a plain callable around the same field goes step by step.
    velocity, points = _field(), _points(3000)
    displacement, _ = engine.integrate(velocity, points.clone().requires_grad_(), 4)
    assert displacement.grad_fn.name() == "_SirenFlowBackward"
    fused = _flow_and_gradients(velocity, points)
    stepwise = _flow_and_gradients(velocity, points, stepwise=True)
    for ours, theirs in zip(fused, stepwise):
        torch.testing.assert_close(ours, theirs, atol=1e-6 * theirs.abs().max().item(), rtol=0)


def _windowed(velocity, window_values=None):
    """``velocity`` with a window: a box mask's taper (:func:`~.window.mask_window`), on a grid that the
    points of :func:`_points` reach past (its border), or the given values on that grid."""
    affine = torch.tensor([[8.0, 0, 0, -90], [0, 9.0, 0, -100], [0, 0, 7.0, -45], [0, 0, 0, 1]])
    mask = torch.zeros(24, 23, 14, dtype=torch.bool)
    mask[8:15, 6:16, 4:10] = True
    values, window_affine = window.mask_window(mask, affine, 10.0, 40.0)
    assert 0 < values.mean() < 1
    windowed = engine.VelocityField(velocity.center, velocity.half_extent, velocity.config,
                                    window=(values if window_values is None else window_values(values), window_affine))
    windowed.load_state_dict(velocity.state_dict(), strict=False)
    return windowed


@pytest.mark.parametrize("fused_network, compiled_sincos", PATHS)
def test_a_windowed_flow_and_its_gradients_match_the_portable_path_in_float64(fused_network, compiled_sincos):
    # v = w f: the flow carries w's gradient into the points' (the fused kernel's own chain rule), w is
    # read on both sides of the grid's edge, and the portable path multiplies each step by grid_sample's w.
    velocity, points = _windowed(_field()), _points(2000)
    with (mock.patch.object(siren, "FUSED_NETWORK", fused_network),
          mock.patch.object(sine, "COMPILED_SINCOS", compiled_sincos)):
        displacement, _ = engine.integrate(velocity, points[:2].clone().requires_grad_(), 4)
        assert (displacement.grad_fn.name() == "_SirenFlowBackward") == fused_network
        ours = _flow_and_gradients(velocity, points)
    reference = _flow_and_gradients(velocity.double(), points.double())
    unwindowed = _flow_and_gradients(_field().double(), points.double())
    assert (reference[2] - unwindowed[2]).abs().max() > 0.1 * unwindowed[2].abs().max()  # the window matters
    for value, expected in zip(ours, reference):
        torch.testing.assert_close(value.double(), expected, atol=2e-5 * expected.abs().max().item(), rtol=0)


@fused_only
def test_a_window_of_ones_changes_nothing_and_a_window_of_zeros_leaves_the_output_bias_a_translation():
    velocity, points = _field(), _points(700)
    plain = _flow_and_gradients(velocity, points)
    for ours, theirs in zip(_flow_and_gradients(_windowed(velocity, torch.ones_like), points), plain):
        assert torch.equal(ours, theirs)
    drift = (velocity.output.bias * velocity.scale).detach()
    displacement, kinetic, points_grad, *weights_grads, bias_grad = _flow_and_gradients(
        _windowed(velocity, torch.zeros_like), points)
    # Each of the 4 steps rounds the point's position, a few hundred mm from the origin.
    rounding = 4 * torch.finfo(torch.float32).eps * points.abs().max().item()
    torch.testing.assert_close(displacement, drift.expand_as(points), atol=rounding, rtol=0)
    torch.testing.assert_close(kinetic, drift.square().sum())
    # Nothing else moves the points: only the bias is trained there, and where they start does not matter.
    assert not points_grad.any() and all(not grad.any() for grad in weights_grads) and bias_grad.abs().min() > 0
