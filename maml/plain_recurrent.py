"""Recurrent layers as plain tensor ops over the time steps, so `vmap` can batch them over tasks.

`nn.LSTM`, `nn.GRU` and `nn.RNN` call one fused operator (`torch._VF.lstm`, `gru`, `rnn_tanh`,
`rnn_relu`), and their cells another (`lstm_cell`, ...), that `vmap` cannot batch: the batched
engine failed on them with "Batching rule not implemented for aten::lstm.input" (layers) or a
broadcast error from an in-place op (cells). `PlainRecurrent` is a `TorchFunctionMode` that,
while active, computes the layers with PyTorch's own decompositions (linear maps, sigmoids and
tanhs per step, `torch._decomp.decompositions`, what its compiler uses) and the cells with the
one-step functions below. The result is exact: the batched engine's float64 meta-gradient for
LSTM, GRU and RNN models (stacked, bidirectional, with projections) and the three cells matches
the loop to ~3e-16 (`tests/test_batched_engine.py`).

Users keep writing `nn.LSTM`; the batched engine runs their forward inside this mode. Packed
sequences (the `.data` overloads) pass through untouched. If a torch version lacks the
decompositions, layers pass through too, and the engine's probe names what it cannot batch.
`seen` records whether any recurrent operator was called under the mode: the engine enters it only
for forwards that do.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def lstm_cell(x: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step of `nn.LSTMCell`: gates in the order input, forget, cell, output."""
    h, c = hx
    i, f, g, o = (F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor:
    """One step of `nn.GRUCell`: gates in the order reset, update, new."""
    i_r, i_z, i_n = F.linear(x, w_ih, b_ih).chunk(3, 1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, 1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (h - n) * z + n


def _rnn_cell(activation):
    def cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Tensor:
        return activation(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh))

    cell.__doc__ = f"One step of `nn.RNNCell` with {activation.__name__}."
    return cell


_CELLS = {
    torch._VF.lstm_cell: lstm_cell,
    torch._VF.gru_cell: gru_cell,
    torch._VF.rnn_tanh_cell: _rnn_cell(torch.tanh),
    torch._VF.rnn_relu_cell: _rnn_cell(torch.relu),
}

try:  # private, but it is what PyTorch's own compiler decomposes these layers with
    from torch._decomp import decompositions as _decomp

    _LAYERS = {
        torch._VF.lstm: _decomp.lstm_impl,
        torch._VF.gru: _decomp.gru_impl,
        torch._VF.rnn_tanh: _decomp.rnn_tanh_input,
        torch._VF.rnn_relu: _decomp.rnn_relu_input,
    }
except (ImportError, AttributeError):  # pragma: no cover - depends on the torch version
    _LAYERS = {}


def _padded_overload(args: tuple) -> bool:
    """`(input, hx, params, ...)` rather than the packed `(data, batch_sizes, hx, params, ...)`."""
    return len(args) == 9 and isinstance(args[2], (list, tuple))


class PlainRecurrent(TorchFunctionMode):
    """Route the fused recurrent operators to their plain-op versions while active.

    `seen` turns True once a recurrent operator is called under the mode (rerouted or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CELLS or func in _LAYERS:
            self.seen = True
        if func in _CELLS:
            return _CELLS[func](*args, **kwargs)
        plain = _LAYERS.get(func)
        if plain is not None and not kwargs and _padded_overload(args):
            with _without_mkldnn() if args[0].device.type == "cpu" else nullcontext():
                return plain(*args)
        return func(*args, **kwargs)


@contextmanager
def _without_mkldnn() -> Iterator[None]:
    """On a CPU the LSTM decomposition would pick the fused mkldnn operator again."""
    with warnings.catch_warnings():  # mkldnn.flags warns about Intel GPUs' TF32 on a CPU build
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield
