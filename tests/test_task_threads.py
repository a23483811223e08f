"""Tasks on several CPU threads at once (`maml.higher_engine`): the same meta-gradient and the same
predictions as one task at a time, independent of timing, and only where that is safe."""

import platform

import pytest
import torch
from torch import nn

from maml import higher_engine
from maml.adaptation import InnerLoop, use_batch_statistics
from maml.models import omniglot_cnn
from maml.tasks import TaskBatch


def conv_case(dtype=torch.float64, tasks=5):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = use_batch_statistics(omniglot_cnn(n_way=3, hidden=8, blocks=2)).to(dtype)
    labels = torch.arange(3)
    batch = TaskBatch(
        torch.rand(tasks, 3, 1, 12, 12, generator=gen, dtype=dtype), labels.expand(tasks, 3),
        torch.rand(tasks, 6, 1, 12, 12, generator=gen, dtype=dtype),
        labels.repeat_interleave(2).expand(tasks, 6),
    )
    return model, batch, InnerLoop("cross_entropy", 2, 0.3)


def grads_of(model, batch, inner, workers, lrs=None, start=None):
    for p in model.parameters():
        p.grad = None if start is None else start.clone()
    stats = higher_engine.meta_gradient(model, lrs, batch, inner, workers=workers)
    return [p.grad.clone() for p in model.parameters()], stats


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_task_threads_give_the_one_at_a_time_meta_gradient(workers):
    model, batch, inner = conv_case()
    expected, expected_stats = grads_of(model, batch, inner, 1)
    got, stats = grads_of(model, batch, inner, workers)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-12, atol=1e-14), (g - e).abs().max()
    for key in ("loss", "accuracy"):
        assert torch.allclose(stats[key], expected_stats[key], rtol=1e-12)


def test_task_threads_are_bitwise_repeatable_in_float32():
    model, batch, inner = conv_case(torch.float32, tasks=8)
    first, _ = grads_of(model, batch, inner, 2)
    for _ in range(3):  # threads finish in varying order; the sums must not
        again, _ = grads_of(model, batch, inner, 2)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_task_threads_add_to_an_existing_grad_and_reach_learned_step_sizes():
    model, batch, inner = conv_case()
    n = len(list(model.parameters()))
    results = []
    for workers in (1, 2):
        lrs = nn.Parameter(torch.full((2, n), 0.3, dtype=torch.float64))
        lrs.grad = torch.ones_like(lrs)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        higher_engine.meta_gradient(model, lrs, batch, inner, workers=workers)
        results.append([p.grad.clone() for p in model.parameters()] + [lrs.grad.clone()])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(results[1][-1], torch.ones_like(results[1][-1]))


def test_task_threads_predict_what_one_task_at_a_time_predicts():
    model, batch, inner = conv_case()
    one = higher_engine.adapt_predict(model, None, batch, inner, workers=1)
    two = higher_engine.adapt_predict(model, None, batch, inner, workers=2)
    assert torch.allclose(one, two, rtol=1e-12, atol=1e-14)


def test_intra_op_threads_are_restored_even_when_a_task_fails():
    model, batch, inner = conv_case()
    before = torch.get_num_threads()
    bad = TaskBatch(batch.support_x, batch.support_y + 10, batch.query_x, batch.query_y)
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        higher_engine.meta_gradient(model, None, bad, inner, workers=2)
    assert torch.get_num_threads() == before


class Counting(nn.Module):
    """Changes a buffer in its forward: tasks must then run one at a time, in order."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, dtype=torch.float64)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.conv(x).mean(dim=(2, 3))


def test_threads_only_where_a_forward_neither_draws_nor_mutates(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    model, batch, _ = conv_case(tasks=3)
    assert higher_engine.task_workers(model, batch) == 3  # one per task, at most one per thread
    assert higher_engine.task_workers(model, batch.chunk(0, 1)) == 1

    dropout = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Dropout(0.5)).double()
    state = torch.get_rng_state()
    assert higher_engine.task_workers(dropout, batch) == 1
    assert torch.equal(state, torch.get_rng_state())  # the probe drew nothing for the run

    counting = Counting()
    assert higher_engine.task_workers(counting, batch) == 1
    assert counting.calls.item() == 0  # probed on a copy

    # no convolutions: operators too small to gain from threads (Python's lock holds them back)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 3)).double()
    assert higher_engine.task_workers(mlp, batch) == 1
    still_conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten()).double()
    assert higher_engine.task_workers(still_conv, batch) == 3


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt")
def test_freed_memory_is_kept_unless_switched_off(monkeypatch):
    from maml.allocator import keep_freed_memory

    monkeypatch.setenv("MAML_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MAML_KEEP_FREED_MEMORY")
    assert keep_freed_memory() is True
