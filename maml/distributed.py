"""Meta-training and evaluation spread over processes, GPUs and machines with `torch.distributed`.

Launch with torchrun (`torchrun --nproc-per-node N -m maml train ...`); torchrun sets `RANK`,
`WORLD_SIZE`, `LOCAL_RANK` and the rendezvous address, and `start` joins the process group:
nccl when the run is on CUDA (each process takes the GPU of its `LOCAL_RANK`), gloo on CPU, with
`--dist-timeout` seconds as the limit on any collective. Without torchrun's variables nothing is
initialised and every helper here is the identity, so single-process runs are unchanged.

How a meta-batch is split, so that N processes compute exactly what 1 process computes:
- every rank draws the SAME full meta-batch from the same seeded generator and keeps its own
  contiguous share of the tasks (`Ranks.share`): task sampling is split, not duplicated, and
  the generator's state stays identical on every rank (so rank 0's checkpoint fits them all);
- every rank starts from rank 0's weights (`broadcast_from_main`, after building or resuming);
- each rank's engine leaves the mean over ITS tasks in `.grad`; `average_meta_gradient`
  weights it by (tasks here / tasks in the meta-batch) and sums over ranks in ONE all-reduce of a
  flat buffer (all gradients plus the loss/accuracy statistics), which gives the mean over the
  whole meta-batch even when the shares are unequal. Clipping and the optimizer step then run on
  identical gradients everywhere, so the replicas stay equal (checked at every checkpoint by
  `check_replicas_agree`), and the non-finite check sees the same reduced loss on every rank:
  either all ranks stop or none does, and no rank writes while another diverged.

Why an explicit all-reduce and not `DistributedDataParallel`: DDP averages gradients from hooks
that its own `forward` arms, and it reduces once per `backward`. MAML never calls the wrapped
module's `forward` (the engines run `higher`'s functional copy, or `torch.func`, with explicit
parameter lists), and the reference engine calls `backward` once PER TASK, so DDP would at best
issue one all-reduce per task, and ranks with unequal task counts would then issue different
numbers of collectives and hang. Verified with torch 2.14.1, gloo, 2 processes
(`scripts/ddp_conflict_check.py`): `higher.monkeypatch` cannot wrap a DDP module at all
("TypeError: Cannot create a consistent method resolution order"), and running the engine on
`ddp.module` leaves every rank with its own, different, gradient: DDP silently averages nothing.
The explicit all-reduce keeps the engines unaware of distribution and costs one collective per
iteration; the 1-vs-2-process test in `tests/test_distributed.py` checks it.

Failures: a collective that fails (a peer process died: connection closed; or a peer stalled
longer than `--dist-timeout`) becomes a one-line `DistributedError` naming the rank and what it
was doing, instead of a hang or a deep traceback. Under torchrun the agent then stops the others.
That is what gloo (CPU) does, and what the tests check. With nccl, a timed-out collective is
caught by NCCL's watchdog, which by default ends the process with its own message after the same
timeout; `TORCH_NCCL_BLOCKING_WAIT=1` makes it raise here instead (not tested: no machine with
several GPUs so far).
All ranks stop after the same iteration (`max_over_ranks`): when rank 0's clock says the
`--minutes` budget is spent, or when any rank was asked to stop (Ctrl-C, SIGTERM). torchrun
forwards each signal it gets to every worker and kills them 30 s later, so under torchrun the
workers ignore signals after the first one: the checkpoint is written in that time, not cut off.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from maml.errors import RankError, UsageError

DEFAULT_TIMEOUT_S = 300.0
_JOINED: list[str] = []  # the backend, once this process has joined a process group


class DistributedError(RankError):
    """A collective failed: another process died or stalled past the timeout."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice `[start, stop)` of `n` items; sizes differ by at most one."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def sum(self, tensor: Tensor, what: str) -> Tensor:
        """`tensor` summed over ranks (in place, returned); the identity on one process."""
        if self.world > 1:
            with guard(self, what):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


SINGLE = Ranks()


