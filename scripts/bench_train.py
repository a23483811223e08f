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
on CUDA, "reserved MB" is what the row held from the allocator (the cache was emptied before
the row), which counts a CUDA graph's private memory pool that the peak of a replay does not see.
Tasks are random images / sinusoid draws of the right shapes (timing does not depend on the
pixels). CPU always, CUDA when present. Prints a markdown table; writes JSON under
`benchmarks/`.

    python scripts/bench_train.py --quick            # about 10 minutes on a 2-core CPU
    python scripts/bench_train.py --iterations 20 --compile
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from maml import higher_engine
from maml.adaptation import InnerLoop, use_batch_statistics
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


def run_row(engine, model, batch, inner, device, iterations: int, warmup: int):
    """Time `iterations` meta-gradients after `warmup`; return ms, peak MB, the gradient."""
    params = list(model.parameters())
    if device.type == "cuda":  # what this row holds from the allocator is its own
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def once():
        for p in params:
            p.grad = None
        engine.meta_gradient(model, None, batch, inner)

    t0 = time.perf_counter()
    for _ in range(warmup):
        once()
    sync(device)
    first = time.perf_counter() - t0
    meter = _PeakMemory(device)
    times, peak = [], float("nan")
    for i in range(iterations):
        t = time.perf_counter()
        if i == 0 and meter.available:  # the first timed iteration also records peak memory
            peak = meter.measure(once)
        else:
            once()
        sync(device)
        times.append(time.perf_counter() - t)
    grad = torch.cat([p.grad.flatten() for p in params]).double().cpu()
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else float("nan")
    return {"ms": 1000 * statistics.median(times), "warmup_s": first, "peak_mb": peak / 2**20,
            "reserved_mb": reserved / 2**20, "grad": grad}


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
    """Timed iterations: `--iterations`, or with `--quick` 1 (the sinusoid's 20: one of its
    iterations takes milliseconds, too short to time alone)."""
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


def bench(device: torch.device, args, results: list[dict], save) -> list[dict]:
    for name in selected(args.only):
        setting = SETTINGS[name]
        reference = None
        model, batch, inner = make_case(setting, device)
        model, batch = model.double(), batch.to(device, torch.float64)
        higher_engine.meta_gradient(model, None, batch, inner)
        exact = torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()
        del model, batch
        for row, engine, flags in rows_for(device, args, setting):
            model, batch, inner = make_case(setting, device)
            torch.backends.cuda.matmul.allow_tf32 = flags.get("tf32", False)
            torch.backends.cudnn.allow_tf32 = flags.get("tf32", False)
            torch.backends.cudnn.benchmark = flags.get("cudnn_benchmark", False)
            try:
                r = run_row(engine, model, batch, inner, device, iterations(args, setting),
                            args.warmup)
            except Exception as exc:  # a failing optimisation is a row, not a crash
                print(f"{name} / {row}: failed: {type(exc).__name__}: {exc}")
                results.append({"device": str(device), "setting": name, "engine": row,
                                "error": f"{type(exc).__name__}: {exc}"})
                continue
            grad = r.pop("grad")
            if reference is None:
                reference = r["ms"]
            rel = ((grad - exact).norm() / exact.norm()).item()
            chunk = getattr(engine, "chosen_chunk", None)
            results.append({"device": str(device), "setting": name, "engine": row, **r,
                            "iterations": iterations(args, setting),
                            "speedup": reference / r["ms"], "grad_rel_diff": rel,
                            "chunk": chunk})
            print(f"{name} / {row}: {r['ms']:.1f} ms, peak {r['peak_mb']:.0f} MB, "
                  f"grad rel diff {rel:.1e}", flush=True)
            save()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    return results


def table(results: list[dict]) -> str:
    lines = ["| device | setting | engine | ms / iter | speedup | peak MB | reserved MB | chunk | "
             "grad rel diff vs float64 loop | first iteration s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['setting']} | {r['engine']} | failed: "
                         f"{r['error'][:60]} | | | | | | |")
            continue
        peak = "n/a" if math.isnan(r["peak_mb"]) else f"{r['peak_mb']:.0f}"
        reserved = r.get("reserved_mb", float("nan"))
        reserved = "" if math.isnan(reserved) else f"{reserved:.0f}"
        lines.append(f"| {r['device']} | {r['setting']} | {r['engine']} | {r['ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {peak} | {reserved} | {r['chunk'] or ''} | "
                     f"{r['grad_rel_diff']:.1e} | {r['warmup_s']:.1f} |")
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
    parser.add_argument("--iterations", type=int, default=10, help="timed meta-iterations")
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
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args()
    unknown = [w for w in args.only.split(",") if w.strip() and not any(w.strip() in n for n in SETTINGS)]
    if unknown:
        parser.error(f"--only {unknown[0]!r} matches no setting; settings: {', '.join(SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_only and not torch.cuda.is_available():
        parser.error("--cuda-only: no CUDA device is visible; drop the flag to time the CPU")
    devices = [] if args.cuda_only else [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    machine = {"platform": platform.platform(), "processor": cpu_name(),
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out = Path(args.out)
    try:  # before any timing: a result that cannot be written is not worth measuring
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {out} cannot be made a folder ({exc.strerror}); choose another --out")
    path = out / f"bench_train-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results: list[dict] = []

    def save() -> None:  # after every row, so a long run that is cut short keeps its rows
        path.write_text(json.dumps({"machine": machine, "args": vars(args), "results": results},
                                   indent=1))

    for device in devices:
        bench(device, args, results, save)
    print()
    print(f"machine: {machine}")
    print(table(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
