"""The batched `torch.func` engine against the `higher` reference engine, in float64.

The `higher` engine is the reference (itself checked against an independent plain-autograd loop
in `tests/test_adaptation.py`); here every meta-gradient of the batched engine, chunked or not,
must agree with it to 1e-10 relative, and unsupported models must be caught up front.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maml import batched_engine, higher_engine
from maml.adaptation import (
    InnerLoop,
    adapt,
    step_size_table,
    task_loss,
    twice_differentiable,
    use_batch_statistics,
)
from maml.batched_engine import BatchedEngine, chunk_bounds, func_grad, meta_step_fn
from maml.engine_select import EngineOptions, SelectedEngine, batched_problem
from maml.errors import UsageError
from maml.exact_norms import ExactNorms
from maml.models import ConvNetClassifier, maxpool_cnn, omniglot_cnn, sinusoid_mlp
from maml.plain_recurrent import PlainRecurrent
from maml.tasks import TaskBatch

TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread is faster, and far faster on a loaded shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image_batch(tasks=3, n_way=3, k=1, q=2, side=16, seed=1):
    gen = torch.Generator().manual_seed(seed)

    def part(n):
        x = torch.rand(tasks, n_way * n, 1, side, side, generator=gen, dtype=torch.float64)
        y = torch.arange(n_way).repeat_interleave(n).expand(tasks, -1).clone()
        return x, y

    return TaskBatch(*part(k), *part(q))


def sine_batch(tasks=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, 10, 1, generator=gen, dtype=torch.float64) * 10 - 5
    y = torch.sin(x + torch.rand(tasks, 1, 1, generator=gen, dtype=torch.float64))
    return TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


# name: (model factory, batch factory, loss, inner lr)
CASES = {
    "mlp": (lambda: sinusoid_mlp(hidden=16), sine_batch, "mse", 0.05),
    "cnn": (lambda: omniglot_cnn(n_way=3, hidden=8), image_batch, "cross_entropy", 0.4),
    "maxpool": (lambda: maxpool_cnn(n_way=3, hidden=8, image_size=16), image_batch,
                "cross_entropy", 0.4),
    "convnet": (lambda: ConvNetClassifier(n_way=3, hidden=8, blocks=3, image_size=16),
                image_batch, "cross_entropy", 0.4),
}


def setup(case, steps, learn_lr, seed=0):
    make_model, make_batch, loss, lr = CASES[case]
    torch.manual_seed(seed)
    model = use_batch_statistics(make_model().double())
    learned = None
    if learn_lr:  # distinct per step and tensor, so a mix-up of rows or columns shows
        n = len(list(model.parameters()))
        gen = torch.Generator().manual_seed(3)
        learned = nn.Parameter(lr * (0.5 + torch.rand(steps, n, generator=gen,
                                                      dtype=torch.float64)))
    return model, learned, make_batch()


def gradient(engine, model, learned, batch, inner):
    """The flattened meta-gradient `engine` accumulates from zero, and its stats."""
    tensors = list(model.parameters()) + ([] if learned is None else [learned])
    for t in tensors:
        t.grad = None
    stats = engine.meta_gradient(model, learned, batch, inner)
    return torch.cat([t.grad.flatten() for t in tensors]), stats


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("learn_lr", [False, True], ids=["fixed-lr", "learned-lr"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_batched_meta_gradient_matches_higher(case, steps, first_order, learn_lr):
    model, learned, batch = setup(case, steps, learn_lr)
    inner = InnerLoop(CASES[case][2], steps, CASES[case][3], first_order)
    expected, expected_stats = gradient(higher_engine, model, learned, batch, inner)
    got, stats = gradient(batched_engine, model, learned, batch, inner)
    assert rel(got, expected) <= TOL
    assert stats.keys() == expected_stats.keys()
    for key in stats:
        torch.testing.assert_close(stats[key], expected_stats[key], rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_chunks_accumulate_the_same_meta_gradient(case):
    model, learned, batch = setup(case, 2, True)
    batch = TaskBatch(*(torch.cat([t, t.flip(0)]) for t in batch.tensors()))  # 6 or 8 tasks
    inner = InnerLoop(CASES[case][2], 2, CASES[case][3])
    expected, expected_stats = gradient(higher_engine, model, learned, batch, inner)
    for chunk in (1, 4):
        got, stats = gradient(BatchedEngine(task_chunk=chunk), model, learned, batch, inner)
        assert rel(got, expected) <= TOL
        torch.testing.assert_close(stats["loss"], expected_stats["loss"], rtol=1e-12, atol=0)


def test_gradient_accumulates_onto_existing_grad():
    model, learned, batch = setup("mlp", 1, False)
    inner = InnerLoop("mse", 1, 0.05)
    once, _ = gradient(batched_engine, model, learned, batch, inner)
    batched_engine.meta_gradient(model, learned, batch, inner)  # .grad now holds twice
    twice = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel(twice, 2 * once) <= TOL


@pytest.mark.parametrize("engine", [higher_engine, batched_engine], ids=["higher", "batched"])
def test_an_unused_parameter_stays_put_and_changes_nothing_else(engine):
    """A layer the forward never calls gets zero gradients (inner and outer), and the others get
    exactly the meta-gradient of the same net without it, learned step sizes included."""
    from tests.export_models import mlp_with_spare_layer

    torch.manual_seed(0)
    spared = use_batch_statistics(mlp_with_spare_layer(hidden=16).double())
    spared.scale.fill_(1.0)  # so that the body alone is the same function
    plain = spared.body
    n_body = len(list(plain.parameters()))
    gen = torch.Generator().manual_seed(3)
    table = 0.05 * (0.5 + torch.rand(2, n_body + 2, generator=gen, dtype=torch.float64))
    inner = InnerLoop("mse", 2, 0.05)
    expected, _ = gradient(higher_engine, plain, nn.Parameter(table[:, :n_body].clone()),
                           sine_batch(), inner)
    learned = nn.Parameter(table.clone())
    for t in [*spared.parameters(), learned]:
        t.grad = None
    engine.meta_gradient(spared, learned, sine_batch(), inner)
    body = [p.grad for p in plain.parameters()] + [learned.grad[:, :n_body]]
    assert rel(torch.cat([g.flatten() for g in body]), expected) <= TOL
    for p in spared.spare.parameters():
        assert p.grad is None or not p.grad.any()
    assert not learned.grad[:, n_body:].any()


@pytest.mark.parametrize("engine", [higher_engine, batched_engine], ids=["higher", "batched"])
def test_frozen_parameters_are_refused_by_name(engine):
    from tests.export_models import frozen_first_layer_mlp

    model = frozen_first_layer_mlp().double()
    with pytest.raises(ValueError, match=r"frozen parameters \(0.weight, 0.bias\).*buffers"):
        engine.meta_gradient(model, None, sine_batch(), InnerLoop("mse", 1, 0.05))


class FunctionalDropout(nn.Module):
    """Dropout as users also write it: off only through the module's own `self.training`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, self.training)


