"""The velocity network f(x, y, z, t) -> (vx, vy, vz) of INR-LDDMM.

Choice of default, by measurement (``python benchmarks/encodings.py``, every
other setting at its default, 1 thread): a SIREN (sine activations;
compared at omega_0 = 30, as IDIR).  On the real brain pair (subject A -> B
at 2 mm, 30 labels, unregistered mean Dice 0.524) it reached mean Dice 0.678 against
0.585 for random Fourier features (sigma 2; 0.563 with sigma 4) and 0.536
for a SiLU MLP on raw (x, y, z, t), with 0.0001 % det J <= 0.  On the
phantom CT -> CBCT pairs, whose deformation is far smoother than
inter-subject anatomy, the smoother encodings reach a slightly lower
end-point error (patient 1: raw 0.39, Fourier 0.43, SIREN 0.52 voxel) but
SIREN gives the higher Dice on every label (spinal cord 0.89-0.92 against
0.88-0.89).

omega_0 and the number of Euler steps were then tuned with the full
pipeline (``python benchmarks/accuracy.py --sets brain-pair lung-ct
--methods inr-lddmm --threads 1 --inr-options ...``, 24 patches per
iteration).  omega_0 20 / 25 / 30 / 45 gave brain-pair mean Dice 0.717 /
0.724 / 0.722 / 0.684 with 0.0001 / 0.017 / 0.059 / 0.82 % det J <= 0: a
higher omega_0 fits finer detail until the field starts to fold.  With
omega_0 = 25 the lung-ct landmark TRE was 1.74 mm (1.99 mm at 30).  Those
runs integrated the flow on every voxel of 24 patches; the default now
integrates it on a stride-2 lattice of 48 patches (:class:`StageConfig`),
where omega_0 25 folded 0.23 % of brain-pair voxels and 20 folds 0.036 %
(brain-pair 0.721, lung-ct TRE 1.53 mm): omega_0 is 20.  Euler
steps 3 / 4 / 6 (omega_0 30, 16 patches) gave brain-pair 0.705 / 0.714 /
0.713 and lung-ct TRE 2.44 / 2.27 / 2.31 mm: four steps are as accurate as
six for two thirds of the network work, three start to fold (0.049 %).

Width, with those settings and 400 fine iterations (brain-pair mean Dice
and % det J <= 0, same command, 1 thread, on an AVX-512 Xeon): 64 units
0.736 (0.070 %), 96 units 0.748 (0.089 %), 128 units 0.759 (0.28 %; 0.749
and 0.041 % at omega_0 15, 0.754 and 0.15 % at 17.5), two hidden layers of
128 or 96 units 0.738 / 0.733.  A wider layer fits finer detail and folds
more, as a higher omega_0 does.  The network is 96 units wide, 2.2 x the
FLOPs of 64 (1.65-1.8 x the time alone, 2 threads), adopted with 300 fine
iterations instead of 400, now 225 to keep within SyN's time on a CPU with
half that Xeon's matmul rate (:class:`~nipype_inrlddmm.engine.RegistrationConfig`).

Once the dense field was interpolated from the training lattice's spacing
(``RegistrationConfig.field_stride``), omega_0 22.5 / 25 against 20 gave
brain-pair 0.750 / 0.751 with 0.054 / 0.15 % det J <= 0 (20: 0.747, 0.040
%), and 22.5 gave lung-ct Dice 0.9863 and TRE 1.55 mm (20: 0.9864, 1.59
mm), phantom 0.974 (0.973), 225 fine iterations, 1 thread, on an AMD EPYC
with AVX-512.  At 22.5 the distillation from an untrained network fitted
the phantom's coarse field to 0.52 voxel (0.48 at 20), past the half voxel
that tests/test_registration.py asks of it; with the distillation's
learning rate at 1.5e-3 (:class:`~nipype_inrlddmm.engine.RegistrationConfig`)
it fits it to 0.37, and omega_0 is 22.5.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import siren
from .sine import sine_linear

ENCODINGS = ("fourier", "siren", "none")
ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the velocity network and of its flow.

    ``depth`` counts hidden layers (the paper's MLP has three).  ``sigma`` is
    the standard deviation of the Fourier frequencies in cycles per image
    half-extent; ``n_steps`` the number of Euler steps over t in [0, 1].
    """

    width: int = 96
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
        if self.width < 1 or self.depth < 1 or self.n_steps < 1:
            raise ValueError("width, depth and n_steps must be positive")


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


class VelocityField(nn.Module):
    """Time-varying velocity field in world coordinates.

    Parameters
    ----------
    center, half_extent : ``(3,)`` tensors (mm) of the fixed image's bounding
        box; inputs are normalised by them so the same network describes the
        field at any resolution of that image.
    config : :class:`ModelConfig`.

    ``forward(points, t)`` takes ``(N, 3)`` world points (mm, RAS) and a
    float time ``t`` in [0, 1] and returns ``(N, 3)`` velocities in mm per
    unit time.  The output layer starts at zero, so an untrained field is the
    identity map.  The SIREN network runs as one fused pass per direction
    (:func:`~.siren.siren_velocity`) where :func:`~.siren.applies` (CPU float32
    on AVX-512F), and layer by layer through PyTorch elsewhere; the two agree
    to float rounding.
    """

    def __init__(self, center: torch.Tensor, half_extent: torch.Tensor, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.register_buffer("center", torch.as_tensor(center, dtype=torch.float32).clone())
        self.register_buffer("half_extent", torch.as_tensor(half_extent, dtype=torch.float32).clone())
        # One scalar length keeps the output isotropic in mm.
        self.register_buffer("scale", self.half_extent.mean().reshape(()))

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

    def fused(self, points: torch.Tensor) -> bool:
        """Whether these points go through the fused kernels (:mod:`.siren`)."""
        return self.config.encoding == "siren" and siren.applies(points, self.config.width)

    def _fused_arguments(self) -> dict:
        return dict(layers=[(layer.weight, layer.bias) for layer in self.hidden],
                    output=(self.output.weight, self.output.bias), omega0=self.config.omega0, center=self.center,
                    half_extent=self.half_extent, scale=float(self.scale))

    def forward(self, points: torch.Tensor, t: float) -> torch.Tensor:
        if self.fused(points):
            return siren.siren_velocity(points, t, **self._fused_arguments())
        return self.output(self.hidden(self.encode(points, t))) * self.scale

    def fused_flow(self, points: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~.flow.integrate` of this field in one autograd node; only where :meth:`fused`."""
        return siren.siren_flow(points, n_steps, **self._fused_arguments())

    def hyperparameters(self) -> dict:
        """Everything needed, with the state dict, to rebuild this network."""
        return asdict(self.config)
