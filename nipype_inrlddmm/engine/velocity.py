"""The velocity network f(x, y, z, t) -> (vx, vy, vz) of INR-LDDMM.

A SIREN (sine activations, Sitzmann et al. 2020) by default: three hidden
layers at omega_0 = 22.5, 96 units wide on small grids and 128 on large ones
(:meth:`ModelConfig.sized`), on positions normalised by the fixed
image's bounding box and the time, with a linear output in mm per unit time
that starts at zero (an untrained field is the identity).  Random Fourier
features and a plain MLP on raw coordinates are the alternatives
(``encoding``).  Why these: the sine layers fitted inter-subject anatomy
best; a higher omega_0 fits finer detail until the field folds, and a
wider layer, once the Jacobian penalty held the field smooth, matched the
large grids' anatomy better; four Euler steps are as accurate as six for
two thirds of the work (``python benchmarks/encodings.py`` and ``benchmarks/accuracy.py``; the
figures are on the decisions page, docs/decisions.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..kernels import sine, siren
from ..kernels.sine import sine_linear
from .grid import apply_affine, grid_coordinates, sample_grid

ENCODINGS = ("fourier", "siren", "none")
ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the velocity network and of its flow.

    ``depth`` counts hidden layers (the paper's MLP has three).  ``sigma`` is
    the standard deviation of the Fourier frequencies in cycles per image
    half-extent; ``n_steps`` the number of Euler steps over t in [0, 1].
    ``width`` None is automatic: set from the fine stage's grid by
    :meth:`sized` before a network is built.
    """

    width: int | None = None
    depth: int = 3
    encoding: str = "siren"
    n_frequencies: int = 32
    sigma: float = 2.0
    omega0: float = 22.5
    activation: str = "silu"
    n_steps: int = 4

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if self.width is not None and self.width < 1 or self.depth < 1 or self.n_steps < 1:
            raise ValueError("width (unless None, automatic), depth and n_steps must be positive")

    def sized(self, fine_voxels: int) -> ModelConfig:
        """This architecture for a fine stage on a grid of ``fine_voxels``: an automatic width becomes
        :data:`SMALL_GRID_WIDTH` units up to :data:`SMALL_GRID_VOXELS` voxels, :data:`LARGE_GRID_WIDTH`
        above; a given width stays.

        A field over more voxels holds more detail to represent.  On the
        1 mm brains (fine grids of 0.9-1.1 M voxels) and the lung CT (0.6 M)
        128 units matched labels better at the same smoothness; on the
        phantoms' 0.17 M voxels they cost a third more time for the same
        Dice (docs/decisions.md, "Regularity").
        """
        if self.width is not None:
            return self
        return replace(self, width=SMALL_GRID_WIDTH if fine_voxels <= SMALL_GRID_VOXELS else LARGE_GRID_WIDTH)


#: The automatic width (:meth:`ModelConfig.sized`): hidden units on fine grids of at most / over
#: ``SMALL_GRID_VOXELS`` voxels.
SMALL_GRID_WIDTH, LARGE_GRID_WIDTH, SMALL_GRID_VOXELS = 96, 128, 64 ** 3


class SineLinear(nn.Linear):
    """A SIREN layer, ``sin(omega0 * (W x + b))``, initialised as Sitzmann et al. (2020).

    ``omega0`` scales the small ``(out, in)`` weight and bias rather than the
    ``(N, out)`` activations: the same function with one full-size
    element-wise pass fewer, forward and backward; :func:`~.sine.sine_linear`
    keeps the cosine of its forward pass for the backward one.
    """

    def __init__(self, in_features: int, out_features: int, omega0: float, *, first: bool):
        super().__init__(in_features, out_features)
        self.omega0 = omega0
        bound = 1.0 / in_features if first else math.sqrt(6.0 / in_features) / omega0
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sine_linear(x, self.weight * self.omega0, self.bias * self.omega0)


def siren_path() -> str:
    """Which code runs a SIREN network here, in words: this install's, on this CPU, for CPU float32 points.

    The fused kernels (:data:`.siren.FUSED_NETWORK`, for widths that are multiples of 16) need a CPU
    with AVX-512F; elsewhere the layers run through PyTorch, with the compiled sine-cosine pass where
    :data:`.sine.COMPILED_SINCOS`.  The test run ends with this line, so that a report says which code
    its results came from.
    """
    if siren.FUSED_NETWORK:
        return "fused _siren kernels (AVX-512F)"
    if sine.COMPILED_SINCOS:
        return "layer by layer through PyTorch, sine and cosine from the compiled _sincos pass"
    return "layer by layer through PyTorch and torch.sin"