@pytest.mark.parametrize("engine", [higher_engine, batched_engine], ids=["higher", "batched"])
@pytest.mark.parametrize("dropout", [nn.Dropout, FunctionalDropout], ids=["layer", "functional"])
def test_dropout_is_off_when_adapting_for_use_and_on_in_meta_training(engine, dropout):
    def net(dropout):
        torch.manual_seed(0)
        return use_batch_statistics(nn.Sequential(
            nn.Linear(1, 32), nn.ReLU(), dropout, nn.Linear(32, 1)).double())

    with_dropout, without = net(dropout()), net(nn.Identity())
    inner = InnerLoop("mse", 3, 0.05)
    expected = higher_engine.adapt_predict(without, None, sine_batch(), inner)
    torch.manual_seed(1)
    got = engine.adapt_predict(with_dropout, None, sine_batch(), inner)
    assert rel(got, expected) <= TOL
    assert with_dropout[2].training  # switched back on for training
    if engine is higher_engine:  # vmap refuses random operations; `auto` trains with `higher`
        grads = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            grads.append(gradient(engine, with_dropout, None, sine_batch(), inner)[0])
        assert rel(grads[0], grads[1]) > 1e-3  # dropout draws masks while meta-training


def test_chunk_bounds_cover_every_task_once_in_balanced_chunks():
    for total in (1, 5, 16, 32):
        for chunk in (1, 3, 7, 32, 100):
            bounds = chunk_bounds(total, chunk)
            covered = [i for a, b in bounds for i in range(a, b)]
            assert covered == list(range(total))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) <= chunk and max(sizes) - min(sizes) <= 1


def test_auto_chunking_under_a_small_budget_still_gives_the_meta_gradient():
    model, learned, batch = setup("cnn", 1, False)
    batch = TaskBatch(*(torch.cat([t] * 4) for t in batch.tensors()))  # 12 tasks
    inner = InnerLoop("cross_entropy", 1, 0.4)
    expected, _ = gradient(higher_engine, model, learned, batch, inner)
    engine = BatchedEngine(memory_budget_mb=1.0)  # far less than the whole batch needs
    got, _ = gradient(engine, model, learned, batch, inner)
    assert rel(got, expected) <= TOL
    assert 1 <= engine.chosen_chunk < len(batch)
    again, _ = gradient(engine, model, learned, batch, inner)  # later batches: chosen chunk
    assert rel(again, expected) <= TOL


