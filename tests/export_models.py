"""Models that live only in the tests, to check that training and export are model-agnostic.

`python -m maml train --model tests.export_models:layernorm_gelu_mlp` trains them like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def layernorm_gelu_mlp(hidden: int = 16) -> nn.Module:
    """A regression MLP with LayerNorm, GELU and dropout (layers the built-in models never use)."""
    return nn.Sequential(
        nn.Linear(1, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(0.2),
        nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1),
    )


class _Noisy(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)


def noisy_mlp() -> nn.Module:
    """A regression MLP that adds fresh noise to its hidden layer on every call, like a sampling
    layer: random even where dropout is off."""
    return nn.Sequential(nn.Linear(1, 16), _Noisy(), nn.ReLU(), nn.Linear(16, 1))


class _Grid(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], 1, 4, 4)


def ceil_avgpool_mlp() -> nn.Module:
    """A regression model whose pooling backward has no ONNX decomposition (ceil_mode)."""
    return nn.Sequential(nn.Linear(1, 16), _Grid(), nn.AvgPool2d(3, stride=2, ceil_mode=True),
                         nn.Flatten(), nn.Linear(4, 1))


class _WithSpare(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.spare = nn.Linear(3, 2)  # registered, never called: an auxiliary head, say
        self.register_buffer("scale", torch.tensor([0.5]))  # a fixed tensor, kept as a buffer

    def forward(self, x):
        return self.body(x * self.scale)


def mlp_with_spare_layer(hidden: int = 16) -> nn.Module:
    """A regression MLP with a parameterised layer its forward never uses, and a buffer."""
    return _WithSpare(hidden)


def frozen_first_layer_mlp() -> nn.Module:
    """A regression MLP whose first layer is frozen (`requires_grad=False`)."""
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
    model[0].requires_grad_(False)
    return model


class _WithAux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        return self.head(x), x.abs().mean()  # predictions and an auxiliary value


def tuple_output_mlp() -> nn.Module:
    """A model whose forward returns a tuple, as many research models do."""
    return _WithAux()


def failing_factory() -> nn.Module:
    """A factory that fails, as one with a missing weights file or a bad config does."""
    raise RuntimeError("weights file not found")


def parameterless() -> nn.Module:
    """A model with nothing to learn."""
    return nn.Sequential(nn.ReLU())


class _Rounded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        return self.head(x).round().long()  # integer predictions: nothing to differentiate


def integer_output() -> nn.Module:
    """A regression model that returns int64 predictions."""
    return _Rounded()


class _Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
        self.temperature = nn.Parameter(torch.tensor(1.5))  # 0-dim

    def forward(self, x):
        return self.body(x) * self.temperature


def temperature_mlp() -> nn.Module:
    """A regression MLP with a 0-dim parameter, as a learned temperature or scale is written."""
    return _Temperature()


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(1, 32), nn.Linear(32, 1)

    def forward(self, x):
        return self.out(F.dropout(torch.relu(self.inp(x)), 0.3, self.training))


def functional_dropout_mlp() -> nn.Module:
    """Dropout as `F.dropout(x, p, self.training)`: off in the adapter as `nn.Dropout` is."""
    return _FunctionalDropout()


class _Tokens(nn.Module):
    """Each scalar input as a sequence of 4 tokens of width 8, through `body`, mean-pooled."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.embed, self.body, self.head = nn.Linear(1, 32), body, nn.Linear(8, 1)

    def forward(self, x):
        tokens = self.embed(x).reshape(x.shape[0], 4, 8)
        out = self.body(tokens)
        return self.head((out[0] if isinstance(out, tuple) else out).mean(1))


def transformer_regressor() -> nn.Module:
    """A transformer encoder layer: attention (whose out_proj `higher` cannot adapt),
    `scaled_dot_product_attention` and linear layers on 3-d inputs."""
    return _Tokens(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))


def lstm_regressor() -> nn.Module:
    """An LSTM over the tokens (on the CPU, torch runs it as one fused mkldnn operator)."""
    return _Tokens(nn.LSTM(8, 8, batch_first=True))


class _PerExample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return torch.stack([self.body(x[i]) for i in range(x.shape[0])])  # a loop over examples


def per_example_mlp() -> nn.Module:
    """A forward that loops over its examples in Python: traced, it fixes their number."""
    return _PerExample()


class _Counting(nn.Module):
    """Counts its calls in a buffer: a side effect the exported pure function cannot keep."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.body = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        self.calls += 1
        return self.body(x)


def counting_mlp() -> nn.Module:
    return _Counting()


def batchnorm_mlp(hidden: int = 16) -> nn.Module:
    """A regression MLP with BatchNorm1d: batch norm without images (and without data files)."""
    return nn.Sequential(
        nn.Linear(1, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1),
    )
