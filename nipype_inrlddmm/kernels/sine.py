"""The SIREN layer's ``sin(W x + b)``, with the cosine kept for the backward pass.

The layer-by-layer path of the velocity network: where the fused network of
:mod:`.siren` runs (CPU float32 with AVX-512F), these layers are not called.

``torch.sin`` forwards and ``torch.cos`` backwards are two full passes over
every hidden activation, each about as slow on CPU as the layer's own matrix
product.  On CPU float32, :func:`sine_linear` takes both from one vectorised
pass of the compiled ``_sincos`` extension, writing the sine over the fresh
pre-activation and saving the cosine, so the backward pass is a single
multiplication.  Elsewhere (CUDA, float64, or an install without the
extension: it is optional in ``setup.py``) it is ``torch.sin``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

try:
    from . import _sincos
except ImportError:  # built without a C compiler
    _sincos = None

COMPILED_SINCOS = _sincos is not None
"""Whether :func:`sine_linear` takes its sine and cosine from the compiled ``_sincos`` pass (this
install has it).  False sends it to ``torch.sin``, the portable path, as on an install without it."""


def sincos_(z: torch.Tensor) -> torch.Tensor:
    """Overwrite a contiguous CPU float32 tensor ``z`` with ``sin z``; return ``cos z``."""
    c = torch.empty_like(z)
    _sincos.sincos(z.detach().numpy(), c.numpy())
    return c


class _SineInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        c = sincos_(z)
        ctx.mark_dirty(z)
        ctx.save_for_backward(c)
        return z

    @staticmethod
    def backward(ctx, grad):
        # The saved cosine carries no graph: a second derivative through it would silently miss
        # d(cos z)/dz, so a graph of this backward pass (create_graph=True) is refused outright.
        if torch.is_grad_enabled():
            raise RuntimeError("the fused sine_linear is differentiable once; a second derivative needs the "
                               "torch.sin path (CUDA, float64, or an install without the _sincos extension)")
        (c,) = ctx.saved_tensors
        return grad * c


def sine_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``sin(x @ weight.T + bias)`` for ``(N, in)`` inputs and an ``(out, in)`` weight; ``(N, out)``.

    Differentiable once on the fused path (the flow needs no second derivative): a backward pass
    with ``create_graph=True`` raises there.
    """
    z = F.linear(x, weight, bias)
    if COMPILED_SINCOS and z.device.type == "cpu" and z.dtype == torch.float32 and z.is_contiguous():
        # z is this call's own temporary, so the sine may overwrite it.
        return _SineInPlace.apply(z)
    return torch.sin(z)