def test_a_captured_step_is_never_replayed_for_another_meta_batch_size(monkeypatch):
    """A CUDA graph bakes in the meta-batch size the loss is divided by: chunks of equal shape
    from meta-batches of different sizes need their own graphs. (Recorded on CPU with a stand-in
    for the graph; the capture itself needs CUDA, and bench_train checks it there.)"""
    captured: list = []

    class Recorder:
        def __init__(self, step):
            self.step, self.totals = step, set()
            captured.append(self)

        def __call__(self, *args):
            self.totals.add(args[-1])
            return self.step(*args)

    monkeypatch.setattr(batched_engine, "_CudaGraphStep", Recorder)
    model, learned, batch = setup("mlp", 1, False)
    inner = InnerLoop("mse", 1, 0.01)
    engine = BatchedEngine(task_chunk=1, cuda_graphs=True)
    small = TaskBatch(*(t[:2] for t in batch.tensors()))
    for b in (batch, small, batch):
        expected, _ = gradient(higher_engine, model, learned, b, inner)
        got, _ = gradient(engine, model, learned, b, inner)
        assert rel(got, expected) <= TOL
    assert sorted(len(r.totals) for r in captured) == [1, 1]  # one per size, each reused
    assert {t for r in captured for t in r.totals} == {len(batch), 2}


def test_a_budget_smaller_than_one_task_is_named_once():
    model, learned, batch = setup("cnn", 1, False)
    batch = TaskBatch(*(torch.cat([t] * 2) for t in batch.tensors()))  # 6 tasks
    inner = InnerLoop("cross_entropy", 1, 0.4)
    lines: list[str] = []
    tight = BatchedEngine(memory_budget_mb=1e-3, warn=lines.append)  # 1 kB: no task fits
    for _ in range(2):
        gradient(tight, model, learned, batch, inner)
    assert tight.chosen_chunk == 1 and len(lines) == 1
    assert lines[0].startswith("warning: one task needs about") and "--memory-budget-mb" in lines[0]
    roomy = BatchedEngine(memory_budget_mb=1e6, warn=lines.append)
    gradient(roomy, model, learned, batch, inner)
    assert roomy.chosen_chunk == len(batch) and len(lines) == 1


@pytest.mark.parametrize("case", ["mlp", "maxpool"])
def test_adapt_predict_matches_higher(case):
    model, learned, batch = setup(case, 3, True)
    inner = InnerLoop(CASES[case][2], 3, CASES[case][3])
    expected = higher_engine.adapt_predict(model, learned, batch, inner)
    got = BatchedEngine(task_chunk=2).adapt_predict(model, learned, batch, inner)
    assert got.shape == expected.shape
    assert rel(got, expected) <= TOL
    assert all(p.grad is None for p in model.parameters())


# The trap: vmap of grad through PyTorch's fused normalisation kernels is wrong at second order.
NORM_NETS = {
    "BatchNorm2d": lambda: maxpool_cnn(n_way=3, hidden=8, blocks=2, image_size=16),
    "BatchNorm1d": lambda: nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.BatchNorm1d(16),
                                         nn.ReLU(), nn.Linear(16, 3)),
    "InstanceNorm2d": lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True),
                                            nn.ReLU(), nn.Flatten(), nn.Linear(784, 3)),
    "LayerNorm": lambda: nn.Sequential(nn.Flatten(), nn.Linear(256, 16), nn.LayerNorm(16),
                                       nn.ReLU(), nn.Linear(16, 3)),
}