@contextlib.contextmanager
def guard(ranks: Ranks, what: str) -> Iterator[None]:
    """Turn a failed collective into a one-line `DistributedError`."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        reason = _first_sentence(str(exc)) or type(exc).__name__
        raise DistributedError(
            f"[rank {ranks.rank}/{ranks.world}] lost contact with the other processes during "
            f"{what} ({reason}): a process died or stalled for more than --dist-timeout "
            f"{ranks.timeout_s:g} s; see the other ranks' output"
        ) from None


def _first_sentence(message: str) -> str:
    """The gist of a backend error: first line, without gloo's `[file.cc:123]` prefix, one sentence."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", lines[0])
    return re.split(r"(?<=[a-z0-9])\. ", text, maxsplit=1)[0][:160]


def launched() -> bool:
    """Whether torchrun (or an explicit RANK/WORLD_SIZE environment) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def under_torchrun_agent() -> bool:
    """Whether a torchrun agent watches this process: it forwards every SIGINT / SIGTERM it gets
    to each worker, and kills them 30 s later."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"environment variable {name}={value!r} must be an integer "
                         f"(torchrun sets it)") from None


def start(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Ranks, str]:
    """Join torchrun's process group (if launched by it); return this rank and the device to use.

    The backend is nccl for CUDA devices (with gloo for CPU tensors) and gloo otherwise; on
    CUDA each process takes `cuda:LOCAL_RANK`. Call `finish` after a clean run.
    """
    if timeout_s <= 0:
        raise UsageError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    if not launched():
        return Ranks(timeout_s=timeout_s), device
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    ranks = Ranks(rank, world, _env_int("LOCAL_RANK", rank), timeout_s)
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} asked for, but no CUDA GPU is available; use cpu")
        if ranks.local_rank >= torch.cuda.device_count():
            raise RankError(f"LOCAL_RANK {ranks.local_rank} but only {torch.cuda.device_count()} "
                            f"GPUs here; lower --nproc-per-node")
        device = f"cuda:{ranks.local_rank}"
        torch.cuda.set_device(ranks.local_rank)
    # with nccl, CPU tensors still go through gloo: the per-iteration stop decision
    # (`max_over_ranks`) then never waits for the GPU
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if not dist.is_initialized():
        with guard(ranks, f"the start-up of the {backend} process group"):
            _JOINED.append(backend)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=torch.device(device) if cuda else None)
    return ranks, device


