"""The meta-training loop: sample a meta-batch, take its meta-gradient, step Adam. Repeat.

One obvious loop. Around it: a progress bar with the running meta-loss (and accuracy), metrics
every `log_every` iterations to `<run>.metrics.jsonl` (beside `<run>.pt`), validation on held-out
tasks every `val_every` iterations (the best checkpoint is kept as `<run>.best.pt` beside it),
and an atomic checkpoint every `checkpoint_every` iterations and at the end. `resume=True`
continues from the checkpoint's exact state (weights, optimizer, task generator, RNG), so
N + N resumed iterations equal 2N straight (metric lines logged after that checkpoint by the
stopped run are dropped, since the resumed run logs those iterations again).

Ctrl-C (or a scheduler's SIGTERM) asks the run to stop: it finishes the iteration under way,
writes a checkpoint and raises `Stopped`, so `--resume` loses nothing; a second Ctrl-C stops at
once, keeping only the last periodic checkpoint.

A non-finite meta-loss stops the run with a clear message; it is checked at every log step and
before every checkpoint write, so no checkpoint ever holds NaN weights (and the step itself never
waits on the host).

Under torchrun (`ranks`, see `maml.distributed`) each rank takes its share of every meta-batch,
the meta-gradients are averaged across ranks before the step, validation is spread over ranks,
and rank 0 alone writes checkpoints, metrics and the progress bar.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import torch

from maml import checkpoint, distributed
from maml.config import Config, resumed
from maml.distributed import SINGLE, Ranks
from maml.errors import Stopped, UsageError
from maml.evaluation import evaluate
from maml.experiment import Experiment, build, restore, validation_split
from maml.norms import has_batch_norm
from maml.progress import Progress

VAL_SEED = 4321  # validation tasks are the same at every validation, for a fair comparison


class TrainingDiverged(UsageError):
    """The meta-loss became non-finite."""


# settings each machine of a torchrun launch may have its own of, without changing the run
MACHINE_OWN = ("checkpoint", "data_root", "device", "download", "task_chunk", "memory_budget_mb")


def select_engine(name: str, cfg: Config | None = None, ranks: Ranks = SINGLE):
    """The engine for `--engine` with the run's engine settings (see `maml.engine_select`);
    under torchrun rank 0 alone prints its notices (every rank makes the same decision)."""
    from maml.engine_select import options_from, select

    quiet = None if ranks.is_main else (lambda line: None)
    return select(options_from(name, cfg), quiet)


def paths(ckpt: str | Path) -> dict[str, Path]:
    """The files of the run at `ckpt`: `<run>.pt` with `<run>.best.pt` and `<run>.metrics.jsonl`
    beside it, and `<run>.lock` while a process trains it. Only `.pt` is dropped: `lr0.01` and
    `lr0.05` are two runs, not two `lr0`s."""
    ckpt = Path(ckpt)
    stem = ckpt.with_suffix("") if ckpt.suffix == ".pt" else ckpt
    return {"latest": ckpt, "best": Path(f"{stem}.best.pt"),
            "metrics": Path(f"{stem}.metrics.jsonl"), "lock": Path(f"{stem}.lock")}


@contextlib.contextmanager
def run_lock(where: dict[str, Path], held: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the run's `<run>.lock` (`held`: on rank 0 only), so that a
    second process started on the same checkpoint is refused instead of interleaving its
    metrics lines and checkpoints with the first's. The kernel releases the lock when the
    process ends, however it ends; the file is removed when the run ends."""
    if not held:
        yield
        return
    lock = where["lock"]
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another process is training the run at {where['latest']} (it "
                             f"holds {lock}); wait for it to end, or choose another "
                             "--checkpoint") from None
        except OSError:  # a file system without locks: train unguarded rather than not at all
            pass
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def _tensorboard(folder: str):
    """A TensorBoard writer for `folder` (`--tensorboard`), or a one-line refusal without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or drop --tensorboard; metrics are in <run>.metrics.jsonl too)") from None
    return SummaryWriter(log_dir=str(Path(folder).expanduser()))


def _validate(exp: Experiment, engine, ranks: Ranks = SINGLE) -> dict[str, Any]:
    cfg = exp.cfg
    split = validation_split(exp.source)
    gen = torch.Generator().manual_seed(VAL_SEED)
    with torch.random.fork_rng(devices=[]):  # validation must not shift training's randomness
        return evaluate(exp.model, exp.inner_lrs, exp.source, cfg.inner_loop(cfg.eval_inner_steps),
                        cfg.val_tasks, gen, split, adapt_predict=engine.adapt_predict, ranks=ranks)


def _better(metric: str, new: float, best: float | None) -> bool:
    """Whether validation score `new` beats `best`; a NaN or infinite score never does."""
    if not math.isfinite(new):
        return False
    if best is None or not math.isfinite(best):
        return True
    return new > best if metric == "accuracy" else new < best


def _finite(exp: Experiment) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in exp.meta_parameters)


def _forget_after(metrics_file: Path, iteration: int) -> None:
    """Drop metric lines past `iteration`: a run that stopped between checkpoints logged
    iterations its resumed run will redo, and they must not appear twice in the curves."""
    if not metrics_file.is_file():
        return

    def before(line: str) -> bool:
        try:
            return json.loads(line)["iteration"] <= iteration
        except (ValueError, KeyError, TypeError):  # a line cut short by the stop
            return False

    lines = metrics_file.read_text().splitlines(keepends=True)
    kept = [line for line in lines if before(line)]
    if len(kept) != len(lines):
        tmp = metrics_file.with_name(f".{metrics_file.name}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(metrics_file)


@contextlib.contextmanager
def stop_requests(say: Callable[[str], None], again_stops_now: bool = True) -> Iterator[list[int]]:
    """Within the block, the first SIGINT (Ctrl-C) or SIGTERM is recorded in the yielded list
    instead of stopping the process, so the loop can stop at the end of an iteration with a
    checkpoint. The next one stops at once (a `Stopped` carrying that signal, so the exit status
    says which it was), or is ignored if not `again_stops_now` (under torchrun, which sends every
    worker each signal it gets, so the second one is usually the agent forwarding the first).
    Signals can only be caught on the main thread; elsewhere the list stays empty and they act
    as usual."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def now(signum: int, frame: object) -> None:
        raise Stopped(f"{signal.Signals(signum).name} again: stopped at once, without a "
                      "checkpoint of this iteration", signum)

    def request(signum: int, frame: object) -> None:
        received.append(signum)
        for s in previous:
            signal.signal(s, now if again_stops_now else signal.SIG_IGN)
        say(f"{signal.Signals(signum).name}: stopping after this iteration, with a checkpoint"
            + (" (Ctrl-C again to stop now, without one)" if again_stops_now else ""))

    for s in previous:
        signal.signal(s, request)
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def writable_target(where: dict[str, Path], resume: bool, overwrite: bool) -> None:
    """Refuse, before any training, a checkpoint path that cannot be written or whose files
    (`paths`) hold a run which neither `resume` nor `overwrite` says what to do with."""
    path = where["latest"]
    if path.is_dir():
        raise UsageError(f"--checkpoint {path} is a folder; give a file name such as "
                         f"{path / 'model.pt'}")
    if path.exists() and not (resume or overwrite):
        raise UsageError(f"{path} already holds a run; add --resume to continue it, --overwrite "
                         "to start again in its place, or choose another --checkpoint")
    shared = next((p for p in (where["metrics"], where["best"]) if p.exists()), None)
    if shared is not None and not (resume or overwrite):  # `runs/a` and `runs/a.pt` share them
        other = path.with_suffix("") if path.suffix == ".pt" else Path(f"{path}.pt")
        raise UsageError(f"{shared} exists: it is the run {other}'s, or a run here stopped "
                         "before its first checkpoint; add --overwrite to start again in its "
                         "place, or choose another --checkpoint")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"--checkpoint {path}: {blocking} is a file, not a folder; choose "
                         "another --checkpoint path")
    path.parent.mkdir(parents=True, exist_ok=True)  # an OSError here is exit_status's one line
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as exc:  # named by the folder the user chose, not by the probe's random name
        raise OSError(exc.errno, exc.strerror, str(path.parent)) from None