def plain_vmap_meta_gradient(model, batch, inner, exact_norms):
    """vmap over tasks of `adapt` with `torch.func.grad`, written out without the engine."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(model.parameters())

    def forward(p, x):
        return torch.func.functional_call(model, dict(zip(names, p, strict=True)), (x,))

    def task(p, sx, sy, qx, qy):
        table = step_size_table(inner.steps, len(p), inner.lr, None, torch.float64)
        fast = adapt(forward, p, sx, sy, inner.loss, table, func_grad(False))
        return task_loss(inner.loss, forward(fast, qx), qy)

    def meta_loss(p):
        return torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0))(p, *batch.tensors()).mean()

    if exact_norms:
        with ExactNorms():
            grads = torch.func.grad(meta_loss)(params)
    else:
        grads = torch.func.grad(meta_loss)(params)
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("norm", list(NORM_NETS))
def test_fused_norms_under_vmap_are_off_and_exact_norms_fix_them(norm):
    torch.manual_seed(0)
    model = use_batch_statistics(NORM_NETS[norm]().double())
    batch = image_batch()
    inner = InnerLoop("cross_entropy", 1, 0.4)
    expected, _ = gradient(higher_engine, model, None, batch, inner)
    raw = plain_vmap_meta_gradient(model, batch, inner, exact_norms=False)
    fixed = plain_vmap_meta_gradient(model, batch, inner, exact_norms=True)
    assert rel(fixed, expected) <= TOL
    # The reproduction. If this starts failing, PyTorch fixed its batching rules and
    # `maml.exact_norms` may be dropped (after the test above passes without it).
    assert rel(raw, expected) > 1e-6, f"torch {torch.__version__} no longer shows the trap"


def test_exact_norms_leave_running_statistics_and_eval_mode_alone():
    bn = nn.BatchNorm2d(3).double()  # tracks running stats: the fused kernel must run
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with ExactNorms():
        y = bn(x)
    assert bn.num_batches_tracked.item() == 1
    torch.testing.assert_close(y, F.batch_norm(x, None, None, bn.weight, bn.bias, True))
    bn.eval()
    with ExactNorms():
        torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var,
                                                       bn.weight, bn.bias, False))


# Models the batched engine cannot run, and what the probe must call them.
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.drop = nn.Linear(1, 8), nn.Dropout(0.5)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.drop(self.lin(x)))


@pytest.mark.parametrize("make, words", [
    (DataDependent, "data-dependent"), (CountsCalls, "in place"), (Dropout, "random"),
])
def test_probe_names_what_the_batched_engine_cannot_run(make, words):
    torch.manual_seed(0)
    model = make().double()
    problem = batched_problem(model, None, sine_batch(), InnerLoop("mse", 1, 0.05))
    assert problem is not None and words in problem
    assert all(p.grad is None for p in model.parameters())  # the probe used a copy


def test_probe_passes_supported_models():
    model, learned, batch = setup("maxpool", 2, True)
    assert batched_problem(model, learned, batch, InnerLoop("cross_entropy", 2, 0.4)) is None
    assert batched_problem(model, learned, batch, InnerLoop("cross_entropy", 2, 0.4),
                           "eval") is None


def test_auto_falls_back_to_higher_once_and_batched_refuses():
    torch.manual_seed(0)
    model, batch, inner = DataDependent().double(), sine_batch(), InnerLoop("mse", 1, 0.05)
    lines = []
    auto = SelectedEngine(EngineOptions(name="auto"), warn=lines.append)
    expected, _ = gradient(higher_engine, model, None, batch, inner)
    got, _ = gradient(auto, model, None, batch, inner)
    gradient(auto, model, None, batch, inner)
    auto.adapt_predict(model, None, batch, inner)
    assert auto.name == "higher" and torch.equal(got, expected)
    assert len(lines) == 1 and lines[0].startswith("warning:") and "data-dependent" in lines[0]
    batched = SelectedEngine(EngineOptions(name="batched"), warn=lines.append)
    with pytest.raises(UsageError, match="--engine batched cannot run this model.*data-dep"):
        batched.meta_gradient(model, None, batch, inner)


def test_auto_on_cpu_picks_by_model_structure_and_keeps_the_meta_gradient():
    for name, expected_engine in (("mlp", "batched"), ("cnn", "higher")):
        model, learned, batch = setup(name, 2, True)
        inner = InnerLoop("mse" if name == "mlp" else "cross_entropy", 2, 0.05)
        lines = []
        auto = SelectedEngine(EngineOptions(name="auto"), warn=lines.append)
        expected, _ = gradient(higher_engine, model, learned, batch, inner)
        for _ in range(2):
            got, _ = gradient(auto, model, learned, batch, inner)
            assert rel(got, expected) <= TOL
        assert auto.name == expected_engine
        assert len(lines) == (1 if expected_engine == "higher" else 0)


class Attention(nn.Module):
    """nn.MultiheadAttention reads its out_proj's weights itself, past higher's fast weights."""

    def __init__(self, need_weights=False):
        super().__init__()
        self.need_weights = need_weights
        self.inp, self.out = nn.Linear(1, 8), nn.Linear(8, 1)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.inp(x).unsqueeze(0)
        h, _ = self.mha(h, h, h, need_weights=self.need_weights)
        return self.out(h.squeeze(0))


def test_weights_higher_ignores_are_named_and_auto_trains_the_batched_engine():
    torch.manual_seed(0)
    model, batch = Attention(need_weights=True).double(), sine_batch()
    inner = InnerLoop("mse", 2, 0.05)
    assert "mha.out_proj.weight, mha.out_proj.bias" in higher_engine.routing_problem(
        model, batch.support_x[0])
    with pytest.raises(UsageError, match="--engine higher cannot run this model: the higher "
                                         "library ignores the adapted values of mha.out_proj"):
        SelectedEngine(EngineOptions(name="higher")).meta_gradient(model, None, batch, inner)
    with pytest.raises(UsageError, match="the higher engine cannot run this model"):
        higher_engine.adapt_predict(model, None, batch, inner)  # direct callers are refused too
    lines = []
    auto = SelectedEngine(EngineOptions(name="auto"), warn=lines.append)
    got, _ = gradient(auto, model, None, batch, inner)
    plain = copy.deepcopy(model)
    higher_engine.meta_gradient(plain, None, batch, inner, plain=True)
    expected = torch.cat([p.grad.flatten() for p in plain.parameters()])
    assert auto.name == "batched" and rel(got, expected) <= TOL
    assert len(lines) == 1 and lines[0].startswith("engine auto: batched (the higher library")


def test_engine_notices_come_from_rank_zero_alone(capsys):
    """Every rank makes the same engine decision; one line says so, not one per rank."""
    from maml.distributed import Ranks
    from maml.training import select_engine

    torch.manual_seed(0)
    model = omniglot_cnn(n_way=2, hidden=4)
    use_batch_statistics(model)
    batch = TaskBatch(torch.rand(2, 2, 1, 28, 28), torch.tensor([[0, 1]] * 2),
                      torch.rand(2, 2, 1, 28, 28), torch.tensor([[0, 1]] * 2))
    for rank, expected in ((1, ""), (0, "engine auto: higher (the loop is faster")):
        engine = select_engine("auto", None, Ranks(rank=rank, world=2))
        engine.meta_gradient(copy.deepcopy(model), None, batch, InnerLoop("cross_entropy", 1, 0.4))
        err = capsys.readouterr().err
        assert err.startswith(expected) if expected else err == "", err


class Scaled(nn.Module):
    """An MLP scaled by parameters in an nn.ParameterList, which higher leaves unadapted."""

    def __init__(self):
        super().__init__()
        self.body = sinusoid_mlp(hidden=8)
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))])

    def forward(self, x):
        return self.body(x) * self.scales[0] + self.scales[1]


def test_a_parameter_list_is_named_as_what_higher_ignores():
    torch.manual_seed(0)
    model, batch = Scaled().double(), sine_batch()
    problem = higher_engine.routing_problem(model, batch.support_x[0])
    assert "scales.0, scales.1" in problem and "nn.ParameterList" in problem


def test_evaluation_probe_takes_a_step_even_when_the_first_call_takes_none():
    """Evaluation first asks for 0-step predictions: nothing is differentiated there, so a model
    vmap cannot differentiate would pass a probe of that call and fail on the next."""
    torch.manual_seed(0)
    model, batch, lines = CountsCalls().double(), sine_batch(), []
    auto = SelectedEngine(EngineOptions(name="auto"), warn=lines.append)
    auto.adapt_predict(model, None, batch, InnerLoop("mse", 0, 0.05))
    auto.adapt_predict(model, None, batch, InnerLoop("mse", 2, 0.05))
    assert auto.chosen["eval"] is higher_engine and "in place" in lines[0]


class SelfAttention(nn.Module):
    def forward(self, h):
        return F.scaled_dot_product_attention(h[None], h[None], h[None])[0]


class HandAttention(nn.Module):
    """The same attention in tensor operations: softmax(h h^T / sqrt(d)) h."""

    def forward(self, h):
        return torch.softmax(h @ h.T / h.shape[-1] ** 0.5, dim=-1) @ h


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("name", ["higher", "batched", "auto"])
def test_attention_trains_second_order_on_every_engine(name):
    """torch's fused attention kernels have no second derivative; meta-training runs attention
    in its math form, so the second-order meta-gradient is the hand-written attention's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), SelfAttention(), nn.Linear(8, 1)).double()
    by_hand = nn.Sequential(model[0], HandAttention(), model[2])
    batch, inner = sine_batch(), InnerLoop("mse", 2, 0.05)
    engine = SelectedEngine(EngineOptions(name=name), warn=lambda line: None)
    got, _ = gradient(engine, model, None, batch, inner)
    expected, _ = gradient(higher_engine, by_hand, None, batch, inner)
    assert rel(got, expected) <= TOL


