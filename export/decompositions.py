"""Decompositions that turn the traced backward operators into operators ONNX can express.

`torch._decomp` already decomposes most backward operators (batch norm, log-softmax, ReLU,
MSE, ...) and, importantly, `nll_loss_forward` / `nll_loss_backward`: onnxscript 0.7.2 translates
an undecomposed `nll_loss_forward` with a fake `total_weight` of 1, which makes every
cross-entropy gradient N times too large without any error.

torch 2.14 has none for `convolution_backward` and the pooling backward operators; they are
written here from forward operators only:

- convolution: the input gradient is a transposed convolution of the output gradient, the
  weight gradient a convolution of the input with the output gradient as kernel (stride and
  dilation swapped), one per group;
- max-pool with non-overlapping windows (kernel = stride, the usual 2x2): the gradient goes to
  the first maximum of each window (PyTorch's tie rule), found with argmax and an equality mask
  on a reshaped view, instead of torch's `scatter_add` decomposition (ScatterElements in ONNX,
  slow in onnxruntime); other max-pool configurations keep torch's decomposition;
- average pooling with a constant divisor: a depthwise transposed convolution with a box kernel;
- `empty_permuted` (no ONNX translation), which torch's own `*_like` decompositions emit: an
  `empty` tensor in the physical order, permuted back.

A decomposition returns `NotImplemented` for a case it does not cover; the operator then stays in
the graph and the ONNX export names it in its error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._decomp import core_aten_decompositions, decomposition_table

aten = torch.ops.aten


def _pair(v: int | Sequence[int], n: int = 2) -> list[int]:
    """An int or a 1- or n-element sequence as an n-element list."""
    if isinstance(v, int):
        return [v] * n
    values = [int(x) for x in v]
    return values * n if len(values) == 1 else values


def _conv_input_grad(
    grad: Tensor, input_shape: Sequence[int], weight: Tensor, stride, padding, dilation, groups: int
) -> Tensor:
    """d loss / d input of a convolution: the transposed convolution of `grad`."""
    dims = weight.dim() - 2
    output_padding = [
        int(input_shape[2 + i]) - ((int(grad.shape[2 + i]) - 1) * stride[i] - 2 * padding[i]
                                   + dilation[i] * (int(weight.shape[2 + i]) - 1) + 1)
        for i in range(dims)
    ]
    return aten.convolution.default(grad, weight, None, stride, padding, dilation, True,
                                    output_padding, groups)


def _conv_weight_grad(
    x: Tensor, grad: Tensor, weight_shape: Sequence[int], stride, padding, dilation, groups: int
) -> Tensor:
    """d loss / d weight of `conv(x, w)`: `x` convolved with `grad` as kernel, per group."""
    dims = len(weight_shape) - 2
    c_in, c_out = x.shape[1] // groups, grad.shape[1] // groups
    parts = []
    for j in range(groups):
        xj = x[:, j * c_in:(j + 1) * c_in] if groups > 1 else x
        gj = grad[:, j * c_out:(j + 1) * c_out] if groups > 1 else grad
        w = aten.convolution.default(xj.transpose(0, 1), gj.transpose(0, 1), None, dilation,
                                     padding, stride, False, [0] * dims, 1)
        w = w.transpose(0, 1)
        for i in range(dims):
            w = w.narrow(2 + i, 0, int(weight_shape[2 + i]))
        parts.append(w)
    return torch.cat(parts, dim=0) if groups > 1 else parts[0]


def convolution_backward(
    grad_output: Tensor, input: Tensor, weight: Tensor, bias_sizes: Any, stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], transposed: bool,
    output_padding: Sequence[int], groups: int, output_mask: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`aten.convolution_backward` from forward convolutions (ordinary and transposed)."""
    dims = weight.dim() - 2
    stride, padding, dilation = (_pair(v, dims) for v in (stride, padding, dilation))
    grad_input = grad_weight = grad_bias = None
    if output_mask[2]:
        grad_bias = grad_output.sum([0, *range(2, grad_output.dim())])
    if not transposed:
        if output_mask[0]:
            grad_input = _conv_input_grad(grad_output, input.shape, weight, stride, padding,
                                          dilation, groups)
        if output_mask[1]:
            grad_weight = _conv_weight_grad(input, grad_output, weight.shape, stride, padding,
                                            dilation, groups)
    else:  # y = conv_T(x, w) is the adjoint of x = conv(y, w): swap the roles
        if output_mask[0]:
            grad_input = aten.convolution.default(grad_output, weight, None, stride, padding,
                                                  dilation, False, [0] * dims, groups)
        if output_mask[1]:
            grad_weight = _conv_weight_grad(grad_output, input, weight.shape, stride, padding,
                                            dilation, groups)
    return grad_input, grad_weight, grad_bias


