"""Models that live only in the tests, to check that export is model-agnostic.

`python -m maml train --model tests.export_models:layernorm_gelu_mlp` trains them like any other.
"""

from __future__ import annotations

from torch import nn


def layernorm_gelu_mlp(hidden: int = 16) -> nn.Module:
    """A regression MLP with LayerNorm and GELU (ops the built-in models never use)."""
    return nn.Sequential(
        nn.Linear(1, hidden), nn.LayerNorm(hidden), nn.GELU(),
        nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1),
    )


class _Grid(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], 1, 4, 4)


def ceil_avgpool_mlp() -> nn.Module:
    """A regression model whose pooling backward has no ONNX decomposition (ceil_mode)."""
    return nn.Sequential(nn.Linear(1, 16), _Grid(), nn.AvgPool2d(3, stride=2, ceil_mode=True),
                         nn.Flatten(), nn.Linear(4, 1))
