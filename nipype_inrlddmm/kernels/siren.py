"""The SIREN velocity network in one fused pass per direction (CPU, AVX-512).

Layer by layer, the network's time went mostly to passes that do no
arithmetic worth counting: the bias, the sine, the saved cosine, the
gradient's multiplication by it, the bias gradient's sums, each over a fresh
``(N, width)`` tensor in memory, and a dozen small autograd nodes per Euler
step around them (input normalisation, the time column, omega_0, the output
scale).  :func:`siren_velocity` is one autograd node: the compiled ``_siren``
extension runs every layer on a tile of 64 points while it is in cache
(register-blocked products with the bias and the sine applied to the
accumulators) and writes only the sine layers' pre-activations, whose sines
and cosines the backward pass takes again tile by tile; omega_0, the time
and the output scale are folded into the weights inside it.  Its results
are those of the layer-by-layer path up to float rounding (sums in another
order) and do not depend on the thread count.

:func:`siren_flow` takes the Euler integration of :func:`~nipype_inrlddmm.engine.flow.integrate`
through those kernels as one autograd node too: each tile of points goes
through every Euler step while in cache, forwards and then backwards, so no
step adds graph nodes, calls or sums of its own; the velocity's window
(:mod:`~nipype_inrlddmm.engine.window`) is applied at each step inside them.

Where the kernels cannot run (no AVX-512F, CUDA, float64, a width that is not
a multiple of 16, an install without the extension) :func:`applies` says no,
and :class:`~nipype_inrlddmm.engine.velocity.VelocityField` runs its layers through PyTorch.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

try:
    from . import _siren
except ImportError:  # built without a C compiler
    _siren = None

FUSED_NETWORK = _siren is not None and _siren.available()
"""Whether the SIREN velocity network runs as the fused ``_siren`` kernels (this install has them
and the CPU has AVX-512F).  False runs it layer by layer (:mod:`.sine`), as on any other CPU."""


def applies(points: torch.Tensor, width: int) -> bool:
    """Whether :func:`siren_velocity` takes these points through a network ``width`` units wide."""
    return FUSED_NETWORK and points.device.type == "cpu" and points.dtype == torch.float32 and width % 16 == 0


class _BufferPool:
    """Float32 tensors whose memory is reused once the tensor handed out is gone.

    A fresh ``(depth, N, width)`` tensor is page-faulted in on its first
    write, and at the fine stage's points those faults took longer than the
    kernels' arithmetic (docs/decisions.md).  The
    pool keeps each buffer's storage; when the tensor over it is collected
    (autograd drops the saved pre-activations after their backward pass, or
    with the graph), a finalizer puts the storage on the free list for the
    next tensor of that size.  At most ``limit`` bytes wait there.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self._free_bytes = 0
        # Re-entrant: a garbage collection inside a critical section may run a finalizer.
        self._lock = threading.RLock()

    def take(self, *shape: int) -> torch.Tensor:
        nbytes = 4 * math.prod(shape)
        with self._lock:
            free = self._free.get(nbytes)
            storage = free.pop() if free else None
            self._free_bytes -= 0 if storage is None else nbytes
        if storage is None:
            tensor = torch.empty(shape)
            storage = tensor.untyped_storage()
        else:
            tensor = torch.empty(0).set_(storage, 0, shape)
        weakref.finalize(tensor, self._give_back, storage)
        return tensor

    def _give_back(self, storage: torch.UntypedStorage):
        with self._lock:
            if self._free_bytes + storage.nbytes() <= self.limit:
                self._free.setdefault(storage.nbytes(), []).append(storage)
                self._free_bytes += storage.nbytes()

    def clear(self):
        with self._lock:
            self._free.clear()
            self._free_bytes = 0


_POOL = _BufferPool(limit=512 * 2**20)


def release_buffers():
    """Free the memory kept for the next call's saved pre-activations (a stage ends; the next has other sizes)."""
    _POOL.clear()


def _array(tensor: torch.Tensor):
    return tensor.detach().numpy()


def _shape(n: int, shapes) -> tuple[int, int, int, int]:
    """The kernels' (points, width, depth, out) from the parameters' shapes."""
    return n, shapes[0][0], len(shapes) // 2 - 1, shapes[-1][0]


def _refuse_second_derivative():
    # The pre-activations carry no graph: a second derivative through the kernels' sines and
    # cosines would silently miss their own derivatives, so a graph of the backward pass is
    # refused outright.
    if torch.is_grad_enabled():
        raise RuntimeError("the fused SIREN network is differentiable once; a second derivative needs the "
                           "layer-by-layer path (kernels.siren.FUSED_NETWORK = False)")


def _grads(grad: torch.Tensor, shapes) -> list[torch.Tensor]:
    """The flat gradient split into the parameters' shapes."""
    return [g.view(shape) for g, shape in zip(grad.split([shape.numel() for shape in shapes]), shapes)]


class _SirenVelocity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, save, points, t, fixed, *params):
        params_flat = torch.cat([p.reshape(-1) for p in params])
        shapes = [p.shape for p in params]
        n, width, depth, out = shape = _shape(len(points), shapes)
        center, half_extent, omega0, scale = fixed
        constants = (shape, center, half_extent, 2.0 * t - 1.0, omega0, scale)
        velocity = points.new_empty(n, out)
        z = _POOL.take(depth, n, width) if save else None
        _siren.forward(*constants, _array(points), _array(params_flat), _array(velocity),
                       None if z is None else _array(z))
        if save:
            ctx.save_for_backward(points, params_flat, z)
            ctx.constants, ctx.shapes = constants, shapes
        return velocity

    @staticmethod
    def backward(ctx, grad_velocity):
        _refuse_second_derivative()
        points, params_flat, z = ctx.saved_tensors
        grad = torch.empty_like(params_flat)
        grad_points = torch.empty_like(points) if ctx.needs_input_grad[1] else None
        workspace = _POOL.take(_siren.workspace_size(ctx.constants[0]))
        _siren.backward(*ctx.constants, _array(points), _array(params_flat), _array(z),
                        _array(grad_velocity.contiguous()), _array(grad),
                        None if grad_points is None else _array(grad_points), _array(workspace))
        return None, grad_points, None, None, *_grads(grad, ctx.shapes)


class _SirenFlow(torch.autograd.Function):
    """:func:`~nipype_inrlddmm.engine.flow.integrate` through the fused network: every Euler step, one autograd node."""

    @staticmethod
    def forward(ctx, save, points, n_steps, fixed, window, *params):
        params_flat = torch.cat([p.reshape(-1) for p in params])
        shapes = [p.shape for p in params]
        n, width, depth, _ = shape = _shape(len(points), shapes)
        center, half_extent, omega0, scale = fixed
        displacement = torch.empty_like(points)
        saved = [_POOL.take(n_steps, depth, n, width), _POOL.take(n_steps, n, 3), _POOL.take(n_steps, n, 3)] \
            if save else [None] * 3
        squares = _siren.flow_forward(shape, center, half_extent, n_steps, omega0, scale, _array(points),
                                      _array(params_flat), window, _array(displacement),
                                      *(None if t is None else _array(t) for t in saved))
        if save:
            ctx.save_for_backward(params_flat, *saved)
            ctx.n_steps, ctx.fixed, ctx.window, ctx.shapes = n_steps, fixed, window, shapes
        return displacement, points.new_tensor(squares / (n_steps * max(n, 1)))

    @staticmethod
    def backward(ctx, grad_displacement, grad_kinetic):
        _refuse_second_derivative()
        params_flat, z, positions, velocities = ctx.saved_tensors
        shape = _shape(positions.shape[1], ctx.shapes)
        center, half_extent, omega0, scale = ctx.fixed
        grad = torch.empty_like(params_flat)
        grad_points = positions.new_empty(positions.shape[1:]) if ctx.needs_input_grad[1] else None
        workspace = _POOL.take(_siren.workspace_size(shape))
        _siren.flow_backward(shape, center, half_extent, ctx.n_steps, omega0, scale, _array(params_flat), ctx.window,
                             _array(z), _array(positions), _array(velocities), _array(grad_displacement.contiguous()),
                             float(grad_kinetic), _array(grad), None if grad_points is None else _array(grad_points),
                             _array(workspace))
        return None, grad_points, None, None, None, *_grads(grad, ctx.shapes)


def _inputs(points, layers, output, omega0, center, half_extent, scale):
    params = [p.contiguous() for pair in (*layers, output) for p in pair]
    fixed = (tuple(center.tolist()), tuple(half_extent.tolist()), float(omega0), float(scale))
    save = torch.is_grad_enabled() and any(p.requires_grad for p in (points, *params))
    return save, points.contiguous(), fixed, params


def siren_velocity(points: torch.Tensor, t: float, *, layers, output, omega0: float, center: torch.Tensor,
                   half_extent: torch.Tensor, scale: float) -> torch.Tensor:
    """The SIREN velocity network of :class:`~nipype_inrlddmm.engine.velocity.VelocityField` at ``(N, 3)``
    points; ``(N, out)``.

    ``scale (W_o h + b_o)``, ``h = sin(omega0 (W_l h + b_l))`` through
    ``layers`` from ``h = [(points - center) / half_extent, 2 t - 1]``.

    Parameters
    ----------
    points : ``(N, 3)`` float32 CPU world points (mm).
    layers : ``(weight, bias)`` of each sine layer: ``(width, 4)`` then
        ``(width, width)`` weights, without omega_0.
    output : ``(weight, bias)`` of the linear output layer, ``(out, width)``.
    center, half_extent : ``(3,)`` mm; ``scale``: mm per unit of the output.

    Differentiable once in the points and every weight and bias; a backward
    pass with ``create_graph=True`` raises.  Only where :func:`applies`.
    """
    save, points, fixed, params = _inputs(points, layers, output, omega0, center, half_extent, scale)
    return _SirenVelocity.apply(save, points, float(t), fixed, *params)


def siren_flow(points: torch.Tensor, n_steps: int, *, layers, output, omega0: float, center: torch.Tensor,
               half_extent: torch.Tensor, scale: float,
               window: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~nipype_inrlddmm.engine.flow.integrate` of :func:`siren_velocity`'s field: ``(displacement, kinetic)``.

    The same Euler steps and kinetic energy (summed in float64), as one
    autograd node and one kernel call each way, no slower than a node per
    step and with no graph to build.  Arguments as :func:`siren_velocity`;
    ``(N, 3)`` points in, ``(N, 3)`` mm and a scalar mm^2 out.  ``window``:
    ``((X, Y, Z) values, (3, 4) world -> voxel rows)``, a field ``w`` read
    trilinearly (the nearest edge value beyond the grid) that blends the
    velocity with the output bias ``c`` at every step, ``w f + (1 - w) c``, as
    :class:`~nipype_inrlddmm.engine.velocity.VelocityField` does; not
    differentiated (a fixed buffer).
    """
    save, points, fixed, params = _inputs(points, layers, output, omega0, center, half_extent, scale)
    if window is not None:
        values, to_voxel = window
        values = values.detach().float().contiguous()
        window = (_array(values), tuple(values.shape), tuple(float(x) for x in to_voxel.reshape(-1).tolist()))
    return _SirenFlow.apply(save, points, int(n_steps), fixed, window, *params)
