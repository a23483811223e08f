"""What adaptation means, written once.

MAML adapts a model to a task by taking `steps` plain SGD steps on the task's support-set loss,
starting from the meta-learned weights:

    theta[s + 1][i] = theta[s][i] - alpha[s, i] * d L_support(theta[s]) / d theta[s][i]

for step `s` and parameter tensor `i`. Every consumer takes that definition from this module:
the `higher` engine (meta-training), the batched `torch.func` engine, evaluation and export all
call `adapt` with the same `InnerLoop`, loss and step-size table, so what ships is what was
trained. They differ only in *how* a gradient is taken (a `GradFn`): `torch.autograd.grad` for the
`higher` engine and evaluation; `torch.func.grad` for export (traced by `make_fx`) and, inside
`vmap`, for the batched engine.

Conventions, documented here and nowhere else:

- Losses are averaged per example: cross-entropy for classification, mean squared error for
  regression (the seed summed; averaging keeps the step size independent of the shot count).
- Batch norm always normalises with batch statistics, never running ones (see
  `use_batch_statistics`): the support batch's in the inner loop, and at prediction time, in
  training and evaluation alike, those the normalisation mode names (`InnerLoop.norm`, defined in
  `maml.norms`): the query batch's own (`transductive`, the MAML paper's convention) or the
  support set's under the adapted weights (`support`, which `adapt_task` returns with the
  adapted weights as the task's state).
- Step sizes form a table of shape `(steps, tensors)`. A scalar alpha fills it; learned step sizes
  (Meta-SGD / MAML++ "LSLR": one per parameter tensor and per step) are a meta-parameter of that
  shape. Adapting for more steps than the table has rows reuses its last row.
- First order: the support gradients are treated as constants (no graph through them), which is
  first-order MAML; learned step sizes still receive their (first-order) gradient.
- Meta-training calls the model in training mode: dropout draws its masks (inner loop and query
  loss alike). Wherever a task is adapted to for use (evaluation, validation and the exported
  adapter, which must be deterministic functions of their inputs) every layer is in evaluation
  mode except the norm layers (`evaluation_mode`): `nn.Dropout` is off, and so is a hand-written
  `F.dropout(x, p, self.training)` or any other `self.training` branch, as after `model.eval()`.
  Batch norm keeps its batch statistics there all the same.
- Second order differentiates the inner loop's gradients, so meta-training runs attention in its
  math form (`twice_differentiable`): torch's fused attention kernels have no derivative of their
  backward. First order and adapting for use keep the fused kernels.
- Every parameter of the model is adapted and meta-learned. A parameter the forward does not use
  has a zero gradient, so it stays where it is. A frozen parameter (`requires_grad=False`) is
  refused by `check_adaptable`: fixed tensors belong in buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from maml.norms import (
    Moments,
    blend_indices,
    blends_from,
    check_mode,
    on_support,
    support_moments,
)

Params = tuple[Tensor, ...]
"""Parameter tensors in the order of `model.named_parameters()`."""

Forward = Callable[[Params, Tensor], Tensor]
"""A functional model: `forward(params, x) -> outputs`."""

GradFn = Callable[[Callable[[Params], Tensor], Params], Params]
"""Takes `loss_of(params) -> scalar` and `params`, returns d loss / d params."""

LOSSES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class InnerLoop:
    """The inner loop of one task: its loss, number of SGD steps and (initial) step size."""

    loss: str
    steps: int
    lr: float
    first_order: bool = False
    norm: str = "transductive"

    def __post_init__(self) -> None:
        check_mode(self.norm)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
        if self.steps < 0:
            raise ValueError(f"inner steps must be >= 0, got {self.steps}")


def task_loss(kind: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean per-example loss: cross-entropy on class indices, or MSE on regression targets.

    Mismatched targets are refused: torch would broadcast MSE targets of another shape into a
    wrong but finite loss (with a warning at most), or read float labels as probabilities."""
    if not isinstance(outputs, Tensor):
        raise TypeError(f"the model returns a {type(outputs).__name__}, not one tensor: the loss "
                        "needs the predictions (or logits) alone, so return only those")
    if kind == "cross_entropy":
        if targets.is_floating_point() or targets.shape != outputs.shape[:-1]:
            raise ValueError(
                f"cross-entropy needs integer class labels of shape {tuple(outputs.shape[:-1])} "
                f"for logits of shape {tuple(outputs.shape)}, got {targets.dtype} labels of "
                f"shape {tuple(targets.shape)}"
            )
        return F.cross_entropy(outputs, targets)
    if kind == "mse":
        if targets.shape != outputs.shape:
            raise ValueError(
                f"MSE needs targets of the outputs' shape {tuple(outputs.shape)}, got "
                f"{tuple(targets.shape)} (a regression target keeps its last dimension: "
                "(examples, 1), not (examples,))"
            )
        return F.mse_loss(outputs, targets)
    raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")


