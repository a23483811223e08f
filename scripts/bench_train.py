"""Milliseconds per meta-iteration and peak memory: the `higher` loop against the batched engine.

Every row of a setting runs the same model (same initial weights) on the same tasks in one
process, and checks its meta-gradient against the `higher` loop's run once in float64 (relative
difference of the flattened gradients), so a fast row that is wrong shows. The float32 loop's own
row gives the rounding floor to compare with: on random images some tasks are ill-conditioned,
and any float32 engine is then ~1e-4 from float64, the loop included. Settings (the issue's):

- omniglot 5-way 1-shot, 15 queries, 32 tasks, 1 step, max-pool conv net (64 filters, batch
  statistics, 28x28 inputs), second order;
- the same with 5 steps;
- 20-way 1-shot, 5 queries, 16 tasks, 5 steps;
- sinusoid: the 1-40-40-1 MLP, 10 shots, 10 queries, 25 tasks, 1 step;
- "paper net": 5-way 1-shot as the first, on the MAML paper's strided conv net (the one
  `scripts/reproduce.py` trains), so its times convert iterations into training time.

Rows: `higher` loop; batched (eager); batched with auto chunking under `--memory-budget-mb`;
`--compile` adds batched + torch.compile; on CUDA also CUDA graphs (also with cuDNN's autotuner,
`torch.backends.cudnn.benchmark`), TF32 and bf16 autocast rows, and with `--compile` compile +
CUDA graphs, whole and auto-chunked. Peak MB is the allocator's peak over one timed iteration;
on CUDA, "reserved MB" is what the row held from the allocator over its warm-up (the cache was
emptied before it), which counts a CUDA graph's private memory pool that the peak of a replay
does not see. Tasks are random images / sinusoid draws of the right shapes (timing does not
depend on the pixels). CPU always, CUDA when present. Prints a markdown table; writes JSON
under `benchmarks/`.

Peer rows (`--no-peers` drops them): other MAML implementations, each written as its own
documentation shows it, on the same model, initial weights, tasks, losses (mean per task, the
meta-loss the mean over tasks), step size and steps: `higher.innerloop_ctx` (the seed's loop),
learn2learn's `MAML.clone()/adapt()`, TorchOpt's functional loop (`torchopt.sgd` +
`apply_updates`) and plain `torch.func` (`vmap` over tasks of an inner `grad` step, the outer
gradient by `grad`; on the sinusoid with `--compile` also under `torch.compile`). A peer whose
library is not importable is one line of the output ("peer X not installed: pip install ..."),
not a failure; docs/benchmarks-peers.md gives the commands that install learn2learn 0.2.0 and
TorchOpt 0.7.3 without touching torch. Before timing, each peer's meta-gradient is computed in
float64 and compared with the `higher` loop's: within 1e-8 (relative) it is exact; otherwise the
row says "wrong: <diff> off float64", its time is shown, marked, and it counts as no one's
speed win. "vs fastest exact peer" is each row's time over the fastest exact peer's.

Timing is interleaved, because a shared machine drifts by tens of percent from one minute to the
next: every row is warmed up first, then the rows take turns, one meta-iteration each per
round, for `--iterations` rounds, and each row reports its median. Every row, peers included,
runs with freed memory kept in the process (`maml.allocator`, as the `maml` command runs), or
none with `--no-keep-freed-memory`: the comparison is between implementations, not allocators.

    python scripts/bench_train.py --quick            # about 10 minutes on a 2-core CPU
    python scripts/bench_train.py --iterations 20 --compile
    python scripts/bench_train.py --only sinusoid --iterations 30 --compile --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import higher
import torch
import torch.nn.functional as F
from torch import nn

from maml import higher_engine
from maml.adaptation import InnerLoop, use_batch_statistics
from maml.allocator import keep_freed_memory
from maml.arguments import Parser
from maml.batched_engine import BatchedEngine, _PeakMemory
from maml.models import maxpool_cnn, omniglot_cnn, sinusoid_mlp
from maml.tasks import TaskBatch

SETTINGS = {
    "sinusoid K10 Q10 B25 1 step": dict(kind="sine", tasks=25, steps=1, lr=0.01),
    "5w1s q15 B32 1 step": dict(kind="image", n_way=5, q=15, tasks=32, steps=1, lr=0.4),
    "20w1s q5 B16 5 steps": dict(kind="image", n_way=20, q=5, tasks=16, steps=5, lr=0.1),
    "5w1s q15 B32 5 steps": dict(kind="image", n_way=5, q=15, tasks=32, steps=5, lr=0.4),
    "paper net 5w1s q15 B32 1 step": dict(kind="image", n_way=5, q=15, tasks=32, steps=1, lr=0.4,
                                          net="paper"),
}


def make_case(setting: dict, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if setting["kind"] == "sine":
        model = sinusoid_mlp()
        x = torch.rand(setting["tasks"], 20, 1, generator=gen) * 10 - 5
        y = torch.sin(x + torch.rand(setting["tasks"], 1, 1, generator=gen))
        batch = TaskBatch(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])
        inner = InnerLoop("mse", setting["steps"], setting["lr"])
    else:
        n, q, b = setting["n_way"], setting["q"], setting["tasks"]
        model = (omniglot_cnn(n_way=n) if setting.get("net") == "paper"
                 else maxpool_cnn(n_way=n, hidden=64, image_size=28))
        labels = torch.arange(n)
        batch = TaskBatch(
            torch.rand(b, n, 1, 28, 28, generator=gen), labels.expand(b, n).clone(),
            torch.rand(b, n * q, 1, 28, 28, generator=gen),
            labels.repeat_interleave(q).expand(b, n * q).clone(),
        )
        inner = InnerLoop("cross_entropy", setting["steps"], setting["lr"])
    return use_batch_statistics(model).to(device), batch.to(device), inner


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- peers: other MAML implementations, each as its documentation writes it -----------------
# A peer is `make(model, inner) -> step`, and `step(batch)` adds d(mean query loss over the
# batch's tasks)/d(model's parameters) to their `.grad`, as our engines' `meta_gradient` does.

Step = Callable[[TaskBatch], object]

EXACT = 1e-8
"""A peer within this relative difference of the float64 `higher` loop computes our gradient."""


def peer_loss(inner: InnerLoop) -> Callable:
    """Our task loss: mean cross-entropy or mean squared error over a task's examples."""
    return F.cross_entropy if inner.loss == "cross_entropy" else F.mse_loss