def finish() -> None:
    """Leave the process group after a clean run (a failed run just exits).

    All ranks meet at a barrier first. Without it a rank that is done early (rank 1, while rank 0
    still writes the last checkpoint) tears down its gloo connections while its last messages may
    still be in flight to a busy peer; one CI run in many aborted that way at exit ("terminate
    called without an active exception", SIGABRT, after the run itself had finished), which
    torchrun reports as a failed run. See pytorch/gloo#155.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            with contextlib.suppress(RuntimeError, dist.DistError):  # a peer gone at the end
                dist.barrier()
        dist.destroy_process_group()


def exit_if_joined(code: int) -> None:
    """After a command that joined a process group (a torchrun rank), end the process now with
    `code`, whether the run failed or finished.

    Gloo's threads are destroyed at interpreter exit, and that can abort the process ("terminate
    called without an active exception", SIGABRT): after a failed run the group is still up
    mid-collective (this replaced the one-line error's status 2 with -6 in one CI run), and even
    after a clean `finish` one CI run in many still aborted there, after the run had finished,
    which torchrun reports as a failed run. Checkpoints are written atomically and the streams
    are flushed first, so nothing is lost by skipping interpreter teardown.
    """
    if _JOINED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def broadcast_from_main(tensors: Sequence[Tensor], ranks: Ranks) -> None:
    """Overwrite `tensors` on every rank with rank 0's values (the starting weights)."""
    if ranks.world == 1:
        return
    with torch.no_grad(), guard(ranks, "the broadcast of rank 0's weights"):
        for t in tensors:
            dist.broadcast(t.data, src=0)


def average_meta_gradient(
    params: Sequence[Tensor], stats: dict[str, Tensor], tasks_here: int, tasks_total: int,
    ranks: Ranks,
) -> dict[str, Tensor]:
    """Make `.grad` and `stats` (means over this rank's tasks) the means over the whole meta-batch.

    One all-reduce of a flat buffer; weights `tasks_here / tasks_total` so unequal shares average
    exactly. A missing `.grad` counts as zeros. The identity on one process.
    """
    if ranks.world == 1:
        return stats
    weight = tasks_here / tasks_total
    keys = sorted(stats)
    ref = params[0]
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    pieces += [stats[k].detach().reshape(1).to(ref.device, ref.dtype) for k in keys]
    flat = torch.cat(pieces) * weight
    ranks.sum(flat, "the meta-gradient all-reduce")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    return {k: flat[offset + i].clone() for i, k in enumerate(keys)}


def max_over_ranks(values: Sequence[int], ranks: Ranks) -> list[int]:
    """The largest of each value over all ranks, on every rank: e.g. whether any rank was asked
    to stop, or rank 0's clock (the others give 0) says the time budget is spent."""
    if ranks.world == 1:
        return list(values)
    tensor = torch.tensor([float(v) for v in values])  # on the CPU: no wait for the GPU
    with guard(ranks, "the exchange of the decision to stop"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(v) for v in tensor.tolist()]


def check_same_settings(settings: dict[str, Any], ranks: Ranks) -> None:
    """Raise on every rank if any rank's `settings` differ from rank 0's.

    On several machines each one is started by its own command, and a rank with another seed,
    meta-batch or step size would still join the collectives: the run would train on a mix of
    task streams and report rank 0's settings. Rank 0's settings travel as JSON bytes in CPU
    tensors (gloo on every backend); the rank that differs names the options."""
    if ranks.world == 1:
        return
    what = "the check that all processes were started with the same settings"
    mine = json.dumps(settings, sort_keys=True).encode()
    size = torch.tensor([len(mine) if ranks.is_main else 0], dtype=torch.int64)
    with guard(ranks, what):
        dist.broadcast(size, src=0)
        data = (torch.frombuffer(bytearray(mine), dtype=torch.uint8) if ranks.is_main
                else torch.zeros(int(size.item()), dtype=torch.uint8))
        dist.broadcast(data, src=0)
    main = json.loads(bytes(data.tolist()))
    settings = json.loads(mine)  # compared as JSON on both sides (tuples are lists there)
    differ = [k for k in sorted(set(settings) | set(main)) if settings.get(k) != main.get(k)]
    count = ranks.sum(torch.tensor([float(bool(differ))], dtype=torch.float64), what).item()
    if differ:
        shown = "; ".join(f"{'--' + k.replace('_', '-') if k != 'iteration' else 'iteration'} "
                          f"{json.dumps(settings.get(k))} here, {json.dumps(main.get(k))} on "
                          "rank 0" for k in differ)
        raise DistributedError(f"[rank {ranks.rank}/{ranks.world}] started with other settings "
                               f"than rank 0 ({shown}): start every process with the same "
                               "command (and, to resume, the same checkpoint)")
    if count > 0:
        raise DistributedError(f"[rank {ranks.rank}/{ranks.world}] {int(count)} process(es) were "
                               "started with other settings than rank 0 (their lines name them); "
                               "start every process with the same command")


def _fingerprint(tensors: Sequence[Tensor]) -> Tensor:
    """A small float64 summary per tensor (sum and index-weighted sum) that differs if they do."""
    rows = []
    for t in tensors:
        flat = t.detach().reshape(-1).double()
        ramp = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        rows.append(torch.stack([flat.sum(), (flat * ramp).sum()]))
    return torch.stack(rows)


def check_replicas_agree(tensors: Sequence[Tensor], ranks: Ranks) -> None:
    """Raise on every rank if any rank's `tensors` differ from rank 0's (before a checkpoint)."""
    if ranks.world == 1:
        return
    mine = _fingerprint(tensors)
    main = mine.clone()
    with guard(ranks, "the check that all ranks hold the same weights"):
        dist.broadcast(main, src=0)
    differ = torch.tensor([0.0 if torch.equal(mine, main) else 1.0], device=mine.device,
                          dtype=torch.float64)
    if ranks.sum(differ, "the check that all ranks hold the same weights").item() > 0:
        raise DistributedError(
            f"[rank {ranks.rank}/{ranks.world}] the processes' weights no longer agree "
            f"({int(differ.item())} differ from rank 0); not writing a checkpoint. This is a bug: "
            f"please report it with the launch line"
        )
