"""The hand-written backward decompositions equal PyTorch's own backward, case by case.

Each case traces `torch.func.grad` of a small function with the ONNX decomposition table and
compares the traced graph (which then holds forward operators only) with eager autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from export.decompositions import onnx_decompositions
from export.trace import Routine, ops, trace

aten = torch.ops.aten


def traced_grad(loss_of, *inputs):
    """Gradients of `loss_of` w.r.t. all inputs, eager and through the decomposed trace."""
    grad = torch.func.grad(loss_of, argnums=tuple(range(len(inputs))))
    gm = make_fx(grad, decomposition_table=onnx_decompositions())(*inputs)
    return grad(*inputs), gm(*inputs), ops(gm)


def check(loss_of, *inputs, banned: tuple[str, ...] = ()):
    eager, traced, used = traced_grad(loss_of, *inputs)
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for name in banned:
        assert not [op for op in used if name in op], (name, used)


@pytest.mark.parametrize("stride, padding, dilation, groups", [
    (1, 0, 1, 1), (2, 1, 1, 1), (2, 1, 2, 1), (1, 1, 1, 2), (3, 2, 1, 4),
])
def test_convolution_backward(stride, padding, dilation, groups):
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 4, 11, 9), torch.randn(8, 4 // groups, 3, 3), torch.randn(8)

    def loss(x, w, b):
        return F.conv2d(x, w, b, stride, padding, dilation, groups).sin().sum()

    check(loss, x, w, b, banned=("convolution_backward",))


def test_transposed_and_1d_convolution_backward():
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 5, 6), torch.randn(4, 3, 3, 3)
    check(lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1)
          .cos().sum(), x, w, banned=("convolution_backward",))
    x1, w1 = torch.randn(2, 3, 17), torch.randn(5, 3, 4)
    check(lambda x, w: F.conv1d(x, w, stride=2).tanh().sum(), x1, w1,
          banned=("convolution_backward",))


@pytest.mark.parametrize("size", [28, 7, 3])
def test_max_pool_backward_without_scatter_and_with_ties(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size).relu()  # many all-zero windows: ties
    x[0, 0, :2, :2] = 1.0  # a window of four equal maxima
    check(lambda x: (F.max_pool2d(x, 2) * torch.arange(1.0, 4.0).view(1, 3, 1, 1)).sum(), x,
          banned=("scatter", "max_pool2d_with_indices_backward"))


def test_overlapping_max_pool_falls_back_to_torch_decomposition():
    x = torch.randn(2, 3, 9, 9)
    check(lambda x: F.max_pool2d(x, 3, stride=2, padding=1).square().sum(), x,
          banned=("max_pool2d_with_indices_backward",))


def test_average_pool_backward():
    x = torch.randn(2, 3, 9, 8)
    check(lambda x: F.avg_pool2d(x, 2).square().sum(), x, banned=("avg_pool2d_backward",))
    check(lambda x: F.avg_pool2d(x, 3, stride=2, padding=1).square().sum(), x,
          banned=("avg_pool2d_backward",))
    check(lambda x: F.adaptive_avg_pool2d(x[..., :8, :], 2).square().sum(), x,
          banned=("adaptive_avg_pool2d_backward",))


def test_cross_entropy_is_decomposed_for_onnx():
    """onnxscript 0.7.2 mistranslates nll_loss_forward (total_weight 1): it must not survive."""
    torch.manual_seed(0)
    weight = torch.randn(5, 7)
    x, y = torch.randn(10, 7), torch.arange(10) % 5

    def forward(params, inputs):
        return inputs @ params[0].t()

    r = Routine(forward, (weight,), ("weight",), torch.full((2, 1), 0.5), "cross_entropy")
    plain = trace(r, "adapt", (x, y))
    decomposed = trace(r, "adapt", (x, y), onnx_decompositions())
    assert any("nll_loss" in op for op in ops(plain))
    assert not any("nll_loss" in op for op in ops(decomposed))
    for n in (10, 3):  # S is dynamic
        torch.testing.assert_close(decomposed(x[:n], y[:n])[0], plain(x[:n], y[:n])[0])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_permuted_is_decomposed(layout):
    """SiLU's backward on a 3-d or 4-d input goes through `ones_like`, which torch decomposes
    to `empty_permuted` (no ONNX translation); it must become `empty` + `permute`."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 4) if layout == "contiguous" else \
        torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    eager, traced, used = traced_grad(lambda t: (F.silu(t) ** 2).sum(), x)
    torch.testing.assert_close(traced[0], eager[0], rtol=1e-5, atol=1e-5)
    assert any("empty" in op for op in used)  # the case is exercised, not optimised away
    assert not [op for op in used if "empty_permuted" in op], used