def check_comparable(inner: InnerLoop) -> None:
    if inner.norm != "transductive":  # a peer's train-mode forward normalises by its own batch
        raise ValueError(f"peers run batch norm transductively only, not {inner.norm!r}")


def higher_seed_style(model: nn.Module, inner: InnerLoop) -> Step:
    """`higher.innerloop_ctx`, as higher's README and examples/maml-omniglot.py use it (the seed).

    Documented usage: an inner `torch.optim.SGD` over the model's parameters, then per task
    `with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel,
    diffopt)`, `diffopt.step(support_loss)` per step and `query_loss.backward()`. The example sums
    the tasks' losses; here each is divided by the number of tasks (our meta-loss is the mean).
    """
    check_comparable(inner)
    loss = peer_loss(inner)
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner.lr)

    def step(batch: TaskBatch) -> None:
        for sx, sy, qx, qy in zip(*batch.tensors()):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=not inner.first_order) as (fmodel, diffopt):
                for _ in range(inner.steps):
                    diffopt.step(loss(fmodel(sx), sy))
                (loss(fmodel(qx), qy) / len(batch)).backward()

    return step


def learn2learn_maml(model: nn.Module, inner: InnerLoop) -> Step:
    """learn2learn 0.2.0's `l2l.algorithms.MAML`, as its docs and examples/vision/maml_omniglot.py
    use it.

    Documented usage: `maml = l2l.algorithms.MAML(model, lr=..., first_order=...)`, then per task
    `learner = maml.clone()`, `learner.adapt(support_loss)` per step and
    `query_loss.backward()`; the example scales the summed gradient by 1 / tasks afterwards,
    here each task's loss is divided by the number of tasks first (the same gradient).
    """
    import learn2learn as l2l

    check_comparable(inner)
    loss = peer_loss(inner)
    maml = l2l.algorithms.MAML(model, lr=inner.lr, first_order=inner.first_order)

    def step(batch: TaskBatch) -> None:
        for sx, sy, qx, qy in zip(*batch.tensors()):
            learner = maml.clone()
            for _ in range(inner.steps):
                learner.adapt(loss(learner(sx), sy))
            (loss(learner(qx), qy) / len(batch)).backward()

    return step