class VelocityField(nn.Module):
    """Time-varying velocity field in world coordinates.

    Parameters
    ----------
    center, half_extent : ``(3,)`` tensors (mm) of the fixed image's bounding
        box; inputs are normalised by them so the same network describes the
        field at any resolution of that image.
    config : :class:`ModelConfig` with a width (an automatic one set by
        :meth:`ModelConfig.sized`).
    window : optional ``((x, y, z) values, (4, 4) voxel -> world affine)``
        (:func:`~.window.mask_window`): the velocity is ``w f + (1 - w) c``,
        ``f`` the network's output, ``c`` its output layer's bias (in mm) and
        ``w`` the window read trilinearly (the nearest edge value beyond its
        grid), so the flow is one translation where the window is 0.  Kept
        with the weights (buffers ``window``, ``window_affine``).

    ``forward(points, t)`` takes ``(N, 3)`` world points (mm, RAS) and a
    float time ``t`` in [0, 1] and returns ``(N, 3)`` velocities in mm per
    unit time.  The output layer starts at zero, so an untrained field is the
    identity map.  The SIREN network runs as one fused pass per direction
    (:func:`~.siren.siren_velocity`) where :func:`~.siren.applies` (CPU float32
    on AVX-512F), and layer by layer through PyTorch elsewhere; the two agree
    to float rounding.
    """

    def __init__(self, center: torch.Tensor, half_extent: torch.Tensor, config: ModelConfig, *,
                 window: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if config.width is None:
            raise ValueError("the network's width is automatic (None): size the configuration to the fine grid "
                             "first (ModelConfig.sized)")
        self.config = config
        self.register_buffer("center", torch.as_tensor(center, dtype=torch.float32).clone())
        self.register_buffer("half_extent", torch.as_tensor(half_extent, dtype=torch.float32).clone())
        # One scalar length keeps the output isotropic in mm.
        self.register_buffer("scale", self.half_extent.mean().reshape(()))
        values, affine = (None, None) if window is None else window
        if values is not None and (values.dim() != 3 or min(values.shape) < 2):
            raise ValueError(f"the window must be a volume of at least 2 voxels per axis, got {tuple(values.shape)}")
        # None registers no state-dict entry: a field without a window saves what it always did.
        self.register_buffer("window", None if values is None else values.detach().float().contiguous().clone())
        self.register_buffer("window_affine", None if affine is None else affine.detach().double().clone())

        if config.encoding == "fourier":
            self.register_buffer("frequencies", torch.randn(4, config.n_frequencies) * config.sigma)
            in_features = 2 * config.n_frequencies + 4
        else:
            self.frequencies = None
            in_features = 4

        layers = []
        for i in range(config.depth):
            features = in_features if i == 0 else config.width
            if config.encoding == "siren":
                layers.append(SineLinear(features, config.width, config.omega0, first=i == 0))
            else:
                layers += [nn.Linear(features, config.width), ACTIVATIONS[config.activation]()]
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(config.width, 3)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def encode(self, points: torch.Tensor, t: float) -> torch.Tensor:
        """``(N, 3)`` mm points and time -> ``(N, F)`` network inputs."""
        q = (points - self.center) / self.half_extent
        q = torch.cat([q, torch.full_like(q[:, :1], 2.0 * t - 1.0)], dim=1)
        if self.frequencies is None:
            return q
        phase = (2.0 * math.pi) * (q @ self.frequencies)
        return torch.cat([torch.sin(phase), torch.cos(phase), q], dim=1)

    @property
    def window_grid(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(values, affine)`` of the window, the ``window`` argument that rebuilds this field; None without one."""
        return None if self.window is None else (self.window, self.window_affine)

    def window_at(self, points: torch.Tensor) -> torch.Tensor:
        """The window at ``(N, 3)`` world points (mm), ``(N,)``; ones without a window."""
        if self.window is None:
            return points.new_ones(points.shape[0])
        # The world -> grid map in float64 (the affine's precision), then in the points' dtype.
        to_grid = grid_coordinates(self.window.shape, self.window_affine).to(points.dtype)
        return sample_grid(self.window, apply_affine(to_grid, points))

    def fused(self, points: torch.Tensor) -> bool:
        """Whether these points go through the fused kernels (:mod:`.siren`)."""
        return self.config.encoding == "siren" and siren.applies(points, self.config.width)

    def _fused_arguments(self) -> dict:
        return dict(layers=[(layer.weight, layer.bias) for layer in self.hidden],
                    output=(self.output.weight, self.output.bias), omega0=self.config.omega0, center=self.center,
                    half_extent=self.half_extent, scale=float(self.scale))

    def forward(self, points: torch.Tensor, t: float) -> torch.Tensor:
        if self.fused(points):
            velocity = siren.siren_velocity(points, t, **self._fused_arguments())
        else:
            velocity = self.output(self.hidden(self.encode(points, t))) * self.scale
        if self.window is None:
            return velocity
        # Where the window is 0 the velocity is the output layer's bias alone: a translation, which carries
        # the air around a body that a setup shift moves, rather than holding it still.
        drift = self.output.bias * self.scale
        window = self.window_at(points)[:, None]
        return velocity * window + drift * (1 - window)

    def fused_flow(self, points: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~.flow.integrate` of this field in one autograd node; only where :meth:`fused`."""
        window = None if self.window is None else (self.window, torch.linalg.inv(self.window_affine)[:3])
        return siren.siren_flow(points, n_steps, window=window, **self._fused_arguments())

    def hyperparameters(self) -> dict:
        """Everything needed, with the state dict, to rebuild this network."""
        return asdict(self.config)
