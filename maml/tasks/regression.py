"""Few-shot regression tasks: sinusoids (Finn et al. 2017) and harmonics (Lacoste et al. 2018).

Regression tasks have no class split: every task is a fresh draw of the function's parameters.
Meta-training and meta-testing use separate generators (see `maml.training`), so no test task is
reused from training in practice.
"""

from __future__ import annotations

import math

import torch

from maml.tasks import TaskBatch


class Sinusoid:
    """y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5] (MAML paper)."""

    kind = "regression"
    loss = "mse"
    input_shape = (1,)
    output_shape = (1,)  # what the model must return per example: the target

    def __init__(self, k_shot: int, q_query: int, device: str | torch.device = "cpu") -> None:
        self.k_shot, self.q_query, self.device = k_shot, q_query, torch.device(device)

    def describe(self) -> dict:
        return {"name": "sinusoid", "amplitude": [0.1, 5.0], "phase": [0.0, math.pi],
                "x": [-5.0, 5.0], "k_shot": self.k_shot, "q_query": self.q_query}

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        n = self.k_shot + self.q_query
        amp = 0.1 + 4.9 * torch.rand(batch_size, 1, 1, generator=generator)
        phase = math.pi * torch.rand(batch_size, 1, 1, generator=generator)
        x = -5.0 + 10.0 * torch.rand(batch_size, n, 1, generator=generator)
        y = amp * torch.sin(x - phase)
        return _split(x, y, self.k_shot).to(self.device)


class Harmonic:
    """y = a1 sin(w x + b1) + a2 sin(2 w x + b2), as torchmeta implements Lacoste et al. (2018).

    w ~ U[5, 7], a1, a2 ~ N(0, 1), b1, b2 ~ U[0, 2 pi], x = mu + N(0, 1) with mu ~ U[-4, 4] per task.
    """

    kind = "regression"
    loss = "mse"
    input_shape = (1,)
    output_shape = (1,)  # what the model must return per example: the target

    def __init__(self, k_shot: int, q_query: int, device: str | torch.device = "cpu") -> None:
        self.k_shot, self.q_query, self.device = k_shot, q_query, torch.device(device)

    def describe(self) -> dict:
        return {"name": "harmonic", "frequency": [5.0, 7.0], "amplitudes": "N(0,1)",
                "phases": [0.0, 2 * math.pi], "x": "mu + N(0,1), mu ~ U[-4,4]",
                "k_shot": self.k_shot, "q_query": self.q_query}

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        n = self.k_shot + self.q_query
        shape = (batch_size, 1, 1)
        w = 5.0 + 2.0 * torch.rand(shape, generator=generator)
        a1, a2 = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        b1 = 2 * math.pi * torch.rand(shape, generator=generator)
        b2 = 2 * math.pi * torch.rand(shape, generator=generator)
        mu = -4.0 + 8.0 * torch.rand(shape, generator=generator)
        x = mu + torch.randn(batch_size, n, 1, generator=generator)
        y = a1 * torch.sin(w * x + b1) + a2 * torch.sin(2 * w * x + b2)
        return _split(x, y, self.k_shot).to(self.device)


def _split(x: torch.Tensor, y: torch.Tensor, k: int) -> TaskBatch:
    return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