def torchopt_functional(model: nn.Module, inner: InnerLoop) -> Step:
    """TorchOpt 0.7.3's functional optimiser loop (its README's "Functional API").

    Documented usage: `optimizer = torchopt.sgd(lr)`, `opt_state = optimizer.init(params)`, then per
    step `grads = torch.autograd.grad(loss, params, create_graph=True)`, `updates, opt_state =
    optimizer.update(grads, opt_state, inplace=False)`, `params = torchopt.apply_updates(params,
    updates, inplace=False)`, the forward `torch.func.functional_call(model, params, x)`.
    """
    import torchopt

    check_comparable(inner)
    loss = peer_loss(inner)
    params = dict(model.named_parameters())
    optimizer = torchopt.sgd(lr=inner.lr)

    def step(batch: TaskBatch) -> None:
        for sx, sy, qx, qy in zip(*batch.tensors()):
            fast, state = params, optimizer.init(params)
            for _ in range(inner.steps):
                support = loss(torch.func.functional_call(model, fast, (sx,)), sy)
                grads = torch.autograd.grad(support, tuple(fast.values()),
                                            create_graph=not inner.first_order)
                updates, state = optimizer.update(dict(zip(fast, grads)), state, inplace=False)
                fast = torchopt.apply_updates(fast, updates, inplace=False)
            query = loss(torch.func.functional_call(model, fast, (qx,)), qy)
            (query / len(batch)).backward()

    return step


def torch_func_vmap(model: nn.Module, inner: InnerLoop, chunk: int | None = None,
                    compile: bool = False) -> Step:
    """Plain `torch.func`, as TorchOpt's examples/FuncTorch/maml_omniglot_vmap.py and PyTorch's
    functorch MAML example write it: `vmap` over the tasks of a function that takes the inner
    steps with `torch.func.grad` and returns the query loss; the outer gradient by
    `torch.func.grad` of the tasks' mean. `chunk`: `vmap(..., chunk_size=chunk)`; `compile`:
    the whole gradient function under `torch.compile`.

    Known wrong through batch norm: `vmap` of `grad` through PyTorch's fused normalisation
    kernels misses part of the second-order term (1e-3 to 3e-2 off in float64 on the conv nets);
    exact on the sinusoid MLP, which has no norm layers. Our batched engine avoids those kernels.
    """
    check_comparable(inner)
    loss = peer_loss(inner)

    def task_loss(params: dict, x, y):
        return loss(torch.func.functional_call(model, params, (x,)), y)

    def query_loss(params: dict, sx, sy, qx, qy):
        for _ in range(inner.steps):
            grads = torch.func.grad(task_loss)(params, sx, sy)
            if inner.first_order:
                grads = {k: g.detach() for k, g in grads.items()}
            params = {k: params[k] - inner.lr * grads[k] for k in params}
        return task_loss(params, qx, qy)

    def meta_loss(params: dict, sx, sy, qx, qy):
        tasks = torch.vmap(query_loss, in_dims=(None, 0, 0, 0, 0), chunk_size=chunk)
        return tasks(params, sx, sy, qx, qy).mean()

    meta_grad = torch.func.grad(meta_loss)
    if compile:
        meta_grad = torch.compile(meta_grad)

    def step(batch: TaskBatch) -> None:
        params = {name: p.detach() for name, p in model.named_parameters()}
        grads = meta_grad(params, *batch.tensors())
        for name, p in model.named_parameters():
            p.grad = grads[name] if p.grad is None else p.grad + grads[name]

    return step


