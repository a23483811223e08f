"""Normalisation modes: the `support` mode against an independent float64 reference, engine
parity for every mode, and the property the mode exists for (one query at a time equals all
together).

The reference is the paper's conv net written out by hand (convolutions, batch norm from its
formula, ReLU, mean, linear) with plain autograd; it shares no code with `maml.norms`.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maml import batched_engine, higher_engine
from maml.adaptation import InnerLoop, use_batch_statistics
from maml.models import ConvNetClassifier, maxpool_cnn, omniglot_cnn, sinusoid_mlp
from maml.norms import BLEND, NORM_MODES, add_parameters, check_call_order, has_batch_norm
from maml.tasks import TaskBatch

EPS = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_forward(params, x, moments=None):
    """omniglot_cnn(blocks=2) by hand; batch norm with `moments` if given, else the batch's.
    Returns the logits and the (mean, var) of each batch norm."""
    used = []
    h = x
    for block in range(2):
        w, b, gamma, beta = params[4 * block: 4 * block + 4]
        h = F.conv2d(h, w, b, stride=2, padding=1)
        if moments is None:
            mean = h.mean(dim=(0, 2, 3))
            var = ((h - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
        else:
            mean, var = moments[block]
        used.append((mean, var))
        h = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + EPS)
        h = torch.relu(h * gamma[None, :, None, None] + beta[None, :, None, None])
    return F.linear(h.mean(dim=(2, 3)), params[8], params[9]), used


def hand_tasknorm_forward(params, x, given=None):
    """The same net with TaskNorm-I written out: blend the support moments (the batch's own, or
    `given` = (moments, support size)) with each example's instance moments. Params per block:
    conv w, b, bn gamma, beta, (a, b)."""
    used, n = [], x.shape[0] if given is None else given[1]
    h = x
    for block in range(2):
        w, b, gamma, beta, blend = params[5 * block: 5 * block + 5]
        h = F.conv2d(h, w, b, stride=2, padding=1)
        if given is None:
            mean = h.mean(dim=(0, 2, 3))
            var = ((h - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
        else:
            mean, var = given[0][block]
        used.append((mean, var))
        m, v = mean[None, :, None, None], var[None, :, None, None]
        own_m = h.mean(dim=(2, 3), keepdim=True)
        own_v = ((h - own_m) ** 2).mean(dim=(2, 3), keepdim=True)
        alpha = torch.sigmoid(blend[0] * n + blend[1])
        pooled = alpha * m + (1 - alpha) * own_m
        pooled_v = alpha * (v + (m - pooled) ** 2) + (1 - alpha) * (own_v + (own_m - pooled) ** 2)
        h = (h - pooled) / torch.sqrt(pooled_v + EPS)
        h = torch.relu(h * gamma[None, :, None, None] + beta[None, :, None, None])
    return F.linear(h.mean(dim=(2, 3)), params[10], params[11]), (used, n)


def reference_tasknorm_meta_gradient(theta0, lr, steps, first_order, batch):
    return reference_meta_gradient(theta0, lr, steps, first_order, batch, False,
                                   hand_tasknorm_forward)


def tasknorm_model():
    torch.manual_seed(0)
    model = use_batch_statistics(add_parameters(omniglot_cnn(n_way=3, hidden=6, blocks=2).double(),
                                                "tasknorm"))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from a = b = 0, so that a mix-up of a and b shows
        for name, p in model.named_parameters():
            if name.endswith(BLEND):
                p.copy_(torch.tensor([0.2, -0.5], dtype=torch.float64)
                        + 0.1 * torch.randn(2, generator=gen, dtype=torch.float64))
    return model


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 3])
def test_tasknorm_meta_gradient_matches_the_hand_written_float64_reference(first_order, steps):
    model = tasknorm_model()
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if n.endswith(BLEND)] == ["1.tasknorm_blend", "4.tasknorm_blend"]
    batch = image_batch()
    expected, expected_loss = reference_tasknorm_meta_gradient(
        list(model.parameters()), 0.3, steps, first_order, batch)
    assert expected[4].abs().max() > 1e-6  # the blend really is learned
    inner = InnerLoop("cross_entropy", steps, 0.3, first_order, "tasknorm")
    for engine in (higher_engine, batched_engine):
        model.zero_grad()
        stats = engine.meta_gradient(model, None, batch, inner)
        for p, e in zip(model.parameters(), expected):
            assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-13), (p.grad - e).abs().max()
        assert torch.allclose(stats["loss"], expected_loss, rtol=1e-12)


def reference_meta_gradient(theta0, lr, steps, first_order, batch, transductive,
                            forward=hand_forward):
    """MAML's meta-gradient from its equations with `forward(params, x, state=None) ->
    (logits, state)`: queries get the support set's state unless `transductive`."""
    theta = [p.detach().clone().requires_grad_() for p in theta0]
    total = 0.0
    for i in range(len(batch)):
        fast = list(theta)
        for _ in range(steps):
            logits, _ = forward(fast, batch.support_x[i])
            grads = torch.autograd.grad(F.cross_entropy(logits, batch.support_y[i]), fast,
                                        create_graph=not first_order)
            fast = [p - lr * g for p, g in zip(fast, grads)]
        state = None if transductive else forward(fast, batch.support_x[i])[1]
        logits, _ = forward(fast, batch.query_x[i], state)
        total = total + F.cross_entropy(logits, batch.query_y[i]) / len(batch)
    return torch.autograd.grad(total, theta), total.detach()


def image_batch(tasks=3, n_way=3, k=2, q=2, side=12, seed=7):
    gen = torch.Generator().manual_seed(seed)

    def part(n):
        x = torch.rand(tasks, n_way * n, 1, side, side, generator=gen, dtype=torch.float64)
        # a shift per task, so that the support and query statistics really differ
        x = x * 2 + torch.randn(tasks, 1, 1, 1, 1, generator=gen, dtype=torch.float64)
        y = torch.arange(n_way).repeat_interleave(n).expand(tasks, -1).clone()
        return x, y

    return TaskBatch(*part(k), *part(q))


def sine_batch(tasks=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, 10, 1, generator=gen, dtype=torch.float64) * 10 - 5
    y = torch.sin(x + torch.rand(tasks, 1, 1, generator=gen, dtype=torch.float64))
    return TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


@pytest.mark.parametrize("norm", ["transductive", "support"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_the_hand_written_float64_reference(norm, first_order, steps):
    torch.manual_seed(0)
    model = use_batch_statistics(omniglot_cnn(n_way=3, hidden=6, blocks=2).double())
    batch = image_batch()
    expected, expected_loss = reference_meta_gradient(
        list(model.parameters()), 0.3, steps, first_order, batch, norm == "transductive")
    inner = InnerLoop("cross_entropy", steps, 0.3, first_order, norm)
    for engine in (higher_engine, batched_engine):
        model.zero_grad()
        stats = engine.meta_gradient(model, None, batch, inner)
        for p, e in zip(model.parameters(), expected):
            assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-13), (p.grad - e).abs().max()
        assert torch.allclose(stats["loss"], expected_loss, rtol=1e-12)


def test_the_modes_give_different_meta_gradients():
    """Guards the test above: the reference's two modes must really differ on these tasks."""
    torch.manual_seed(0)
    model = omniglot_cnn(n_way=3, hidden=6, blocks=2).double()
    theta, batch = list(model.parameters()), image_batch()
    a, _ = reference_meta_gradient(theta, 0.3, 1, False, batch, True)
    b, _ = reference_meta_gradient(theta, 0.3, 1, False, batch, False)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) > 1e-4


CASES = {
    "cnn": (lambda: omniglot_cnn(n_way=3, hidden=8), image_batch, "cross_entropy", 0.4),
    "maxpool": (lambda: maxpool_cnn(n_way=3, hidden=8, blocks=2, image_size=12), image_batch,
                "cross_entropy", 0.4),
    "convnet": (lambda: ConvNetClassifier(n_way=3, hidden=8, blocks=2, image_size=12),
                image_batch, "cross_entropy", 0.4),
    "bn1d-mlp": (lambda: nn.Sequential(nn.Linear(1, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                       nn.Linear(16, 1)), sine_batch, "mse", 0.05),
    "mlp": (lambda: sinusoid_mlp(hidden=16), sine_batch, "mse", 0.05),
}


def flat_grad(engine, model, learned, batch, inner):
    tensors = list(model.parameters()) + ([] if learned is None else [learned])
    for t in tensors:
        t.grad = None
    engine.meta_gradient(model, learned, batch, inner)
    # (a blend a 2-d batch norm never uses: None from the loop, zeros from vmap, the same)
    return torch.cat([(torch.zeros_like(t) if t.grad is None else t.grad).flatten()
                      for t in tensors])


@pytest.mark.parametrize("norm", ["support", "tasknorm"])
@pytest.mark.parametrize("learn_lr", [False, True], ids=["fixed-lr", "learned-lr"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("case", list(CASES))
def test_engines_agree_in_float64(case, first_order, learn_lr, norm):
    make_model, make_batch, loss, lr = CASES[case]
    torch.manual_seed(0)
    model = use_batch_statistics(add_parameters(make_model().double(), norm))
    learned = None
    if learn_lr:
        n = len(list(model.parameters()))
        gen = torch.Generator().manual_seed(3)
        learned = nn.Parameter(lr * (0.5 + torch.rand(2, n, generator=gen, dtype=torch.float64)))
    batch = make_batch()
    inner = InnerLoop(loss, 2, lr, first_order, norm)
    expected = flat_grad(higher_engine, model, learned, batch, inner)
    for engine in (batched_engine, batched_engine.BatchedEngine(task_chunk=2)):
        got = flat_grad(engine, model, learned, batch, inner)
        assert ((got - expected).norm() / expected.norm()).item() <= 1e-10


@pytest.mark.parametrize("engine", [higher_engine, batched_engine], ids=["higher", "batched"])
@pytest.mark.parametrize("case", ["cnn", "bn1d-mlp"])
def test_non_transductive_modes_predict_each_query_as_if_alone(case, engine):
    make_model, make_batch, loss, lr = CASES[case]
    torch.manual_seed(0)
    model = use_batch_statistics(add_parameters(make_model().double(), "tasknorm"))
    batch = make_batch(side=28) if case == "cnn" else make_batch()  # > 1 pixel after 4 blocks
    together = {}
    for norm in NORM_MODES:
        inner = InnerLoop(loss, 2, lr, norm=norm)
        together[norm] = engine.adapt_predict(model, None, batch, inner)
        if norm == "transductive" and case == "bn1d-mlp":
            continue  # one value per channel: torch refuses batch statistics of one example
        alone = torch.cat([
            engine.adapt_predict(model, None, TaskBatch(batch.support_x, batch.support_y,
                                                        batch.query_x[:, j:j + 1],
                                                        batch.query_y[:, j:j + 1]), inner)
            for j in range(batch.query_x.shape[1])], dim=1)
        gap = (alone - together[norm]).abs().max().item()
        if norm == "transductive":
            assert gap > 1e-3  # the batch's statistics: a query alone is another input
        else:
            assert gap < 1e-12
    assert (together["support"] - together["transductive"]).abs().max() > 1e-3
    if case == "cnn":  # (a 2-d batch norm has no instance moments: tasknorm is support there)
        assert (together["tasknorm"] - together["support"]).abs().max() > 1e-3


def test_a_model_without_batch_norm_is_the_same_in_every_mode():
    model = use_batch_statistics(sinusoid_mlp(hidden=16).double())
    assert not has_batch_norm(model)
    assert has_batch_norm(omniglot_cnn(n_way=3, hidden=4))
    batch = sine_batch()
    outs = [higher_engine.adapt_predict(model, None, batch, InnerLoop("mse", 2, 0.05, norm=n))
            for n in NORM_MODES]
    assert torch.equal(outs[0], outs[1])


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bn(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_tasknorm_needs_each_batch_norm_called_once_in_order():
    x = torch.rand(2, 1, 8, 8)
    assert check_call_order(omniglot_cnn(n_way=3, hidden=4), torch.rand(2, 1, 28, 28)) is None
    assert "once, in order" in check_call_order(_Twice(), x)
    model = use_batch_statistics(add_parameters(_Twice().double(), "tasknorm"))
    batch = image_batch(tasks=1, side=8)
    with pytest.raises(ValueError, match="batch-norm call 2 has no TaskNorm parameters"):
        higher_engine.adapt_predict(model, None, batch, InnerLoop("cross_entropy", 1, 0.1,
                                                                  norm="tasknorm"))


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown normalisation mode 'batch'.*transductive"):
        InnerLoop("mse", 1, 0.1, norm="batch")


def test_compiling_the_tasknorm_step_is_refused_in_one_line():
    from maml.batched_engine import BatchedEngine
    from maml.config import Config
    from maml.errors import UsageError

    model = use_batch_statistics(add_parameters(omniglot_cnn(n_way=3, hidden=4), "tasknorm"))
    batch = image_batch(tasks=1, side=28)
    batch = TaskBatch(*(t.float() if t.is_floating_point() else t for t in batch.tensors()))
    with pytest.raises(ValueError, match="--compile does not support --norm tasknorm"):
        BatchedEngine(compile=True).meta_gradient(
            model, None, batch, InnerLoop("cross_entropy", 1, 0.4, norm="tasknorm"))
    with pytest.raises(UsageError, match="--compile does not support --norm tasknorm"):
        Config(dataset="omniglot", norm="tasknorm", compile=True).with_defaults()


def test_a_model_is_served_as_trained_or_across_transductive_and_support():
    from maml.errors import UsageError
    from maml.norms import served_mode

    assert served_mode(None, None) == "transductive"  # a run from before the modes
    for mode in NORM_MODES:
        assert served_mode(mode, None) == served_mode(mode, mode) == mode
    assert served_mode("transductive", "support") == "support"
    assert served_mode("support", "transductive") == "transductive"
    for trained, asked in (("tasknorm", "support"), ("transductive", "tasknorm")):
        with pytest.raises(UsageError, match=f"--norm {asked}: this model was trained with "
                                             f"--norm {trained}"):
            served_mode(trained, asked)
    with pytest.raises(UsageError, match="unknown --norm 'batch'"):
        served_mode("support", "batch")
