"""Adam with a cosine learning-rate decay, the optimiser of every stage.

The update is torch's own (:func:`torch.optim.adam.adam`, the functional
form of :class:`torch.optim.Adam` with its defaults) and the learning rate
that of :class:`torch.optim.lr_scheduler.CosineAnnealingLR`.  The classes
are not used because the first :class:`torch.optim.Optimizer` a process
builds imports ``torch._dynamo``, 1.2 s on a 2-core machine: longer than a
small image's whole fine stage, paid again by every Nipype node.
"""

from __future__ import annotations

import math

import torch
from torch.optim.adam import adam


def cosine_learning_rate(initial: float, final: float, iteration: int, iterations: int) -> float:
    """The rate at ``iteration`` of ``iterations`` along a half cosine from ``initial`` to ``final``."""
    return final + (initial - final) * (1.0 + math.cos(math.pi * iteration / max(iterations, 1))) / 2.0


class CosineAdam:
    """Adam on ``parameters`` whose rate decays from ``learning_rate`` to ``final_rate`` over ``iterations``.

    ``step()`` applies the gradients the parameters hold and moves to the
    next iteration's rate; ``zero_grad()`` clears them.
    """

    def __init__(self, parameters, learning_rate: float, final_rate: float, iterations: int):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.rates = (learning_rate, final_rate, iterations)
        self.iteration = 0
        self.first_moments = [torch.zeros_like(p) for p in self.parameters]
        self.second_moments = [torch.zeros_like(p) for p in self.parameters]
        self.steps = [torch.tensor(0.0) for _ in self.parameters]

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        initial, final, iterations = self.rates
        with_grad = [i for i, p in enumerate(self.parameters) if p.grad is not None]
        adam([self.parameters[i] for i in with_grad], [self.parameters[i].grad for i in with_grad],
             [self.first_moments[i] for i in with_grad], [self.second_moments[i] for i in with_grad], [],
             [self.steps[i] for i in with_grad], foreach=None, capturable=False, differentiable=False, fused=None,
             grad_scale=None, found_inf=None, has_complex=False, amsgrad=False, beta1=0.9, beta2=0.999,
             lr=cosine_learning_rate(initial, final, self.iteration, iterations), weight_decay=0.0, eps=1e-8,
             maximize=False)
        self.iteration += 1