@dataclass(frozen=True)
class Peer:
    name: str
    make: Callable[..., Step]
    module: str | None  # what must be importable for the row (None: torch or higher, always)
    install: str = ""
    only_sine: bool = False  # the setting without norm layers only (the compiled peer)
    needs_compile: bool = False


PEERS = [
    Peer("peer: higher innerloop_ctx (seed style)", higher_seed_style, None),
    Peer("peer: learn2learn MAML", learn2learn_maml, "learn2learn",
         "pip install learn2learn==0.2.0 (see docs/benchmarks-peers.md: its sdist needs Cython)"),
    Peer("peer: TorchOpt functional", torchopt_functional, "torchopt",
         "pip install --no-deps torchopt==0.7.3 optree graphviz"),
    Peer("peer: torch.func vmap (TorchOpt-style)", torch_func_vmap, None),
    Peer("peer: torch.func vmap + torch.compile", partial(torch_func_vmap, compile=True), None,
         only_sine=True, needs_compile=True),
]


def installed(module: str | None) -> bool:
    return module is None or importlib.util.find_spec(module) is not None


def missing_peers(peers: list[Peer]) -> list[str]:
    """One line per peer whose library is not importable here."""
    return [f"peer {p.name.removeprefix('peer: ')} not installed: {p.install}"
            for p in peers if not installed(p.module)]


def peers_for(args, setting: dict, whole_batch: bool, chunk: int | None) -> list[tuple[str, Callable]]:
    """The installed peers that apply to `setting`, as (row name, make). Where our whole-batch
    row is skipped (`--chunked-only`, or `--quick` on a CPU's conv nets), the `torch.func` peer
    runs `vmap` in chunks of the size our auto-chunked row chose."""
    rows = []
    for peer in PEERS if args.peers else []:
        if not installed(peer.module) or (peer.only_sine and setting["kind"] != "sine"):
            continue
        if peer.needs_compile and not args.compile:
            continue
        make, name = peer.make, peer.name
        if peer.make is torch_func_vmap and not whole_batch and chunk:
            make, name = partial(torch_func_vmap, chunk=chunk), f"{name}, chunks of {chunk}"
        rows.append((name, make))
    return rows


def float64_rel_diff(make: Callable[..., Step], setting: dict, device: torch.device,
                     exact: torch.Tensor) -> float:
    """A peer's meta-gradient in float64 against the float64 `higher` loop's (relative)."""
    model, batch, inner = make_case(setting, device)
    model, batch = model.double(), batch.to(device, torch.float64)
    make(model, inner)(batch)
    grad = torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()
    return ((grad - exact).norm() / exact.norm()).item()


# ---- interleaved timing ---------------------------------------------------------------------