class Recurrent(nn.Module):
    """Each scalar input as 4 tokens of width 6, through a recurrent layer, or a cell looped over
    the tokens; the last output predicts the target."""

    def __init__(self, body: nn.Module, cell: bool = False) -> None:
        super().__init__()
        self.embed, self.body, self.cell = nn.Linear(1, 24), body, cell
        self.head = nn.LazyLinear(1)

    def forward(self, x):
        tokens = self.embed(x).reshape(x.shape[0], 4, 6)
        if not self.cell:
            out = self.body(tokens)[0][:, -1]
        else:
            state = None
            for t in range(tokens.shape[1]):
                state = self.body(tokens[:, t], state)
            out = state[0] if isinstance(state, tuple) else state
        return self.head(out)


RECURRENT = {
    "lstm-2-layers-bidirectional": lambda: nn.LSTM(6, 5, num_layers=2, bidirectional=True,
                                                   batch_first=True),
    "lstm-projections": lambda: nn.LSTM(6, 7, proj_size=3, batch_first=True),
    "gru": lambda: nn.GRU(6, 5, batch_first=True),
    "rnn-relu": lambda: nn.RNN(6, 5, nonlinearity="relu", batch_first=True),
    "lstm-cell": lambda: nn.LSTMCell(6, 5),
    "gru-cell": lambda: nn.GRUCell(6, 5),
    "rnn-cell": lambda: nn.RNNCell(6, 5),
}


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported:UserWarning")
@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_layers_run_batched_and_match_the_loop(name):
    """torch's fused recurrent operators have no vmap batching rule; the batched engine runs them
    as plain ops (`maml.plain_recurrent`), with the loop's meta-gradient and predictions, and auto
    keeps it (vmap is the faster engine for them on a CPU too)."""
    torch.manual_seed(0)
    model = Recurrent(RECURRENT[name](), cell=name.endswith("cell"))
    batch = sine_batch()
    model(batch.support_x[0].float())  # materialise the lazy head
    model.double()
    learned = nn.Parameter(torch.full((2, len(list(model.parameters()))), 0.05,
                                      dtype=torch.float64))
    inner = InnerLoop("mse", 2, 0.05)
    expected, _ = gradient(higher_engine, model, learned, batch, inner)
    lines = []
    auto = SelectedEngine(EngineOptions(name="auto"), warn=lines.append)
    got, _ = gradient(auto, model, learned, batch, inner)
    assert auto.name == "batched" and lines == []
    assert rel(got, expected) <= TOL
    predicted = batched_engine.adapt_predict(model, learned, batch, inner)
    assert rel(predicted, higher_engine.adapt_predict(model, learned, batch, inner)) <= TOL


