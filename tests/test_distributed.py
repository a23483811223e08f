"""Distributed meta-training: 2 CPU processes (gloo on loopback) against 1 process.

The runs are tiny sinusoid runs; every launch is a real `torchrun ... -m maml` (or, for the
failure cases, two hand-launched ranks), so they cost process start-ups, not compute.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maml.__main__ import main
from maml.config import Config
from maml.distributed import Ranks
from maml.errors import UsageError
from maml.training import paths, train

ROOT = Path(__file__).resolve().parents[1]
# 5 tasks over 2 ranks: unequal shares (3 + 2), so the gradient weighting is exercised
# the higher engine by name: these tests are about distribution, and the fault hooks of
# dist_worker.py replace higher_engine.meta_gradient
COMMON = ["--meta-batch-size", "5", "--log-every", "2", "--val-every", "4", "--val-tasks", "7",
          "--checkpoint-every", "4", "--learn-inner-lr", "--engine", "higher", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args: str, program: tuple[str, ...] = ("-m", "maml")) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *program, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-1500:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


def tensors(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {**state["model"]["state_dict"], "inner_lrs": state["inner_lrs"]}


def assert_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        gap = (a[key] - b[key]).abs().max().item()
        assert gap <= tol, (key, gap)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 processes: a run of 8 iterations cut after 1 by --minutes, then --resume to 8;
    1 process: 1 and 8 iterations straight.

    In the first 2-process run rank 1 builds DIFFERENT random weights: rank 0's broadcast must
    overwrite them for the runs to agree. Its time budget is spent after the first iteration on
    rank 0's clock, and both ranks must stop there together (else torchrun reports a failure).
    """
    tmp = tmp_path_factory.mktemp("dist")
    two, cut = tmp / "two" / "run.pt", tmp / "cut.pt"
    (tmp / "ready").mkdir()
    worker = (str(ROOT / "tests" / "dist_worker.py"), str(tmp / "ready"), "perturb")
    launches = {"first": torchrun(2, "train", "--iterations", "8", "--minutes", "1e-9",
                                  "--checkpoint", str(two), *COMMON, program=worker)}
    shutil.copy(two, cut)
    launches["resume"] = torchrun(2, "train", "--iterations", "8", "--resume", "--checkpoint",
                                  str(two), *COMMON)
    one = {}
    for n in (1, 8):
        one[n] = tmp / f"one{n}" / "run.pt"
        assert main(["train", "--iterations", str(n), "--checkpoint", str(one[n]), *COMMON]) == 0
    return {"two": two, "cut": cut, "one": one, "launches": launches}


def test_two_processes_give_the_weights_of_one(runs):
    assert torch.load(runs["cut"], weights_only=True)["iteration"] == 1
    assert_close(tensors(runs["cut"]), tensors(runs["one"][1]))
    # the 2-process run changed the weights (not a vacuous comparison) ...
    start = tensors(runs["cut"])
    moved = max((start[k] - tensors(runs["two"])[k]).abs().max().item() for k in start)
    assert moved > 1e-3
    # ... and resuming it with 2 processes (each loads the checkpoint) stays on the 1-process path
    assert_close(tensors(runs["two"]), tensors(runs["one"][8]))
    distributed, single = (torch.load(p, weights_only=True) for p in (runs["two"], runs["one"][8]))
    assert distributed["iteration"] == 8
    assert torch.equal(distributed["rng"]["tasks"], single["rng"]["tasks"])  # same tasks drawn
    assert abs(distributed["metrics"]["best_val"] - single["metrics"]["best_val"]) < 1e-5


def test_rank_zero_alone_writes_and_prints(runs):
    metrics = paths(runs["two"])["metrics"]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    # once each (rank 1 wrote nothing); 1: the validation that ends the --minutes cut
    assert [r["iteration"] for r in lines] == [1, 2, 4, 6, 8]
    assert sorted(p.name for p in runs["two"].parent.iterdir()) == [
        "run.best.pt", "run.metrics.jsonl", "run.pt"]
    for launch in runs["launches"].values():
        assert launch.stdout.count("trained ") == 1, launch.stdout


def test_eval_spread_over_ranks_equals_one_process(runs, capsys):
    # 7 tasks in batches of 3: shares 2+1, 2+1 and 1+0 (rank 1 idle on the last batch)
    args = ["eval", "--checkpoint", str(runs["two"]), "--tasks", "7", "--batch-size", "3",
            "--inner-steps", "2", "--json"]
    two = torchrun(2, *args)
    spread = json.loads(two.stdout.strip().splitlines()[-1])
    assert two.stdout.count('"metric"') == 1
    assert main(args) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # a rank adapts 2 tasks where one process adapts 3 at once, so the float32 sums run in
    # another order (and torchrun's workers use 1 thread): equal to float32 rounding, not bitwise
    for key in ("mean", "ci95"):
        assert spread[key] == pytest.approx(single[key], rel=1e-6, abs=1e-7), key
        assert spread["before"][key] == pytest.approx(single["before"][key], rel=1e-6, abs=1e-7)
    same = ("metric", "tasks", "inner_steps", "split", "checkpoint", "dataset", "iteration")
    assert {k: spread[k] for k in same} == {k: single[k] for k in same}


