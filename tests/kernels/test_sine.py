"""The SIREN layer's fused sine-cosine pass: values, gradients, edge inputs, threads, refusals."""

import shutil
import sysconfig

import pytest
import torch
from torch.nn import functional as F

from nipype_inrlddmm.kernels import sine

compiled_only = pytest.mark.skipif(not sine.COMPILED_SINCOS,
                                   reason="the _sincos extension is not built in this install: torch.sin runs")

#: Around zero, the range reduction's edges (odd multiples of pi/2, where k changes), the libm hand-over
#: at 8192, and what has no finite sine.
EDGES = [0.0, -0.0, 1e-30, 1.5707964, -1.5707964, 3.1415927, 4.712389, -4.712389, 1e4, -3e4, 8192.0, 8192.001,
         1e6, -1e30, float("inf"), float("-inf"), float("nan")]


def test_installs_that_can_compile_have_the_extension():
    compiler = (sysconfig.get_config_var("CC") or "").split()
    if not compiler or shutil.which(compiler[0]) is None:
        pytest.skip("no C compiler here: the extension is optional")
    assert sine.COMPILED_SINCOS, "setup.py builds nipype_inrlddmm.kernels._sincos where a C compiler exists"


@compiled_only
def test_sincos_matches_float64_within_two_tenths_of_a_micro():
    z = torch.cat([torch.linspace(-200.0, 200.0, 400_001), torch.tensor(EDGES)])
    reference = z.double()
    values = z.clone()
    cosine = sine.sincos_(values)
    torch.testing.assert_close(values.double(), reference.sin(), atol=2e-7, rtol=0, equal_nan=True)
    torch.testing.assert_close(cosine.double(), reference.cos(), atol=2e-7, rtol=0, equal_nan=True)


@compiled_only
@pytest.mark.parametrize("in_features", [4, 64])
def test_sine_linear_value_and_gradients_match_torch_sin(in_features):
    generator = torch.Generator().manual_seed(0)
    leaves = [torch.randn(3000, in_features, generator=generator),
              torch.randn(64, in_features, generator=generator) * 5, torch.randn(64, generator=generator)]
    grad = torch.randn(3000, 64, generator=generator)

    def value_and_gradients(layer):
        inputs = [t.clone().requires_grad_() for t in leaves]
        out = layer(*inputs)
        return (out, *torch.autograd.grad(out, inputs, grad))

    fused = value_and_gradients(sine.sine_linear)
    assert type(fused[0].grad_fn).__name__ == "_SineInPlaceBackward"
    reference = value_and_gradients(lambda x, weight, bias: torch.sin(F.linear(x, weight, bias)))
    for ours, theirs in zip(fused, reference):
        # The kernel's sine and cosine are within 1e-7 of torch's, here scaled by the sums of the
        # backward pass (|W| up to 5 times 64 terms for the input gradient, 3000 for the weight's).
        torch.testing.assert_close(ours, theirs, atol=1e-6 * theirs.detach().abs().max().item(), rtol=0)


def test_other_dtypes_take_torch_sin_exactly():
    x, weight, bias = (torch.randn(50, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64),
                       torch.randn(8, dtype=torch.float64))
    assert torch.equal(sine.sine_linear(x, weight, bias), torch.sin(F.linear(x, weight, bias)))


@compiled_only
def test_result_does_not_depend_on_the_thread_count():
    z = torch.randn(40_000, 64, generator=torch.Generator().manual_seed(1)) * 30
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        values = z.clone()
        results.append((values, sine.sincos_(values)))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@compiled_only
def test_second_derivatives_are_refused_not_wrong():
    x, weight = torch.randn(10, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(sine.sine_linear(x, weight, torch.randn(8)).sum(), x, create_graph=True)


@compiled_only
@pytest.mark.parametrize("other", [lambda z: z, lambda z: z[1:].clone(), lambda z: z.double()])
def test_kernel_refuses_overlapping_or_mismatched_buffers(other):
    z = torch.zeros(64)
    with pytest.raises(ValueError, match="sincos needs"):
        sine._sincos.sincos(z.numpy(), other(z).numpy())