def train(
    cfg: Config, resume: bool = False, progress: bool = True, max_minutes: float | None = None,
    ranks: Ranks = SINGLE, given: Collection[str] = (), overwrite: bool = False,
) -> dict[str, Any]:
    """Meta-train as `cfg` says (or continue the run at `cfg.checkpoint`); return final metrics.

    `max_minutes` caps this call's wall-clock time: the run stops early with a checkpoint, and
    a later `resume=True` call continues it, so several short slots add up to one run. A resumed
    run keeps the checkpoint's settings except `cfg`'s iterations and device and those named in
    `given` (the ones the caller chose) that may change between slots (`config.resumed`).
    With `ranks` (a torchrun launch) every rank runs this same function on its share of tasks.
    An existing run at `cfg.checkpoint` is only replaced with `overwrite`, and one process at a
    time trains it (`run_lock`).
    """
    where = paths(cfg.checkpoint)
    writable_target(where, resume, overwrite)
    with run_lock(where, ranks.is_main):
        writable_target(where, resume, overwrite)  # again, under the lock: the last holder may have written
        return _train(cfg, where, resume, progress, max_minutes, ranks, given, overwrite)


def _train(cfg: Config, where: dict[str, Path], resume: bool, progress: bool,
           max_minutes: float | None, ranks: Ranks, given: Collection[str],
           overwrite: bool) -> dict[str, Any]:
    """`train`'s run, once the checkpoint's files are this process's to write."""
    if resume:
        state = checkpoint.load(where["latest"])
        lacking = [key for key in ("optimizer", "rng", "metrics") if key not in state]
        if lacking:
            raise UsageError(f"{where['latest']} holds weights but not a resumable run (no "
                             f"{', '.join(lacking)}); start a new run under another --checkpoint")
        requested = dataclasses.replace(cfg, checkpoint=str(where["latest"]))
        settings = resumed(Config.from_dict(state["config"]), requested, given,
                           str(where["latest"]))
        if settings.iterations < state["iteration"]:
            raise UsageError(f"--iterations {settings.iterations} is fewer than the "
                             f"{state['iteration']} the run at {where['latest']} has done; give "
                             "more to continue it")
        exp = restore({**state, "config": settings.to_dict()}, str(where["latest"]), cfg.device)
        cfg = exp.cfg
    else:
        cfg = cfg.with_defaults()
        exp = build(cfg)
        state = None
    if ranks.world > cfg.meta_batch_size:
        raise UsageError(f"--meta-batch-size {cfg.meta_batch_size} is smaller than the {ranks.world} "
                         f"processes; every process needs at least one task")
    distributed.check_same_settings(
        {**{k: v for k, v in cfg.to_dict().items() if k not in MACHINE_OWN},
         "iteration": 0 if state is None else state["iteration"]}, ranks)
    engine = select_engine(cfg.engine, cfg, ranks)
    distributed.broadcast_from_main(list(exp.model.buffers()) + exp.meta_parameters, ranks)
    fused = True if torch.device(cfg.device).type == "cuda" else None  # one kernel per step
    opt = torch.optim.Adam(exp.meta_parameters, lr=cfg.meta_lr, fused=fused)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, metrics = 0, {"best_val": None, "best_iteration": None, "last": {}, "seconds": 0.0}
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"]["tasks"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.device(cfg.device).type == "cuda":  # dropout on a GPU
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), cfg.device)
        start, metrics = state["iteration"], state["metrics"]
    inner = cfg.inner_loop()
    main = ranks.is_main
    if main and not resume and "norm" in given and cfg.norm != "transductive" \
            and not has_batch_norm(exp.model):
        print(f"note: --norm {cfg.norm} changes nothing for this model: it has no batch-norm "
              "layer, so each query is already answered on its own", file=sys.stderr)
    if main:
        where["metrics"].parent.mkdir(parents=True, exist_ok=True)
    if main and resume:
        _forget_after(where["metrics"], start)
    if main and not resume:  # --overwrite replaces the whole old run, not some of its files:
        for old in (where["best"], where["latest"]):  # no old best posing as this run's, no
            old.unlink(missing_ok=True)  # old checkpoint left to resume without its history
    log = where["metrics"].open("a" if resume else "w") if main else None

    def snapshot(iteration: int) -> dict[str, Any]:
        metrics["engine"] = getattr(engine, "name", None) or metrics.get("engine")  # as resolved
        return {
            "config": cfg.to_dict(),
            "model": {"spec": exp.model_spec, "kwargs": exp.model_kwargs,
                      "state_dict": exp.model.state_dict()},
            "inner_lrs": None if exp.inner_lrs is None else exp.inner_lrs.detach().clone(),
            "optimizer": opt.state_dict(), "iteration": iteration,
            "rng": {"tasks": gen.get_state(), "torch": torch.get_rng_state(),
                    **({"cuda": torch.cuda.get_rng_state(cfg.device)}
                       if torch.device(cfg.device).type == "cuda" else {})},
            "split": exp.split, "metrics": metrics,
            "versions": {"torch": str(torch.__version__), "maml": "0.1.0"},
        }

    saved_at = state["iteration"] if state is not None else None  # the run's last checkpoint

    def stop_if_diverged(iteration: int, loss: float) -> None:
        if not (torch.isfinite(torch.tensor(loss)) and _finite(exp)):
            kept = (f"the last good checkpoint, of iteration {saved_at}, is {where['latest']}"
                    if saved_at is not None else "no checkpoint of this run was written")
            raise TrainingDiverged(f"meta-loss became non-finite ({loss}) by iteration "
                                   f"{iteration}; {kept}; lower --meta-lr or set --grad-clip")

    def save(path: Path, iteration: int) -> None:
        nonlocal saved_at
        distributed.check_replicas_agree(exp.meta_parameters, ranks)
        if main:
            checkpoint.save(path, snapshot(iteration))
        if path == where["latest"]:
            saved_at = iteration

    t0 = time.perf_counter() - metrics.get("seconds", 0.0)  # training seconds add up over resumes
    deadline = None if max_minutes is None else time.perf_counter() + 60 * max_minutes
    bar = Progress(start, cfg.iterations, None if max_minutes is None else 60 * max_minutes,
                   enabled=progress and main)
    board = _tensorboard(cfg.tensorboard) if main and cfg.tensorboard else None
    running: dict[str, float] = {}
    done, signum, out_of_time = start, 0, False
    say = bar.write if main else (lambda message: None)
    asked = stop_requests(say, again_stops_now=not distributed.under_torchrun_agent())
    with asked as received, contextlib.closing(bar), log or contextlib.nullcontext(), \
            board or contextlib.nullcontext():
        for it in range(start, cfg.iterations):
            batch = exp.source.sample(cfg.meta_batch_size, gen, "train")
            lo, hi = ranks.share(cfg.meta_batch_size)  # every rank drew the same batch
            batch = batch.chunk(lo, hi).to(cfg.device, next(exp.model.parameters()).dtype)
            opt.zero_grad(set_to_none=True)
            stats = engine.meta_gradient(exp.model, exp.inner_lrs, batch, inner)
            stats = distributed.average_meta_gradient(exp.meta_parameters, stats, hi - lo,
                                                      cfg.meta_batch_size, ranks)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(exp.meta_parameters, cfg.grad_clip)
            opt.step()
            done = it + 1
            last = done == cfg.iterations
            # all ranks stop after the same iteration: any rank's signal, or rank 0's clock
            out_of_time = main and deadline is not None and time.perf_counter() > deadline
            signum, out_of_time = distributed.max_over_ranks(
                [received[0] if received else 0, out_of_time], ranks)
            # validation on its own schedule, at the end, and at the end of a --minutes slot (a
            # short run is judged by it), not when a signal asks to stop now
            validate = done % cfg.val_every == 0 or last or (out_of_time and not signum)
            logged = done % cfg.log_every == 0 or validate
            if logged:
                running = {k: v.item() for k, v in stats.items()}
                stop_if_diverged(done, running["loss"])
                record = {"iteration": done, "seconds": time.perf_counter() - t0, **running}
                if validate:
                    val_start = time.perf_counter()
                    val = _validate(exp, engine, ranks)
                    t0 += time.perf_counter() - val_start  # the clock counts training only
                    record["val_" + val["metric"]] = val["mean"]
                    if not math.isfinite(val["mean"]):
                        say(f"warning: validation {val['metric']} is {val['mean']} at iteration "
                            f"{done} (adaptation diverges at --eval-inner-steps "
                            f"{cfg.eval_inner_steps}, step size {cfg.inner_lr}); not kept as best")
                    if _better(val["metric"], val["mean"], metrics["best_val"]):
                        metrics.update(best_val=val["mean"], best_iteration=done)
                        metrics["last"] = record
                        save(where["best"], done)
                metrics["last"] = record
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if board is not None:
                    for key, value in record.items():
                        if key not in ("iteration", "seconds"):
                            board.add_scalar(key, value, done)
                    board.flush()
            bar.update(done, {k: v for k, v in record.items() if k not in ("iteration", "seconds")}
                       if logged else None)
            if done % cfg.checkpoint_every == 0 or last or signum or out_of_time:
                stop_if_diverged(done, stats["loss"].item())
                metrics["seconds"] = time.perf_counter() - t0
                save(where["latest"], done)
            if signum or out_of_time:
                break
    if signum and done < cfg.iterations:
        raise Stopped(f"{signal.Signals(signum).name} after iteration {done} of {cfg.iterations}, "
                      f"which {where['latest']} holds", signum)
    return {**metrics, "iterations": done, "engine": getattr(engine, "name", None),
            "target_iterations": cfg.iterations, "checkpoint": str(where["latest"]),
            "seconds": time.perf_counter() - t0}