class CallsBatchNorm(nn.Module):
    """Batch norm written as a call of `F.batch_norm`: no norm layer among its modules."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(256, 16), nn.Linear(16, 3)
        self.scale, self.shift = nn.Parameter(torch.ones(16)), nn.Parameter(torch.zeros(16))

    def forward(self, x):
        h = F.batch_norm(self.inp(x.flatten(1)), None, None, self.scale, self.shift, True)
        return self.out(torch.relu(h))


def step_gradient(model, learned, batch, inner, modes=None, outer="func"):
    """The flattened meta-gradient of one `meta_step_fn` step over the whole batch."""
    step = meta_step_fn(model, inner, learned is not None, modes, outer)
    params = tuple(p.detach() for p in model.parameters())
    lrs = None if learned is None else learned.detach()
    with twice_differentiable(inner):
        grads, lr_grad, _, _ = step(params, lrs, *batch.tensors(), len(batch))
    return torch.cat([g.flatten() for g in (*grads, *([] if lr_grad is None else [lr_grad]))])


MODE_NETS = {  # name: (model, batch, loss, lr, the modes its forward needs)
    "mlp": (lambda: sinusoid_mlp(hidden=16), sine_batch, "mse", 0.05, []),
    "nn.BatchNorm2d": (NORM_NETS["BatchNorm2d"], image_batch, "cross_entropy", 0.4,
                       [ExactNorms]),
    "F.batch_norm": (CallsBatchNorm, image_batch, "cross_entropy", 0.4, [ExactNorms]),
    "LayerNorm": (NORM_NETS["LayerNorm"], image_batch, "cross_entropy", 0.4, [ExactNorms]),
}


@pytest.mark.parametrize("name", list(MODE_NETS))
def test_the_engine_enters_the_modes_the_forward_calls_for(name):
    """`ExactNorms` and `PlainRecurrent` cost a Python call per operation, so the engine enters
    only those whose functions the forward actually calls (one task through the step inside
    both decides it): a hand-written `F.batch_norm` with no norm layer gets exact norms too, a
    plain MLP runs without any mode, and every meta-gradient and prediction is the loop's."""
    make, make_batch, loss, lr, expected_modes = MODE_NETS[name]
    torch.manual_seed(0)
    model, batch = use_batch_statistics(make().double()), make_batch()
    inner = InnerLoop(loss, 2, lr)
    expected, _ = gradient(higher_engine, model, None, batch, inner)
    engine = BatchedEngine(task_chunk=len(batch))
    got, _ = gradient(engine, model, None, batch, inner)
    assert rel(got, expected) <= TOL
    assert [[type(m) for m in modes] for modes in engine._modes.values()] == [expected_modes]
    predicted = engine.adapt_predict(model, None, batch, inner)
    assert rel(predicted, higher_engine.adapt_predict(model, None, batch, inner)) <= TOL
    if expected_modes:  # and the mode is needed: without it the fused kernel's trap shows
        assert rel(step_gradient(model, None, batch, inner, modes=()), expected) > 1e-6