def max_pool2d_backward(
    grad_output: Tensor, self: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool,
    indices: Tensor,
) -> Tensor:
    """Max-pool backward for non-overlapping windows by a first-maximum mask, no scatter."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride) if stride else (kh, kw)
    simple = ((sh, sw) == (kh, kw) and not any(_pair(padding)) and _pair(dilation) == [1, 1]
              and self.dim() == 4)
    ho, wo = int(grad_output.shape[-2]), int(grad_output.shape[-1])
    h, w = int(self.shape[-2]), int(self.shape[-1])
    if not simple or ho * kh > h or wo * kw > w:  # ceil_mode windows past the edge
        return decomposition_table[aten.max_pool2d_with_indices_backward.default](
            grad_output, self, kernel_size, stride, padding, dilation, ceil_mode, indices)
    n, c = self.shape[0], self.shape[1]
    x = self[:, :, : ho * kh, : wo * kw]
    windows = x.reshape(n, c, ho, kh, wo, kw).permute(0, 1, 2, 4, 3, 5)
    windows = windows.reshape(n, c, ho, wo, kh * kw)
    first = windows.argmax(dim=-1, keepdim=True)
    slots = torch.arange(kh * kw, device=self.device)
    grads = (first == slots).to(grad_output.dtype) * grad_output.unsqueeze(-1)
    grads = grads.reshape(n, c, ho, wo, kh, kw).permute(0, 1, 2, 4, 3, 5)
    grads = grads.reshape(n, c, ho * kh, wo * kw)
    return aten.constant_pad_nd.default(grads, [0, w - wo * kw, 0, h - ho * kh], 0.0)


def _box_transpose(grad: Tensor, shape: Sequence[int], kernel: list[int], stride: list[int],
                   padding: list[int], divisor: float) -> Tensor:
    channels = int(shape[1])
    box = torch.full((channels, 1, *kernel), 1.0 / divisor, dtype=grad.dtype, device=grad.device)
    return _conv_input_grad(grad, shape, box, stride, padding, [1, 1], channels)


def avg_pool2d_backward(
    grad_output: Tensor, self: Tensor, kernel_size, stride, padding, ceil_mode: bool,
    count_include_pad: bool, divisor_override: int | None,
) -> Tensor:
    """Average-pool backward when every window has the same divisor."""
    kernel = _pair(kernel_size)
    stride = _pair(stride) if stride else kernel
    padding = _pair(padding)
    if self.dim() != 4 or ceil_mode or (any(padding) and not count_include_pad and
                                        divisor_override is None):
        return NotImplemented
    divisor = divisor_override or kernel[0] * kernel[1]
    return _box_transpose(grad_output, self.shape, kernel, stride, padding, float(divisor))


def adaptive_avg_pool2d_backward(grad_output: Tensor, self: Tensor) -> Tensor:
    """Adaptive average-pool backward when the output size divides the input size."""
    h, w = int(self.shape[-2]), int(self.shape[-1])
    ho, wo = int(grad_output.shape[-2]), int(grad_output.shape[-1])
    if self.dim() != 4 or h % ho or w % wo:
        return NotImplemented
    kernel = [h // ho, w // wo]
    divisor = float(kernel[0] * kernel[1])
    return _box_transpose(grad_output, self.shape, kernel, kernel, [0, 0], divisor)


def empty_permuted(size: Sequence[int], physical_layout: Sequence[int], **options: Any) -> Tensor:
    """`empty_permuted` (which torch's decompositions of `ones_like` and `full_like` emit to keep
    a layout, e.g. in the backward of SiLU on 3-d inputs) as `empty` in the physical order, then
    `permute` back to the logical one."""
    order = list(physical_layout)
    physical = aten.empty.memory_format([size[i] for i in order], **options)
    return aten.permute.default(physical, [order.index(i) for i in range(len(order))])


HAND_WRITTEN: dict[Any, Callable] = {
    aten.empty_permuted.default: empty_permuted,
    aten.convolution_backward.default: convolution_backward,
    aten.max_pool2d_with_indices_backward.default: max_pool2d_backward,
    aten.avg_pool2d_backward.default: avg_pool2d_backward,
    aten._adaptive_avg_pool2d_backward.default: adaptive_avg_pool2d_backward,
}


def onnx_decompositions() -> dict[Any, Callable]:
    """Core-ATen decompositions, every backward decomposition torch has, and the ones above."""
    table = dict(core_aten_decompositions())
    for op, fn in decomposition_table.items():
        name = op.name()
        if "backward" in name and op not in table:
            table[op] = fn
    table.update(HAND_WRITTEN)
    return table
