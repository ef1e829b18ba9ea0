"""The stages' optimiser: torch's Adam and cosine schedule, without torch.optim's start-up cost."""

import subprocess
import sys

import torch

from nipype_inrlddmm.engine.adam import CosineAdam


def _fit(make_optimiser, iterations=40):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    network[0].bias.requires_grad_(False)  # a frozen parameter is left alone, as torch.optim does
    points, targets = torch.randn(64, 4), torch.randn(64, 3)
    optimiser, schedule = make_optimiser(network.parameters())
    for _ in range(iterations):
        optimiser.zero_grad()
        ((network(points) - targets) ** 2).mean().backward()
        optimiser.step()
        if schedule is not None:
            schedule.step()
    return torch.cat([p.detach().flatten() for p in network.parameters()])


def test_cosine_adam_takes_exactly_the_steps_of_torch_adam_with_a_cosine_schedule():
    ours = _fit(lambda parameters: (CosineAdam(parameters, 1e-2, 1e-3, 40), None))

    def reference(parameters):
        optimiser = torch.optim.Adam([p for p in parameters if p.requires_grad], lr=1e-2)
        return optimiser, torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=40, eta_min=1e-3)

    assert torch.equal(ours, _fit(reference))
    assert not torch.equal(ours, _fit(lambda parameters: (CosineAdam(parameters, 1e-2, 1e-2, 40), None)))


def test_a_stage_does_not_import_torch_dynamo():
    """torch.optim's first optimiser imports torch._dynamo, 1.2 s: a small image's whole fine stage."""
    script = (
        "import sys, torch\n"
        "from nipype_inrlddmm import engine\n"
        "volume = torch.rand(24, 24, 24)\n"
        "velocity = engine.new_velocity_field(volume.shape, torch.eye(4), engine.ModelConfig(width=96), seed=0)\n"
        "engine.fit_images(velocity, volume, torch.eye(4), volume, torch.eye(4), engine.StageConfig(iterations=2),"
        " n_steps=2)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