def set_flags(flags: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags.get("tf32", False)
    torch.backends.cudnn.allow_tf32 = flags.get("tf32", False)
    torch.backends.cudnn.benchmark = flags.get("cudnn_benchmark", False)


@dataclass
class Row:
    """One row of a setting: its step on its own model and tasks, and what timing found."""

    name: str
    step: Step
    params: list
    batch: TaskBatch
    flags: dict = field(default_factory=dict)
    engine: object = None
    peer: bool = False
    float64_rel_diff: float | None = None  # peers only
    times: list[float] = field(default_factory=list)
    warmup_s: float = float("nan")
    peak: float = float("nan")
    reserved: float = float("nan")
    error: str | None = None

    def once(self) -> None:
        for p in self.params:
            p.grad = None
        set_flags(self.flags)
        self.step(self.batch)

    @property
    def exact(self) -> bool:
        return self.float64_rel_diff is not None and self.float64_rel_diff <= EXACT

    @property
    def wrong(self) -> bool:
        return self.peer and not self.exact


def warm_up(row: Row, device: torch.device, warmup: int) -> None:
    """`warmup` untimed meta-iterations (their time is `warmup_s`); on CUDA, what the row holds
    from the allocator over them is `reserved` (the cache emptied first)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        row.once()
    sync(device)
    row.warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        row.reserved = torch.cuda.max_memory_reserved(device)


def interleave(rows: list[Row], device: torch.device, rounds: int,
               after_round: Callable[[], None] = lambda: None) -> None:
    """Time the rows in turn, one meta-iteration of each per round, for `rounds` rounds; a row's
    first timed iteration also records its peak memory. A row that fails leaves the rounds."""
    meter = _PeakMemory(device)
    for r in range(rounds):
        for row in rows:
            if row.error:
                continue
            t = time.perf_counter()
            try:
                if r == 0 and meter.available:
                    row.peak = meter.measure(row.once)
                else:
                    row.once()
                sync(device)
            except Exception as exc:  # a failing optimisation is a row, not a crash
                row.error = f"{type(exc).__name__}: {exc}"
                continue
            row.times.append(time.perf_counter() - t)
        after_round()
    set_flags({})


def rows_for(device: torch.device, args, setting: dict) -> list[tuple[str, object, dict]]:
    # `--quick` on a CPU times the conv nets in auto-sized chunks only: a whole batch of 32
    # tasks under vmap needs 7 GB at 1 step and over 20 GB at 5 (a run was OOM-killed)
    whole_fits = not (args.quick and device.type == "cpu" and setting["kind"] == "image")
    rows = [("higher loop", higher_engine, {})]
    if not args.chunked_only and whole_fits:
        rows.append(("batched", BatchedEngine(task_chunk=10**9), {}))
    if device.type == "cuda" or not args.quick or args.chunked_only or not whole_fits:
        rows.append((f"batched, auto chunk <= {args.memory_budget_mb:.0f} MB",
                     BatchedEngine(memory_budget_mb=args.memory_budget_mb), {}))
    if args.compile and device.type != "cuda":
        rows.append(("batched + torch.compile", BatchedEngine(task_chunk=10**9, compile=True), {}))
    if device.type == "cuda":
        rows += [
            ("batched + CUDA graph", BatchedEngine(task_chunk=10**9, cuda_graphs=True), {}),
            ("batched + CUDA graph + cudnn.benchmark",
             BatchedEngine(task_chunk=10**9, cuda_graphs=True), {"cudnn_benchmark": True}),
            ("batched + TF32", BatchedEngine(task_chunk=10**9), {"tf32": True}),
            ("batched + bf16 autocast", BatchedEngine(task_chunk=10**9, bf16=True), {}),
        ]
        if args.compile:  # the combined rows first: a run cut short keeps what matters
            rows += [
                ("batched + compile + CUDA graph",
                 BatchedEngine(task_chunk=10**9, compile=True, cuda_graphs=True), {}),
                (f"batched + compile + CUDA graph, auto chunk <= {args.memory_budget_mb:.0f} MB",
                 BatchedEngine(memory_budget_mb=args.memory_budget_mb, compile=True,
                               cuda_graphs=True), {}),
                ("batched + torch.compile", BatchedEngine(task_chunk=10**9, compile=True), {}),
            ]
    return rows


def iterations(args, setting: dict) -> int:
    """Timed iterations (rounds): `--iterations`, or with `--quick` 1 (the sinusoid's 20: one of
    its iterations takes milliseconds, too short to time alone)."""
    if args.quick:
        return 20 if setting["kind"] == "sine" else 1
    return args.iterations


def selected(only: str) -> list[str]:
    """The settings `--only` names, in its order, each once: a full setting name means that
    setting alone, a part of one every setting containing it; empty means all."""
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    if not wanted:
        return list(SETTINGS)
    names = [n for w in wanted for n in ([w] if w in SETTINGS else SETTINGS) if w in n]
    return list(dict.fromkeys(names))


def float64_reference(setting: dict, device: torch.device) -> torch.Tensor:
    """The `higher` loop's meta-gradient in float64: every row is checked against it."""
    model, batch, inner = make_case(setting, device)
    model, batch = model.double(), batch.to(device, torch.float64)
    higher_engine.meta_gradient(model, None, batch, inner)
    return torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()


def prepare(name: str, make: Callable[..., Step], setting: dict, device: torch.device, args,
            exact: torch.Tensor, flags: dict | None = None, engine=None) -> Row:
    """A row, ready to time: a peer's float64 check first, then the warm-up."""
    rel64 = None
    model, batch, inner = make_case(setting, device)
    row = Row(name, None, list(model.parameters()), batch, flags or {}, engine,
              peer=engine is None)
    try:
        if row.peer:
            rel64 = float64_rel_diff(make, setting, device, exact)
        row.step, row.float64_rel_diff = make(model, inner), rel64
        warm_up(row, device, args.warmup)
    except Exception as exc:  # a failing optimisation (or peer) is a row, not a crash
        row.error = f"{type(exc).__name__}: {exc}"
    check = "" if rel64 is None else f", float64 check {rel64:.1e}"
    print(f"{name}: warmed up{check}" if not row.error else f"{name}: failed: {row.error}",
          flush=True)  # a long setting's progress, before its rounds
    return row


def ours(engine) -> Callable[..., Step]:
    def make(model: nn.Module, inner: InnerLoop) -> Step:
        return lambda batch: engine.meta_gradient(model, None, batch, inner)
    return make


def summary(rows: list[Row], device: torch.device, name: str, exact: torch.Tensor) -> list[dict]:
    """The setting's result rows (medians so far); wrong peers get no speedup."""
    timed = [r for r in rows if not r.error and r.times]
    ms = {id(r): 1000 * statistics.median(r.times) for r in timed}
    reference = ms[id(timed[0])] if timed else None
    exact_peers = [ms[id(r)] for r in timed if r.peer and r.exact]
    fastest_peer = min(exact_peers) if exact_peers else None
    out = []
    for r in rows:
        base = {"device": str(device), "setting": name, "engine": r.name, "peer": r.peer}
        if r.error or not r.times:
            out.append({**base, "error": r.error or "not timed"})
            continue
        grad = torch.cat([p.grad.flatten() for p in r.params]).double().cpu()
        check = None
        if r.peer:
            check = ("exact" if r.exact else f"wrong: {r.float64_rel_diff:.1e} off float64")
        t = ms[id(r)]
        out.append({**base, "ms": t, "warmup_s": r.warmup_s, "peak_mb": r.peak / 2**20,
                    "reserved_mb": r.reserved / 2**20, "iterations": len(r.times),
                    "speedup": None if r.wrong else reference / t,
                    "vs_fastest_exact_peer": (None if r.wrong or fastest_peer is None
                                              else t / fastest_peer),
                    "grad_rel_diff": ((grad - exact).norm() / exact.norm()).item(),
                    "float64_rel_diff": r.float64_rel_diff, "check": check,
                    "chunk": getattr(r.engine, "chosen_chunk", None)})
    return out


def skipped(row: str, skip: str) -> bool:
    """Whether `--skip` (comma-separated parts of row names) leaves this row out."""
    return any(part.strip() and part.strip() in row for part in skip.split(","))


def bench(device: torch.device, args, results: list[dict], save) -> list[dict]:
    for name in selected(args.only):
        setting = SETTINGS[name]
        exact = float64_reference(setting, device)
        rows = []
        for row, engine, flags in rows_for(device, args, setting):
            if not skipped(row, args.skip):
                rows.append(prepare(row, ours(engine), setting, device, args, exact, flags,
                                    engine))
        engines = [r.engine for r in rows if isinstance(r.engine, BatchedEngine)]
        whole = any(e.task_chunk == 10**9 for e in engines)  # our whole-batch row runs
        chunk = next((e.chosen_chunk for e in engines if e.task_chunk is None), None)
        for row, make in peers_for(args, setting, whole, chunk):
            if not skipped(row, args.skip):
                rows.append(prepare(row, make, setting, device, args, exact))
        start = len(results)

        def update(rows=rows, name=name, exact=exact, start=start) -> None:
            results[start:] = summary(rows, device, name, exact)  # every round: a run cut
            save()  # short keeps its medians

        interleave(rows, device, iterations(args, setting), update)
        for r in results[start:]:
            if "error" in r:
                print(f"{name} / {r['engine']}: failed: {r['error']}", flush=True)
                continue
            mark = f", {r['check']}" if r["check"] else ""
            print(f"{name} / {r['engine']}: {r['ms']:.1f} ms, peak {r['peak_mb']:.0f} MB, "
                  f"grad rel diff {r['grad_rel_diff']:.1e}{mark}", flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| device | setting | engine | ms / iter (median) | speedup | vs fastest exact peer | "
             "peak MB | reserved MB | chunk | grad rel diff vs float64 loop | peer check "
             "(float64) | first iteration s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['setting']} | {r['engine']} | failed: "
                         f"{r['error'][:60]} | | | | | | | | |")
            continue
        peak = "n/a" if math.isnan(r["peak_mb"]) else f"{r['peak_mb']:.0f}"
        reserved = r.get("reserved_mb", float("nan"))
        reserved = "" if math.isnan(reserved) else f"{reserved:.0f}"
        wrong = r["speedup"] is None
        ms = f"{r['ms']:.1f}" + (" (wrong)" if wrong else "")
        speedup = "not a win: wrong" if wrong else f"{r['speedup']:.2f}x"
        vs = r["vs_fastest_exact_peer"]
        vs = "" if vs is None else f"{vs:.2f}"
        lines.append(f"| {r['device']} | {r['setting']} | {r['engine']} | {ms} | {speedup} | "
                     f"{vs} | {peak} | {reserved} | {r['chunk'] or ''} | "
                     f"{r['grad_rel_diff']:.1e} | {r['check'] or ''} | {r['warmup_s']:.1f} |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The processor's name, for the JSON's record of the machine (also bench_distributed's)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10,
                        help="timed rounds: one meta-iteration of every row each, interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-iterations first")
    parser.add_argument("--quick", action="store_true",
                        help="1 timed iteration (the sinusoid's 20); on a CPU the conv nets "
                             "in auto-sized chunks only, not as one whole batch")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--memory-budget-mb", type=float, default=1024.0)
    parser.add_argument("--only", default="",
                        help="comma-separated parts of setting names: run those, in that order")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--cuda-only", action="store_true",
                        help="skip the CPU rows (a GPU lease is short; the CPU rows are slow)")
    parser.add_argument("--chunked-only", action="store_true",
                        help="skip the whole-batch row (it needs ~7 GB RAM per 32 tasks on CPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts of row names to leave out, e.g. 'torch.func' "
                             "(its vmap keeps every task's graph: 20-way, 5 steps needs > 20 GB)")
    parser.add_argument("--no-keep-freed-memory", action="store_true",
                        help="leave glibc's malloc as it is for every row (maml/allocator.py)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="add the other MAML implementations' rows (those installed)")
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args()
    unknown = [w for w in args.only.split(",") if w.strip() and not any(w.strip() in n for n in SETTINGS)]
    if unknown:
        parser.error(f"--only {unknown[0]!r} matches no setting; settings: {', '.join(SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # every row, peers included, runs in one process: all of them reuse freed memory (as the
    # `maml` command does), or none of them with --no-keep-freed-memory
    kept = False if args.no_keep_freed_memory else keep_freed_memory()
    if args.cuda_only and not torch.cuda.is_available():
        parser.error("--cuda-only: no CUDA device is visible; drop the flag to time the CPU")
    devices = [] if args.cuda_only else [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    machine = {"platform": platform.platform(), "processor": cpu_name(),
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
               "freed_memory_kept": kept, "load_average": os.getloadavg(),
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out = Path(args.out)
    try:  # before any timing: a result that cannot be written is not worth measuring
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out} cannot be made a folder ({exc.strerror}); choose another --out")
    path = out / f"bench_train-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results: list[dict] = []
    missing = missing_peers(PEERS) if args.peers else []
    for line in missing:
        print(line, flush=True)

    def save() -> None:  # after every round, so a long run that is cut short keeps its rows
        path.write_text(json.dumps({"machine": machine, "args": vars(args),
                                    "peers_not_installed": missing, "results": results},
                                   indent=1))

    for device in devices:
        bench(device, args, results, save)
    print()
    print(f"machine: {machine}")
    print(table(results))
    for line in missing:
        print(line)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