def test_recurrent_layers_enter_plain_recurrent_alone():
    torch.manual_seed(0)
    model, batch = Recurrent(RECURRENT["gru"]()), sine_batch()
    model(batch.support_x[0].float())  # materialise the lazy head
    model.double()
    inner = InnerLoop("mse", 1, 0.05)
    engine = BatchedEngine(task_chunk=len(batch))
    got, _ = gradient(engine, model, None, batch, inner)
    assert rel(got, gradient(higher_engine, model, None, batch, inner)[0]) <= TOL
    assert [[type(m) for m in modes] for modes in engine._modes.values()] == [[PlainRecurrent]]


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("name", ["mlp", "nn.BatchNorm2d", "gru"])
def test_func_and_autograd_outer_gradients_are_both_the_loops(name, first_order):
    """Eagerly the step takes the outer gradient with `torch.autograd.grad` of the vmapped tasks
    (faster); compiled or captured, with `torch.func.grad` (one pure function). Both are exact,
    learned step sizes included."""
    torch.manual_seed(0)
    if name == "gru":
        model, batch, loss, lr = Recurrent(RECURRENT["gru"]()), sine_batch(), "mse", 0.05
        model(batch.support_x[0].float())
    else:
        make, make_batch, loss, lr, _ = MODE_NETS[name]
        model, batch = make(), make_batch()
    model = use_batch_statistics(model.double())
    n = len(list(model.parameters()))
    learned = nn.Parameter(torch.linspace(0.5, 1.5, 2 * n, dtype=torch.float64).reshape(2, n) * lr)
    inner = InnerLoop(loss, 2, lr, first_order)
    expected, _ = gradient(higher_engine, model, learned, batch, inner)
    for outer in ("func", "autograd"):
        assert rel(step_gradient(model, learned, batch, inner, outer=outer), expected) <= TOL


class OnceDifferentiableSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OnceDifferentiable(nn.Module):
    """A custom operation without a second derivative, as compiled extensions often are."""

    def forward(self, h):
        return OnceDifferentiableSquare.apply(h)


def test_a_model_without_a_second_derivative_is_one_line_on_every_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), OnceDifferentiable(), nn.Linear(8, 1))
    batch = sine_batch().to("cpu", torch.float32)
    for name in ("higher", "auto", "batched"):
        engine = SelectedEngine(EngineOptions(name=name), warn=lambda line: None)
        with pytest.raises(UsageError, match="the model cannot be meta-trained: RuntimeError: .*"
                                             "--first-order does not"):
            engine.meta_gradient(model, None, batch, InnerLoop("mse", 1, 0.05))
    first_order = SelectedEngine(EngineOptions(name="auto"), warn=lambda line: None)
    first_order.meta_gradient(model, None, batch, InnerLoop("mse", 1, 0.05, first_order=True))


def test_wrong_targets_are_refused_the_same_way_by_every_engine():
    """The loss itself refuses targets torch would broadcast (regression targets without their
    last dimension) or misread (float class labels), so the library API fails loudly, and no
    engine blames it on second order."""
    torch.manual_seed(0)
    sine = sine_batch().to("cpu", torch.float32)
    flat = TaskBatch(sine.support_x, sine.support_y, sine.query_x, sine.query_y.squeeze(-1))
    classes = TaskBatch(torch.randn(2, 3, 4), torch.tensor([[0, 1, 2]] * 2).float(),
                        torch.randn(2, 3, 4), torch.tensor([[0, 1, 2]] * 2))
    cases = [(sinusoid_mlp(), flat, "mse", r"MSE needs targets of the outputs' shape \(\d+, 1\), "
              r"got \(\d+,\)"),
             (nn.Linear(4, 3), classes, "cross_entropy", "cross-entropy needs integer class "
              r"labels of shape \(3,\) for logits of shape \(3, 3\), got torch.float32")]
    for model, batch, loss, message in cases:
        for name in ("higher", "batched", "auto"):
            engine = SelectedEngine(EngineOptions(name=name), warn=lambda line: None)
            with pytest.raises((ValueError, UsageError), match=message) as refused:
                engine.meta_gradient(model, None, batch, InnerLoop(loss, 1, 0.05))
            assert "--first-order" not in str(refused.value)


class TupleOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        return self.lin(x), x


def test_a_model_that_fails_on_any_engine_is_not_sent_to_another():
    """A model whose own forward or output is wrong gets its own error from every engine, not
    advice to switch engines or to go first order."""
    batch = sine_batch().to("cpu", torch.float32)
    for model, message in ((TupleOutput(), "the model returns a tuple, not one tensor"),
                           (sinusoid_mlp().double(), "must have the same dtype")):
        for name in ("higher", "auto"):
            engine = SelectedEngine(EngineOptions(name=name), warn=lambda line: None)
            with pytest.raises((TypeError, RuntimeError, UsageError), match=message) as refused:
                engine.meta_gradient(model, None, batch, InnerLoop("mse", 1, 0.05))
            assert "--engine" not in str(refused.value) and "--first-order" not in str(refused.value)
    with pytest.raises(ValueError, match="the model has no parameters"):
        higher_engine.adapt_predict(nn.ReLU(), None, batch, InnerLoop("mse", 1, 0.05))


