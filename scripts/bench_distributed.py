"""Throughput of distributed meta-training: ms per meta-iteration and tasks/s for 1, 2, ... processes.

Each measurement is a real `torchrun --nproc-per-node N -m maml train` run (the product's own code
path, gradients all-reduced every iteration); the time comes from the run's metrics file, between
the log record after the warm-up iterations and the last one (no validation or checkpoint in
between). Prints a table and writes JSON under `benchmarks/`.

    python scripts/bench_distributed.py                      # CPU: 1 and 2 processes
    python scripts/bench_distributed.py --device cuda        # 1..N GPUs (nccl)

On CPU every process runs 1 intra-op thread by default (`--threads`), so 1 and N processes compare
like for like and N processes use N cores; on a shared machine, more threads per process mostly
measure oversubscription (a 2-thread single process ran 10x slower than 1 thread per process
here while other jobs loaded the 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maml.arguments import Parser, whole_numbers, writable_file  # noqa: E402
from maml.errors import UsageError, exit_status  # noqa: E402

WORKLOADS = {
    # name: (train arguments, iterations, warm-up iterations)
    "sinusoid-mb25": (["--dataset", "sinusoid", "--meta-batch-size", "25"], 60, 10),
    "omniglot-5w1s-mb16": (["--dataset", "omniglot", "--n-way", "5", "--k-shot", "1",
                            "--meta-batch-size", "16", "--data-root", "../shared/data/omniglot"], 8, 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, procs: int, device: str, threads: int) -> dict:
    args, iterations, warmup = WORKLOADS[name]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "run.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "maml",
               "train", *args, "--device", device, "--iterations", str(iterations),
               "--log-every", str(warmup), "--val-every", str(10**9), "--val-tasks", "2",
               "--checkpoint-every", str(10**9), "--checkpoint", str(ckpt), "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: {name} on {procs} processes failed:\n{done.stderr[-2000:]}")
        records = [json.loads(line) for line in ckpt.with_suffix(".metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    timed = last["iteration"] - first["iteration"]
    seconds = last["seconds"] - first["seconds"]
    meta_batch = int(args[args.index("--meta-batch-size") + 1])
    return {"workload": name, "processes": procs, "device": device, "threads_per_process": threads,
            "meta_batch": meta_batch, "timed_iterations": timed,
            "ms_per_iteration": 1000 * seconds / timed, "tasks_per_s": meta_batch * timed / seconds}


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--procs", default=None, help="comma-separated process counts "
                   "(default: 1,2 on CPU; 1..GPUs on CUDA)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per CPU process")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/distributed_<device>.json)")
    return p


def run(opts: argparse.Namespace) -> None:
    workloads = opts.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise UsageError(f"--workloads: unknown workload {unknown[0]!r}; choose from "
                         f"{', '.join(WORKLOADS)}")
    if opts.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {opts.threads}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    gpus = torch.cuda.device_count() if opts.device == "cuda" else 0
    default = "1,2" if opts.device == "cpu" else ",".join(str(n) for n in range(1, gpus + 1))
    procs = whole_numbers(opts.procs or default, "--procs", "1,2")
    if opts.device == "cuda" and max(procs) > gpus:
        raise UsageError(f"--procs {max(procs)} needs as many GPUs, but {gpus} are visible; "
                         f"give at most {gpus}")
    out = Path(opts.out or ROOT / "benchmarks" / f"distributed_{opts.device}.json")
    writable_file(out, "--out")
    cores = os.cpu_count() or 1
    rows = []
    load_before = os.getloadavg()[0]
    for name in workloads:
        for n in procs:
            threads = opts.threads if opts.device == "cpu" else 1
            rows.append(measure(name, n, opts.device, threads))
            r = rows[-1]
            print(f"{name:20s} {n:2d} proc  {r['ms_per_iteration']:9.1f} ms/it  "
                  f"{r['tasks_per_s']:8.1f} tasks/s", flush=True)
    from bench_train import cpu_name  # this script's folder is on sys.path when it runs

    machine = {"cpu_cores": cores, "processor": cpu_name(), "platform": platform.platform(),
               "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if gpus else None, "gpus": gpus,
               "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print("\n| workload | processes | threads/process | ms/iteration | tasks/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["workload"] == r["workload"])
        print(f"| {r['workload']} | {r['processes']} | {r['threads_per_process']} | "
              f"{r['ms_per_iteration']:.1f} | {r['tasks_per_s']:.1f} | "
              f"{base['ms_per_iteration'] / r['ms_per_iteration']:.2f}x |")
    print(f"\nmachine: {machine}")
    out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> int:
    return exit_status(lambda: run(parser().parse_args()))


if __name__ == "__main__":
    sys.exit(main())