def step_size_table(
    steps: int, n_tensors: int, lr: float, learned: Tensor | None = None,
    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
) -> Tensor:
    """The `(steps, n_tensors)` table of step sizes that `adapt` uses.

    Without learned step sizes every entry is `lr` (in `dtype` on `device`, to match the
    parameters). With them, row `s` is the learned row `s`, and steps past the learned rows
    reuse the last learned row.
    """
    if learned is None:
        return torch.full((steps, n_tensors), float(lr), dtype=dtype, device=device)
    if learned.ndim != 2 or learned.shape[1] != n_tensors:
        raise ValueError(
            f"learned step sizes have shape {tuple(learned.shape)}, expected (steps, {n_tensors})"
        )
    if steps <= learned.shape[0]:
        return learned[:steps]
    extra = learned[-1:].expand(steps - learned.shape[0], n_tensors)
    return torch.cat([learned, extra], dim=0)


def sgd_step(params: Params, grads: Sequence[Tensor], step_sizes: Tensor) -> Params:
    """One plain SGD step, tensor `i` moving by `step_sizes[i]` times its gradient."""
    return tuple(p - step_sizes[i] * g for i, (p, g) in enumerate(zip(params, grads)))


def adapt(
    forward: Forward,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    loss: str,
    step_sizes: Tensor,
    grad_fn: GradFn,
) -> Params:
    """Fine-tune `params` on one task's support set: one SGD step per row of `step_sizes`."""
    for s in range(step_sizes.shape[0]):

        def support_loss(p: Params) -> Tensor:
            return task_loss(loss, forward(p, support_x), support_y)

        grads = grad_fn(support_loss, params)
        params = sgd_step(params, grads, step_sizes[s])
    return params


def adapt_task(
    forward: Forward,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    loss: str,
    step_sizes: Tensor,
    grad_fn: GradFn,
    norm: str,
) -> tuple[Params, Moments]:
    """A task's adapted state: the weights after `adapt`, and the support set's batch-norm
    moments under them (empty unless `norm` is `support`); `maml.norms.predict` takes both."""
    def inner_forward(p: Params, x: Tensor) -> Tensor:
        return on_support(forward, p, x, norm)

    fast = adapt(inner_forward, params, support_x, support_y, loss, step_sizes, grad_fn)
    return fast, support_moments(forward, fast, support_x, norm)


def autograd_grad(create_graph: bool) -> GradFn:
    """A `GradFn` from `torch.autograd.grad`; `create_graph=True` keeps second-order terms."""

    def grad(loss_of: Callable[[Params], Tensor], params: Params) -> Params:
        return torch.autograd.grad(
            loss_of(params), params, create_graph=create_graph, materialize_grads=True
        )  # materialize: an unused parameter gets zeros, as under `torch.func.grad`

    return grad


def check_adaptable(model: nn.Module) -> None:
    """Refuse a model without parameters, or with frozen ones (named): MAML adapts every one.

    A frozen parameter has no single right meaning here (adapted but not meta-learned? neither?),
    and the engines would disagree about it; a buffer is PyTorch's way to say "a fixed tensor".
    """
    if not any(True for _ in model.parameters()):
        raise ValueError("the model has no parameters: MAML adapts and meta-learns parameters, "
                         "so give it at least one (nn.Parameter, or a layer that has weights)")
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        shown = ", ".join(frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
        raise ValueError(
            f"the model has frozen parameters ({shown}); MAML adapts and meta-learns every "
            "parameter: unfreeze them, or keep fixed tensors as buffers (register_buffer)"
        )


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Put `model` in MAML's batch-norm convention, in place, and return it.

    Every `nn.BatchNorm*` / `nn.InstanceNorm*` layer normalises with the current batch's
    statistics and stops tracking running statistics (its buffers stay, untouched, so the
    state dict keeps its keys). The model is left in training mode; the engines call it in
    training mode only, so it can never silently fall back to the stale running statistics.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.track_running_stats = False
    return model.train()


@contextmanager
def twice_differentiable(inner: InnerLoop) -> Iterator[None]:
    """For second-order meta-training: `scaled_dot_product_attention` (in `nn.MultiheadAttention`
    and the transformer layers) in its math form, whose backward is made of differentiable
    operators. Every engine's `meta_gradient` runs inside it."""
    if inner.first_order:
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` is as after `model.eval()`, except its norm layers.

    Dropout layers become identities and every `self.training` branch takes its evaluation path
    (functional dropout written `F.dropout(x, p, self.training)` included). The batch- and
    instance-norm layers stay in training mode: `model.eval()` would switch them to their unused,
    stale running statistics instead of MAML's batch statistics.
    """
    switched = [m for m in model.modules()
                if m.training and not isinstance(m, nn.modules.batchnorm._NormBase)]
    for module in switched:
        module.training = False  # not .eval(): that would recurse into the norm layers
    try:
        yield model
    finally:
        for module in switched:
            module.training = True


def functional_forward(model: nn.Module) -> Forward:
    """`forward(params, x)` through `torch.func.functional_call`, in MAML's batch-norm mode."""
    check_adaptable(model)
    names = [name for name, _ in model.named_parameters()]
    use_batch_statistics(model)

    blends = blend_indices(names)  # TaskNorm's (a, b), where the model has them

    def forward(params: Params, x: Tensor) -> Tensor:
        with blends_from(params, blends):
            return torch.func.functional_call(model, dict(zip(names, params)), (x,))

    return forward