def test_shares_cover_every_task_once():
    for n in range(1, 12):
        for world in range(1, 5):
            shares = [Ranks(rank, world).share(n) for rank in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            sizes = [hi - lo for lo, hi in shares]
            assert max(sizes) - min(sizes) <= 1


def test_bad_timeout_is_one_clear_line(tmp_path, capsys):
    assert main(["train", "--dist-timeout", "0", "--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert capsys.readouterr().err.strip() == "error: --dist-timeout must be > 0 seconds, got 0"


def test_more_processes_than_tasks_is_one_clear_line(tmp_path):
    cfg = Config(iterations=2, meta_batch_size=1, checkpoint=str(tmp_path / "x.pt"))
    with pytest.raises(UsageError, match="--meta-batch-size 1 is smaller than the 2 processes"):
        train(cfg, progress=False, ranks=Ranks(rank=0, world=2))  # checked before any collective
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fault", ["stall:2", "die:2"])
def test_a_lost_rank_stops_the_others_with_one_line(tmp_path, fault):
    """Rank 1 hangs (or crashes) at its 2nd meta-gradient; rank 0 must stop within the timeout."""
    ready = tmp_path / "ready"
    ready.mkdir()
    port = str(free_port())
    args = ["train", "--iterations", "6", "--meta-batch-size", "2", "--log-every", "1",
            "--checkpoint-every", "1", "--val-every", "100", "--val-tasks", "2",
            "--checkpoint", str(tmp_path / "run.pt"), "--dist-timeout", "3", "--engine", "higher",
            "--quiet"]
    procs = []
    for rank, role in enumerate(["none", fault]):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(ready), role, *args],
            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    try:
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    lines = err.strip().splitlines()
    assert procs[0].returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: [rank 0/2] lost contact"), err
    assert "meta-gradient all-reduce" in lines[0] and "--dist-timeout 3 s" in lines[0]
    assert waited < 100
    # rank 0 wrote the iteration both ranks finished, and nothing after
    assert torch.load(tmp_path / "run.pt", weights_only=True)["iteration"] == 1


def test_ranks_started_with_other_settings_are_refused_by_name(tmp_path):
    """On several machines each is started by its own command; a rank with another seed and
    meta-batch used to train silently on a mix of task streams. Now every rank refuses, the
    rank that differs naming the options, before any training and any checkpoint."""
    ready = tmp_path / "ready"
    ready.mkdir()
    port = str(free_port())
    common = ["train", "--iterations", "2", "--val-tasks", "2", "--dist-timeout", "60",
              "--engine", "higher", "--quiet"]
    own = [["--meta-batch-size", "4", "--checkpoint", str(tmp_path / "a" / "run.pt")],
           ["--meta-batch-size", "6", "--seed", "3", "--checkpoint", str(tmp_path / "b" / "run.pt")]]
    procs = []
    for rank in range(2):  # rank 1's checkpoint path is its machine's own: not a difference
        env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(ready), "none",
             *common, *own[rank]], cwd=ROOT, env={**os.environ, **env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    try:
        for proc in procs:
            errs.append(proc.communicate(timeout=120)[1].strip().splitlines())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [2, 2], errs
    assert errs[1] == ["error: [rank 1/2] started with other settings than rank 0 "
                       "(--meta-batch-size 6 here, 4 on rank 0; --seed 3 here, 0 on rank 0): "
                       "start every process with the same command (and, to resume, the same "
                       "checkpoint)"], errs
    assert errs[0] == ["error: [rank 0/2] 1 process(es) were started with other settings than "
                       "rank 0 (their lines name them); start every process with the same "
                       "command"], errs
    assert not (tmp_path / "a" / "run.pt").exists() and not (tmp_path / "b" / "run.pt").exists()


def test_ctrl_c_stops_every_rank_after_the_same_iteration_with_a_checkpoint(tmp_path):
    """Ctrl-C reaches the whole process group, and torchrun's agent forwards it to each worker
    again: every rank must still finish the iteration together and rank 0 write it."""
    ckpt, metrics = tmp_path / "m.pt", tmp_path / "m.metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "maml", "train",
           "--iterations", "1000000", "--meta-batch-size", "4", "--log-every", "10",
           "--val-every", "1000000", "--checkpoint-every", "1000000", "--engine", "higher",
           "--checkpoint", str(ckpt), "--quiet"]
    run = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    started = time.monotonic()
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert run.poll() is None and time.monotonic() - started < 180, run.communicate()
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=120)
    stopped = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and "--resume" in stopped[0], err[-3000:]  # rank 0 alone says it
    at = int(re.search(r"after iteration (\d+)", stopped[0]).group(1))
    assert torch.load(ckpt, weights_only=True)["iteration"] == at >= 20


def test_a_usage_error_is_printed_once_not_once_per_rank(tmp_path):
    """Both ranks refuse the same bad setting; the first process of the machine alone says so,
    and before the ranks wait for each other (no rank is left to be stopped by torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "maml",
           "train", "--inner-lr", "-1", "--checkpoint", str(tmp_path / "run.pt"), "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=240)
    ours = [line for line in done.stderr.splitlines() if line.startswith(("error:", "stopped:"))]
    assert done.returncode != 0
    assert len(ours) == 1 and ours[0].startswith("error: --inner-lr must be >= 0"), done.stderr[-3000:]
    assert not (tmp_path / "run.pt").exists()