class Float32Inside(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        return self.lin(x.float())


def test_a_model_that_cannot_run_in_float64_trains_with_higher_under_auto():
    model, batch, lines = Float32Inside(), sine_batch().to("cpu", torch.float32), []
    auto = SelectedEngine(EngineOptions(name="auto"), warn=lines.append)
    gradient(auto, model, None, batch, InnerLoop("mse", 1, 0.05))
    assert auto.name == "higher" and "fails in float64" in lines[0]
    with pytest.raises(UsageError, match="--engine batched cannot run this model: it fails in "
                                         "float64"):
        SelectedEngine(EngineOptions(name="batched")).meta_gradient(
            model, None, batch, InnerLoop("mse", 1, 0.05))


def test_named_engines_run_what_they_name():
    model, learned, batch = setup("mlp", 1, False)
    inner = InnerLoop("mse", 1, 0.05)
    for name in ("higher", "batched"):
        engine = SelectedEngine(EngineOptions(name=name), warn=pytest.fail)
        got, _ = gradient(engine, model, learned, batch, inner)
        assert engine.name == name
    expected, _ = gradient(higher_engine, model, learned, batch, inner)
    assert rel(got, expected) <= TOL


def test_cli_trains_the_same_run_with_either_engine(tmp_path, capsys):
    import json

    from maml.__main__ import main

    common = ["train", "--iterations", "4", "--dtype", "float64", "--meta-batch-size", "5",
              "--learn-inner-lr", "--inner-steps", "2", "--log-every", "2", "--val-every", "4",
              "--val-tasks", "3", "--quiet"]
    for engine in ("higher", "batched"):
        assert main(common + ["--engine", engine, "--task-chunk", "2",
                              "--checkpoint", str(tmp_path / f"{engine}.pt")]) == 0
    a, b = (torch.load(tmp_path / f"{e}.pt", weights_only=False) for e in ("higher", "batched"))
    for key, value in a["model"]["state_dict"].items():
        torch.testing.assert_close(b["model"]["state_dict"][key], value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b["inner_lrs"], a["inner_lrs"], rtol=1e-10, atol=1e-12)
    assert b["config"]["engine"] == "batched" and b["config"]["task_chunk"] == 2
    results = {}
    for engine in ("higher", "batched"):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(tmp_path / "higher.pt"), "--tasks", "7",
                     "--batch-size", "4", "--engine", engine, "--task-chunk", "3", "--json",
                     "--quiet"]) == 0
        results[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["batched"]["mean"] == pytest.approx(results["higher"]["mean"], rel=1e-10)


@pytest.mark.parametrize("flags, message", [
    (["--task-chunk", "0"], "--task-chunk must be"),
    (["--memory-budget-mb", "-1"], "--memory-budget-mb must be > 0"),
    (["--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    (["--engine", "fast"], "unknown engine"),
])
def test_cli_rejects_bad_engine_settings_before_writing(tmp_path, capsys, flags, message):
    from maml.__main__ import main

    ckpt = tmp_path / "run.pt"
    assert main(["train", "--iterations", "1", "--quiet", "--checkpoint", str(ckpt)] + flags) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_compiled_step_matches_higher():
    """`--compile` (torch.compile of the whole step, on CPU here) keeps the exact meta-gradient,
    and compiles the step whole: a graph break (the TaskNorm context variable was one) makes
    torch.compile skip the step's frames and run it eagerly."""
    from torch._dynamo.utils import counters

    model, learned, batch = setup("mlp", 1, True)
    inner = InnerLoop("mse", 1, 0.05)
    expected, expected_stats = gradient(higher_engine, model, learned, batch, inner)
    engine = BatchedEngine(task_chunk=2, compile=True)
    counters.clear()
    for _ in range(2):  # the compiled step, then its cached replay
        got, stats = gradient(engine, model, learned, batch, inner)
        assert rel(got, expected) <= TOL
        torch.testing.assert_close(stats["loss"], expected_stats["loss"], rtol=1e-12, atol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1


def test_cli_task_chunk_auto_with_a_budget_trains(tmp_path):
    from maml.__main__ import main

    ckpt = tmp_path / "run.pt"
    assert main(["train", "--iterations", "2", "--quiet", "--engine", "batched", "--task-chunk",
                 "auto", "--memory-budget-mb", "4096", "--checkpoint", str(ckpt)]) == 0
    assert torch.load(ckpt, weights_only=False)["iteration"] == 2


def test_bf16_autocast_runs_and_stays_near_the_float32_meta_gradient():
    """Opt-in bf16: wired through the step (it must change the numbers), loosely accurate."""
    model, learned, batch = setup("mlp", 1, False)
    model, batch = model.float(), batch.to("cpu", torch.float32)
    inner = InnerLoop("mse", 1, 0.05)
    expected, _ = gradient(higher_engine, model, learned, batch, inner)
    got, stats = gradient(BatchedEngine(task_chunk=4, bf16=True), model, learned, batch, inner)
    assert got.dtype == torch.float32 and torch.isfinite(stats["loss"])
    assert 1e-5 < rel(got, expected) < 0.05
