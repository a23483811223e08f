"""The `higher` engine's meta-gradient against an independent float64 reference.

The reference below is written from the MAML equations with nothing but `functional_call` and
`torch.autograd.grad(create_graph=True)`; it shares no code with `maml.adaptation`.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from maml import higher_engine
from maml.adaptation import InnerLoop, step_size_table, use_batch_statistics
from maml.models import omniglot_cnn, sinusoid_mlp
from maml.tasks import TaskBatch


def reference_meta_gradient(model, lr, learned, steps, first_order, batch, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    lrs = None if learned is None else learned.detach().clone().requires_grad_()
    total = 0.0
    for i in range(len(batch)):
        fast = list(theta)
        for s in range(steps):
            out = functional_call(model, dict(zip(names, fast)), (batch.support_x[i],))
            grads = torch.autograd.grad(
                loss_fn(out, batch.support_y[i]), fast, create_graph=not first_order
            )
            alphas = [lr] * len(fast) if lrs is None else list(lrs[s])
            fast = [p - a * g for p, a, g in zip(fast, alphas, grads)]
        out = functional_call(model, dict(zip(names, fast)), (batch.query_x[i],))
        total = total + loss_fn(out, batch.query_y[i]) / len(batch)
    wrt = theta + ([] if lrs is None else [lrs])
    return torch.autograd.grad(total, wrt), total.detach()


def regression_batch(gen):
    x = torch.rand(3, 10, 1, generator=gen, dtype=torch.float64) * 10 - 5
    y = torch.sin(x + torch.rand(3, 1, 1, generator=gen, dtype=torch.float64))
    return TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


def image_batch(gen, n_way=3, k=2, q=2):
    def part(n):
        x = torch.rand(2, n_way * n, 1, 12, 12, generator=gen, dtype=torch.float64)
        y = torch.arange(n_way).repeat_interleave(n).expand(2, -1)
        return x, y

    return TaskBatch(*part(k), *part(q))


CASES = {
    "mlp": (lambda: sinusoid_mlp(hidden=16), regression_batch, F.mse_loss, "mse", 0.05),
    "bn-conv": (
        lambda: omniglot_cnn(n_way=3, hidden=6, blocks=2),
        image_batch, F.cross_entropy, "cross_entropy", 0.2,
    ),
}


@pytest.mark.parametrize("workers", [1, 2], ids=["one-task-at-a-time", "two-task-threads"])
@pytest.mark.parametrize("learn_lr", [False, True], ids=["fixed-lr", "learned-lr"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_higher_meta_gradient_matches_float64_reference(case, steps, first_order, learn_lr,
                                                        workers):
    make_model, make_batch, loss_fn, loss_name, lr = CASES[case]
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    model = use_batch_statistics(make_model().double())
    batch = make_batch(gen)
    n = len(list(model.parameters()))
    learned = None
    if learn_lr:  # distinct per step and tensor, so a mix-up of rows or columns shows
        learned = torch.nn.Parameter(
            lr * (0.5 + torch.rand(steps, n, generator=gen, dtype=torch.float64))
        )

    expected, expected_loss = reference_meta_gradient(
        model, lr, learned, steps, first_order, batch, loss_fn
    )
    model.zero_grad()
    inner = InnerLoop(loss_name, steps, lr, first_order)
    stats = higher_engine.meta_gradient(model, learned, batch, inner, workers=workers)
    got = [p.grad for p in model.parameters()] + ([] if learned is None else [learned.grad])

    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g is not None
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-13), (g - e).abs().max()
    assert torch.allclose(stats["loss"], expected_loss, rtol=1e-12)


def test_second_order_terms_are_really_there():
    """Guards the test above: first and second order must differ on a curved loss."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = use_batch_statistics(omniglot_cnn(n_way=3, hidden=6, blocks=2).double())
    batch = image_batch(gen)
    second, _ = reference_meta_gradient(model, 0.2, None, 2, False, batch, F.cross_entropy)
    first, _ = reference_meta_gradient(model, 0.2, None, 2, True, batch, F.cross_entropy)
    gap = max((a - b).abs().max().item() for a, b in zip(first, second))
    assert gap > 1e-6


def test_step_size_table_reuses_last_learned_row():
    learned = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    table = step_size_table(4, 2, 0.5, learned)
    assert table.tolist() == [[1.0, 2.0], [3.0, 4.0], [3.0, 4.0], [3.0, 4.0]]
    assert step_size_table(1, 2, 0.5, learned).tolist() == [[1.0, 2.0]]
    assert step_size_table(2, 3, 0.5).tolist() == [[0.5] * 3] * 2
    with pytest.raises(ValueError, match="expected"):
        step_size_table(2, 3, 0.5, learned)


def test_batch_norm_uses_batch_statistics_and_leaves_running_stats_alone():
    model = use_batch_statistics(omniglot_cnn(n_way=3, hidden=4, blocks=1))
    bn = model[1]
    before = bn.running_mean.clone()
    x = torch.randn(6, 1, 8, 8) * 3 + 2
    out_full = model[:2](x)
    # batch statistics: each channel of the normalised output has zero mean over the batch
    assert out_full.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert torch.equal(bn.running_mean, before)


def test_engines_never_fall_back_to_running_statistics():
    torch.manual_seed(0)
    model = use_batch_statistics(omniglot_cnn(n_way=3, hidden=4, blocks=2))
    batch = image_batch(torch.Generator().manual_seed(3))
    batch = TaskBatch(*(t.float() if t.is_floating_point() else t for t in batch.tensors()))
    inner = InnerLoop("cross_entropy", 1, 0.4)
    expected = higher_engine.adapt_predict(model, None, batch, inner)
    model.eval()  # a user habit that would switch nn.BatchNorm2d to its (untrained) running stats
    assert torch.equal(higher_engine.adapt_predict(model, None, batch, inner), expected)
