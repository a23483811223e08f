"""Where a CPU meta-iteration's time goes, on the MAML paper's Omniglot conv net.

    python scripts/profile_step.py                      # about 2 minutes on a 2-core CPU
    python scripts/profile_step.py --no-keep-freed-memory --tasks 16

The setting is the benchmark's: 5-way 1-shot, 15 queries per class, 32 tasks, 1 second-order
step, random 28x28 images (time does not depend on the pixels). Rows, timed round-robin (one
iteration of each per round, medians), so that load from other processes hits them alike:

- `query images, plain training`: one forward and backward of every task's 75 query images
  through the net with its initial weights: no support set, no adaptation, no second order.
  Every exact MAML step does at least this work with PyTorch's CPU kernels, so it is a floor;
  also with the tasks split between threads, one operator thread each, as the task threads run.
- the `higher` engine one task at a time, and with its task threads (what `auto` runs).

Each row also shows the process's CPU time, system time and page faults per iteration (the
allocator's share: compare with `--no-keep-freed-memory`). Then a `torch.profiler` run of the
one-task-at-a-time loop, its operators grouped: convolutions (forward, backward and the
backward's backward), batch norm, the rest.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import SETTINGS, make_case  # noqa: E402

from maml import higher_engine  # noqa: E402
from maml.adaptation import InnerLoop  # noqa: E402
from maml.allocator import keep_freed_memory  # noqa: E402
from maml.arguments import Parser  # noqa: E402
from maml.tasks import TaskBatch  # noqa: E402

GROUPS = {"convolution": ("conv",), "batch norm": ("batch_norm",)}


def case(tasks: int) -> tuple[torch.nn.Module, TaskBatch, InnerLoop]:
    """The benchmark's paper-net setting (`scripts/bench_train.py`), with `tasks` tasks."""
    setting = {**SETTINGS["paper net 5w1s q15 B32 1 step"], "tasks": tasks}
    return make_case(setting, torch.device("cpu"))


def rows(model, batch, inner) -> dict:
    threads = higher_engine.task_workers(model, batch)

    def plain_training() -> None:
        for i in range(len(batch)):
            F.cross_entropy(model(batch.query_x[i]), batch.query_y[i]).backward()

    def plain_training_side_by_side() -> None:  # as the task threads run: one op thread each
        def part(w: int) -> None:
            for i in range(w, len(batch), threads):
                F.cross_entropy(model(batch.query_x[i]), batch.query_y[i]).backward()

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(part, range(threads)))
        finally:
            torch.set_num_threads(before)

    def engine(workers: int | None):
        def run() -> None:
            higher_engine.meta_gradient(model, None, batch, inner, workers=workers)
        return run

    return {"query images, plain training (floor)": plain_training,
            f"query images, plain training, {threads} threads side by side":
                plain_training_side_by_side,
            "higher engine, one task at a time": engine(1),
            f"higher engine, {threads} task threads": engine(None)}


def time_rows(funcs: dict, model, rounds: int) -> dict:
    results = {name: {"ms": [], "cpu_ms": [], "sys_ms": [], "faults": []} for name in funcs}
    for run in funcs.values():  # warm-up
        model.zero_grad(set_to_none=True)
        run()
    for _ in range(rounds):
        for name, run in funcs.items():
            model.zero_grad(set_to_none=True)
            before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            run()
            wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
            r = results[name]
            r["ms"].append(1000 * wall)
            r["cpu_ms"].append(1000 * (after.ru_utime + after.ru_stime
                                       - before.ru_utime - before.ru_stime))
            r["sys_ms"].append(1000 * (after.ru_stime - before.ru_stime))
            r["faults"].append(after.ru_minflt - before.ru_minflt)
    return {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}


def grouped_profile(model, batch, inner) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        higher_engine.meta_gradient(model, None, batch, inner, workers=1)
    totals = {name: 0.0 for name in [*GROUPS, "everything else"]}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue  # autograd nodes and wrappers: their time is counted by the ops inside
        group = next((g for g, words in GROUPS.items()
                      if any(w in event.key for w in words)), "everything else")
        totals[group] += event.self_cpu_time_total / 1000
    return totals


def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (medians)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--no-keep-freed-memory", action="store_true",
                        help="leave glibc's malloc as it is (see maml/allocator.py)")
    args = parser.parse_args()
    kept = False if args.no_keep_freed_memory else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, batch, inner = case(args.tasks)
    timed = time_rows(rows(model, batch, inner), model, args.rounds)
    floor = min(r["ms"] for name, r in timed.items() if "plain training" in name)
    print(f"{args.tasks} tasks, {torch.get_num_threads()} threads, freed memory kept: {kept}, "
          f"torch {torch.__version__}")
    print("| row | ms / iteration | x floor | CPU ms | system ms | page faults |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in timed.items():
        print(f"| {name} | {r['ms']:.0f} | {r['ms'] / floor:.2f} | {r['cpu_ms']:.0f} | "
              f"{r['sys_ms']:.0f} | {r['faults']:.0f} |")
    totals = grouped_profile(model, batch, inner)
    whole = sum(totals.values())
    print("\nprofile of the one-task-at-a-time loop (operators' own CPU time):")
    print("| operators | ms | share |")
    print("| --- | --- | --- |")
    for name, ms in totals.items():
        print(f"| {name} | {ms:.0f} | {100 * ms / whole:.0f}% |")


if __name__ == "__main__":
    main()
